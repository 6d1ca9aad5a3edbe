// Package static serves secrets that the broker stores: API keys, passwords,
// webhook secrets. Every lease gets the credential's current version as it
// was put. Scopes are checked by grants only; nothing exists upstream, so
// renew and revoke have nothing to do.
package static

import (
	"context"
	"fmt"
	"maps"
	"time"

	"github.com/leasehold/leasehold/backends"
)

// Name is the registry name of this backend.
const Name = "static"

// Backend is the static backend.
type Backend struct{}

var _ backends.Backend = Backend{}

// Validate requires at least one secret field and no config.
func (Backend) Validate(spec backends.Spec) error {
	if len(spec.Secret) == 0 {
		return fmt.Errorf("%w: secret: a static credential needs at least one field", backends.ErrInvalidConfig)
	}
	for k := range spec.Config {
		return fmt.Errorf("%w: config.%s: the static backend takes no config", backends.ErrInvalidConfig, k)
	}
	return nil
}

// Issue returns a copy of the stored secret.
func (Backend) Issue(_ context.Context, req backends.IssueRequest) (*backends.Issued, error) {
	out := make(map[string][]byte, len(req.Spec.Secret))
	for k, v := range maps.All(req.Spec.Secret) {
		out[k] = append([]byte(nil), v...)
	}
	return &backends.Issued{Secret: out}, nil
}

// Renew grants any expiry: nothing upstream expires.
func (Backend) Renew(_ context.Context, _ backends.LeaseRef, expiresAt time.Time) (time.Time, error) {
	return expiresAt, nil
}

// Revoke has nothing upstream to destroy.
func (Backend) Revoke(context.Context, backends.LeaseRef) error { return nil }

// Package backends defines what issues secrets for leases. The broker keeps a
// credential's secret material encrypted in its store and hands it,
// decrypted, to the credential's backend for each lease: a static backend
// returns it as is; a dynamic one (PostgreSQL, OAuth2) uses it to mint a
// short-lived upstream credential with exactly the requested scopes, which it
// destroys again on Revoke.
package backends

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/url"
	"slices"
	"sort"
	"strings"
	"time"
)

// Sentinel errors backends wrap; the server maps them to gRPC codes.
var (
	// ErrInvalidConfig: a credential's config or secret is unusable.
	ErrInvalidConfig = errors.New("invalid credential config")
	// ErrUnsupportedScope: the backend cannot mint a requested scope.
	ErrUnsupportedScope = errors.New("unsupported scope")
	// ErrUpstreamUnavailable: the upstream system could not be reached; retry.
	ErrUpstreamUnavailable = errors.New("upstream unavailable")
	// ErrUpstreamRejected: the upstream refused what the credential's config
	// asked for (e.g. a SQL template that does not run). Retrying will not help.
	ErrUpstreamRejected = errors.New("upstream rejected the request")
	// ErrUnknownBackend: no backend is registered under the name.
	ErrUnknownBackend = errors.New("unknown backend")
)

// Spec is a credential as a backend sees it.
type Spec struct {
	Name   string
	Config map[string]string
	// Secret is the decrypted stored material. Backends must not log it, put
	// it in errors, or keep it beyond the call.
	Secret map[string][]byte
}

// IssueRequest asks for a secret for one lease.
type IssueRequest struct {
	Spec      Spec
	LeaseID   string
	AgentID   string
	TaskID    string
	Scopes    []string
	ExpiresAt time.Time
	// UpdateSecret, when set, stores secret as the credential's new current
	// version. A backend calls it when the upstream has replaced stored
	// material while issuing (an OAuth2 server rotating a refresh token),
	// before Issue returns and before it uses the replaced material again.
	UpdateSecret func(ctx context.Context, secret map[string][]byte) error
}

// Issued is what a backend returns for a lease.
type Issued struct {
	// Secret goes to the agent.
	Secret map[string][]byte
	// Artifact is the backend's handle on anything it created upstream (a
	// role name, a token) that Revoke must destroy. The broker stores it
	// encrypted. Empty when nothing upstream needs cleaning up.
	Artifact []byte
	// ExpiresAt, when set and earlier than requested, shortens the lease
	// (e.g. an upstream token that lives less long).
	ExpiresAt time.Time
}

// LeaseRef identifies a lease's upstream artefact for Renew and Revoke.
type LeaseRef struct {
	Spec     Spec
	LeaseID  string
	Artifact []byte
}

// Backend issues, renews and revokes secrets for leases. Methods may be
// called concurrently, and never inside a store transaction.
type Backend interface {
	// Validate checks a credential's config and secret when an admin puts it.
	// It returns an error wrapping ErrInvalidConfig that names the field.
	Validate(spec Spec) error
	// Issue produces the secret for a new lease.
	Issue(ctx context.Context, req IssueRequest) (*Issued, error)
	// Renew extends the upstream artefact to expiresAt and returns the
	// expiry it could grant (never later than asked).
	Renew(ctx context.Context, ref LeaseRef, expiresAt time.Time) (time.Time, error)
	// Revoke destroys the upstream artefact. It must be idempotent: revoking
	// something already gone succeeds.
	Revoke(ctx context.Context, ref LeaseRef) error
}

// Reissuer is implemented by backends whose upstream credential cannot be
// extended (an OAuth2 access token): renewing a lease issues a new one for
// the same scopes with Issue, which the agent receives, and the previous
// one is destroyed with Revoke.
type Reissuer interface {
	ReissueOnRenew(spec Spec) bool
}

// TwoPhaseRotator rotates a stored secret upstream with an overlap: the new
// secret is created alongside the current one, verified, promoted by the
// broker, and the old one retired after the overlap. Each step is called
// again after a crash, so each must be idempotent.
type TwoPhaseRotator interface {
	// Create makes a new secret valid upstream next to spec.Secret and
	// returns it. Called again with the same rotationID (after a crash), it
	// returns the same secret or an equally valid one.
	Create(ctx context.Context, spec Spec, rotationID string) (map[string][]byte, error)
	// Verify checks that next works upstream.
	Verify(ctx context.Context, spec Spec, next map[string][]byte) error
	// Retire makes old stop working upstream. Retiring what is already
	// gone succeeds.
	Retire(ctx context.Context, spec Spec, old map[string][]byte) error
}

// LeaseIndependent is implemented by backends whose leases do not hold the
// stored secret (PostgreSQL: each lease is its own role; the stored admin
// password only creates them). Rotating such a credential neither tells nor
// ends the leases issued from the previous version.
type LeaseIndependent interface {
	LeasesIndependentOfSecret() bool
}

// Rotator is implemented by backends whose stored secret can be replaced
// upstream, e.g. a database admin password. Leases issued before a rotation
// keep working.
type Rotator interface {
	// NextSecret generates a replacement for spec.Secret.
	NextSecret(spec Spec) (map[string][]byte, error)
	// Rotate makes next take effect upstream, authenticating with
	// spec.Secret; afterwards spec.Secret no longer works. Rotating back
	// (spec.Secret = next, next = the old secret) undoes it.
	Rotate(ctx context.Context, spec Spec, next map[string][]byte) error
}

// BatchRevoker is implemented by backends that destroy many artifacts of
// one credential faster together. RevokeBatch returns one error per ref
// (nil when done); the refs share a credential.
type BatchRevoker interface {
	RevokeBatch(ctx context.Context, refs []LeaseRef) []error
}

// Registry maps backend names to implementations. It is filled once at
// start-up (in cmd/leasehold) and read-only afterwards.
type Registry struct {
	m map[string]Backend
}

// NewRegistry returns an empty registry.
func NewRegistry() *Registry { return &Registry{m: map[string]Backend{}} }

// Register adds a backend; it panics on a duplicate name, a programming error.
func (r *Registry) Register(name string, b Backend) {
	if _, dup := r.m[name]; dup {
		panic(fmt.Sprintf("backends: %q registered twice", name))
	}
	r.m[name] = b
}

// Lookup returns the named backend, or an error wrapping ErrUnknownBackend
// that lists the valid names.
func (r *Registry) Lookup(name string) (Backend, error) {
	if b, ok := r.m[name]; ok {
		return b, nil
	}
	return nil, fmt.Errorf("%w %q (valid: %s)", ErrUnknownBackend, name, strings.Join(r.Names(), ", "))
}

// Names lists the registered names, sorted.
func (r *Registry) Names() []string {
	names := make([]string, 0, len(r.m))
	for n := range r.m {
		names = append(names, n)
	}
	sort.Strings(names)
	return names
}

// SubsetOf reports whether every scope in want is in have.
func SubsetOf(want, have []string) bool {
	for _, w := range want {
		if !slices.Contains(have, w) {
			return false
		}
	}
	return true
}

// CheckEndpointURL checks a URL the broker will send secrets or requests
// to: https, or http only to a loopback host (a local test server or a
// sidecar), so nothing crosses a network in clear text. An empty raw is
// refused when required. Errors wrap ErrInvalidConfig and name field.
func CheckEndpointURL(field, raw string, required bool) error {
	if raw == "" {
		if required {
			return fmt.Errorf("%w: %s: is required", ErrInvalidConfig, field)
		}
		return nil
	}
	u, err := url.Parse(raw)
	if err != nil || u.Host == "" {
		return fmt.Errorf("%w: %s: not an absolute URL", ErrInvalidConfig, field)
	}
	switch u.Scheme {
	case "https":
		return nil
	case "http":
		if ip := net.ParseIP(u.Hostname()); (ip != nil && ip.IsLoopback()) || u.Hostname() == "localhost" {
			return nil
		}
		return fmt.Errorf("%w: %s: http is allowed only to a loopback host; use https", ErrInvalidConfig, field)
	}
	return fmt.Errorf("%w: %s: scheme must be https", ErrInvalidConfig, field)
}

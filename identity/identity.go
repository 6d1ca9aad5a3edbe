// Package identity provides SPIFFE X.509 SVID sources (the Workload API, PEM
// files reloaded on change, and a dev CA), the mTLS transport credentials
// built from them, peer-ID extraction and the admin authorizer.
//
// TLS configs come from go-spiffe's tlsconfig, which asks the source for the
// current SVID and bundle on every handshake, so rotated SVIDs are used
// without restarts.
package identity

import (
	"context"
	"fmt"
	"io"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffegrpc/grpccredentials"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/grpc/credentials"
)

// Source supplies this workload's current X.509 SVID and the trust bundles
// used to verify peers.
type Source interface {
	x509svid.Source
	x509bundle.Source
	io.Closer
}

// ServerCredentials returns gRPC transport credentials that require a client
// SVID from trustDomain, verified against the source's bundle.
func ServerCredentials(src Source, trustDomain spiffeid.TrustDomain) credentials.TransportCredentials {
	return grpccredentials.MTLSServerCredentials(src, src, tlsconfig.AuthorizeMemberOf(trustDomain))
}

// ClientCredentials returns gRPC transport credentials that present the
// source's SVID and accept only a server whose SVID authorizer allows.
func ClientCredentials(src Source, authorizer tlsconfig.Authorizer) credentials.TransportCredentials {
	return grpccredentials.MTLSClientCredentials(src, src, authorizer)
}

// PeerID returns the SPIFFE ID of the verified peer of an mTLS connection.
func PeerID(ctx context.Context) (spiffeid.ID, bool) {
	return grpccredentials.PeerIDFromContext(ctx)
}

// SelfID returns the SPIFFE ID in the source's current SVID.
func SelfID(src x509svid.Source) (spiffeid.ID, error) {
	svid, err := src.GetX509SVID()
	if err != nil {
		return spiffeid.ID{}, fmt.Errorf("get SVID: %w", err)
	}
	return svid.ID, nil
}

// AdminSet is the set of SPIFFE IDs allowed to call admin RPCs.
type AdminSet struct {
	ids map[spiffeid.ID]struct{}
}

// NewAdminSet parses admin SPIFFE IDs; each must be in trustDomain.
func NewAdminSet(trustDomain spiffeid.TrustDomain, ids []string) (AdminSet, error) {
	s := AdminSet{ids: make(map[spiffeid.ID]struct{}, len(ids))}
	for _, raw := range ids {
		id, err := spiffeid.FromString(raw)
		if err != nil {
			return AdminSet{}, fmt.Errorf("admin id %q: %w", raw, err)
		}
		if id.TrustDomain() != trustDomain {
			return AdminSet{}, fmt.Errorf("admin id %q is not in trust domain %q", raw, trustDomain)
		}
		s.ids[id] = struct{}{}
	}
	return s, nil
}

// IsAdmin reports whether id is an admin.
func (s AdminSet) IsAdmin(id spiffeid.ID) bool {
	_, ok := s.ids[id]
	return ok
}

// Len is the number of admins.
func (s AdminSet) Len() int { return len(s.ids) }

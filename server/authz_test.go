package server

import (
	"path/filepath"
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/leasehold/leasehold/backends"
	"github.com/leasehold/leasehold/identity"
	"github.com/leasehold/leasehold/store/bolt"
	"github.com/leasehold/leasehold/store/seal"
)

// Deny by default: every method the server registers must have an entry in
// methodAccess, and every entry must name a registered method.
func TestEveryMethodHasAnEntry(t *testing.T) {
	td := spiffeid.RequireTrustDomainFromString("leasehold.test")
	admins, err := identity.NewAdminSet(td, []string{"spiffe://leasehold.test/admin"})
	require.NoError(t, err)
	st, err := bolt.Open(bolt.Config{Path: filepath.Join(t.TempDir(), "db")})
	require.NoError(t, err)
	defer st.Close()
	kr, err := seal.New(make([]byte, 32))
	require.NoError(t, err)
	s, err := New(Config{TrustDomain: td, Admins: admins}, Deps{Store: st, Backends: backends.NewRegistry(), Keyring: kr, Credentials: insecure.NewCredentials()})
	require.NoError(t, err)

	registered := map[string]bool{}
	for svc, info := range s.GRPCServer().GetServiceInfo() {
		for _, m := range info.Methods {
			full := "/" + svc + "/" + m.Name
			registered[full] = true
			_, ok := methodAccess[full]
			require.True(t, ok, "%s has no entry in methodAccess: add one (deny by default)", full)
		}
	}
	for m := range methodAccess {
		require.True(t, registered[m], "methodAccess lists %s, which the server does not register", m)
	}
	require.Equal(t, accessAdmin, methodAccess["/leasehold.v1.AdminService/RevokeAgent"])
}

package server_test

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net/url"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffegrpc/grpccredentials"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/status"

	"github.com/leasehold/leasehold/identity"
	leaseholdv1 "github.com/leasehold/leasehold/proto/leasehold/v1"
	"github.com/leasehold/leasehold/server"
)

// Clients the broker must not let in: the handshake fails (Unavailable on
// the client) or the call is Unauthenticated, and nothing is recorded.
func TestHostileClientsAreRefused(t *testing.T) {
	e := newEnv(t)
	e.putStatic("crm/salesforce", map[string]string{"api_key": "k"})
	_, err := e.admin.CreateGrant(ctx, &leaseholdv1.CreateGrantRequest{Grant: &leaseholdv1.Grant{
		Subject:    &leaseholdv1.Grant_SpiffeIdPrefix{SpiffeIdPrefix: "spiffe://leasehold.test"},
		Credential: "crm/salesforce", Scopes: []string{"read"},
	}})
	require.NoError(t, err)

	otherTD := spiffeid.RequireTrustDomainFromString("evil.example")
	otherCA, err := identity.NewDevCA(otherTD)
	require.NoError(t, err)
	lookalikeCA, err := identity.NewDevCA(td) // same trust domain name, different key
	require.NoError(t, err)
	issue := func(ca *identity.DevCA, id string, opts identity.SVIDOptions) *x509svid.SVID {
		s, err := ca.Issue(spiffeid.RequireFromString(id), opts)
		require.NoError(t, err)
		return s
	}
	// The client trusts the real broker, so only the server can refuse.
	mtls := func(svid *x509svid.SVID) credentials.TransportCredentials {
		return grpccredentials.MTLSClientCredentials(svid, e.ca.Bundle(), tlsconfig.AuthorizeAny())
	}
	cases := map[string]credentials.TransportCredentials{
		"no client certificate": grpccredentials.TLSClientCredentials(e.ca.Bundle(), tlsconfig.AuthorizeAny()),
		"another trust domain":  mtls(issue(otherCA, "spiffe://evil.example/agents/agent-1", identity.SVIDOptions{})),
		"self-signed lookalike": mtls(issue(lookalikeCA, agent1ID, identity.SVIDOptions{})),
		"expired":               mtls(e.svid(agent1ID, identity.SVIDOptions{NotBefore: time.Now().Add(-2 * time.Hour), TTL: time.Hour})),
		"not yet valid":         mtls(e.svid(agent1ID, identity.SVIDOptions{NotBefore: time.Now().Add(time.Hour), TTL: time.Hour})),
		"plain TLS client cert without SPIFFE ID": credentials.NewTLS(&tls.Config{
			InsecureSkipVerify: true, // the test is about the server side
			Certificates:       []tls.Certificate{selfSignedNoURI(t)},
		}),
		// Signed by the broker's own CA, so only the SVID rules refuse them.
		"CA certificate as leaf": rawClient(signedByEnvCA(t, e, func(c *x509.Certificate) {
			c.IsCA, c.BasicConstraintsValid = true, true
			c.KeyUsage = x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature
		})),
		"two URI SANs": rawClient(signedByEnvCA(t, e, func(c *x509.Certificate) {
			second, _ := url.Parse(agent2ID)
			c.URIs = append(c.URIs, second)
		})),
	}
	// Control: the same construction with a good SVID gets through.
	good, err := grpc.NewClient(e.addr, grpc.WithTransportCredentials(mtls(e.svid(agent1ID, identity.SVIDOptions{}))))
	require.NoError(t, err)
	defer good.Close()
	_, err = leaseholdv1.NewBrokerServiceClient(good).WhoAmI(ctx, &leaseholdv1.WhoAmIRequest{})
	require.NoError(t, err)
	// Control for the crafted ones: the same crafting, unaltered, gets through.
	crafted, err := grpc.NewClient(e.addr, grpc.WithTransportCredentials(rawClient(signedByEnvCA(t, e, func(*x509.Certificate) {}))))
	require.NoError(t, err)
	defer crafted.Close()
	_, err = leaseholdv1.NewBrokerServiceClient(crafted).WhoAmI(ctx, &leaseholdv1.WhoAmIRequest{})
	require.NoError(t, err, "an unaltered crafted SVID is accepted")

	before := e.snapshot()
	for name, creds := range cases {
		t.Run(name, func(t *testing.T) {
			conn, err := grpc.NewClient(e.addr, grpc.WithTransportCredentials(creds))
			require.NoError(t, err)
			defer conn.Close()
			_, err = leaseholdv1.NewBrokerServiceClient(conn).AcquireLease(ctx, acquireReq("crm/salesforce", "t", "read"))
			require.Error(t, err)
			code := status.Code(err)
			require.Contains(t, []codes.Code{codes.Unavailable, codes.Unauthenticated}, code, "got %v", err)
		})
	}
	require.Equal(t, before, e.snapshot(), "no hostile call reached the store")
}

func rawClient(cert tls.Certificate) credentials.TransportCredentials {
	return credentials.NewTLS(&tls.Config{InsecureSkipVerify: true, Certificates: []tls.Certificate{cert}}) // server side under test
}

// signedByEnvCA makes an agent-1 client certificate signed by the test
// broker's real CA, altered by mutate.
func signedByEnvCA(t *testing.T, e *env, mutate func(*x509.Certificate)) tls.Certificate {
	t.Helper()
	certPEM, err := os.ReadFile(filepath.Join(e.dir, "ca", "ca.pem"))
	require.NoError(t, err)
	keyPEM, err := os.ReadFile(filepath.Join(e.dir, "ca", "ca-key.pem"))
	require.NoError(t, err)
	cb, _ := pem.Decode(certPEM)
	kb, _ := pem.Decode(keyPEM)
	caCert, err := x509.ParseCertificate(cb.Bytes)
	require.NoError(t, err)
	caKey, err := x509.ParsePKCS8PrivateKey(kb.Bytes)
	require.NoError(t, err)
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	require.NoError(t, err)
	id, _ := url.Parse(agent1ID)
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(time.Now().UnixNano()), URIs: []*url.URL{id},
		NotBefore: time.Now().Add(-time.Minute), NotAfter: time.Now().Add(time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}
	mutate(tmpl)
	der, err := x509.CreateCertificate(rand.Reader, tmpl, caCert, key.Public(), caKey)
	require.NoError(t, err)
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
}

func selfSignedNoURI(t *testing.T) tls.Certificate {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	require.NoError(t, err)
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "agent-1"},
		NotBefore: time.Now().Add(-time.Minute), NotAfter: time.Now().Add(time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	require.NoError(t, err)
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
}

// A configured admin whose SVID is revoked is refused admin RPCs until
// another admin reinstates it; an admin cannot revoke itself.
func TestRevokedAdminIsRefused(t *testing.T) {
	const admin2 = "spiffe://leasehold.test/ops/second-admin"
	e := newEnv(t, func(c *server.Config) {
		admins, err := identity.NewAdminSet(td, []string{adminID, admin2})
		require.NoError(t, err)
		c.Admins = admins
	})
	second := leaseholdv1.NewAdminServiceClient(e.dial(admin2))
	_, err := second.ListAgents(ctx, &leaseholdv1.ListAgentsRequest{})
	require.NoError(t, err)

	_, err = e.admin.RevokeAgent(ctx, &leaseholdv1.RevokeAgentRequest{SpiffeId: adminID, Reason: "oops"})
	requireCode(t, err, codes.FailedPrecondition, "cannot revoke itself")

	_, err = e.admin.RevokeAgent(ctx, &leaseholdv1.RevokeAgentRequest{SpiffeId: admin2, Reason: "SVID stolen"})
	require.NoError(t, err)
	_, err = second.ListAgents(ctx, &leaseholdv1.ListAgentsRequest{})
	requireCode(t, err, codes.PermissionDenied, "revoked")
	_, err = second.ReinstateAgent(ctx, &leaseholdv1.ReinstateAgentRequest{SpiffeId: admin2})
	requireCode(t, err, codes.PermissionDenied, "revoked")

	_, err = e.admin.ReinstateAgent(ctx, &leaseholdv1.ReinstateAgentRequest{SpiffeId: admin2})
	require.NoError(t, err)
	_, err = second.ListAgents(ctx, &leaseholdv1.ListAgentsRequest{})
	require.NoError(t, err)
}

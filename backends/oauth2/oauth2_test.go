package oauth2_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"maps"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/leasehold/leasehold/backends"
	"github.com/leasehold/leasehold/backends/backendtest"
	"github.com/leasehold/leasehold/backends/oauth2"
	"github.com/leasehold/leasehold/backends/oauth2/hydratest"
)

func spec(h *hydratest.Hydra, c hydratest.Client, method string) backends.Spec {
	return backends.Spec{Name: "mail/api", Config: map[string]string{
		"token_url": h.TokenURL(), "revocation_url": h.RevocationURL(), "scopes": "mail.read mail.send", "auth_method": method,
	}, Secret: map[string][]byte{"client_id": []byte(c.ID), "client_secret": []byte(c.Secret)}}
}

func TestConformanceAgainstHydra(t *testing.T) {
	h := hydratest.Start(t)
	for _, method := range []string{"client_secret_basic", "client_secret_post"} {
		t.Run(method, func(t *testing.T) {
			s := spec(h, h.CreateClient(t, method, "mail.read", "mail.send"), method)
			down := spec(h, hydratest.Client{ID: "x", Secret: "down-canary-secret"}, method)
			down.Config["token_url"], down.Config["revocation_url"] = "http://127.0.0.1:1/oauth2/token", "http://127.0.0.1:1/oauth2/revoke"
			backendtest.Run(t, backendtest.Case{Backend: &oauth2.Backend{}, Spec: s, Scopes: []string{"mail.read"}, Dynamic: true, Unreachable: &down})
		})
	}
}

// A lease's token carries exactly the requested scopes, ends no later than
// the token, and is inactive at the server once revoked.
func TestTokenScopesExpiryAndRevocation(t *testing.T) {
	h := hydratest.Start(t)
	c := h.CreateClient(t, "client_secret_basic", "mail.read", "mail.send")
	s := spec(h, c, "client_secret_basic")
	b := &oauth2.Backend{}
	ctx := context.Background()
	want := time.Now().Add(24 * time.Hour)
	got, err := b.Issue(ctx, backends.IssueRequest{Spec: s, LeaseID: "ls_1", Scopes: []string{"mail.read"}, ExpiresAt: want})
	require.NoError(t, err)
	require.ElementsMatch(t, []string{"access_token", "token_type", "expires_at", "scope"}, keys(got.Secret), "never the client secret")
	require.Equal(t, "bearer", strings.ToLower(string(got.Secret["token_type"])))
	require.Equal(t, "mail.read", string(got.Secret["scope"]))
	require.True(t, got.ExpiresAt.Before(want), "Hydra's tokens live an hour: the lease is shortened to the token")
	require.Equal(t, got.ExpiresAt.UTC().Format(time.RFC3339), string(got.Secret["expires_at"]))

	// Renewal stops at the token's expiry.
	ref := backends.LeaseRef{Spec: s, LeaseID: "ls_1", Artifact: got.Artifact}
	renewed, err := b.Renew(ctx, ref, want)
	require.NoError(t, err)
	require.Equal(t, got.ExpiresAt.Unix(), renewed.Unix(), "a lease cannot outlive its token")
	sooner := time.Now().Add(time.Minute)
	renewed, err = b.Renew(ctx, ref, sooner)
	require.NoError(t, err)
	require.Equal(t, sooner, renewed)

	in := h.Introspect(t, string(got.Secret["access_token"]))
	require.True(t, in.Active)
	require.Equal(t, "mail.read", in.Scope, "exactly the requested scope, not everything the client may get")
	require.Equal(t, c.ID, in.ClientID)

	require.NoError(t, b.Revoke(ctx, backends.LeaseRef{Spec: s, LeaseID: "ls_1", Artifact: got.Artifact}))
	require.False(t, h.Introspect(t, string(got.Secret["access_token"])).Active, "revoked at the server")
}

func TestScopesOutsideTheCredentialAreRefused(t *testing.T) {
	h := hydratest.Start(t)
	c := h.CreateClient(t, "client_secret_basic", "mail.read", "mail.send", "admin")
	s := spec(h, c, "client_secret_basic")
	b := &oauth2.Backend{}
	// Not in the credential's scopes: refused before any request.
	_, err := b.Issue(context.Background(), backends.IssueRequest{Spec: s, LeaseID: "ls_2", Scopes: []string{"admin"}, ExpiresAt: time.Now().Add(time.Minute)})
	require.ErrorIs(t, err, backends.ErrUnsupportedScope)
	// In the credential's list but not allowed for the client at the server.
	s.Config["scopes"] = "mail.read calendar.write"
	_, err = b.Issue(context.Background(), backends.IssueRequest{Spec: s, LeaseID: "ls_3", Scopes: []string{"calendar.write"}, ExpiresAt: time.Now().Add(time.Minute)})
	require.ErrorIs(t, err, backends.ErrUnsupportedScope)
	// A wrong client secret is a rejection, and the error does not echo it.
	s.Secret["client_secret"] = []byte("wrong-canary-secret-42")
	_, err = b.Issue(context.Background(), backends.IssueRequest{Spec: s, LeaseID: "ls_4", Scopes: []string{"mail.read"}, ExpiresAt: time.Now().Add(time.Minute)})
	require.ErrorIs(t, err, backends.ErrUpstreamRejected)
	require.NotContains(t, err.Error(), "wrong-canary-secret-42")
}

func TestValidate(t *testing.T) {
	ok := backends.Spec{Config: map[string]string{"token_url": "https://auth.example.com/oauth2/token", "scopes": "a b"},
		Secret: map[string][]byte{"client_id": []byte("id"), "client_secret": []byte("validate-canary")}}
	b := &oauth2.Backend{}
	require.NoError(t, b.Validate(ok))
	for name, mutate := range map[string]func(s *backends.Spec){
		"config.token_url":                         func(s *backends.Spec) { delete(s.Config, "token_url") },
		"http is allowed only":                     func(s *backends.Spec) { s.Config["token_url"] = "http://auth.example.com/token" },
		"config.revocation_url":                    func(s *backends.Spec) { s.Config["revocation_url"] = "ftp://x/y" },
		"config.scopes":                            func(s *backends.Spec) { s.Config["scopes"] = " " },
		"config.auth_method":                       func(s *backends.Spec) { s.Config["auth_method"] = "tls_client_auth" },
		"secret.refresh_token":                     func(s *backends.Spec) { s.Secret["refresh_token"] = []byte("r") },
		"client_id and client_secret are required": func(s *backends.Spec) { delete(s.Secret, "client_secret") },
	} {
		s := backends.Spec{Config: map[string]string{}, Secret: map[string][]byte{}}
		for k, v := range ok.Config {
			s.Config[k] = v
		}
		for k, v := range ok.Secret {
			s.Secret[k] = v
		}
		mutate(&s)
		err := b.Validate(s)
		require.ErrorIs(t, err, backends.ErrInvalidConfig, name)
		require.ErrorContains(t, err, name)
		require.NotContains(t, err.Error(), "validate-canary")
	}
}

func keys(m map[string][]byte) []string {
	var out []string
	for k := range m {
		out = append(out, k)
	}
	return out
}

func userSpec(h *hydratest.Hydra, c hydratest.Client, refreshToken string) backends.Spec {
	return backends.Spec{Name: "mail/user-17", Config: map[string]string{
		"token_url": h.TokenURL(), "revocation_url": h.RevocationURL(), "scopes": "mail.read mail.send", "grant": "refresh_token",
	}, Secret: map[string][]byte{"client_id": []byte(c.ID), "client_secret": []byte(c.Secret), "refresh_token": []byte(refreshToken)}}
}

// Delegated user access: each lease redeems the stored refresh token for a
// token with the lease's scopes only; the server rotates the refresh token
// and the backend hands the new one to UpdateSecret before using it again,
// so concurrent leases never present a replaced refresh token (which Hydra
// treats as theft, revoking the whole chain).
func TestRefreshTokenGrantRotatesAndNarrows(t *testing.T) {
	h := hydratest.Start(t)
	c := h.CreateUserClient(t, "mail.read", "mail.send")
	rt := h.UserRefreshToken(t, c, "user-17", "mail.read", "mail.send")
	var (
		mu     sync.Mutex
		stored = userSpec(h, c, rt)
		saves  int
	)
	update := func(_ context.Context, secret map[string][]byte) error {
		mu.Lock()
		defer mu.Unlock()
		require.NotEqual(t, string(stored.Secret["refresh_token"]), string(secret["refresh_token"]))
		require.Equal(t, c.Secret, string(secret["client_secret"]), "the rest of the secret is kept")
		stored.Secret, saves = secret, saves+1
		return nil
	}
	current := func() backends.Spec {
		mu.Lock()
		defer mu.Unlock()
		return backends.Spec{Name: stored.Name, Config: stored.Config, Secret: maps.Clone(stored.Secret)}
	}
	b := &oauth2.Backend{}
	ctx := context.Background()

	// Hydra does not narrow a refresh to fewer scopes: by default such a
	// token is revoked and the lease refused, naming the setting.
	_, err := b.Issue(ctx, backends.IssueRequest{Spec: current(), LeaseID: "ls_u0", Scopes: []string{"mail.read"},
		ExpiresAt: time.Now().Add(time.Hour), UpdateSecret: update})
	require.ErrorIs(t, err, backends.ErrUpstreamRejected)
	require.ErrorContains(t, err, "scope_narrowing")
	require.Equal(t, 1, saves, "the rotated refresh token was stored even though the lease was refused")

	// Accepting broader tokens is an explicit choice, and the agent is told
	// what its token really carries.
	mu.Lock()
	stored.Config = maps.Clone(stored.Config)
	stored.Config["scope_narrowing"] = "best_effort"
	mu.Unlock()
	got, err := b.Issue(ctx, backends.IssueRequest{Spec: current(), LeaseID: "ls_u1", Scopes: []string{"mail.read"},
		ExpiresAt: time.Now().Add(time.Hour), UpdateSecret: update})
	require.NoError(t, err)
	require.NotContains(t, keys(got.Secret), "refresh_token", "the agent never gets the refresh token")
	in := h.Introspect(t, string(got.Secret["access_token"]))
	require.True(t, in.Active)
	require.Equal(t, "user-17", in.Subject, "a token acting for the user")
	require.Equal(t, in.Scope, string(got.Secret["scope"]), "the scope field is what the server granted")
	require.Equal(t, 2, saves, "Hydra rotated the refresh token again and it was stored")

	// Concurrent leases, each starting from what the store held when it
	// began (possibly a token already replaced): all succeed.
	var wg sync.WaitGroup
	errs := make([]error, 6)
	for i := range errs {
		spec := current()
		wg.Go(func() {
			_, errs[i] = b.Issue(ctx, backends.IssueRequest{Spec: spec, LeaseID: fmt.Sprintf("ls_u%d", i+2), Scopes: []string{"mail.send"},
				ExpiresAt: time.Now().Add(time.Hour), UpdateSecret: update})
		})
	}
	wg.Wait()
	for _, err := range errs {
		require.NoError(t, err)
	}
	require.Equal(t, 8, saves)

	// Another process (a restarted broker) starts from the stored secret.
	_, err = (&oauth2.Backend{}).Issue(ctx, backends.IssueRequest{Spec: current(), LeaseID: "ls_u9", Scopes: []string{"mail.read"},
		ExpiresAt: time.Now().Add(time.Hour), UpdateSecret: update})
	require.NoError(t, err, "the stored refresh token is the newest")

	// The original refresh token is spent: presenting it again fails (and,
	// at Hydra, revokes the chain), which is why the backend never does.
	_, err = (&oauth2.Backend{}).Issue(ctx, backends.IssueRequest{Spec: userSpec(h, c, rt), LeaseID: "ls_ux", Scopes: []string{"mail.read"},
		ExpiresAt: time.Now().Add(time.Hour)})
	require.ErrorIs(t, err, backends.ErrUpstreamRejected)
}

// private_key_jwt: the broker stores a private key instead of a client
// secret and signs a fresh assertion per request; Hydra verifies it against
// the registered public key, for tokens and for revocation.
func TestPrivateKeyJWTAgainstHydra(t *testing.T) {
	h := hydratest.Start(t)
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	require.NoError(t, err)
	der, err := x509.MarshalPKCS8PrivateKey(key)
	require.NoError(t, err)
	c := h.CreateJWTClient(t, oauth2.PublicJWK(&key.PublicKey, "k1"), "mail.read")
	s := backends.Spec{Name: "mail/jwt", Config: map[string]string{"token_url": h.TokenURL(), "revocation_url": h.RevocationURL(),
		"scopes": "mail.read", "auth_method": "private_key_jwt", "key_id": "k1"},
		Secret: map[string][]byte{"client_id": []byte(c.ID), "private_key": pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der})}}
	backendtest.Run(t, backendtest.Case{Backend: &oauth2.Backend{}, Spec: s, Scopes: []string{"mail.read"}, Dynamic: true})

	b := &oauth2.Backend{}
	got, err := b.Issue(context.Background(), backends.IssueRequest{Spec: s, LeaseID: "ls_j", Scopes: []string{"mail.read"}, ExpiresAt: time.Now().Add(time.Hour)})
	require.NoError(t, err)
	tok := string(got.Secret["access_token"])
	require.True(t, h.Introspect(t, tok).Active)
	require.NoError(t, b.Revoke(context.Background(), backends.LeaseRef{Spec: s, LeaseID: "ls_j", Artifact: got.Artifact}))
	require.False(t, h.Introspect(t, tok).Active, "revoked with a signed assertion")

	// Another key is not accepted.
	other, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	require.NoError(t, err)
	der, err = x509.MarshalPKCS8PrivateKey(other)
	require.NoError(t, err)
	s.Secret["private_key"] = pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der})
	_, err = b.Issue(context.Background(), backends.IssueRequest{Spec: s, LeaseID: "ls_k", Scopes: []string{"mail.read"}, ExpiresAt: time.Now().Add(time.Hour)})
	require.ErrorIs(t, err, backends.ErrUpstreamRejected)
}

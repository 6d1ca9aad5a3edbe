package oauth2_test

import (
	"context"
	"strings"
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
		"config.auth_method":                       func(s *backends.Spec) { s.Config["auth_method"] = "private_key_jwt" },
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

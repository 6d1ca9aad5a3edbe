package server_test

import (
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/encoding/protojson"

	"github.com/leasehold/leasehold/backends/oauth2/hydratest"
	"github.com/leasehold/leasehold/client"
	leaseholdv1 "github.com/leasehold/leasehold/proto/leasehold/v1"
	"github.com/leasehold/leasehold/server"
)

// An OAuth2 credential on a real Hydra: each lease is an access token for
// exactly its scopes, revoked at the server through the revocation queue
// when the lease is released or its agent revoked; the client secret never
// leaves the broker and no token is written anywhere in clear.
func TestOAuth2LeasesAreTokensRevokedAtTheServer(t *testing.T) {
	h := hydratest.Start(t)
	c := h.CreateClient(t, "client_secret_basic", "mail.read", "mail.send")
	e := newEnv(t, noQuotas, func(cfg *server.Config) {
		cfg.RevocationMinBackoff, cfg.RevocationMaxBackoff, cfg.RevocationPoll = 50*time.Millisecond, 200*time.Millisecond, 50*time.Millisecond
	})
	_, err := e.admin.PutCredential(ctx, &leaseholdv1.PutCredentialRequest{Name: "mail/api", Backend: "oauth2",
		Config: map[string]string{"token_url": h.TokenURL(), "revocation_url": h.RevocationURL(), "scopes": "mail.read mail.send"},
		Secret: map[string]string{"client_id": c.ID, "client_secret": c.Secret}})
	require.NoError(t, err)
	e.grant("mail/api", agent1ID, "mail.read")

	l, err := e.agent1.AcquireLease(ctx, acquireReq("mail/api", "summarize-inbox", "mail.read"))
	require.NoError(t, err)
	sec := l.GetSecret()
	require.Len(t, sec, 4)
	token := sec["access_token"]
	in := h.Introspect(t, token)
	require.True(t, in.Active)
	require.Equal(t, "mail.read", in.Scope)
	require.False(t, l.GetLease().GetExpiresAt().AsTime().After(time.Unix(in.Exp, 0)), "the lease ends no later than its token")

	_, err = e.agent1.AcquireLease(ctx, acquireReq("mail/api", "t", "mail.send"))
	requireCode(t, err, codes.PermissionDenied, "mail.send")
	_, err = e.agent2.AcquireLease(ctx, acquireReq("mail/api", "t", "mail.read"))
	requireCode(t, err, codes.PermissionDenied, "")

	_, err = e.agent1.ReleaseLease(ctx, &leaseholdv1.ReleaseLeaseRequest{LeaseId: l.GetLease().GetId()})
	require.NoError(t, err)
	require.Eventually(t, func() bool { return !h.Introspect(t, token).Active }, 10*time.Second, 50*time.Millisecond,
		"a released lease's token is revoked at the server")

	var tokens []string
	for _, task := range []string{"a", "b"} {
		l, err := e.agent1.AcquireLease(ctx, acquireReq("mail/api", task, "mail.read"))
		require.NoError(t, err)
		tokens = append(tokens, l.GetSecret()["access_token"])
	}
	_, err = e.admin.RevokeAgent(ctx, &leaseholdv1.RevokeAgentRequest{SpiffeId: agent1ID, Reason: "compromised"})
	require.NoError(t, err)
	for _, tok := range tokens {
		require.Eventually(t, func() bool { return !h.Introspect(t, tok).Active }, 10*time.Second, 50*time.Millisecond,
			"revoking the agent revokes its tokens at the server")
	}

	audit, err := protojson.Marshal(&leaseholdv1.QueryAuditResponse{Records: e.audit(nil)})
	require.NoError(t, err)
	e.stop()
	db, err := os.ReadFile(filepath.Join(e.dir, "leasehold.db"))
	require.NoError(t, err)
	for _, secret := range append(tokens, token, c.Secret) {
		require.NotContains(t, string(audit), secret)
		require.NotContains(t, e.logs.String(), secret)
		require.NotContains(t, string(db), secret, "tokens and the client secret are sealed at rest")
	}
}

// Delegated user access through the broker: the refresh token Hydra
// rotates on every use is stored as a new credential version (audited,
// sealed) before it is used again, so the broker keeps working across a
// restart; no refresh token reaches the agent, the audit trail, the log or
// the store file in clear.
func TestOAuth2RefreshTokenRotationIsStored(t *testing.T) {
	h := hydratest.Start(t)
	c := h.CreateUserClient(t, "mail.read")
	rt := h.UserRefreshToken(t, c, "user-17", "mail.read")
	e := newEnv(t, noQuotas)
	_, err := e.admin.PutCredential(ctx, &leaseholdv1.PutCredentialRequest{Name: "mail/user-17", Backend: "oauth2",
		Config: map[string]string{"token_url": h.TokenURL(), "scopes": "mail.read", "grant": "refresh_token"},
		Secret: map[string]string{"client_id": c.ID, "client_secret": c.Secret, "refresh_token": rt}})
	require.NoError(t, err)
	e.grant("mail/user-17", agent1ID, "mail.read")

	var tokens []string
	for i := range 3 {
		l, err := e.agent1.AcquireLease(ctx, acquireReq("mail/user-17", fmt.Sprintf("inbox-%d", i), "mail.read"))
		require.NoError(t, err)
		require.NotContains(t, l.GetSecret(), "refresh_token")
		require.Equal(t, "user-17", h.Introspect(t, l.GetSecret()["access_token"]).Subject)
		tokens = append(tokens, l.GetSecret()["access_token"])
		if i == 1 {
			e.restart() // a new process starts from the stored, newest refresh token
		}
	}
	got, err := e.admin.GetCredential(ctx, &leaseholdv1.GetCredentialRequest{Name: "mail/user-17"})
	require.NoError(t, err)
	require.Equal(t, uint64(4), got.GetCredential().GetCurrentVersion(), "one new version per rotation")
	rotations := e.audit(&leaseholdv1.QueryAuditRequest{Credential: "mail/user-17"})
	n := 0
	for _, r := range rotations {
		if r.GetEvent() == leaseholdv1.AuditEvent_AUDIT_EVENT_CREDENTIAL_ROTATE {
			n++
			require.Equal(t, "leasehold:upstream", r.GetActor())
			require.Equal(t, agent1ID, r.GetAgentId(), "the acquire that caused it")
		}
	}
	require.Equal(t, 3, n)

	audit, err := protojson.Marshal(&leaseholdv1.QueryAuditResponse{Records: e.audit(nil)})
	require.NoError(t, err)
	e.stop()
	db, err := os.ReadFile(filepath.Join(e.dir, "leasehold.db"))
	require.NoError(t, err)
	for _, secret := range append(tokens, rt, c.Secret) {
		require.NotContains(t, string(audit), secret)
		require.NotContains(t, e.logs.String(), secret)
		require.NotContains(t, string(db), secret)
	}
}

// Renewing an OAuth2 lease mints a fresh token (a token cannot be extended),
// hands it to the agent, and revokes the previous one at the server.
func TestOAuth2RenewIssuesAFreshToken(t *testing.T) {
	h := hydratest.Start(t)
	c := h.CreateClient(t, "client_secret_post", "mail.read")
	e := newEnv(t, noQuotas)
	_, err := e.admin.PutCredential(ctx, &leaseholdv1.PutCredentialRequest{Name: "mail/api", Backend: "oauth2",
		Config: map[string]string{"token_url": h.TokenURL(), "revocation_url": h.RevocationURL(), "scopes": "mail.read",
			"auth_method": "client_secret_post"},
		Secret: map[string]string{"client_id": c.ID, "client_secret": c.Secret}})
	require.NoError(t, err)
	e.grant("mail/api", agent1ID, "mail.read")
	l, err := e.agent1.AcquireLease(ctx, acquireReq("mail/api", "inbox", "mail.read"))
	require.NoError(t, err)
	first := l.GetSecret()["access_token"]

	r, err := e.agent1.RenewLease(ctx, &leaseholdv1.RenewLeaseRequest{LeaseId: l.GetLease().GetId()})
	require.NoError(t, err)
	second := r.GetSecret()["access_token"]
	require.NotEmpty(t, second, "the renewal carries the new token")
	require.NotEqual(t, first, second)
	require.True(t, h.Introspect(t, second).Active)
	require.False(t, h.Introspect(t, first).Active, "the previous token is revoked")
	require.Equal(t, "mail.read", r.GetSecret()["scope"])

	// Through client/: the Lease handle holds the new token after a renewal.
	cl, err := client.New(ctx, client.Config{Address: e.addr, Source: e.source(agent1ID)})
	require.NoError(t, err)
	defer cl.Close()
	h1, err := cl.Acquire(ctx, "mail/api", client.AcquireOptions{Scopes: []string{"mail.read"}, TaskID: "inbox-client"})
	require.NoError(t, err)
	tok1, err := h1.Get("access_token")
	require.NoError(t, err)
	_, err = cl.Renew(ctx, h1.ID, 0)
	require.NoError(t, err)
	tok2, err := h1.Get("access_token")
	require.NoError(t, err)
	require.NotEqual(t, tok1, tok2)
	require.True(t, h.Introspect(t, tok2).Active)
	require.NoError(t, h1.Release(ctx))

	// An identical acquire returns the lease with its current token.
	again, err := e.agent1.AcquireLease(ctx, acquireReq("mail/api", "inbox", "mail.read"))
	require.NoError(t, err)
	require.Equal(t, l.GetLease().GetId(), again.GetLease().GetId())
	require.Equal(t, second, again.GetSecret()["access_token"])

	// Releasing revokes the current token.
	_, err = e.agent1.ReleaseLease(ctx, &leaseholdv1.ReleaseLeaseRequest{LeaseId: l.GetLease().GetId()})
	require.NoError(t, err)
	require.Eventually(t, func() bool { return !h.Introspect(t, second).Active }, 10*time.Second, 50*time.Millisecond)
}

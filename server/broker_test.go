package server_test

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/leasehold/leasehold/client"
	leaseholdv1 "github.com/leasehold/leasehold/proto/leasehold/v1"
)

func TestFullFlowThroughClientLibrary(t *testing.T) {
	e := newEnv(t)
	e.putStatic("crm/salesforce", map[string]string{"api_key": "k-123", "instance": "acme"})
	g := e.grant("crm/salesforce", agent1ID, "read", "write")

	c, err := client.New(ctx, client.Config{Address: e.addr, Source: e.source(agent1ID)})
	require.NoError(t, err)
	defer c.Close()
	who, err := c.WhoAmI(ctx)
	require.NoError(t, err)
	require.Equal(t, agent1ID, who)

	lease, err := c.Acquire(ctx, "crm/salesforce", client.AcquireOptions{Scopes: []string{"read"}, TaskID: "ticket-1", Purpose: "sync contacts"})
	require.NoError(t, err)
	require.Regexp(t, `^ls_[0-9a-f]{32}$`, lease.ID)
	secret, err := lease.Secret()
	require.NoError(t, err)
	require.Equal(t, map[string]string{"api_key": "k-123", "instance": "acme"}, secret)
	require.WithinDuration(t, e.clock.Now().Add(5*time.Minute), lease.ExpiresAt(), 5*time.Second, "default ttl is 5 minutes")

	exp, err := c.Renew(ctx, lease.ID, 10*time.Minute)
	require.NoError(t, err)
	require.WithinDuration(t, e.clock.Now().Add(10*time.Minute), exp, 5*time.Second)
	require.NoError(t, c.Release(ctx, lease.ID))
	require.NoError(t, c.Release(ctx, lease.ID), "release is idempotent")
	_, err = c.Renew(ctx, lease.ID, 0)
	require.ErrorIs(t, err, client.ErrLeaseEnded)

	recs := e.audit(&leaseholdv1.QueryAuditRequest{AgentId: agent1ID})
	require.Len(t, recs, 3)
	events := []leaseholdv1.AuditEvent{recs[2].GetEvent(), recs[1].GetEvent(), recs[0].GetEvent()}
	require.Equal(t, []leaseholdv1.AuditEvent{leaseholdv1.AuditEvent_AUDIT_EVENT_LEASE_ACQUIRE,
		leaseholdv1.AuditEvent_AUDIT_EVENT_LEASE_RENEW, leaseholdv1.AuditEvent_AUDIT_EVENT_LEASE_RELEASE}, events)
	acq := recs[2]
	require.Equal(t, leaseholdv1.Decision_DECISION_ALLOW, acq.GetDecision())
	require.Equal(t, "ticket-1", acq.GetTaskId())
	require.Equal(t, "sync contacts", acq.GetTaskPurpose())
	require.Equal(t, lease.ID, acq.GetLeaseId())
	require.Equal(t, g.GetId(), acq.GetGrantId())
	require.Equal(t, []string{"read"}, acq.GetScopes())
	require.NotEmpty(t, acq.GetRequestId())
	require.Equal(t, agent1ID, acq.GetActor())

	agents, err := e.admin.ListAgents(ctx, &leaseholdv1.ListAgentsRequest{})
	require.NoError(t, err)
	require.Len(t, agents.GetAgents(), 1)
	require.Equal(t, agent1ID, agents.GetAgents()[0].GetSpiffeId())
}

func TestTwoAgentsAreIsolated(t *testing.T) {
	e := newEnv(t)
	e.putStatic("db/analytics", map[string]string{"password": "p"})
	e.grant("db/analytics", agent1ID, "read")

	_, err := e.agent2.AcquireLease(ctx, acquireReq("db/analytics", "t2", "read"))
	requireCode(t, err, codes.PermissionDenied, "no grant allows "+agent2ID)

	got, err := e.agent1.AcquireLease(ctx, acquireReq("db/analytics", "t1", "read"))
	require.NoError(t, err)
	id := got.GetLease().GetId()

	// A lease id is not a bearer token.
	_, err = e.agent2.RenewLease(ctx, &leaseholdv1.RenewLeaseRequest{LeaseId: id})
	requireCode(t, err, codes.PermissionDenied, "belongs to another agent")
	_, err = e.agent2.ReleaseLease(ctx, &leaseholdv1.ReleaseLeaseRequest{LeaseId: id})
	requireCode(t, err, codes.PermissionDenied, "belongs to another agent")

	leases, err := e.admin.ListLeases(ctx, &leaseholdv1.ListLeasesRequest{AgentId: agent1ID, ActiveOnly: true})
	require.NoError(t, err)
	require.Len(t, leases.GetLeases(), 1, "the lease is still active")

	denied := e.audit(&leaseholdv1.QueryAuditRequest{AgentId: agent2ID, Decision: leaseholdv1.Decision_DECISION_DENY})
	require.Len(t, denied, 3, "every refusal is audited")
	require.Equal(t, leaseholdv1.AuditEvent_AUDIT_EVENT_LEASE_RELEASE, denied[0].GetEvent())
	require.Equal(t, id, denied[0].GetLeaseId())
	require.Equal(t, "PermissionDenied", denied[0].GetCode())
}

func TestGrantsLimitScopesTTLAndLifetime(t *testing.T) {
	e := newEnv(t)
	e.putStatic("mail/gmail", map[string]string{"token": "t"})
	_, err := e.admin.CreateGrant(ctx, &leaseholdv1.CreateGrantRequest{Grant: &leaseholdv1.Grant{
		Subject:    &leaseholdv1.Grant_SpiffeIdPrefix{SpiffeIdPrefix: "spiffe://leasehold.test/agents"},
		Credential: "mail/gmail", Scopes: []string{"read"},
		MaxTtl: durationpb.New(2 * time.Minute), MaxLifetime: durationpb.New(5 * time.Minute),
	}})
	require.NoError(t, err)

	_, err = e.agent1.AcquireLease(ctx, acquireReq("mail/gmail", "t", "read", "send"))
	requireCode(t, err, codes.PermissionDenied, "scopes: read,send not granted")
	_, err = e.agent1.AcquireLease(ctx, withTTL(acquireReq("mail/gmail", "t", "read"), 3*time.Minute))
	requireCode(t, err, codes.PermissionDenied, "ttl: 3m0s exceeds the grant's max_ttl 2m0s")

	// The prefix covers both agents; the default ttl is capped by max_ttl.
	l2, err := e.agent2.AcquireLease(ctx, acquireReq("mail/gmail", "t", "read"))
	require.NoError(t, err)
	require.Equal(t, 2*time.Minute, l2.GetLease().GetExpiresAt().AsTime().Sub(l2.GetLease().GetIssuedAt().AsTime()))

	// Renewals never pass max_lifetime.
	id := l2.GetLease().GetId()
	e.clock.Advance(90 * time.Second)
	_, err = e.agent2.RenewLease(ctx, &leaseholdv1.RenewLeaseRequest{LeaseId: id})
	require.NoError(t, err)
	e.clock.Advance(90 * time.Second)
	_, err = e.agent2.RenewLease(ctx, &leaseholdv1.RenewLeaseRequest{LeaseId: id})
	require.NoError(t, err)
	e.clock.Advance(90 * time.Second)
	r, err := e.agent2.RenewLease(ctx, &leaseholdv1.RenewLeaseRequest{LeaseId: id})
	require.NoError(t, err)
	require.Equal(t, r.GetLease().GetMaxExpiresAt().AsTime(), r.GetLease().GetExpiresAt().AsTime(), "capped at max_lifetime")
	require.Equal(t, 5*time.Minute, r.GetLease().GetMaxExpiresAt().AsTime().Sub(r.GetLease().GetIssuedAt().AsTime()))
	_, err = e.agent2.RenewLease(ctx, &leaseholdv1.RenewLeaseRequest{LeaseId: id, Ttl: durationpb.New(3 * time.Minute)})
	requireCode(t, err, codes.PermissionDenied, "ttl: 3m0s exceeds the grant's max_ttl")

	// A prefix does not match a sibling path that merely starts the same.
	e.putStatic("x/y", map[string]string{"k": "v"})
	_, err = e.admin.CreateGrant(ctx, &leaseholdv1.CreateGrantRequest{Grant: &leaseholdv1.Grant{
		Subject:    &leaseholdv1.Grant_SpiffeIdPrefix{SpiffeIdPrefix: "spiffe://leasehold.test/agents/agent"},
		Credential: "x/y", Scopes: []string{"read"},
	}})
	require.NoError(t, err)
	_, err = e.agent1.AcquireLease(ctx, acquireReq("x/y", "t", "read"))
	requireCode(t, err, codes.PermissionDenied, "no grant allows")
}

func TestNewVersionGoesToNewLeases(t *testing.T) {
	e := newEnv(t)
	e.putStatic("svc/key", map[string]string{"key": "v1"})
	e.grant("svc/key", agent1ID, "read")
	a, err := e.agent1.AcquireLease(ctx, acquireReq("svc/key", "t", "read"))
	require.NoError(t, err)
	e.putStatic("svc/key", map[string]string{"key": "v2"})
	b, err := e.agent1.AcquireLease(ctx, acquireReq("svc/key", "t", "read"))
	require.NoError(t, err)
	require.Equal(t, "v1", a.GetSecret()["key"])
	require.Equal(t, uint64(1), a.GetLease().GetCredentialVersion())
	require.Equal(t, "v2", b.GetSecret()["key"])
	require.Equal(t, uint64(2), b.GetLease().GetCredentialVersion())

	// Metadata-only updates keep the version.
	resp, err := e.admin.PutCredential(ctx, &leaseholdv1.PutCredentialRequest{Name: "svc/key", Description: "rotated by hand"})
	require.NoError(t, err)
	require.Equal(t, uint64(2), resp.GetCredential().GetCurrentVersion())
	got, err := e.admin.GetCredential(ctx, &leaseholdv1.GetCredentialRequest{Name: "svc/key"})
	require.NoError(t, err)
	require.Equal(t, []string{"key"}, got.GetCredential().GetSecretKeys())
	js, err := protojson.Marshal(got)
	require.NoError(t, err)
	require.NotContains(t, string(js), "v2", "GetCredential never returns secret values")
}

func TestRevokeAgentHoldsAcrossRestart(t *testing.T) {
	e := newEnv(t)
	e.putStatic("crm/salesforce", map[string]string{"api_key": "k"})
	e.grant("crm/salesforce", agent1ID, "read")
	var ids []string
	for i := range 3 {
		l, err := e.agent1.AcquireLease(ctx, acquireReq("crm/salesforce", fmt.Sprintf("t-%d", i), "read"))
		require.NoError(t, err)
		ids = append(ids, l.GetLease().GetId())
	}
	resp, err := e.admin.RevokeAgent(ctx, &leaseholdv1.RevokeAgentRequest{SpiffeId: agent1ID, Reason: "compromised"})
	require.NoError(t, err)
	require.Equal(t, int32(3), resp.GetLeasesRevoked())
	require.True(t, resp.GetAgent().GetRevoked())

	check := func() {
		t.Helper()
		_, err := e.agent1.AcquireLease(ctx, acquireReq("crm/salesforce", "t", "read"))
		requireCode(t, err, codes.PermissionDenied, "is revoked")
		_, err = e.agent1.RenewLease(ctx, &leaseholdv1.RenewLeaseRequest{LeaseId: ids[0]})
		require.Error(t, err)
		leases, err := e.admin.ListLeases(ctx, &leaseholdv1.ListLeasesRequest{AgentId: agent1ID})
		require.NoError(t, err)
		for _, l := range leases.GetLeases() {
			require.Equal(t, leaseholdv1.LeaseState_LEASE_STATE_REVOKED, l.GetState())
			require.Contains(t, l.GetEndReason(), "compromised")
		}
		who, err := e.agent1.WhoAmI(ctx, &leaseholdv1.WhoAmIRequest{})
		require.NoError(t, err)
		require.True(t, who.GetRevoked())
	}
	check()
	e.restart()
	check()

	revs := e.audit(&leaseholdv1.QueryAuditRequest{AgentId: agent1ID})
	var revokedLeases int
	for _, r := range revs {
		if r.GetEvent() == leaseholdv1.AuditEvent_AUDIT_EVENT_LEASE_REVOKE {
			revokedLeases++
		}
	}
	require.Equal(t, 3, revokedLeases)

	_, err = e.admin.ReinstateAgent(ctx, &leaseholdv1.ReinstateAgentRequest{SpiffeId: agent1ID})
	require.NoError(t, err)
	_, err = e.agent1.AcquireLease(ctx, acquireReq("crm/salesforce", "t", "read"))
	require.NoError(t, err, "reinstated: grants apply again")
	_, err = e.admin.ReinstateAgent(ctx, &leaseholdv1.ReinstateAgentRequest{SpiffeId: agent1ID})
	requireCode(t, err, codes.FailedPrecondition, "is not revoked")
}

func TestRevokeLeaseGrantAndCredentialEndLeases(t *testing.T) {
	e := newEnv(t)
	e.putStatic("a/b", map[string]string{"k": "v"})
	g := e.grant("a/b", agent1ID, "read")
	acquire := func() string {
		l, err := e.agent1.AcquireLease(ctx, acquireReq("a/b", "t", "read"))
		require.NoError(t, err)
		return l.GetLease().GetId()
	}
	one := acquire()
	r, err := e.admin.RevokeLease(ctx, &leaseholdv1.RevokeLeaseRequest{LeaseId: one, Reason: "suspicious"})
	require.NoError(t, err)
	require.Equal(t, leaseholdv1.LeaseState_LEASE_STATE_REVOKED, r.GetLease().GetState())
	_, err = e.admin.RevokeLease(ctx, &leaseholdv1.RevokeLeaseRequest{LeaseId: one})
	requireCode(t, err, codes.FailedPrecondition, "already revoked")
	_, err = e.agent1.RenewLease(ctx, &leaseholdv1.RenewLeaseRequest{LeaseId: one})
	requireCode(t, err, codes.FailedPrecondition, "is revoked")

	acquire()
	dg, err := e.admin.DeleteGrant(ctx, &leaseholdv1.DeleteGrantRequest{Id: g.GetId()})
	require.NoError(t, err)
	require.Equal(t, int32(1), dg.GetLeasesRevoked(), "a lease never outlives its grant")
	_, err = e.agent1.AcquireLease(ctx, acquireReq("a/b", "t", "read"))
	requireCode(t, err, codes.PermissionDenied, "no grant")

	e.grant("a/b", agent1ID, "read")
	acquire()
	dc, err := e.admin.DeleteCredential(ctx, &leaseholdv1.DeleteCredentialRequest{Name: "a/b"})
	require.NoError(t, err)
	require.Equal(t, int32(1), dc.GetLeasesRevoked())
	require.Equal(t, int32(1), dc.GetGrantsDeleted())
	_, err = e.agent1.AcquireLease(ctx, acquireReq("a/b", "t", "read"))
	requireCode(t, err, codes.NotFound, `credential "a/b" not found`)
}

func TestDynamicBackendArtifactsAreRevokedUpstream(t *testing.T) {
	e := newEnv(t)
	_, err := e.admin.PutCredential(ctx, &leaseholdv1.PutCredentialRequest{Name: "db/dyn", Backend: "recording", Secret: map[string]string{"admin_password": "x"}})
	require.NoError(t, err)
	e.grant("db/dyn", agent1ID, "read")
	var users []string
	for i := range 3 {
		l, err := e.agent1.AcquireLease(ctx, withTTL(acquireReq("db/dyn", fmt.Sprintf("t-%d", i), "read"), time.Minute))
		require.NoError(t, err)
		require.Equal(t, "role_"+l.GetLease().GetId(), l.GetSecret()["user"], "each lease gets its own upstream credential")
		users = append(users, l.GetSecret()["user"])
	}
	_, err = e.agent1.ReleaseLease(ctx, &leaseholdv1.ReleaseLeaseRequest{LeaseId: strings.TrimPrefix(users[0], "role_")})
	require.NoError(t, err)
	revoked := func(user string) func() bool { return func() bool { return recorder.wasRevoked(user) } }
	require.Eventually(t, revoked(users[0]), 5*time.Second, 10*time.Millisecond, "release destroys the upstream artefact")
	require.False(t, recorder.wasRevoked(users[1]), "live leases are untouched")
	_, err = e.admin.RevokeAgent(ctx, &leaseholdv1.RevokeAgentRequest{SpiffeId: agent1ID, Reason: "r"})
	require.NoError(t, err)
	require.Eventually(t, revoked(users[1]), 5*time.Second, 10*time.Millisecond)
	require.Eventually(t, revoked(users[2]), 5*time.Second, 10*time.Millisecond)
	leases, err := e.admin.ListLeases(ctx, &leaseholdv1.ListLeasesRequest{AgentId: agent1ID})
	require.NoError(t, err)
	require.Eventually(t, func() bool {
		leases, err = e.admin.ListLeases(ctx, &leaseholdv1.ListLeasesRequest{AgentId: agent1ID})
		require.NoError(t, err)
		for _, l := range leases.GetLeases() {
			if l.GetUpstreamRevocation().GetState() != leaseholdv1.UpstreamRevocation_STATE_DONE {
				return false
			}
		}
		return true
	}, 5*time.Second, 10*time.Millisecond, "ListLeases shows each artefact destroyed")
}

func TestReaperEndsExpiredLeasesAndResumesAfterRestart(t *testing.T) {
	e := newEnv(t)
	e.putStatic("a/b", map[string]string{"k": "v"})
	e.grant("a/b", agent1ID, "read")
	l1, err := e.agent1.AcquireLease(ctx, withTTL(acquireReq("a/b", "t", "read"), time.Minute))
	require.NoError(t, err)
	l2, err := e.agent1.AcquireLease(ctx, withTTL(acquireReq("a/b", "t2", "read"), 10*time.Minute))
	require.NoError(t, err)

	state := func(id string) leaseholdv1.LeaseState {
		resp, err := e.admin.ListLeases(ctx, &leaseholdv1.ListLeasesRequest{AgentId: agent1ID})
		require.NoError(t, err)
		for _, l := range resp.GetLeases() {
			if l.GetId() == id {
				return l.GetState()
			}
		}
		t.Fatalf("lease %s not listed", id)
		return 0
	}
	e.clock.Advance(2 * time.Minute)
	require.Eventually(t, func() bool { return state(l1.GetLease().GetId()) == leaseholdv1.LeaseState_LEASE_STATE_EXPIRED },
		5*time.Second, 20*time.Millisecond)
	require.Equal(t, leaseholdv1.LeaseState_LEASE_STATE_ACTIVE, state(l2.GetLease().GetId()))
	_, err = e.agent1.RenewLease(ctx, &leaseholdv1.RenewLeaseRequest{LeaseId: l1.GetLease().GetId()})
	requireCode(t, err, codes.FailedPrecondition, "is expired")

	// The second lease expires while the broker is down; the next broker ends it.
	e.stop()
	e.clock.Advance(time.Hour)
	e.start()
	require.Eventually(t, func() bool { return state(l2.GetLease().GetId()) == leaseholdv1.LeaseState_LEASE_STATE_EXPIRED },
		5*time.Second, 20*time.Millisecond)
	recs := e.audit(&leaseholdv1.QueryAuditRequest{AgentId: agent1ID})
	require.Equal(t, leaseholdv1.AuditEvent_AUDIT_EVENT_LEASE_EXPIRE, recs[0].GetEvent())
	require.Equal(t, "leasehold:reaper", recs[0].GetActor())
}

func TestAuditIsFailClosed(t *testing.T) {
	e := newEnv(t)
	e.putStatic("crm/salesforce", map[string]string{"api_key": "must-not-leave"})
	e.grant("crm/salesforce", agent1ID, "read")
	before := e.snapshot()

	e.store.failAudit.Store(true)
	resp, err := e.agent1.AcquireLease(ctx, acquireReq("crm/salesforce", "t", "read"))
	requireCode(t, err, codes.Unavailable, "audit trail could not be written")
	require.Nil(t, resp, "no secret leaves without a durable audit record")
	_, err = e.agent2.AcquireLease(ctx, acquireReq("crm/salesforce", "t", "read"))
	requireCode(t, err, codes.Unavailable, "audit trail") // a denial that cannot be recorded is not answered either
	_, err = e.admin.RevokeAgent(ctx, &leaseholdv1.RevokeAgentRequest{SpiffeId: agent1ID, Reason: "r"})
	requireCode(t, err, codes.Unavailable, "audit trail")
	require.Equal(t, before, e.snapshot(), "nothing was written")

	e.store.failAudit.Store(false)
	_, err = e.agent1.AcquireLease(ctx, acquireReq("crm/salesforce", "t", "read"))
	require.NoError(t, err)
}

func TestCanarySecretNeverAtRestOrInTelemetry(t *testing.T) {
	e := newEnv(t)
	const canary = "CANARY-7f3a9c2e-do-not-leak"
	e.putStatic("crm/salesforce", map[string]string{"api_key": canary})
	e.grant("crm/salesforce", agent1ID, "read")
	l, err := e.agent1.AcquireLease(ctx, acquireReq("crm/salesforce", "t", "read"))
	require.NoError(t, err)
	require.Equal(t, canary, l.GetSecret()["api_key"], "the agent does get it")
	_, err = e.agent2.AcquireLease(ctx, acquireReq("crm/salesforce", "t", "read"))
	require.Error(t, err)
	_, err = e.agent1.ReleaseLease(ctx, &leaseholdv1.ReleaseLeaseRequest{LeaseId: l.GetLease().GetId()})
	require.NoError(t, err)
	// A rejected update must not echo the value back.
	_, err = e.admin.PutCredential(ctx, &leaseholdv1.PutCredentialRequest{Name: "crm/salesforce", Backend: "nope", Secret: map[string]string{"api_key": canary}})
	require.Error(t, err)
	require.NotContains(t, err.Error(), canary)
	e.putStatic("crm/salesforce", map[string]string{"api_key": canary + "-v2"})

	audit, err := protojson.Marshal(&leaseholdv1.QueryAuditResponse{Records: e.audit(nil)})
	require.NoError(t, err)
	require.NotContains(t, string(audit), "CANARY")
	e.stop()
	require.NotContains(t, e.logs.String(), "CANARY")
	db, err := os.ReadFile(filepath.Join(e.dir, "leasehold.db"))
	require.NoError(t, err)
	require.NotContains(t, string(db), "CANARY", "the store file holds only ciphertext")
	require.Contains(t, string(db), "crm/salesforce", "sanity: the file is the one that was written")
}

func TestPutWithoutBackendKeepsTheCredentialsBackend(t *testing.T) {
	e := newEnv(t)
	_, err := e.admin.PutCredential(ctx, &leaseholdv1.PutCredentialRequest{Name: "db/dyn", Backend: "recording", Secret: map[string]string{"p": "x"}})
	require.NoError(t, err)
	resp, err := e.admin.PutCredential(ctx, &leaseholdv1.PutCredentialRequest{Name: "db/dyn", Description: "d"})
	require.NoError(t, err)
	require.Equal(t, "recording", resp.GetCredential().GetBackend())
	_, err = e.admin.PutCredential(ctx, &leaseholdv1.PutCredentialRequest{Name: "db/dyn", Backend: "static", Secret: map[string]string{"p": "x"}})
	requireCode(t, err, codes.FailedPrecondition, "backend:")
}

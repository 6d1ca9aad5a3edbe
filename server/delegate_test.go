package server_test

import (
	"context"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/timestamppb"

	leaseholdv1 "github.com/leasehold/leasehold/proto/leasehold/v1"
)

const agent3ID = "spiffe://leasehold.test/agents/agent-3"

// delegationEnv: agent-1 is an orchestrator with a grant on crm/api (read,
// write; max_ttl 10m; lifetime 1h; two levels of delegation), agent-2 and
// agent-3 are its sub-agents with no grants of their own.
type delegationEnv struct {
	*env
	agent3 leaseholdv1.BrokerServiceClient
	root   *leaseholdv1.Grant
}

func newDelegationEnv(t *testing.T) *delegationEnv {
	e := newEnv(t, noQuotas)
	e.putStatic("crm/api", map[string]string{"api_key": "k"})
	e.putStatic("mail/api", map[string]string{"api_key": "m"})
	resp, err := e.admin.CreateGrant(ctx, &leaseholdv1.CreateGrantRequest{Grant: &leaseholdv1.Grant{
		Subject: &leaseholdv1.Grant_SpiffeId{SpiffeId: agent1ID}, Credential: "crm/api", Scopes: []string{"read", "write"},
		MaxTtl: durationpb.New(10 * time.Minute), MaxLifetime: durationpb.New(time.Hour), MaxDelegationDepth: 2,
	}})
	require.NoError(t, err)
	return &delegationEnv{env: e, agent3: leaseholdv1.NewBrokerServiceClient(e.dial(agent3ID)), root: resp.GetGrant()}
}

func (d *delegationEnv) acquire(t *testing.T, c leaseholdv1.BrokerServiceClient, task string, scopes ...string) *leaseholdv1.Lease {
	t.Helper()
	l, err := c.AcquireLease(ctx, acquireReq("crm/api", task, scopes...))
	require.NoError(t, err)
	return l.GetLease()
}

// delegate delegates crm/api from the caller's task to another agent.
func delegate(c leaseholdv1.BrokerServiceClient, task, to, subtask string, ttl time.Duration, scopes ...string) (*leaseholdv1.Grant, error) {
	resp, err := c.DelegateGrant(ctx, &leaseholdv1.DelegateGrantRequest{Credential: "crm/api", TaskId: task, DelegateSpiffeId: to,
		Scopes: scopes, Subtask: subtask, Ttl: durationpb.New(ttl)})
	return resp.GetGrant(), err
}

func (d *delegationEnv) grantCount(t *testing.T) int {
	t.Helper()
	resp, err := d.admin.ListGrants(ctx, &leaseholdv1.ListGrantsRequest{PageSize: 1000})
	require.NoError(t, err)
	return len(resp.GetGrants())
}

// Three levels: the orchestrator delegates read to agent-2 for a subtask,
// agent-2 delegates it on to agent-3 for a sub-subtask; each uses it only
// within its task, and the audit trail says who acted for whom.
func TestDelegationChainAcrossThreeLevels(t *testing.T) {
	d := newDelegationEnv(t)
	// The orchestrator holds no lease and sees no secret to delegate.
	g1, err := delegate(d.agent1, "ticket-7", agent2ID, "crm-lookup", 20*time.Minute, "read")
	require.NoError(t, err)
	require.Equal(t, "ticket-7/crm-lookup", g1.GetTaskId())
	require.Equal(t, []string{agent1ID}, g1.GetDelegationChain())
	require.Equal(t, d.root.GetId(), g1.GetParentGrantId())
	require.Equal(t, int32(1), g1.GetMaxDelegationDepth())
	require.Equal(t, agent2ID, g1.GetSpiffeId())

	l2 := d.acquire(t, d.agent2, "ticket-7/crm-lookup", "read")
	require.Equal(t, g1.GetId(), l2.GetGrantId())
	_, err = d.agent2.AcquireLease(ctx, acquireReq("crm/api", "ticket-7/crm-lookup", "write"))
	requireCode(t, err, codes.PermissionDenied, "scopes")
	_, err = d.agent2.AcquireLease(ctx, acquireReq("crm/api", "ticket-8", "read"))
	requireCode(t, err, codes.PermissionDenied, "task")
	_, err = d.agent2.AcquireLease(ctx, acquireReq("mail/api", "ticket-7/crm-lookup", "read"))
	requireCode(t, err, codes.PermissionDenied, "no grant") // another credential is not delegated

	g2, err := delegate(d.agent2, "ticket-7/crm-lookup", agent3ID, "page-2", 10*time.Minute, "read")
	require.NoError(t, err)
	require.Equal(t, []string{agent1ID, agent2ID}, g2.GetDelegationChain())
	require.Equal(t, int32(0), g2.GetMaxDelegationDepth())
	l3 := d.acquire(t, d.agent3, "ticket-7/crm-lookup/page-2", "read")

	// A sub-agent cannot delegate outside its own task either.
	_, err = delegate(d.agent2, "ticket-8", agent3ID, "x", time.Minute, "read")
	requireCode(t, err, codes.PermissionDenied, "task")
	// Past the depth limit.
	_, err = delegate(d.agent3, "ticket-7/crm-lookup/page-2", agent1ID, "again", time.Minute, "read")
	requireCode(t, err, codes.PermissionDenied, "delegation depth limit")

	recs := d.audit(&leaseholdv1.QueryAuditRequest{LeaseId: l3.GetId()})
	require.NotEmpty(t, recs)
	require.Equal(t, []string{agent1ID, agent2ID}, recs[0].GetDelegationChain(), "agent-3 acted for agent-2, who acted for agent-1")
	delegations := d.audit(&leaseholdv1.QueryAuditRequest{AgentId: agent2ID})
	found := false
	for _, r := range delegations {
		if r.GetEvent() == leaseholdv1.AuditEvent_AUDIT_EVENT_GRANT_DELEGATE && r.GetDecision() == leaseholdv1.Decision_DECISION_ALLOW {
			found = true
			require.Contains(t, r.GetReason(), g2.GetId())
			require.Equal(t, []string{agent1ID}, r.GetDelegationChain(), "agent-2 delegated under agent-1's delegation")
		}
	}
	require.True(t, found, "the delegation is on the audit trail")
	v, err := d.admin.VerifyAudit(ctx, &leaseholdv1.VerifyAuditRequest{})
	require.NoError(t, err)
	require.True(t, v.GetOk(), "records with a delegation chain verify: %s", v.GetProblem())
}

// Every way to get more than the delegator has is refused, audited, and
// changes nothing.
func TestDelegationCannotEscalate(t *testing.T) {
	d := newDelegationEnv(t)
	// A read-only grant for agent-2, delegable, to delegate from.
	_, err := d.admin.CreateGrant(ctx, &leaseholdv1.CreateGrantRequest{Grant: &leaseholdv1.Grant{
		Subject: &leaseholdv1.Grant_SpiffeId{SpiffeId: agent2ID}, Credential: "crm/api", Scopes: []string{"read"},
		MaxTtl: durationpb.New(5 * time.Minute), MaxLifetime: durationpb.New(30 * time.Minute), MaxDelegationDepth: 1,
	}})
	require.NoError(t, err)
	before := d.grantCount(t)

	_, err = delegate(d.agent2, "job-1", agent3ID, "s", time.Minute, "read", "write")
	requireCode(t, err, codes.PermissionDenied, "scopes: read,write not granted")
	_, err = delegate(d.agent2, "job-1", agent3ID, "s", 2*time.Hour, "read")
	requireCode(t, err, codes.PermissionDenied, "would outlive your remaining lifetime")
	_, err = d.agent2.DelegateGrant(ctx, &leaseholdv1.DelegateGrantRequest{Credential: "crm/api", TaskId: "job-1", DelegateSpiffeId: agent3ID,
		Scopes: []string{"read"}, Subtask: "s", Ttl: durationpb.New(time.Minute), MaxTtl: durationpb.New(10 * time.Minute)})
	requireCode(t, err, codes.PermissionDenied, "max_ttl")
	_, err = delegate(d.agent2, "job-1", agent2ID, "s", time.Minute, "read")
	requireCode(t, err, codes.InvalidArgument, "delegate_spiffe_id")
	_, err = delegate(d.agent3, "job-1", agent3ID+"x", "s", time.Minute, "read")
	requireCode(t, err, codes.PermissionDenied, "no grant") // nothing to delegate from
	_, err = delegate(d.agent2, "job-1", agent3ID, "", time.Minute, "read")
	requireCode(t, err, codes.InvalidArgument, "subtask")

	// A grant that allows no delegation.
	_, err = d.admin.CreateGrant(ctx, &leaseholdv1.CreateGrantRequest{Grant: &leaseholdv1.Grant{
		Subject: &leaseholdv1.Grant_SpiffeId{SpiffeId: agent3ID}, Credential: "mail/api", Scopes: []string{"read"}}})
	require.NoError(t, err)
	_, err = d.agent3.DelegateGrant(ctx, &leaseholdv1.DelegateGrantRequest{Credential: "mail/api", TaskId: "m-1", DelegateSpiffeId: agent1ID,
		Scopes: []string{"read"}, Subtask: "s", Ttl: durationpb.New(time.Minute)})
	requireCode(t, err, codes.PermissionDenied, "does not allow delegation")

	// Delegating after being revoked.
	_, err = d.admin.RevokeAgent(ctx, &leaseholdv1.RevokeAgentRequest{SpiffeId: agent2ID, Reason: "compromised"})
	require.NoError(t, err)
	_, err = delegate(d.agent2, "job-1", agent3ID, "s", time.Minute, "read")
	requireCode(t, err, codes.PermissionDenied, "revoked")

	require.Equal(t, before+1, d.grantCount(t), "only the admin's mail grant was added")
	denials := d.audit(&leaseholdv1.QueryAuditRequest{AgentId: agent2ID, Decision: leaseholdv1.Decision_DECISION_DENY})
	require.GreaterOrEqual(t, len(denials), 4, "refused delegations are audited")
}

// The orchestrator cannot use, renew, release or watch what it delegated.
func TestDelegatorCannotTouchTheSubAgentsLeases(t *testing.T) {
	d := newDelegationEnv(t)
	g, err := delegate(d.agent1, "ticket-9", agent2ID, "sub", 10*time.Minute, "read")
	require.NoError(t, err)

	wctx, cancel := context.WithCancel(ctx)
	defer cancel()
	watch, err := d.agent1.WatchLeases(wctx, &leaseholdv1.WatchLeasesRequest{})
	require.NoError(t, err)
	first, err := watch.Recv()
	require.NoError(t, err)
	require.Equal(t, leaseholdv1.LeaseEvent_LEASE_EVENT_UNSPECIFIED, first.GetEvent(), "sync marker")

	child := d.acquire(t, d.agent2, "ticket-9/sub", "read")
	_, err = d.agent1.RenewLease(ctx, &leaseholdv1.RenewLeaseRequest{LeaseId: child.GetId()})
	requireCode(t, err, codes.PermissionDenied, "another agent")
	_, err = d.agent1.ReleaseLease(ctx, &leaseholdv1.ReleaseLeaseRequest{LeaseId: child.GetId()})
	requireCode(t, err, codes.PermissionDenied, "another agent")

	// The orchestrator's own acquire in the subtask goes through its own
	// grant, never the delegated one.
	own := d.acquire(t, d.agent1, "ticket-9/sub", "read")
	require.Equal(t, d.root.GetId(), own.GetGrantId())
	require.NotEqual(t, g.GetId(), own.GetGrantId())

	// Its watch saw its own new lease and nothing of agent-2's.
	_, err = d.agent2.ReleaseLease(ctx, &leaseholdv1.ReleaseLeaseRequest{LeaseId: child.GetId()})
	require.NoError(t, err)
	_, err = d.agent1.ReleaseLease(ctx, &leaseholdv1.ReleaseLeaseRequest{LeaseId: own.GetId()})
	require.NoError(t, err)
	for {
		ev, err := watch.Recv()
		require.NoError(t, err)
		require.NotEqual(t, child.GetId(), ev.GetLeaseId(), "the delegator never sees the sub-agent's lease")
		if ev.GetLeaseId() == own.GetId() && ev.GetEvent() == leaseholdv1.LeaseEvent_LEASE_EVENT_RELEASED {
			break
		}
	}
}

// One revocation of the orchestrator cuts off the whole tree; so does
// deleting its grant, revoking its task, or revoking the delegation.
func TestCascadeRevocation(t *testing.T) {
	type tree struct {
		d            *delegationEnv
		root, l2, l3 *leaseholdv1.Lease
		g1, g2       *leaseholdv1.Grant
		before       int
	}
	build := func(t *testing.T) *tree {
		d := newDelegationEnv(t)
		tr := &tree{d: d, before: d.grantCount(t)}
		tr.root = d.acquire(t, d.agent1, "ticket-1", "read")
		var err error
		tr.g1, err = delegate(d.agent1, "ticket-1", agent2ID, "a", 30*time.Minute, "read")
		require.NoError(t, err)
		tr.l2 = d.acquire(t, d.agent2, "ticket-1/a", "read")
		tr.g2, err = delegate(d.agent2, "ticket-1/a", agent3ID, "b", 10*time.Minute, "read")
		require.NoError(t, err)
		tr.l3 = d.acquire(t, d.agent3, "ticket-1/a/b", "read")
		return tr
	}
	cutOff := func(t *testing.T, tr *tree) {
		t.Helper()
		d := tr.d
		for _, id := range []string{agent2ID, agent3ID} {
			resp, err := d.admin.ListLeases(ctx, &leaseholdv1.ListLeasesRequest{AgentId: id, ActiveOnly: true})
			require.NoError(t, err)
			require.Empty(t, resp.GetLeases(), "%s has no active lease left", id)
		}
		_, err := d.agent2.AcquireLease(ctx, acquireReq("crm/api", "ticket-1/a", "read"))
		requireCode(t, err, codes.PermissionDenied, "no grant")
		_, err = d.agent3.AcquireLease(ctx, acquireReq("crm/api", "ticket-1/a/b", "read"))
		requireCode(t, err, codes.PermissionDenied, "no grant")
		_, err = d.agent3.RenewLease(ctx, &leaseholdv1.RenewLeaseRequest{LeaseId: tr.l3.GetId()})
		require.Error(t, err)
	}

	t.Run("RevokeAgent", func(t *testing.T) {
		tr := build(t)
		resp, err := tr.d.admin.RevokeAgent(ctx, &leaseholdv1.RevokeAgentRequest{SpiffeId: agent1ID, Reason: "compromised orchestrator"})
		require.NoError(t, err)
		require.Equal(t, int32(1), resp.GetLeasesRevoked())
		require.Equal(t, int32(2), resp.GetDelegatedGrantsDeleted())
		require.Equal(t, int32(2), resp.GetDelegatedLeasesRevoked())
		cutOff(t, tr)
		require.Equal(t, tr.before, tr.d.grantCount(t), "the admin's grant stays; both delegated grants are gone")
		recs := tr.d.audit(&leaseholdv1.QueryAuditRequest{LeaseId: tr.l3.GetId()})
		require.Equal(t, leaseholdv1.AuditEvent_AUDIT_EVENT_LEASE_REVOKE, recs[0].GetEvent())
		require.Contains(t, recs[0].GetReason(), "cascade")
	})
	t.Run("DeleteGrant", func(t *testing.T) {
		tr := build(t)
		resp, err := tr.d.admin.DeleteGrant(ctx, &leaseholdv1.DeleteGrantRequest{Id: tr.d.root.GetId()})
		require.NoError(t, err)
		require.Equal(t, int32(3), resp.GetLeasesRevoked())
		cutOff(t, tr)
		require.Equal(t, tr.before-1, tr.d.grantCount(t))
	})
	t.Run("RevokeTask", func(t *testing.T) {
		tr := build(t)
		resp, err := tr.d.admin.RevokeTask(ctx, &leaseholdv1.RevokeTaskRequest{TaskId: "ticket-1", Reason: "runaway task"})
		require.NoError(t, err)
		require.Equal(t, int32(3), resp.GetLeasesRevoked())
		require.Equal(t, int32(2), resp.GetDelegatedGrantsDeleted())
		cutOff(t, tr)
	})
	t.Run("RevokeDelegation", func(t *testing.T) {
		tr := build(t)
		// agent-3 is below g1, not above it.
		_, err := tr.d.agent3.RevokeDelegation(ctx, &leaseholdv1.RevokeDelegationRequest{GrantId: tr.g1.GetId(), Reason: "x"})
		requireCode(t, err, codes.PermissionDenied, "not delegated by")
		_, err = tr.d.agent2.RevokeDelegation(ctx, &leaseholdv1.RevokeDelegationRequest{GrantId: tr.d.root.GetId(), Reason: "x"})
		requireCode(t, err, codes.PermissionDenied, "not delegated by")
		resp, err := tr.d.agent1.RevokeDelegation(ctx, &leaseholdv1.RevokeDelegationRequest{GrantId: tr.g1.GetId(), Reason: "sub-task done"})
		require.NoError(t, err)
		require.Equal(t, int32(2), resp.GetGrantsDeleted())
		require.Equal(t, int32(2), resp.GetLeasesRevoked())
		cutOff(t, tr)
		// The orchestrator's own lease is untouched.
		resp2, err := tr.d.admin.ListLeases(ctx, &leaseholdv1.ListLeasesRequest{AgentId: agent1ID, ActiveOnly: true})
		require.NoError(t, err)
		require.Len(t, resp2.GetLeases(), 1)
	})
}

// A delegated grant ends when its time is up, and no lease under it
// outlives it.
func TestDelegatedGrantExpires(t *testing.T) {
	d := newDelegationEnv(t)
	g, err := delegate(d.agent1, "t", agent2ID, "s", 2*time.Second, "read")
	require.NoError(t, err)
	l := d.acquire(t, d.agent2, "t/s", "read")
	require.False(t, l.GetExpiresAt().AsTime().After(g.GetExpiresAt().AsTime()), "the lease ends with the grant")
	require.Eventually(t, func() bool {
		_, err := d.agent2.AcquireLease(ctx, acquireReq("crm/api", "t/s", "read"))
		return status.Code(err) == codes.PermissionDenied
	}, 10*time.Second, 100*time.Millisecond)
	_, err = d.agent2.AcquireLease(ctx, acquireReq("crm/api", "t/s", "read"))
	requireCode(t, err, codes.PermissionDenied, "expired")
}

// An admin grant can be bound to a task and given an end; ExplainAccess
// takes the task into account.
func TestGrantBoundToTaskAndTime(t *testing.T) {
	e := newEnv(t, noQuotas)
	e.putStatic("crm/api", map[string]string{"api_key": "k"})
	_, err := e.admin.CreateGrant(ctx, &leaseholdv1.CreateGrantRequest{Grant: &leaseholdv1.Grant{
		Subject: &leaseholdv1.Grant_SpiffeId{SpiffeId: agent1ID}, Credential: "crm/api", Scopes: []string{"read"},
		TaskId: "nightly-report", ExpiresAt: timestamppb.New(time.Now().Add(90 * time.Second))}})
	require.NoError(t, err)
	l, err := e.agent1.AcquireLease(ctx, acquireReq("crm/api", "nightly-report/crm", "read"))
	require.NoError(t, err)
	require.WithinDuration(t, time.Now().Add(90*time.Second), l.GetLease().GetMaxExpiresAt().AsTime(), 5*time.Second,
		"no lease outlives its grant")
	_, err = e.agent1.AcquireLease(ctx, acquireReq("crm/api", "nightly-reportx", "read"))
	requireCode(t, err, codes.PermissionDenied, "allows only task nightly-report")

	ex, err := e.admin.ExplainAccess(ctx, &leaseholdv1.ExplainAccessRequest{AgentId: agent1ID, Credential: "crm/api", Scopes: []string{"read"}, TaskId: "adhoc"})
	require.NoError(t, err)
	require.False(t, ex.GetAllowed())
	require.Contains(t, ex.GetReason(), "nightly-report")

	for field, g := range map[string]*leaseholdv1.Grant{
		"grant.expires_at":           {ExpiresAt: timestamppb.New(time.Now().Add(-time.Minute))},
		"grant.max_delegation_depth": {MaxDelegationDepth: 9},
		"grant.task_id":              {TaskId: "bad task"},
		"grant.parent_grant_id":      {ParentGrantId: "gr_x"},
	} {
		g.Subject, g.Credential, g.Scopes = &leaseholdv1.Grant_SpiffeId{SpiffeId: agent1ID}, "crm/api", []string{"read"}
		_, err := e.admin.CreateGrant(ctx, &leaseholdv1.CreateGrantRequest{Grant: g})
		requireCode(t, err, codes.InvalidArgument, field)
	}
}

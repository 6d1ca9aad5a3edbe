package server_test

import (
	"fmt"
	"sync"
	"testing"

	"github.com/stretchr/testify/require"
	"google.golang.org/grpc/codes"

	leaseholdv1 "github.com/leasehold/leasehold/proto/leasehold/v1"
	"github.com/leasehold/leasehold/server"
)

func TestEndTaskAndRevokeTask(t *testing.T) {
	e := newEnv(t)
	e.putStatic("a/b", map[string]string{"k": "v"})
	e.grant("a/b", agent1ID, "read")
	e.grant("a/b", agent2ID, "read")
	acquire := func(agent leaseholdv1.BrokerServiceClient, task string) string {
		l, err := agent.AcquireLease(ctx, acquireReq("a/b", task, "read"))
		require.NoError(t, err)
		return l.GetLease().GetId()
	}
	state := func(id string) leaseholdv1.LeaseState {
		r, err := e.admin.ListLeases(ctx, &leaseholdv1.ListLeasesRequest{})
		require.NoError(t, err)
		for _, l := range r.GetLeases() {
			if l.GetId() == id {
				return l.GetState()
			}
		}
		return 0
	}
	root, sub, other, theirs, sibling := acquire(e.agent1, "report-42"), acquire(e.agent1, "report-42/crm"),
		acquire(e.agent1, "report-420"), acquire(e.agent2, "report-42/db"), acquire(e.agent2, "report-7")

	// An agent ends its own task: its leases for it and its subtasks, no one else's.
	r, err := e.agent1.EndTask(ctx, &leaseholdv1.EndTaskRequest{TaskId: "report-42"})
	require.NoError(t, err)
	require.Equal(t, int32(2), r.GetLeasesEnded())
	require.Equal(t, leaseholdv1.LeaseState_LEASE_STATE_RELEASED, state(root))
	require.Equal(t, leaseholdv1.LeaseState_LEASE_STATE_RELEASED, state(sub))
	require.Equal(t, leaseholdv1.LeaseState_LEASE_STATE_ACTIVE, state(other), "report-420 is not a subtask of report-42")
	require.Equal(t, leaseholdv1.LeaseState_LEASE_STATE_ACTIVE, state(theirs), "another agent's lease is untouched")

	// An admin revokes a task tree, whoever holds the leases.
	rr, err := e.admin.RevokeTask(ctx, &leaseholdv1.RevokeTaskRequest{TaskId: "report-42", Reason: "data leak suspected"})
	require.NoError(t, err)
	require.Equal(t, int32(1), rr.GetLeasesRevoked())
	require.Equal(t, leaseholdv1.LeaseState_LEASE_STATE_REVOKED, state(theirs))
	require.Equal(t, leaseholdv1.LeaseState_LEASE_STATE_ACTIVE, state(sibling))
	recs := e.audit(&leaseholdv1.QueryAuditRequest{TaskId: "report-42"})
	require.Equal(t, leaseholdv1.AuditEvent_AUDIT_EVENT_TASK_REVOKE, recs[0].GetEvent())
	require.Contains(t, recs[0].GetReason(), "data leak suspected")

	_, err = e.admin.RevokeTask(ctx, &leaseholdv1.RevokeTaskRequest{TaskId: "report-42"})
	requireCode(t, err, codes.InvalidArgument, "reason:")
	_, err = e.agent1.EndTask(ctx, &leaseholdv1.EndTaskRequest{TaskId: "bad task"})
	requireCode(t, err, codes.InvalidArgument, "task_id:")
	_, err = e.agent1.EndTask(ctx, &leaseholdv1.EndTaskRequest{})
	requireCode(t, err, codes.InvalidArgument, "task_id:")
}

// Quotas hold under concurrent callers (run with -race): exactly the limit
// gets through, the rest is ResourceExhausted and audited.
func TestQuotasUnderConcurrency(t *testing.T) {
	e := newEnv(t, func(c *server.Config) {
		c.MaxActiveLeasesPerAgent, c.MaxLeasesPerTask, c.AcquireRate = 5, -1, -1
	})
	e.putStatic("a/b", map[string]string{"k": "v"})
	e.grant("a/b", agent1ID, "read")
	var wg sync.WaitGroup
	var mu sync.Mutex
	ok, exhausted := 0, 0
	for i := range 20 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, err := e.agent1.AcquireLease(ctx, acquireReq("a/b", fmt.Sprint("t-", i), "read"))
			mu.Lock()
			defer mu.Unlock()
			if err == nil {
				ok++
			} else {
				requireCode(t, err, codes.ResourceExhausted, "already holds 5 active leases")
				exhausted++
			}
		}()
	}
	wg.Wait()
	require.Equal(t, 5, ok, "never more than the limit, however many race")
	require.Equal(t, 15, exhausted)
	denied := e.audit(&leaseholdv1.QueryAuditRequest{AgentId: agent1ID, Decision: leaseholdv1.Decision_DECISION_DENY})
	require.Len(t, denied, 15)
	require.Equal(t, "ResourceExhausted", denied[0].GetCode())
}

func TestTaskBudgetAndRateLimit(t *testing.T) {
	e := newEnv(t, func(c *server.Config) {
		c.MaxLeasesPerTask, c.AcquireRate, c.AcquireBurst = 3, 1, 5
	})
	e.putStatic("a/b", map[string]string{"k": "v"})
	e.grant("a/b", agent1ID, "read")
	for range 3 { // released each time: a live identical lease would be returned, not counted
		l, err := e.agent1.AcquireLease(ctx, acquireReq("a/b", "batch-1", "read"))
		require.NoError(t, err)
		_, err = e.agent1.ReleaseLease(ctx, &leaseholdv1.ReleaseLeaseRequest{LeaseId: l.GetLease().GetId()})
		require.NoError(t, err)
	}
	_, err := e.agent1.AcquireLease(ctx, acquireReq("a/b", "batch-1", "read"))
	requireCode(t, err, codes.ResourceExhausted, `task "batch-1" has used its budget of 3 leases`)

	// The bucket (burst 5) is nearly empty after five acquires in a row.
	_, err = e.agent1.AcquireLease(ctx, acquireReq("a/b", "batch-2", "read"))
	require.NoError(t, err)
	_, err = e.agent1.AcquireLease(ctx, acquireReq("a/b", "batch-3", "read"))
	requireCode(t, err, codes.ResourceExhausted, "faster than 1 per second")
	_, err = e.agent2.AcquireLease(ctx, acquireReq("a/b", "x", "read"))
	requireCode(t, err, codes.PermissionDenied, "no grant") // another agent has its own bucket
}

// A request refused by a quota creates nothing upstream: the quota is
// checked before the backend issues.
func TestQuotaRefusalIssuesNothingUpstream(t *testing.T) {
	e := newEnv(t, func(c *server.Config) { c.MaxActiveLeasesPerAgent, c.AcquireRate = 1, -1 })
	_, err := e.admin.PutCredential(ctx, &leaseholdv1.PutCredentialRequest{Name: "db/dyn", Backend: "recording", Secret: map[string]string{"p": "x"}})
	require.NoError(t, err)
	e.grant("db/dyn", agent1ID, "read")
	_, err = e.agent1.AcquireLease(ctx, acquireReq("db/dyn", "t", "read"))
	require.NoError(t, err)
	before := recorder.issued.Load()
	for i := range 3 {
		_, err = e.agent1.AcquireLease(ctx, acquireReq("db/dyn", fmt.Sprintf("other-%d", i), "read"))
		requireCode(t, err, codes.ResourceExhausted, "already holds 1 active leases")
	}
	require.Equal(t, before, recorder.issued.Load(), "no upstream credential was minted for a refused request")
}

package server_test

import (
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	leaseholdv1 "github.com/leasehold/leasehold/proto/leasehold/v1"
)

// Acquiring again for the same task, credential and scopes while the lease
// lives returns that lease (an agent retrying after a timeout does not pile
// up leases); anything different gets a new one.
func TestIdempotentAcquire(t *testing.T) {
	e := newEnv(t, noQuotas)
	e.putStatic("crm/api", map[string]string{"api_key": "v1"})
	e.grant("crm/api", agent1ID, "read", "write")
	a, err := e.agent1.AcquireLease(ctx, acquireReq("crm/api", "job", "read"))
	require.NoError(t, err)
	b, err := e.agent1.AcquireLease(ctx, acquireReq("crm/api", "job", "read"))
	require.NoError(t, err)
	require.Equal(t, a.GetLease().GetId(), b.GetLease().GetId())
	require.Equal(t, "v1", b.GetSecret()["api_key"])
	recs := e.audit(&leaseholdv1.QueryAuditRequest{LeaseId: a.GetLease().GetId()})
	require.Len(t, recs, 2, "both answers are on the audit trail")
	require.Contains(t, recs[0].GetReason(), "idempotent acquire")

	for name, req := range map[string]*leaseholdv1.AcquireLeaseRequest{
		"other scopes": acquireReq("crm/api", "job", "read", "write"),
		"other task":   acquireReq("crm/api", "job/2", "read"),
	} {
		c, err := e.agent1.AcquireLease(ctx, req)
		require.NoError(t, err)
		require.NotEqual(t, a.GetLease().GetId(), c.GetLease().GetId(), name)
	}
	e.putStatic("crm/api", map[string]string{"api_key": "v2"})
	c, err := e.agent1.AcquireLease(ctx, acquireReq("crm/api", "job", "read"))
	require.NoError(t, err)
	require.NotEqual(t, a.GetLease().GetId(), c.GetLease().GetId(), "a new version gets a new lease")
	require.Equal(t, "v2", c.GetSecret()["api_key"])
	_, err = e.agent1.ReleaseLease(ctx, &leaseholdv1.ReleaseLeaseRequest{LeaseId: c.GetLease().GetId()})
	require.NoError(t, err)
	d, err := e.agent1.AcquireLease(ctx, acquireReq("crm/api", "job", "read"))
	require.NoError(t, err)
	require.NotEqual(t, c.GetLease().GetId(), d.GetLease().GetId(), "a released lease is not returned")
}

// Concurrent identical acquires, on a dynamic backend, yield one lease and
// one upstream credential.
func TestIdempotentAcquireUnderConcurrency(t *testing.T) {
	e := newEnv(t, noQuotas)
	_, err := e.admin.PutCredential(ctx, &leaseholdv1.PutCredentialRequest{Name: "db/dyn", Backend: "recording", Secret: map[string]string{"p": "x"}})
	require.NoError(t, err)
	e.grant("db/dyn", agent1ID, "read")
	const n = 16
	var wg sync.WaitGroup
	ids, users := make([]string, n), make([]string, n)
	errs := make([]error, n)
	// Lease ids start with their millisecond: anything issued from here on
	// sorts after this.
	firstID := fmt.Sprintf("ls_%012x", time.Now().UnixMilli())
	for i := range n {
		wg.Go(func() {
			l, err := e.agent1.AcquireLease(ctx, acquireReq("db/dyn", "nightly", "read"))
			errs[i] = err
			ids[i], users[i] = l.GetLease().GetId(), l.GetSecret()["user"]
		})
	}
	wg.Wait()
	for i := range n {
		require.NoError(t, errs[i])
		require.Equal(t, ids[0], ids[i], "one lease for all")
		require.Equal(t, users[0], users[i], "the same upstream credential for all")
	}
	resp, err := e.admin.ListLeases(ctx, &leaseholdv1.ListLeasesRequest{AgentId: agent1ID, TaskId: "nightly"})
	require.NoError(t, err)
	require.Len(t, resp.GetLeases(), 1, "no duplicate was stored")
	// Identical acquires wait for each other in the broker, so only one
	// upstream credential is minted. (Brokers sharing a store would each mint
	// one; the commit re-checks and destroys the extra at once.)
	recorder.mu.Lock()
	var mine []string
	for _, art := range recorder.arts {
		if strings.HasPrefix(art, "role_ls_") && art >= "role_"+firstID {
			mine = append(mine, art)
		}
	}
	recorder.mu.Unlock()
	require.Equal(t, []string{users[0]}, mine, "identical acquires wait for each other: one upstream credential is minted")
	require.False(t, recorder.wasRevoked(users[0]))
}

package server_test

import (
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"google.golang.org/grpc/codes"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	leaseholdv1 "github.com/leasehold/leasehold/proto/leasehold/v1"
	"github.com/leasehold/leasehold/server"
)

// A disk that stalls cannot hang the broker: a request whose write is not
// durable within the deadline gets Unavailable and no secret, health says
// NOT_SERVING until the write completes, and then all is well again.
func TestAuditDeadlineFailsClosedAndReportsHealth(t *testing.T) {
	e := newEnv(t, func(c *server.Config) { c.AuditDeadline = 200 * time.Millisecond })
	e.putStatic("crm/salesforce", map[string]string{"api_key": "k"})
	e.grant("crm/salesforce", agent1ID, "read")
	health := healthpb.NewHealthClient(e.dial(adminID))
	status := func(svc string) healthpb.HealthCheckResponse_ServingStatus {
		r, err := health.Check(ctx, &healthpb.HealthCheckRequest{Service: svc})
		require.NoError(t, err)
		return r.GetStatus()
	}
	require.Eventually(t, func() bool { return status(server.AuditHealthService) == healthpb.HealthCheckResponse_SERVING },
		5*time.Second, 10*time.Millisecond)

	stall := make(chan struct{})
	e.store.stall.Store(&stall)
	start := time.Now()
	resp, err := e.agent1.AcquireLease(ctx, acquireReq("crm/salesforce", "t", "read"))
	requireCode(t, err, codes.Unavailable, "did not become durable in time")
	require.Nil(t, resp, "no secret without a durable audit record")
	require.Less(t, time.Since(start), 5*time.Second, "the call returned instead of hanging")
	require.Equal(t, healthpb.HealthCheckResponse_NOT_SERVING, status(server.AuditHealthService))
	require.Equal(t, healthpb.HealthCheckResponse_NOT_SERVING, status(""))
	require.Equal(t, healthpb.HealthCheckResponse_SERVING, status("leasehold.v1.AdminService"), "admins can still look")
	_, err = e.agent2.AcquireLease(ctx, acquireReq("crm/salesforce", "t", "read"))
	requireCode(t, err, codes.Unavailable, "durable") // a denial is not answered without its record either

	e.store.stall.Store(nil)
	close(stall)
	require.Eventually(t, func() bool { return status(server.AuditHealthService) == healthpb.HealthCheckResponse_SERVING },
		5*time.Second, 10*time.Millisecond, "health recovers once the stalled writes finish")
	_, err = e.agent1.AcquireLease(ctx, acquireReq("crm/salesforce", "t2", "read"))
	require.NoError(t, err)
	// The stalled acquire committed late: its lease exists but was never
	// handed out, and its audit record is on the trail.
	leases, err := e.admin.ListLeases(ctx, &leaseholdv1.ListLeasesRequest{AgentId: agent1ID})
	require.NoError(t, err)
	require.Len(t, leases.GetLeases(), 2)
}

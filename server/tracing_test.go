package server_test

import (
	"fmt"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
	"go.opentelemetry.io/otel/attribute"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"

	leaseholdv1 "github.com/leasehold/leasehold/proto/leasehold/v1"
)

func spanAttrs(s sdktrace.ReadOnlySpan) map[attribute.Key]string {
	m := map[attribute.Key]string{}
	for _, kv := range s.Attributes() {
		m[kv.Key] = kv.Value.Emit()
	}
	return m
}

// Every lease operation is a span carrying the ids that tie it to its task,
// and no span carries secret material.
func TestSpansCarryIdsNeverSecrets(t *testing.T) {
	e := newEnv(t)
	const canary = "CANARY-span-91c2"
	e.putStatic("crm/salesforce", map[string]string{"api_key": canary})
	e.grant("crm/salesforce", agent1ID, "read")
	l, err := e.agent1.AcquireLease(ctx, acquireReq("crm/salesforce", "ticket-9", "read"))
	require.NoError(t, err)
	_, err = e.agent2.AcquireLease(ctx, acquireReq("crm/salesforce", "ticket-10", "read"))
	require.Error(t, err)
	_, err = e.agent1.ReleaseLease(ctx, &leaseholdv1.ReleaseLeaseRequest{LeaseId: l.GetLease().GetId()})
	require.NoError(t, err)

	var acquires []map[attribute.Key]string
	names := map[string]int{}
	for _, s := range e.spans.Ended() {
		names[s.Name()]++
		dump := fmt.Sprint(s.Attributes(), s.Events(), s.Status())
		require.False(t, strings.Contains(dump, canary), "span %s leaks the secret", s.Name())
		if s.Name() == "lease.acquire" {
			acquires = append(acquires, spanAttrs(s))
		}
	}
	require.Equal(t, 2, names["lease.acquire"])
	require.Equal(t, 1, names["backend.issue"], "the denied acquire never reached the backend")
	require.Equal(t, 1, names["store.commit"])
	require.Equal(t, 1, names["lease.release"])
	require.Len(t, acquires, 2)
	allow, deny := acquires[0], acquires[1]
	require.Equal(t, agent1ID, allow["leasehold.agent.id"])
	require.Equal(t, "crm/salesforce", allow["leasehold.credential"])
	require.Equal(t, "ticket-9", allow["leasehold.task.id"])
	require.Equal(t, l.GetLease().GetId(), allow["leasehold.lease.id"])
	require.Equal(t, "allow", allow["leasehold.decision"])
	require.Equal(t, "deny", deny["leasehold.decision"])
	require.Equal(t, "PermissionDenied", deny["rpc.grpc.status_code_name"])
	require.Equal(t, "ticket-10", deny["leasehold.task.id"])
}

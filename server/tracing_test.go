package server_test

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"go.opentelemetry.io/otel/attribute"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
	"google.golang.org/grpc/codes"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/leasehold/leasehold/client"
	leaseholdv1 "github.com/leasehold/leasehold/proto/leasehold/v1"
)

func spanAttrs(s sdktrace.ReadOnlySpan) map[attribute.Key]string {
	m := map[attribute.Key]string{}
	for _, kv := range s.Attributes() {
		m[kv.Key] = kv.Value.String()
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

func findSpan(spans []sdktrace.ReadOnlySpan, name string) sdktrace.ReadOnlySpan {
	for _, s := range spans {
		if s.Name() == name {
			return s
		}
	}
	return nil
}

// An orchestrator's task span is the root of every credential access it
// causes: task → client span → client RPC → broker RPC → lease.acquire →
// backend.issue, one trace, which the audit record and the log line name.
func TestTraceChainFromTaskSpanToBackend(t *testing.T) {
	e := newEnv(t)
	e.putStatic("crm/salesforce", map[string]string{"api_key": "CANARY-trace-77"})
	e.grant("crm/salesforce", agent1ID, "read")
	clientSpans := tracetest.NewSpanRecorder()
	ctp := sdktrace.NewTracerProvider(sdktrace.WithSpanProcessor(clientSpans))
	c, err := client.New(ctx, client.Config{Address: e.addr, Source: e.source(agent1ID), TracerProvider: ctp})
	require.NoError(t, err)
	defer c.Close()

	taskCtx, task := ctp.Tracer("orchestrator").Start(ctx, "task ticket-7")
	_, err = c.Acquire(taskCtx, "crm/salesforce", client.AcquireOptions{Scopes: []string{"read"}, TaskID: "ticket-7"})
	require.NoError(t, err)
	task.End()
	traceID := task.SpanContext().TraceID()

	cAcquire := findSpan(clientSpans.Ended(), "leasehold.client.Acquire")
	require.NotNil(t, cAcquire)
	require.Equal(t, task.SpanContext().SpanID(), cAcquire.Parent().SpanID())
	cRPC := findSpan(clientSpans.Ended(), "leasehold.v1.BrokerService/AcquireLease")
	require.NotNil(t, cRPC)
	require.Equal(t, cAcquire.SpanContext().SpanID(), cRPC.Parent().SpanID())

	var sRPC, lease, issue sdktrace.ReadOnlySpan
	require.Eventually(t, func() bool {
		sRPC = findSpan(e.spans.Ended(), "leasehold.v1.BrokerService/AcquireLease")
		return sRPC != nil
	}, 5*time.Second, 10*time.Millisecond)
	lease, issue = findSpan(e.spans.Ended(), "lease.acquire"), findSpan(e.spans.Ended(), "backend.issue")
	require.Equal(t, traceID, sRPC.SpanContext().TraceID(), "the broker joins the agent's trace")
	require.Equal(t, cRPC.SpanContext().SpanID(), sRPC.Parent().SpanID())
	require.True(t, sRPC.Parent().IsRemote())
	require.Equal(t, sRPC.SpanContext().SpanID(), lease.Parent().SpanID())
	require.Equal(t, lease.SpanContext().SpanID(), issue.Parent().SpanID())
	policy := findSpan(e.spans.Ended(), "policy.evaluate")
	require.NotNil(t, policy)
	require.Equal(t, lease.SpanContext().SpanID(), policy.Parent().SpanID())
	require.Equal(t, "ticket-7", spanAttrs(lease)["leasehold.task.id"])

	recs, err := e.admin.QueryAudit(ctx, &leaseholdv1.QueryAuditRequest{TraceId: traceID.String()})
	require.NoError(t, err)
	require.Len(t, recs.GetRecords(), 1, "the trace id finds the audit record")
	require.Equal(t, lease.SpanContext().SpanID().String(), recs.GetRecords()[0].GetSpanId())
	require.Contains(t, e.logs.String(), `"trace_id":"`+traceID.String()+`"`, "and the log line")
	_, err = e.admin.QueryAudit(ctx, &leaseholdv1.QueryAuditRequest{TraceId: "xyz"})
	requireCode(t, err, codes.InvalidArgument, "trace_id:")

	// Health checks are not traced; nothing carries the secret.
	_, err = healthpb.NewHealthClient(e.dial(adminID)).Check(ctx, &healthpb.HealthCheckRequest{})
	require.NoError(t, err)
	time.Sleep(50 * time.Millisecond)
	for _, s := range append(e.spans.Ended(), clientSpans.Ended()...) {
		require.NotContains(t, s.Name(), "grpc.health")
		require.NotContains(t, fmt.Sprint(s.Attributes(), s.Events(), s.Status()), "CANARY")
	}
	require.NotContains(t, e.logs.String(), "CANARY")
}

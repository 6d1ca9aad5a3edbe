package server_test

import (
	"fmt"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
	"go.opentelemetry.io/otel/attribute"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	"go.opentelemetry.io/otel/sdk/metric/metricdata"

	leaseholdv1 "github.com/leasehold/leasehold/proto/leasehold/v1"
)

// collect flattens the broker's metrics: "name{k=v,...}" → value (sums and
// gauges) or count (histograms).
func (e *env) collect() map[string]int64 {
	e.t.Helper()
	return collectMetrics(e.t, e.metrics)
}

func collectMetrics(t testing.TB, reader *sdkmetric.ManualReader) map[string]int64 {
	t.Helper()
	var rm metricdata.ResourceMetrics
	require.NoError(t, reader.Collect(ctx, &rm))
	out := map[string]int64{}
	for _, sm := range rm.ScopeMetrics {
		for _, m := range sm.Metrics {
			switch d := m.Data.(type) {
			case metricdata.Sum[int64]:
				for _, p := range d.DataPoints {
					out[m.Name+labels(p.Attributes)] = p.Value
				}
			case metricdata.Gauge[int64]:
				for _, p := range d.DataPoints {
					out[m.Name] = p.Value
				}
			case metricdata.Histogram[float64]:
				for _, p := range d.DataPoints {
					out[m.Name+labels(p.Attributes)] += int64(p.Count)
				}
			}
		}
	}
	return out
}

func labels(set attribute.Set) string {
	var parts []string
	for _, kv := range set.ToSlice() {
		parts = append(parts, string(kv.Key)+"="+kv.Value.String())
	}
	return "[" + strings.Join(parts, " ") + "]"
}

func TestMetrics(t *testing.T) {
	e := newEnv(t)
	e.putStatic("crm/salesforce", map[string]string{"api_key": "CANARY-metric-3"})
	e.grant("crm/salesforce", agent1ID, "read")
	a, err := e.agent1.AcquireLease(ctx, acquireReq("crm/salesforce", "t", "read"))
	require.NoError(t, err)
	_, err = e.agent1.AcquireLease(ctx, acquireReq("crm/salesforce", "t2", "read"))
	require.NoError(t, err)
	_, err = e.agent2.AcquireLease(ctx, acquireReq("crm/salesforce", "t", "read"))
	require.Error(t, err)
	_, err = e.agent1.ReleaseLease(ctx, &leaseholdv1.ReleaseLeaseRequest{LeaseId: a.GetLease().GetId()})
	require.NoError(t, err)

	m := e.collect()
	require.Equal(t, int64(1), m["leasehold.leases.active"])
	require.Equal(t, int64(0), m["leasehold.revocations.pending"])
	require.Equal(t, int64(2), m["leasehold.decisions[code=OK decision=allow operation=lease.acquire]"])
	require.Equal(t, int64(1), m["leasehold.decisions[code=PermissionDenied decision=deny operation=lease.acquire]"])
	require.Equal(t, int64(1), m["leasehold.decisions[code=OK decision=allow operation=lease.release]"])
	require.Equal(t, int64(2), m["leasehold.acquire.duration[decision=allow]"])
	require.Equal(t, int64(1), m["leasehold.acquire.duration[decision=deny]"])
	require.Positive(t, m["leasehold.store.write.duration[]"])
	require.NotContains(t, fmt.Sprint(m), "CANARY")

	e.restart()
	require.Equal(t, int64(1), e.collect()["leasehold.leases.active"], "the count is durable: a restart does not scan or reset it")
}

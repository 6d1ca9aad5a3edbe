package server

import (
	"context"
	"time"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/metric"

	"github.com/leasehold/leasehold/store"
)

// metrics are the broker's instruments. Labels are outcomes and operation
// names, never ids or secrets, so their number stays small.
type metrics struct {
	decisions  metric.Int64Counter
	acquireDur metric.Float64Histogram
	writeDur   metric.Float64Histogram
}

// secondBuckets suit latencies from a fraction of a millisecond (an fsync'd
// commit) to seconds (an upstream that is slow).
var secondBuckets = metric.WithExplicitBucketBoundaries(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

func newMetrics(mp metric.MeterProvider, st store.Store, leading func() bool) (*metrics, error) {
	m := mp.Meter(instrumentationName)
	out := &metrics{}
	var err error
	if out.decisions, err = m.Int64Counter("leasehold.decisions",
		metric.WithDescription("Lease operations by outcome: operation, decision (allow, deny, error) and gRPC code.")); err != nil {
		return nil, err
	}
	if out.acquireDur, err = m.Float64Histogram("leasehold.acquire.duration", metric.WithUnit("s"), secondBuckets,
		metric.WithDescription("Time to decide and answer an AcquireLease, including the durable audit write.")); err != nil {
		return nil, err
	}
	if out.writeDur, err = m.Float64Histogram("leasehold.store.write.duration", metric.WithUnit("s"), secondBuckets,
		metric.WithDescription("Time for a write transaction (lease and audit record) to become durable.")); err != nil {
		return nil, err
	}
	active, err := m.Int64ObservableGauge("leasehold.leases.active", metric.WithDescription("Leases in state active."))
	if err != nil {
		return nil, err
	}
	pending, err := m.Int64ObservableGauge("leasehold.revocations.pending",
		metric.WithDescription("Upstream artifacts queued for destruction, including ones being retried."))
	if err != nil {
		return nil, err
	}
	leader, err := m.Int64ObservableGauge("leasehold.leader",
		metric.WithDescription("1 while this broker runs the background work (reaper, revocation queue, rotation, retention, export); with a shared store, one broker at a time."))
	if err != nil {
		return nil, err
	}
	_, err = m.RegisterCallback(func(ctx context.Context, o metric.Observer) error {
		lead := int64(0)
		if leading() {
			lead = 1
		}
		o.ObserveInt64(leader, lead)
		return st.View(ctx, func(tx store.ReadTx) error {
			n, err := tx.ActiveLeaseCount()
			if err != nil {
				return err
			}
			o.ObserveInt64(active, n)
			p, err := tx.PendingRevocations()
			if err != nil {
				return err
			}
			o.ObserveInt64(pending, int64(p))
			return nil
		})
	}, active, pending, leader)
	return out, err
}

// decision counts a finished lease operation.
func (m *metrics) decision(ctx context.Context, op, decision, code string, took time.Duration) {
	attrs := metric.WithAttributes(attribute.String("operation", op), attribute.String("decision", decision),
		attribute.String("code", code))
	m.decisions.Add(ctx, 1, attrs)
	if op == "lease.acquire" {
		m.acquireDur.Record(ctx, took.Seconds(), metric.WithAttributes(attribute.String("decision", decision)))
	}
}

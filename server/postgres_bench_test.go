package server_test

import (
	"fmt"
	"runtime"
	"sync/atomic"
	"testing"
	"time"

	leaseholdv1 "github.com/leasehold/leasehold/proto/leasehold/v1"
	"github.com/leasehold/leasehold/store"
)

// BenchmarkPostgresIssue: PostgreSQL leases issued per second by 16
// concurrent agents (callers), each a CREATE ROLE with the read template,
// committed with its durable audit record. Reproduce: make bench-postgres.
func BenchmarkPostgresIssue(b *testing.B) {
	e, _ := pgEnvB(b)
	var n atomic.Int64
	b.SetParallelism(max(1, 16/runtime.GOMAXPROCS(0)))
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			if _, err := e.agent2.AcquireLease(ctx, acquireReq("db/analytics", fmt.Sprint("t-", n.Add(1)), "read")); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.StopTimer()
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "leases/s")
}

// BenchmarkPostgresRevoke: roles dropped per second by the revocation queue
// after one RevokeAgent ends b.N leases (each: terminate sessions, drop
// owned, drop role).
func BenchmarkPostgresRevoke(b *testing.B) {
	e, _ := pgEnvB(b)
	for i := range b.N {
		if _, err := e.agent2.AcquireLease(ctx, acquireReq("db/analytics", fmt.Sprint("t-", i), "read")); err != nil {
			b.Fatal(err)
		}
	}
	b.ResetTimer()
	if _, err := e.admin.RevokeAgent(ctx, &leaseholdv1.RevokeAgentRequest{SpiffeId: agent2ID, Reason: "bench"}); err != nil {
		b.Fatal(err)
	}
	for {
		var pending int
		if err := e.bolt.View(ctx, func(tx store.ReadTx) (err error) { pending, err = tx.PendingRevocations(); return err }); err != nil {
			b.Fatal(err)
		}
		if pending == 0 {
			break
		}
		time.Sleep(time.Millisecond)
	}
	b.StopTimer()
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "roles/s")
}

package server_test

import (
	"fmt"
	"sync/atomic"
	"testing"

	leaseholdv1 "github.com/leasehold/leasehold/proto/leasehold/v1"
	"github.com/leasehold/leasehold/server"
)

// BenchmarkAcquireRelease measures one acquire and one release, each with
// its fsync'd audit record, over real mTLS on loopback, from parallel
// agents. Reproduce: make bench (figures in docs/benchmarks.md).
func BenchmarkAcquireRelease(b *testing.B) {
	e := newEnv(b, noQuotas)
	e.putStatic("bench/key", map[string]string{"api_key": "k"})
	e.grant("bench/key", agent1ID, "read")
	var n atomic.Int64
	b.ReportAllocs()
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			task := fmt.Sprintf("t-%d", n.Add(1))
			l, err := e.agent1.AcquireLease(ctx, acquireReq("bench/key", task, "read"))
			if err != nil {
				b.Fatal(err)
			}
			if _, err := e.agent1.ReleaseLease(ctx, &leaseholdv1.ReleaseLeaseRequest{LeaseId: l.GetLease().GetId()}); err != nil {
				b.Fatal(err)
			}
		}
	})
}

// BenchmarkWhoAmI is the ceiling: a trivial RPC on the same server and
// connection, no store write.
func BenchmarkWhoAmI(b *testing.B) {
	e := newEnv(b)
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			if _, err := e.agent1.WhoAmI(ctx, &leaseholdv1.WhoAmIRequest{}); err != nil {
				b.Fatal(err)
			}
		}
	})
}

// noQuotas turns the default quotas off, for load.
func noQuotas(c *server.Config) { c.AcquireRate, c.MaxActiveLeasesPerAgent = -1, -1 }

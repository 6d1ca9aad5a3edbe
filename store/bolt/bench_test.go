package bolt_test

import (
	"context"
	"fmt"
	"path/filepath"
	"testing"
	"time"

	"github.com/leasehold/leasehold/store"
	"github.com/leasehold/leasehold/store/bolt"
)

// The store's hot functions, without fsync (NoSync) so the figures are the
// CPU cost of encoding, indexing and page work: grouped 256 to a
// transaction, as group commit does under load.

func benchStore(b *testing.B) *bolt.Store {
	s, err := bolt.Open(bolt.Config{Path: filepath.Join(b.TempDir(), "bench.db"), NoSync: true})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { _ = s.Close() })
	return s
}

func benchLease(i int) *store.Lease {
	now := time.Now()
	return &store.Lease{ID: fmt.Sprintf("ls_%012x%020x", now.UnixMilli(), i), AgentID: fmt.Sprintf("spiffe://bench.test/agents/a%03d", i%64),
		Credential: "crm/api", Backend: "static", Scopes: []string{"read"}, TaskID: fmt.Sprintf("task-%d", i), GrantID: "gr_1",
		State: store.LeaseActive, TTL: 5 * time.Minute, IssuedAt: now, ExpiresAt: now.Add(5 * time.Minute), MaxExpiresAt: now.Add(time.Hour), CredentialVersion: 1}
}

func inBatches(b *testing.B, s *bolt.Store, fn func(tx store.Tx, i int) error) {
	const batch = 256
	i := 0
	for i < b.N {
		n := min(batch, b.N-i)
		if err := s.Update(context.Background(), func(tx store.Tx) error {
			for j := range n {
				if err := fn(tx, i+j); err != nil {
					return err
				}
			}
			return nil
		}); err != nil {
			b.Fatal(err)
		}
		i += n
	}
}

// BenchmarkPutLease: encode a new lease and write it with its five index
// entries and its expiry-index entry.
func BenchmarkPutLease(b *testing.B) {
	s := benchStore(b)
	b.ReportAllocs()
	b.ResetTimer()
	inBatches(b, s, func(tx store.Tx, i int) error { return tx.PutLease(benchLease(i)) })
}

// BenchmarkGetLease: read and decode one lease.
func BenchmarkGetLease(b *testing.B) {
	s := benchStore(b)
	const n = 10_000
	ids := make([]string, n)
	if err := s.Update(context.Background(), func(tx store.Tx) error {
		for i := range n {
			l := benchLease(i)
			ids[i] = l.ID
			if err := tx.PutLease(l); err != nil {
				return err
			}
		}
		return nil
	}); err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	b.ResetTimer()
	_ = s.View(context.Background(), func(tx store.ReadTx) error {
		for i := 0; b.Loop(); i++ {
			if _, err := tx.GetLease(ids[i%n]); err != nil {
				b.Fatal(err)
			}
		}
		return nil
	})
}

// BenchmarkAppendAudit: chain, encode and index one audit record.
func BenchmarkAppendAudit(b *testing.B) {
	s := benchStore(b)
	b.ReportAllocs()
	b.ResetTimer()
	inBatches(b, s, func(tx store.Tx, i int) error {
		_, err := tx.AppendAudit(&store.AuditRecord{Event: store.EventLeaseAcquire, Decision: store.Allow, Code: "OK",
			AgentID: fmt.Sprintf("spiffe://bench.test/agents/a%03d", i%64), Credential: "crm/api", Scopes: []string{"read"},
			TaskID: fmt.Sprintf("task-%d", i), LeaseID: fmt.Sprintf("ls_%032x", i), GrantID: "gr_1", Reason: "allowed by grant gr_1"})
		return err
	})
}

package storetest

import (
	"fmt"
	"math/rand/v2"
	"slices"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/leasehold/leasehold/store"
)

func testAuditChain(t *testing.T, s store.Store) {
	view(t, s, func(tx store.ReadTx) error {
		h, err := tx.AuditHead()
		require.NoError(t, err)
		require.Zero(t, h.Sequence, "an empty trail has no head")
		return nil
	})
	var recs []*store.AuditRecord
	for i := range 3 {
		update(t, s, func(tx store.Tx) error {
			r := &store.AuditRecord{Event: store.EventLeaseAcquire, Decision: store.Allow, AgentID: fmt.Sprint("spiffe://td/", i)}
			_, err := tx.AppendAudit(r)
			recs = append(recs, r)
			return err
		})
	}
	require.Empty(t, recs[0].PrevHash)
	for i, r := range recs {
		require.Equal(t, store.AuditHash(r), r.Hash, "record %d hash covers its contents", i)
		if i > 0 {
			require.Equal(t, recs[i-1].Hash, r.PrevHash, "record %d links to its predecessor", i)
		}
	}
	view(t, s, func(tx store.ReadTx) error {
		h, err := tx.AuditHead()
		require.NoError(t, err)
		require.Equal(t, uint64(3), h.Sequence)
		require.Equal(t, recs[2].Hash, h.Hash)
		require.True(t, h.Time.Equal(recs[2].Time))
		stored, err := tx.QueryAudit(store.AuditQuery{Ascending: true})
		require.NoError(t, err)
		for i, r := range stored {
			require.Equal(t, recs[i].Hash, r.Hash, "hashes are stored")
			require.Equal(t, store.AuditHash(r), r.Hash, "and still match after a round trip")
		}
		return nil
	})
	// The hash changes with any field.
	r := *recs[1]
	r.Reason = "edited"
	require.NotEqual(t, recs[1].Hash, store.AuditHash(&r))
	r = *recs[1]
	r.Scopes = []string{"a,b"}
	r2 := *recs[1]
	r2.Scopes = []string{"a", "b"}
	require.NotEqual(t, store.AuditHash(&r), store.AuditHash(&r2), "the encoding is unambiguous")
}

// testAuditQueryProperty fills the trail with random records and checks
// that every indexed query returns exactly what a brute-force filter does.
func testAuditQueryProperty(t *testing.T, s store.Store) {
	rng := rand.New(rand.NewPCG(1, 2))
	pick := func(xs ...string) string { return xs[rng.IntN(len(xs))] }
	agents := []string{"", "spiffe://td/a", "spiffe://td/b", "spiffe://td/c"}
	creds := []string{"", "c1", "c2", "c3"}
	tasks := []string{"", "t1", "t2"}
	leases := []string{"", "ls_1", "ls_2", "ls_3", "ls_4"}
	traces := []string{"", "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7a3ce929d0e0e4736"}
	base := time.Now().Add(-time.Hour).UTC().Truncate(time.Millisecond)
	var all []*store.AuditRecord
	update(t, s, func(tx store.Tx) error {
		for i := range 400 {
			r := &store.AuditRecord{
				Time:    base.Add(time.Duration(i) * time.Second),
				Event:   store.EventLeaseAcquire,
				AgentID: pick(agents...), Credential: pick(creds...), TaskID: pick(tasks...), LeaseID: pick(leases...),
				TraceID:  pick(traces...),
				Decision: store.Decision(pick(string(store.Allow), string(store.Deny))),
			}
			if _, err := tx.AppendAudit(r); err != nil {
				return err
			}
			all = append(all, r)
		}
		return nil
	})
	for i := range 300 {
		q := store.AuditQuery{
			AgentID: pick(agents...), Credential: pick(creds...), TaskID: pick(tasks...), LeaseID: pick(leases...),
			TraceID: pick(traces...), Ascending: rng.IntN(2) == 0, Limit: rng.IntN(30),
		}
		if rng.IntN(3) == 0 {
			q.Decision = store.Decision(pick(string(store.Allow), string(store.Deny)))
		}
		if rng.IntN(3) == 0 {
			q.Start = base.Add(time.Duration(rng.IntN(400)) * time.Second)
		}
		if rng.IntN(3) == 0 {
			q.End = base.Add(time.Duration(rng.IntN(420)) * time.Second)
		}
		if rng.IntN(3) == 0 {
			q.AfterSequence = uint64(rng.IntN(400))
		}
		if rng.IntN(3) == 0 {
			q.BeforeSequence = uint64(rng.IntN(420) + 1)
		}
		var want []uint64
		for _, r := range all {
			if q.Matches(r) && (q.AfterSequence == 0 || r.Sequence > q.AfterSequence) &&
				(q.BeforeSequence == 0 || r.Sequence < q.BeforeSequence) {
				want = append(want, r.Sequence)
			}
		}
		if !q.Ascending {
			slices.Reverse(want)
		}
		if q.Limit > 0 && len(want) > q.Limit {
			want = want[:q.Limit]
		}
		var got []uint64
		view(t, s, func(tx store.ReadTx) error {
			rs, err := tx.QueryAudit(q)
			for _, r := range rs {
				got = append(got, r.Sequence)
			}
			return err
		})
		if want == nil {
			want = []uint64{}
		}
		if got == nil {
			got = []uint64{}
		}
		require.Equal(t, want, got, "query %d: %+v", i, q)
	}
}

func testAuditPrune(t *testing.T, s store.Store) {
	var recs []*store.AuditRecord
	update(t, s, func(tx store.Tx) error {
		for i := range 10 {
			r := &store.AuditRecord{Event: store.EventLeaseAcquire, Decision: store.Allow,
				AgentID: fmt.Sprint("spiffe://td/", i%2), Credential: "c", TaskID: "t", LeaseID: fmt.Sprint("ls_", i)}
			if _, err := tx.AppendAudit(r); err != nil {
				return err
			}
			recs = append(recs, r)
		}
		return nil
	})
	var n int
	update(t, s, func(tx store.Tx) (err error) { n, err = tx.PruneAudit(6, 4); return err })
	require.Equal(t, 4, n, "at most limit records per call")
	update(t, s, func(tx store.Tx) (err error) { n, err = tx.PruneAudit(6, 100); return err })
	require.Equal(t, 2, n, "up to and including through")
	view(t, s, func(tx store.ReadTx) error {
		floor, err := tx.AuditFloor()
		require.NoError(t, err)
		require.Equal(t, uint64(6), floor.Sequence)
		require.Equal(t, recs[5].Hash, floor.Hash, "the floor is the last pruned record: the chain continues from it")
		for _, q := range []store.AuditQuery{{}, {AgentID: "spiffe://td/0"}, {Credential: "c"}, {TaskID: "t"}, {LeaseID: "ls_2"},
			{Decision: store.Allow}, {Start: recs[0].Time}} {
			rs, err := tx.QueryAudit(q)
			require.NoError(t, err, "no index entry points at a pruned record: %+v", q)
			for _, r := range rs {
				require.Greater(t, r.Sequence, uint64(6))
			}
		}
		rs, err := tx.QueryAudit(store.AuditQuery{Ascending: true})
		require.NoError(t, err)
		require.Len(t, rs, 4)
		require.Equal(t, recs[5].Hash, rs[0].PrevHash)
		last, err := tx.LastAuditSequence()
		require.NoError(t, err)
		require.Equal(t, uint64(10), last, "sequences are never reused")
		return nil
	})
	update(t, s, func(tx store.Tx) (err error) { n, err = tx.PruneAudit(3, 100); return err })
	require.Zero(t, n, "pruning below the floor does nothing")
}

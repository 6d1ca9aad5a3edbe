// Package storetest is the conformance suite every store engine passes. An
// engine's test calls Run with a constructor for fresh, empty stores.
package storetest

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/leasehold/leasehold/store"
)

// Factory returns a new, empty store; the suite closes it.
type Factory func(t *testing.T) store.Store

// Run runs every conformance test against stores from newStore.
func Run(t *testing.T, newStore Factory) {
	tests := map[string]func(*testing.T, store.Store){
		"CredentialsAndVersions":      testCredentials,
		"Grants":                      testGrants,
		"Agents":                      testAgents,
		"LeaseIndexes":                testLeaseIndexes,
		"ExpiryIndex":                 testExpiryIndex,
		"AuditAppendAndQuery":         testAudit,
		"AuditTimeIsMonotonic":        testAuditMonotonic,
		"AuditChain":                  testAuditChain,
		"AuditQueryMatchesBruteForce": testAuditQueryProperty,
		"AuditPrune":                  testAuditPrune,
		"Cursors":                     testCursors,
		"Revocations":                 testRevocations,
		"UpdateRollsBack":             testRollback,
		"Closed":                      testClosed,
	}
	for name, fn := range tests {
		t.Run(name, func(t *testing.T) {
			s := newStore(t)
			t.Cleanup(func() { _ = s.Close() })
			fn(t, s)
		})
	}
}

var ctx = context.Background()

func update(t *testing.T, s store.Store, fn func(store.Tx) error) {
	t.Helper()
	require.NoError(t, s.Update(ctx, fn))
}

func view(t *testing.T, s store.Store, fn func(store.ReadTx) error) {
	t.Helper()
	require.NoError(t, s.View(ctx, fn))
}

func testCredentials(t *testing.T, s store.Store) {
	now := time.Now().UTC().Truncate(time.Microsecond)
	update(t, s, func(tx store.Tx) error {
		for _, n := range []string{"db/b", "crm/a", "db/a"} {
			if err := tx.PutCredential(&store.Credential{Name: n, Backend: "static", CurrentVersion: 1, WrappedKey: []byte{1}, CreatedAt: now}); err != nil {
				return err
			}
			if err := tx.PutCredentialVersion(&store.CredentialVersion{Credential: n, Version: 1, Sealed: []byte("x")}); err != nil {
				return err
			}
		}
		return nil
	})
	view(t, s, func(tx store.ReadTx) error {
		c, err := tx.GetCredential("crm/a")
		require.NoError(t, err)
		require.Equal(t, "static", c.Backend)
		require.True(t, c.CreatedAt.Equal(now))
		_, err = tx.GetCredential("nope")
		require.ErrorIs(t, err, store.ErrNotFound)

		all, err := tx.ListCredentials("", 0)
		require.NoError(t, err)
		require.Equal(t, []string{"crm/a", "db/a", "db/b"}, names(all, func(c *store.Credential) string { return c.Name }))
		pg, err := tx.ListCredentials("crm/a", 1)
		require.NoError(t, err)
		require.Equal(t, []string{"db/a"}, names(pg, func(c *store.Credential) string { return c.Name }))

		v, err := tx.GetCredentialVersion("db/a", 1)
		require.NoError(t, err)
		require.Equal(t, []byte("x"), v.Sealed)
		_, err = tx.GetCredentialVersion("db/a", 2)
		require.ErrorIs(t, err, store.ErrNotFound)
		return nil
	})
	err := s.Update(ctx, func(tx store.Tx) error {
		return tx.PutCredentialVersion(&store.CredentialVersion{Credential: "db/a", Version: 1})
	})
	require.ErrorIs(t, err, store.ErrAlreadyExists, "versions are immutable")

	update(t, s, func(tx store.Tx) error { return tx.DeleteCredential("db/a") })
	view(t, s, func(tx store.ReadTx) error {
		_, err := tx.GetCredentialVersion("db/a", 1)
		require.ErrorIs(t, err, store.ErrNotFound, "versions go with the credential")
		_, err = tx.GetCredentialVersion("db/b", 1)
		require.NoError(t, err, "a neighbour's versions stay")
		return nil
	})
	require.ErrorIs(t, s.Update(ctx, func(tx store.Tx) error { return tx.DeleteCredential("db/a") }), store.ErrNotFound)
}

func testGrants(t *testing.T, s store.Store) {
	update(t, s, func(tx store.Tx) error {
		for i, c := range []string{"a", "b", "a"} {
			if err := tx.PutGrant(&store.Grant{ID: fmt.Sprintf("gr_%d", i), Credential: c, SpiffeID: "spiffe://td/x", Scopes: []string{"read"}, MaxTTL: time.Minute}); err != nil {
				return err
			}
		}
		return nil
	})
	view(t, s, func(tx store.ReadTx) error {
		gs, err := tx.ListGrants("a", "", 0)
		require.NoError(t, err)
		require.Equal(t, []string{"gr_0", "gr_2"}, names(gs, func(g *store.Grant) string { return g.ID }))
		gs, err = tx.ListGrants("a", "gr_0", 0)
		require.NoError(t, err)
		require.Equal(t, []string{"gr_2"}, names(gs, func(g *store.Grant) string { return g.ID }))
		gs, err = tx.ListGrants("", "", 2)
		require.NoError(t, err)
		require.Len(t, gs, 2)
		require.Equal(t, time.Minute, gs[0].MaxTTL)
		return nil
	})
	// Moving a grant to another credential moves its index entry.
	update(t, s, func(tx store.Tx) error {
		return tx.PutGrant(&store.Grant{ID: "gr_2", Credential: "b", SpiffeID: "spiffe://td/x"})
	})
	update(t, s, func(tx store.Tx) error { return tx.DeleteGrant("gr_0") })
	view(t, s, func(tx store.ReadTx) error {
		gs, err := tx.ListGrants("a", "", 0)
		require.NoError(t, err)
		require.Empty(t, gs)
		gs, err = tx.ListGrants("b", "", 0)
		require.NoError(t, err)
		require.Len(t, gs, 2)
		_, err = tx.GetGrant("gr_0")
		require.ErrorIs(t, err, store.ErrNotFound)
		return nil
	})
	require.ErrorIs(t, s.Update(ctx, func(tx store.Tx) error { return tx.DeleteGrant("gr_0") }), store.ErrNotFound)
}

func testAgents(t *testing.T, s store.Store) {
	update(t, s, func(tx store.Tx) error {
		if err := tx.PutAgent(&store.Agent{ID: "spiffe://td/b", Revoked: true, RevokedReason: "r"}); err != nil {
			return err
		}
		return tx.PutAgent(&store.Agent{ID: "spiffe://td/a"})
	})
	view(t, s, func(tx store.ReadTx) error {
		a, err := tx.GetAgent("spiffe://td/b")
		require.NoError(t, err)
		require.True(t, a.Revoked)
		require.Equal(t, "r", a.RevokedReason)
		_, err = tx.GetAgent("spiffe://td/c")
		require.ErrorIs(t, err, store.ErrNotFound)
		all, err := tx.ListAgents("", 0)
		require.NoError(t, err)
		require.Equal(t, []string{"spiffe://td/a", "spiffe://td/b"}, names(all, func(a *store.Agent) string { return a.ID }))
		return nil
	})
}

func lease(id, agent, task string, state store.LeaseState, exp time.Time) *store.Lease {
	return &store.Lease{ID: id, AgentID: agent, Credential: "c", GrantID: "g", TaskID: task, State: state, ExpiresAt: exp}
}

func testLeaseIndexes(t *testing.T, s store.Store) {
	exp := time.Now().Add(time.Hour)
	update(t, s, func(tx store.Tx) error {
		for _, l := range []*store.Lease{
			lease("ls_1", "spiffe://td/a", "t1", store.LeaseActive, exp),
			lease("ls_2", "spiffe://td/a", "t2", store.LeaseReleased, exp),
			lease("ls_3", "spiffe://td/b", "t1", store.LeaseActive, exp),
			lease("ls_4", "spiffe://td/a", "t1", store.LeaseActive, exp),
		} {
			if err := tx.PutLease(l); err != nil {
				return err
			}
		}
		return nil
	})
	ids := func(f store.LeaseFilter, after string, limit int) []string {
		var out []string
		view(t, s, func(tx store.ReadTx) error {
			ls, err := tx.ListLeases(f, after, limit)
			out = names(ls, func(l *store.Lease) string { return l.ID })
			return err
		})
		return out
	}
	require.Equal(t, []string{"ls_1", "ls_2", "ls_4"}, ids(store.LeaseFilter{AgentID: "spiffe://td/a"}, "", 0))
	require.Equal(t, []string{"ls_1", "ls_4"}, ids(store.LeaseFilter{AgentID: "spiffe://td/a", ActiveOnly: true}, "", 0))
	require.Equal(t, []string{"ls_4"}, ids(store.LeaseFilter{AgentID: "spiffe://td/a", ActiveOnly: true}, "ls_1", 0))
	view(t, s, func(tx store.ReadTx) error {
		for _, c := range []struct {
			agent       string
			limit, want int
		}{{"spiffe://td/a", 0, 2}, {"spiffe://td/a", 1, 1}, {"spiffe://td/b", 0, 1}, {"spiffe://td/a/", 0, 0}, {"spiffe://td/none", 5, 0}} {
			n, err := tx.CountActiveLeases(c.agent, c.limit)
			require.NoError(t, err)
			require.Equal(t, c.want, n, "%s limit %d", c.agent, c.limit)
		}
		return nil
	})
	require.Equal(t, []string{"ls_1"}, ids(store.LeaseFilter{TaskID: "t1", AgentID: "spiffe://td/a"}, "", 1))
	require.Equal(t, []string{"ls_1", "ls_3", "ls_4"}, ids(store.LeaseFilter{TaskID: "t1"}, "", 0))
	require.Equal(t, []string{"ls_1", "ls_3", "ls_4"}, ids(store.LeaseFilter{GrantID: "g", ActiveOnly: true}, "", 0))
	require.Equal(t, []string{"ls_1", "ls_2", "ls_3", "ls_4"}, ids(store.LeaseFilter{}, "", 0))
	require.Empty(t, ids(store.LeaseFilter{AgentID: "spiffe://td/a/"}, "", 0), "an agent id is not a prefix of another")

	// Ending a lease updates the state kept in the indexes.
	update(t, s, func(tx store.Tx) error {
		l, err := tx.GetLease("ls_1")
		if err != nil {
			return err
		}
		l.State = store.LeaseRevoked
		return tx.PutLease(l)
	})
	require.Equal(t, []string{"ls_4"}, ids(store.LeaseFilter{AgentID: "spiffe://td/a", ActiveOnly: true}, "", 0))
	view(t, s, func(tx store.ReadTx) error {
		n, err := tx.ActiveLeaseCount()
		require.NoError(t, err)
		require.Equal(t, int64(2), n, "ls_3 and ls_4: the count follows state changes")
		_, err = tx.GetLease("ls_9")
		require.ErrorIs(t, err, store.ErrNotFound)
		return nil
	})
	update(t, s, func(tx store.Tx) error {
		for _, l := range []*store.Lease{
			lease("ls_5", "spiffe://td/a", "t1/sub", store.LeaseActive, exp),
			lease("ls_6", "spiffe://td/b", "t1/sub/deeper", store.LeaseActive, exp),
			lease("ls_7", "spiffe://td/a", "t10", store.LeaseActive, exp),
		} {
			if err := tx.PutLease(l); err != nil {
				return err
			}
		}
		return nil
	})
	require.Equal(t, []string{"ls_1", "ls_3", "ls_4", "ls_5", "ls_6"}, sorted(ids(store.LeaseFilter{TaskTree: "t1"}, "", 0)), "t1 and its subtasks, not t10")
	require.Equal(t, []string{"ls_1", "ls_4", "ls_5"}, sorted(ids(store.LeaseFilter{TaskTree: "t1", AgentID: "spiffe://td/a"}, "", 0)))
	require.Equal(t, []string{"ls_5", "ls_6"}, sorted(ids(store.LeaseFilter{TaskTree: "t1/sub"}, "", 0)))
}

func testExpiryIndex(t *testing.T, s store.Store) {
	base := time.Now().Truncate(time.Second)
	update(t, s, func(tx store.Tx) error {
		for i, d := range []time.Duration{3, 1, 2, 5} {
			if err := tx.PutLease(lease(fmt.Sprintf("ls_%d", i), "spiffe://td/a", "t", store.LeaseActive, base.Add(d*time.Second))); err != nil {
				return err
			}
		}
		return nil
	})
	due := func(at time.Time, limit int) []string {
		var out []string
		view(t, s, func(tx store.ReadTx) error {
			ls, err := tx.ActiveLeasesExpiringBefore(at, limit)
			out = names(ls, func(l *store.Lease) string { return l.ID })
			return err
		})
		return out
	}
	require.Equal(t, []string{"ls_1", "ls_2", "ls_0"}, due(base.Add(3*time.Second), 0), "soonest first, inclusive")
	require.Equal(t, []string{"ls_1"}, due(base.Add(3*time.Second), 1))
	// Renewing moves the entry; ending removes it.
	update(t, s, func(tx store.Tx) error {
		l, _ := tx.GetLease("ls_1")
		l.ExpiresAt = base.Add(10 * time.Second)
		if err := tx.PutLease(l); err != nil {
			return err
		}
		l2, _ := tx.GetLease("ls_2")
		l2.State = store.LeaseReleased
		return tx.PutLease(l2)
	})
	require.Equal(t, []string{"ls_0"}, due(base.Add(3*time.Second), 0))
	require.Equal(t, []string{"ls_0", "ls_3", "ls_1"}, due(base.Add(time.Minute), 0))
}

func testAudit(t *testing.T, s store.Store) {
	base := time.Now().Add(-time.Hour).UTC()
	recs := []store.AuditRecord{
		{AgentID: "spiffe://td/a", Credential: "c1", TaskID: "t1", Decision: store.Allow},
		{AgentID: "spiffe://td/b", Credential: "c1", TaskID: "t2", Decision: store.Deny},
		{AgentID: "spiffe://td/a", Credential: "c2", TaskID: "t1", Decision: store.Deny},
		{Credential: "c2", Decision: store.Allow},
		{AgentID: "spiffe://td/a", Credential: "c1", TaskID: "t3", Decision: store.Allow},
	}
	update(t, s, func(tx store.Tx) error {
		for i := range recs {
			recs[i].Time = base.Add(time.Duration(i) * time.Minute)
			recs[i].Event = store.EventLeaseAcquire
			seq, err := tx.AppendAudit(&recs[i])
			if err != nil {
				return err
			}
			require.Equal(t, uint64(i+1), seq)
		}
		return nil
	})
	q := func(q store.AuditQuery) []uint64 {
		var out []uint64
		view(t, s, func(tx store.ReadTx) error {
			rs, err := tx.QueryAudit(q)
			for _, r := range rs {
				out = append(out, r.Sequence)
			}
			return err
		})
		return out
	}
	require.Equal(t, []uint64{5, 4, 3, 2, 1}, q(store.AuditQuery{}), "newest first")
	require.Equal(t, []uint64{5, 3, 1}, q(store.AuditQuery{AgentID: "spiffe://td/a"}))
	require.Equal(t, []uint64{3}, q(store.AuditQuery{AgentID: "spiffe://td/a", Decision: store.Deny}))
	require.Equal(t, []uint64{5, 1}, q(store.AuditQuery{AgentID: "spiffe://td/a", Credential: "c1"}))
	require.Equal(t, []uint64{3, 1}, q(store.AuditQuery{TaskID: "t1"}))
	require.Equal(t, []uint64{4, 3}, q(store.AuditQuery{Credential: "c2"}))
	require.Equal(t, []uint64{3, 2}, q(store.AuditQuery{Decision: store.Deny}))
	require.Equal(t, []uint64{3, 1}, q(store.AuditQuery{AgentID: "spiffe://td/a", BeforeSequence: 5}), "page below a sequence")
	require.Equal(t, []uint64{5}, q(store.AuditQuery{AgentID: "spiffe://td/a", Limit: 1}))
	require.Equal(t, []uint64{3, 2}, q(store.AuditQuery{Start: base.Add(time.Minute), End: base.Add(3 * time.Minute)}), "start inclusive, end exclusive")
	require.Equal(t, []uint64{3}, q(store.AuditQuery{AgentID: "spiffe://td/a", Start: base.Add(time.Minute), End: base.Add(4 * time.Minute)}))
	require.Empty(t, q(store.AuditQuery{Start: base.Add(time.Hour)}))
	require.Empty(t, q(store.AuditQuery{AgentID: "spiffe://td/zzz"}))
	view(t, s, func(tx store.ReadTx) error {
		last, err := tx.LastAuditSequence()
		require.NoError(t, err)
		require.Equal(t, uint64(5), last)
		rs, err := tx.QueryAudit(store.AuditQuery{Limit: 1})
		require.NoError(t, err)
		require.Equal(t, "c1", rs[0].Credential)
		require.Equal(t, store.EventLeaseAcquire, rs[0].Event)
		return nil
	})
}

func testAuditMonotonic(t *testing.T, s store.Store) {
	now := time.Now()
	var got []*store.AuditRecord
	update(t, s, func(tx store.Tx) error {
		for _, at := range []time.Time{now, now.Add(-time.Hour), {}} {
			r := &store.AuditRecord{Time: at, Event: store.EventLeaseAcquire, Decision: store.Allow}
			if _, err := tx.AppendAudit(r); err != nil {
				return err
			}
			got = append(got, r)
		}
		return nil
	})
	require.False(t, got[1].Time.Before(got[0].Time), "a clock step back does not reorder the trail")
	require.False(t, got[2].Time.IsZero(), "the engine stamps a missing time")
}

func testRollback(t *testing.T, s store.Store) {
	boom := errors.New("boom")
	err := s.Update(ctx, func(tx store.Tx) error {
		if err := tx.PutAgent(&store.Agent{ID: "spiffe://td/a"}); err != nil {
			return err
		}
		if _, err := tx.AppendAudit(&store.AuditRecord{Event: store.EventAgentRevoke}); err != nil {
			return err
		}
		return boom
	})
	require.ErrorIs(t, err, boom)
	view(t, s, func(tx store.ReadTx) error {
		_, err := tx.GetAgent("spiffe://td/a")
		require.ErrorIs(t, err, store.ErrNotFound)
		last, err := tx.LastAuditSequence()
		require.NoError(t, err)
		require.Zero(t, last, "a rolled-back append leaves no record and no gap")
		return nil
	})
}

func testCursors(t *testing.T, s store.Store) {
	view(t, s, func(tx store.ReadTx) error {
		v, err := tx.GetCursor("sink:file")
		require.NoError(t, err)
		require.Zero(t, v, "an unset cursor is 0")
		return nil
	})
	update(t, s, func(tx store.Tx) error { return tx.PutCursor("sink:file", 42) })
	update(t, s, func(tx store.Tx) error { return tx.PutCursor("sink:other", 7) })
	view(t, s, func(tx store.ReadTx) error {
		v, err := tx.GetCursor("sink:file")
		require.NoError(t, err)
		require.Equal(t, uint64(42), v)
		return nil
	})
}

func testRevocations(t *testing.T, s store.Store) {
	now := time.Now().Truncate(time.Millisecond)
	update(t, s, func(tx store.Tx) error {
		for i, at := range []time.Duration{3, 1, 2} {
			if err := tx.PutRevocation(&store.Revocation{LeaseID: fmt.Sprint("ls_", i), NextAttempt: now.Add(at * time.Second), CreatedAt: now}); err != nil {
				return err
			}
		}
		return nil
	})
	due := func(at time.Time) []string {
		var out []string
		view(t, s, func(tx store.ReadTx) error {
			rs, err := tx.DueRevocations(at, 0)
			for _, r := range rs {
				out = append(out, r.LeaseID)
			}
			return err
		})
		return out
	}
	require.Equal(t, []string{"ls_1", "ls_2"}, due(now.Add(2*time.Second)), "soonest first, inclusive")
	// A failed attempt moves it back.
	update(t, s, func(tx store.Tx) error {
		r, err := tx.GetRevocation("ls_1")
		if err != nil {
			return err
		}
		r.Attempts, r.LastError, r.NextAttempt = 1, "connection refused", now.Add(10*time.Second)
		return tx.PutRevocation(r)
	})
	require.Equal(t, []string{"ls_2", "ls_0"}, due(now.Add(5*time.Second)))
	update(t, s, func(tx store.Tx) error { return tx.DeleteRevocation("ls_2") })
	require.Equal(t, []string{"ls_0", "ls_1"}, due(now.Add(time.Minute)))
	view(t, s, func(tx store.ReadTx) error {
		r, err := tx.GetRevocation("ls_1")
		require.NoError(t, err)
		require.Equal(t, 1, r.Attempts)
		require.Equal(t, "connection refused", r.LastError)
		_, err = tx.GetRevocation("ls_2")
		require.ErrorIs(t, err, store.ErrNotFound)
		n, err := tx.PendingRevocations()
		require.NoError(t, err)
		require.Equal(t, 2, n)
		return nil
	})
	require.ErrorIs(t, s.Update(ctx, func(tx store.Tx) error { return tx.DeleteRevocation("ls_2") }), store.ErrNotFound)
}

func testClosed(t *testing.T, s store.Store) {
	require.NoError(t, s.Ready(ctx))
	require.NoError(t, s.Close())
	require.ErrorIs(t, s.View(ctx, func(store.ReadTx) error { return nil }), store.ErrClosed)
	require.ErrorIs(t, s.Update(ctx, func(store.Tx) error { return nil }), store.ErrClosed)
	require.Error(t, s.Ready(ctx))
}

func sorted(xs []string) []string {
	out := append([]string(nil), xs...)
	sort.Strings(out)
	return out
}

func names[T any](xs []T, key func(T) string) []string {
	out := []string{}
	for _, x := range xs {
		out = append(out, key(x))
	}
	return out
}

package etcd_test

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"os"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"golang.org/x/sync/errgroup"

	"github.com/stretchr/testify/require"

	"github.com/leasehold/leasehold/store"
	"github.com/leasehold/leasehold/store/etcd"
	"github.com/leasehold/leasehold/store/etcd/etcdtest"
	"github.com/leasehold/leasehold/store/storetest"
)

var prefixes atomic.Int64

// open opens a store under a fresh prefix of cluster c.
func open(t *testing.T, c *etcdtest.Cluster, mod ...func(*etcd.Config)) *etcd.Store {
	t.Helper()
	cfg := etcd.Config{Endpoints: c.Endpoints(), Prefix: fmt.Sprintf("/t%d/", prefixes.Add(1)), MaxTxnOps: 4096, MaxRequestBytes: 8 << 20}
	for _, m := range mod {
		m(&cfg)
	}
	s, err := etcd.Open(context.Background(), cfg)
	require.NoError(t, err)
	return s
}

func TestConformance(t *testing.T) {
	c := etcdtest.Start(t, etcdtest.Options{MaxTxnOps: 4096, MaxRequestBytes: 8 << 20, NoFsync: true})
	storetest.Run(t, func(t *testing.T) store.Store { return open(t, c) })
}

var ctx = context.Background()

// Two brokers' stores on one prefix, each with concurrent writers, commit
// serializably: a read-modify-write counter loses no increment and the audit
// chain has one order with no gap or fork.
func TestTwoStoresSerializable(t *testing.T) {
	c := etcdtest.Start(t, etcdtest.Options{NoFsync: true})
	a := open(t, c)
	t.Cleanup(func() { _ = a.Close() })
	prefix := fmt.Sprintf("/t%d/", prefixes.Load())
	b := open(t, c, func(cfg *etcd.Config) { cfg.Prefix = prefix })
	t.Cleanup(func() { _ = b.Close() })

	const writers, each = 6, 15
	var g errgroup.Group
	for i := range 2 * writers {
		s := a
		if i%2 == 1 {
			s = b
		}
		g.Go(func() error {
			for j := range each {
				err := s.Update(ctx, func(tx store.Tx) error {
					n, err := tx.GetCursor("counter")
					if err != nil {
						return err
					}
					if err := tx.PutCursor("counter", n+1); err != nil {
						return err
					}
					_, err = tx.AppendAudit(&store.AuditRecord{Event: store.EventLeaseAcquire, Decision: store.Allow, Actor: fmt.Sprint(i, "/", j)})
					return err
				})
				if err != nil {
					return err
				}
			}
			return nil
		})
	}
	require.NoError(t, g.Wait())
	total := uint64(2 * writers * each)
	require.NoError(t, b.View(ctx, func(tx store.ReadTx) error {
		n, err := tx.GetCursor("counter")
		require.NoError(t, err)
		require.Equal(t, total, n, "no increment lost")
		recs, err := tx.QueryAudit(store.AuditQuery{Ascending: true})
		require.NoError(t, err)
		require.Len(t, recs, int(total))
		for i, r := range recs {
			require.Equal(t, uint64(i+1), r.Sequence, "sequences are dense")
			require.Equal(t, store.AuditHash(r), r.Hash)
			if i > 0 {
				require.Equal(t, recs[i-1].Hash, r.PrevHash, "one chain, no fork at %d", r.Sequence)
				require.False(t, r.Time.Before(recs[i-1].Time))
			}
		}
		return nil
	}))
	sa, sb := a.CommitStats(), b.CommitStats()
	t.Logf("commits %d+%d for %d updates, conflicts %d+%d", sa.Commits, sb.Commits, total, sa.Conflicts, sb.Conflicts)
	require.Equal(t, total, sa.Calls+sb.Calls)
}

// An Update too large for one etcd Txn fails whole, naming the setting, and
// changes nothing; smaller ones still commit.
func TestTxnTooLarge(t *testing.T) {
	c := etcdtest.Start(t, etcdtest.Options{NoFsync: true})
	s := open(t, c, func(cfg *etcd.Config) { cfg.MaxTxnOps = 16 })
	t.Cleanup(func() { _ = s.Close() })
	err := s.Update(ctx, func(tx store.Tx) error { return putCursors(tx, "c", 20, 1) })
	require.ErrorIs(t, err, etcd.ErrTxnTooLarge)
	require.ErrorContains(t, err, "max_txn_ops 16")
	require.NoError(t, s.Update(ctx, func(tx store.Tx) error { return tx.PutCursor("small", 7) }))
	require.NoError(t, s.View(ctx, func(tx store.ReadTx) error {
		v, err := tx.GetCursor("c0")
		require.NoError(t, err)
		require.Zero(t, v, "nothing of the refused Update was written")
		v, err = tx.GetCursor("small")
		require.NoError(t, err)
		require.Equal(t, uint64(7), v)
		return nil
	}))
}

// Group commit cuts a group before the call that overflows it.
func TestGroupCutToFit(t *testing.T) {
	c := etcdtest.Start(t, etcdtest.Options{NoFsync: true})
	s := open(t, c, func(cfg *etcd.Config) { cfg.MaxTxnOps = 24 })
	t.Cleanup(func() { _ = s.Close() })
	manySmallUpdates(t, s)
}

// putCursors writes n cursors, prefix0 to prefix(n-1), each set to v.
func putCursors(tx store.Tx, prefix string, n int, v uint64) error {
	for i := range n {
		if err := tx.PutCursor(fmt.Sprint(prefix, i), v); err != nil {
			return err
		}
	}
	return nil
}

// manySmallUpdates runs 64 concurrent Updates of four writes each, enough
// to queue into groups over small Txn limits, and checks every one landed.
func manySmallUpdates(t *testing.T, s store.Store) {
	t.Helper()
	var g errgroup.Group
	for i := range 64 {
		g.Go(func() error {
			return s.Update(ctx, func(tx store.Tx) error { return putCursors(tx, fmt.Sprint("g", i, "-"), 4, uint64(i)) })
		})
	}
	require.NoError(t, g.Wait())
	require.NoError(t, s.View(ctx, func(tx store.ReadTx) error {
		for i := range 64 {
			v, err := tx.GetCursor(fmt.Sprint("g", i, "-3"))
			require.NoError(t, err)
			require.Equal(t, uint64(i), v)
		}
		return nil
	}))
}

// A prefix written by a newer schema is refused.
func TestSchemaRefused(t *testing.T) {
	c := etcdtest.Start(t, etcdtest.Options{NoFsync: true})
	s := open(t, c)
	prefix := fmt.Sprintf("/t%d/", prefixes.Load())
	_, err := s.Client().Put(ctx, prefix+"meta/schema_version", string([]byte{0, 0, 0, 0, 0, 0, 0, 99}))
	require.NoError(t, err)
	require.NoError(t, s.Close())
	_, err = etcd.Open(ctx, etcd.Config{Endpoints: c.Endpoints(), Prefix: prefix})
	require.ErrorIs(t, err, store.ErrSchema)
}

func TestConfigValidate(t *testing.T) {
	for _, cfg := range []etcd.Config{
		{},
		{Endpoints: []string{"http://x"}, Prefix: "no-slash"},
		{Endpoints: []string{"http://x"}, LeaderTTL: time.Millisecond},
		{Endpoints: []string{"http://x"}, MaxTxnOps: -1},
	} {
		require.Error(t, cfg.Validate(), "%+v", cfg)
	}
}

// One of two stores leads; when it resigns the other takes over; when the
// leader's process dies (its client closes without resigning) the other
// takes over once the session lease runs out.
func TestLeaderElection(t *testing.T) {
	c := etcdtest.Start(t, etcdtest.Options{NoFsync: true})
	ttl := func(cfg *etcd.Config) { cfg.LeaderTTL = time.Second }
	a := open(t, c, ttl)
	prefix := fmt.Sprintf("/t%d/", prefixes.Load())
	same := func(cfg *etcd.Config) { cfg.Prefix = prefix; cfg.LeaderTTL = time.Second }
	b := open(t, c, same)
	t.Cleanup(func() { _ = b.Close() })

	ledA, resignA, err := a.Lead(ctx)
	require.NoError(t, err)
	gotB := make(chan context.Context, 1)
	go func() {
		// B never resigns: it dies below, which is the point.
		if led, _, err := b.Lead(ctx); err == nil {
			gotB <- led
		}
	}()
	select {
	case <-gotB:
		t.Fatal("two leaders at once")
	case <-time.After(500 * time.Millisecond):
	}
	resignA()
	require.Error(t, ledA.Err(), "the resigned leader's context ends")
	var ledB context.Context
	select {
	case ledB = <-gotB:
	case <-time.After(5 * time.Second):
		t.Fatal("no takeover after resign")
	}
	require.NoError(t, ledB.Err())

	// B now dies without resigning; a third store takes over after the TTL.
	third := open(t, c, same)
	t.Cleanup(func() { _ = third.Close() })
	start := time.Now()
	go func() { time.Sleep(200 * time.Millisecond); _ = b.Client().Close() }()
	lctx, cancel := context.WithTimeout(ctx, 15*time.Second)
	defer cancel()
	led3, resign3, err := third.Lead(lctx)
	require.NoError(t, err, "takeover after the leader's client vanished")
	defer resign3()
	t.Logf("takeover after %s", time.Since(start).Round(time.Millisecond))
	require.NoError(t, led3.Err())
	require.NoError(t, a.Close())
}

// A three-member cluster loses one member: writes and reads go on, and
// nothing committed before is lost.
func TestMemberFailure(t *testing.T) {
	c := etcdtest.Start(t, etcdtest.Options{Members: 3, NoFsync: true})
	s := open(t, c, func(cfg *etcd.Config) { cfg.RequestTimeout = 2 * time.Second })
	t.Cleanup(func() { _ = s.Close() })
	put := func(i int) error {
		return s.Update(ctx, func(tx store.Tx) error { return tx.PutCursor(fmt.Sprint("k", i), uint64(i)) })
	}
	for i := range 20 {
		require.NoError(t, put(i))
	}
	c.Kill(0) // the first endpoint, which the client is most likely using
	deadline := time.Now().Add(20 * time.Second)
	for i := 20; i < 40; i++ {
		for {
			err := put(i)
			if err == nil {
				break
			}
			require.True(t, time.Now().Before(deadline), "writes did not resume: %v", err)
			time.Sleep(100 * time.Millisecond)
		}
	}
	require.NoError(t, s.View(ctx, func(tx store.ReadTx) error {
		for i := range 40 {
			v, err := tx.GetCursor(fmt.Sprint("k", i))
			require.NoError(t, err)
			require.Equal(t, uint64(i), v)
		}
		return nil
	}))
}

// The read cache never answers with a value another broker has changed:
// every read after the other's Update returned sees the new value, while
// values nobody changed are answered from the cache.
func TestReadCacheNeverStale(t *testing.T) {
	c := etcdtest.Start(t, etcdtest.Options{NoFsync: true})
	a := open(t, c)
	t.Cleanup(func() { _ = a.Close() })
	prefix := fmt.Sprintf("/t%d/", prefixes.Load())
	b := open(t, c, func(cfg *etcd.Config) { cfg.Prefix = prefix })
	t.Cleanup(func() { _ = b.Close() })
	require.NoError(t, a.Update(ctx, func(tx store.Tx) error { return tx.PutCursor("still", 42) }))
	for i := range 200 {
		require.NoError(t, b.Update(ctx, func(tx store.Tx) error { return tx.PutCursor("moving", uint64(i+1)) }))
		check := func(tx store.ReadTx) error {
			v, err := tx.GetCursor("moving")
			require.NoError(t, err)
			require.Equal(t, uint64(i+1), v, "read %d saw another broker's earlier value", i)
			v, err = tx.GetCursor("still")
			require.NoError(t, err)
			require.Equal(t, uint64(42), v)
			return nil
		}
		require.NoError(t, a.View(ctx, check))
		require.NoError(t, a.Update(ctx, func(tx store.Tx) error { return check(tx) }))
	}
	st := a.CommitStats()
	t.Logf("cache: %d hits, %d misses", st.CacheHits, st.CacheMisses)
	require.Greater(t, st.CacheHits, uint64(200), "unchanged values come from the cache")
}

// A broker whose transactions run slowly is not starved by a busy one: it
// takes the write lock after losing races, and its Updates finish.
func TestSlowWriterNotStarved(t *testing.T) {
	c := etcdtest.Start(t, etcdtest.Options{NoFsync: true})
	slow := open(t, c)
	t.Cleanup(func() { _ = slow.Close() })
	prefix := fmt.Sprintf("/t%d/", prefixes.Load())
	busy := open(t, c, func(cfg *etcd.Config) { cfg.Prefix = prefix })
	t.Cleanup(func() { _ = busy.Close() })

	stop := make(chan struct{})
	var g errgroup.Group
	for i := range 8 {
		g.Go(func() error {
			for n := 0; ; n++ {
				select {
				case <-stop:
					return nil
				default:
				}
				if err := busy.Update(ctx, func(tx store.Tx) error { return tx.PutCursor(fmt.Sprint("busy", i), uint64(n)) }); err != nil {
					return err
				}
			}
		})
	}
	done := make(chan error, 1)
	go func() {
		for i := range 20 {
			err := slow.Update(ctx, func(tx store.Tx) error {
				if _, err := tx.GetCursor("slow"); err != nil {
					return err
				}
				time.Sleep(5 * time.Millisecond) // a long transaction
				return tx.PutCursor("slow", uint64(i))
			})
			if err != nil {
				done <- err
				return
			}
		}
		done <- nil
	}()
	select {
	case err := <-done:
		require.NoError(t, err)
	case <-time.After(30 * time.Second):
		t.Fatal("the slow writer starved")
	}
	close(stop)
	require.NoError(t, g.Wait())
	require.Positive(t, slow.CommitStats().Locked, "it won by taking the write lock")
}

// With mutual TLS the broker reaches etcd with its client certificate; a
// client without one is refused.
func TestMutualTLS(t *testing.T) {
	c := etcdtest.Start(t, etcdtest.Options{NoFsync: true, MutualTLS: true})
	files := c.TLS()
	pool := x509.NewCertPool()
	caPEM, err := os.ReadFile(files.CAFile)
	require.NoError(t, err)
	require.True(t, pool.AppendCertsFromPEM(caPEM))
	cert, err := tls.LoadX509KeyPair(files.CertFile, files.KeyFile)
	require.NoError(t, err)
	for _, e := range c.Endpoints() {
		require.True(t, strings.HasPrefix(e, "https://"), e)
	}

	s, err := etcd.Open(ctx, etcd.Config{Endpoints: c.Endpoints(), TLS: &tls.Config{RootCAs: pool, Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}})
	require.NoError(t, err)
	require.NoError(t, s.Update(ctx, func(tx store.Tx) error { return tx.PutCursor("tls", 1) }))
	require.NoError(t, s.Close())

	octx, cancel := context.WithTimeout(ctx, 3*time.Second)
	defer cancel()
	_, err = etcd.Open(octx, etcd.Config{Endpoints: c.Endpoints(), DialTimeout: 2 * time.Second, TLS: &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}})
	require.Error(t, err, "no client certificate, no access")
}

// With etcd authentication on, a user whose role may read and write only
// the prefix is enough for everything a broker does there: records, the
// commit key, writer markers, the write lock and the leader election.
func TestAuthPrefixOnly(t *testing.T) {
	c := etcdtest.Start(t, etcdtest.Options{NoFsync: true})
	root, err := clientv3.New(clientv3.Config{Endpoints: c.Endpoints(), DialTimeout: 5 * time.Second})
	require.NoError(t, err)
	defer root.Close()
	_, err = root.RoleAdd(ctx, "root")
	require.NoError(t, err)
	_, err = root.UserAdd(ctx, "root", "root-pw")
	require.NoError(t, err)
	_, err = root.UserGrantRole(ctx, "root", "root")
	require.NoError(t, err)
	_, err = root.RoleAdd(ctx, "leasehold")
	require.NoError(t, err)
	_, err = root.RoleGrantPermission(ctx, "leasehold", "/lh/", clientv3.GetPrefixRangeEnd("/lh/"), clientv3.PermissionType(clientv3.PermReadWrite))
	require.NoError(t, err)
	_, err = root.UserAdd(ctx, "leasehold", "lh-pw")
	require.NoError(t, err)
	_, err = root.UserGrantRole(ctx, "leasehold", "leasehold")
	require.NoError(t, err)
	_, err = root.AuthEnable(ctx)
	require.NoError(t, err)

	cfg := etcd.Config{Endpoints: c.Endpoints(), Prefix: "/lh/", Username: "leasehold", Password: "lh-pw", LeaderTTL: time.Second}
	a, err := etcd.Open(ctx, cfg)
	require.NoError(t, err)
	defer a.Close()
	b, err := etcd.Open(ctx, cfg)
	require.NoError(t, err)
	defer b.Close()
	var g errgroup.Group
	for i := range 8 {
		s := a
		if i%2 == 1 {
			s = b
		}
		g.Go(func() error {
			for j := range 10 {
				if err := s.Update(ctx, func(tx store.Tx) error {
					_, err := tx.AppendAudit(&store.AuditRecord{Event: store.EventLeaseAcquire, Actor: fmt.Sprint(i, j)})
					return err
				}); err != nil {
					return err
				}
			}
			return nil
		})
	}
	require.NoError(t, g.Wait())
	led, resign, err := a.Lead(ctx)
	require.NoError(t, err)
	require.NoError(t, led.Err())
	resign()

	_, err = etcd.Open(ctx, etcd.Config{Endpoints: c.Endpoints(), Prefix: "/other/", Username: "leasehold", Password: "lh-pw"})
	require.Error(t, err, "outside its prefix the user may do nothing")
}

// When the cluster's own Txn limit is below the store's max_txn_ops, etcd
// refuses the Txn: a group is split until it fits, and one Update that
// alone is too large fails with store.ErrTooLarge saying which side to fix,
// instead of being retried forever.
func TestClusterLimitBelowStores(t *testing.T) {
	c := etcdtest.Start(t, etcdtest.Options{NoFsync: true}) // etcd's default: 128 operations
	s := open(t, c, func(cfg *etcd.Config) { cfg.MaxTxnOps = 4096 })
	t.Cleanup(func() { _ = s.Close() })
	err := s.Update(ctx, func(tx store.Tx) error { return putCursors(tx, "big", 200, 1) })
	require.ErrorIs(t, err, store.ErrTooLarge)
	require.ErrorContains(t, err, "the cluster's --max-txn-ops")
	require.NoError(t, s.View(ctx, func(tx store.ReadTx) error {
		v, err := tx.GetCursor("big0")
		require.NoError(t, err)
		require.Zero(t, v, "nothing of the refused Update was written")
		return nil
	}))
	// Groups over etcd's limit are split until they fit.
	manySmallUpdates(t, s)
}

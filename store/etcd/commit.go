package etcd

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	mrand "math/rand/v2"
	"sync/atomic"
	"time"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/client/v3/concurrency"

	"github.com/leasehold/leasehold/store"
	"github.com/leasehold/leasehold/store/internal/kv"
)

// Group commit with optimistic concurrency.
//
// Every Update is handed to one writer goroutine, which takes the first
// waiting call at once and then everything queued behind it (as the bbolt
// engine does), runs their closures one after the other on one snapshot,
// and commits their writes in one etcd Txn whose compare on the commit key
// fails if any broker committed since the snapshot. On that conflict the
// whole group runs again on a fresh snapshot; closures may run more than
// once (store.Store.Update says so).
//
// A closure that fails leaves partial writes in the shared buffer, so the
// group is thrown away: a failure of the first closure is its answer, and
// the others run again without it. A group whose writes outgrow the Txn
// limits is cut before the closure that overflowed it.
//
// Optimism alone starves: with two brokers under load, the one whose groups
// take longer to run loses every race. A writer that loses escalateAfter
// races in a row takes the write lock (an etcd mutex, FIFO among waiters,
// held through a session lease so a crashed holder frees it), and while
// anyone holds or waits for it, optimistic commits fail (their Txn also
// compares that the lock is free). Contended brokers so take turns; an
// uncontended one never touches the lock.
//
// An etcd request that fails (a member died, a timeout) may still have been
// applied. Each Txn also writes a marker key owned by this writer, holding
// the Txn's id; after such a failure the writer reads the marker to learn
// whether the Txn took effect, so a caller is never told that a commit
// failed when it happened, nor the reverse.

// maxBatch bounds the calls in one group.
const maxBatch = 256

// escalateAfter is how many races in a row a writer loses before it takes
// the write lock.
const escalateAfter = 2

// maxFailures is how many commits of a group in a row may fail unapplied
// (not a lost race) before its callers get the error.
const maxFailures = 3

// errConflict: another commit came between the snapshot and the Txn.
var errConflict = errors.New("etcd: another commit came first")

// ErrTxnTooLarge is returned by an Update whose writes alone exceed the
// configured MaxTxnOps or MaxRequestBytes.
var ErrTxnTooLarge = fmt.Errorf("etcd: %w", store.ErrTooLarge)

type call struct {
	fn   func(store.Tx) error
	done chan error
}

// CommitStats counts the writer's work since Open.
type CommitStats struct {
	Calls     uint64 // Update calls answered
	Commits   uint64 // etcd Txns that applied
	Conflicts uint64 // Txns refused because another commit came first
	Unknown   uint64 // Txns whose outcome had to be read back after an error
	Reads     uint64 // reads from etcd by transactions (View and Update)
	Locked    uint64 // groups committed under the write lock
	// CacheHits and CacheMisses count point reads the read cache answered
	// and those it sent to etcd.
	CacheHits, CacheMisses uint64
}

type commitCounters struct{ calls, commits, conflicts, unknown, reads, locked atomic.Uint64 }

// CommitStats reports the writer's counters.
func (s *Store) CommitStats() CommitStats {
	var hits, misses uint64
	if c := s.cache; c != nil {
		c.mu.Lock()
		hits, misses = c.hits, c.misses
		c.mu.Unlock()
	}
	return CommitStats{CacheHits: hits, CacheMisses: misses, Calls: s.stats.calls.Load(), Commits: s.stats.commits.Load(),
		Conflicts: s.stats.conflicts.Load(), Unknown: s.stats.unknown.Load(), Reads: s.stats.reads.Load(), Locked: s.stats.locked.Load()}
}

// Update implements store.Store. It returns once a quorum of etcd members
// holds fn's writes, or with fn's own error.
func (s *Store) Update(ctx context.Context, fn func(store.Tx) error) error {
	if s.closed.Load() {
		return store.ErrClosed
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	c := &call{fn: fn, done: make(chan error, 1)}
	select {
	case s.queue <- c:
	case <-s.quit:
		return store.ErrClosed
	case <-ctx.Done():
		return ctx.Err()
	}
	return <-c.done
}

func (s *Store) writer() {
	defer close(s.writerDone)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() { <-s.quit; cancel() }()
	marker := s.prefix + "writers/" + randomID()
	batch := make([]*call, 0, maxBatch)
	for {
		select {
		case c := <-s.queue:
			batch = append(batch[:0], c)
		case <-s.quit:
			s.dropMarker(marker)
			return
		}
	gather:
		for len(batch) < maxBatch {
			select {
			case c := <-s.queue:
				batch = append(batch, c)
			default:
				break gather
			}
		}
		var held *concurrency.Mutex
		for conflicts, failures, limit := 0, 0, len(batch); len(batch) > 0; {
			if conflicts >= escalateAfter && held == nil {
				held = s.lockWrites(ctx)
			}
			n, cut, retry := s.attempt(ctx, marker, batch[:min(limit, len(batch))], held)
			if cut > 0 {
				limit = cut // run the calls before the one that failed alone
				continue
			}
			limit = len(batch)
			batch = batch[n:]
			switch {
			case retry == nil:
				conflicts, failures = 0, 0
			case errors.Is(retry, errConflict):
				// Another broker committed first: back off a little, with
				// jitter, so two writers do not keep colliding.
				conflicts++
				if held == nil {
					// Jitter only spreads retries; it need not be unpredictable.
					time.Sleep(time.Duration(mrand.Int64N(int64(min(conflicts, 8)) * int64(time.Millisecond)))) // #nosec G404
				}
			default:
				// The commit was refused without being applied (a member
				// went away, a leader changed): try again a few times, then
				// give the callers the error.
				if failures++; failures >= maxFailures {
					for _, c := range batch {
						s.finish(c, retry)
					}
					batch = batch[:0]
					continue
				}
				time.Sleep(100 * time.Millisecond)
			}
		}
		if held != nil {
			s.unlockWrites(held)
		}
		clear(batch)
	}
}

// attempt runs batch on one snapshot and commits it. It returns how many
// calls at the front it answered; or, with none answered, why the batch is
// to run again (errConflict: another commit came first; any other error: the
// commit failed without being applied); or, when a call after the first
// failed, cut: the number of calls before it, to be run again on their own.
func (s *Store) attempt(ctx context.Context, marker string, batch []*call, held *concurrency.Mutex) (answered, cut int, retry error) {
	rev, commitRev, err := s.snapshot(ctx)
	if err != nil {
		// No snapshot, no progress for anyone in the group: answer all of
		// them rather than wait out a timeout for each.
		for _, c := range batch {
			s.finish(c, err)
		}
		return len(batch), 0, nil
	}
	t := newTxn(ctx, s, rev, commitRev, true)
	tx := kv.NewTx(t)
	for i, c := range batch {
		err := run(c.fn, tx)
		if err == nil {
			err = s.checkSize(t)
		}
		if err == nil {
			continue
		}
		if i == 0 {
			s.finish(c, err)
			return 1, 0, nil
		}
		// Its partial writes are in the buffer: run the calls before it
		// again on their own (it runs after them).
		return 0, i, nil
	}
	id := randomID()
	ops := append(t.ops(), clientv3.OpPut(s.commitKey(), id), clientv3.OpPut(marker, id))
	cmps := []clientv3.Cmp{clientv3.Compare(clientv3.ModRevision(s.commitKey()), "=", commitRev)}
	if held != nil {
		cmps = append(cmps, held.IsOwner())
	} else {
		cmps = append(cmps, clientv3.Compare(clientv3.CreateRevision(s.lockPrefix()).WithPrefix(), "=", 0))
	}
	tctx, cancel := context.WithTimeout(ctx, s.cfg.RequestTimeout)
	resp, err := s.cli.Txn(tctx).If(cmps...).Then(ops...).Commit()
	cancel()
	if err == nil && !resp.Succeeded {
		s.stats.conflicts.Add(1)
		return 0, 0, errConflict
	}
	if err != nil {
		s.stats.unknown.Add(1)
		applied, rerr := s.applied(ctx, marker, id, err)
		switch {
		case rerr != nil:
			for _, c := range batch {
				s.finish(c, rerr)
			}
			return len(batch), 0, nil
		case !applied && (errors.Is(err, rpctypes.ErrTooManyOps) || errors.Is(err, rpctypes.ErrRequestTooLarge)):
			if len(batch) > 1 {
				return 0, len(batch) / 2, nil // a smaller group may fit
			}
			s.finish(batch[0], fmt.Errorf("%w: etcd refused it (%w): the cluster's --max-txn-ops or --max-request-bytes is below the store's max_txn_ops %d or max_request_bytes %d",
				store.ErrTooLarge, err, s.cfg.MaxTxnOps, s.cfg.MaxRequestBytes))
			return 1, 0, nil
		case !applied:
			return 0, 0, fmt.Errorf("etcd: commit: %w", err)
		}
	}
	s.stats.commits.Add(1)
	for _, c := range batch {
		s.finish(c, nil)
	}
	return len(batch), 0, nil
}

// checkSize fails when the buffered writes no longer fit one etcd Txn.
func (s *Store) checkSize(t *txn) error {
	ops, size := t.writeCount()+2, t.size()
	if ops > s.cfg.MaxTxnOps || size > s.cfg.MaxRequestBytes {
		return fmt.Errorf("%w: %d operations and %d bytes, over the store's max_txn_ops %d or max_request_bytes %d (raise them with etcd's --max-txn-ops and --max-request-bytes)",
			ErrTxnTooLarge, ops, size, s.cfg.MaxTxnOps, s.cfg.MaxRequestBytes)
	}
	return nil
}

// applied learns, after a Txn failed with txnErr, whether it was applied:
// the writer's marker holds the id of the last Txn that was. It reads until
// the cluster answers or the store closes.
func (s *Store) applied(ctx context.Context, marker, id string, txnErr error) (bool, error) {
	deadline := time.Now().Add(4 * s.cfg.RequestTimeout)
	for {
		rctx, cancel := context.WithTimeout(ctx, s.cfg.RequestTimeout)
		resp, err := s.cli.Get(rctx, marker)
		cancel()
		if err == nil {
			return len(resp.Kvs) > 0 && string(resp.Kvs[0].Value) == id, nil
		}
		if ctx.Err() != nil || time.Now().After(deadline) {
			return false, fmt.Errorf("etcd: commit outcome unknown: %w", errors.Join(
				fmt.Errorf("commit failed: %w", txnErr), fmt.Errorf("reading it back failed: %w", err)))
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func (s *Store) lockPrefix() string { return s.prefix + "writelock/" }

// lockWrites takes the write lock, or returns nil when it cannot (the
// writer then stays optimistic).
func (s *Store) lockWrites(ctx context.Context) *concurrency.Mutex {
	if s.lockSession != nil {
		select {
		case <-s.lockSession.Done(): // its lease expired: start another
			s.lockSession = nil
		default:
		}
	}
	if s.lockSession == nil {
		sess, err := concurrency.NewSession(s.cli, concurrency.WithTTL(max(int(s.cfg.LeaderTTL.Seconds()), 1)), concurrency.WithContext(ctx))
		if err != nil {
			return nil
		}
		s.lockSession = sess
	}
	m := concurrency.NewMutex(s.lockSession, s.lockPrefix())
	lctx, cancel := context.WithTimeout(ctx, 2*s.cfg.RequestTimeout)
	defer cancel()
	if err := m.Lock(lctx); err != nil {
		return nil
	}
	s.stats.locked.Add(1)
	return m
}

func (s *Store) unlockWrites(m *concurrency.Mutex) {
	ctx, cancel := context.WithTimeout(context.Background(), s.cfg.RequestTimeout)
	defer cancel()
	_ = m.Unlock(ctx)
}

func (s *Store) dropMarker(marker string) {
	ctx, cancel := context.WithTimeout(context.Background(), s.cfg.RequestTimeout)
	defer cancel()
	_, _ = s.cli.Delete(ctx, marker)
	if s.lockSession != nil {
		_ = s.lockSession.Close()
	}
}

func (s *Store) finish(c *call, err error) {
	s.stats.calls.Add(1)
	c.done <- err
}

// run calls fn, turning a panic into an error for its caller: the writer
// serves every request and must not die with one.
func run(fn func(store.Tx) error, tx store.Tx) (err error) {
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("etcd: update closure panicked: %v", r)
		}
	}()
	return fn(tx)
}

func randomID() string {
	b := make([]byte, 12)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

package bolt

import (
	"context"
	"fmt"
	"sync/atomic"

	bbolt "go.etcd.io/bbolt"

	"github.com/leasehold/leasehold/store"
	"github.com/leasehold/leasehold/store/internal/kv"
)

// Group commit.
//
// bbolt has one writer and every commit is an fsync (~1.3 ms on the CI
// disk), so a broker that committed each request on its own would top out at
// a few hundred acquires a second however many agents asked. Instead every
// Update is handed to one writer goroutine. When the writer is idle it takes
// the first request at once (no fixed delay that would idle the disk), then
// everything that queued up behind it, runs all of their closures in one
// bbolt transaction and commits it with one fsync. While that fsync runs the
// next batch gathers, so under load a batch holds roughly the requests that
// arrived during the previous commit. Each caller returns only after the
// commit that holds its writes is durable.
//
// A closure that fails would leave its partial writes in the shared
// transaction, so the transaction is rolled back, the failing call runs
// alone in a transaction of its own (its answer is authoritative), and the
// others run again as a new batch. Closures therefore may run more than once
// (see store.Store.Update), exactly as with bbolt's own Batch.

// maxBatch bounds the calls in one transaction so one commit's dirty pages
// stay small.
const maxBatch = 512

type call struct {
	fn   func(store.Tx) error
	done chan error
}

// CommitStats counts the writer's work since Open.
type CommitStats struct {
	// Calls is the number of Update calls that finished.
	Calls uint64
	// Commits is the number of bbolt write transactions the writer ran for
	// them (one fsync each, unless rolled back).
	Commits uint64
	// Retries is the number of batches rolled back because a closure failed.
	Retries uint64
	// PagesWritten is the number of pages bbolt wrote (all transactions).
	PagesWritten int64
}

type commitCounters struct{ calls, commits, retries atomic.Uint64 }

// CommitStats reports how many Update calls shared each commit.
func (s *Store) CommitStats() CommitStats {
	st := s.db.Stats()
	return CommitStats{Calls: s.stats.calls.Load(), Commits: s.stats.commits.Load(), Retries: s.stats.retries.Load(),
		PagesWritten: st.TxStats.GetWrite()}
}

// Update implements store.Store. It returns once the transaction holding
// fn's writes is durable, or fn's own error.
func (s *Store) Update(ctx context.Context, fn func(store.Tx) error) error {
	if s.closed.Load() {
		return store.ErrClosed
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	c := &call{fn: fn, done: make(chan error, 1)}
	s.waiting.Add(1)
	select {
	case s.queue <- c:
		s.waiting.Add(-1)
	case <-s.quit:
		s.waiting.Add(-1)
		return store.ErrClosed
	case <-ctx.Done():
		s.waiting.Add(-1)
		return ctx.Err()
	}
	// Once the writer holds the call it runs; wait for the outcome even if
	// ctx ends, so the caller never mistakes a commit for a failure.
	return <-c.done
}

// writer is the only goroutine that writes to the file after Open.
func (s *Store) writer() {
	defer close(s.writerDone)
	batch := make([]*call, 0, maxBatch)
	for {
		select {
		case c := <-s.queue:
			batch = append(batch[:0], c)
		case <-s.quit:
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
		s.commit(batch)
		clear(batch)
	}
}

// commit runs batch in as few transactions as its failures allow and answers
// every call in it.
func (s *Store) commit(batch []*call) {
	for len(batch) > 0 {
		if len(batch) == 1 {
			s.finish(batch[0], s.tx(func(tx *bbolt.Tx) error { return run(batch[0].fn, tx) }))
			return
		}
		failed := -1
		err := s.tx(func(tx *bbolt.Tx) error {
			for i, c := range batch {
				if err := run(c.fn, tx); err != nil {
					failed = i
					return err
				}
			}
			return nil
		})
		if failed < 0 {
			// Committed, or the commit itself failed: either way the
			// answer is the same for every call in the batch.
			for _, c := range batch {
				s.finish(c, err)
			}
			return
		}
		s.stats.retries.Add(1)
		solo := batch[failed]
		s.finish(solo, s.tx(func(tx *bbolt.Tx) error { return run(solo.fn, tx) }))
		batch = append(batch[:failed], batch[failed+1:]...)
	}
}

// tx runs one bbolt write transaction.
func (s *Store) tx(fn func(*bbolt.Tx) error) error {
	s.stats.commits.Add(1)
	return s.db.Update(fn)
}

func (s *Store) finish(c *call, err error) {
	s.stats.calls.Add(1)
	c.done <- err
}

// run calls fn, turning a panic into an error for its caller: the writer
// serves every request and must not die with one.
func run(fn func(store.Tx) error, tx *bbolt.Tx) (err error) {
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("bolt: update closure panicked: %v", r)
		}
	}()
	return fn(kv.NewTx(boltTxn{tx}))
}

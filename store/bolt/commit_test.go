package bolt

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/leasehold/leasehold/store"
)

// holdWriter occupies the writer with a closure that blocks until the
// returned release is called, and waits until n further Update calls are
// queued behind it, so they are sure to share the next transaction.
func holdWriter(t *testing.T, s *Store, n int, start func()) (release func()) {
	t.Helper()
	held, gate := make(chan struct{}), make(chan struct{})
	go func() {
		_ = s.Update(context.Background(), func(store.Tx) error {
			close(held)
			<-gate
			return nil
		})
	}()
	<-held
	start()
	require.Eventually(t, func() bool { return s.waiting.Load() == int64(n) }, 10*time.Second, time.Millisecond)
	return func() { close(gate) }
}

func putAgent(id string) func(store.Tx) error {
	return func(tx store.Tx) error { return tx.PutAgent(&store.Agent{ID: id, FirstSeen: time.Unix(1, 0)}) }
}

func openTest(t *testing.T) *Store {
	s, err := Open(Config{Path: filepath.Join(t.TempDir(), "leasehold.db")})
	require.NoError(t, err)
	t.Cleanup(func() { _ = s.Close() })
	return s
}

func TestGroupCommitSharesOneTransaction(t *testing.T) {
	s := openTest(t)
	const n = 64
	var wg sync.WaitGroup
	errs := make([]error, n)
	before := s.CommitStats()
	release := holdWriter(t, s, n, func() {
		for i := range n {
			wg.Go(func() { errs[i] = s.Update(context.Background(), putAgent(fmt.Sprintf("spiffe://td/a%d", i))) })
		}
	})
	release()
	wg.Wait()
	for _, err := range errs {
		require.NoError(t, err)
	}
	st := s.CommitStats()
	require.Equal(t, uint64(n+1), st.Calls-before.Calls)
	require.Equal(t, uint64(2), st.Commits-before.Commits, "the holder's commit, then one shared by all queued calls")
	require.NoError(t, s.View(context.Background(), func(tx store.ReadTx) error {
		agents, err := tx.ListAgents("", 0)
		require.Len(t, agents, n)
		return err
	}))
}

func TestGroupCommitIsolatesFailures(t *testing.T) {
	s := openTest(t)
	const n = 30
	var wg sync.WaitGroup
	errs := make([]error, n)
	errMine := errors.New("closure refused")
	release := holdWriter(t, s, n, func() {
		for i := range n {
			id := fmt.Sprintf("spiffe://td/a%d", i)
			wg.Go(func() {
				errs[i] = s.Update(context.Background(), func(tx store.Tx) error {
					if err := putAgent(id)(tx); err != nil {
						return err
					}
					switch {
					case i == 7:
						panic("boom")
					case i%3 == 0:
						return fmt.Errorf("agent %d: %w", i, errMine) // after writing
					}
					return nil
				})
			})
		}
	})
	release()
	wg.Wait()
	require.NoError(t, s.View(context.Background(), func(tx store.ReadTx) error {
		for i := range n {
			_, err := tx.GetAgent(fmt.Sprintf("spiffe://td/a%d", i))
			switch {
			case i == 7:
				require.ErrorContains(t, errs[i], "panicked")
				require.ErrorIs(t, err, store.ErrNotFound, "a panicking closure's writes are rolled back")
			case i%3 == 0:
				require.ErrorIs(t, errs[i], errMine, "a failing closure gets its own error")
				require.ErrorIs(t, err, store.ErrNotFound, "a failing closure's writes are rolled back")
			default:
				require.NoError(t, errs[i], "a failure elsewhere in the batch does not fail call %d", i)
				require.NoError(t, err, "call %d's writes are committed", i)
			}
		}
		return nil
	}))
	require.Positive(t, s.CommitStats().Retries, "the failures happened inside a shared batch")
	// The writer survived the panic.
	require.NoError(t, s.Update(context.Background(), putAgent("spiffe://td/after")))
}

func TestCloseAnswersEveryQueuedCall(t *testing.T) {
	path := filepath.Join(t.TempDir(), "leasehold.db")
	s, err := Open(Config{Path: path})
	require.NoError(t, err)
	const n = 20
	var wg sync.WaitGroup
	errs := make([]error, n)
	release := holdWriter(t, s, n, func() {
		for i := range n {
			wg.Go(func() { errs[i] = s.Update(context.Background(), putAgent(fmt.Sprintf("spiffe://td/a%d", i))) })
		}
	})
	closed := make(chan error)
	go func() { closed <- s.Close() }()
	require.Eventually(t, func() bool { return s.closed.Load() }, 10*time.Second, time.Millisecond)
	release()
	require.NoError(t, <-closed)
	wg.Wait() // every caller was answered

	re, err := Open(Config{Path: path})
	require.NoError(t, err)
	defer re.Close()
	require.NoError(t, re.View(context.Background(), func(tx store.ReadTx) error {
		for i := range n {
			_, err := tx.GetAgent(fmt.Sprintf("spiffe://td/a%d", i))
			if errs[i] == nil {
				require.NoError(t, err, "call %d was answered as committed, so it is on disk", i)
			} else {
				require.ErrorIs(t, errs[i], store.ErrClosed)
				require.ErrorIs(t, err, store.ErrNotFound)
			}
		}
		return nil
	}))
	require.NoError(t, re.Check())
}

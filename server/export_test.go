package server_test

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	leaseholdv1 "github.com/leasehold/leasehold/proto/leasehold/v1"
	"github.com/leasehold/leasehold/server"
	"github.com/leasehold/leasehold/server/auditsink"
	"github.com/leasehold/leasehold/store"
)

func exportedSequences(t *testing.T, path string) []uint64 {
	t.Helper()
	f, err := os.Open(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	require.NoError(t, err)
	defer f.Close()
	var seqs []uint64
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		var r auditsink.Record
		require.NoError(t, json.Unmarshal(sc.Bytes(), &r))
		seqs = append(seqs, r.Sequence)
	}
	return seqs
}

func (e *env) head() uint64 {
	e.t.Helper()
	cp, err := e.admin.GetAuditCheckpoint(ctx, &leaseholdv1.GetAuditCheckpointRequest{})
	require.NoError(e.t, err)
	return cp.GetCheckpoint().GetSequence()
}

func TestFileSinkResumesFromItsCursorAfterRestart(t *testing.T) {
	path := filepath.Join(t.TempDir(), "audit.jsonl")
	e := newEnv(t)
	e.stop()
	e.sinks = append(e.sinks, &auditsink.File{Path: path})
	e.start()

	caughtUp := func() bool {
		s := exportedSequences(t, path)
		return len(s) > 0 && s[len(s)-1] == e.head()
	}
	e.activity(3)
	require.Eventually(t, caughtUp, 5*time.Second, 10*time.Millisecond)
	before := len(exportedSequences(t, path))
	e.restart()
	e.activity(2)
	require.Eventually(t, caughtUp, 5*time.Second, 10*time.Millisecond)
	seqs := exportedSequences(t, path)
	require.Greater(t, len(seqs), before)
	for i, s := range seqs {
		require.Equal(t, uint64(i+1), s, "every record once, in order: the restart resumed from the cursor")
	}
}

// flakySink fails while fail is set and remembers what it accepted.
type flakySink struct {
	fail atomic.Bool
	mu   sync.Mutex
	seqs []uint64
}

func (f *flakySink) Name() string { return "flaky" }
func (f *flakySink) Close() error { return nil }
func (f *flakySink) Write(_ context.Context, recs []*store.AuditRecord) error {
	if f.fail.Load() {
		return errors.New("SIEM unreachable")
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, r := range recs {
		f.seqs = append(f.seqs, r.Sequence)
	}
	return nil
}

func (f *flakySink) got() []uint64 {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]uint64(nil), f.seqs...)
}

func TestFailingSinkNeverBlocksAcquires(t *testing.T) {
	sink := &flakySink{}
	sink.fail.Store(true)
	e := newEnv(t)
	e.stop()
	e.sinks = []server.AuditSink{sink}
	e.start()

	start := time.Now()
	e.activity(5)
	require.Less(t, time.Since(start), 10*time.Second)
	require.Empty(t, sink.got(), "nothing was delivered while the sink failed")

	sink.fail.Store(false)
	head := e.head()
	require.Eventually(t, func() bool { g := sink.got(); return len(g) > 0 && g[len(g)-1] == head }, 40*time.Second, 20*time.Millisecond)
	for i, s := range sink.got() {
		require.Equal(t, uint64(i+1), s)
	}
}

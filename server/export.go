package server

import (
	"context"
	"time"

	"github.com/leasehold/leasehold/store"
)

// AuditSink receives audit records for export (server/auditsink has a
// JSON-lines file sink and a writer sink). Write gets records in sequence
// order; it may see a record again after a restart or a failed write
// (at-least-once), never out of order. Write must not block forever: the
// exporter waits for it, though requests never do.
type AuditSink interface {
	// Name identifies the sink; its cursor is stored under it.
	Name() string
	Write(ctx context.Context, recs []*store.AuditRecord) error
	Close() error
}

const (
	exportBatch      = 500
	exportMinBackoff = 100 * time.Millisecond
	exportMaxBackoff = 30 * time.Second
)

func sinkCursor(sink AuditSink) string { return "sink:" + sink.Name() }

// runExport feeds one sink from its persisted cursor until Stop. It runs
// beside the request path, so a slow or failing sink delays only itself.
func (s *Server) runExport(sink AuditSink, stop <-chan struct{}) {
	ctx := withRequestID(context.Background(), "export")
	backoff := exportMinBackoff
	for {
		wake := s.auditCommitted.wait()
		n, err := s.exportOnce(ctx, sink)
		switch {
		case err != nil:
			s.log.Warn("audit export failed; will retry", "sink", sink.Name(), "error", err.Error(), "retry_in", backoff.String())
			select {
			case <-stop:
				return
			case <-time.After(backoff):
			}
			backoff = min(2*backoff, exportMaxBackoff)
			continue
		case n == exportBatch:
			backoff = exportMinBackoff
			continue
		}
		backoff = exportMinBackoff
		select {
		case <-stop:
			return
		case <-wake:
		}
	}
}

// exportOnce sends the next batch after the sink's cursor and advances it.
func (s *Server) exportOnce(ctx context.Context, sink AuditSink) (int, error) {
	name := sinkCursor(sink)
	var recs []*store.AuditRecord
	err := s.store.View(ctx, func(tx store.ReadTx) error {
		cursor, err := tx.GetCursor(name)
		if err != nil {
			return err
		}
		recs, err = tx.QueryAudit(store.AuditQuery{AfterSequence: cursor, Ascending: true, Limit: exportBatch})
		return err
	})
	if err != nil || len(recs) == 0 {
		return 0, err
	}
	wctx, cancel := context.WithTimeout(ctx, time.Minute)
	err = sink.Write(wctx, recs)
	cancel()
	if err != nil {
		return 0, err
	}
	last := recs[len(recs)-1].Sequence
	// The cursor only moves forward, even if two brokers shared a store.
	err = s.store.Update(ctx, func(tx store.Tx) error {
		cur, err := tx.GetCursor(name)
		if err != nil || cur >= last {
			return err
		}
		return tx.PutCursor(name, last)
	})
	return len(recs), err
}

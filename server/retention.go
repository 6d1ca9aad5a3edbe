package server

import (
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"time"

	"github.com/leasehold/leasehold/store"
)

const (
	retentionActor = "leasehold:retention"
	pruneBatch     = 10_000
)

// runRetention removes audit records beyond the configured age or count
// until Stop.
func (s *Server) runRetention(stop <-chan struct{}) {
	ctx := withRequestID(context.Background(), "retention")
	t := time.NewTicker(s.cfg.RetentionInterval)
	defer t.Stop()
	for {
		if n, err := s.retainOnce(ctx); err != nil {
			s.log.Error("audit retention", "error", err.Error())
		} else if n > 0 {
			s.log.Info("audit retention removed records", "count", n)
		}
		select {
		case <-stop:
			return
		case <-t.C:
		}
	}
}

// retainOnce prunes everything retention allows, in batches, each batch
// with an audit.prune record naming the range and the checkpoint the chain
// continues from.
func (s *Server) retainOnce(ctx context.Context) (int, error) {
	total := 0
	// A batch too large for one store transaction (store/etcd's Txn
	// limits) is halved until it fits.
	batch := pruneBatch
	for {
		var through, floor uint64
		err := s.store.View(ctx, func(tx store.ReadTx) error {
			last, err := tx.LastAuditSequence()
			if err != nil {
				return err
			}
			f, err := tx.AuditFloor()
			if err != nil {
				return err
			}
			floor = f.Sequence
			// Prune back to max once the trail is a slack over it: each prune
			// appends its own record, which must not trigger the next one.
			if max := s.cfg.RetentionMaxRecords; max > 0 && last-floor > max+retentionSlack(max) {
				through = last - max
			}
			if age := s.cfg.RetentionMaxAge; age > 0 {
				old, err := tx.QueryAudit(store.AuditQuery{End: s.now().Add(-age), Limit: 1})
				if err != nil {
					return err
				}
				if len(old) == 1 {
					through = max(through, old[0].Sequence)
				}
			}
			// Never remove what an export sink has not taken yet.
			for _, sink := range s.sinks {
				cur, err := tx.GetCursor(sinkCursor(sink))
				if err != nil {
					return err
				}
				through = min(through, cur)
			}
			return nil
		})
		if err != nil || through <= floor {
			return total, err
		}
		var n int
		err = s.store.Update(ctx, func(tx store.Tx) error {
			var err error
			if n, err = tx.PruneAudit(through, batch); err != nil || n == 0 {
				return err
			}
			f, err := tx.AuditFloor()
			if err != nil {
				return err
			}
			return appendAudit(ctx, tx, &store.AuditRecord{Event: store.EventAuditPrune, Actor: retentionActor,
				Reason: fmt.Sprintf("records %d through %d removed by retention; the chain continues from record %d, hash %s",
					floor+1, f.Sequence, f.Sequence, hex.EncodeToString(f.Hash))})
		})
		if errors.Is(err, store.ErrTooLarge) && batch > 1 {
			batch /= 2
			continue
		}
		if err != nil {
			return total, err
		}
		total += n
		if n < batch {
			return total, nil
		}
	}
}

// retentionSlack is how far past max_records the trail may grow before it
// is pruned: 10%, at least one record.
func retentionSlack(max uint64) uint64 { return 1 + max/10 }

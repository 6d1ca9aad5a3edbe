package server

import (
	"context"
	"errors"
	"strings"
	"sync"
	"time"

	"github.com/leasehold/leasehold/backends"
	"github.com/leasehold/leasehold/store"
)

const (
	revokeBatch       = 64
	revokeParallelism = 8
	revokeTimeout     = 30 * time.Second
	maxLastErrorLen   = 512
)

// runRevocations works the durable revocation queue until Stop: every due
// entry's artifact is destroyed through its backend; a failure is retried
// with capped exponential backoff, without limit. The queue lives in the
// store, so a restarted broker carries on where this one stopped.
func (s *Server) runRevocations() {
	ctx := withRequestID(context.Background(), "revocations")
	t := time.NewTicker(s.cfg.RevocationPoll)
	defer t.Stop()
	for {
		wake := s.auditCommitted.wait()
		n, err := s.revokeDue(ctx)
		if err != nil {
			s.log.Error("revocation queue", "error", err.Error())
		}
		if n == revokeBatch {
			continue
		}
		select {
		case <-s.stop:
			return
		case <-wake:
		case <-t.C:
		}
	}
}

// backoff is the wait after the given number of failed attempts.
func (s *Server) backoff(attempts int) time.Duration {
	d := s.cfg.RevocationMinBackoff
	for i := 1; i < attempts && d < s.cfg.RevocationMaxBackoff; i++ {
		d *= 2
	}
	return min(d, s.cfg.RevocationMaxBackoff)
}

// revokeDue handles up to a batch of due revocations, several at a time,
// and returns how many it tried.
func (s *Server) revokeDue(ctx context.Context) (int, error) {
	now := s.now()
	var due []*store.Revocation
	if err := s.store.View(ctx, func(tx store.ReadTx) error {
		var err error
		due, err = tx.DueRevocations(now, revokeBatch)
		return err
	}); err != nil || len(due) == 0 {
		return 0, err
	}
	sem := make(chan struct{}, revokeParallelism)
	var wg sync.WaitGroup
	for _, r := range due {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			s.revokeOne(ctx, r)
		}()
	}
	wg.Wait()
	return len(due), nil
}

func (s *Server) revokeOne(ctx context.Context, r *store.Revocation) {
	ctx, span := s.startSpan(ctx, "lease.revoke_upstream", attrLease.String(r.LeaseID))
	var l *store.Lease
	var ref backends.LeaseRef
	err := s.store.View(ctx, func(tx store.ReadTx) error {
		var err error
		if l, err = tx.GetLease(r.LeaseID); err != nil {
			return err
		}
		ref, err = s.leaseRef(tx, l)
		return err
	})
	if err == nil {
		var b backends.Backend
		if b, err = s.backends.Lookup(l.Backend); err == nil {
			rctx, cancel := context.WithTimeout(ctx, revokeTimeout)
			err = b.Revoke(rctx, ref)
			cancel()
		}
	}
	clearRef(ref)
	endSpan(span, err)

	now := s.now()
	uerr := s.store.Update(ctx, func(tx store.Tx) error {
		cur, gerr := tx.GetRevocation(r.LeaseID)
		if gerr != nil {
			return gerr
		}
		if err == nil || errors.Is(err, store.ErrNotFound) && l == nil {
			if err := tx.DeleteRevocation(r.LeaseID); err != nil {
				return err
			}
			if l == nil {
				return nil // the lease record itself is gone: nothing left to do
			}
			l, gerr := tx.GetLease(r.LeaseID)
			if gerr != nil {
				return gerr
			}
			l.UpstreamRevoked, l.UpstreamRevokedAt = true, now
			return tx.PutLease(l)
		}
		cur.Attempts++
		cur.NextAttempt = now.Add(s.backoff(cur.Attempts))
		cur.LastError = truncate(strings.ToValidUTF8(err.Error(), "?"), maxLastErrorLen)
		return tx.PutRevocation(cur)
	})
	switch {
	case uerr != nil && !errors.Is(uerr, store.ErrNotFound):
		s.log.Error("revocation queue: recording an attempt failed", "lease_id", r.LeaseID, "error", uerr.Error())
	case err != nil:
		s.log.Warn("upstream revocation failed; will retry", "lease_id", r.LeaseID, "attempts", r.Attempts+1,
			"retry_in", s.backoff(r.Attempts+1).String(), "error", err.Error())
	default:
		s.log.Info("upstream artifact destroyed", "lease_id", r.LeaseID)
	}
}

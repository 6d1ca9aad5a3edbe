package server

import (
	"context"
	"errors"
	"fmt"
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
func (s *Server) runRevocations(stop <-chan struct{}) {
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
		case <-stop:
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
// records all their outcomes in one transaction, and returns how many it
// tried.
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
	// Group by credential: a backend that can revoke in batches gets all of
	// a credential's due entries at once; others get them one by one.
	results := make([]error, len(due))
	groups := map[string][]int{}
	refs := make([]backends.LeaseRef, len(due))
	backendOf := make([]backends.Backend, len(due))
	for i, r := range due {
		l, ref, b, err := s.prepareRevoke(ctx, r)
		refs[i], backendOf[i] = ref, b
		if err != nil {
			results[i] = err
			continue
		}
		if _, ok := b.(backends.BatchRevoker); ok {
			groups[l.Backend+"\x00"+l.Credential] = append(groups[l.Backend+"\x00"+l.Credential], i)
			continue
		}
		groups["\x00"+r.LeaseID] = []int{i}
	}
	sem := make(chan struct{}, revokeParallelism)
	var wg sync.WaitGroup
	for _, idx := range groups {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			rctx, cancel := context.WithTimeout(ctx, revokeTimeout)
			defer cancel()
			rctx, span := s.startSpan(rctx, "lease.revoke_upstream", attrCount.Int(len(idx)))
			b := backendOf[idx[0]]
			if br, ok := b.(backends.BatchRevoker); ok && len(idx) > 1 {
				batch := make([]backends.LeaseRef, len(idx))
				for j, i := range idx {
					batch[j] = refs[i]
				}
				for j, err := range br.RevokeBatch(rctx, batch) {
					results[idx[j]] = err
				}
			} else {
				for _, i := range idx {
					results[i] = b.Revoke(rctx, refs[i])
				}
			}
			var errs []error
			for _, i := range idx {
				errs = append(errs, results[i])
			}
			endSpan(span, errors.Join(errs...))
		}()
	}
	wg.Wait()
	for _, ref := range refs {
		clearRef(ref)
	}

	now = s.now()
	err := s.store.Update(ctx, func(tx store.Tx) error {
		for i, r := range due {
			if err := s.recordAttempt(tx, r.LeaseID, results[i], now); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		return len(due), fmt.Errorf("record revocation attempts: %w", err)
	}
	for i, r := range due {
		if results[i] != nil {
			s.log.Warn("upstream revocation failed; will retry", "lease_id", r.LeaseID, "attempts", r.Attempts+1,
				"retry_in", s.backoff(r.Attempts+1).String(), "error", results[i].Error())
		}
	}
	return len(due), nil
}

// errLeaseGone marks a queued revocation whose lease record no longer
// exists: there is nothing left to revoke with.
var errLeaseGone = errors.New("lease record gone")

// prepareRevoke loads what revoking r needs: its lease, the backend and
// the opened artifact and credential.
func (s *Server) prepareRevoke(ctx context.Context, r *store.Revocation) (*store.Lease, backends.LeaseRef, backends.Backend, error) {
	var l *store.Lease
	var ref backends.LeaseRef
	err := s.store.View(ctx, func(tx store.ReadTx) error {
		var err error
		if l, err = tx.GetLease(r.LeaseID); err != nil {
			if errors.Is(err, store.ErrNotFound) {
				return errLeaseGone
			}
			return err
		}
		ref, err = s.leaseRef(tx, l)
		return err
	})
	if err != nil {
		return nil, ref, nil, err
	}
	b, err := s.backends.Lookup(l.Backend)
	return l, ref, b, err
}

// recordAttempt removes a done revocation (marking its lease) or schedules
// the next attempt of a failed one.
func (s *Server) recordAttempt(tx store.Tx, leaseID string, result error, now time.Time) error {
	cur, err := tx.GetRevocation(leaseID)
	if errors.Is(err, store.ErrNotFound) {
		return nil
	}
	if err != nil {
		return err
	}
	if result == nil || errors.Is(result, errLeaseGone) {
		if err := tx.DeleteRevocation(leaseID); err != nil {
			return err
		}
		l, err := tx.GetLease(leaseID)
		if errors.Is(err, store.ErrNotFound) {
			return nil
		}
		if err != nil {
			return err
		}
		l.UpstreamRevoked, l.UpstreamRevokedAt = true, now
		return tx.PutLease(l)
	}
	cur.Attempts++
	cur.NextAttempt = now.Add(s.backoff(cur.Attempts))
	cur.LastError = truncate(strings.ToValidUTF8(result.Error(), "?"), maxLastErrorLen)
	return tx.PutRevocation(cur)
}

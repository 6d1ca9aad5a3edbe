package client

import (
	"context"
	"errors"
	"fmt"
	"time"

	"google.golang.org/grpc/codes"

	leaseholdv1 "github.com/leasehold/leasehold/proto/leasehold/v1"
)

func (c *Client) track(l *Lease) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.leases[l.ID] = l
}

func (c *Client) untrack(id string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	delete(c.leases, id)
}

// waitSynced waits (briefly) until the revocation watch is subscribed, so
// no revocation of a lease acquired afterwards can be missed.
func (c *Client) waitSynced(ctx context.Context) bool {
	t := time.NewTimer(10 * time.Second)
	defer t.Stop()
	select {
	case <-c.synced:
		return true
	case <-ctx.Done():
	case <-t.C:
	}
	return false
}

// watch follows WatchLeases for the client's lifetime, reconnecting after
// the last sequence seen, and invalidates leases the broker ends.
func (c *Client) watch() {
	defer c.wg.Done()
	var after uint64
	first := true
	backoff := 100 * time.Millisecond
	for {
		ctx, cancel := context.WithCancel(context.Background())
		go func() {
			select {
			case <-c.closed:
				cancel()
			case <-ctx.Done():
			}
		}()
		stream, err := c.broker.WatchLeases(ctx, &leaseholdv1.WatchLeasesRequest{AfterSequence: after, FromNow: first})
		for err == nil {
			var ev *leaseholdv1.WatchLeasesResponse
			if ev, err = stream.Recv(); err != nil {
				break
			}
			after, backoff = ev.GetSequence(), 100*time.Millisecond
			if first {
				first = false
				close(c.synced)
			}
			c.apply(ev)
		}
		cancel()
		select {
		case <-c.closed:
			return
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, 5*time.Second)
	}
}

func (c *Client) apply(ev *leaseholdv1.WatchLeasesResponse) {
	var end error
	switch ev.GetEvent() {
	case leaseholdv1.LeaseEvent_LEASE_EVENT_REVOKED:
		end = fmt.Errorf("%w: lease %s revoked: %s", ErrRevoked, ev.GetLeaseId(), ev.GetReason())
	case leaseholdv1.LeaseEvent_LEASE_EVENT_EXPIRED, leaseholdv1.LeaseEvent_LEASE_EVENT_RELEASED:
		end = fmt.Errorf("%w: lease %s %s", ErrLeaseEnded, ev.GetLeaseId(), ev.GetReason())
	default:
		return
	}
	c.mu.Lock()
	l := c.leases[ev.GetLeaseId()]
	delete(c.leases, ev.GetLeaseId())
	c.mu.Unlock()
	if l != nil {
		l.invalidate(end)
	}
}

// terminal reports broker answers that renewing again cannot change.
func terminal(err error) bool {
	var e *Error
	if !errors.As(err, &e) {
		return false
	}
	switch e.Code {
	case codes.PermissionDenied, codes.FailedPrecondition, codes.NotFound, codes.InvalidArgument, codes.Unauthenticated:
		return true
	}
	return false
}

// renewLoop renews at two thirds of the remaining life. A refusal ends the
// lease at once; an outage is retried with backoff until the lease
// expires, never faster than every 100 ms (no renew storms).
func (l *Lease) renewLoop(ctx context.Context, callerDone <-chan struct{}) {
	retry := time.Duration(0)
	for {
		wait := retry
		if wait == 0 {
			wait = max(time.Until(l.ExpiresAt())*2/3, 100*time.Millisecond)
		}
		select {
		case <-l.stop:
			return
		case <-callerDone:
			return
		case <-time.After(wait):
		}
		if !time.Now().Before(l.ExpiresAt()) {
			l.invalidate(fmt.Errorf("%w: lease %s expired before it could be renewed", ErrLeaseEnded, l.ID))
			return
		}
		if !l.ExpiresAt().Before(l.MaxExpiresAt) {
			return // at max_lifetime: nothing left to renew; it expires
		}
		rctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		exp, err := l.c.Renew(rctx, l.ID, l.ttl)
		cancel()
		switch {
		case err == nil:
			l.mu.Lock()
			l.expiresAt = exp
			l.mu.Unlock()
			retry = 0
		case terminal(err):
			l.c.untrack(l.ID)
			l.invalidate(err)
			return
		default:
			retry = min(max(2*retry, 250*time.Millisecond), max(time.Until(l.ExpiresAt())/3, 100*time.Millisecond))
		}
	}
}

// WithLease acquires a lease, hands it to fn, and releases it when fn
// returns: retrieve, use, discard.
func (c *Client) WithLease(ctx context.Context, credential string, opts AcquireOptions, fn func(*Lease) error) error {
	l, err := c.Acquire(ctx, credential, opts)
	if err != nil {
		return err
	}
	ferr := fn(l)
	rerr := l.Release(context.WithoutCancel(ctx))
	return errors.Join(ferr, rerr)
}

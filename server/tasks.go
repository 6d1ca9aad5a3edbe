package server

import (
	"context"
	"errors"
	"fmt"
	"sync"

	"golang.org/x/time/rate"
	"google.golang.org/grpc/codes"

	leaseholdv1 "github.com/leasehold/leasehold/proto/leasehold/v1"
	"github.com/leasehold/leasehold/store"
)

// EndTask releases the caller's leases for a task and its subtasks.
func (b *brokerService) EndTask(ctx context.Context, req *leaseholdv1.EndTaskRequest) (*leaseholdv1.EndTaskResponse, error) {
	s := b.s
	if err := validTaskID("task_id", req.GetTaskId(), true); err != nil {
		return nil, err
	}
	caller := callerFrom(ctx).String()
	now := s.now()
	var n int
	err := s.store.Update(ctx, func(tx store.Tx) error {
		leases, err := tx.ListLeases(store.LeaseFilter{AgentID: caller, TaskTree: req.GetTaskId(), ActiveOnly: true}, "", 0)
		if err != nil {
			return err
		}
		for _, l := range leases {
			if err := endLease(ctx, tx, l, store.LeaseReleased, "task "+req.GetTaskId()+" ended", now, nil); err != nil {
				return err
			}
		}
		n = len(leases)
		return appendAudit(ctx, tx, &store.AuditRecord{Event: store.EventTaskEnd, AgentID: caller, TaskID: req.GetTaskId(),
			Reason: fmt.Sprintf("%d leases released", n)})
	})
	if err != nil {
		return nil, s.writeFailed(ctx, err)
	}
	return &leaseholdv1.EndTaskResponse{LeasesEnded: int32(n)}, nil
}

// RevokeTask revokes every lease of a task and its subtasks.
func (a *adminService) RevokeTask(ctx context.Context, req *leaseholdv1.RevokeTaskRequest) (*leaseholdv1.RevokeTaskResponse, error) {
	s := a.s
	if err := validTaskID("task_id", req.GetTaskId(), true); err != nil {
		return nil, err
	}
	if req.GetReason() == "" {
		return nil, errInvalid("reason", "is required: it is recorded in the audit trail")
	}
	if err := validText("reason", req.GetReason()); err != nil {
		return nil, err
	}
	now := s.now()
	var n, grants int
	var drained []*store.Lease
	revoke := func(tx store.Tx) error {
		ended, err := endActive(ctx, tx, store.LeaseFilter{TaskTree: req.GetTaskId()}, "task revoked: "+req.GetReason(), now)
		if err != nil {
			return err
		}
		delegated, err := delegatedInTask(tx, req.GetTaskId())
		if err != nil {
			return err
		}
		var more int
		if grants, more, err = deleteGrantTree(ctx, tx, delegated, "task "+req.GetTaskId()+" revoked", now); err != nil {
			return err
		}
		n = len(drained) + len(ended) + more
		return appendAudit(ctx, tx, &store.AuditRecord{Event: store.EventTaskRevoke, TaskID: req.GetTaskId(),
			Reason: fmt.Sprintf("%s (%d leases revoked, %d delegated grants deleted)", req.GetReason(), n, grants)})
	}
	err := s.store.Update(ctx, revoke)
	if errors.Is(err, store.ErrTooLarge) {
		// Too many leases for one transaction: end them in batches first.
		if drained, err = s.drainLeases(ctx, store.LeaseFilter{TaskTree: req.GetTaskId()}, "task revoked: "+req.GetReason(), now); err == nil {
			err = s.store.Update(ctx, revoke)
		}
	}
	if err != nil {
		return nil, s.writeFailed(ctx, err)
	}
	return &leaseholdv1.RevokeTaskResponse{LeasesRevoked: int32(n), DelegatedGrantsDeleted: int32(grants)}, nil
}

// limiters holds one token bucket per agent and credential.
type limiters struct {
	every rate.Limit
	burst int
	mu    sync.Mutex
	m     map[string]*rate.Limiter
}

func (l *limiters) allow(agent, credential string) bool {
	if l == nil || l.every <= 0 {
		return true
	}
	l.mu.Lock()
	lim := l.m[agent+"\x00"+credential]
	if lim == nil {
		lim = rate.NewLimiter(l.every, l.burst)
		l.m[agent+"\x00"+credential] = lim
	}
	l.mu.Unlock()
	return lim.Allow()
}

func errQuota(format string, args ...any) error {
	return newAPIError(codes.ResourceExhausted, format, args...)
}

// checkQuotas checks the per-agent active-lease limit and the per-task
// budget. Acquire runs it twice: read-only before the backend issues
// anything (so a refused request creates nothing upstream), and again inside
// the write transaction that adds the lease, so concurrent acquires cannot
// overshoot.
func (s *Server) checkQuotas(tx store.ReadTx, agent, task string) error {
	if max := s.cfg.MaxActiveLeasesPerAgent; max > 0 {
		active, err := tx.CountActiveLeases(agent, max)
		if err != nil {
			return err
		}
		if active >= max {
			return errQuota("agent %s already holds %d active leases, the most allowed; release some first", agent, max)
		}
	}
	if max := s.cfg.MaxLeasesPerTask; max > 0 {
		leases, err := tx.ListLeases(store.LeaseFilter{TaskID: task}, "", max)
		if err != nil {
			return err
		}
		if len(leases) >= max {
			return errQuota("task.id: task %q has used its budget of %d leases", task, max)
		}
	}
	return nil
}

// keyedMutex serializes identical acquires (same agent, task, credential and
// scopes) within this broker, so the second finds the first's lease and is
// answered with it instead of minting an upstream credential that would be
// destroyed again. The commit re-checks anyway, for brokers sharing a store.
type keyedMutex struct {
	mu sync.Mutex
	m  map[string]*keyedEntry
}

type keyedEntry struct {
	mu   sync.Mutex
	refs int
}

func (k *keyedMutex) lock(key string) (unlock func()) {
	k.mu.Lock()
	if k.m == nil {
		k.m = map[string]*keyedEntry{}
	}
	e := k.m[key]
	if e == nil {
		e = &keyedEntry{}
		k.m[key] = e
	}
	e.refs++
	k.mu.Unlock()
	e.mu.Lock()
	return func() {
		e.mu.Unlock()
		k.mu.Lock()
		if e.refs--; e.refs == 0 {
			delete(k.m, key)
		}
		k.mu.Unlock()
	}
}

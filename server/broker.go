package server

import (
	"context"
	"errors"

	leaseholdv1 "github.com/leasehold/leasehold/proto/leasehold/v1"
	"github.com/leasehold/leasehold/store"
)

type brokerService struct {
	leaseholdv1.UnimplementedBrokerServiceServer
	s *Server
}

func (b *brokerService) AcquireLease(ctx context.Context, req *leaseholdv1.AcquireLeaseRequest) (*leaseholdv1.AcquireLeaseResponse, error) {
	if err := validCredentialName("credential", req.GetCredential()); err != nil {
		return nil, err
	}
	if err := validScopes("scopes", req.GetScopes(), true); err != nil {
		return nil, err
	}
	ttl, err := validDuration("ttl", req.GetTtl(), b.s.cfg.MaxTTL)
	if err != nil {
		return nil, err
	}
	if req.GetTask() == nil {
		return nil, errInvalid("task", "is required: every lease is for a task")
	}
	if err := validTaskID("task.id", req.GetTask().GetId(), true); err != nil {
		return nil, err
	}
	if err := validText("task.purpose", req.GetTask().GetPurpose()); err != nil {
		return nil, err
	}
	return b.s.acquire(ctx, callerFrom(ctx), req, ttl)
}

func (b *brokerService) RenewLease(ctx context.Context, req *leaseholdv1.RenewLeaseRequest) (*leaseholdv1.RenewLeaseResponse, error) {
	if err := validLeaseID("lease_id", req.GetLeaseId()); err != nil {
		return nil, err
	}
	ttl, err := validDuration("ttl", req.GetTtl(), b.s.cfg.MaxTTL)
	if err != nil {
		return nil, err
	}
	l, secret, err := b.s.renew(ctx, callerFrom(ctx), req.GetLeaseId(), ttl)
	if err != nil {
		return nil, err
	}
	out := &leaseholdv1.RenewLeaseResponse{Lease: leaseToProto(l)}
	if secret != nil {
		out.Secret = make(map[string]string, len(secret))
		for k, v := range secret {
			out.Secret[k] = string(v)
			clear(v)
		}
	}
	return out, nil
}

func (b *brokerService) ReleaseLease(ctx context.Context, req *leaseholdv1.ReleaseLeaseRequest) (*leaseholdv1.ReleaseLeaseResponse, error) {
	if err := validLeaseID("lease_id", req.GetLeaseId()); err != nil {
		return nil, err
	}
	l, err := b.s.release(ctx, callerFrom(ctx), req.GetLeaseId())
	if err != nil {
		return nil, err
	}
	return &leaseholdv1.ReleaseLeaseResponse{Lease: leaseToProto(l)}, nil
}

func (b *brokerService) WhoAmI(ctx context.Context, _ *leaseholdv1.WhoAmIRequest) (*leaseholdv1.WhoAmIResponse, error) {
	id := callerFrom(ctx)
	out := &leaseholdv1.WhoAmIResponse{SpiffeId: id.String(), Admin: b.s.cfg.Admins.IsAdmin(id)}
	err := b.s.store.View(ctx, func(tx store.ReadTx) error {
		a, err := tx.GetAgent(id.String())
		if errors.Is(err, store.ErrNotFound) {
			return nil
		}
		if err != nil {
			return err
		}
		out.Revoked = a.Revoked
		return nil
	})
	return out, err
}

var leaseEvents = map[store.AuditEvent]leaseholdv1.LeaseEvent{
	store.EventLeaseAcquire: leaseholdv1.LeaseEvent_LEASE_EVENT_ACQUIRED,
	store.EventLeaseRenew:   leaseholdv1.LeaseEvent_LEASE_EVENT_RENEWED,
	store.EventLeaseRelease: leaseholdv1.LeaseEvent_LEASE_EVENT_RELEASED,
	store.EventLeaseExpire:  leaseholdv1.LeaseEvent_LEASE_EVENT_EXPIRED,
	store.EventLeaseRevoke:  leaseholdv1.LeaseEvent_LEASE_EVENT_REVOKED,
	store.EventLeaseRotated: leaseholdv1.LeaseEvent_LEASE_EVENT_ROTATED,
}

// WatchLeases streams the caller's own lease events from the audit trail
// (allowed decisions only: a refused attempt is not a lease event). Its
// first message is a sync marker (event UNSPECIFIED) carrying the sequence
// the stream starts after: every lease event committed later will follow.
func (b *brokerService) WatchLeases(req *leaseholdv1.WatchLeasesRequest, stream leaseholdv1.BrokerService_WatchLeasesServer) error {
	ctx := stream.Context()
	caller := callerFrom(ctx).String()
	after := req.GetAfterSequence()
	if req.GetFromNow() {
		if err := b.s.store.View(ctx, func(tx store.ReadTx) (err error) { after, err = tx.LastAuditSequence(); return err }); err != nil {
			return err
		}
	}
	if err := stream.Send(&leaseholdv1.WatchLeasesResponse{Sequence: after}); err != nil {
		return err
	}
	q := store.AuditQuery{AgentID: caller, Decision: store.Allow}
	return b.s.streamAudit(ctx, q, after, false, func(r *store.AuditRecord) error {
		ev, ok := leaseEvents[r.Event]
		if !ok || r.LeaseID == "" {
			return nil
		}
		return stream.Send(&leaseholdv1.WatchLeasesResponse{Sequence: r.Sequence, Event: ev, LeaseId: r.LeaseID,
			Credential: r.Credential, TaskId: r.TaskID, Reason: r.Reason, Time: ts(r.Time)})
	})
}

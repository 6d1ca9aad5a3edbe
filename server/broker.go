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
	l, err := b.s.renew(ctx, callerFrom(ctx), req.GetLeaseId(), ttl)
	if err != nil {
		return nil, err
	}
	return &leaseholdv1.RenewLeaseResponse{Lease: leaseToProto(l)}, nil
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

package server

import (
	"context"
	"fmt"

	"github.com/leasehold/leasehold/backends"
	leaseholdv1 "github.com/leasehold/leasehold/proto/leasehold/v1"
	"github.com/leasehold/leasehold/store"
)

// RotateCredential asks the backend for a new secret, makes it take effect
// upstream, and stores it as the credential's new version. If the store
// write fails, the upstream change is undone.
//
// A crash between the upstream change and the store write leaves the
// stored secret stale; scheduled two-phase rotation (a persisted pending
// version, resumed on restart) is the rotation work's to add.
func (a *adminService) RotateCredential(ctx context.Context, req *leaseholdv1.RotateCredentialRequest) (*leaseholdv1.RotateCredentialResponse, error) {
	s := a.s
	name := req.GetName()
	if err := validCredentialName("name", name); err != nil {
		return nil, err
	}
	var cred *store.Credential
	var current map[string][]byte
	err := s.store.View(ctx, func(tx store.ReadTx) error {
		c, err := tx.GetCredential(name)
		if err != nil {
			return err
		}
		v, err := tx.GetCredentialVersion(c.Name, c.CurrentVersion)
		if err != nil {
			return err
		}
		cred = c
		current, err = s.openSecret(c, v)
		return err
	})
	if err != nil {
		return nil, err
	}
	defer clearSecret(current)
	b, err := s.backends.Lookup(cred.Backend)
	if err != nil {
		return nil, errPrecondition("credential %q uses backend %q, which this broker does not have", name, cred.Backend)
	}
	rot, ok := b.(backends.Rotator)
	if !ok {
		return nil, errPrecondition("name: the %s backend cannot rotate %q upstream; put a new secret with PutCredential instead", cred.Backend, name)
	}
	spec := backends.Spec{Name: name, Config: cred.Config, Secret: current}
	next, err := rot.NextSecret(spec)
	if err != nil {
		return nil, err
	}
	defer clearSecret(next)
	if err := rot.Rotate(ctx, spec, next); err != nil {
		return nil, issueError(cred, err)
	}
	now := s.now()
	var out *store.Credential
	err = s.store.Update(ctx, func(tx store.Tx) error {
		c, err := tx.GetCredential(name)
		if err != nil {
			return err
		}
		plain := make(map[string]string, len(next))
		for k, v := range next {
			plain[k] = string(v)
		}
		if err := s.addVersion(tx, c, plain, now); err != nil {
			return err
		}
		if err := tx.PutCredential(c); err != nil {
			return err
		}
		out = c
		return appendAudit(ctx, tx, &store.AuditRecord{Event: store.EventCredentialRotate, Credential: name,
			Reason: fmt.Sprintf("rotated upstream; version %d", c.CurrentVersion)})
	})
	if err != nil {
		// Put the old secret back upstream, so what is stored still works.
		if rerr := rot.Rotate(context.WithoutCancel(ctx), backends.Spec{Name: name, Config: cred.Config, Secret: next}, current); rerr != nil {
			s.log.ErrorContext(ctx, "rotation: the new secret is live upstream but could not be stored, and undoing it failed; the stored secret is stale",
				"credential", name, "error", rerr.Error())
		}
		return nil, s.writeFailed(ctx, err)
	}
	return &leaseholdv1.RotateCredentialResponse{Credential: credentialToProto(out)}, nil
}

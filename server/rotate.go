package server

import (
	"context"
	"fmt"

	"github.com/leasehold/leasehold/backends"
	leaseholdv1 "github.com/leasehold/leasehold/proto/leasehold/v1"
	"github.com/leasehold/leasehold/store"
)

// RotateCredential rotates a credential now. Backends that rotate in two
// phases (postgres, postgres-static-role, exec, webhook) go through the
// persisted, resumable engine in rotation.go. For a backend that only
// implements backends.Rotator, the single step below asks for a new secret,
// makes it take effect upstream, and stores it as the credential's new
// version; if the store write fails, the upstream change is undone (a crash
// between the two leaves the stored secret stale).
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
	if _, ok := b.(backends.TwoPhaseRotator); ok {
		return s.rotateTwoPhase(ctx, cred)
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

// upstreamActor is the audit actor for secrets an upstream replaced.
const upstreamActor = "leasehold:upstream"

// secretUpdater returns what backends.IssueRequest.UpdateSecret calls: it
// stores a secret the upstream replaced while issuing (an OAuth2 server
// rotating the refresh token) as the credential's new version, with an
// audit record, durably before the backend goes on. The record names the
// agent whose acquire caused it; it holds no secret.
func (s *Server) secretUpdater(name, agent string) func(context.Context, map[string][]byte) error {
	return func(ctx context.Context, secret map[string][]byte) error {
		plain := make(map[string]string, len(secret))
		for k, v := range secret {
			plain[k] = string(v)
		}
		now := s.now()
		err := s.store.Update(ctx, func(tx store.Tx) error {
			c, err := tx.GetCredential(name)
			if err != nil {
				return err
			}
			if err := s.addVersion(tx, c, plain, now); err != nil {
				return err
			}
			if err := tx.PutCredential(c); err != nil {
				return err
			}
			return appendAudit(ctx, tx, &store.AuditRecord{Event: store.EventCredentialRotate, Credential: name, Actor: upstreamActor,
				AgentID: agent, Reason: fmt.Sprintf("the upstream replaced stored material while issuing a lease; version %d", c.CurrentVersion)})
		})
		if err != nil {
			s.log.ErrorContext(ctx, "storing a secret the upstream replaced failed", "credential", name, "error", err.Error())
		}
		return err
	}
}

// rotateTwoPhase starts a rotation now and runs it through promotion; the
// previous version's overlap and retirement continue in the background.
func (s *Server) rotateTwoPhase(ctx context.Context, c *store.Credential) (*leaseholdv1.RotateCredentialResponse, error) {
	if ph := c.RotationState.Phase; ph != "" && ph != store.RotationIdle {
		return nil, errPrecondition("name: a rotation of %q is in progress (phase %s)", c.Name, ph)
	}
	if err := s.advanceRotation(ctx, c.Name, true); err != nil {
		return nil, err
	}
	var out *store.Credential
	if err := s.store.View(ctx, func(tx store.ReadTx) error {
		var err error
		out, err = tx.GetCredential(c.Name)
		return err
	}); err != nil {
		return nil, err
	}
	return &leaseholdv1.RotateCredentialResponse{Credential: credentialToProto(out)}, nil
}

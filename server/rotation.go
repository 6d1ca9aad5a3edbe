package server

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"time"

	"google.golang.org/grpc/codes"

	"github.com/leasehold/leasehold/backends"
	"github.com/leasehold/leasehold/store"
)

// Scheduled two-phase rotation.
//
// For credentials whose backend is a backends.TwoPhaseRotator, a rotation
// walks these phases, each persisted before the next begins so that a
// restart resumes where the broker stopped:
//
//	idle ─▶ creating ─▶ verifying ─▶ overlap ─▶ idle
//	          (Create      (Verify      (the new version is current; the
//	           upstream,    it, then     previous one stays valid until
//	           store it as  promote it)  retire_at, then its leases end
//	           pending)                  and it is retired upstream)
//
// Creating is idempotent per rotation id, so a resumed rotation does not
// create twice. Promotion is one transaction: never two current versions. A
// version is retired only after it stopped being current and its leases were
// ended: never a retired version handed out. A failed create or verify
// leaves the current version in place, records the error (without secrets)
// and retries with backoff.

const (
	rotationActor          = "leasehold:rotation"
	defaultRotationOverlap = 5 * time.Minute
)

var errRotationBusy = errors.New("a rotation is in progress")

func (s *Server) runRotations(stop <-chan struct{}) {
	t := time.NewTicker(s.cfg.RotationPoll)
	defer t.Stop()
	ctx, cancel := context.WithCancel(withRequestID(context.Background(), "rotation"))
	defer cancel()
	go func() { <-stop; cancel() }()
	for {
		s.rotationTick(ctx)
		select {
		case <-stop:
			return
		case <-t.C:
		}
	}
}

func (s *Server) rotationTick(ctx context.Context) {
	var creds []*store.Credential
	if err := s.store.View(ctx, func(tx store.ReadTx) error {
		var err error
		creds, err = tx.ListCredentials("", 0)
		return err
	}); err != nil {
		s.log.Error("rotation: list credentials", "error", err.Error())
		return
	}
	now := s.now()
	for _, c := range creds {
		if rotationDue(c, now) {
			if err := s.advanceRotation(ctx, c.Name, false); err != nil && ctx.Err() == nil {
				s.log.Warn("rotation did not complete; will retry", "credential", c.Name, "error", err.Error())
			}
		}
	}
}

func rotationDue(c *store.Credential, now time.Time) bool {
	st := c.RotationState
	switch st.Phase {
	case store.RotationCreating, store.RotationVerifying:
		// Interrupted: resume, at once after a restart, after the backoff
		// when the upstream was unavailable.
		return st.NextDue.IsZero() || !now.Before(st.NextDue)
	case store.RotationOverlap:
		return !now.Before(st.RetireAt)
	}
	return c.Rotation != nil && !st.NextDue.IsZero() && !now.Before(st.NextDue)
}

// advanceRotation drives one credential's rotation as far as it can go now:
// start it (when due, or start is set), create, verify and promote, and
// retire the previous version once its overlap has passed.
func (s *Server) advanceRotation(ctx context.Context, name string, start bool) error {
	defer s.rotating.lock(name)()
	for {
		c, rot, err := s.rotationTarget(ctx, name)
		if err != nil {
			return err
		}
		now := s.now()
		st := c.RotationState
		switch st.Phase {
		case "", store.RotationIdle:
			if !start && !rotationDue(c, now) {
				return nil
			}
			start = false
			if err := s.beginRotation(ctx, name); err != nil {
				return err
			}
		case store.RotationCreating:
			if err := s.createVersion(ctx, c, rot); err != nil {
				return err
			}
		case store.RotationVerifying:
			if err := s.verifyAndPromote(ctx, c, rot); err != nil {
				return err
			}
		case store.RotationOverlap:
			if now.Before(st.RetireAt) {
				return nil
			}
			return s.retirePrevious(ctx, c, rot)
		default:
			return fmt.Errorf("rotation of %q: unknown phase %q", name, st.Phase)
		}
	}
}

// leasesHoldSecret reports whether leases of c carry its stored secret
// (and so must hear of a rotation and end with their version).
func (s *Server) leasesHoldSecret(c *store.Credential) bool {
	b, err := s.backends.Lookup(c.Backend)
	if err != nil {
		return true
	}
	li, ok := b.(backends.LeaseIndependent)
	return !ok || !li.LeasesIndependentOfSecret()
}

func (s *Server) rotationTarget(ctx context.Context, name string) (*store.Credential, backends.TwoPhaseRotator, error) {
	var c *store.Credential
	if err := s.store.View(ctx, func(tx store.ReadTx) error {
		var err error
		c, err = tx.GetCredential(name)
		return err
	}); err != nil {
		return nil, nil, err
	}
	b, err := s.backends.Lookup(c.Backend)
	if err != nil {
		return nil, nil, errPrecondition("credential %q uses backend %q, which this broker does not have", name, c.Backend)
	}
	rot, ok := b.(backends.TwoPhaseRotator)
	if !ok {
		return nil, nil, errPrecondition("the %s backend does not rotate in two phases", c.Backend)
	}
	return c, rot, nil
}

// updateRotation changes a credential's rotation state (and anything else
// fn does) in one transaction with an audit record.
func (s *Server) updateRotation(ctx context.Context, name string, rec *store.AuditRecord, fn func(tx store.Tx, c *store.Credential) error) error {
	return s.store.Update(ctx, func(tx store.Tx) error {
		c, err := tx.GetCredential(name)
		if err != nil {
			return err
		}
		if err := fn(tx, c); err != nil {
			return err
		}
		if err := tx.PutCredential(c); err != nil {
			return err
		}
		r := *rec
		r.Credential, r.Actor = name, rotationActor
		return appendAudit(ctx, tx, &r)
	})
}

func (s *Server) beginRotation(ctx context.Context, name string) error {
	id := newID("rot_")
	return s.updateRotation(ctx, name, &store.AuditRecord{Event: store.EventCredentialRotate,
		Reason: "rotation " + id + " started: creating the next version upstream"}, func(_ store.Tx, c *store.Credential) error {
		c.RotationState.Phase, c.RotationState.ID, c.RotationState.PendingVersion = store.RotationCreating, id, 0
		c.RotationState.NextDue = time.Time{}
		return nil
	})
}

// versionSpec opens the credential's current version for the rotator.
func (s *Server) versionSpec(ctx context.Context, c *store.Credential, version uint64) (backends.Spec, error) {
	var v *store.CredentialVersion
	if err := s.store.View(ctx, func(tx store.ReadTx) error {
		var err error
		v, err = tx.GetCredentialVersion(c.Name, version)
		return err
	}); err != nil {
		return backends.Spec{}, err
	}
	secret, err := s.openSecret(c, v)
	if err != nil {
		return backends.Spec{}, err
	}
	return backends.Spec{Name: c.Name, Config: c.Config, Secret: secret}, nil
}

func (s *Server) createVersion(ctx context.Context, c *store.Credential, rot backends.TwoPhaseRotator) error {
	spec, err := s.versionSpec(ctx, c, c.CurrentVersion)
	if err != nil {
		return err
	}
	defer clearSecret(spec.Secret)
	next, err := rot.Create(ctx, spec, c.RotationState.ID)
	if err != nil {
		if ctx.Err() != nil {
			return ctx.Err() // interrupted (shutdown): resume with the same id
		}
		if errors.Is(err, backends.ErrUpstreamUnavailable) {
			return s.rotationPaused(ctx, c.Name, "create", err)
		}
		return s.rotationFailed(ctx, c.Name, "create", err)
	}
	defer clearSecret(next)
	plain := make(map[string]string, len(next))
	for k, v := range next {
		plain[k] = string(v)
	}
	now := s.now()
	var version uint64
	return s.updateRotation(ctx, c.Name, &store.AuditRecord{Event: store.EventCredentialRotate,
		Reason: "rotation " + c.RotationState.ID + ": next version created upstream and stored as pending"}, func(tx store.Tx, c *store.Credential) error {
		if c.RotationState.Phase != store.RotationCreating {
			return errRotationBusy
		}
		// The first free version number: a failed rotation's pending
		// version may hold the next one.
		for version = c.CurrentVersion + 1; ; version++ {
			if _, err := tx.GetCredentialVersion(c.Name, version); errors.Is(err, store.ErrNotFound) {
				break
			} else if err != nil {
				return err
			}
		}
		if err := s.putVersion(tx, c, plain, version, now); err != nil {
			return err
		}
		c.RotationState.Phase, c.RotationState.PendingVersion = store.RotationVerifying, version
		return nil
	})
}

func (s *Server) verifyAndPromote(ctx context.Context, c *store.Credential, rot backends.TwoPhaseRotator) error {
	st := c.RotationState
	spec, err := s.versionSpec(ctx, c, c.CurrentVersion)
	if err != nil {
		return err
	}
	defer clearSecret(spec.Secret)
	next, err := s.versionSpec(ctx, c, st.PendingVersion)
	if err != nil {
		return err
	}
	defer clearSecret(next.Secret)
	if err := rot.Verify(ctx, spec, next.Secret); err != nil {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if errors.Is(err, backends.ErrUpstreamUnavailable) {
			// Not a verdict on the new version: verify it again later. (For
			// rotate-root the new password is already the only one.)
			return s.rotationPaused(ctx, c.Name, "verify", err)
		}
		// The new version never served: take it back upstream.
		if rerr := rot.Retire(ctx, spec, next.Secret); rerr != nil {
			s.log.Warn("rotation: retiring the unverified version failed", "credential", c.Name, "error", rerr.Error())
		}
		return s.rotationFailed(ctx, c.Name, "verify", err)
	}
	keys := slices.Sorted(maps.Keys(next.Secret))
	holdSecret := s.leasesHoldSecret(c)
	overlap := defaultRotationOverlap
	switch {
	case c.Rotation != nil:
		overlap = c.Rotation.Overlap
	case !holdSecret:
		overlap = 0 // no lease holds the old version: nothing to wait for
	}
	now := s.now()
	retireAt := now.Add(overlap)
	return s.updateRotation(ctx, c.Name, &store.AuditRecord{Event: store.EventCredentialRotate,
		Reason: fmt.Sprintf("rotation %s: version %d verified and promoted; version %d stays valid until %s", st.ID, st.PendingVersion,
			c.CurrentVersion, retireAt.UTC().Format(time.RFC3339))}, func(tx store.Tx, c *store.Credential) error {
		if c.RotationState.Phase != store.RotationVerifying || c.RotationState.PendingVersion != st.PendingVersion {
			return errRotationBusy
		}
		prev := c.CurrentVersion
		c.CurrentVersion, c.SecretKeys, c.UpdatedAt = st.PendingVersion, keys, now
		c.RotationState = store.RotationState{Phase: store.RotationOverlap, ID: st.ID, PreviousVersion: prev, RetireAt: retireAt,
			LastRotated: c.RotationState.LastRotated}
		if c.Rotation != nil && c.Rotation.Interval > 0 {
			c.RotationState.NextDue = retireAt.Add(c.Rotation.Interval) // the schedule resumes once this one is retired
		}
		// Holders of the previous version hear of it (WatchLeases: rotated).
		if !holdSecret {
			return nil
		}
		leases, err := tx.ListLeases(store.LeaseFilter{Credential: c.Name, ActiveOnly: true}, "", 0)
		if err != nil {
			return err
		}
		for _, l := range leases {
			if l.CredentialVersion != prev {
				continue
			}
			if err := appendAudit(ctx, tx, &store.AuditRecord{Event: store.EventLeaseRotated, Actor: rotationActor, AgentID: l.AgentID,
				Credential: l.Credential, Scopes: l.Scopes, TaskID: l.TaskID, LeaseID: l.ID, GrantID: l.GrantID, DelegationChain: l.DelegationChain,
				Reason: fmt.Sprintf("credential rotated to version %d; this lease's version %d is valid until %s, then the lease ends",
					st.PendingVersion, prev, retireAt.UTC().Format(time.RFC3339))}); err != nil {
				return err
			}
		}
		return nil
	})
}

func (s *Server) retirePrevious(ctx context.Context, c *store.Credential, rot backends.TwoPhaseRotator) error {
	st := c.RotationState
	now := s.now()
	holdSecret := s.leasesHoldSecret(c)
	// First no lease holds the previous version any more...
	err := s.updateRotation(ctx, c.Name, &store.AuditRecord{Event: store.EventCredentialRotate,
		Reason: fmt.Sprintf("rotation %s: overlap over; leases holding version %d ended", st.ID, st.PreviousVersion)},
		func(tx store.Tx, c *store.Credential) error {
			if !holdSecret {
				return nil // the leases are independent of the stored secret
			}
			leases, err := tx.ListLeases(store.LeaseFilter{Credential: c.Name, ActiveOnly: true}, "", 0)
			if err != nil {
				return err
			}
			for _, l := range leases {
				if l.CredentialVersion == st.PreviousVersion {
					reason := fmt.Sprintf("credential rotated: version %d retired", st.PreviousVersion)
					if err := endLease(ctx, tx, l, store.LeaseRevoked, reason, now, nil); err != nil {
						return err
					}
				}
			}
			return nil
		})
	if err != nil {
		return err
	}
	// ...then it stops working upstream.
	old, err := s.versionSpec(ctx, c, st.PreviousVersion)
	if err != nil {
		return err
	}
	defer clearSecret(old.Secret)
	if err := rot.Retire(ctx, old, old.Secret); err != nil {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		failures := st.Failures + 1
		_ = s.updateRotation(ctx, c.Name, &store.AuditRecord{Event: store.EventCredentialRotate, Decision: store.Deny, Code: "Unavailable",
			Reason: fmt.Sprintf("rotation %s: retiring version %d upstream failed (%d in a row), will retry: %v", st.ID, st.PreviousVersion, failures, err)},
			func(_ store.Tx, c *store.Credential) error {
				c.RotationState.LastError, c.RotationState.Failures = "retire: "+err.Error(), failures
				c.RotationState.RetireAt = now.Add(s.backoff(failures))
				return nil
			})
		return err
	}
	return s.updateRotation(ctx, c.Name, &store.AuditRecord{Event: store.EventCredentialRotate,
		Reason: fmt.Sprintf("rotation %s done: version %d retired upstream", st.ID, st.PreviousVersion)}, func(_ store.Tx, c *store.Credential) error {
		next := time.Time{}
		if c.Rotation != nil && c.Rotation.Interval > 0 {
			next = now.Add(c.Rotation.Interval)
		}
		c.RotationState = store.RotationState{Phase: store.RotationIdle, LastRotated: now, NextDue: next}
		return nil
	})
}

// rotationPaused records that the upstream was unavailable during create or
// verify: the phase stays, and the same step runs again after the backoff.
func (s *Server) rotationPaused(ctx context.Context, name, step string, cause error) error {
	now := s.now()
	err := s.updateRotation(ctx, name, &store.AuditRecord{Event: store.EventCredentialRotate, Decision: store.Deny, Code: "Unavailable",
		Reason: fmt.Sprintf("rotation paused at %s, the upstream is unavailable; it resumes at the same step: %v", step, cause)},
		func(_ store.Tx, c *store.Credential) error {
			c.RotationState.Failures++
			c.RotationState.LastError = step + ": " + cause.Error()
			c.RotationState.NextDue = now.Add(s.backoff(c.RotationState.Failures))
			return nil
		})
	if err != nil {
		return err
	}
	return newAPIError(codes.Unavailable, "rotation of %q paused at %s: the upstream is unavailable; it resumes on its own: %v", name, step, cause)
}

// rotationFailed records a failed create or verify: the current version
// stays, the pending one is dropped, and the next attempt backs off.
func (s *Server) rotationFailed(ctx context.Context, name, step string, cause error) error {
	now := s.now()
	var failures int
	err := s.updateRotation(ctx, name, &store.AuditRecord{Event: store.EventCredentialRotate, Decision: store.Deny, Code: "FailedPrecondition",
		Reason: fmt.Sprintf("rotation failed at %s; the current version stays: %v", step, cause)}, func(_ store.Tx, c *store.Credential) error {
		failures = c.RotationState.Failures + 1
		c.RotationState = store.RotationState{Phase: store.RotationIdle, LastRotated: c.RotationState.LastRotated,
			LastError: step + ": " + cause.Error(), Failures: failures, NextDue: now.Add(s.backoff(failures))}
		return nil
	})
	if err != nil {
		return err
	}
	return errPrecondition("rotation of %q failed at %s (the current version stays; retrying with backoff): %v", name, step, cause)
}

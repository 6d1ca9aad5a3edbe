package server

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	leaseholdv1 "github.com/leasehold/leasehold/proto/leasehold/v1"
	"github.com/leasehold/leasehold/store"
)

// Delegation.
//
// An agent may turn part of its grant into a grant for another agent: same
// credential, scopes a subset, bound to a subtask of the caller's task,
// lasting no longer than a lease under the caller's grant could, one level
// deeper. The grant delegated from is the one an acquire by the caller for
// that credential, scopes and task would use; the caller needs no lease and
// never sees a secret to delegate. The
// delegated grant names its parent and the chain of delegating agents;
// every lease under it carries that chain into the audit trail. Whatever
// ends the delegator's authority — RevokeAgent, RevokeTask, deleting its
// grant, the delegator's own RevokeDelegation — deletes every grant below it
// and ends their leases in the same transaction (cascade).

// DelegateGrant implements leaseholdv1.BrokerServiceServer.
func (b *brokerService) DelegateGrant(ctx context.Context, req *leaseholdv1.DelegateGrantRequest) (*leaseholdv1.DelegateGrantResponse, error) {
	s := b.s
	if err := validCredentialName("credential", req.GetCredential()); err != nil {
		return nil, err
	}
	if err := validTaskID("task_id", req.GetTaskId(), true); err != nil {
		return nil, err
	}
	delegate, err := validSpiffeID("delegate_spiffe_id", req.GetDelegateSpiffeId(), s.cfg.TrustDomain)
	if err != nil {
		return nil, err
	}
	caller := callerFrom(ctx)
	if delegate == caller {
		return nil, errInvalid("delegate_spiffe_id", "is the caller: delegate to another agent")
	}
	if err := validScopes("scopes", req.GetScopes(), true); err != nil {
		return nil, err
	}
	if req.GetSubtask() == "" {
		return nil, errInvalid("subtask", "is required: a delegated grant is bound to a subtask of the caller's task")
	}
	if err := validTaskID("subtask", req.GetSubtask(), true); err != nil {
		return nil, err
	}
	if req.GetTtl() == nil {
		return nil, errInvalid("ttl", "is required: how long the delegated grant lasts")
	}
	ttl, err := validDuration("ttl", req.GetTtl(), s.cfg.MaxLifetime)
	if err != nil {
		return nil, err
	}
	if ttl <= 0 {
		return nil, errInvalid("ttl", "must be positive")
	}
	maxTTL, err := validDuration("max_ttl", req.GetMaxTtl(), s.cfg.MaxTTL)
	if err != nil {
		return nil, err
	}

	now := s.now()
	rec := &store.AuditRecord{Event: store.EventGrantDelegate, AgentID: caller.String(), Credential: req.GetCredential(),
		Scopes: req.GetScopes(), TaskID: req.GetTaskId()}
	child := &store.Grant{ID: newID("gr_"), SpiffeID: delegate.String(), Scopes: slices.Clone(req.GetScopes()),
		CreatedAt: now, CreatedBy: caller.String(), DelegatedBy: caller.String()}
	err = s.store.Update(ctx, func(tx store.Tx) error {
		// The grant an acquire by the caller would use; its denials (a
		// revoked caller, no grant, scopes, task, expiry) are this call's.
		p, err := s.evaluate(tx, caller, req.GetCredential(), req.GetScopes(), 0, req.GetTaskId(), now)
		if err != nil {
			return err
		}
		if p.denial != nil {
			return p.denial
		}
		parent := p.grant
		if parent.Delegable <= 0 {
			// Another matching grant may allow delegation.
			var delegable []*store.Grant
			for _, g := range p.matching {
				if g.Delegable > 0 {
					delegable = append(delegable, g)
				}
			}
			if g, err := pickGrant(delegable, caller, req.GetCredential(), req.GetScopes(), 0, req.GetTaskId(), now); err == nil {
				parent = g
			}
		}
		rec.DelegationChain = parent.Chain
		rec.GrantID = parent.ID
		switch {
		case parent.Delegable <= 0 && parent.ParentGrantID != "":
			return errDenied("grant %s was delegated %d level(s) below an admin's grant and may not be delegated further (delegation depth limit)", parent.ID, len(parent.Chain))
		case parent.Delegable <= 0:
			return errDenied("grant %s does not allow delegation (max_delegation_depth 0)", parent.ID)
		case !parent.ExpiresAt.IsZero() && !now.Before(parent.ExpiresAt):
			return errDenied("grant %s has expired", parent.ID)
		}
		// The delegated grant lives no longer than a lease under the
		// caller's grant could, nor than that grant itself.
		limit := now.Add(parent.MaxLifetime)
		if !parent.ExpiresAt.IsZero() && parent.ExpiresAt.Before(limit) {
			limit = parent.ExpiresAt
		}
		expires := now.Add(ttl)
		if expires.After(limit) {
			return errDenied("ttl: %v would outlive your remaining lifetime (%s, until %s)", ttl,
				limit.Sub(now).Round(time.Second), limit.UTC().Format(time.RFC3339))
		}
		if maxTTL > parent.MaxTTL {
			return errDenied("max_ttl: %v exceeds your grant's max_ttl %v", maxTTL, parent.MaxTTL)
		}
		if maxTTL == 0 {
			maxTTL = parent.MaxTTL
		}
		child.Credential, child.ExpiresAt = parent.Credential, expires
		child.MaxTTL = min(maxTTL, ttl)
		child.MaxLifetime = min(parent.MaxLifetime, ttl)
		child.TaskID = req.GetTaskId() + "/" + req.GetSubtask()
		child.ParentGrantID, child.Delegable = parent.ID, parent.Delegable-1
		child.Chain = append(slices.Clone(parent.Chain), caller.String())
		if err := tx.PutGrant(child); err != nil {
			return err
		}
		rec.Reason = fmt.Sprintf("delegated grant %s to %s for task %s: scopes %s until %s, from grant %s; chain %s",
			child.ID, delegate, child.TaskID, strings.Join(child.Scopes, ","), expires.UTC().Format(time.RFC3339), parent.ID,
			strings.Join(child.Chain, " > "))
		return appendAudit(ctx, tx, rec)
	})
	if err != nil {
		if isDenied(err) {
			return nil, s.deny(ctx, rec, err)
		}
		return nil, s.writeFailed(ctx, err)
	}
	return &leaseholdv1.DelegateGrantResponse{Grant: grantToProto(child)}, nil
}

// RevokeDelegation implements leaseholdv1.BrokerServiceServer.
func (b *brokerService) RevokeDelegation(ctx context.Context, req *leaseholdv1.RevokeDelegationRequest) (*leaseholdv1.RevokeDelegationResponse, error) {
	s := b.s
	if err := validGrantID("grant_id", req.GetGrantId()); err != nil {
		return nil, err
	}
	if req.GetReason() == "" {
		return nil, errInvalid("reason", "is required: it is recorded in the audit trail")
	}
	if err := validText("reason", req.GetReason()); err != nil {
		return nil, err
	}
	caller := callerFrom(ctx).String()
	now := s.now()
	out := &leaseholdv1.RevokeDelegationResponse{}
	rec := &store.AuditRecord{Event: store.EventGrantDelete, AgentID: caller, GrantID: req.GetGrantId()}
	err := s.store.Update(ctx, func(tx store.Tx) error {
		g, err := tx.GetGrant(req.GetGrantId())
		if errors.Is(err, store.ErrNotFound) {
			return errNotFound("grant %s not found", req.GetGrantId())
		}
		if err != nil {
			return err
		}
		rec.Credential = g.Credential
		if !slices.Contains(g.Chain, caller) {
			return errDenied("grant %s was not delegated by %s or below it", g.ID, caller)
		}
		grants, leases, err := deleteGrantTree(ctx, tx, []*store.Grant{g}, "delegation revoked by "+caller+": "+req.GetReason(), now)
		out.GrantsDeleted, out.LeasesRevoked = int32(grants), int32(leases)
		return err
	})
	if err != nil {
		if isDenied(err) {
			return nil, s.deny(ctx, rec, err)
		}
		return nil, s.writeFailed(ctx, err)
	}
	return out, nil
}

// delegatedBelow returns every grant delegated, directly or further down,
// from the roots, excluding the roots; grants of the roots' credentials
// are scanned (grants are admin-scale: tens to thousands per credential).
func delegatedBelow(tx store.ReadTx, roots []*store.Grant) ([]*store.Grant, error) {
	byCred := map[string][]*store.Grant{}
	var out []*store.Grant
	for _, r := range roots {
		if _, ok := byCred[r.Credential]; ok {
			continue
		}
		all, err := tx.ListGrants(r.Credential, "", 0)
		if err != nil {
			return nil, err
		}
		byCred[r.Credential] = all
	}
	seen := map[string]bool{}
	for _, r := range roots {
		seen[r.ID] = true
	}
	frontier := roots
	for len(frontier) > 0 {
		var next []*store.Grant
		for _, p := range frontier {
			for _, g := range byCred[p.Credential] {
				if g.ParentGrantID == p.ID && !seen[g.ID] {
					seen[g.ID] = true
					next = append(next, g)
				}
			}
		}
		out = append(out, next...)
		frontier = next
	}
	return out, nil
}

// deleteGrantTree deletes the roots and everything delegated below them,
// ending their active leases, with an audit record per grant. It returns
// the number of grants deleted and leases ended.
func deleteGrantTree(ctx context.Context, tx store.Tx, roots []*store.Grant, reason string, now time.Time) (int, int, error) {
	below, err := delegatedBelow(tx, roots)
	if err != nil {
		return 0, 0, err
	}
	leases := 0
	for i, g := range append(slices.Clone(roots), below...) {
		why := reason
		if i >= len(roots) {
			why = fmt.Sprintf("cascade: delegated below grant %s (%s)", g.ParentGrantID, reason)
		}
		ended, err := endActive(ctx, tx, store.LeaseFilter{GrantID: g.ID}, why, now)
		if err != nil {
			return 0, 0, err
		}
		leases += len(ended)
		if err := tx.DeleteGrant(g.ID); err != nil {
			return 0, 0, err
		}
		if err := appendAudit(ctx, tx, &store.AuditRecord{Event: store.EventGrantDelete, GrantID: g.ID, Credential: g.Credential,
			AgentID: g.SpiffeID, TaskID: g.TaskID, DelegationChain: g.Chain,
			Reason: fmt.Sprintf("%s; %d leases revoked", why, len(ended))}); err != nil {
			return 0, 0, err
		}
	}
	return len(roots) + len(below), leases, nil
}

// delegatedBy lists the grants agent delegated (directly).
func delegatedBy(tx store.ReadTx, agent string) ([]*store.Grant, error) {
	all, err := tx.ListGrants("", "", 0)
	if err != nil {
		return nil, err
	}
	var out []*store.Grant
	for _, g := range all {
		if g.DelegatedBy == agent {
			out = append(out, g)
		}
	}
	return out, nil
}

// delegatedInTask lists delegated grants bound to task or its subtasks.
func delegatedInTask(tx store.ReadTx, task string) ([]*store.Grant, error) {
	all, err := tx.ListGrants("", "", 0)
	if err != nil {
		return nil, err
	}
	var out []*store.Grant
	for _, g := range all {
		if g.ParentGrantID != "" && inTaskTree(g.TaskID, task) {
			out = append(out, g)
		}
	}
	return out, nil
}

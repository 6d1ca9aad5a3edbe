package server

import (
	"encoding/hex"
	"time"

	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/timestamppb"

	leaseholdv1 "github.com/leasehold/leasehold/proto/leasehold/v1"
	"github.com/leasehold/leasehold/store"
)

func ts(t time.Time) *timestamppb.Timestamp {
	if t.IsZero() {
		return nil
	}
	return timestamppb.New(t)
}

// leaseToProto converts a lease; rev is its pending revocation, if any.
func leaseToProto(l *store.Lease, rev ...*store.Revocation) *leaseholdv1.Lease {
	out := &leaseholdv1.Lease{
		Id: l.ID, AgentId: l.AgentID, Credential: l.Credential, Scopes: l.Scopes,
		Task:    &leaseholdv1.Task{Id: l.TaskID, Purpose: l.TaskPurpose},
		GrantId: l.GrantID, State: leaseStateToProto(l.State),
		IssuedAt: ts(l.IssuedAt), ExpiresAt: ts(l.ExpiresAt), MaxExpiresAt: ts(l.MaxExpiresAt),
		EndedAt: ts(l.EndedAt), EndReason: l.EndReason, CredentialVersion: l.CredentialVersion,
	}
	if len(l.Artifact) > 0 {
		u := &leaseholdv1.UpstreamRevocation{State: leaseholdv1.UpstreamRevocation_STATE_LIVE}
		switch {
		case l.UpstreamRevoked:
			u.State, u.DoneAt = leaseholdv1.UpstreamRevocation_STATE_DONE, ts(l.UpstreamRevokedAt)
		case len(rev) > 0 && rev[0] != nil:
			u.State, u.Attempts, u.LastError, u.NextAttemptAt = leaseholdv1.UpstreamRevocation_STATE_PENDING,
				int32(rev[0].Attempts), rev[0].LastError, ts(rev[0].NextAttempt)
		case l.State != store.LeaseActive:
			u.State = leaseholdv1.UpstreamRevocation_STATE_PENDING
		}
		out.UpstreamRevocation = u
	}
	return out
}

func leaseStateToProto(s store.LeaseState) leaseholdv1.LeaseState {
	switch s {
	case store.LeaseActive:
		return leaseholdv1.LeaseState_LEASE_STATE_ACTIVE
	case store.LeaseReleased:
		return leaseholdv1.LeaseState_LEASE_STATE_RELEASED
	case store.LeaseExpired:
		return leaseholdv1.LeaseState_LEASE_STATE_EXPIRED
	case store.LeaseRevoked:
		return leaseholdv1.LeaseState_LEASE_STATE_REVOKED
	}
	return leaseholdv1.LeaseState_LEASE_STATE_UNSPECIFIED
}

func credentialToProto(c *store.Credential) *leaseholdv1.Credential {
	out := &leaseholdv1.Credential{
		Name: c.Name, Backend: c.Backend, Description: c.Description, Config: c.Config,
		SecretKeys: c.SecretKeys, CurrentVersion: c.CurrentVersion,
		CreatedAt: ts(c.CreatedAt), UpdatedAt: ts(c.UpdatedAt),
	}
	if c.Rotation != nil {
		out.Rotation = &leaseholdv1.RotationPolicy{Interval: durationpb.New(c.Rotation.Interval), Overlap: durationpb.New(c.Rotation.Overlap)}
	}
	st := c.RotationState
	if c.Rotation != nil || st.Phase != "" {
		out.RotationState = &leaseholdv1.RotationState{Phase: rotationPhases[st.Phase], PendingVersion: st.PendingVersion,
			PreviousVersion: st.PreviousVersion, LastError: st.LastError, Failures: int32(st.Failures)}
		for _, f := range []struct {
			t   time.Time
			dst **timestamppb.Timestamp
		}{{st.LastRotated, &out.RotationState.LastRotated}, {st.NextDue, &out.RotationState.NextDue}, {st.RetireAt, &out.RotationState.RetireAt}} {
			if !f.t.IsZero() {
				*f.dst = ts(f.t)
			}
		}
	}
	return out
}

var rotationPhases = map[string]leaseholdv1.RotationState_Phase{
	"": leaseholdv1.RotationState_PHASE_IDLE, store.RotationIdle: leaseholdv1.RotationState_PHASE_IDLE,
	store.RotationCreating: leaseholdv1.RotationState_PHASE_CREATING, store.RotationVerifying: leaseholdv1.RotationState_PHASE_VERIFYING,
	store.RotationOverlap: leaseholdv1.RotationState_PHASE_OVERLAP,
}

func grantToProto(g *store.Grant) *leaseholdv1.Grant {
	out := &leaseholdv1.Grant{
		Id: g.ID, Credential: g.Credential, Scopes: g.Scopes,
		MaxTtl: durationpb.New(g.MaxTTL), MaxLifetime: durationpb.New(g.MaxLifetime),
		Description: g.Description, CreatedAt: ts(g.CreatedAt), CreatedBy: g.CreatedBy,
		MaxDelegationDepth: int32(g.Delegable), TaskId: g.TaskID, ParentGrantId: g.ParentGrantID,
		DelegatedBy: g.DelegatedBy, DelegationChain: g.Chain,
		ExpectedCredentials: g.ExpectedCredentials, SuspendOnAnomaly: g.SuspendOnAnomaly,
	}
	if !g.ExpiresAt.IsZero() {
		out.ExpiresAt = ts(g.ExpiresAt)
	}
	if g.SpiffeID != "" {
		out.Subject = &leaseholdv1.Grant_SpiffeId{SpiffeId: g.SpiffeID}
	} else {
		out.Subject = &leaseholdv1.Grant_SpiffeIdPrefix{SpiffeIdPrefix: g.SpiffeIDPrefix}
	}
	return out
}

func agentToProto(a *store.Agent) *leaseholdv1.Agent {
	return &leaseholdv1.Agent{
		SpiffeId: a.ID, Revoked: a.Revoked, RevokedAt: ts(a.RevokedAt), RevokedReason: a.RevokedReason,
		RevokedBy: a.RevokedBy, FirstSeen: ts(a.FirstSeen), LastSeen: ts(a.LastSeen),
	}
}

var auditEvents = map[store.AuditEvent]leaseholdv1.AuditEvent{
	store.EventLeaseAcquire:     leaseholdv1.AuditEvent_AUDIT_EVENT_LEASE_ACQUIRE,
	store.EventLeaseRenew:       leaseholdv1.AuditEvent_AUDIT_EVENT_LEASE_RENEW,
	store.EventLeaseRelease:     leaseholdv1.AuditEvent_AUDIT_EVENT_LEASE_RELEASE,
	store.EventLeaseExpire:      leaseholdv1.AuditEvent_AUDIT_EVENT_LEASE_EXPIRE,
	store.EventLeaseRevoke:      leaseholdv1.AuditEvent_AUDIT_EVENT_LEASE_REVOKE,
	store.EventAgentRevoke:      leaseholdv1.AuditEvent_AUDIT_EVENT_AGENT_REVOKE,
	store.EventAgentReinstate:   leaseholdv1.AuditEvent_AUDIT_EVENT_AGENT_REINSTATE,
	store.EventCredentialPut:    leaseholdv1.AuditEvent_AUDIT_EVENT_CREDENTIAL_PUT,
	store.EventCredentialDelete: leaseholdv1.AuditEvent_AUDIT_EVENT_CREDENTIAL_DELETE,
	store.EventGrantCreate:      leaseholdv1.AuditEvent_AUDIT_EVENT_GRANT_CREATE,
	store.EventGrantDelete:      leaseholdv1.AuditEvent_AUDIT_EVENT_GRANT_DELETE,
	store.EventAccessDeny:       leaseholdv1.AuditEvent_AUDIT_EVENT_ACCESS_DENY,
	store.EventAuditPrune:       leaseholdv1.AuditEvent_AUDIT_EVENT_AUDIT_PRUNE,
	store.EventCredentialRotate: leaseholdv1.AuditEvent_AUDIT_EVENT_CREDENTIAL_ROTATE,
	store.EventTaskEnd:          leaseholdv1.AuditEvent_AUDIT_EVENT_TASK_END,
	store.EventTaskRevoke:       leaseholdv1.AuditEvent_AUDIT_EVENT_TASK_REVOKE,
	store.EventGrantDelegate:    leaseholdv1.AuditEvent_AUDIT_EVENT_GRANT_DELEGATE,
	store.EventLeaseRotated:     leaseholdv1.AuditEvent_AUDIT_EVENT_LEASE_ROTATED,
}

func auditToProto(r *store.AuditRecord) *leaseholdv1.AuditRecord {
	dec := leaseholdv1.Decision_DECISION_ALLOW
	if r.Decision == store.Deny {
		dec = leaseholdv1.Decision_DECISION_DENY
	}
	return &leaseholdv1.AuditRecord{
		Sequence: r.Sequence, Time: ts(r.Time), Event: auditEvents[r.Event], Decision: dec,
		Actor: r.Actor, AgentId: r.AgentID, Credential: r.Credential, Scopes: r.Scopes,
		TaskId: r.TaskID, TaskPurpose: r.TaskPurpose, LeaseId: r.LeaseID, GrantId: r.GrantID,
		Reason: r.Reason, RequestId: r.RequestID, Code: r.Code,
		Hash: hex.EncodeToString(r.Hash), PrevHash: hex.EncodeToString(r.PrevHash),
		TraceId: r.TraceID, SpanId: r.SpanID, DelegationChain: r.DelegationChain,
	}
}

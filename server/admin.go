package server

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strconv"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/leasehold/leasehold/backends"
	leaseholdv1 "github.com/leasehold/leasehold/proto/leasehold/v1"
	"github.com/leasehold/leasehold/store"
)

const (
	defaultGrantMaxTTL      = 15 * time.Minute
	defaultGrantMaxLifetime = time.Hour
)

type adminService struct {
	leaseholdv1.UnimplementedAdminServiceServer
	s *Server
}

// ---- credentials ----

func (a *adminService) PutCredential(ctx context.Context, req *leaseholdv1.PutCredentialRequest) (*leaseholdv1.PutCredentialResponse, error) {
	s := a.s
	name := req.GetName()
	if err := validCredentialName("name", name); err != nil {
		return nil, err
	}
	if err := validText("description", req.GetDescription()); err != nil {
		return nil, err
	}
	if err := validFields("config", req.GetConfig(), maxConfigFields, maxTextLen); err != nil {
		return nil, err
	}
	if err := validFields("secret", req.GetSecret(), maxSecretFields, maxSecretValueLen); err != nil {
		return nil, err
	}

	// Read what exists, validate the result with the backend, then write.
	var existing *store.Credential
	var current map[string][]byte
	err := s.store.View(ctx, func(tx store.ReadTx) error {
		c, err := tx.GetCredential(name)
		if errors.Is(err, store.ErrNotFound) {
			return nil
		}
		if err != nil {
			return err
		}
		existing = c
		if len(req.GetSecret()) == 0 {
			v, err := tx.GetCredentialVersion(c.Name, c.CurrentVersion)
			if err != nil {
				return err
			}
			current, err = s.openSecret(c, v)
			return err
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	defer clearSecret(current)
	if existing == nil && len(req.GetSecret()) == 0 {
		return nil, errInvalid("secret", "is required for a new credential")
	}
	// An omitted backend keeps the credential's own, or is static for a new one.
	backendName := req.GetBackend()
	switch {
	case backendName == "" && existing != nil:
		backendName = existing.Backend
	case backendName == "":
		backendName = "static"
	}
	backend, err := s.backends.Lookup(backendName)
	if err != nil {
		return nil, errInvalid("backend", "%q is not a backend of this broker (valid: %v)", truncate(backendName, 64), s.backends.Names())
	}
	if existing != nil && existing.Backend != backendName {
		return nil, errPrecondition("backend: credential %q uses %q; delete it to change to %q", name, existing.Backend, backendName)
	}
	spec := backends.Spec{Name: name, Config: req.GetConfig(), Secret: current}
	if len(req.GetSecret()) > 0 {
		spec.Secret = make(map[string][]byte, len(req.GetSecret()))
		for k, v := range req.GetSecret() {
			spec.Secret[k] = []byte(v)
		}
		defer clearSecret(spec.Secret)
	}
	if err := backend.Validate(spec); err != nil {
		return nil, err
	}
	var policy *store.RotationPolicy
	if rp := req.GetRotation(); rp != nil {
		if _, ok := backend.(backends.TwoPhaseRotator); !ok {
			return nil, errInvalid("rotation", "the %s backend does not rotate in two phases (use RotateCredential, or the exec backend)", backendName)
		}
		policy = &store.RotationPolicy{}
		if policy.Interval, err = validDuration("rotation.interval", rp.GetInterval(), 10*365*24*time.Hour); err != nil {
			return nil, err
		}
		if policy.Overlap, err = validDuration("rotation.overlap", rp.GetOverlap(), 30*24*time.Hour); err != nil {
			return nil, err
		}
		if rp.GetOverlap() == nil {
			policy.Overlap = defaultRotationOverlap
		}
	}

	now := s.now()
	var out *store.Credential
	err = s.store.Update(ctx, func(tx store.Tx) error {
		c, err := tx.GetCredential(name)
		switch {
		case errors.Is(err, store.ErrNotFound):
			if len(req.GetSecret()) == 0 {
				return errInvalid("secret", "is required for a new credential")
			}
			c = &store.Credential{Name: name, Backend: backendName, CreatedAt: now}
			if c.WrappedKey, err = s.keyring.NewDataKey(credentialAAD(name)); err != nil {
				return err
			}
		case err != nil:
			return err
		}
		c.Description, c.Config, c.UpdatedAt = req.GetDescription(), req.GetConfig(), now
		reason := "metadata updated"
		if ph := c.RotationState.Phase; len(req.GetSecret()) > 0 && (ph == store.RotationCreating || ph == store.RotationVerifying) {
			return errPrecondition("secret: a rotation of %q is creating a new version; put the secret when it is done", name)
		}
		if policy != nil {
			c.Rotation = policy
			if ph := c.RotationState.Phase; ph == "" || ph == store.RotationIdle {
				c.RotationState.NextDue = time.Time{}
				if policy.Interval > 0 {
					c.RotationState.NextDue = now.Add(policy.Interval)
				}
			}
			reason += fmt.Sprintf("; rotation every %v with %v overlap", policy.Interval, policy.Overlap)
		}
		if len(req.GetSecret()) > 0 {
			if err := s.addVersion(tx, c, req.GetSecret(), now); err != nil {
				return err
			}
			reason = "version " + strconv.FormatUint(c.CurrentVersion, 10)
		}
		if err := tx.PutCredential(c); err != nil {
			return err
		}
		out = c
		return appendAudit(ctx, tx, &store.AuditRecord{Event: store.EventCredentialPut, Credential: name, Reason: reason})
	})
	if err != nil {
		return nil, s.writeFailed(ctx, err)
	}
	return &leaseholdv1.PutCredentialResponse{Credential: credentialToProto(out)}, nil
}

func (a *adminService) GetCredential(ctx context.Context, req *leaseholdv1.GetCredentialRequest) (*leaseholdv1.GetCredentialResponse, error) {
	if err := validCredentialName("name", req.GetName()); err != nil {
		return nil, err
	}
	var c *store.Credential
	err := a.s.store.View(ctx, func(tx store.ReadTx) error {
		var err error
		c, err = tx.GetCredential(req.GetName())
		return err
	})
	if err != nil {
		return nil, err
	}
	return &leaseholdv1.GetCredentialResponse{Credential: credentialToProto(c)}, nil
}

func (a *adminService) ListCredentials(ctx context.Context, req *leaseholdv1.ListCredentialsRequest) (*leaseholdv1.ListCredentialsResponse, error) {
	size, err := validPageSize("page_size", req.GetPageSize())
	if err != nil {
		return nil, err
	}
	after, err := parsePageToken("page_token", "credentials", req.GetPageToken())
	if err != nil {
		return nil, err
	}
	var list []*store.Credential
	if err := a.s.store.View(ctx, func(tx store.ReadTx) error {
		list, err = tx.ListCredentials(after, size+1)
		return err
	}); err != nil {
		return nil, err
	}
	out := &leaseholdv1.ListCredentialsResponse{}
	list, out.NextPageToken = page(list, size, "credentials", func(c *store.Credential) string { return c.Name })
	for _, c := range list {
		out.Credentials = append(out.Credentials, credentialToProto(c))
	}
	return out, nil
}

// addVersion seals secret under the credential's data key, bound to the
// next version number, stores it, and makes it current in c (which the
// caller then puts).
func (s *Server) addVersion(tx store.Tx, c *store.Credential, secret map[string]string, now time.Time) error {
	version := c.CurrentVersion + 1
	if err := s.putVersion(tx, c, secret, version, now); err != nil {
		return err
	}
	c.CurrentVersion, c.UpdatedAt, c.SecretKeys = version, now, slices.Sorted(maps.Keys(secret))
	return nil
}

// putVersion stores secret, sealed, as version of c without making it
// current.
func (s *Server) putVersion(tx store.Tx, c *store.Credential, secret map[string]string, version uint64, now time.Time) error {
	plain, err := json.Marshal(secret)
	if err != nil {
		return err
	}
	defer clear(plain)
	sealed, err := s.keyring.Seal(c.WrappedKey, credentialAAD(c.Name), plain, versionAAD(c.Name, version))
	if err != nil {
		return err
	}
	return tx.PutCredentialVersion(&store.CredentialVersion{Credential: c.Name, Version: version, Sealed: sealed, CreatedAt: now})
}

// page trims a list fetched with limit size+1 and makes the next page token.
func page[T any](list []T, size int, kind string, key func(T) string) ([]T, string) {
	if len(list) <= size {
		return list, ""
	}
	list = list[:size]
	return list, pageToken(kind, key(list[size-1]))
}

func (a *adminService) DeleteCredential(ctx context.Context, req *leaseholdv1.DeleteCredentialRequest) (*leaseholdv1.DeleteCredentialResponse, error) {
	s := a.s
	name := req.GetName()
	if err := validCredentialName("name", name); err != nil {
		return nil, err
	}
	now := s.now()
	var ended, drained []*store.Lease
	out := &leaseholdv1.DeleteCredentialResponse{}
	del := func(tx store.Tx) error {
		if _, err := tx.GetCredential(name); err != nil {
			return err
		}
		var err error
		if ended, err = endActive(ctx, tx, store.LeaseFilter{Credential: name}, "credential deleted", now); err != nil {
			return err
		}
		grants, err := tx.ListGrants(name, "", 0)
		if err != nil {
			return err
		}
		for _, g := range grants {
			if err := tx.DeleteGrant(g.ID); err != nil {
				return err
			}
			if err := appendAudit(ctx, tx, &store.AuditRecord{Event: store.EventGrantDelete, GrantID: g.ID, Credential: name, Reason: "credential deleted"}); err != nil {
				return err
			}
		}
		if err := tx.DeleteCredential(name); err != nil {
			return err
		}
		n := len(drained) + len(ended)
		out.LeasesRevoked, out.GrantsDeleted = int32(n), int32(len(grants))
		return appendAudit(ctx, tx, &store.AuditRecord{Event: store.EventCredentialDelete, Credential: name,
			Reason: fmt.Sprintf("%d leases revoked, %d grants deleted", n, len(grants))})
	}
	err := s.store.Update(ctx, del)
	if errors.Is(err, store.ErrTooLarge) {
		// Too many leases for one transaction: end them in batches first,
		// then delete (ending any acquired meanwhile).
		if drained, err = s.drainLeases(ctx, store.LeaseFilter{Credential: name}, "credential deleted", now); err == nil {
			err = s.store.Update(ctx, del)
		}
	}
	if err != nil {
		return nil, s.writeFailed(ctx, err)
	}
	return out, nil
}

// ---- grants ----

func (a *adminService) CreateGrant(ctx context.Context, req *leaseholdv1.CreateGrantRequest) (*leaseholdv1.CreateGrantResponse, error) {
	s := a.s
	g := req.GetGrant()
	if g == nil {
		return nil, errInvalid("grant", "is required")
	}
	if g.GetId() != "" || g.GetCreatedAt() != nil || g.GetCreatedBy() != "" {
		return nil, errInvalid("grant.id", "id, created_at and created_by are assigned by the broker; leave them empty")
	}
	if g.GetParentGrantId() != "" || g.GetDelegatedBy() != "" || len(g.GetDelegationChain()) > 0 {
		return nil, errInvalid("grant.parent_grant_id", "parent_grant_id, delegated_by and delegation_chain are set only by DelegateGrant")
	}
	rec := &store.Grant{Credential: g.GetCredential(), Scopes: g.GetScopes(), Description: g.GetDescription()}
	switch sub := g.GetSubject().(type) {
	case *leaseholdv1.Grant_SpiffeId:
		id, err := validSpiffeID("grant.spiffe_id", sub.SpiffeId, s.cfg.TrustDomain)
		if err != nil {
			return nil, err
		}
		rec.SpiffeID = id.String()
	case *leaseholdv1.Grant_SpiffeIdPrefix:
		id, err := validSpiffeID("grant.spiffe_id_prefix", sub.SpiffeIdPrefix, s.cfg.TrustDomain)
		if err != nil {
			return nil, err
		}
		rec.SpiffeIDPrefix = id.String()
	default:
		return nil, errInvalid("grant.spiffe_id", "one of spiffe_id or spiffe_id_prefix is required")
	}
	if err := validCredentialName("grant.credential", rec.Credential); err != nil {
		return nil, err
	}
	if err := validScopes("grant.scopes", rec.Scopes, true); err != nil {
		return nil, err
	}
	if err := validText("grant.description", rec.Description); err != nil {
		return nil, err
	}
	var err error
	if rec.MaxTTL, err = validDuration("grant.max_ttl", g.GetMaxTtl(), s.cfg.MaxTTL); err != nil {
		return nil, err
	}
	if rec.MaxLifetime, err = validDuration("grant.max_lifetime", g.GetMaxLifetime(), s.cfg.MaxLifetime); err != nil {
		return nil, err
	}
	if rec.MaxTTL == 0 {
		rec.MaxTTL = min(defaultGrantMaxTTL, s.cfg.MaxTTL)
	}
	if rec.MaxLifetime == 0 {
		rec.MaxLifetime = max(min(defaultGrantMaxLifetime, s.cfg.MaxLifetime), rec.MaxTTL)
	}
	if rec.MaxLifetime < rec.MaxTTL {
		return nil, errInvalid("grant.max_lifetime", "%v is shorter than max_ttl %v", rec.MaxLifetime, rec.MaxTTL)
	}
	if d := g.GetMaxDelegationDepth(); d < 0 || int(d) > s.cfg.MaxDelegationDepth {
		return nil, errInvalid("grant.max_delegation_depth", "must be between 0 and %d (the broker's limit)", s.cfg.MaxDelegationDepth)
	}
	rec.Delegable = int(g.GetMaxDelegationDepth())
	if err := validTaskID("grant.task_id", g.GetTaskId(), false); err != nil {
		return nil, err
	}
	rec.TaskID = g.GetTaskId()
	for i, c := range g.GetExpectedCredentials() {
		if err := validCredentialName(fmt.Sprintf("grant.expected_credentials[%d]", i), c); err != nil {
			return nil, err
		}
	}
	if g.GetSuspendOnAnomaly() && len(g.GetExpectedCredentials()) == 0 {
		return nil, errInvalid("grant.suspend_on_anomaly", "needs expected_credentials: the anomaly is a credential outside that set")
	}
	rec.ExpectedCredentials, rec.SuspendOnAnomaly = g.GetExpectedCredentials(), g.GetSuspendOnAnomaly()
	if g.GetExpiresAt() != nil {
		if err := g.GetExpiresAt().CheckValid(); err != nil {
			return nil, errInvalid("grant.expires_at", "not a valid timestamp")
		}
		rec.ExpiresAt = g.GetExpiresAt().AsTime()
		if !rec.ExpiresAt.After(s.now()) {
			return nil, errInvalid("grant.expires_at", "is in the past")
		}
	}
	rec.ID, rec.CreatedAt, rec.CreatedBy = newID("gr_"), s.now(), callerFrom(ctx).String()
	err = s.store.Update(ctx, func(tx store.Tx) error {
		if _, err := tx.GetCredential(rec.Credential); err != nil {
			if errors.Is(err, store.ErrNotFound) {
				return errNotFound("grant.credential: credential %q not found", rec.Credential)
			}
			return err
		}
		if err := tx.PutGrant(rec); err != nil {
			return err
		}
		subject := rec.SpiffeID
		if subject == "" {
			subject = rec.SpiffeIDPrefix + "/*"
		}
		return appendAudit(ctx, tx, &store.AuditRecord{Event: store.EventGrantCreate, GrantID: rec.ID, Credential: rec.Credential,
			Scopes: rec.Scopes, TaskID: rec.TaskID, Reason: fmt.Sprintf("for %s, max_ttl %v, max_lifetime %v, max_delegation_depth %d",
				subject, rec.MaxTTL, rec.MaxLifetime, rec.Delegable)})
	})
	if err != nil {
		return nil, s.writeFailed(ctx, err)
	}
	return &leaseholdv1.CreateGrantResponse{Grant: grantToProto(rec)}, nil
}

func (a *adminService) ListGrants(ctx context.Context, req *leaseholdv1.ListGrantsRequest) (*leaseholdv1.ListGrantsResponse, error) {
	if req.GetCredential() != "" {
		if err := validCredentialName("credential", req.GetCredential()); err != nil {
			return nil, err
		}
	}
	var subject spiffeid.ID
	if req.GetSpiffeId() != "" {
		id, err := validSpiffeID("spiffe_id", req.GetSpiffeId(), a.s.cfg.TrustDomain)
		if err != nil {
			return nil, err
		}
		subject = id
	}
	size, err := validPageSize("page_size", req.GetPageSize())
	if err != nil {
		return nil, err
	}
	after, err := parsePageToken("page_token", "grants", req.GetPageToken())
	if err != nil {
		return nil, err
	}
	var list []*store.Grant
	err = a.s.store.View(ctx, func(tx store.ReadTx) error {
		cursor := after
		for len(list) <= size {
			batch, err := tx.ListGrants(req.GetCredential(), cursor, size+1)
			if err != nil || len(batch) == 0 {
				return err
			}
			for _, g := range batch {
				if subject.IsZero() || grantMatches(g, subject) {
					list = append(list, g)
				}
			}
			cursor = batch[len(batch)-1].ID
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	out := &leaseholdv1.ListGrantsResponse{}
	list, out.NextPageToken = page(list, size, "grants", func(g *store.Grant) string { return g.ID })
	for _, g := range list {
		out.Grants = append(out.Grants, grantToProto(g))
	}
	return out, nil
}

func (a *adminService) DeleteGrant(ctx context.Context, req *leaseholdv1.DeleteGrantRequest) (*leaseholdv1.DeleteGrantResponse, error) {
	s := a.s
	if err := validGrantID("id", req.GetId()); err != nil {
		return nil, err
	}
	now := s.now()
	var leases int
	err := s.store.Update(ctx, func(tx store.Tx) error {
		g, err := tx.GetGrant(req.GetId())
		if err != nil {
			return err
		}
		_, n, err := deleteGrantTree(ctx, tx, []*store.Grant{g}, "grant deleted", now)
		leases = n
		return err
	})
	if err != nil {
		return nil, s.writeFailed(ctx, err)
	}
	return &leaseholdv1.DeleteGrantResponse{LeasesRevoked: int32(leases)}, nil
}

// ---- agents ----

func (a *adminService) RevokeAgent(ctx context.Context, req *leaseholdv1.RevokeAgentRequest) (_ *leaseholdv1.RevokeAgentResponse, err error) {
	s := a.s
	id, err := validSpiffeID("spiffe_id", req.GetSpiffeId(), s.cfg.TrustDomain)
	if err != nil {
		return nil, err
	}
	ctx, span := s.startSpan(ctx, "agent.revoke", attrAgent.String(id.String()))
	var ended []*store.Lease
	defer func() { span.SetAttributes(attrCount.Int(len(ended))); endSpan(span, err) }()
	if req.GetReason() == "" {
		return nil, errInvalid("reason", "is required: it is recorded in the audit trail")
	}
	if err := validText("reason", req.GetReason()); err != nil {
		return nil, err
	}
	if id == callerFrom(ctx) {
		return nil, errPrecondition("an admin cannot revoke itself: it could then not reinstate anyone; ask another admin")
	}
	now := s.now()
	// One transaction: the revocation, the end of every active lease and
	// their audit records are durable together before the call returns.
	var rv *revocation
	err = s.store.Update(ctx, func(tx store.Tx) error {
		var err error
		rv, err = revokeAgentTx(ctx, tx, id.String(), req.GetReason(), callerFrom(ctx).String(), now)
		return err
	})
	if errors.Is(err, store.ErrTooLarge) {
		rv, err = s.revokeAgentInParts(ctx, id.String(), req.GetReason(), callerFrom(ctx).String(), now)
	}
	if err != nil {
		return nil, s.writeFailed(ctx, err)
	}
	ended = rv.ended
	return &leaseholdv1.RevokeAgentResponse{Agent: agentToProto(rv.agent), LeasesRevoked: int32(len(rv.ended)),
		DelegatedGrantsDeleted: int32(rv.grants), DelegatedLeasesRevoked: int32(rv.delegatedLeases)}, nil
}

// revokeAgentInParts revokes an agent whose leases are too many for one
// store transaction (store/etcd's Txn limits): first the agent is marked
// revoked, with its audit record, in one small transaction, so every broker
// refuses it from then on (acquire, renew, delegate); then its leases are
// ended in batches, each batch with its audit records and upstream
// revocations; then what it delegated is deleted. The call returns when all
// of it is durable. A broker that dies midway leaves the agent revoked and
// its remaining leases unrenewable; calling RevokeAgent again finishes the job.
func (s *Server) revokeAgentInParts(ctx context.Context, id, reason, by string, now time.Time) (*revocation, error) {
	rv := &revocation{}
	err := s.store.Update(ctx, func(tx store.Tx) error {
		ag, err := tx.GetAgent(id)
		if errors.Is(err, store.ErrNotFound) {
			ag, err = &store.Agent{ID: id}, nil
		}
		if err != nil {
			return err
		}
		ag.Revoked, ag.RevokedAt, ag.RevokedReason, ag.RevokedBy = true, now, reason, by
		if err := tx.PutAgent(ag); err != nil {
			return err
		}
		rv.agent = ag
		return appendAudit(ctx, tx, &store.AuditRecord{Event: store.EventAgentRevoke, AgentID: ag.ID, Actor: by,
			Reason: reason + " (its leases are too many for one store transaction: ending them in batches)"})
	})
	if err != nil {
		return nil, err
	}
	if rv.ended, err = s.drainLeases(ctx, store.LeaseFilter{AgentID: id}, "agent revoked: "+reason, now); err != nil {
		return nil, err
	}
	err = s.store.Update(ctx, func(tx store.Tx) error {
		delegated, err := delegatedBy(tx, id)
		if err != nil {
			return err
		}
		rv.grants, rv.delegatedLeases, err = deleteGrantTree(ctx, tx, delegated, "delegator "+id+" revoked", now)
		return err
	})
	return rv, err
}

// drainLeases ends the active leases f selects in batches that each fit
// one store transaction (halving the batch while it does not), for changes
// whose single transaction would exceed the store's limits (store/etcd). It
// returns the leases it ended; each has its audit record and upstream
// revocation as always.
func (s *Server) drainLeases(ctx context.Context, f store.LeaseFilter, reason string, now time.Time) ([]*store.Lease, error) {
	var all []*store.Lease
	for batch := 512; ; {
		var ended []*store.Lease
		err := s.store.Update(ctx, func(tx store.Tx) error {
			var err error
			ended, err = endActiveN(ctx, tx, f, reason, now, batch)
			return err
		})
		switch {
		case errors.Is(err, store.ErrTooLarge) && batch > 1:
			batch /= 2
			continue
		case err != nil:
			return all, err
		}
		all = append(all, ended...)
		if len(ended) < batch {
			return all, nil
		}
	}
}

// revocation is what revoking an agent ended.
type revocation struct {
	agent                   *store.Agent
	ended                   []*store.Lease
	grants, delegatedLeases int
}

// revokeAgentTx marks the agent revoked, ends its active leases, deletes
// everything it delegated (all the way down) and records it, in tx.
func revokeAgentTx(ctx context.Context, tx store.Tx, id, reason, by string, now time.Time) (*revocation, error) {
	ag, err := tx.GetAgent(id)
	if errors.Is(err, store.ErrNotFound) {
		ag, err = &store.Agent{ID: id}, nil
	}
	if err != nil {
		return nil, err
	}
	ag.Revoked, ag.RevokedAt, ag.RevokedReason, ag.RevokedBy = true, now, reason, by
	if err := tx.PutAgent(ag); err != nil {
		return nil, err
	}
	rv := &revocation{agent: ag}
	if rv.ended, err = endActive(ctx, tx, store.LeaseFilter{AgentID: ag.ID}, "agent revoked: "+reason, now); err != nil {
		return nil, err
	}
	// Whatever the agent delegated goes with it, all the way down.
	delegated, err := delegatedBy(tx, ag.ID)
	if err != nil {
		return nil, err
	}
	if rv.grants, rv.delegatedLeases, err = deleteGrantTree(ctx, tx, delegated, "delegator "+ag.ID+" revoked", now); err != nil {
		return nil, err
	}
	err = appendAudit(ctx, tx, &store.AuditRecord{Event: store.EventAgentRevoke, AgentID: ag.ID, Actor: by,
		Reason: fmt.Sprintf("%s (%d leases revoked; %d delegated grants deleted with %d leases)", reason, len(rv.ended),
			rv.grants, rv.delegatedLeases)})
	return rv, err
}

func (a *adminService) ReinstateAgent(ctx context.Context, req *leaseholdv1.ReinstateAgentRequest) (*leaseholdv1.ReinstateAgentResponse, error) {
	s := a.s
	id, err := validSpiffeID("spiffe_id", req.GetSpiffeId(), s.cfg.TrustDomain)
	if err != nil {
		return nil, err
	}
	var agent *store.Agent
	err = s.store.Update(ctx, func(tx store.Tx) error {
		ag, err := tx.GetAgent(id.String())
		if errors.Is(err, store.ErrNotFound) || (err == nil && !ag.Revoked) {
			return errPrecondition("spiffe_id: %s is not revoked", id)
		}
		if err != nil {
			return err
		}
		ag.Revoked, ag.RevokedAt, ag.RevokedReason, ag.RevokedBy = false, time.Time{}, "", ""
		if err := tx.PutAgent(ag); err != nil {
			return err
		}
		agent = ag
		return appendAudit(ctx, tx, &store.AuditRecord{Event: store.EventAgentReinstate, AgentID: ag.ID})
	})
	if err != nil {
		return nil, s.writeFailed(ctx, err)
	}
	return &leaseholdv1.ReinstateAgentResponse{Agent: agentToProto(agent)}, nil
}

func (a *adminService) ListAgents(ctx context.Context, req *leaseholdv1.ListAgentsRequest) (*leaseholdv1.ListAgentsResponse, error) {
	size, err := validPageSize("page_size", req.GetPageSize())
	if err != nil {
		return nil, err
	}
	after, err := parsePageToken("page_token", "agents", req.GetPageToken())
	if err != nil {
		return nil, err
	}
	var list []*store.Agent
	err = a.s.store.View(ctx, func(tx store.ReadTx) error {
		cursor := after
		for len(list) <= size {
			batch, err := tx.ListAgents(cursor, size+1)
			if err != nil || len(batch) == 0 {
				return err
			}
			for _, ag := range batch {
				if !req.GetRevokedOnly() || ag.Revoked {
					list = append(list, ag)
				}
			}
			cursor = batch[len(batch)-1].ID
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	out := &leaseholdv1.ListAgentsResponse{}
	list, out.NextPageToken = page(list, size, "agents", func(ag *store.Agent) string { return ag.ID })
	for _, ag := range list {
		out.Agents = append(out.Agents, agentToProto(ag))
	}
	return out, nil
}

// ---- leases ----

func (a *adminService) ListLeases(ctx context.Context, req *leaseholdv1.ListLeasesRequest) (*leaseholdv1.ListLeasesResponse, error) {
	f := store.LeaseFilter{ActiveOnly: req.GetActiveOnly()}
	if req.GetAgentId() != "" {
		id, err := validSpiffeID("agent_id", req.GetAgentId(), a.s.cfg.TrustDomain)
		if err != nil {
			return nil, err
		}
		f.AgentID = id.String()
	}
	if err := validTaskID("task_id", req.GetTaskId(), false); err != nil {
		return nil, err
	}
	f.TaskID = req.GetTaskId()
	size, err := validPageSize("page_size", req.GetPageSize())
	if err != nil {
		return nil, err
	}
	after, err := parsePageToken("page_token", "leases", req.GetPageToken())
	if err != nil {
		return nil, err
	}
	var list []*store.Lease
	revs := map[string]*store.Revocation{}
	if err := a.s.store.View(ctx, func(tx store.ReadTx) error {
		if list, err = tx.ListLeases(f, after, size+1); err != nil {
			return err
		}
		for _, l := range list {
			if len(l.Artifact) == 0 || l.UpstreamRevoked || l.State == store.LeaseActive {
				continue
			}
			r, err := tx.GetRevocation(l.ID)
			if err != nil && !errors.Is(err, store.ErrNotFound) {
				return err
			}
			revs[l.ID] = r
		}
		return nil
	}); err != nil {
		return nil, err
	}
	out := &leaseholdv1.ListLeasesResponse{}
	list, out.NextPageToken = page(list, size, "leases", func(l *store.Lease) string { return l.ID })
	for _, l := range list {
		out.Leases = append(out.Leases, leaseToProto(l, revs[l.ID]))
	}
	return out, nil
}

func (a *adminService) RevokeLease(ctx context.Context, req *leaseholdv1.RevokeLeaseRequest) (*leaseholdv1.RevokeLeaseResponse, error) {
	s := a.s
	if err := validLeaseID("lease_id", req.GetLeaseId()); err != nil {
		return nil, err
	}
	if err := validText("reason", req.GetReason()); err != nil {
		return nil, err
	}
	reason := "revoked by admin"
	if req.GetReason() != "" {
		reason += ": " + req.GetReason()
	}
	now := s.now()
	var out *store.Lease
	err := s.store.Update(ctx, func(tx store.Tx) error {
		l, err := tx.GetLease(req.GetLeaseId())
		if err != nil {
			return err
		}
		if l.State != store.LeaseActive {
			return errPrecondition("lease_id: lease %s is already %s", l.ID, l.State)
		}
		out = l
		return endLease(ctx, tx, l, store.LeaseRevoked, reason, now, nil)
	})
	if err != nil {
		return nil, s.writeFailed(ctx, err)
	}
	return &leaseholdv1.RevokeLeaseResponse{Lease: leaseToProto(out)}, nil
}

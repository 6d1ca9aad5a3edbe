package server

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"go.opentelemetry.io/otel/attribute"
	"google.golang.org/grpc/codes"

	"github.com/leasehold/leasehold/backends"
	leaseholdv1 "github.com/leasehold/leasehold/proto/leasehold/v1"
	"github.com/leasehold/leasehold/store"
)

// newID returns prefix and 32 hex digits: 48 bits of milliseconds since the
// epoch, then 80 random bits. Ids made close in time sort next to each other,
// so the store appends them to the same few pages instead of touching a
// random page of every id-keyed bucket and index on each write. Ids are
// names, not secrets: every use is checked against the caller's identity.
func newID(prefix string) string {
	var b [16]byte
	ms := uint64(time.Now().UnixMilli())
	for i := range 6 {
		b[i] = byte(ms >> (8 * (5 - i)))
	}
	_, _ = rand.Read(b[6:])
	return prefix + hex.EncodeToString(b[:])
}

// grantMatches reports whether g's subject covers id: the exact ID, or an ID
// at or below the grant's path prefix.
func grantMatches(g *store.Grant, id spiffeid.ID) bool {
	if g.SpiffeID != "" {
		return g.SpiffeID == id.String()
	}
	p, err := spiffeid.FromString(g.SpiffeIDPrefix)
	if err != nil || p.TrustDomain() != id.TrustDomain() {
		return false
	}
	return id.Path() == p.Path() || strings.HasPrefix(id.Path(), p.Path()+"/")
}

// policy is the outcome of evaluating an acquire against the store.
type policy struct {
	cred     *store.Credential
	grant    *store.Grant   // the grant that allows it, when denial is nil
	matching []*store.Grant // every grant on the credential whose subject covers the caller
	denial   error          // why not: PermissionDenied or NotFound
	anomaly  *anomaly       // set when denial is the anomaly guard's
}

// evaluate decides an acquire: the agent is not revoked, the credential
// exists, and a grant covers the caller, the scopes and the ttl. It reads
// only; the caller records the decision.
func (s *Server) evaluate(tx store.ReadTx, caller spiffeid.ID, credential string, scopes []string, ttl time.Duration, task string, now time.Time) (*policy, error) {
	p := &policy{}
	if err := checkAgentActive(tx, caller.String()); err != nil {
		if !isDenied(err) {
			return nil, err
		}
		p.denial = err
		return p, nil
	}
	c, err := tx.GetCredential(credential)
	if errors.Is(err, store.ErrNotFound) {
		p.denial = errNotFound("credential %q not found", credential)
		return p, nil
	}
	if err != nil {
		return nil, err
	}
	grants, err := tx.ListGrants(c.Name, "", 0)
	if err != nil {
		return nil, err
	}
	for _, g := range grants {
		if grantMatches(g, caller) {
			p.matching = append(p.matching, g)
		}
	}
	p.cred = c
	p.grant, p.denial = pickGrant(p.matching, caller, c.Name, scopes, ttl, task, now)
	return p, nil
}

// pickGrant finds, among grants whose subject covers caller, one that allows
// the scopes, ttl and task now, or returns the most specific denial.
func pickGrant(grants []*store.Grant, caller spiffeid.ID, credential string, scopes []string, ttl time.Duration, task string, now time.Time) (*store.Grant, error) {
	var specific error
	matched := len(grants) > 0
	for _, g := range grants {
		if !backends.SubsetOf(scopes, g.Scopes) {
			continue
		}
		switch {
		case !g.ExpiresAt.IsZero() && !now.Before(g.ExpiresAt):
			specific = errDenied("grant %s expired at %s", g.ID, g.ExpiresAt.UTC().Format(time.RFC3339))
		case g.TaskID != "" && !inTaskTree(task, g.TaskID):
			specific = errDenied("task: grant %s allows only task %s and its subtasks, not %q", g.ID, g.TaskID, task)
		case ttl > g.MaxTTL:
			specific = errDenied("ttl: %v exceeds the grant's max_ttl %v", ttl, g.MaxTTL)
		default:
			return g, nil
		}
	}
	switch {
	case !matched:
		return nil, errDenied("no grant allows %s to lease %q", caller, credential)
	case specific != nil:
		return nil, specific
	}
	return nil, errDenied("scopes: %s not granted to %s for %q", strings.Join(scopes, ","), caller, credential)
}

// inTaskTree reports whether task is root or one of its subtasks.
func inTaskTree(task, root string) bool {
	return task == root || strings.HasPrefix(task, root+"/")
}

func checkAgentActive(tx store.ReadTx, agent string) error {
	a, err := tx.GetAgent(agent)
	switch {
	case errors.Is(err, store.ErrNotFound):
		return nil
	case err != nil:
		return err
	case a.Revoked:
		return errDenied("agent %s is revoked", agent)
	}
	return nil
}

// lastSeenResolution is how stale an agent's LastSeen may get before an
// acquire rewrites it. Rewriting the agent record on every acquire would add
// a write to the hot path for a field read by humans.
const lastSeenResolution = time.Minute

// admitAgent denies a revoked agent and records that the broker has seen it
// (first seen, and last seen to within lastSeenResolution), reading the
// agent record once.
func admitAgent(tx store.Tx, agent string, now time.Time) error {
	a, err := tx.GetAgent(agent)
	switch {
	case errors.Is(err, store.ErrNotFound):
		a = &store.Agent{ID: agent, FirstSeen: now}
	case err != nil:
		return err
	case a.Revoked:
		return errDenied("agent %s is revoked", agent)
	case now.Sub(a.LastSeen) < lastSeenResolution:
		return nil
	}
	a.LastSeen = now
	return tx.PutAgent(a)
}

func versionAAD(name string, version uint64) []byte {
	return []byte("leasehold/credential/" + name + "/v" + strconv.FormatUint(version, 10))
}

func credentialAAD(name string) []byte { return []byte("leasehold/credential/" + name) }

func leaseAAD(id string) []byte { return []byte("leasehold/lease/" + id) }

// openSecret decrypts a credential version. The caller must clear the result.
func (s *Server) openSecret(c *store.Credential, v *store.CredentialVersion) (map[string][]byte, error) {
	pt, err := s.keyring.Open(c.WrappedKey, credentialAAD(c.Name), v.Sealed, versionAAD(c.Name, v.Version))
	if err != nil {
		return nil, fmt.Errorf("open credential %q version %d: %w", c.Name, v.Version, err)
	}
	defer clear(pt)
	var m map[string]string
	if err := json.Unmarshal(pt, &m); err != nil {
		return nil, fmt.Errorf("decode credential %q version %d: %w", c.Name, v.Version, err)
	}
	out := make(map[string][]byte, len(m))
	for k, val := range m {
		out[k] = []byte(val)
	}
	return out, nil
}

func clearSecret(m map[string][]byte) {
	for _, v := range m {
		clear(v)
	}
}

func (s *Server) acquire(ctx context.Context, caller spiffeid.ID, req *leaseholdv1.AcquireLeaseRequest, ttl time.Duration) (_ *leaseholdv1.AcquireLeaseResponse, err error) {
	now := s.now()
	agent := caller.String()
	ctx, span := s.startSpan(ctx, "lease.acquire", attrAgent.String(agent), attrCredential.String(req.GetCredential()),
		attrScopes.StringSlice(req.GetScopes()), attrTask.String(req.GetTask().GetId()))
	start := time.Now()
	defer func() { s.endOp(ctx, span, "lease.acquire", start, err) }()
	rec := &store.AuditRecord{
		Event: store.EventLeaseAcquire, AgentID: agent, Credential: req.GetCredential(),
		Scopes: req.GetScopes(), TaskID: req.GetTask().GetId(), TaskPurpose: req.GetTask().GetPurpose(),
	}

	var (
		p       *policy
		version *store.CredentialVersion
		twin    *store.Lease
	)
	scopeKey := slices.Clone(req.GetScopes())
	slices.Sort(scopeKey)
	defer s.same.lock(agent + "\x00" + req.GetTask().GetId() + "\x00" + req.GetCredential() + "\x00" + strings.Join(scopeKey, ","))()
	if !s.limits.allow(agent, req.GetCredential()) {
		return nil, s.deny(ctx, rec, errQuota("%s is acquiring %q faster than %v per second; slow down",
			agent, req.GetCredential(), s.cfg.AcquireRate))
	}
	pctx, pspan := s.startSpan(ctx, "policy.evaluate")
	err = s.store.View(pctx, func(tx store.ReadTx) error {
		var err error
		if p, err = s.evaluate(tx, caller, req.GetCredential(), req.GetScopes(), ttl, req.GetTask().GetId(), now); err != nil {
			return err
		}
		// Outside the task's expected credentials is an anomaly, whether
		// or not a grant would allow it. (p.cred is nil for a revoked agent
		// or an unknown credential: those are refused as such.)
		if p.cred != nil {
			if p.anomaly, err = taskAnomaly(tx, agent, req.GetTask().GetId(), req.GetCredential()); err != nil {
				return err
			}
			if p.anomaly != nil {
				p.denial = p.anomaly.denial(req.GetTask().GetId(), req.GetCredential())
				return nil
			}
		}
		if p.denial != nil {
			return nil
		}
		if twin, err = liveTwin(tx, agent, req.GetTask().GetId(), req.GetCredential(), req.GetScopes(), p.cred.CurrentVersion, now); err != nil || twin != nil {
			return err
		}
		if qerr := s.checkQuotas(tx, agent, req.GetTask().GetId()); qerr != nil {
			if codeOf(qerr) != codes.ResourceExhausted {
				return qerr
			}
			p.denial = qerr
			return nil
		}
		version, err = tx.GetCredentialVersion(p.cred.Name, p.cred.CurrentVersion)
		return err
	})
	if err == nil && p != nil {
		endSpan(pspan, p.denial)
	} else {
		endSpan(pspan, err)
	}
	if err != nil {
		return nil, err
	}
	if p.denial != nil {
		if codeOf(p.denial) == codes.NotFound {
			return nil, p.denial // bad input: answered, not recorded
		}
		if p.anomaly != nil {
			return nil, s.denyAnomaly(ctx, rec, p.anomaly, p.denial)
		}
		return nil, s.deny(ctx, rec, p.denial)
	}
	if twin != nil {
		out, err := s.returnTwin(ctx, rec, twin, now)
		if !errors.Is(err, errTwinGone) {
			return out, err
		}
		// It ended meanwhile: issue a new lease after all.
		err = s.store.View(ctx, func(tx store.ReadTx) error {
			if qerr := s.checkQuotas(tx, agent, req.GetTask().GetId()); qerr != nil {
				return qerr
			}
			var err error
			version, err = tx.GetCredentialVersion(p.cred.Name, p.cred.CurrentVersion)
			return err
		})
		if err != nil {
			if codeOf(err) == codes.ResourceExhausted {
				return nil, s.deny(ctx, rec, err)
			}
			return nil, err
		}
	}
	cred, grant := p.cred, p.grant

	if ttl == 0 {
		ttl = min(s.cfg.DefaultTTL, grant.MaxTTL)
	}
	maxExpires := now.Add(grant.MaxLifetime)
	if !grant.ExpiresAt.IsZero() && grant.ExpiresAt.Before(maxExpires) {
		maxExpires = grant.ExpiresAt // no lease outlives its grant
	}
	expires := now.Add(ttl)
	if expires.After(maxExpires) {
		expires = maxExpires
	}
	backend, err := s.backends.Lookup(cred.Backend)
	if err != nil {
		return nil, errPrecondition("credential %q uses backend %q, which this broker does not have", cred.Name, cred.Backend)
	}
	secret, err := s.openSecret(cred, version)
	if err != nil {
		return nil, err
	}
	defer clearSecret(secret)
	lease := &store.Lease{
		ID: newID("ls_"), AgentID: agent, Credential: cred.Name, Backend: cred.Backend,
		Scopes: slices.Clone(req.GetScopes()), TaskID: rec.TaskID, TaskPurpose: rec.TaskPurpose,
		GrantID: grant.ID, State: store.LeaseActive, TTL: ttl, IssuedAt: now,
		ExpiresAt: expires, MaxExpiresAt: maxExpires, CredentialVersion: version.Version,
		DelegationChain: grant.Chain,
	}
	span.SetAttributes(attrLease.String(lease.ID))
	spec := backends.Spec{Name: cred.Name, Config: cred.Config, Secret: secret}
	bctx, bspan := s.startSpan(ctx, "backend.issue", attribute.String("leasehold.backend", cred.Backend))
	issued, err := backend.Issue(bctx, backends.IssueRequest{
		Spec: spec, LeaseID: lease.ID, AgentID: agent, TaskID: lease.TaskID, Scopes: lease.Scopes, ExpiresAt: expires,
		UpdateSecret: s.secretUpdater(cred.Name, agent),
	})
	endSpan(bspan, err)
	if err != nil {
		return nil, issueError(cred, err)
	}
	defer clearSecret(issued.Secret)
	defer clear(issued.Artifact)
	if !issued.ExpiresAt.IsZero() && issued.ExpiresAt.Before(lease.ExpiresAt) {
		lease.ExpiresAt = issued.ExpiresAt
	}
	if len(issued.Artifact) > 0 {
		err = s.sealArtifact(lease, issued.Artifact, spec, issued.Secret)
		if err != nil {
			s.revokeNow(ctx, lease, issued.Artifact, spec)
			clear(issued.Artifact)
			return nil, fmt.Errorf("seal artifact: %w", err)
		}
	}

	rec.LeaseID, rec.GrantID, rec.DelegationChain = lease.ID, grant.ID, grant.Chain
	rec.Reason = fmt.Sprintf("allowed by grant %s; version %d; expires %s", grant.ID, version.Version, lease.ExpiresAt.UTC().Format(time.RFC3339))
	// Commit the lease and its audit record together. The writer re-checks
	// what a concurrent RevokeAgent or DeleteGrant may have changed since the
	// read above; the secret leaves only after this commit is durable.
	cctx, cspan := s.startSpan(ctx, "store.commit")
	var dup *twinSecret
	err = s.store.Update(cctx, func(tx store.Tx) error {
		if err := admitAgent(tx, agent, now); err != nil {
			return err
		}
		if _, err := tx.GetGrant(grant.ID); err != nil {
			if errors.Is(err, store.ErrNotFound) {
				return errDenied("grant %s was deleted", grant.ID)
			}
			return err
		}
		// A concurrent identical acquire committed first: return its lease
		// instead, and destroy what was issued for this one below.
		dup = nil
		t, err := liveTwin(tx, agent, lease.TaskID, lease.Credential, lease.Scopes, lease.CredentialVersion, now)
		if err != nil {
			return err
		}
		if t != nil {
			dup = &twinSecret{lease: t}
			if err := dup.load(tx); err != nil {
				return err
			}
			return appendAudit(ctx, tx, twinRecord(rec, t))
		}
		if err := s.checkQuotas(tx, agent, lease.TaskID); err != nil {
			return err
		}
		// A concurrent acquire in the same task may have committed a lease
		// under a grant that expects other credentials.
		if a, err := taskAnomaly(tx, agent, lease.TaskID, lease.Credential); err != nil {
			return err
		} else if a != nil {
			return &anomalyError{a}
		}
		if err := tx.PutLease(lease); err != nil {
			return err
		}
		return appendAudit(ctx, tx, rec)
	})
	endSpan(cspan, err)
	if err == nil && dup != nil {
		s.revokeNow(ctx, lease, issued.Artifact, spec)
		return s.twinResponse(dup)
	}
	if err != nil {
		// Nothing durable says this artifact exists: destroy it now.
		s.revokeNow(ctx, lease, issued.Artifact, spec)
		var an *anomalyError
		if errors.As(err, &an) {
			return nil, s.denyAnomaly(ctx, rec, an.a, an.a.denial(lease.TaskID, lease.Credential))
		}
		var ae *apiError
		if errors.As(err, &ae) && (ae.code == codes.PermissionDenied || ae.code == codes.ResourceExhausted) {
			return nil, s.deny(ctx, rec, err)
		}
		return nil, s.writeFailed(ctx, err)
	}
	out := &leaseholdv1.AcquireLeaseResponse{Lease: leaseToProto(lease), Secret: make(map[string]string, len(issued.Secret))}
	for k, v := range issued.Secret {
		out.Secret[k] = string(v)
	}
	return out, nil
}

// errTwinGone: the live lease an acquire would have returned ended before
// the return was committed.
var errTwinGone = errors.New("twin lease ended")

func twinRecord(rec *store.AuditRecord, t *store.Lease) *store.AuditRecord {
	r := *rec
	r.LeaseID, r.GrantID, r.DelegationChain = t.ID, t.GrantID, t.DelegationChain
	r.Reason = fmt.Sprintf("returned the caller's live lease %s for the same task, credential and scopes (idempotent acquire); expires %s",
		t.ID, t.ExpiresAt.UTC().Format(time.RFC3339))
	return &r
}

// returnTwin answers an acquire with the caller's live identical lease,
// after recording that durably, as any acquire.
func (s *Server) returnTwin(ctx context.Context, rec *store.AuditRecord, twin *store.Lease, now time.Time) (*leaseholdv1.AcquireLeaseResponse, error) {
	ts := &twinSecret{}
	r := twinRecord(rec, twin)
	err := s.store.Update(ctx, func(tx store.Tx) error {
		if err := admitAgent(tx, twin.AgentID, now); err != nil {
			return err
		}
		l, err := tx.GetLease(twin.ID)
		if err != nil {
			return err
		}
		if !l.Active(now) {
			return errTwinGone
		}
		if _, err := tx.GetGrant(l.GrantID); err != nil {
			if errors.Is(err, store.ErrNotFound) {
				return errDenied("grant %s was deleted", l.GrantID)
			}
			return err
		}
		ts.lease = l
		if err := ts.load(tx); err != nil {
			return err
		}
		return appendAudit(ctx, tx, r)
	})
	switch {
	case errors.Is(err, errTwinGone):
		return nil, err
	case isDenied(err):
		return nil, s.deny(ctx, rec, err)
	case err != nil:
		return nil, s.writeFailed(ctx, err)
	}
	return s.twinResponse(ts)
}

func (s *Server) twinResponse(t *twinSecret) (*leaseholdv1.AcquireLeaseResponse, error) {
	secret, err := s.openTwin(t)
	if err != nil {
		return nil, err
	}
	defer clearSecret(secret)
	out := &leaseholdv1.AcquireLeaseResponse{Lease: leaseToProto(t.lease), Secret: make(map[string]string, len(secret))}
	for k, v := range secret {
		out.Secret[k] = string(v)
	}
	return out, nil
}

// ownedLease loads a lease for its holder: NotFound when it does not exist,
// PermissionDenied (audited by the caller) when it belongs to someone else.
func ownedLease(tx store.ReadTx, id string, caller spiffeid.ID) (*store.Lease, error) {
	l, err := tx.GetLease(id)
	if errors.Is(err, store.ErrNotFound) {
		return nil, errNotFound("lease %s not found", id)
	}
	if err != nil {
		return nil, err
	}
	if l.AgentID != caller.String() {
		return l, errDenied("lease %s belongs to another agent", id)
	}
	return l, nil
}

func (s *Server) renew(ctx context.Context, caller spiffeid.ID, id string, ttl time.Duration) (_ *store.Lease, _ map[string][]byte, err error) {
	now := s.now()
	ctx, span := s.startSpan(ctx, "lease.renew", attrAgent.String(caller.String()), attrLease.String(id))
	start := time.Now()
	defer func() { s.endOp(ctx, span, "lease.renew", start, err) }()
	rec := &store.AuditRecord{Event: store.EventLeaseRenew, AgentID: caller.String(), LeaseID: id}
	var lease *store.Lease
	var grant *store.Grant
	var denial error
	err = s.store.View(ctx, func(tx store.ReadTx) error {
		l, err := ownedLease(tx, id, caller)
		if l != nil {
			rec.Credential, rec.Scopes, rec.TaskID, rec.TaskPurpose = l.Credential, l.Scopes, l.TaskID, l.TaskPurpose
			rec.DelegationChain = l.DelegationChain
		}
		if isDenied(err) {
			denial = err
			return nil
		}
		if err != nil {
			return err
		}
		if denial = checkAgentActive(tx, caller.String()); denial != nil {
			return nil
		}
		if !l.Active(now) {
			return errPrecondition("lease_id: lease %s is %s and cannot be renewed", id, effectiveState(l, now))
		}
		if ttl == 0 {
			ttl = l.TTL
		}
		g, err := tx.GetGrant(l.GrantID)
		if errors.Is(err, store.ErrNotFound) {
			return errPrecondition("lease_id: the grant behind lease %s was deleted", id)
		}
		if err != nil {
			return err
		}
		if ttl > g.MaxTTL {
			denial = errDenied("ttl: %v exceeds the grant's max_ttl %v", ttl, g.MaxTTL)
			return nil
		}
		lease, grant = l, g
		return nil
	})
	if err != nil {
		return nil, nil, err
	}
	if denial != nil {
		return nil, nil, s.deny(ctx, rec, denial)
	}
	expires := now.Add(ttl)
	if expires.After(lease.MaxExpiresAt) {
		expires = lease.MaxExpiresAt
	}
	// Dynamic leases: extend the upstream credential, or, where it cannot
	// be extended, issue a new one (the old one is revoked below).
	var re *reissue
	if len(lease.Artifact) > 0 {
		got, r, err := s.renewUpstream(ctx, lease, expires)
		if err != nil {
			return nil, nil, err
		}
		if r != nil {
			re = r
			defer re.clear()
		}
		if got.Before(expires) {
			expires = got
		}
	}
	rec.GrantID = grant.ID
	rec.Reason = "expires " + expires.UTC().Format(time.RFC3339)
	var out *store.Lease
	err = s.store.Update(ctx, func(tx store.Tx) error {
		l, err := ownedLease(tx, id, caller)
		if err != nil {
			return err
		}
		if err := checkAgentActive(tx, caller.String()); err != nil {
			return err
		}
		if !l.Active(now) {
			return errPrecondition("lease_id: lease %s is %s and cannot be renewed", id, effectiveState(l, now))
		}
		if expires.After(l.ExpiresAt) || re != nil {
			l.ExpiresAt = expires
		}
		if re != nil {
			l.ArtifactKey, l.Artifact, l.RevokeSpec, l.SealedSecret = re.sealed.ArtifactKey, re.sealed.Artifact, re.sealed.RevokeSpec, re.sealed.SealedSecret
		}
		if err := tx.PutLease(l); err != nil {
			return err
		}
		out = l
		return appendAudit(ctx, tx, rec)
	})
	if err != nil {
		if re != nil {
			s.revokeNow(ctx, lease, re.issued.Artifact, re.old.Spec) // the new one never left
		}
		if isDenied(err) {
			return nil, nil, s.deny(ctx, rec, err)
		}
		return nil, nil, s.writeFailed(ctx, err)
	}
	if re == nil {
		return out, nil, nil
	}
	// The agent now holds the new credential; the old one goes.
	s.revokeNow(ctx, lease, re.old.Artifact, re.old.Spec)
	secret := make(map[string][]byte, len(re.issued.Secret))
	for k, v := range re.issued.Secret {
		secret[k] = slices.Clone(v)
	}
	return out, secret, nil
}

func (s *Server) release(ctx context.Context, caller spiffeid.ID, id string) (_ *store.Lease, err error) {
	now := s.now()
	ctx, span := s.startSpan(ctx, "lease.release", attrAgent.String(caller.String()), attrLease.String(id))
	start := time.Now()
	defer func() { s.endOp(ctx, span, "lease.release", start, err) }()
	rec := &store.AuditRecord{Event: store.EventLeaseRelease, AgentID: caller.String(), LeaseID: id}
	var out *store.Lease
	err = s.store.Update(ctx, func(tx store.Tx) error {
		l, err := ownedLease(tx, id, caller)
		if l != nil {
			rec.Credential, rec.Scopes, rec.TaskID, rec.TaskPurpose, rec.GrantID = l.Credential, l.Scopes, l.TaskID, l.TaskPurpose, l.GrantID
			rec.DelegationChain = l.DelegationChain
		}
		if err != nil {
			return err
		}
		out = l
		if l.State != store.LeaseActive {
			return nil // already ended: releasing is idempotent
		}
		return endLease(ctx, tx, l, store.LeaseReleased, "released by its holder", now, rec)
	})
	if err != nil {
		if isDenied(err) {
			return nil, s.deny(ctx, rec, err)
		}
		return nil, s.writeFailed(ctx, err)
	}
	return out, nil
}

// endLease ends an active lease in tx, queues its upstream artifact for
// revocation and appends its audit record. rec may be nil, in which case one
// is built from the lease.
func endLease(ctx context.Context, tx store.Tx, l *store.Lease, state store.LeaseState, reason string, now time.Time, rec *store.AuditRecord) error {
	l.State, l.EndedAt, l.EndReason = state, now, reason
	if err := tx.PutLease(l); err != nil {
		return err
	}
	// Whatever the lease created upstream is queued for destruction in the
	// same transaction: once this commits, the revocation cannot be lost.
	if len(l.Artifact) > 0 && !l.UpstreamRevoked {
		if err := tx.PutRevocation(&store.Revocation{LeaseID: l.ID, NextAttempt: now, CreatedAt: now}); err != nil {
			return err
		}
	}
	if rec == nil {
		rec = &store.AuditRecord{AgentID: l.AgentID}
	}
	switch state {
	case store.LeaseReleased:
		rec.Event = store.EventLeaseRelease
	case store.LeaseExpired:
		rec.Event = store.EventLeaseExpire
	default:
		rec.Event = store.EventLeaseRevoke
	}
	rec.LeaseID, rec.Credential, rec.Scopes, rec.TaskID, rec.TaskPurpose, rec.GrantID = l.ID, l.Credential, l.Scopes, l.TaskID, l.TaskPurpose, l.GrantID
	rec.DelegationChain = l.DelegationChain
	rec.Reason = reason
	return appendAudit(ctx, tx, rec)
}

// endActive ends every active lease matching f in tx, for revocations.
func endActive(ctx context.Context, tx store.Tx, f store.LeaseFilter, reason string, now time.Time) ([]*store.Lease, error) {
	return endActiveN(ctx, tx, f, reason, now, 0)
}

// endActiveN ends at most limit of the active leases f selects (0: all).
func endActiveN(ctx context.Context, tx store.Tx, f store.LeaseFilter, reason string, now time.Time, limit int) ([]*store.Lease, error) {
	f.ActiveOnly = true
	leases, err := tx.ListLeases(f, "", limit)
	if err != nil {
		return nil, err
	}
	for _, l := range leases {
		if err := endLease(ctx, tx, l, store.LeaseRevoked, reason, now, nil); err != nil {
			return nil, err
		}
	}
	return leases, nil
}

func effectiveState(l *store.Lease, now time.Time) store.LeaseState {
	if l.State == store.LeaseActive && !now.Before(l.ExpiresAt) {
		return store.LeaseExpired
	}
	return l.State
}

func isDenied(err error) bool {
	var ae *apiError
	return errors.As(err, &ae) && ae.code == codes.PermissionDenied
}

// specAAD binds a lease's sealed credential snapshot to the lease.
func specAAD(id string) []byte { return []byte("leasehold/lease/" + id + "/spec") }

// sealArtifact stores a dynamic lease's upstream artifact and a snapshot of
// the credential's config and secret, both sealed under a per-lease key.
func (s *Server) sealArtifact(l *store.Lease, artifact []byte, spec backends.Spec, issued map[string][]byte) error {
	key, err := s.keyring.NewDataKey(leaseAAD(l.ID))
	if err != nil {
		return err
	}
	sealed, err := s.keyring.Seal(key, leaseAAD(l.ID), artifact, leaseAAD(l.ID))
	if err != nil {
		return err
	}
	snap := map[string]any{"config": spec.Config, "secret": spec.Secret}
	plain, err := json.Marshal(snap)
	if err != nil {
		return err
	}
	defer clear(plain)
	sealedSpec, err := s.keyring.Seal(key, leaseAAD(l.ID), plain, specAAD(l.ID))
	if err != nil {
		return err
	}
	secret, err := json.Marshal(issued)
	if err != nil {
		return err
	}
	defer clear(secret)
	sealedSecret, err := s.keyring.Seal(key, leaseAAD(l.ID), secret, secretAAD(l.ID))
	if err != nil {
		return err
	}
	l.ArtifactKey, l.Artifact, l.RevokeSpec, l.SealedSecret = key, sealed, sealedSpec, sealedSecret
	return nil
}

// secretAAD binds a lease's sealed issued secret to the lease.
func secretAAD(id string) []byte { return []byte("leasehold/lease/" + id + "/secret") }

// liveTwin returns the caller's live lease for the same task, credential
// (at its current version) and scopes, if there is one: acquiring again
// returns it (idempotent acquire) instead of minting another, so an agent
// that retries after a timeout does not pile up leases.
func liveTwin(tx store.ReadTx, agent, task, credential string, scopes []string, version uint64, now time.Time) (*store.Lease, error) {
	leases, err := tx.ListLeases(store.LeaseFilter{AgentID: agent, TaskID: task, ActiveOnly: true}, "", 0)
	if err != nil {
		return nil, err
	}
	for _, l := range leases {
		// A lease of an older credential version is no twin: a new acquire
		// gets the current version.
		if l.Credential == credential && l.CredentialVersion == version && sameSet(l.Scopes, scopes) && l.Active(now) &&
			(len(l.Artifact) == 0 || len(l.SealedSecret) > 0) {
			return l, nil
		}
	}
	return nil, nil
}

func sameSet(a, b []string) bool {
	return backends.SubsetOf(a, b) && backends.SubsetOf(b, a)
}

// twinSecret is what a twin lease handed out: a dynamic lease's sealed
// issued secret, or a static lease's credential version.
type twinSecret struct {
	lease   *store.Lease
	cred    *store.Credential
	version *store.CredentialVersion
}

// load reads, inside tx, what open will decrypt.
func (t *twinSecret) load(tx store.ReadTx) error {
	if len(t.lease.SealedSecret) > 0 {
		return nil
	}
	var err error
	if t.cred, err = tx.GetCredential(t.lease.Credential); err != nil {
		return err
	}
	t.version, err = tx.GetCredentialVersion(t.lease.Credential, t.lease.CredentialVersion)
	return err
}

func (s *Server) openTwin(t *twinSecret) (map[string][]byte, error) {
	l := t.lease
	if len(l.SealedSecret) > 0 {
		pt, err := s.keyring.Open(l.ArtifactKey, leaseAAD(l.ID), l.SealedSecret, secretAAD(l.ID))
		if err != nil {
			return nil, fmt.Errorf("open lease %s secret: %w", l.ID, err)
		}
		defer clear(pt)
		var m map[string][]byte
		if err := json.Unmarshal(pt, &m); err != nil {
			return nil, fmt.Errorf("decode lease %s secret: %w", l.ID, err)
		}
		return m, nil
	}
	return s.openSecret(t.cred, t.version)
}

// leaseRef opens what a backend needs to renew or revoke a lease's
// artifact: the credential as it is now, or, if it was deleted or changed
// backend, the snapshot taken at issue. The caller must clear the result.
func (s *Server) leaseRef(tx store.ReadTx, l *store.Lease) (backends.LeaseRef, error) {
	ref := backends.LeaseRef{LeaseID: l.ID}
	artifact, err := s.keyring.Open(l.ArtifactKey, leaseAAD(l.ID), l.Artifact, leaseAAD(l.ID))
	if err != nil {
		return ref, fmt.Errorf("open lease %s artifact: %w", l.ID, err)
	}
	ref.Artifact = artifact
	c, err := tx.GetCredential(l.Credential)
	if err == nil && c.Backend == l.Backend {
		v, verr := tx.GetCredentialVersion(c.Name, c.CurrentVersion)
		if verr == nil {
			secret, oerr := s.openSecret(c, v)
			if oerr == nil {
				ref.Spec = backends.Spec{Name: c.Name, Config: c.Config, Secret: secret}
				return ref, nil
			}
		}
	} else if err != nil && !errors.Is(err, store.ErrNotFound) {
		return ref, err
	}
	plain, err := s.keyring.Open(l.ArtifactKey, leaseAAD(l.ID), l.RevokeSpec, specAAD(l.ID))
	if err != nil {
		return ref, fmt.Errorf("open lease %s credential snapshot: %w", l.ID, err)
	}
	defer clear(plain)
	var snap struct {
		Config map[string]string `json:"config"`
		Secret map[string][]byte `json:"secret"`
	}
	if err := json.Unmarshal(plain, &snap); err != nil {
		return ref, fmt.Errorf("decode lease %s credential snapshot: %w", l.ID, err)
	}
	ref.Spec = backends.Spec{Name: l.Credential, Config: snap.Config, Secret: snap.Secret}
	return ref, nil
}

func clearRef(ref backends.LeaseRef) {
	clear(ref.Artifact)
	clearSecret(ref.Spec.Secret)
}

// revokeNow destroys an artifact that never became durable (the lease's
// commit failed). Best effort: it is logged when it fails, and the
// upstream credential still expires on its own (e.g. VALID UNTIL).
func (s *Server) revokeNow(ctx context.Context, l *store.Lease, artifact []byte, spec backends.Spec) {
	if len(artifact) == 0 {
		return
	}
	b, err := s.backends.Lookup(l.Backend)
	if err == nil {
		err = b.Revoke(context.WithoutCancel(ctx), backends.LeaseRef{Spec: spec, LeaseID: l.ID, Artifact: artifact})
	}
	if err != nil {
		s.log.ErrorContext(ctx, "revoking an unrecorded artifact failed; it expires upstream on its own",
			"lease_id", l.ID, "backend", l.Backend, "error", err.Error())
	}
}

func (s *Server) renewUpstream(ctx context.Context, l *store.Lease, expires time.Time) (time.Time, *reissue, error) {
	b, err := s.backends.Lookup(l.Backend)
	if err != nil {
		return time.Time{}, nil, errPrecondition("lease %s uses backend %q, which this broker does not have", l.ID, l.Backend)
	}
	var ref backends.LeaseRef
	if err := s.store.View(ctx, func(tx store.ReadTx) error {
		ref, err = s.leaseRef(tx, l)
		return err
	}); err != nil {
		return time.Time{}, nil, err
	}
	if r, ok := b.(backends.Reissuer); ok && r.ReissueOnRenew(ref.Spec) {
		ctx, span := s.startSpan(ctx, "backend.issue", attribute.String("leasehold.backend", l.Backend))
		issued, err := b.Issue(ctx, backends.IssueRequest{Spec: ref.Spec, LeaseID: l.ID, AgentID: l.AgentID, TaskID: l.TaskID,
			Scopes: l.Scopes, ExpiresAt: expires})
		endSpan(span, err)
		if err != nil {
			clearRef(ref)
			return time.Time{}, nil, issueError(&store.Credential{Name: l.Credential, Backend: l.Backend}, err)
		}
		re := &reissue{old: ref, issued: issued, sealed: &store.Lease{ID: l.ID}}
		if err := s.sealArtifact(re.sealed, issued.Artifact, ref.Spec, issued.Secret); err != nil {
			s.revokeNow(ctx, l, issued.Artifact, ref.Spec)
			re.clear()
			return time.Time{}, nil, fmt.Errorf("seal artifact: %w", err)
		}
		got := expires
		if !issued.ExpiresAt.IsZero() && issued.ExpiresAt.Before(got) {
			got = issued.ExpiresAt
		}
		return got, re, nil
	}
	defer clearRef(ref)
	ctx, span := s.startSpan(ctx, "backend.renew", attribute.String("leasehold.backend", l.Backend))
	got, err := b.Renew(ctx, ref, expires)
	endSpan(span, err)
	return got, nil, err
}

// reissue is a renewal that issued a new upstream credential: the old
// lease's reference (to revoke it), what was issued, and its sealed form.
type reissue struct {
	old    backends.LeaseRef
	issued *backends.Issued
	sealed *store.Lease
}

func (r *reissue) clear() {
	clearRef(r.old)
	clearSecret(r.issued.Secret)
	clear(r.issued.Artifact)
}

// reapOnce ends up to batch active leases that have expired and reports how
// many it ended.
func (s *Server) reapOnce(ctx context.Context, batch int) (n int, err error) {
	now := s.now()
	var due []*store.Lease
	if err := s.store.View(ctx, func(tx store.ReadTx) error {
		var err error
		due, err = tx.ActiveLeasesExpiringBefore(now, batch)
		return err
	}); err != nil || len(due) == 0 {
		return 0, err
	}
	ctx, span := s.startSpan(ctx, "lease.reap")
	defer func() { span.SetAttributes(attrCount.Int(n)); endSpan(span, err) }()
	var ended []*store.Lease
	err = s.store.Update(ctx, func(tx store.Tx) error {
		ended = ended[:0]
		for _, d := range due {
			l, err := tx.GetLease(d.ID)
			if err != nil {
				return err
			}
			if l.State != store.LeaseActive || now.Before(l.ExpiresAt) {
				continue // released, revoked or renewed meanwhile
			}
			rec := &store.AuditRecord{AgentID: l.AgentID, Actor: reaperActor}
			if err := endLease(ctx, tx, l, store.LeaseExpired, "expired", now, rec); err != nil {
				return err
			}
			ended = append(ended, l)
		}
		return nil
	})
	if err != nil {
		return 0, err
	}
	return len(ended), nil
}

// runReaper ends expired leases until Stop. It keeps no state of its own:
// the expiry index is the queue, so a restarted broker resumes where the
// previous one stopped.
func (s *Server) runReaper(stop <-chan struct{}) {
	const batch = 256
	t := time.NewTicker(s.cfg.ReaperInterval)
	defer t.Stop()
	ctx := withRequestID(context.Background(), "reaper")
	for {
		for {
			n, err := s.reapOnce(ctx, batch)
			if err != nil {
				s.log.Error("reaper", "error", err.Error())
				break
			}
			if n > 0 {
				s.log.Info("reaper ended expired leases", "count", n)
			}
			if n < batch {
				break
			}
		}
		select {
		case <-stop:
			return
		case <-t.C:
		}
	}
}

// issueError turns a backend's failure into what the agent is told:
// Unavailable for an upstream outage (retry), InvalidArgument for a scope
// the backend cannot mint, FailedPrecondition for a credential whose config
// the upstream rejects (its message is the backend's, which never holds
// secrets). Anything else stays internal.
func issueError(c *store.Credential, err error) error {
	switch {
	case errors.Is(err, backends.ErrUpstreamUnavailable):
		return newAPIError(codes.Unavailable, "credential %q: its upstream is unavailable; retry later", c.Name)
	case errors.Is(err, backends.ErrUnsupportedScope):
		return errInvalid("scopes", "%v", err)
	case errors.Is(err, backends.ErrInvalidConfig), errors.Is(err, backends.ErrUpstreamRejected):
		return errPrecondition("credential %q is misconfigured: %v", c.Name, err)
	}
	return fmt.Errorf("backend %s issue for %q: %w", c.Backend, c.Name, err)
}

// Package store defines Leasehold's persistence interface, its domain records
// and its sentinel errors. Engines live in sub-packages (store/bolt is the
// embedded default) and all pass the conformance suite in store/storetest.
//
// Every read and write happens inside a closure transaction. An Update
// closure must not make network calls: on the embedded engine it holds the
// only writer.
package store

import (
	"context"
	"errors"
	"time"
)

// SchemaVersion is the version of the record encodings engines write. An
// engine refuses to open data written with a newer version.
const SchemaVersion = 1

// Sentinel errors. Engines wrap them with context; callers test with errors.Is.
var (
	// ErrNotFound: the record does not exist.
	ErrNotFound = errors.New("not found")
	// ErrAlreadyExists: a create found a record with the same key.
	ErrAlreadyExists = errors.New("already exists")
	// ErrClosed: the store has been closed.
	ErrClosed = errors.New("store closed")
	// ErrSchema: the data was written by an incompatible schema version.
	ErrSchema = errors.New("incompatible schema version")
	// ErrTooLarge: an Update's writes exceed what the engine commits in one
	// transaction (store/etcd: the cluster's Txn limits). Nothing was written.
	ErrTooLarge = errors.New("transaction too large")
)

// Store is a transactional record store.
type Store interface {
	// View runs fn in a read-only transaction with a consistent snapshot.
	View(ctx context.Context, fn func(ReadTx) error) error
	// Update runs fn in a read-write transaction and commits it durably
	// (fsync) when fn returns nil; any error from fn rolls back fn's writes.
	// Engines may commit several concurrent Updates in one transaction
	// (group commit) and then run fn more than once, always in a fresh
	// transaction, when another closure in its group fails: fn must leave
	// effects only through tx, and assign (not accumulate) what it hands
	// back through captured variables.
	Update(ctx context.Context, fn func(Tx) error) error
	// Ready reports whether the store can serve requests.
	Ready(ctx context.Context) error
	// Close releases the store. Later calls return ErrClosed.
	Close() error
}

// ReadTx reads records. Returned records are copies the caller owns.
// List methods return at most limit records (limit <= 0 means no limit)
// in ascending key order, starting after the key `after` ("" = from the start).
type ReadTx interface {
	// GetCredential returns ErrNotFound when there is no such credential.
	GetCredential(name string) (*Credential, error)
	ListCredentials(after string, limit int) ([]*Credential, error)
	// GetCredentialVersion returns ErrNotFound when the version does not exist.
	GetCredentialVersion(name string, version uint64) (*CredentialVersion, error)

	// GetGrant returns ErrNotFound when there is no such grant.
	GetGrant(id string) (*Grant, error)
	// ListGrants lists grants ordered by id; credential "" lists all.
	ListGrants(credential, after string, limit int) ([]*Grant, error)

	// GetAgent returns ErrNotFound for an agent the broker has never recorded.
	GetAgent(id string) (*Agent, error)
	ListAgents(after string, limit int) ([]*Agent, error)

	// GetLease returns ErrNotFound when there is no such lease.
	GetLease(id string) (*Lease, error)
	// ListLeases lists leases ordered by id, answered from an index when the
	// filter names an agent, task, grant or credential.
	ListLeases(f LeaseFilter, after string, limit int) ([]*Lease, error)
	// ActiveLeaseCount is the number of leases in state Active, kept by the
	// engine as leases change (no scan).
	ActiveLeaseCount() (int64, error)
	// CountActiveLeases counts one agent's leases in state Active, stopping
	// at limit (limit <= 0: no limit), from the agent index's state bytes
	// without loading the leases.
	CountActiveLeases(agent string, limit int) (int, error)
	// ActiveLeasesExpiringBefore lists active leases whose ExpiresAt is at or
	// before t, soonest first, from the expiry index.
	ActiveLeasesExpiringBefore(t time.Time, limit int) ([]*Lease, error)

	// QueryAudit returns matching audit records, newest first unless
	// q.Ascending, answered from an index. A record that cannot be decoded
	// is reported as a *CorruptRecordError.
	QueryAudit(q AuditQuery) ([]*AuditRecord, error)
	// LastAuditSequence is the sequence of the newest audit record, 0 if none.
	LastAuditSequence() (uint64, error)
	// AuditHead is the checkpoint of the newest record as the engine
	// recorded it when appending (zero when the trail is empty). It is kept
	// apart from the records, so removing records from the end shows.
	AuditHead() (AuditCheckpoint, error)

	// AuditFloor is the checkpoint of the last record removed by
	// PruneAudit (zero when nothing was pruned): the chain continues from it.
	AuditFloor() (AuditCheckpoint, error)

	// GetRevocation returns a lease's pending upstream revocation, or
	// ErrNotFound when none is pending.
	GetRevocation(leaseID string) (*Revocation, error)
	// DueRevocations lists pending revocations whose NextAttempt is at or
	// before t, soonest first.
	DueRevocations(t time.Time, limit int) ([]*Revocation, error)
	// PendingRevocations counts the pending revocations.
	PendingRevocations() (int, error)

	// GetCursor returns a named position (e.g. how far an export sink got);
	// 0 when it was never set.
	GetCursor(name string) (uint64, error)
}

// Tx reads and writes records. Writes become visible to other transactions
// only when Update commits.
type Tx interface {
	ReadTx
	// PutCredential creates or replaces a credential's metadata.
	PutCredential(c *Credential) error
	// PutCredentialVersion stores a version; ErrAlreadyExists if it exists.
	PutCredentialVersion(v *CredentialVersion) error
	// DeleteCredential removes a credential and all its versions;
	// ErrNotFound when it does not exist.
	DeleteCredential(name string) error

	// PutGrant creates or replaces a grant.
	PutGrant(g *Grant) error
	// DeleteGrant returns ErrNotFound when there is no such grant.
	DeleteGrant(id string) error

	// PutAgent creates or replaces an agent.
	PutAgent(a *Agent) error

	// PutLease creates or replaces a lease and keeps its indexes current:
	// only active leases are in the expiry index.
	PutLease(l *Lease) error

	// AppendAudit assigns the record the next sequence number and a time no
	// earlier than the previous record's, stores it, and returns the sequence.
	AppendAudit(r *AuditRecord) (uint64, error)

	// PutCursor sets a named position.
	PutCursor(name string, v uint64) error

	// PutRevocation creates or replaces a pending revocation.
	PutRevocation(r *Revocation) error
	// DeleteRevocation removes a pending revocation (it is done);
	// ErrNotFound when there is none.
	DeleteRevocation(leaseID string) error

	// PruneAudit removes the oldest records, up to and including sequence
	// through but at most limit of them, with their index entries, and moves
	// the floor to the last one removed. It returns how many it removed.
	PruneAudit(through uint64, limit int) (int, error)
}

// Credential is a named source of secrets. Secret values are not here: they
// are in CredentialVersion, sealed.
type Credential struct {
	Name        string            `json:"name"`
	Backend     string            `json:"backend"`
	Description string            `json:"description,omitempty"`
	Config      map[string]string `json:"config,omitempty"`
	// SecretKeys names the fields of the current version, for display.
	SecretKeys     []string `json:"secret_keys,omitempty"`
	CurrentVersion uint64   `json:"current_version"`
	// WrappedKey is the credential's data key, encrypted under the KEK.
	WrappedKey []byte    `json:"wrapped_key"`
	CreatedAt  time.Time `json:"created_at"`
	UpdatedAt  time.Time `json:"updated_at"`
	// Rotation is the schedule, nil for none; RotationState where it stands.
	Rotation      *RotationPolicy `json:"rotation,omitempty"`
	RotationState RotationState   `json:"rotation_state,omitzero"`
}

// RotationPolicy schedules two-phase rotation.
type RotationPolicy struct {
	Interval time.Duration `json:"interval"`
	Overlap  time.Duration `json:"overlap"`
}

// Rotation phases, persisted so that a restart resumes where it stopped.
const (
	RotationIdle      = "idle"
	RotationCreating  = "creating"
	RotationVerifying = "verifying"
	RotationOverlap   = "overlap"
)

// RotationState is where a credential's rotation stands.
type RotationState struct {
	Phase string `json:"phase,omitempty"`
	// ID names the rotation in progress; creating upstream is idempotent
	// per ID, so a resumed rotation does not create twice.
	ID              string    `json:"id,omitempty"`
	PendingVersion  uint64    `json:"pending_version,omitempty"`
	PreviousVersion uint64    `json:"previous_version,omitempty"`
	RetireAt        time.Time `json:"retire_at,omitzero"`
	LastRotated     time.Time `json:"last_rotated,omitzero"`
	NextDue         time.Time `json:"next_due,omitzero"`
	LastError       string    `json:"last_error,omitempty"`
	Failures        int       `json:"failures,omitempty"`
}

// CredentialVersion is one version of a credential's secret material,
// encrypted with the credential's data key.
type CredentialVersion struct {
	Credential string    `json:"credential"`
	Version    uint64    `json:"version"`
	Sealed     []byte    `json:"sealed"`
	CreatedAt  time.Time `json:"created_at"`
}

// Grant allows an exact SPIFFE ID, or the IDs under a path prefix, to lease
// one credential. Exactly one of SpiffeID and SpiffeIDPrefix is set.
type Grant struct {
	ID             string        `json:"id"`
	SpiffeID       string        `json:"spiffe_id,omitempty"`
	SpiffeIDPrefix string        `json:"spiffe_id_prefix,omitempty"`
	Credential     string        `json:"credential"`
	Scopes         []string      `json:"scopes"`
	MaxTTL         time.Duration `json:"max_ttl"`
	MaxLifetime    time.Duration `json:"max_lifetime"`
	Description    string        `json:"description,omitempty"`
	CreatedAt      time.Time     `json:"created_at"`
	CreatedBy      string        `json:"created_by"`
	// Delegable is how many levels of delegation may start from the grant.
	Delegable int `json:"delegable,omitempty"`
	// TaskID, when set, binds leases to the task and its subtasks.
	TaskID string `json:"task_id,omitempty"`
	// ExpiresAt, when set, ends what the grant allows.
	ExpiresAt time.Time `json:"expires_at,omitzero"`
	// Delegated grants: the parent grant, the delegating agent, and the
	// delegating agents from the first to the last (ending with DelegatedBy).
	ParentGrantID string   `json:"parent_grant_id,omitempty"`
	DelegatedBy   string   `json:"delegated_by,omitempty"`
	Chain         []string `json:"chain,omitempty"`
	// ExpectedCredentials and SuspendOnAnomaly: the anomaly guard (see the
	// Grant message in proto/leasehold/v1/types.proto).
	ExpectedCredentials []string `json:"expected_credentials,omitempty"`
	SuspendOnAnomaly    bool     `json:"suspend_on_anomaly,omitempty"`
}

// Agent is what the broker knows of one SPIFFE ID.
type Agent struct {
	ID            string    `json:"id"`
	Revoked       bool      `json:"revoked"`
	RevokedAt     time.Time `json:"revoked_at,omitzero"`
	RevokedReason string    `json:"revoked_reason,omitempty"`
	RevokedBy     string    `json:"revoked_by,omitempty"`
	FirstSeen     time.Time `json:"first_seen,omitzero"`
	LastSeen      time.Time `json:"last_seen,omitzero"`
}

// LeaseState is a lease's place in its life; every state but Active is final.
type LeaseState uint8

const (
	LeaseActive LeaseState = iota + 1
	LeaseReleased
	LeaseExpired
	LeaseRevoked
)

func (s LeaseState) String() string {
	switch s {
	case LeaseActive:
		return "active"
	case LeaseReleased:
		return "released"
	case LeaseExpired:
		return "expired"
	case LeaseRevoked:
		return "revoked"
	}
	return "unknown"
}

// Lease is one issuance of a credential to one agent for one task.
type Lease struct {
	ID                string        `json:"id"`
	AgentID           string        `json:"agent_id"`
	Credential        string        `json:"credential"`
	Backend           string        `json:"backend"`
	Scopes            []string      `json:"scopes"`
	TaskID            string        `json:"task_id"`
	TaskPurpose       string        `json:"task_purpose,omitempty"`
	GrantID           string        `json:"grant_id"`
	State             LeaseState    `json:"state"`
	TTL               time.Duration `json:"ttl"`
	IssuedAt          time.Time     `json:"issued_at"`
	ExpiresAt         time.Time     `json:"expires_at"`
	MaxExpiresAt      time.Time     `json:"max_expires_at"`
	EndedAt           time.Time     `json:"ended_at,omitzero"`
	EndReason         string        `json:"end_reason,omitempty"`
	CredentialVersion uint64        `json:"credential_version"`
	// DelegationChain is the grant's chain, for leases under delegated
	// grants: every event of the lease carries it in the audit trail.
	DelegationChain []string `json:"delegation_chain,omitempty"`
	// Artifact is the backend's handle on what it created upstream (a role,
	// a token), sealed under ArtifactKey; empty for static credentials.
	Artifact    []byte `json:"artifact,omitempty"`
	ArtifactKey []byte `json:"artifact_key,omitempty"`
	// SealedSecret is what a dynamic backend issued for the lease (the
	// agent's secret), sealed under ArtifactKey, so an identical acquire
	// while the lease lives can return it again.
	SealedSecret []byte `json:"sealed_secret,omitempty"`
	// RevokeSpec is the credential's config and secret at issue time,
	// sealed under ArtifactKey: revocation falls back to it when the
	// credential has been deleted since.
	RevokeSpec []byte `json:"revoke_spec,omitempty"`
	// UpstreamRevoked is set once the artifact is destroyed upstream.
	UpstreamRevoked   bool      `json:"upstream_revoked,omitempty"`
	UpstreamRevokedAt time.Time `json:"upstream_revoked_at,omitzero"`
}

// Revocation is a lease's upstream artifact waiting to be destroyed. It is
// written in the same transaction that ends the lease and removed once the
// backend's Revoke succeeds; failures are retried with backoff, forever.
type Revocation struct {
	LeaseID     string    `json:"lease_id"`
	Attempts    int       `json:"attempts"`
	NextAttempt time.Time `json:"next_attempt"`
	// LastError is the backend's last failure, without secrets.
	LastError string    `json:"last_error,omitempty"`
	CreatedAt time.Time `json:"created_at"`
}

// Active reports whether the lease is active and unexpired at now.
func (l *Lease) Active(now time.Time) bool {
	return l.State == LeaseActive && now.Before(l.ExpiresAt)
}

// LeaseFilter selects leases. Empty fields do not filter.
type LeaseFilter struct {
	AgentID string
	TaskID  string
	// TaskTree selects the task and its subtasks: ids equal to it or
	// extending it with "/" (e.g. "report-42" and "report-42/crm").
	TaskTree   string
	GrantID    string
	Credential string
	ActiveOnly bool
}

// AuditEvent names what an audit record is about.
type AuditEvent string

const (
	EventLeaseAcquire     AuditEvent = "lease.acquire"
	EventLeaseRenew       AuditEvent = "lease.renew"
	EventLeaseRelease     AuditEvent = "lease.release"
	EventLeaseExpire      AuditEvent = "lease.expire"
	EventLeaseRevoke      AuditEvent = "lease.revoke"
	EventAgentRevoke      AuditEvent = "agent.revoke"
	EventAgentReinstate   AuditEvent = "agent.reinstate"
	EventCredentialPut    AuditEvent = "credential.put"
	EventCredentialDelete AuditEvent = "credential.delete"
	EventGrantCreate      AuditEvent = "grant.create"
	EventGrantDelete      AuditEvent = "grant.delete"
	EventAccessDeny       AuditEvent = "access.deny"
	EventAuditPrune       AuditEvent = "audit.prune"
	EventCredentialRotate AuditEvent = "credential.rotate"
	EventTaskEnd          AuditEvent = "task.end"
	EventTaskRevoke       AuditEvent = "task.revoke"
	EventGrantDelegate    AuditEvent = "grant.delegate"
	EventLeaseRotated     AuditEvent = "lease.rotated"
)

// Decision is the outcome an audit record holds.
type Decision string

const (
	Allow Decision = "allow"
	Deny  Decision = "deny"
)

// AuditRecord is one append-only audit entry. It never holds secret values.
type AuditRecord struct {
	Sequence    uint64     `json:"seq"`
	Time        time.Time  `json:"time"`
	Event       AuditEvent `json:"event"`
	Decision    Decision   `json:"decision"`
	Actor       string     `json:"actor"`
	AgentID     string     `json:"agent_id,omitempty"`
	Credential  string     `json:"credential,omitempty"`
	Scopes      []string   `json:"scopes,omitempty"`
	TaskID      string     `json:"task_id,omitempty"`
	TaskPurpose string     `json:"task_purpose,omitempty"`
	LeaseID     string     `json:"lease_id,omitempty"`
	GrantID     string     `json:"grant_id,omitempty"`
	Reason      string     `json:"reason,omitempty"`
	RequestID   string     `json:"request_id,omitempty"`
	Code        string     `json:"code,omitempty"`
	// TraceID and SpanID (hex) tie the record to the request's trace.
	TraceID string `json:"trace_id,omitempty"`
	SpanID  string `json:"span_id,omitempty"`
	// DelegationChain lists, for events under a delegated grant, the agents
	// that delegated it, first to last.
	DelegationChain []string `json:"delegation_chain,omitempty"`
	// PrevHash and Hash chain the record to its predecessor; see ChainAudit.
	PrevHash []byte `json:"prev_hash,omitempty"`
	Hash     []byte `json:"hash"`
}

// AuditQuery selects audit records. Empty fields do not filter. Records are
// returned newest first (or oldest first with Ascending), only those above
// AfterSequence and below BeforeSequence when these are non-zero.
type AuditQuery struct {
	AgentID        string
	Credential     string
	TaskID         string
	LeaseID        string
	TraceID        string
	Decision       Decision
	Start          time.Time // inclusive; zero = unbounded
	End            time.Time // exclusive; zero = unbounded
	AfterSequence  uint64
	BeforeSequence uint64
	Ascending      bool
	Limit          int
}

// Matches reports whether r passes q's field filters (not its bounds). It
// is the reference the engines' indexed queries are tested against.
func (q AuditQuery) Matches(r *AuditRecord) bool {
	return (q.AgentID == "" || r.AgentID == q.AgentID) &&
		(q.Credential == "" || r.Credential == q.Credential) &&
		(q.TaskID == "" || r.TaskID == q.TaskID) &&
		(q.LeaseID == "" || r.LeaseID == q.LeaseID) &&
		(q.TraceID == "" || r.TraceID == q.TraceID) &&
		(q.Decision == "" || r.Decision == q.Decision) &&
		(q.Start.IsZero() || !r.Time.Before(q.Start)) &&
		(q.End.IsZero() || r.Time.Before(q.End))
}

// CommitNotifier is implemented by engines that other processes write to:
// fn runs after every commit, this process's or another's, so that waiters
// (lease and audit watch streams, the revocation queue) wake for changes
// another broker made.
type CommitNotifier interface {
	OnCommit(fn func())
}

// Elector is implemented by engines that several brokers share. A broker
// runs its background work (the expiry reaper, the revocation queue,
// rotation, audit retention and export) only while it leads, so one broker
// at a time does it; engines one process owns (store/bolt) do not implement it.
type Elector interface {
	// Lead blocks until this process leads or ctx ends. The returned
	// context ends when leadership is lost (or ctx ends); resign gives
	// leadership up for another process to take.
	Lead(ctx context.Context) (led context.Context, resign func(), err error)
}

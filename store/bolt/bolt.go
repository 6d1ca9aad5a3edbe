// Package bolt is Leasehold's embedded store engine, on go.etcd.io/bbolt.
//
// Layout: one bucket per record kind, keyed by id, holding JSON; secondary
// indexes are buckets whose keys are "<value>\x00<id>" (leases) or
// "<value>\x00<seq>" (audit) with a one-byte value (the lease state or the
// audit decision) so filters can skip records without decoding them. Active
// leases are also in an expiry index keyed by big-endian expiry then id, which
// the reaper walks, so start-up never loads leases into memory.
package bolt

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"time"

	bbolt "go.etcd.io/bbolt"

	"github.com/leasehold/leasehold/store"
)

var (
	bMeta            = []byte("meta")
	bCredentials     = []byte("credentials")
	bCredVersions    = []byte("credential_versions")
	bGrants          = []byte("grants")
	bGrantsByCred    = []byte("idx_grants_credential")
	bAgents          = []byte("agents")
	bLeases          = []byte("leases")
	bLeaseByAgent    = []byte("idx_leases_agent")
	bLeaseByTask     = []byte("idx_leases_task")
	bLeaseByGrant    = []byte("idx_leases_grant")
	bLeaseByCred     = []byte("idx_leases_credential")
	bLeaseExpiry     = []byte("idx_leases_expiry")
	bAudit           = []byte("audit")
	bAuditByAgent    = []byte("idx_audit_agent")
	bAuditByCred     = []byte("idx_audit_credential")
	bAuditByTask     = []byte("idx_audit_task")
	bAuditByLease    = []byte("idx_audit_lease")
	bAuditByTrace    = []byte("idx_audit_trace")
	bAuditByDecision = []byte("idx_audit_decision")
	bAuditByTime     = []byte("idx_audit_time")
	bCursors         = []byte("cursors")
	bRevocations     = []byte("revocations")
	bRevocationsDue  = []byte("idx_revocations_due")

	allBuckets = [][]byte{bMeta, bCredentials, bCredVersions, bGrants, bGrantsByCred, bAgents,
		bLeases, bLeaseByAgent, bLeaseByTask, bLeaseByGrant, bLeaseByCred, bLeaseExpiry,
		bAudit, bAuditByAgent, bAuditByCred, bAuditByTask, bAuditByLease, bAuditByTrace, bAuditByDecision, bAuditByTime, bCursors, bRevocations, bRevocationsDue}

	// appendFill is the FillPercent for buckets whose keys mostly arrive in
	// order; some room is left for records that grow when updated.
	appendFill = 0.9

	keySchema       = []byte("schema_version")
	keyAuditHead    = []byte("audit_head")
	keyAuditFloor   = []byte("audit_floor")
	keyActiveLeases = []byte("active_leases")
)

// Config configures the engine.
type Config struct {
	// Path of the database file; its directory is created (0700) if missing.
	Path string
	// OpenTimeout bounds the wait for the file lock held by another process.
	OpenTimeout time.Duration
	// NoSync skips fsync on commit. Only for tests that measure nothing durable.
	NoSync bool
}

// Validate reports a missing or unusable setting.
func (c Config) Validate() error {
	if c.Path == "" {
		return errors.New("bolt: path is required")
	}
	return nil
}

// Store is the bbolt engine. It is safe for concurrent use.
type Store struct {
	db     *bbolt.DB
	closed atomic.Bool

	queue      chan *call
	quit       chan struct{}
	writerDone chan struct{}
	waiting    atomic.Int64 // Update calls not yet taken by the writer
	stats      commitCounters
}

var _ store.Store = (*Store)(nil)

// Open opens or creates the database at cfg.Path, creating its buckets and
// recording the schema version.
func Open(cfg Config) (*Store, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if cfg.OpenTimeout == 0 {
		cfg.OpenTimeout = 5 * time.Second
	}
	if err := os.MkdirAll(filepath.Dir(cfg.Path), 0o700); err != nil {
		return nil, fmt.Errorf("bolt: create directory: %w", err)
	}
	db, err := bbolt.Open(cfg.Path, 0o600, &bbolt.Options{Timeout: cfg.OpenTimeout, NoSync: cfg.NoSync})
	if err != nil {
		return nil, fmt.Errorf("bolt: open %s: %w", cfg.Path, err)
	}
	err = db.Update(func(tx *bbolt.Tx) error {
		for _, name := range allBuckets {
			if _, err := tx.CreateBucketIfNotExists(name); err != nil {
				return err
			}
		}
		meta := tx.Bucket(bMeta)
		if v := meta.Get(keySchema); v != nil {
			if got := binary.BigEndian.Uint64(v); got > store.SchemaVersion {
				return fmt.Errorf("%w: file has %d, this build reads up to %d", store.ErrSchema, got, store.SchemaVersion)
			}
		}
		return meta.Put(keySchema, u64(store.SchemaVersion))
	})
	if err != nil {
		_ = db.Close()
		return nil, fmt.Errorf("bolt: initialise %s: %w", cfg.Path, err)
	}
	s := &Store{db: db, queue: make(chan *call), quit: make(chan struct{}), writerDone: make(chan struct{})}
	go s.writer()
	return s, nil
}

// View implements store.Store.
func (s *Store) View(ctx context.Context, fn func(store.ReadTx) error) error {
	if s.closed.Load() {
		return store.ErrClosed
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	return s.db.View(func(tx *bbolt.Tx) error { return fn(&boltTx{tx: tx}) })
}

// Ready implements store.Store.
func (s *Store) Ready(ctx context.Context) error {
	if s.closed.Load() {
		return store.ErrClosed
	}
	return s.db.View(func(tx *bbolt.Tx) error {
		if tx.Bucket(bMeta) == nil {
			return errors.New("bolt: meta bucket missing")
		}
		return nil
	})
}

// Close implements store.Store.
func (s *Store) Close() error {
	if s.closed.Swap(true) {
		return nil
	}
	// Calls the writer already holds finish; callers still waiting to hand
	// theirs over get ErrClosed.
	close(s.quit)
	<-s.writerDone
	return s.db.Close()
}

// Check runs bbolt's consistency check over the whole file and returns the
// first problem found.
func (s *Store) Check() error {
	return s.db.View(func(tx *bbolt.Tx) error {
		for err := range tx.Check() {
			return err
		}
		return nil
	})
}

type boltTx struct{ tx *bbolt.Tx }

// ---- encoding helpers ----

func u64(v uint64) []byte {
	b := make([]byte, 8)
	binary.BigEndian.PutUint64(b, v)
	return b
}

func checkKey(field, v string) error {
	if v == "" || bytes.IndexByte([]byte(v), 0) >= 0 {
		return fmt.Errorf("bolt: invalid %s %q", field, v)
	}
	return nil
}

func idxKey(value, id string) []byte {
	k := make([]byte, 0, len(value)+1+len(id))
	k = append(k, value...)
	k = append(k, 0)
	return append(k, id...)
}

func idxSeqKey(value string, seq uint64) []byte {
	k := make([]byte, 0, len(value)+9)
	k = append(k, value...)
	k = append(k, 0)
	return binary.BigEndian.AppendUint64(k, seq)
}

func expiryKey(t time.Time, id string) []byte {
	k := make([]byte, 0, 8+len(id))
	k = binary.BigEndian.AppendUint64(k, uint64(t.UnixNano()))
	return append(k, id...)
}

func get[T any](b *bbolt.Bucket, key []byte, what string) (*T, error) {
	v := b.Get(key)
	if v == nil {
		return nil, fmt.Errorf("%s %q: %w", what, key, store.ErrNotFound)
	}
	return decode[T](v, what)
}

func decode[T any](v []byte, what string) (*T, error) {
	out := new(T)
	if err := json.Unmarshal(v, out); err != nil {
		return nil, fmt.Errorf("bolt: decode %s: %w", what, err)
	}
	return out, nil
}

func put(b *bbolt.Bucket, key []byte, v any) error {
	data, err := json.Marshal(v)
	if err != nil {
		return fmt.Errorf("bolt: encode: %w", err)
	}
	return b.Put(key, data)
}

// list walks bucket b in key order after `after`, decoding values.
func list[T any](b *bbolt.Bucket, after string, limit int, what string) ([]*T, error) {
	var out []*T
	c := b.Cursor()
	k, v := c.First()
	if after != "" {
		k, v = c.Seek([]byte(after))
		if k != nil && string(k) == after {
			k, v = c.Next()
		}
	}
	for ; k != nil; k, v = c.Next() {
		r, err := decode[T](v, what)
		if err != nil {
			return nil, err
		}
		out = append(out, r)
		if limit > 0 && len(out) >= limit {
			break
		}
	}
	return out, nil
}

// ---- credentials ----

func (t *boltTx) GetCredential(name string) (*store.Credential, error) {
	return get[store.Credential](t.tx.Bucket(bCredentials), []byte(name), "credential")
}

func (t *boltTx) ListCredentials(after string, limit int) ([]*store.Credential, error) {
	return list[store.Credential](t.tx.Bucket(bCredentials), after, limit, "credential")
}

func (t *boltTx) PutCredential(c *store.Credential) error {
	if err := checkKey("credential name", c.Name); err != nil {
		return err
	}
	return put(t.tx.Bucket(bCredentials), []byte(c.Name), c)
}

func (t *boltTx) GetCredentialVersion(name string, version uint64) (*store.CredentialVersion, error) {
	return get[store.CredentialVersion](t.tx.Bucket(bCredVersions), idxSeqKey(name, version), "credential version")
}

func (t *boltTx) PutCredentialVersion(v *store.CredentialVersion) error {
	if err := checkKey("credential name", v.Credential); err != nil {
		return err
	}
	b := t.tx.Bucket(bCredVersions)
	key := idxSeqKey(v.Credential, v.Version)
	if b.Get(key) != nil {
		return fmt.Errorf("credential %q version %d: %w", v.Credential, v.Version, store.ErrAlreadyExists)
	}
	return put(b, key, v)
}

func (t *boltTx) DeleteCredential(name string) error {
	b := t.tx.Bucket(bCredentials)
	if b.Get([]byte(name)) == nil {
		return fmt.Errorf("credential %q: %w", name, store.ErrNotFound)
	}
	if err := b.Delete([]byte(name)); err != nil {
		return err
	}
	return deletePrefix(t.tx.Bucket(bCredVersions), append([]byte(name), 0))
}

func deletePrefix(b *bbolt.Bucket, prefix []byte) error {
	c := b.Cursor()
	for k, _ := c.Seek(prefix); k != nil && bytes.HasPrefix(k, prefix); k, _ = c.Seek(prefix) {
		if err := c.Delete(); err != nil {
			return err
		}
	}
	return nil
}

// ---- grants ----

func (t *boltTx) GetGrant(id string) (*store.Grant, error) {
	return get[store.Grant](t.tx.Bucket(bGrants), []byte(id), "grant")
}

func (t *boltTx) ListGrants(credential, after string, limit int) ([]*store.Grant, error) {
	if credential == "" {
		return list[store.Grant](t.tx.Bucket(bGrants), after, limit, "grant")
	}
	var out []*store.Grant
	err := walkIndex(t.tx.Bucket(bGrantsByCred), credential, after, func(id string, _ []byte) (bool, error) {
		g, err := t.GetGrant(id)
		if err != nil {
			return false, err
		}
		out = append(out, g)
		return limit <= 0 || len(out) < limit, nil
	})
	return out, err
}

func (t *boltTx) PutGrant(g *store.Grant) error {
	if err := checkKey("grant id", g.ID); err != nil {
		return err
	}
	if err := checkKey("grant credential", g.Credential); err != nil {
		return err
	}
	b := t.tx.Bucket(bGrants)
	if old := b.Get([]byte(g.ID)); old != nil {
		prev, err := decode[store.Grant](old, "grant")
		if err != nil {
			return err
		}
		if err := t.tx.Bucket(bGrantsByCred).Delete(idxKey(prev.Credential, prev.ID)); err != nil {
			return err
		}
	}
	if err := t.tx.Bucket(bGrantsByCred).Put(idxKey(g.Credential, g.ID), nil); err != nil {
		return err
	}
	return put(b, []byte(g.ID), g)
}

func (t *boltTx) DeleteGrant(id string) error {
	g, err := t.GetGrant(id)
	if err != nil {
		return err
	}
	if err := t.tx.Bucket(bGrantsByCred).Delete(idxKey(g.Credential, g.ID)); err != nil {
		return err
	}
	return t.tx.Bucket(bGrants).Delete([]byte(id))
}

// walkIndex visits the ids under value in an index bucket, in id order after
// `after`, until fn returns false.
func walkIndex(b *bbolt.Bucket, value, after string, fn func(id string, v []byte) (bool, error)) error {
	prefix := append([]byte(value), 0)
	c := b.Cursor()
	start := prefix
	if after != "" {
		start = idxKey(value, after)
	}
	for k, v := c.Seek(start); k != nil && bytes.HasPrefix(k, prefix); k, v = c.Next() {
		id := string(k[len(prefix):])
		if id == after {
			continue
		}
		more, err := fn(id, v)
		if err != nil || !more {
			return err
		}
	}
	return nil
}

// ---- agents ----

func (t *boltTx) GetAgent(id string) (*store.Agent, error) {
	return get[store.Agent](t.tx.Bucket(bAgents), []byte(id), "agent")
}

func (t *boltTx) ListAgents(after string, limit int) ([]*store.Agent, error) {
	return list[store.Agent](t.tx.Bucket(bAgents), after, limit, "agent")
}

func (t *boltTx) PutAgent(a *store.Agent) error {
	if err := checkKey("agent id", a.ID); err != nil {
		return err
	}
	return put(t.tx.Bucket(bAgents), []byte(a.ID), a)
}

// ---- leases ----

func (t *boltTx) GetLease(id string) (*store.Lease, error) {
	return get[store.Lease](t.tx.Bucket(bLeases), []byte(id), "lease")
}

type leaseIndex struct {
	bucket []byte
	value  func(*store.Lease) string
}

var leaseIndexes = []leaseIndex{
	{bLeaseByAgent, func(l *store.Lease) string { return l.AgentID }},
	{bLeaseByTask, func(l *store.Lease) string { return l.TaskID }},
	{bLeaseByGrant, func(l *store.Lease) string { return l.GrantID }},
	{bLeaseByCred, func(l *store.Lease) string { return l.Credential }},
}

func (t *boltTx) PutLease(l *store.Lease) error {
	for _, f := range []struct{ name, v string }{{"lease id", l.ID}, {"lease agent", l.AgentID}, {"lease task", l.TaskID}, {"lease grant", l.GrantID}, {"lease credential", l.Credential}} {
		if err := checkKey(f.name, f.v); err != nil {
			return err
		}
	}
	b := t.tx.Bucket(bLeases)
	exp := t.tx.Bucket(bLeaseExpiry)
	// Lease ids and expiry keys grow with time, so new keys land at the end
	// of their bucket: split pages nearly full rather than half full.
	b.FillPercent, exp.FillPercent = appendFill, appendFill
	wasActive := false
	if old := b.Get([]byte(l.ID)); old != nil {
		prev, err := decode[store.Lease](old, "lease")
		if err != nil {
			return err
		}
		wasActive = prev.State == store.LeaseActive
		if err := exp.Delete(expiryKey(prev.ExpiresAt, prev.ID)); err != nil {
			return err
		}
		for _, ix := range leaseIndexes {
			if ix.value(prev) != ix.value(l) {
				if err := t.tx.Bucket(ix.bucket).Delete(idxKey(ix.value(prev), prev.ID)); err != nil {
					return err
				}
			}
		}
	}
	for _, ix := range leaseIndexes {
		if err := t.tx.Bucket(ix.bucket).Put(idxKey(ix.value(l), l.ID), []byte{byte(l.State)}); err != nil {
			return err
		}
	}
	if l.State == store.LeaseActive {
		if err := exp.Put(expiryKey(l.ExpiresAt, l.ID), nil); err != nil {
			return err
		}
	}
	if isActive := l.State == store.LeaseActive; isActive != wasActive {
		n, err := t.ActiveLeaseCount()
		if err != nil {
			return err
		}
		if isActive {
			n++
		} else {
			n--
		}
		if err := t.tx.Bucket(bMeta).Put(keyActiveLeases, u64(uint64(max(n, 0)))); err != nil {
			return err
		}
	}
	return put(b, []byte(l.ID), l)
}

func (t *boltTx) ActiveLeaseCount() (int64, error) {
	v := t.tx.Bucket(bMeta).Get(keyActiveLeases)
	if v == nil {
		return 0, nil
	}
	return int64(min(binary.BigEndian.Uint64(v), math.MaxInt64)), nil
}

func (t *boltTx) ListLeases(f store.LeaseFilter, after string, limit int) ([]*store.Lease, error) {
	inTree := func(task string) bool {
		return f.TaskTree == "" || task == f.TaskTree || strings.HasPrefix(task, f.TaskTree+"/")
	}
	match := func(l *store.Lease) bool {
		return inTree(l.TaskID) && (f.AgentID == "" || l.AgentID == f.AgentID) &&
			(f.TaskID == "" || l.TaskID == f.TaskID) &&
			(f.GrantID == "" || l.GrantID == f.GrantID) &&
			(f.Credential == "" || l.Credential == f.Credential) &&
			(!f.ActiveOnly || l.State == store.LeaseActive)
	}
	var out []*store.Lease
	var ix *leaseIndex
	var value string
	// The narrowest index first: a task has few leases, an agent or a
	// credential may have millions over time.
	for _, i := range []int{1, 0, 2, 3} {
		if v := []string{f.AgentID, f.TaskID, f.GrantID, f.Credential}[i]; v != "" {
			ix, value = &leaseIndexes[i], v
			break
		}
	}
	if ix == nil && f.TaskTree != "" {
		// Walk the task index from the tree's root over every task id that
		// starts with it, keeping the root and its "/" descendants.
		c := t.tx.Bucket(bLeaseByTask).Cursor()
		root := []byte(f.TaskTree)
		for k, v := c.Seek(root); k != nil && bytes.HasPrefix(k, root); k, v = c.Next() {
			i := bytes.IndexByte(k, 0)
			if i < 0 || !inTree(string(k[:i])) || (after != "" && string(k[i+1:]) <= after) {
				continue
			}
			if f.ActiveOnly && (len(v) != 1 || store.LeaseState(v[0]) != store.LeaseActive) {
				continue
			}
			l, err := t.GetLease(string(k[i+1:]))
			if err != nil {
				return nil, err
			}
			if match(l) {
				out = append(out, l)
				if limit > 0 && len(out) >= limit {
					break
				}
			}
		}
		return out, nil
	}
	if ix == nil {
		all, err := list[store.Lease](t.tx.Bucket(bLeases), after, 0, "lease")
		if err != nil {
			return nil, err
		}
		for _, l := range all {
			if match(l) {
				out = append(out, l)
				if limit > 0 && len(out) >= limit {
					break
				}
			}
		}
		return out, nil
	}
	err := walkIndex(t.tx.Bucket(ix.bucket), value, after, func(id string, state []byte) (bool, error) {
		if f.ActiveOnly && (len(state) != 1 || store.LeaseState(state[0]) != store.LeaseActive) {
			return true, nil
		}
		l, err := t.GetLease(id)
		if err != nil {
			return false, err
		}
		if match(l) {
			out = append(out, l)
		}
		return limit <= 0 || len(out) < limit, nil
	})
	return out, err
}

func (t *boltTx) ActiveLeasesExpiringBefore(at time.Time, limit int) ([]*store.Lease, error) {
	return due(t.tx.Bucket(bLeaseExpiry), at, limit, t.GetLease)
}

// due walks a time index (keys: big-endian unix nanos ‖ id) from its start
// up to and including at, loading each id.
func due[T any](b *bbolt.Bucket, at time.Time, limit int, load func(id string) (*T, error)) ([]*T, error) {
	var out []*T
	c := b.Cursor()
	end := uint64(at.UnixNano())
	for k, _ := c.First(); k != nil && binary.BigEndian.Uint64(k[:8]) <= end; k, _ = c.Next() {
		v, err := load(string(k[8:]))
		if err != nil {
			return nil, err
		}
		out = append(out, v)
		if limit > 0 && len(out) >= limit {
			break
		}
	}
	return out, nil
}

// ---- cursors ----

func (t *boltTx) GetCursor(name string) (uint64, error) {
	v := t.tx.Bucket(bCursors).Get([]byte(name))
	if v == nil {
		return 0, nil
	}
	if len(v) != 8 {
		return 0, fmt.Errorf("bolt: cursor %q is corrupt", name)
	}
	return binary.BigEndian.Uint64(v), nil
}

func (t *boltTx) PutCursor(name string, v uint64) error {
	if err := checkKey("cursor name", name); err != nil {
		return err
	}
	return t.tx.Bucket(bCursors).Put([]byte(name), u64(v))
}

// ---- revocation queue ----

func (t *boltTx) GetRevocation(leaseID string) (*store.Revocation, error) {
	return get[store.Revocation](t.tx.Bucket(bRevocations), []byte(leaseID), "revocation")
}

func (t *boltTx) PutRevocation(r *store.Revocation) error {
	if err := checkKey("revocation lease id", r.LeaseID); err != nil {
		return err
	}
	b := t.tx.Bucket(bRevocations)
	due := t.tx.Bucket(bRevocationsDue)
	if old := b.Get([]byte(r.LeaseID)); old != nil {
		prev, err := decode[store.Revocation](old, "revocation")
		if err != nil {
			return err
		}
		if err := due.Delete(expiryKey(prev.NextAttempt, prev.LeaseID)); err != nil {
			return err
		}
	}
	if err := due.Put(expiryKey(r.NextAttempt, r.LeaseID), nil); err != nil {
		return err
	}
	return put(b, []byte(r.LeaseID), r)
}

func (t *boltTx) DeleteRevocation(leaseID string) error {
	r, err := t.GetRevocation(leaseID)
	if err != nil {
		return err
	}
	if err := t.tx.Bucket(bRevocationsDue).Delete(expiryKey(r.NextAttempt, r.LeaseID)); err != nil {
		return err
	}
	return t.tx.Bucket(bRevocations).Delete([]byte(leaseID))
}

func (t *boltTx) DueRevocations(at time.Time, limit int) ([]*store.Revocation, error) {
	return due(t.tx.Bucket(bRevocationsDue), at, limit, t.GetRevocation)
}

func (t *boltTx) PendingRevocations() (int, error) {
	return t.tx.Bucket(bRevocations).Stats().KeyN, nil
}

package kv

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"math"
	"strings"
	"time"

	"github.com/leasehold/leasehold/store"
)

var (
	// appendFill is the fill for buckets whose keys mostly arrive in
	// order; some room is left for records that grow when updated.
	appendFill = 0.9

	keyAuditHead    = []byte("audit_head")
	keyAuditFloor   = []byte("audit_floor")
	keyActiveLeases = []byte("active_leases")
)

// Tx implements store.Tx over an engine's transaction. Every method turns a
// read failure (Fail) into its error.
type Tx struct{ txn Txn }

var _ store.Tx = (*Tx)(nil)

// NewTx wraps an engine transaction. A read-only engine transaction makes
// a Tx whose write methods fail.
func NewTx(txn Txn) *Tx { return &Tx{txn: txn} }

func (t *Tx) b(name []byte) Bucket { return t.txn.Bucket(name) }

// ---- encoding helpers ----

func u64(v uint64) []byte {
	b := make([]byte, 8)
	binary.BigEndian.PutUint64(b, v)
	return b
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

func get[T any](b Bucket, key []byte, what string) (*T, error) {
	v := b.Get(key)
	if v == nil {
		return nil, fmt.Errorf("%s %q: %w", what, key, store.ErrNotFound)
	}
	return decode[T](v, what)
}

func decode[T any](v []byte, what string) (*T, error) {
	out := new(T)
	if err := json.Unmarshal(v, out); err != nil {
		return nil, fmt.Errorf("store: decode %s: %w", what, err)
	}
	return out, nil
}

func put(b Bucket, key []byte, v any) error {
	data, err := json.Marshal(v)
	if err != nil {
		return fmt.Errorf("store: encode: %w", err)
	}
	return b.Put(key, data)
}

// list walks bucket b in key order after `after`, decoding values.
func list[T any](b Bucket, after string, limit int, what string) ([]*T, error) {
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

func (t *Tx) GetCredential(name string) (_ *store.Credential, err error) {
	defer catch(&err)
	return get[store.Credential](t.b(BCredentials), []byte(name), "credential")
}

func (t *Tx) ListCredentials(after string, limit int) (_ []*store.Credential, err error) {
	defer catch(&err)
	return list[store.Credential](t.b(BCredentials), after, limit, "credential")
}

func (t *Tx) PutCredential(c *store.Credential) (err error) {
	defer catch(&err)
	if err := checkKey("credential name", c.Name); err != nil {
		return err
	}
	return put(t.b(BCredentials), []byte(c.Name), c)
}

func (t *Tx) GetCredentialVersion(name string, version uint64) (_ *store.CredentialVersion, err error) {
	defer catch(&err)
	return get[store.CredentialVersion](t.b(BCredVersions), idxSeqKey(name, version), "credential version")
}

func (t *Tx) PutCredentialVersion(v *store.CredentialVersion) (err error) {
	defer catch(&err)
	if err := checkKey("credential name", v.Credential); err != nil {
		return err
	}
	b := t.b(BCredVersions)
	key := idxSeqKey(v.Credential, v.Version)
	if b.Get(key) != nil {
		return fmt.Errorf("credential %q version %d: %w", v.Credential, v.Version, store.ErrAlreadyExists)
	}
	return put(b, key, v)
}

func (t *Tx) DeleteCredential(name string) (err error) {
	defer catch(&err)
	b := t.b(BCredentials)
	if b.Get([]byte(name)) == nil {
		return fmt.Errorf("credential %q: %w", name, store.ErrNotFound)
	}
	if err := b.Delete([]byte(name)); err != nil {
		return err
	}
	return deletePrefix(t.b(BCredVersions), append([]byte(name), 0))
}

// deletePrefix removes every key under prefix: collected first, then
// deleted (see PruneAudit).
func deletePrefix(b Bucket, prefix []byte) error {
	var keys [][]byte
	c := b.Cursor()
	for k, _ := c.Seek(prefix); k != nil && bytes.HasPrefix(k, prefix); k, _ = c.Next() {
		keys = append(keys, bytes.Clone(k))
	}
	for _, k := range keys {
		if err := b.Delete(k); err != nil {
			return err
		}
	}
	return nil
}

// ---- grants ----

func (t *Tx) GetGrant(id string) (_ *store.Grant, err error) {
	defer catch(&err)
	return get[store.Grant](t.b(BGrants), []byte(id), "grant")
}

func (t *Tx) ListGrants(credential, after string, limit int) (_ []*store.Grant, err error) {
	defer catch(&err)
	if credential == "" {
		return list[store.Grant](t.b(BGrants), after, limit, "grant")
	}
	var out []*store.Grant
	err = walkIndex(t.b(BGrantsByCred), credential, after, func(id string, _ []byte) (bool, error) {
		g, err := t.GetGrant(id)
		if err != nil {
			return false, err
		}
		out = append(out, g)
		return limit <= 0 || len(out) < limit, nil
	})
	return out, err
}

func (t *Tx) PutGrant(g *store.Grant) (err error) {
	defer catch(&err)
	if err := checkKey("grant id", g.ID); err != nil {
		return err
	}
	if err := checkKey("grant credential", g.Credential); err != nil {
		return err
	}
	b := t.b(BGrants)
	if old := b.Get([]byte(g.ID)); old != nil {
		prev, err := decode[store.Grant](old, "grant")
		if err != nil {
			return err
		}
		if err := t.b(BGrantsByCred).Delete(idxKey(prev.Credential, prev.ID)); err != nil {
			return err
		}
	}
	if err := t.b(BGrantsByCred).Put(idxKey(g.Credential, g.ID), nil); err != nil {
		return err
	}
	return put(b, []byte(g.ID), g)
}

func (t *Tx) DeleteGrant(id string) (err error) {
	defer catch(&err)
	g, err := t.GetGrant(id)
	if err != nil {
		return err
	}
	if err := t.b(BGrantsByCred).Delete(idxKey(g.Credential, g.ID)); err != nil {
		return err
	}
	return t.b(BGrants).Delete([]byte(id))
}

// walkIndex visits the ids under value in an index bucket, in id order after
// `after`, until fn returns false.
func walkIndex(b Bucket, value, after string, fn func(id string, v []byte) (bool, error)) error {
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

func (t *Tx) GetAgent(id string) (_ *store.Agent, err error) {
	defer catch(&err)
	return get[store.Agent](t.b(BAgents), []byte(id), "agent")
}

func (t *Tx) ListAgents(after string, limit int) (_ []*store.Agent, err error) {
	defer catch(&err)
	return list[store.Agent](t.b(BAgents), after, limit, "agent")
}

func (t *Tx) PutAgent(a *store.Agent) (err error) {
	defer catch(&err)
	if err := checkKey("agent id", a.ID); err != nil {
		return err
	}
	return put(t.b(BAgents), []byte(a.ID), a)
}

// ---- leases ----

func (t *Tx) GetLease(id string) (_ *store.Lease, err error) {
	defer catch(&err)
	return get[store.Lease](t.b(BLeases), []byte(id), "lease")
}

type leaseIndex struct {
	bucket []byte
	value  func(*store.Lease) string
}

var leaseIndexes = []leaseIndex{
	{BLeaseByAgent, func(l *store.Lease) string { return l.AgentID }},
	{BLeaseByTask, func(l *store.Lease) string { return l.TaskID }},
	{BLeaseByGrant, func(l *store.Lease) string { return l.GrantID }},
	{BLeaseByCred, func(l *store.Lease) string { return l.Credential }},
}

func (t *Tx) PutLease(l *store.Lease) (err error) {
	defer catch(&err)
	for _, f := range []struct{ name, v string }{{"lease id", l.ID}, {"lease agent", l.AgentID}, {"lease task", l.TaskID}, {"lease grant", l.GrantID}, {"lease credential", l.Credential}} {
		if err := checkKey(f.name, f.v); err != nil {
			return err
		}
	}
	b := t.b(BLeases)
	exp := t.b(BLeaseExpiry)
	// Lease ids and expiry keys grow with time, so new keys land at the end
	// of their bucket: split pages nearly full rather than half full.
	b.AppendOnly(appendFill)
	exp.AppendOnly(appendFill)
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
				if err := t.b(ix.bucket).Delete(idxKey(ix.value(prev), prev.ID)); err != nil {
					return err
				}
			}
		}
	}
	for _, ix := range leaseIndexes {
		if err := t.b(ix.bucket).Put(idxKey(ix.value(l), l.ID), []byte{byte(l.State)}); err != nil {
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
		if err := t.b(BMeta).Put(keyActiveLeases, u64(uint64(max(n, 0)))); err != nil {
			return err
		}
	}
	return put(b, []byte(l.ID), l)
}

func (t *Tx) CountActiveLeases(agent string, limit int) (n int, err error) {
	defer catch(&err)
	err = walkIndex(t.b(BLeaseByAgent), agent, "", func(_ string, state []byte) (bool, error) {
		if len(state) == 1 && store.LeaseState(state[0]) == store.LeaseActive {
			n++
		}
		return limit <= 0 || n < limit, nil
	})
	return n, err
}

func (t *Tx) ActiveLeaseCount() (_ int64, err error) {
	defer catch(&err)
	v := t.b(BMeta).Get(keyActiveLeases)
	if v == nil {
		return 0, nil
	}
	return int64(min(binary.BigEndian.Uint64(v), math.MaxInt64)), nil
}

func (t *Tx) ListLeases(f store.LeaseFilter, after string, limit int) (_ []*store.Lease, err error) {
	defer catch(&err)
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
		c := t.b(BLeaseByTask).Cursor()
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
		all, err := list[store.Lease](t.b(BLeases), after, 0, "lease")
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
	err = walkIndex(t.b(ix.bucket), value, after, func(id string, state []byte) (bool, error) {
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

func (t *Tx) ActiveLeasesExpiringBefore(at time.Time, limit int) (_ []*store.Lease, err error) {
	defer catch(&err)
	return due(t.b(BLeaseExpiry), at, limit, t.GetLease)
}

// due walks a time index (keys: big-endian unix nanos ‖ id) from its start
// up to and including at, loading each id.
func due[T any](b Bucket, at time.Time, limit int, load func(id string) (*T, error)) ([]*T, error) {
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

func (t *Tx) GetCursor(name string) (_ uint64, err error) {
	defer catch(&err)
	v := t.b(BCursors).Get([]byte(name))
	if v == nil {
		return 0, nil
	}
	if len(v) != 8 {
		return 0, fmt.Errorf("store: cursor %q is corrupt", name)
	}
	return binary.BigEndian.Uint64(v), nil
}

func (t *Tx) PutCursor(name string, v uint64) (err error) {
	defer catch(&err)
	if err := checkKey("cursor name", name); err != nil {
		return err
	}
	return t.b(BCursors).Put([]byte(name), u64(v))
}

// ---- revocation queue ----

func (t *Tx) GetRevocation(leaseID string) (_ *store.Revocation, err error) {
	defer catch(&err)
	return get[store.Revocation](t.b(BRevocations), []byte(leaseID), "revocation")
}

func (t *Tx) PutRevocation(r *store.Revocation) (err error) {
	defer catch(&err)
	if err := checkKey("revocation lease id", r.LeaseID); err != nil {
		return err
	}
	b := t.b(BRevocations)
	due := t.b(BRevocationsDue)
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

func (t *Tx) DeleteRevocation(leaseID string) (err error) {
	defer catch(&err)
	r, err := t.GetRevocation(leaseID)
	if err != nil {
		return err
	}
	if err := t.b(BRevocationsDue).Delete(expiryKey(r.NextAttempt, r.LeaseID)); err != nil {
		return err
	}
	return t.b(BRevocations).Delete([]byte(leaseID))
}

func (t *Tx) DueRevocations(at time.Time, limit int) (_ []*store.Revocation, err error) {
	defer catch(&err)
	return due(t.b(BRevocationsDue), at, limit, t.GetRevocation)
}

func (t *Tx) PendingRevocations() (_ int, err error) {
	defer catch(&err)
	return t.b(BRevocations).KeyN(), nil
}

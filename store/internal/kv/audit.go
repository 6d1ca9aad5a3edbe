package kv

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"math"
	"time"

	"github.com/leasehold/leasehold/store"
)

// auditHead is what meta keeps about the newest record.
type auditHead struct {
	Sequence uint64    `json:"seq"`
	Hash     []byte    `json:"hash"`
	Time     time.Time `json:"time"`
}

func (t *Tx) head() (auditHead, error) { return t.checkpoint(keyAuditHead) }

func (t *Tx) checkpoint(key []byte) (auditHead, error) {
	var h auditHead
	v := t.b(BMeta).Get(key)
	if v == nil {
		return h, nil
	}
	if err := json.Unmarshal(v, &h); err != nil {
		return h, fmt.Errorf("store: decode audit head: %w", err)
	}
	return h, nil
}

// AppendAudit implements store.Tx. Times are made monotonic with the
// sequence, so a time bound maps to a sequence bound through BAuditByTime and
// every query walks one index between two sequences. The record is chained
// to the previous head, and the head is moved to it.
func (t *Tx) AppendAudit(r *store.AuditRecord) (_ uint64, err error) {
	defer catch(&err)
	b := t.b(BAudit)
	// Records and the time index only ever grow at the end: fill their
	// pages instead of splitting them half-empty.
	b.AppendOnly(1)
	t.b(BAuditByTime).AppendOnly(1)
	meta := t.b(BMeta)
	seq, err := b.NextSequence()
	if err != nil {
		return 0, err
	}
	prev, err := t.head()
	if err != nil {
		return 0, err
	}
	if r.Time.IsZero() {
		r.Time = time.Now()
	}
	r.Time = r.Time.UTC()
	if !prev.Time.IsZero() && r.Time.Before(prev.Time) {
		r.Time = prev.Time
	}
	r.Sequence = seq
	store.ChainAudit(r, prev.Hash)
	headJSON, err := json.Marshal(auditHead{Sequence: seq, Hash: r.Hash, Time: r.Time})
	if err != nil {
		return 0, err
	}
	if err := meta.Put(keyAuditHead, headJSON); err != nil {
		return 0, err
	}
	if err := put(b, u64(seq), r); err != nil {
		return 0, err
	}
	dec := []byte{decisionByte(r.Decision)}
	for _, ix := range auditIndexes {
		v := ix.value(r)
		if v == "" {
			continue
		}
		if err := checkKey("audit index value", v); err != nil {
			return 0, err
		}
		if err := t.b(ix.bucket).Put(idxSeqKey(v, seq), dec); err != nil {
			return 0, err
		}
	}
	tk := binary.BigEndian.AppendUint64(u64(uint64(r.Time.UnixNano())), seq)
	if err := t.b(BAuditByTime).Put(tk, nil); err != nil {
		return 0, err
	}
	return seq, nil
}

type auditIndex struct {
	bucket []byte
	value  func(*store.AuditRecord) string
	query  func(store.AuditQuery) string
}

// auditIndexes in order of preference for a query: the most selective first.
var auditIndexes = []auditIndex{
	{BAuditByTrace, func(r *store.AuditRecord) string { return r.TraceID }, func(q store.AuditQuery) string { return q.TraceID }},
	{BAuditByLease, func(r *store.AuditRecord) string { return r.LeaseID }, func(q store.AuditQuery) string { return q.LeaseID }},
	{BAuditByTask, func(r *store.AuditRecord) string { return r.TaskID }, func(q store.AuditQuery) string { return q.TaskID }},
	{BAuditByAgent, func(r *store.AuditRecord) string { return r.AgentID }, func(q store.AuditQuery) string { return q.AgentID }},
	{BAuditByCred, func(r *store.AuditRecord) string { return r.Credential }, func(q store.AuditQuery) string { return q.Credential }},
	{BAuditByDecision, func(r *store.AuditRecord) string { return string(r.Decision) }, func(q store.AuditQuery) string { return string(q.Decision) }},
}

func decisionByte(d store.Decision) byte {
	if d == "" {
		return 0
	}
	return d[0]
}

// LastAuditSequence implements store.ReadTx.
func (t *Tx) LastAuditSequence() (_ uint64, err error) {
	defer catch(&err)
	return t.b(BAudit).Sequence(), nil
}

// AuditHead implements store.ReadTx.
func (t *Tx) AuditHead() (_ store.AuditCheckpoint, err error) {
	defer catch(&err)
	h, err := t.head()
	return store.AuditCheckpoint{Sequence: h.Sequence, Hash: h.Hash, Time: h.Time}, err
}

// AuditFloor implements store.ReadTx.
func (t *Tx) AuditFloor() (_ store.AuditCheckpoint, err error) {
	defer catch(&err)
	h, err := t.checkpoint(keyAuditFloor)
	return store.AuditCheckpoint{Sequence: h.Sequence, Hash: h.Hash, Time: h.Time}, err
}

// PruneAudit implements store.Tx.
func (t *Tx) PruneAudit(through uint64, limit int) (_ int, err error) {
	defer catch(&err)
	audit := t.b(BAudit)
	// Read the records first, then delete: deleting under a cursor and
	// seeking back to the first key costs a network engine a walk over
	// every key deleted so far, each time.
	var doomed []store.AuditRecord
	c := audit.Cursor()
	for k, v := c.First(); k != nil && binary.BigEndian.Uint64(k) <= through && (limit <= 0 || len(doomed) < limit); k, v = c.Next() {
		var r store.AuditRecord
		if err := json.Unmarshal(v, &r); err != nil {
			return 0, &store.CorruptRecordError{Sequence: binary.BigEndian.Uint64(k), Err: err}
		}
		doomed = append(doomed, r)
	}
	n := 0
	var last *store.AuditRecord
	for i := range doomed {
		r := &doomed[i]
		for _, ix := range auditIndexes {
			if val := ix.value(r); val != "" {
				if err := t.b(ix.bucket).Delete(idxSeqKey(val, r.Sequence)); err != nil {
					return n, err
				}
			}
		}
		tk := binary.BigEndian.AppendUint64(u64(uint64(r.Time.UnixNano())), r.Sequence)
		if err := t.b(BAuditByTime).Delete(tk); err != nil {
			return n, err
		}
		if err := audit.Delete(u64(r.Sequence)); err != nil {
			return n, err
		}
		last = r
		n++
	}
	if last == nil {
		return 0, nil
	}
	floor, err := json.Marshal(auditHead{Sequence: last.Sequence, Hash: last.Hash, Time: last.Time})
	if err != nil {
		return n, err
	}
	return n, t.b(BMeta).Put(keyAuditFloor, floor)
}

// seqAtOrAfter returns the sequence of the first record whose time is at or
// after at, or ok=false when there is none.
func (t *Tx) seqAtOrAfter(at time.Time) (uint64, bool) {
	k, _ := t.b(BAuditByTime).Cursor().Seek(u64(uint64(at.UnixNano())))
	if k == nil {
		return 0, false
	}
	return binary.BigEndian.Uint64(k[8:]), true
}

// QueryAudit implements store.ReadTx.
func (t *Tx) QueryAudit(q store.AuditQuery) (_ []*store.AuditRecord, err error) {
	defer catch(&err)
	lo, hi := uint64(1), uint64(math.MaxUint64) // [lo, hi)
	if q.AfterSequence != 0 {
		lo = max(lo, q.AfterSequence+1)
	}
	if q.BeforeSequence != 0 {
		hi = min(hi, q.BeforeSequence)
	}
	// Nothing lies above the newest record: starting there lets an engine
	// that walks backwards in windows start next to it.
	hi = min(hi, t.b(BAudit).Sequence()+1)
	if !q.End.IsZero() {
		if s, ok := t.seqAtOrAfter(q.End); ok {
			hi = min(hi, s)
		}
	}
	if !q.Start.IsZero() {
		s, ok := t.seqAtOrAfter(q.Start)
		if !ok {
			return nil, nil
		}
		lo = max(lo, s)
	}
	if hi <= lo {
		return nil, nil
	}

	audit := t.b(BAudit)
	var out []*store.AuditRecord
	// visit reports whether to go on.
	visit := func(seq uint64, dec []byte) (bool, error) {
		if seq < lo || seq >= hi {
			return false, nil
		}
		if q.Decision != "" && dec != nil && (len(dec) != 1 || dec[0] != decisionByte(q.Decision)) {
			return true, nil
		}
		v := audit.Get(u64(seq))
		if v == nil {
			if dec == nil {
				return true, nil // walking the records themselves: a gap is VerifyAudit's to report
			}
			return false, &store.CorruptRecordError{Sequence: seq, Err: fmt.Errorf("an index names it but the record is missing")}
		}
		var r store.AuditRecord
		if err := json.Unmarshal(v, &r); err != nil {
			return false, &store.CorruptRecordError{Sequence: seq, Err: err}
		}
		if q.Matches(&r) {
			out = append(out, &r)
		}
		return q.Limit <= 0 || len(out) < q.Limit, nil
	}

	var bucket, prefix []byte
	for _, ix := range auditIndexes {
		if v := ix.query(q); v != "" {
			bucket, prefix = ix.bucket, append([]byte(v), 0)
			break
		}
	}
	seqOf := func(k []byte) uint64 { return binary.BigEndian.Uint64(k[len(prefix):]) }
	var c Cursor
	if bucket == nil {
		c = audit.Cursor()
	} else {
		c = t.b(bucket).Cursor()
	}
	var k, v []byte
	if q.Ascending {
		k, v = c.Seek(binary.BigEndian.AppendUint64(bytes.Clone(prefix), lo))
	} else {
		k, v = seekBefore(c, binary.BigEndian.AppendUint64(bytes.Clone(prefix), hi), prefix)
	}
	for ; k != nil && bytes.HasPrefix(k, prefix) && len(k) == len(prefix)+8; k, v = step(c, q.Ascending) {
		dec := v
		if bucket == nil {
			dec = nil
		}
		more, err := visit(seqOf(k), dec)
		if err != nil || !more {
			return out, err
		}
	}
	return out, nil
}

func step(c Cursor, ascending bool) ([]byte, []byte) {
	if ascending {
		return c.Next()
	}
	return c.Prev()
}

// seekBefore positions c on the last key strictly below key (and, when
// prefix is set, still under prefix).
func seekBefore(c Cursor, key, prefix []byte) ([]byte, []byte) {
	k, v := c.SeekBefore(key)
	if k != nil && len(prefix) > 0 && !bytes.HasPrefix(k, prefix) {
		return nil, nil
	}
	return k, v
}

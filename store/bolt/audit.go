package bolt

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"math"
	"time"

	bbolt "go.etcd.io/bbolt"

	"github.com/leasehold/leasehold/store"
)

// AppendAudit implements store.Tx. Times are made monotonic with the
// sequence, so a time bound maps to a sequence bound through bAuditByTime and
// every query walks one index backwards between two sequences.
func (t *boltTx) AppendAudit(r *store.AuditRecord) (uint64, error) {
	b := t.tx.Bucket(bAudit)
	meta := t.tx.Bucket(bMeta)
	seq, err := b.NextSequence()
	if err != nil {
		return 0, err
	}
	if r.Time.IsZero() {
		r.Time = time.Now()
	}
	r.Time = r.Time.UTC()
	if v := meta.Get(keyLastAuditTime); v != nil {
		if last := time.Unix(0, int64(binary.BigEndian.Uint64(v))).UTC(); r.Time.Before(last) {
			r.Time = last
		}
	}
	r.Sequence = seq
	if err := meta.Put(keyLastAuditTime, u64(uint64(r.Time.UnixNano()))); err != nil {
		return 0, err
	}
	if err := put(b, u64(seq), r); err != nil {
		return 0, err
	}
	dec := []byte{decisionByte(r.Decision)}
	for _, ix := range []struct {
		bucket []byte
		value  string
	}{{bAuditByAgent, r.AgentID}, {bAuditByCred, r.Credential}, {bAuditByTask, r.TaskID}} {
		if ix.value == "" {
			continue
		}
		if err := checkKey("audit index value", ix.value); err != nil {
			return 0, err
		}
		if err := t.tx.Bucket(ix.bucket).Put(idxSeqKey(ix.value, seq), dec); err != nil {
			return 0, err
		}
	}
	tk := binary.BigEndian.AppendUint64(u64(uint64(r.Time.UnixNano())), seq)
	if err := t.tx.Bucket(bAuditByTime).Put(tk, nil); err != nil {
		return 0, err
	}
	return seq, nil
}

func decisionByte(d store.Decision) byte {
	if d == "" {
		return 0
	}
	return d[0]
}

// LastAuditSequence implements store.ReadTx.
func (t *boltTx) LastAuditSequence() (uint64, error) {
	return t.tx.Bucket(bAudit).Sequence(), nil
}

// seqAtOrAfter returns the sequence of the first record whose time is at or
// after at, or ok=false when there is none.
func (t *boltTx) seqAtOrAfter(at time.Time) (uint64, bool) {
	k, _ := t.tx.Bucket(bAuditByTime).Cursor().Seek(u64(uint64(at.UnixNano())))
	if k == nil {
		return 0, false
	}
	return binary.BigEndian.Uint64(k[8:]), true
}

// QueryAudit implements store.ReadTx.
func (t *boltTx) QueryAudit(q store.AuditQuery) ([]*store.AuditRecord, error) {
	hi := uint64(math.MaxUint64) // exclusive
	if q.BeforeSequence != 0 {
		hi = q.BeforeSequence
	}
	if !q.End.IsZero() {
		if s, ok := t.seqAtOrAfter(q.End); ok && s < hi {
			hi = s
		}
	}
	lo := uint64(1) // inclusive
	if !q.Start.IsZero() {
		s, ok := t.seqAtOrAfter(q.Start)
		if !ok {
			return nil, nil
		}
		lo = s
	}
	if hi <= lo {
		return nil, nil
	}

	var bucket []byte
	var value string
	switch {
	case q.AgentID != "":
		bucket, value = bAuditByAgent, q.AgentID
	case q.TaskID != "":
		bucket, value = bAuditByTask, q.TaskID
	case q.Credential != "":
		bucket, value = bAuditByCred, q.Credential
	}

	audit := t.tx.Bucket(bAudit)
	var out []*store.AuditRecord
	visit := func(seq uint64, dec []byte) (bool, error) {
		if seq < lo {
			return false, nil
		}
		if q.Decision != "" && dec != nil && (len(dec) != 1 || dec[0] != decisionByte(q.Decision)) {
			return true, nil
		}
		v := audit.Get(u64(seq))
		if v == nil {
			return false, fmt.Errorf("bolt: audit index points at missing record %d", seq)
		}
		r, err := decode[store.AuditRecord](v, "audit record")
		if err != nil {
			return false, err
		}
		if (q.AgentID == "" || r.AgentID == q.AgentID) &&
			(q.TaskID == "" || r.TaskID == q.TaskID) &&
			(q.Credential == "" || r.Credential == q.Credential) &&
			(q.Decision == "" || r.Decision == q.Decision) {
			out = append(out, r)
		}
		return q.Limit <= 0 || len(out) < q.Limit, nil
	}

	if bucket == nil {
		c := audit.Cursor()
		k, _ := seekBefore(c, u64(hi), nil)
		for ; k != nil; k, _ = c.Prev() {
			more, err := visit(binary.BigEndian.Uint64(k), nil)
			if err != nil || !more {
				return out, err
			}
		}
		return out, nil
	}
	prefix := append([]byte(value), 0)
	c := t.tx.Bucket(bucket).Cursor()
	k, v := seekBefore(c, idxSeqKey(value, hi), prefix)
	for ; k != nil && bytes.HasPrefix(k, prefix); k, v = c.Prev() {
		more, err := visit(binary.BigEndian.Uint64(k[len(prefix):]), v)
		if err != nil || !more {
			return out, err
		}
	}
	return out, nil
}

// seekBefore positions c on the last key strictly below key (and, when
// prefix is set, still under prefix).
func seekBefore(c *bbolt.Cursor, key, prefix []byte) ([]byte, []byte) {
	k, v := c.Seek(key)
	if k == nil {
		k, v = c.Last()
	} else {
		k, v = c.Prev()
	}
	if k != nil && prefix != nil && !bytes.HasPrefix(k, prefix) {
		return nil, nil
	}
	return k, v
}

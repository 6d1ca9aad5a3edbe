package store

import (
	"crypto/sha256"
	"encoding/binary"
	"fmt"
	"time"
)

// The audit trail is a hash chain: each record holds the SHA-256 of its
// predecessor (PrevHash) and its own hash (Hash) over the canonical encoding
// below, which covers every field but Hash. Engines set both in AppendAudit
// with ChainAudit; VerifyAudit recomputes them. Changing the encoding breaks
// every existing chain: it is versioned by chainVersion. Version 2 is version
// 1 followed by the delegation chain, used only for records that have one,
// so records without it hash as they always did.
const (
	chainVersion           = 1
	chainVersionDelegation = 2
)

// ChainAudit links r to the record before it (prev is that record's Hash,
// empty for the first record) and sets r.Hash.
func ChainAudit(r *AuditRecord, prev []byte) {
	r.PrevHash = append([]byte(nil), prev...)
	r.Hash = AuditHash(r)
}

// AuditHash is the SHA-256 of r's canonical encoding.
func AuditHash(r *AuditRecord) []byte {
	h := sha256.New()
	var buf [8]byte
	u := func(v uint64) {
		binary.BigEndian.PutUint64(buf[:], v)
		h.Write(buf[:])
	}
	b := func(p []byte) { u(uint64(len(p))); h.Write(p) }
	s := func(v string) { b([]byte(v)) }
	if len(r.DelegationChain) > 0 {
		u(chainVersionDelegation)
	} else {
		u(chainVersion)
	}
	u(r.Sequence)
	u(uint64(r.Time.UnixNano()))
	for _, f := range []string{string(r.Event), string(r.Decision), r.Actor, r.AgentID, r.Credential} {
		s(f)
	}
	u(uint64(len(r.Scopes)))
	for _, sc := range r.Scopes {
		s(sc)
	}
	for _, f := range []string{r.TaskID, r.TaskPurpose, r.LeaseID, r.GrantID, r.Reason, r.RequestID, r.Code, r.TraceID, r.SpanID} {
		s(f)
	}
	if len(r.DelegationChain) > 0 {
		u(uint64(len(r.DelegationChain)))
		for _, d := range r.DelegationChain {
			s(d)
		}
	}
	b(r.PrevHash)
	return h.Sum(nil)
}

// AuditCheckpoint pins the chain at one record: whoever keeps a checkpoint
// can later show that the log up to it was not rewritten.
type AuditCheckpoint struct {
	Sequence uint64
	Hash     []byte
	Time     time.Time
}

// CorruptRecordError reports an audit record that cannot be decoded.
type CorruptRecordError struct {
	Sequence uint64
	Err      error
}

func (e *CorruptRecordError) Error() string {
	return fmt.Sprintf("audit record %d is corrupt: %v", e.Sequence, e.Err)
}

func (e *CorruptRecordError) Unwrap() error { return e.Err }

// Package kv is the record layout the store engines share: Leasehold's
// records, their secondary indexes, the expiry and revocation time indexes
// and the hash-chained audit trail, written over an ordered key-value
// transaction. An engine supplies the transaction (store/bolt over bbolt,
// store/etcd over an etcd snapshot and a write buffer) and wraps it with
// NewTx; the records, keys and encodings are the same on every engine.
//
// Layout: one bucket per record kind, keyed by id, holding JSON; secondary
// indexes are buckets whose keys are "<value>\x00<id>" (leases) or
// "<value>\x00<seq>" (audit) with a one-byte value (the lease state or the
// audit decision) so filters can skip records without decoding them. Active
// leases are also in an expiry index keyed by big-endian expiry then id, which
// the reaper walks, so start-up never loads leases into memory.
package kv

import (
	"errors"
	"fmt"
)

// Txn is an engine's read-write (or read-only) transaction.
type Txn interface {
	// Bucket returns the named bucket; every name in Buckets exists.
	Bucket(name []byte) Bucket
}

// Bucket is an ordered key space inside a transaction. Keys and values
// returned are valid until the transaction ends; callers copy what they
// keep. A read that fails (a network engine) calls Fail, which aborts the
// record method in progress with that error.
type Bucket interface {
	Get(key []byte) []byte
	Put(key, value []byte) error
	Delete(key []byte) error
	Cursor() Cursor
	// NextSequence increments and returns the bucket's sequence;
	// Sequence returns it without incrementing.
	NextSequence() (uint64, error)
	Sequence() uint64
	// KeyN counts the keys in the bucket.
	KeyN() int
	// AppendOnly hints that new keys arrive in order (a page-fill hint
	// for bbolt; engines may ignore it). fill is bbolt's FillPercent.
	AppendOnly(fill float64)
}

// Cursor walks a bucket in key order. Every move returns nil keys past
// either end. Deleting while walking is left out on purpose: code that
// deletes collects the keys first, then calls Bucket.Delete.
type Cursor interface {
	First() (key, value []byte)
	// Seek moves to the first key at or after key.
	Seek(key []byte) (key2, value []byte)
	// SeekBefore moves to the last key strictly before key. Walks that
	// go backwards start with it; the keys they walk end in a big-endian
	// sequence, which a network engine may use to fetch in windows.
	SeekBefore(key []byte) (key2, value []byte)
	Next() (key, value []byte)
	Prev() (key, value []byte)
}

// Bucket names. Engines create every one of them.
var (
	BMeta            = []byte("meta")
	BCredentials     = []byte("credentials")
	BCredVersions    = []byte("credential_versions")
	BGrants          = []byte("grants")
	BGrantsByCred    = []byte("idx_grants_credential")
	BAgents          = []byte("agents")
	BLeases          = []byte("leases")
	BLeaseByAgent    = []byte("idx_leases_agent")
	BLeaseByTask     = []byte("idx_leases_task")
	BLeaseByGrant    = []byte("idx_leases_grant")
	BLeaseByCred     = []byte("idx_leases_credential")
	BLeaseExpiry     = []byte("idx_leases_expiry")
	BAudit           = []byte("audit")
	BAuditByAgent    = []byte("idx_audit_agent")
	BAuditByCred     = []byte("idx_audit_credential")
	BAuditByTask     = []byte("idx_audit_task")
	BAuditByLease    = []byte("idx_audit_lease")
	BAuditByTrace    = []byte("idx_audit_trace")
	BAuditByDecision = []byte("idx_audit_decision")
	BAuditByTime     = []byte("idx_audit_time")
	BCursors         = []byte("cursors")
	BRevocations     = []byte("revocations")
	BRevocationsDue  = []byte("idx_revocations_due")

	// Buckets lists every bucket.
	Buckets = [][]byte{BMeta, BCredentials, BCredVersions, BGrants, BGrantsByCred, BAgents,
		BLeases, BLeaseByAgent, BLeaseByTask, BLeaseByGrant, BLeaseByCred, BLeaseExpiry,
		BAudit, BAuditByAgent, BAuditByCred, BAuditByTask, BAuditByLease, BAuditByTrace, BAuditByDecision, BAuditByTime, BCursors, BRevocations, BRevocationsDue}

	// KeySchema (in BMeta) holds the schema version, big-endian uint64.
	KeySchema = []byte("schema_version")
)

// fault carries a read error out of the record code to the method that
// started it; see Fail.
type fault struct{ err error }

// Fail aborts the record method in progress with err. Engines call it from
// Bucket and Cursor reads that cannot return an error; it never unwinds
// past this package.
func Fail(err error) { panic(fault{err}) }

// catch turns a Fail into the method's error.
func catch(errp *error) {
	if r := recover(); r != nil {
		f, ok := r.(fault)
		if !ok {
			panic(r)
		}
		*errp = f.err
	}
}

// ErrInvalidKey is wrapped by writes whose key fields are empty or hold NUL.
var ErrInvalidKey = errors.New("invalid key")

func checkKey(field, v string) error {
	if v == "" || containsNUL(v) {
		return fmt.Errorf("store: %w: %s %q", ErrInvalidKey, field, v)
	}
	return nil
}

func containsNUL(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] == 0 {
			return true
		}
	}
	return false
}

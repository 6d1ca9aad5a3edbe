// Package auditsink exports the audit trail to SIEMs and log pipelines as
// JSON lines. The broker's store stays the source of truth: each sink has a
// cursor persisted in the store, the exporter sends records after it in
// order and advances it once the sink has them, so delivery is at least
// once and resumes after a restart. The record format is Record; its field
// names are stable (docs/audit.md).
package auditsink

import (
	"bytes"
	"context"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"sync"
	"time"

	"github.com/leasehold/leasehold/store"
)

// Record is one exported audit record. Field names are a stable interface:
// add fields, never rename or remove them.
type Record struct {
	Sequence    uint64   `json:"sequence"`
	Time        string   `json:"time"` // RFC 3339, UTC, nanoseconds
	Event       string   `json:"event"`
	Decision    string   `json:"decision"`
	Actor       string   `json:"actor,omitempty"`
	AgentID     string   `json:"agent_id,omitempty"`
	Credential  string   `json:"credential,omitempty"`
	Scopes      []string `json:"scopes,omitempty"`
	TaskID      string   `json:"task_id,omitempty"`
	TaskPurpose string   `json:"task_purpose,omitempty"`
	LeaseID     string   `json:"lease_id,omitempty"`
	GrantID     string   `json:"grant_id,omitempty"`
	Reason      string   `json:"reason,omitempty"`
	RequestID   string   `json:"request_id,omitempty"`
	Code        string   `json:"code,omitempty"`
	TraceID     string   `json:"trace_id,omitempty"`
	SpanID      string   `json:"span_id,omitempty"`
	// DelegationChain: the agents that delegated the grant the event is
	// under, first to last.
	DelegationChain []string `json:"delegation_chain,omitempty"`
	Hash            string   `json:"hash"`
	PrevHash        string   `json:"prev_hash,omitempty"`
}

// FromStore converts a store record.
func FromStore(r *store.AuditRecord) Record {
	return Record{
		Sequence: r.Sequence, Time: r.Time.UTC().Format(time.RFC3339Nano), Event: string(r.Event),
		Decision: string(r.Decision), Actor: r.Actor, AgentID: r.AgentID, Credential: r.Credential,
		Scopes: r.Scopes, TaskID: r.TaskID, TaskPurpose: r.TaskPurpose, LeaseID: r.LeaseID,
		GrantID: r.GrantID, Reason: r.Reason, RequestID: r.RequestID, Code: r.Code, TraceID: r.TraceID, SpanID: r.SpanID,
		DelegationChain: r.DelegationChain,
		Hash:            hex.EncodeToString(r.Hash), PrevHash: hex.EncodeToString(r.PrevHash),
	}
}

// encode renders records as JSON lines.
func encode(recs []*store.AuditRecord) ([]byte, error) {
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	for _, r := range recs {
		if err := enc.Encode(FromStore(r)); err != nil {
			return nil, err
		}
	}
	return buf.Bytes(), nil
}

// File appends JSON lines to a file and fsyncs each batch. The file is
// opened for every batch, so a log rotator may move it away at any time.
type File struct {
	Path string
}

// Name implements server.AuditSink.
func (f *File) Name() string { return "file:" + f.Path }

// Write implements server.AuditSink.
func (f *File) Write(_ context.Context, recs []*store.AuditRecord) error {
	data, err := encode(recs)
	if err != nil {
		return err
	}
	fh, err := os.OpenFile(f.Path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o600)
	if err != nil {
		return fmt.Errorf("audit sink: %w", err)
	}
	_, err = fh.Write(data)
	if err == nil {
		err = fh.Sync()
	}
	return errors.Join(err, fh.Close())
}

// Close implements server.AuditSink.
func (f *File) Close() error { return nil }

// Writer writes JSON lines to an io.Writer, e.g. standard output.
type Writer struct {
	ID string // the sink's name, which keys its cursor
	W  io.Writer
	mu sync.Mutex
}

// Name implements server.AuditSink.
func (w *Writer) Name() string { return w.ID }

// Write implements server.AuditSink.
func (w *Writer) Write(_ context.Context, recs []*store.AuditRecord) error {
	data, err := encode(recs)
	if err != nil {
		return err
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	_, err = w.W.Write(data)
	return err
}

// Close implements server.AuditSink.
func (w *Writer) Close() error { return nil }

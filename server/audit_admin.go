package server

import (
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"strconv"
	"time"

	"go.opentelemetry.io/otel/trace"
	"google.golang.org/protobuf/types/known/timestamppb"

	leaseholdv1 "github.com/leasehold/leasehold/proto/leasehold/v1"
	"github.com/leasehold/leasehold/store"
)

// auditFilter validates the filters QueryAudit and WatchAudit share.
func (s *Server) auditFilter(agent, credential, task, lease, traceID string, decision leaseholdv1.Decision) (store.AuditQuery, error) {
	q := store.AuditQuery{Credential: credential, TaskID: task, LeaseID: lease, TraceID: traceID}
	if traceID != "" {
		if id, err := trace.TraceIDFromHex(traceID); err != nil || !id.IsValid() {
			return q, errInvalid("trace_id", "%q is not a trace id (32 lowercase hex digits, not all zero)", truncate(traceID, 40))
		}
	}
	if agent != "" {
		id, err := validSpiffeID("agent_id", agent, s.cfg.TrustDomain)
		if err != nil {
			return q, err
		}
		q.AgentID = id.String()
	}
	if credential != "" {
		if err := validCredentialName("credential", credential); err != nil {
			return q, err
		}
	}
	if err := validTaskID("task_id", task, false); err != nil {
		return q, err
	}
	if lease != "" {
		if err := validLeaseID("lease_id", lease); err != nil {
			return q, err
		}
	}
	switch decision {
	case leaseholdv1.Decision_DECISION_UNSPECIFIED:
	case leaseholdv1.Decision_DECISION_ALLOW:
		q.Decision = store.Allow
	case leaseholdv1.Decision_DECISION_DENY:
		q.Decision = store.Deny
	default:
		return q, errInvalid("decision", "unknown value %d", decision)
	}
	return q, nil
}

func (a *adminService) QueryAudit(ctx context.Context, req *leaseholdv1.QueryAuditRequest) (*leaseholdv1.QueryAuditResponse, error) {
	q, err := a.s.auditFilter(req.GetAgentId(), req.GetCredential(), req.GetTaskId(), req.GetLeaseId(), req.GetTraceId(), req.GetDecision())
	if err != nil {
		return nil, err
	}
	for _, t := range []struct {
		field string
		in    *timestamppb.Timestamp
		out   *time.Time
	}{{"start_time", req.GetStartTime(), &q.Start}, {"end_time", req.GetEndTime(), &q.End}} {
		if t.in == nil {
			continue
		}
		if err := t.in.CheckValid(); err != nil {
			return nil, errInvalid(t.field, "is not a valid timestamp")
		}
		*t.out = t.in.AsTime()
	}
	if !q.Start.IsZero() && !q.End.IsZero() && !q.Start.Before(q.End) {
		return nil, errInvalid("end_time", "must be after start_time")
	}
	size, err := validPageSize("page_size", req.GetPageSize())
	if err != nil {
		return nil, err
	}
	// A page token carries the direction, so it cannot be replayed the other way.
	kind := "audit-newest"
	if req.GetOldestFirst() {
		kind, q.Ascending = "audit-oldest", true
	}
	tok, err := parsePageToken("page_token", kind, req.GetPageToken())
	if err != nil {
		return nil, err
	}
	if tok != "" {
		seq, err := strconv.ParseUint(tok, 10, 64)
		if err != nil || seq == 0 {
			return nil, errInvalid("page_token", "is malformed")
		}
		if q.Ascending {
			q.AfterSequence = seq
		} else {
			q.BeforeSequence = seq
		}
	}
	q.Limit = size + 1
	var recs []*store.AuditRecord
	if err := a.s.store.View(ctx, func(tx store.ReadTx) error {
		recs, err = tx.QueryAudit(q)
		return err
	}); err != nil {
		return nil, err
	}
	out := &leaseholdv1.QueryAuditResponse{}
	recs, out.NextPageToken = page(recs, size, kind, func(r *store.AuditRecord) string { return strconv.FormatUint(r.Sequence, 10) })
	for _, r := range recs {
		out.Records = append(out.Records, auditToProto(r))
	}
	return out, nil
}

// WatchAudit sends matching records oldest first from after_sequence, then
// each new one as it is committed. Sequences are assigned inside the single
// write transaction that commits them, so a reader never sees a record
// before one with a smaller sequence: resuming after the last sequence
// received neither skips nor repeats.
func (a *adminService) WatchAudit(req *leaseholdv1.WatchAuditRequest, stream leaseholdv1.AdminService_WatchAuditServer) error {
	s := a.s
	q, err := s.auditFilter(req.GetAgentId(), req.GetCredential(), req.GetTaskId(), req.GetLeaseId(), req.GetTraceId(), req.GetDecision())
	if err != nil {
		return err
	}
	return s.streamAudit(stream.Context(), q, req.GetAfterSequence(), req.GetFromNow(), func(r *store.AuditRecord) error {
		return stream.Send(&leaseholdv1.WatchAuditResponse{Record: auditToProto(r)})
	})
}

// streamAudit sends records matching q oldest first from after (or from
// the head), then each new one as it commits, until ctx ends or the broker
// stops.
func (s *Server) streamAudit(ctx context.Context, q store.AuditQuery, after uint64, fromNow bool, send func(*store.AuditRecord) error) error {
	const batch = 500
	cursor := after
	if fromNow {
		if err := s.store.View(ctx, func(tx store.ReadTx) error {
			var err error
			cursor, err = tx.LastAuditSequence()
			return err
		}); err != nil {
			return err
		}
	}
	q.Ascending, q.Limit = true, batch
	for {
		// Take the wake-up channel before reading, so a commit between the
		// read and the wait is not missed.
		wake := s.auditCommitted.wait()
		q.AfterSequence = cursor
		var recs []*store.AuditRecord
		var last uint64
		if err := s.store.View(ctx, func(tx store.ReadTx) error {
			var err error
			if last, err = tx.LastAuditSequence(); err != nil {
				return err
			}
			recs, err = tx.QueryAudit(q)
			return err
		}); err != nil {
			return err
		}
		for _, r := range recs {
			if err := send(r); err != nil {
				return err
			}
			cursor = r.Sequence
		}
		if len(recs) == batch {
			continue
		}
		// Everything up to last was scanned in that snapshot.
		cursor = max(cursor, last)
		select {
		case <-ctx.Done():
			return nil
		case <-s.stop:
			return errPrecondition("the broker is shutting down; resume after sequence %d", cursor)
		case <-wake:
		}
	}
}

func checkpointToProto(c store.AuditCheckpoint) *leaseholdv1.AuditCheckpoint {
	if c.Sequence == 0 {
		return &leaseholdv1.AuditCheckpoint{}
	}
	return &leaseholdv1.AuditCheckpoint{Sequence: c.Sequence, Hash: hex.EncodeToString(c.Hash), Time: ts(c.Time)}
}

func (a *adminService) GetAuditCheckpoint(ctx context.Context, _ *leaseholdv1.GetAuditCheckpointRequest) (*leaseholdv1.GetAuditCheckpointResponse, error) {
	var head store.AuditCheckpoint
	err := a.s.store.View(ctx, func(tx store.ReadTx) error {
		var err error
		head, err = tx.AuditHead()
		return err
	})
	if err != nil {
		return nil, err
	}
	return &leaseholdv1.GetAuditCheckpointResponse{Checkpoint: checkpointToProto(head)}, nil
}

// VerifyAudit walks the chain from from_sequence to to_sequence in batches,
// recomputing each record's hash and its link to the one before.
func (a *adminService) VerifyAudit(ctx context.Context, req *leaseholdv1.VerifyAuditRequest) (*leaseholdv1.VerifyAuditResponse, error) {
	from, to := max(req.GetFromSequence(), 1), req.GetToSequence()
	if to != 0 && to < from {
		return nil, errInvalid("to_sequence", "%d is before from_sequence %d", to, from)
	}
	pins := map[uint64][]byte{}
	for i, c := range req.GetCheckpoints() {
		h, err := hex.DecodeString(c.GetHash())
		if err != nil || len(h) != 32 || c.GetSequence() == 0 {
			return nil, errInvalid(fmt.Sprintf("checkpoints[%d]", i), "needs a sequence and a 64-digit hex hash")
		}
		pins[c.GetSequence()] = h
	}
	out := &leaseholdv1.VerifyAuditResponse{Ok: true}
	broken := func(seq uint64, format string, args ...any) {
		if out.Ok {
			out.Ok, out.FirstBrokenSequence, out.Problem = false, seq, fmt.Sprintf(format, args...)
		}
	}
	err := a.s.store.View(ctx, func(tx store.ReadTx) error {
		head, err := tx.AuditHead()
		if err != nil {
			return err
		}
		out.Head = checkpointToProto(head)
		if to == 0 || to > head.Sequence {
			to = head.Sequence
		}
		floor, err := tx.AuditFloor()
		if err != nil {
			return err
		}
		var prev []byte
		if floor.Sequence > 0 {
			out.Floor = checkpointToProto(floor)
			if from <= floor.Sequence+1 {
				// Retention removed what came before: continue from the
				// pruned record's hash.
				from, prev = floor.Sequence+1, floor.Hash
			}
			if pin, ok := pins[floor.Sequence]; ok && !bytesEqual(pin, floor.Hash) {
				broken(floor.Sequence, "record %d differs from the checkpoint: the log was rewritten", floor.Sequence)
			}
			for seq := range pins {
				if seq <= floor.Sequence {
					delete(pins, seq) // pruned: nothing left to compare
				}
			}
		}
		if from > 1 && prev == nil {
			rs, err := tx.QueryAudit(store.AuditQuery{AfterSequence: from - 2, BeforeSequence: from, Ascending: true})
			if err != nil && !errors.As(err, new(*store.CorruptRecordError)) {
				return err
			}
			if len(rs) == 1 {
				prev = rs[0].Hash
			}
		}
		next := from
		for next <= to && out.Ok {
			rs, err := tx.QueryAudit(store.AuditQuery{AfterSequence: next - 1, BeforeSequence: to + 1, Ascending: true, Limit: 1000})
			var corrupt *store.CorruptRecordError
			if errors.As(err, &corrupt) {
				broken(corrupt.Sequence, "record %d cannot be decoded: it was altered", corrupt.Sequence)
				return nil
			}
			if err != nil {
				return err
			}
			if len(rs) == 0 {
				broken(next, "record %d is missing: it was deleted", next)
				break
			}
			for _, r := range rs {
				switch {
				case r.Sequence != next:
					broken(next, "record %d is missing: it was deleted", next)
				case !bytesEqual(store.AuditHash(r), r.Hash):
					broken(r.Sequence, "record %d was altered: its contents do not match its hash", r.Sequence)
				case (r.Sequence > 1 || len(r.PrevHash) > 0) && (next > from || prev != nil) && !bytesEqual(r.PrevHash, prev):
					broken(r.Sequence, "record %d does not link to record %d: the chain was re-linked", r.Sequence, r.Sequence-1)
				case pins[r.Sequence] != nil && !bytesEqual(pins[r.Sequence], r.Hash):
					broken(r.Sequence, "record %d differs from the checkpoint: the log was rewritten", r.Sequence)
				}
				if !out.Ok {
					break
				}
				out.RecordsChecked++
				prev, next = r.Hash, r.Sequence+1
			}
		}
		if out.Ok && to == head.Sequence && head.Sequence > 0 && !bytesEqual(prev, head.Hash) {
			broken(head.Sequence, "the chain head does not match record %d: records were removed or replaced at the end", head.Sequence)
		}
		for seq := range pins {
			if out.Ok && seq > head.Sequence {
				broken(seq, "checkpoint %d is beyond the head %d: records were removed from the end", seq, head.Sequence)
			}
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	return out, nil
}

func bytesEqual(a, b []byte) bool { return string(a) == string(b) }

// ExplainAccess runs the acquire policy for any agent without issuing or
// recording anything.
func (a *adminService) ExplainAccess(ctx context.Context, req *leaseholdv1.ExplainAccessRequest) (*leaseholdv1.ExplainAccessResponse, error) {
	s := a.s
	agent, err := validSpiffeID("agent_id", req.GetAgentId(), s.cfg.TrustDomain)
	if err != nil {
		return nil, err
	}
	if err := validCredentialName("credential", req.GetCredential()); err != nil {
		return nil, err
	}
	if err := validScopes("scopes", req.GetScopes(), true); err != nil {
		return nil, err
	}
	ttl, err := validDuration("ttl", req.GetTtl(), s.cfg.MaxTTL)
	if err != nil {
		return nil, err
	}
	if err := validTaskID("task_id", req.GetTaskId(), false); err != nil {
		return nil, err
	}
	out := &leaseholdv1.ExplainAccessResponse{}
	now := s.now()
	err = s.store.View(ctx, func(tx store.ReadTx) error {
		p, err := s.evaluate(tx, agent, req.GetCredential(), req.GetScopes(), ttl, req.GetTaskId(), now)
		if err != nil {
			return err
		}
		for _, g := range p.matching {
			out.MatchingGrants = append(out.MatchingGrants, grantToProto(g))
		}
		if p.denial != nil {
			out.Code, out.Reason = codeOf(p.denial).String(), p.denial.Error()
			return nil
		}
		out.Allowed, out.Code, out.Grant = true, "OK", grantToProto(p.grant)
		out.Reason = fmt.Sprintf("allowed by grant %s (scopes %v, max_ttl %v)", p.grant.ID, p.grant.Scopes, p.grant.MaxTTL)
		return nil
	})
	if err != nil {
		return nil, err
	}
	return out, nil
}

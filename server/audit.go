package server

import (
	"context"
	"errors"

	"go.opentelemetry.io/otel/trace"
	"google.golang.org/grpc/codes"

	"github.com/leasehold/leasehold/store"
)

// reaperActor is the audit actor for leases the broker ends by itself.
const reaperActor = "leasehold:reaper"

// stamp fills the fields every audit record takes from the request.
func stamp(ctx context.Context, r *store.AuditRecord) *store.AuditRecord {
	if r.Actor == "" {
		if id := callerFrom(ctx); !id.IsZero() {
			r.Actor = id.String()
		}
	}
	if r.RequestID == "" {
		r.RequestID = requestIDFrom(ctx)
	}
	if sc := trace.SpanContextFromContext(ctx); sc.IsValid() && r.TraceID == "" {
		r.TraceID, r.SpanID = sc.TraceID().String(), sc.SpanID().String()
	}
	return r
}

// appendAudit writes r in tx as an allowed, successful event.
func appendAudit(ctx context.Context, tx store.Tx, r *store.AuditRecord) error {
	stamp(ctx, r)
	if r.Decision == "" {
		r.Decision = store.Allow
	}
	if r.Code == "" {
		r.Code = "OK"
	}
	if _, err := tx.AppendAudit(r); err != nil {
		return &auditWriteError{err}
	}
	return nil
}

// auditWriteError marks a failed audit append so callers answer Unavailable.
type auditWriteError struct{ err error }

func (e *auditWriteError) Error() string { return "audit append: " + e.err.Error() }
func (e *auditWriteError) Unwrap() error { return e.err }

// deny records a denial and returns the denial itself, or, when the record
// cannot be made durable, Unavailable: a decision that is not on the audit
// trail is not given.
func (s *Server) deny(ctx context.Context, r *store.AuditRecord, denial error) error {
	r.Decision = store.Deny
	r.Reason = denial.Error()
	r.Code = codeOf(denial).String()
	err := s.store.Update(ctx, func(tx store.Tx) error {
		_, err := tx.AppendAudit(stamp(ctx, r))
		return err
	})
	if err != nil {
		s.log.ErrorContext(ctx, "audit write failed for a denial", "error", err.Error(), "request_id", requestIDFrom(ctx))
		if errors.Is(err, errAuditDeadline) {
			return errAuditDeadline
		}
		return errAuditUnavailable
	}
	return denial
}

// writeFailed turns a failed write transaction into the caller's answer:
// a decision made inside the transaction is returned as is, a failed audit
// append or commit becomes Unavailable.
func (s *Server) writeFailed(ctx context.Context, err error) error {
	var ae *apiError
	if errors.As(err, &ae) || errors.Is(err, store.ErrNotFound) || errors.Is(err, context.Canceled) {
		if errors.Is(err, errAuditDeadline) {
			s.log.ErrorContext(ctx, "write missed the audit deadline", "request_id", requestIDFrom(ctx))
		}
		return err
	}
	s.log.ErrorContext(ctx, "store write failed", "error", err.Error(), "request_id", requestIDFrom(ctx))
	if errors.Is(err, store.ErrTooLarge) {
		// The engine's message names only counts and settings.
		return newAPIError(codes.ResourceExhausted, "%s; nothing was changed", err.Error())
	}
	return errAuditUnavailable
}

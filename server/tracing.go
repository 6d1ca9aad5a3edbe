package server

import (
	"context"
	"errors"
	"log/slog"
	"time"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/trace"
)

// instrumentationName names the server's tracer.
const instrumentationName = "github.com/leasehold/leasehold/server"

// Span attributes. Values are ids and names, never secret material.
const (
	attrAgent      = attribute.Key("leasehold.agent.id")
	attrCredential = attribute.Key("leasehold.credential")
	attrScopes     = attribute.Key("leasehold.scopes")
	attrTask       = attribute.Key("leasehold.task.id")
	attrLease      = attribute.Key("leasehold.lease.id")
	attrDecision   = attribute.Key("leasehold.decision")
	attrCode       = attribute.Key("rpc.grpc.status_code_name")
	attrCount      = attribute.Key("leasehold.leases.count")
)

// startSpan opens a span for one lease-manager operation.
func (s *Server) startSpan(ctx context.Context, name string, attrs ...attribute.KeyValue) (context.Context, trace.Span) {
	return s.tracer.Start(ctx, name, trace.WithAttributes(attrs...))
}

// endOp ends a lease operation's span and counts its outcome.
func (s *Server) endOp(ctx context.Context, span trace.Span, op string, start time.Time, err error) {
	endSpan(span, err)
	decision := "allow"
	switch {
	case isDenied(err):
		decision = "deny"
	case err != nil:
		decision = "error"
	}
	s.metrics.decision(ctx, op, decision, codeOf(err).String(), time.Since(start))
}

// endSpan records the outcome. Only the code and our own message (which
// never holds secrets) are recorded, never a wrapped cause.
func endSpan(span trace.Span, err error) {
	code := codeOf(err)
	span.SetAttributes(attrCode.String(code.String()))
	if err != nil {
		decision := "error"
		if isDenied(err) {
			decision = "deny"
		}
		span.SetAttributes(attrDecision.String(decision))
		msg := code.String()
		var ae *apiError
		if errors.As(err, &ae) {
			msg = ae.msg
		}
		span.SetStatus(codes.Error, msg)
	} else {
		span.SetAttributes(attrDecision.String("allow"))
	}
	span.End()
}

// traceLogHandler adds the current trace and span ids to every log record
// written with a context, so a log line leads to its trace.
type traceLogHandler struct{ slog.Handler }

func (h traceLogHandler) Handle(ctx context.Context, r slog.Record) error {
	if sc := trace.SpanContextFromContext(ctx); sc.IsValid() {
		r.AddAttrs(slog.String("trace_id", sc.TraceID().String()), slog.String("span_id", sc.SpanID().String()))
	}
	return h.Handler.Handle(ctx, r)
}

func (h traceLogHandler) WithAttrs(as []slog.Attr) slog.Handler {
	return traceLogHandler{h.Handler.WithAttrs(as)}
}

func (h traceLogHandler) WithGroup(name string) slog.Handler {
	return traceLogHandler{h.Handler.WithGroup(name)}
}

package server

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"regexp"
	"runtime/debug"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/leasehold/leasehold/identity"
)

// Interceptor order, outermost first:
//
//	recovery → request id → logging → error mapping → authorization → handler
//
// Validation happens in each handler, before it reads or writes anything.
// Error mapping sits inside logging so the log shows the status the caller
// got, and outside authorization so its refusals are mapped too.

const requestIDHeader = "x-request-id"

var requestIDRE = regexp.MustCompile(`^[A-Za-z0-9._-]{1,64}$`)

func newRequestID() string {
	b := make([]byte, 12)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

// requestID takes a well-formed x-request-id from the caller or makes one,
// and sends it back in the response header.
func requestID(ctx context.Context) context.Context {
	id := ""
	if md, ok := metadata.FromIncomingContext(ctx); ok {
		if v := md.Get(requestIDHeader); len(v) > 0 && requestIDRE.MatchString(v[0]) {
			id = v[0]
		}
	}
	if id == "" {
		id = newRequestID()
	}
	_ = grpc.SetHeader(ctx, metadata.Pairs(requestIDHeader, id))
	return withRequestID(ctx, id)
}

func (s *Server) recovered(ctx context.Context, method string, p any) error {
	// The panic value may hold request data; log only its type and the stack.
	s.log.ErrorContext(ctx, "panic in handler", "method", method, "request_id", requestIDFrom(ctx),
		"panic_type", fmt.Sprintf("%T", p), "stack", string(debug.Stack()))
	return status.Errorf(codes.Internal, "internal error (request id %s)", requestIDFrom(ctx))
}

func (s *Server) logCall(ctx context.Context, method string, start time.Time, err error) {
	code := status.Code(err)
	attrs := []any{"method", method, "code", code.String(), "duration_ms", float64(time.Since(start).Microseconds()) / 1000,
		"request_id", requestIDFrom(ctx)}
	if id, ok := identity.PeerID(ctx); ok {
		attrs = append(attrs, "caller", id.String())
	}
	if err != nil && code != codes.Internal {
		attrs = append(attrs, "message", status.Convert(err).Message())
	}
	s.log.InfoContext(ctx, "rpc", attrs...)
}

func (s *Server) unaryInterceptor(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (resp any, err error) {
	ctx = requestID(ctx)
	start := time.Now()
	defer func() {
		if p := recover(); p != nil {
			resp, err = nil, s.recovered(ctx, info.FullMethod, p)
		}
		s.logCall(ctx, info.FullMethod, start, err)
	}()
	actx, err := s.authorize(ctx, info.FullMethod)
	if err != nil {
		return nil, toStatus(ctx, s.log, err)
	}
	ctx = actx
	resp, err = handler(ctx, req)
	return resp, toStatus(ctx, s.log, err)
}

type wrappedStream struct {
	grpc.ServerStream
	ctx context.Context
}

func (w *wrappedStream) Context() context.Context { return w.ctx }

func (s *Server) streamInterceptor(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) (err error) {
	ctx := requestID(ss.Context())
	start := time.Now()
	defer func() {
		if p := recover(); p != nil {
			err = s.recovered(ctx, info.FullMethod, p)
		}
		s.logCall(ctx, info.FullMethod, start, err)
	}()
	actx, err := s.authorize(ctx, info.FullMethod)
	if err != nil {
		return toStatus(ctx, s.log, err)
	}
	ctx = actx
	return toStatus(ctx, s.log, handler(srv, &wrappedStream{ServerStream: ss, ctx: ctx}))
}

package server

import (
	"context"
	"errors"
	"fmt"
	"log/slog"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/leasehold/leasehold/backends"
	"github.com/leasehold/leasehold/store"
)

// apiError is an error whose code and message are meant for the caller.
// Handlers build them with the helpers below; every other error is mapped by
// toStatus, the one place where errors become gRPC statuses.
type apiError struct {
	code codes.Code
	msg  string
}

func (e *apiError) Error() string { return e.msg }

func newAPIError(code codes.Code, format string, args ...any) error {
	return &apiError{code: code, msg: fmt.Sprintf(format, args...)}
}

// errInvalid names the offending field first: "ttl: must be positive".
func errInvalid(field, format string, args ...any) error {
	return &apiError{code: codes.InvalidArgument, msg: field + ": " + fmt.Sprintf(format, args...)}
}

func errDenied(format string, args ...any) error {
	return newAPIError(codes.PermissionDenied, format, args...)
}

func errNotFound(format string, args ...any) error {
	return newAPIError(codes.NotFound, format, args...)
}

func errPrecondition(format string, args ...any) error {
	return newAPIError(codes.FailedPrecondition, format, args...)
}

var errAuditUnavailable = newAPIError(codes.Unavailable,
	"the audit trail could not be written, so the request was refused and nothing was issued; retry later")

// codeOf returns the code toStatus would give err.
func codeOf(err error) codes.Code {
	var ae *apiError
	switch {
	case err == nil:
		return codes.OK
	case errors.As(err, &ae):
		return ae.code
	case errors.Is(err, store.ErrNotFound):
		return codes.NotFound
	case errors.Is(err, store.ErrAlreadyExists):
		return codes.AlreadyExists
	case errors.Is(err, backends.ErrInvalidConfig), errors.Is(err, backends.ErrUnknownBackend),
		errors.Is(err, backends.ErrUnsupportedScope):
		return codes.InvalidArgument
	case errors.Is(err, backends.ErrUpstreamUnavailable), errors.Is(err, store.ErrClosed):
		return codes.Unavailable
	case errors.Is(err, context.Canceled):
		return codes.Canceled
	case errors.Is(err, context.DeadlineExceeded):
		return codes.DeadlineExceeded
	}
	if s, ok := status.FromError(err); ok {
		return s.Code()
	}
	return codes.Internal
}

// toStatus is the error-to-status boundary. Messages of our own errors,
// store not-found errors (which carry only names and ids) and backend
// validation errors go to the caller; anything unexpected becomes Internal
// with only the request id, and its cause goes to the log.
func toStatus(ctx context.Context, log *slog.Logger, err error) error {
	if err == nil {
		return nil
	}
	if _, ok := err.(interface{ GRPCStatus() *status.Status }); ok {
		return err
	}
	code := codeOf(err)
	switch code {
	case codes.Internal, codes.Unknown:
		log.ErrorContext(ctx, "internal error", "error", err.Error(), "request_id", requestIDFrom(ctx))
		return status.Errorf(codes.Internal, "internal error (request id %s)", requestIDFrom(ctx))
	case codes.Unavailable:
		var ae *apiError
		if !errors.As(err, &ae) {
			log.WarnContext(ctx, "unavailable", "error", err.Error(), "request_id", requestIDFrom(ctx))
			return status.Errorf(codes.Unavailable, "temporarily unavailable (request id %s)", requestIDFrom(ctx))
		}
	case codes.Canceled, codes.DeadlineExceeded:
		return status.Error(code, err.Error())
	}
	var ae *apiError
	if errors.As(err, &ae) {
		return status.Error(code, ae.msg)
	}
	return status.Error(code, err.Error())
}

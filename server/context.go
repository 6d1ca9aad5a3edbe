package server

import (
	"context"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

type callerKey struct{}
type requestIDKey struct{}

func withCaller(ctx context.Context, id spiffeid.ID) context.Context {
	return context.WithValue(ctx, callerKey{}, id)
}

// callerFrom returns the authenticated caller; authorize put it there.
func callerFrom(ctx context.Context) spiffeid.ID {
	id, _ := ctx.Value(callerKey{}).(spiffeid.ID)
	return id
}

func withRequestID(ctx context.Context, id string) context.Context {
	return context.WithValue(ctx, requestIDKey{}, id)
}

func requestIDFrom(ctx context.Context) string {
	id, _ := ctx.Value(requestIDKey{}).(string)
	return id
}

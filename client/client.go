// Package client is the Go library agents use to lease credentials from a
// Leasehold broker. It authenticates with the agent's X.509 SVID over mTLS
// and verifies that the broker is in the same trust domain (or is exactly
// Config.ServerID).
//
//	c, err := client.New(ctx, client.Config{Address: "127.0.0.1:8443", Source: src})
//	lease, err := c.Acquire(ctx, "crm/salesforce", client.AcquireOptions{
//		Scopes: []string{"read"}, TaskID: "ticket-4711", Purpose: "sync contacts"})
//	defer c.Release(ctx, lease.ID)
package client

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"go.opentelemetry.io/contrib/instrumentation/google.golang.org/grpc/otelgrpc"
	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/baggage"
	otelcodes "go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/propagation"
	"go.opentelemetry.io/otel/trace"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/leasehold/leasehold/identity"
	leaseholdv1 "github.com/leasehold/leasehold/proto/leasehold/v1"
)

// Config says where the broker is and who this agent is.
type Config struct {
	// Address of the broker, host:port.
	Address string
	// Source supplies this agent's SVID and the bundle to verify the broker.
	Source identity.Source
	// ServerID, when set, is the only SPIFFE ID accepted for the broker.
	// Otherwise any SVID of the agent's own trust domain is accepted.
	ServerID spiffeid.ID
	// DialOptions are appended to the client's own.
	DialOptions []grpc.DialOption
	// TracerProvider receives the client's spans (one per acquire, renew
	// and release, and one per RPC); the broker's spans become their
	// children. Default: the global provider.
	TracerProvider trace.TracerProvider
	// Propagator sends the trace context to the broker. Default: W3C trace
	// context and baggage.
	Propagator propagation.TextMapPropagator
	// NoWatch turns off the background WatchLeases stream that invalidates
	// leases the broker revokes. Leave it on for agents.
	NoWatch bool
}

func (c *Config) telemetry() (trace.TracerProvider, propagation.TextMapPropagator) {
	tp, prop := c.TracerProvider, c.Propagator
	if tp == nil {
		tp = otel.GetTracerProvider()
	}
	if prop == nil {
		prop = propagation.NewCompositeTextMapPropagator(propagation.TraceContext{}, propagation.Baggage{})
	}
	return tp, prop
}

// Dial opens an mTLS gRPC connection to the broker. Admin tools use it with
// the generated AdminService client.
func Dial(cfg Config) (*grpc.ClientConn, error) {
	if cfg.Address == "" {
		return nil, errors.New("client: Address is required")
	}
	if cfg.Source == nil {
		return nil, errors.New("client: Source is required")
	}
	authorizer := tlsconfig.AuthorizeID(cfg.ServerID)
	if cfg.ServerID.IsZero() {
		self, err := identity.SelfID(cfg.Source)
		if err != nil {
			return nil, fmt.Errorf("client: %w", err)
		}
		authorizer = tlsconfig.AuthorizeMemberOf(self.TrustDomain())
	}
	tp, prop := cfg.telemetry()
	opts := append([]grpc.DialOption{
		grpc.WithTransportCredentials(identity.ClientCredentials(cfg.Source, authorizer)),
		grpc.WithStatsHandler(otelgrpc.NewClientHandler(otelgrpc.WithTracerProvider(tp), otelgrpc.WithPropagators(prop))),
	}, cfg.DialOptions...)
	conn, err := grpc.NewClient(cfg.Address, opts...)
	if err != nil {
		return nil, fmt.Errorf("client: dial %s: %w", cfg.Address, err)
	}
	return conn, nil
}

// Client is an agent's connection to the broker. It is safe for concurrent use.
type Client struct {
	conn   *grpc.ClientConn
	broker leaseholdv1.BrokerServiceClient
	tracer trace.Tracer

	mu     sync.Mutex
	leases map[string]*Lease // live leases, for the watcher
	synced chan struct{}     // closed once the watcher is subscribed
	closed chan struct{}
	wg     sync.WaitGroup
}

// New connects to the broker. The connection is made lazily; the first call
// reports an unreachable broker.
func New(ctx context.Context, cfg Config) (*Client, error) {
	conn, err := Dial(cfg)
	if err != nil {
		return nil, err
	}
	tp, _ := cfg.telemetry()
	c := &Client{conn: conn, broker: leaseholdv1.NewBrokerServiceClient(conn),
		tracer: tp.Tracer("github.com/leasehold/leasehold/client"),
		leases: map[string]*Lease{}, synced: make(chan struct{}), closed: make(chan struct{})}
	if cfg.NoWatch {
		close(c.synced)
	} else {
		c.wg.Add(1)
		go c.watch() //nolint:gosec // the watch outlives New's context; it ends with Close

	}
	return c, nil
}

// Close stops renewals and the watcher and closes the connection. It does
// not release leases: they end on expiry.
func (c *Client) Close() error {
	select {
	case <-c.closed:
	default:
		close(c.closed)
	}
	c.mu.Lock()
	for _, l := range c.leases {
		l.stopRenewing()
	}
	c.mu.Unlock()
	c.wg.Wait()
	return c.conn.Close()
}

// AcquireOptions describe what the lease is for.
type AcquireOptions struct {
	// Scopes wanted; at least one, each allowed by a grant.
	Scopes []string
	// TTL of the lease; zero takes the broker's default.
	TTL time.Duration
	// TaskID names the task the lease is for. Required.
	TaskID string
	// Purpose is recorded in the audit trail.
	Purpose string
	// AutoRenew keeps the lease alive in the background (renewing at two
	// thirds of its life) until Release, ctx ends, or the broker refuses;
	// it never goes past the grant's max_lifetime.
	AutoRenew bool
}

// Lease is an acquired credential. Its secret is usable until the lease
// ends: after Release, expiry, a failed renewal or a revocation the broker
// announces, Secret returns an error and the bytes are zeroed.
type Lease struct {
	ID           string
	Credential   string
	Scopes       []string
	TaskID       string
	MaxExpiresAt time.Time

	c         *Client
	ttl       time.Duration
	mu        sync.Mutex
	expiresAt time.Time
	secret    map[string][]byte
	err       error
	done      chan struct{}
	stop      chan struct{}
	stopOnce  sync.Once
}

// Secret returns a copy of the secret's fields, or why the lease can no
// longer be used. Use the values and let them go; do not log them.
func (l *Lease) Secret() (map[string]string, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.err != nil {
		return nil, l.err
	}
	if !time.Now().Before(l.expiresAt) {
		return nil, fmt.Errorf("%w: lease %s expired", ErrLeaseEnded, l.ID)
	}
	out := make(map[string]string, len(l.secret))
	for k, v := range l.secret {
		out[k] = string(v)
	}
	return out, nil
}

// Get returns one secret field.
func (l *Lease) Get(field string) (string, error) {
	m, err := l.Secret()
	if err != nil {
		return "", err
	}
	v, ok := m[field]
	if !ok {
		return "", fmt.Errorf("leasehold: lease %s has no field %q", l.ID, field)
	}
	return v, nil
}

// ExpiresAt is the lease's current expiry (moved by renewals).
func (l *Lease) ExpiresAt() time.Time {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.expiresAt
}

// Done is closed when the lease can no longer be used; Err says why.
func (l *Lease) Done() <-chan struct{} { return l.done }

// Err is nil while the lease is usable.
func (l *Lease) Err() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.err
}

// invalidate ends the lease locally: the secret is zeroed and dropped.
func (l *Lease) invalidate(err error) {
	l.stopRenewing()
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.err != nil {
		return
	}
	l.err = err
	for _, v := range l.secret {
		clear(v)
	}
	l.secret = nil
	close(l.done)
}

func (l *Lease) stopRenewing() { l.stopOnce.Do(func() { close(l.stop) }) }

// Release ends the lease at the broker and locally.
func (l *Lease) Release(ctx context.Context) error {
	l.stopRenewing()
	err := l.c.Release(ctx, l.ID)
	l.c.untrack(l.ID)
	l.invalidate(fmt.Errorf("%w: lease %s released", ErrLeaseEnded, l.ID))
	return err
}

// span starts a client span; end records the outcome (never a secret: only
// the status code the broker sent).
func (c *Client) span(ctx context.Context, name string, attrs ...attribute.KeyValue) (context.Context, func(error)) {
	ctx, span := c.tracer.Start(ctx, name, trace.WithSpanKind(trace.SpanKindClient), trace.WithAttributes(attrs...))
	return ctx, func(err error) {
		if err != nil {
			code := status.Code(err)
			var e *Error
			if errors.As(err, &e) {
				code = e.Code
			}
			span.SetStatus(otelcodes.Error, code.String())
		}
		span.End()
	}
}

// Acquire leases a credential for a task. The task id also travels as
// baggage (leasehold.task.id) with the trace context.
func (c *Client) Acquire(ctx context.Context, credential string, opts AcquireOptions) (_ *Lease, err error) {
	if m, merr := baggage.NewMember("leasehold.task.id", opts.TaskID); merr == nil {
		if b, berr := baggage.FromContext(ctx).SetMember(m); berr == nil {
			ctx = baggage.ContextWithBaggage(ctx, b)
		}
	}
	ctx, end := c.span(ctx, "leasehold.client.Acquire", attribute.String("leasehold.credential", credential),
		attribute.String("leasehold.task.id", opts.TaskID), attribute.StringSlice("leasehold.scopes", opts.Scopes))
	defer func() { end(err) }()
	req := &leaseholdv1.AcquireLeaseRequest{
		Credential: credential, Scopes: opts.Scopes,
		Task: &leaseholdv1.Task{Id: opts.TaskID, Purpose: opts.Purpose},
	}
	if opts.TTL != 0 {
		req.Ttl = durationpb.New(opts.TTL)
	}
	if !c.waitSynced(ctx) {
		return nil, fmt.Errorf("%w: the revocation watch is not connected", ErrUnavailable)
	}
	resp, err := c.broker.AcquireLease(ctx, req)
	if err != nil {
		return nil, wrap(err)
	}
	pl := resp.GetLease()
	l := &Lease{
		ID: pl.GetId(), Credential: pl.GetCredential(), Scopes: pl.GetScopes(), TaskID: pl.GetTask().GetId(),
		MaxExpiresAt: pl.GetMaxExpiresAt().AsTime(), expiresAt: pl.GetExpiresAt().AsTime(),
		ttl: pl.GetExpiresAt().AsTime().Sub(pl.GetIssuedAt().AsTime()), c: c,
		secret: make(map[string][]byte, len(resp.GetSecret())), done: make(chan struct{}), stop: make(chan struct{}),
	}
	for k, v := range resp.GetSecret() {
		l.secret[k] = []byte(v)
	}
	c.track(l)
	if opts.AutoRenew {
		c.wg.Add(1)
		go func() { defer c.wg.Done(); l.renewLoop(context.WithoutCancel(ctx), ctx.Done()) }()
	}
	return l, nil
}

// Renew extends a lease by ttl from now (zero: its original length) and
// returns the new expiry. Where the backend cannot extend the upstream
// credential (OAuth2 tokens), the broker issues a new one: the Lease handle
// from Acquire then holds the new secret (Secret and Get return it).
func (c *Client) Renew(ctx context.Context, leaseID string, ttl time.Duration) (_ time.Time, err error) {
	ctx, end := c.span(ctx, "leasehold.client.Renew", attribute.String("leasehold.lease.id", leaseID))
	defer func() { end(err) }()
	req := &leaseholdv1.RenewLeaseRequest{LeaseId: leaseID}
	if ttl != 0 {
		req.Ttl = durationpb.New(ttl)
	}
	resp, err := c.broker.RenewLease(ctx, req)
	if err != nil {
		return time.Time{}, wrap(err)
	}
	exp := resp.GetLease().GetExpiresAt().AsTime()
	c.mu.Lock()
	l := c.leases[leaseID]
	c.mu.Unlock()
	if l != nil {
		l.mu.Lock()
		l.expiresAt = exp
		if len(resp.GetSecret()) > 0 && l.err == nil {
			for _, v := range l.secret {
				clear(v)
			}
			l.secret = make(map[string][]byte, len(resp.GetSecret()))
			for k, v := range resp.GetSecret() {
				l.secret[k] = []byte(v)
			}
		}
		l.mu.Unlock()
	}
	return exp, nil
}

// Release ends a lease. Releasing an ended lease succeeds.
func (c *Client) Release(ctx context.Context, leaseID string) (err error) {
	ctx, end := c.span(ctx, "leasehold.client.Release", attribute.String("leasehold.lease.id", leaseID))
	defer func() { end(err) }()
	_, err = c.broker.ReleaseLease(ctx, &leaseholdv1.ReleaseLeaseRequest{LeaseId: leaseID})
	return wrap(err)
}

// WhoAmI returns the SPIFFE ID the broker sees for this agent.
func (c *Client) WhoAmI(ctx context.Context) (string, error) {
	resp, err := c.broker.WhoAmI(ctx, &leaseholdv1.WhoAmIRequest{})
	if err != nil {
		return "", wrap(err)
	}
	return resp.GetSpiffeId(), nil
}

// Errors returned by the client match these with errors.Is.
var (
	// ErrDenied: no grant allows it, the agent is revoked, or the lease is
	// someone else's.
	ErrDenied = errors.New("leasehold: permission denied")
	// ErrNotFound: no such credential or lease.
	ErrNotFound = errors.New("leasehold: not found")
	// ErrInvalid: the request is malformed; the message names the field.
	ErrInvalid = errors.New("leasehold: invalid request")
	// ErrLeaseEnded: the lease has expired or was released or revoked.
	ErrLeaseEnded = errors.New("leasehold: lease ended")
	// ErrUnavailable: the broker (or its audit trail) is unavailable; retry.
	ErrUnavailable = errors.New("leasehold: unavailable")
	// ErrUnauthenticated: the broker did not accept this agent's identity.
	ErrUnauthenticated = errors.New("leasehold: unauthenticated")
	// ErrRevoked: the broker revoked the lease; it also matches ErrLeaseEnded.
	ErrRevoked = &revokedError{}
)

// Error is a broker error with its gRPC code and message.
type Error struct {
	Code    codes.Code
	Message string
}

func (e *Error) Error() string { return fmt.Sprintf("leasehold: %s: %s", e.Code, e.Message) }

// Is matches the sentinel errors above.
func (e *Error) Is(target error) bool {
	switch target {
	case ErrDenied:
		return e.Code == codes.PermissionDenied
	case ErrNotFound:
		return e.Code == codes.NotFound
	case ErrInvalid:
		return e.Code == codes.InvalidArgument
	case ErrLeaseEnded:
		return e.Code == codes.FailedPrecondition
	case ErrUnavailable:
		return e.Code == codes.Unavailable
	case ErrUnauthenticated:
		return e.Code == codes.Unauthenticated
	}
	return false
}

func wrap(err error) error {
	if err == nil {
		return nil
	}
	st, ok := status.FromError(err)
	if !ok {
		return err
	}
	return &Error{Code: st.Code(), Message: st.Message()}
}

type revokedError struct{}

func (*revokedError) Error() string { return "leasehold: lease revoked" }

// Is makes a revocation also an ended lease.
func (*revokedError) Is(target error) bool { return target == ErrLeaseEnded }

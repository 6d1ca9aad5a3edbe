// Package server is the Leasehold broker: the gRPC services, their
// interceptors and authorization table, the lease manager, the expiry reaper
// and audit writing. It depends only on the store and backends interfaces
// and the identity package; cmd/leasehold picks the engines.
package server

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"go.opentelemetry.io/contrib/instrumentation/google.golang.org/grpc/otelgrpc"
	"go.opentelemetry.io/contrib/instrumentation/google.golang.org/grpc/otelgrpc/filters"
	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/metric"
	"go.opentelemetry.io/otel/propagation"
	"go.opentelemetry.io/otel/trace"
	"golang.org/x/time/rate"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/reflection"

	"github.com/leasehold/leasehold/backends"
	"github.com/leasehold/leasehold/identity"
	leaseholdv1 "github.com/leasehold/leasehold/proto/leasehold/v1"
	"github.com/leasehold/leasehold/store"
	"github.com/leasehold/leasehold/store/seal"
)

// Config holds the broker's policy settings.
type Config struct {
	// TrustDomain whose SVIDs may call the broker. Required.
	TrustDomain spiffeid.TrustDomain
	// Admins may call AdminService.
	Admins identity.AdminSet
	// DefaultTTL is a lease's length when the request names none (capped by
	// the grant's max_ttl). Default 5m.
	DefaultTTL time.Duration
	// MaxTTL is the longest lease or grant max_ttl anyone may ask for;
	// longer requests are InvalidArgument. Default 24h.
	MaxTTL time.Duration
	// MaxLifetime is the longest grant max_lifetime. Default 7 days.
	MaxLifetime time.Duration
	// MaxDelegationDepth is the most a grant's max_delegation_depth may be.
	// Default 3.
	MaxDelegationDepth int
	// RotationPoll is how often scheduled rotations are checked. Default 1s.
	RotationPoll time.Duration
	// HandshakeTimeout bounds how long a new connection may take to finish
	// its TLS handshake before it is closed. Default 10s.
	HandshakeTimeout time.Duration
	// MaxConcurrentStreams caps concurrent RPCs per connection. Default 1000.
	MaxConcurrentStreams uint32
	// AnomalyWebhookURL, when set, receives a JSON POST (AnomalyEvent) for
	// each acquire the anomaly guard refuses. https, or http to loopback.
	AnomalyWebhookURL string
	// ReaperInterval is how often expired leases are ended. Default 1s.
	ReaperInterval time.Duration
	// HealthInterval is how often store readiness is checked. Default 5s.
	HealthInterval time.Duration
	// AuditDeadline bounds how long a request waits for its write (lease
	// and audit record) to become durable. Past it the caller gets
	// Unavailable and no secret, and the broker reports NOT_SERVING until
	// the stalled write completes. Default 5s.
	AuditDeadline time.Duration
	// RetentionMaxAge and RetentionMaxRecords bound the audit trail; the
	// oldest records beyond either are removed (never ones an export sink
	// has not taken yet). Zero keeps everything.
	RetentionMaxAge     time.Duration
	RetentionMaxRecords uint64
	// RetentionInterval is how often retention runs. Default 1m.
	RetentionInterval time.Duration
	// RevocationMinBackoff and RevocationMaxBackoff bound the wait between
	// attempts to destroy an upstream artifact (defaults 1s and 5m);
	// attempts never stop. RevocationPoll is how often the queue is looked
	// at besides after each commit (default 1s).
	RevocationMinBackoff time.Duration
	RevocationMaxBackoff time.Duration
	RevocationPoll       time.Duration
	// Quotas; a negative value turns one off. Exceeding one is
	// ResourceExhausted, audited as a denial.
	// MaxActiveLeasesPerAgent caps an agent's active leases (default 1000).
	MaxActiveLeasesPerAgent int
	// MaxLeasesPerTask caps the leases one task id may ever get (default: off).
	MaxLeasesPerTask int
	// AcquireRate and AcquireBurst bound acquires per agent and credential
	// (a token bucket; defaults 20/s, burst 40).
	AcquireRate  float64
	AcquireBurst int
}

func (c *Config) setDefaults() {
	if c.DefaultTTL == 0 {
		c.DefaultTTL = 5 * time.Minute
	}
	if c.MaxTTL == 0 {
		c.MaxTTL = 24 * time.Hour
	}
	if c.MaxLifetime == 0 {
		c.MaxLifetime = 7 * 24 * time.Hour
	}
	if c.ReaperInterval == 0 {
		c.ReaperInterval = time.Second
	}
	if c.HealthInterval == 0 {
		c.HealthInterval = 5 * time.Second
	}
	if c.AuditDeadline == 0 {
		c.AuditDeadline = 5 * time.Second
	}
	if c.RetentionInterval == 0 {
		c.RetentionInterval = time.Minute
	}
	if c.RevocationMinBackoff == 0 {
		c.RevocationMinBackoff = time.Second
	}
	if c.RevocationMaxBackoff == 0 {
		c.RevocationMaxBackoff = 5 * time.Minute
	}
	if c.RevocationPoll == 0 {
		c.RevocationPoll = time.Second
	}
	if c.MaxActiveLeasesPerAgent == 0 {
		c.MaxActiveLeasesPerAgent = 1000
	}
	if c.MaxDelegationDepth == 0 {
		c.MaxDelegationDepth = 3
	}
	if c.RotationPoll == 0 {
		c.RotationPoll = time.Second
	}
	if c.HandshakeTimeout == 0 {
		c.HandshakeTimeout = 10 * time.Second
	}
	if c.MaxConcurrentStreams == 0 {
		c.MaxConcurrentStreams = 1000
	}
	if c.AcquireRate == 0 {
		c.AcquireRate, c.AcquireBurst = 20, 40
	}
}

// Validate reports settings that cannot work.
func (c Config) Validate() error {
	var errs []error
	if c.TrustDomain.IsZero() {
		errs = append(errs, errors.New("trust_domain is required"))
	}
	if c.Admins.Len() == 0 {
		errs = append(errs, errors.New("at least one admin SPIFFE ID is required"))
	}
	if c.HandshakeTimeout < 0 {
		errs = append(errs, errors.New("limits.handshake_timeout must not be negative"))
	}
	if c.AnomalyWebhookURL != "" {
		if err := backends.CheckEndpointURL("anomaly webhook URL", c.AnomalyWebhookURL, true); err != nil {
			errs = append(errs, fmt.Errorf("anomaly webhook: %w", err))
		}
	}
	if c.DefaultTTL < 0 || c.MaxTTL < 0 || c.MaxLifetime < 0 || c.ReaperInterval < 0 || c.HealthInterval < 0 || c.AuditDeadline < 0 ||
		c.RetentionMaxAge < 0 || c.RetentionInterval < 0 {
		errs = append(errs, errors.New("durations must not be negative"))
	}
	if c.DefaultTTL > c.MaxTTL && c.MaxTTL > 0 {
		errs = append(errs, fmt.Errorf("default_ttl %v is above max_ttl %v", c.DefaultTTL, c.MaxTTL))
	}
	if c.MaxLifetime < c.MaxTTL && c.MaxLifetime > 0 {
		errs = append(errs, fmt.Errorf("max_lifetime %v is below max_ttl %v", c.MaxLifetime, c.MaxTTL))
	}
	return errors.Join(errs...)
}

// Deps are the broker's collaborators, chosen by cmd/leasehold.
type Deps struct {
	Store    store.Store
	Backends *backends.Registry
	Keyring  *seal.Keyring
	// Credentials are the server's transport credentials, normally
	// identity.ServerCredentials.
	Credentials credentials.TransportCredentials
	Logger      *slog.Logger
	// Now is the clock; tests may move it. Default time.Now.
	Now func() time.Time
	// TracerProvider receives the broker's spans. Default: the global
	// provider (a no-op unless the program installs one).
	TracerProvider trace.TracerProvider
	// MeterProvider receives the broker's metrics. Default: the global
	// provider (a no-op unless the program installs one).
	MeterProvider metric.MeterProvider
	// Propagator reads the caller's trace context from request metadata.
	// Default: W3C trace context and baggage.
	Propagator propagation.TextMapPropagator
	// AuditSinks receive a copy of the audit trail (see AuditSink).
	AuditSinks []AuditSink
}

// Server is a configured broker.
type Server struct {
	cfg      Config
	store    store.Store
	backends *backends.Registry
	keyring  *seal.Keyring
	log      *slog.Logger
	now      func() time.Time
	tracer   trace.Tracer
	metrics  *metrics
	limits   *limiters
	// webhookClient posts anomaly notifications.
	webhookClient *http.Client
	same          keyedMutex // identical acquires, one at a time
	rotating      keyedMutex // one rotation per credential at a time
	sinks         []AuditSink
	grpc          *grpc.Server
	health        *health.Server

	// auditCommitted wakes WatchAudit streams after each committed write.
	auditCommitted *notifier
	// guard bounds every write by AuditDeadline; it is also s.store.
	guard *guardedStore

	stopOnce sync.Once
	// leading is set while this broker runs the background work.
	leading atomic.Bool
	stop    chan struct{}
	bg      sync.WaitGroup
	// life orders starting the background workers against Stop: workers
	// never start after a Stop, and Stop never waits while they are added.
	life    sync.Mutex
	stopped bool
}

// New builds a broker. It serves nothing until Serve.
func New(cfg Config, deps Deps) (*Server, error) {
	cfg.setDefaults()
	if err := cfg.Validate(); err != nil {
		return nil, fmt.Errorf("server config: %w", err)
	}
	if deps.Store == nil || deps.Backends == nil || deps.Keyring == nil || deps.Credentials == nil {
		return nil, errors.New("server: store, backends, keyring and credentials are required")
	}
	if deps.Logger == nil {
		deps.Logger = slog.New(slog.DiscardHandler)
	}
	if deps.Now == nil {
		deps.Now = time.Now
	}
	if deps.TracerProvider == nil {
		deps.TracerProvider = otel.GetTracerProvider()
	}
	if deps.MeterProvider == nil {
		deps.MeterProvider = otel.GetMeterProvider()
	}
	if deps.Propagator == nil {
		deps.Propagator = propagation.NewCompositeTextMapPropagator(propagation.TraceContext{}, propagation.Baggage{})
	}
	deps.Logger = slog.New(traceLogHandler{deps.Logger.Handler()})
	committed := newNotifier()
	if cn, ok := deps.Store.(store.CommitNotifier); ok {
		cn.OnCommit(committed.notify)
	}
	guard := &guardedStore{Store: deps.Store, n: committed, deadline: cfg.AuditDeadline}
	s := &Server{
		cfg: cfg, store: guard, guard: guard, auditCommitted: committed, backends: deps.Backends, keyring: deps.Keyring,
		log: deps.Logger, now: deps.Now, stop: make(chan struct{}),
		health:        health.NewServer(),
		tracer:        deps.TracerProvider.Tracer(instrumentationName),
		sinks:         deps.AuditSinks,
		limits:        &limiters{every: rate.Limit(cfg.AcquireRate), burst: max(cfg.AcquireBurst, 1), m: map[string]*rate.Limiter{}},
		webhookClient: &http.Client{Timeout: 5 * time.Second},
	}
	var err error
	if s.metrics, err = newMetrics(deps.MeterProvider, deps.Store, s.Leading); err != nil {
		return nil, fmt.Errorf("server metrics: %w", err)
	}
	guard.writeDur = s.metrics.writeDur
	s.grpc = grpc.NewServer(
		grpc.Creds(deps.Credentials),
		// A span per RPC, child of the caller's span; health checks and
		// reflection are not traced.
		grpc.StatsHandler(otelgrpc.NewServerHandler(
			otelgrpc.WithTracerProvider(deps.TracerProvider), otelgrpc.WithPropagators(deps.Propagator),
			otelgrpc.WithFilter(filters.None(filters.ServiceName("grpc.health.v1.Health"), filters.ServicePrefix("grpc.reflection."))))),
		grpc.ChainUnaryInterceptor(s.unaryInterceptor),
		grpc.ChainStreamInterceptor(s.streamInterceptor),
		// Bounded per connection and per message; a peer that connects and
		// never finishes its handshake is dropped after HandshakeTimeout.
		grpc.MaxRecvMsgSize(4<<20),
		grpc.MaxHeaderListSize(64<<10),
		grpc.MaxConcurrentStreams(cfg.MaxConcurrentStreams),
		grpc.ConnectionTimeout(cfg.HandshakeTimeout),
		grpc.KeepaliveParams(keepalive.ServerParameters{
			MaxConnectionIdle: 15 * time.Minute,
			// Clients reconnect now and then, so a revoked or re-keyed peer
			// handshakes again with its current SVID.
			MaxConnectionAge:      time.Hour,
			MaxConnectionAgeGrace: time.Minute,
			Time:                  2 * time.Minute,
			Timeout:               20 * time.Second,
		}),
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: 20 * time.Second, PermitWithoutStream: true}),
	)
	leaseholdv1.RegisterBrokerServiceServer(s.grpc, &brokerService{s: s})
	leaseholdv1.RegisterAdminServiceServer(s.grpc, &adminService{s: s})
	healthpb.RegisterHealthServer(s.grpc, s.health)
	reflection.Register(s.grpc)
	s.health.SetServingStatus("", healthpb.HealthCheckResponse_NOT_SERVING)
	guard.onStall = func(bool) { s.updateHealth(context.Background()) }
	return s, nil
}

// GRPCServer exposes the underlying server, e.g. to list its services.
func (s *Server) GRPCServer() *grpc.Server { return s.grpc }

// Serve starts the background workers (reaper, health) and serves on lis
// until Stop. It returns nil after Stop.
func (s *Server) Serve(lis net.Listener) error {
	s.startBackground()
	err := s.grpc.Serve(lis)
	if errors.Is(err, grpc.ErrServerStopped) {
		return nil
	}
	return err
}

func (s *Server) startBackground() {
	s.life.Lock()
	defer s.life.Unlock()
	if s.stopped {
		return
	}
	s.bg.Add(2)
	go func() { defer s.bg.Done(); s.runHealth() }()
	if el, ok := s.guard.Store.(store.Elector); ok {
		go func() { defer s.bg.Done(); s.runLeader(el) }()
		return
	}
	s.leading.Store(true)
	go func() { defer s.bg.Done(); s.runBackground(s.stop) }()
}

// runBackground runs the work one broker does for all until stop closes:
// the expiry reaper, rotation, the revocation queue, audit export and
// retention. It returns when all of them have.
func (s *Server) runBackground(stop <-chan struct{}) {
	var wg sync.WaitGroup
	run := func(fn func()) { wg.Add(1); go func() { defer wg.Done(); fn() }() }
	run(func() { s.runReaper(stop) })
	run(func() { s.runRotations(stop) })
	run(func() { s.runRevocations(stop) })
	for _, sink := range s.sinks {
		run(func() { s.runExport(sink, stop) })
	}
	if s.cfg.RetentionMaxAge > 0 || s.cfg.RetentionMaxRecords > 0 {
		run(func() { s.runRetention(stop) })
	}
	wg.Wait()
}

// runLeader campaigns for leadership of the background work on a store
// several brokers share, runs it while this broker leads, and campaigns
// again when leadership is lost, until Stop. The work is idempotent step by
// step (each step commits its outcome), so a leader that is replaced
// mid-step leaves nothing for its successor to undo.
func (s *Server) runLeader(el store.Elector) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() { <-s.stop; cancel() }()
	for ctx.Err() == nil {
		led, resign, err := el.Lead(ctx)
		if err != nil {
			if ctx.Err() == nil {
				s.log.Warn("campaign for leadership failed; will retry", "error", err.Error())
				select {
				case <-ctx.Done():
				case <-time.After(time.Second):
				}
			}
			continue
		}
		s.log.Info("leading background work: reaper, revocation queue, rotation, retention, export")
		s.leading.Store(true)
		s.runBackground(led.Done())
		s.leading.Store(false)
		resign()
		if ctx.Err() == nil {
			s.log.Warn("lost leadership of background work; campaigning again")
		}
	}
}

// Leading reports whether this broker runs the background work now.
func (s *Server) Leading() bool { return s.leading.Load() }

// Stop marks the server not serving, ends the background workers and open
// WatchAudit streams (which are told the sequence to resume after), lets
// in-flight RPCs finish for up to the context's deadline, then closes the
// sinks.
func (s *Server) Stop(ctx context.Context) {
	s.stopOnce.Do(func() {
		s.life.Lock()
		s.stopped = true
		s.life.Unlock()
		s.health.Shutdown()
		close(s.stop)
		done := make(chan struct{})
		go func() { s.grpc.GracefulStop(); close(done) }()
		select {
		case <-done:
		case <-ctx.Done():
			s.grpc.Stop()
			<-done
		}
		s.bg.Wait()
		for _, sink := range s.sinks {
			if err := sink.Close(); err != nil {
				s.log.Warn("closing audit sink", "sink", sink.Name(), "error", err.Error())
			}
		}
	})
}

// AuditHealthService is the health service name that reports whether
// audit writes become durable within the deadline.
const AuditHealthService = "leasehold.audit"

func (s *Server) runHealth() {
	t := time.NewTicker(s.cfg.HealthInterval)
	defer t.Stop()
	for {
		s.updateHealth(context.Background())
		select {
		case <-s.stop:
			return
		case <-t.C:
		}
	}
}

// updateHealth sets every service's status from store readiness and
// whether a write is stalled past the audit deadline.
func (s *Server) updateHealth(ctx context.Context) {
	ready := healthpb.HealthCheckResponse_SERVING
	ctx, cancel := context.WithTimeout(ctx, s.cfg.HealthInterval)
	defer cancel()
	if err := s.store.Ready(ctx); err != nil {
		ready = healthpb.HealthCheckResponse_NOT_SERVING
		s.log.Warn("store not ready", "error", err.Error())
	}
	audit := ready
	if s.guard.stalled.Load() {
		audit = healthpb.HealthCheckResponse_NOT_SERVING
	}
	// Without durable audit nothing can be issued, so the broker as a whole
	// is not serving either.
	for _, svc := range []string{"", leaseholdv1.BrokerService_ServiceDesc.ServiceName, AuditHealthService} {
		s.health.SetServingStatus(svc, audit)
	}
	s.health.SetServingStatus(leaseholdv1.AdminService_ServiceDesc.ServiceName, ready)
}

// notifier is a broadcast: wait returns a channel that closes at the next
// notify.
type notifier struct {
	mu sync.Mutex
	ch chan struct{}
}

func newNotifier() *notifier { return &notifier{ch: make(chan struct{})} }

func (n *notifier) wait() <-chan struct{} {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.ch
}

func (n *notifier) notify() {
	n.mu.Lock()
	defer n.mu.Unlock()
	close(n.ch)
	n.ch = make(chan struct{})
}

// guardedStore is the store as the server uses it: every Update waits at
// most deadline for its commit, and watchers are woken after each commit
// (every write the broker makes appends audit records, so a commit is the
// moment new records become visible).
//
// A write that misses the deadline keeps running in the background; if it
// commits later, its lease stays unused and expires, and its audit record
// says what was decided. The caller got Unavailable and no secret.
type guardedStore struct {
	store.Store
	n        *notifier
	deadline time.Duration
	stalled  atomic.Bool
	pending  atomic.Int64 // writes past their deadline, not finished
	onStall  func(stalled bool)
	writeDur metric.Float64Histogram
}

var errAuditDeadline = newAPIError(codes.Unavailable,
	"the audit trail did not become durable in time, so nothing was issued; retry later")

func (g *guardedStore) Update(ctx context.Context, fn func(store.Tx) error) error {
	done := make(chan error, 1)
	go func() {
		start := time.Now()
		err := g.Store.Update(context.WithoutCancel(ctx), fn)
		if err == nil {
			g.n.notify()
			if g.writeDur != nil {
				g.writeDur.Record(ctx, time.Since(start).Seconds())
			}
		}
		done <- err
	}()
	t := time.NewTimer(g.deadline)
	defer t.Stop()
	select {
	case err := <-done:
		return err
	case <-t.C:
	}
	if g.pending.Add(1) == 1 {
		g.setStalled(true)
	}
	go func() {
		<-done //nolint:errcheck // the late write's outcome: its audit record says what was decided
		if g.pending.Add(-1) == 0 {
			g.setStalled(false)
		}
	}()
	return errAuditDeadline
}

func (g *guardedStore) setStalled(v bool) {
	g.stalled.Store(v)
	if g.onStall != nil {
		g.onStall(v)
	}
}

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
	"sync"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/trace"
	"google.golang.org/grpc"
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
	// ReaperInterval is how often expired leases are ended. Default 1s.
	ReaperInterval time.Duration
	// HealthInterval is how often store readiness is checked. Default 5s.
	HealthInterval time.Duration
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
	if c.DefaultTTL < 0 || c.MaxTTL < 0 || c.MaxLifetime < 0 || c.ReaperInterval < 0 || c.HealthInterval < 0 {
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
	grpc     *grpc.Server
	health   *health.Server

	// auditCommitted wakes WatchAudit streams after each committed write.
	auditCommitted *notifier

	stopOnce sync.Once
	stop     chan struct{}
	bg       sync.WaitGroup
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
	committed := newNotifier()
	s := &Server{
		cfg: cfg, store: &notifyingStore{Store: deps.Store, n: committed}, auditCommitted: committed, backends: deps.Backends, keyring: deps.Keyring,
		log: deps.Logger, now: deps.Now, stop: make(chan struct{}),
		health: health.NewServer(),
		tracer: deps.TracerProvider.Tracer(instrumentationName),
	}
	s.grpc = grpc.NewServer(
		grpc.Creds(deps.Credentials),
		grpc.ChainUnaryInterceptor(s.unaryInterceptor),
		grpc.ChainStreamInterceptor(s.streamInterceptor),
		grpc.MaxRecvMsgSize(4<<20),
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
	s.bg.Add(2)
	go func() { defer s.bg.Done(); s.runReaper() }()
	go func() { defer s.bg.Done(); s.runHealth() }()
}

// Stop marks the server not serving, lets in-flight RPCs finish for up to
// the context's deadline, then stops the workers.
func (s *Server) Stop(ctx context.Context) {
	s.stopOnce.Do(func() {
		s.health.Shutdown()
		done := make(chan struct{})
		go func() { s.grpc.GracefulStop(); close(done) }()
		select {
		case <-done:
		case <-ctx.Done():
			s.grpc.Stop()
			<-done
		}
		close(s.stop)
		s.bg.Wait()
	})
}

func (s *Server) runHealth() {
	t := time.NewTicker(s.cfg.HealthInterval)
	defer t.Stop()
	for {
		st := healthpb.HealthCheckResponse_SERVING
		ctx, cancel := context.WithTimeout(context.Background(), s.cfg.HealthInterval)
		if err := s.store.Ready(ctx); err != nil {
			st = healthpb.HealthCheckResponse_NOT_SERVING
			s.log.Warn("store not ready", "error", err.Error())
		}
		cancel()
		for _, svc := range []string{"", leaseholdv1.BrokerService_ServiceDesc.ServiceName, leaseholdv1.AdminService_ServiceDesc.ServiceName} {
			s.health.SetServingStatus(svc, st)
		}
		select {
		case <-s.stop:
			return
		case <-t.C:
		}
	}
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

// notifyingStore wakes watchers after every committed write transaction.
// Every write the broker makes appends audit records, so a commit is the
// moment new records become visible.
type notifyingStore struct {
	store.Store
	n *notifier
}

func (s *notifyingStore) Update(ctx context.Context, fn func(store.Tx) error) error {
	err := s.Store.Update(ctx, fn)
	if err == nil {
		s.n.notify()
	}
	return err
}

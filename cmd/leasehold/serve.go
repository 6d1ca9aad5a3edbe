package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/leasehold/leasehold/identity"
	"github.com/leasehold/leasehold/server"
	"github.com/leasehold/leasehold/store/seal"
)

func cmdServe(args []string, stderr io.Writer) error {
	fs := flag.NewFlagSet("serve", flag.ContinueOnError)
	fs.SetOutput(stderr)
	configPath := fs.String("config", "", "YAML configuration file")
	vals := registerSettings(fs)
	if err := fs.Parse(args); err != nil {
		return err
	}
	cfg := defaultConfig()
	if *configPath != "" {
		if err := loadConfigFile(*configPath, &cfg); err != nil {
			return err
		}
	}
	if err := applyOverrides(&cfg, fs, vals, os.Getenv); err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	return runBroker(ctx, cfg, stderr, nil, "none")
}

func newLogger(c LogConfig, w io.Writer) *slog.Logger {
	var level slog.Level
	_ = level.UnmarshalText([]byte(c.Level))
	opts := &slog.HandlerOptions{Level: level}
	if c.Format == "text" {
		return slog.New(slog.NewTextHandler(w, opts))
	}
	return slog.New(slog.NewJSONHandler(w, opts))
}

// runBroker serves until ctx ends. ready, when set, is called with the
// listener's address once the broker accepts connections.
// traceDefault is the trace exporter when OTEL_TRACES_EXPORTER is unset.
func runBroker(ctx context.Context, cfg Config, logOut io.Writer, ready func(addr string), traceDefault string) error {
	if err := cfg.Validate(); err != nil {
		return fmt.Errorf("config: %w", err)
	}
	log := newLogger(cfg.Log, logOut)
	td, err := spiffeid.TrustDomainFromString(cfg.TrustDomain)
	if err != nil {
		return fmt.Errorf("config: trust_domain: %w", err)
	}
	admins, err := identity.NewAdminSet(td, cfg.Admins)
	if err != nil {
		return fmt.Errorf("config: admins: %w", err)
	}
	keyring, err := seal.LoadFile(cfg.KEKFile)
	if err != nil {
		return err
	}
	src, err := openIdentity(ctx, cfg.Identity, log)
	if err != nil {
		return err
	}
	defer src.Close()
	self, err := identity.SelfID(src)
	if err != nil {
		return err
	}
	if self.TrustDomain() != td {
		return fmt.Errorf("the broker's own SVID %s is not in trust_domain %q", self, td.Name())
	}
	tp, shutdownTracing, err := setupTracing(ctx, traceDefault, logOut)
	if err != nil {
		return err
	}
	defer func() {
		sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = shutdownTracing(sctx)
	}()
	mp, shutdownMetrics, err := setupMetrics(ctx, cfg.Metrics.Listen, log)
	if err != nil {
		return err
	}
	defer func() {
		sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = shutdownMetrics(sctx)
	}()
	st, err := openStore(cfg.Store)
	if err != nil {
		return err
	}
	defer func() {
		if err := st.Close(); err != nil {
			log.Error("closing the store", "error", err.Error())
		}
	}()

	reg, closeBackends := newBackends(src, cfg.Rotators.ExecDir)
	defer closeBackends()
	srv, err := server.New(server.Config{
		TrustDomain: td, Admins: admins,
		DefaultTTL: cfg.Leases.DefaultTTL, MaxTTL: cfg.Leases.MaxTTL, MaxLifetime: cfg.Leases.MaxLifetime,
		ReaperInterval: cfg.Leases.ReaperInterval, AuditDeadline: cfg.Audit.Deadline,
		RetentionMaxAge: cfg.Audit.Retention.MaxAge, RetentionMaxRecords: cfg.Audit.Retention.MaxRecords,
		MaxActiveLeasesPerAgent: cfg.Leases.MaxActivePerAgent, MaxLeasesPerTask: cfg.Leases.MaxPerTask,
		MaxDelegationDepth: cfg.Leases.MaxDelegationDepth, AnomalyWebhookURL: cfg.Anomaly.WebhookURL,
		HandshakeTimeout: cfg.Limits.HandshakeTimeout, MaxConcurrentStreams: cfg.Limits.MaxConcurrentStreams,
		AcquireRate: cfg.Leases.AcquireRate, AcquireBurst: cfg.Leases.AcquireBurst,
	}, server.Deps{
		Store: st, Backends: reg, Keyring: keyring,
		Credentials: identity.ServerCredentials(src, td), Logger: log,
		AuditSinks: newSinks(cfg.Audit.Sinks), TracerProvider: tp, MeterProvider: mp,
	})
	if err != nil {
		return err
	}
	lis, err := net.Listen("tcp", cfg.Listen)
	if err != nil {
		return err
	}
	log.Info("leasehold serving", "addr", lis.Addr().String(), "spiffe_id", self.String(),
		"trust_domain", td.Name(), "store", cfg.Store.Engine, "admins", len(cfg.Admins))
	if ready != nil {
		ready(lis.Addr().String())
	}
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(lis) }()
	select {
	case err := <-errc:
		return err
	case <-ctx.Done():
	}
	log.Info("leasehold stopping")
	sctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	srv.Stop(sctx)
	return <-errc
}

func openIdentity(ctx context.Context, c IdentityConfig, log *slog.Logger) (identity.Source, error) {
	if c.CertFile != "" {
		return identity.NewFileSource(identity.FileConfig{CertFile: c.CertFile, KeyFile: c.KeyFile, BundleFile: c.BundleFile, Logger: log})
	}
	if c.WorkloadAPISocket == "" && os.Getenv("SPIFFE_ENDPOINT_SOCKET") == "" {
		return nil, errors.New("identity: set cert_file/key_file/bundle_file, workload_api_socket, or SPIFFE_ENDPOINT_SOCKET")
	}
	wctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	return identity.NewWorkloadSource(wctx, c.WorkloadAPISocket)
}

package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/leasehold/leasehold/identity"
	"github.com/leasehold/leasehold/store/seal"
)

// Dev-mode identities. Scripts and docs rely on these file names.
var devIdentities = []struct{ file, path string }{
	{"admin", "/admin"},
	{"agent-1", "/agents/agent-1"},
	{"agent-2", "/agents/agent-2"},
	{"orchestrator", "/agents/orchestrator"},
}

func cmdDev(args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("dev", flag.ContinueOnError)
	fs.SetOutput(stderr)
	dir := fs.String("dir", ".leasehold-dev", "directory for the dev CA, SVIDs, KEK and store")
	listen := fs.String("listen", "127.0.0.1:8443", "host:port to serve on")
	tdName := fs.String("trust-domain", "leasehold.dev", "trust domain of the dev CA")
	traceConsole := fs.Bool("trace-console", false, "print spans to standard error (unless OTEL_TRACES_EXPORTER says otherwise)")
	execDir := fs.String("rotator-exec-dir", os.Getenv("LEASEHOLD_ROTATOR_EXEC_DIR"), "directory the exec backend may run rotators from (off when empty)")
	endpoints := fs.String("store-endpoints", "", "comma-separated etcd client URLs: keep records in etcd (run with --max-txn-ops 32768 --max-request-bytes 8388608), shared by every dev broker on the same --dir, instead of a bbolt file")
	if err := fs.Parse(args); err != nil {
		return err
	}
	cfg, err := prepareDev(*dir, *tdName, *listen)
	if err != nil {
		return err
	}
	cfg.Rotators.ExecDir = *execDir
	if *endpoints != "" {
		cfg.Store = StoreConfig{Engine: "etcd", Endpoints: strings.Split(*endpoints, ","), Prefix: "/leasehold-dev/",
			MaxTxnOps: 32768, MaxRequestBytes: 8 << 20, LeaderTTL: 2 * time.Second}
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	traceDefault := "none"
	if *traceConsole {
		traceDefault = "console"
	}
	return runBroker(ctx, cfg, stderr, func(addr string) { printDevHelp(stdout, *dir, addr) }, traceDefault)
}

// prepareDev writes the dev CA, SVIDs (valid 24h, reissued on every start),
// bundle and KEK under dir and returns a config that uses them.
func prepareDev(dir, tdName, listen string) (Config, error) {
	td, err := spiffeid.TrustDomainFromString(tdName)
	if err != nil {
		return Config{}, fmt.Errorf("--trust-domain: %w", err)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return Config{}, err
	}
	ca, err := identity.LoadOrCreateDevCA(dir, td)
	if err != nil {
		return Config{}, fmt.Errorf("dev CA: %w", err)
	}
	if err := identity.WriteBundle(ca.Bundle(), filepath.Join(dir, "bundle.pem")); err != nil {
		return Config{}, err
	}
	issue := func(name, path string, opts identity.SVIDOptions) error {
		id, err := spiffeid.FromPath(td, path)
		if err != nil {
			return err
		}
		opts.TTL = 24 * time.Hour
		svid, err := ca.Issue(id, opts)
		if err != nil {
			return err
		}
		return identity.WriteSVID(svid, filepath.Join(dir, name+".pem"), filepath.Join(dir, name+"-key.pem"))
	}
	// The broker's SVID also names localhost and 127.0.0.1 so grpcurl and
	// other standard TLS clients verify it without -insecure.
	if err := issue("broker", "/leasehold/broker", identity.SVIDOptions{
		DNSNames: []string{"localhost"}, IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1), net.IPv6loopback},
	}); err != nil {
		return Config{}, err
	}
	for _, who := range devIdentities {
		if err := issue(who.file, who.path, identity.SVIDOptions{}); err != nil {
			return Config{}, err
		}
	}
	kek := filepath.Join(dir, "kek")
	if err := seal.EnsureFile(kek); err != nil {
		return Config{}, err
	}
	cfg := defaultConfig()
	cfg.Listen = listen
	cfg.TrustDomain = td.Name()
	cfg.Admins = []string{"spiffe://" + td.Name() + "/admin"}
	cfg.Identity = IdentityConfig{
		CertFile: filepath.Join(dir, "broker.pem"), KeyFile: filepath.Join(dir, "broker-key.pem"),
		BundleFile: filepath.Join(dir, "bundle.pem"),
	}
	cfg.Store = StoreConfig{Engine: "bolt", Path: filepath.Join(dir, "leasehold.db")}
	cfg.KEKFile = kek
	cfg.Log = LogConfig{Level: "info", Format: "text"}
	return cfg, nil
}

func printDevHelp(w io.Writer, dir, addr string) {
	host, port, _ := net.SplitHostPort(addr)
	if host == "127.0.0.1" || host == "::1" || host == "" {
		addr = net.JoinHostPort("localhost", port)
	}
	fmt.Fprintf(w, `Leasehold dev broker on %[2]s (trust domain in %[1]s/bundle.pem). NOT FOR PRODUCTION.

Identities (PEM): %[1]s/admin.pem, %[1]s/agent-1.pem, %[1]s/agent-2.pem (+ -key.pem)

  # as admin
  grpcurl -cacert %[1]s/bundle.pem -cert %[1]s/admin.pem -key %[1]s/admin-key.pem %[2]s list
  # as agent-1
  grpcurl -cacert %[1]s/bundle.pem -cert %[1]s/agent-1.pem -key %[1]s/agent-1-key.pem %[2]s leasehold.v1.BrokerService/WhoAmI
  # the CLI
  leasehold --addr %[2]s --dev-dir %[1]s --as admin credential list

`, dir, addr)
}

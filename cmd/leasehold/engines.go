package main

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"go.etcd.io/etcd/client/pkg/v3/transport"

	"github.com/leasehold/leasehold/backends"
	"github.com/leasehold/leasehold/backends/exec"
	"github.com/leasehold/leasehold/backends/oauth2"
	"github.com/leasehold/leasehold/backends/postgres"
	"github.com/leasehold/leasehold/backends/static"
	"github.com/leasehold/leasehold/identity"
	"github.com/leasehold/leasehold/server"
	"github.com/leasehold/leasehold/server/auditsink"
	"github.com/leasehold/leasehold/store"
	"github.com/leasehold/leasehold/store/bolt"
	"github.com/leasehold/leasehold/store/etcd"
)

// This file is the one place that chooses concrete store engines and
// backends; server/ only sees their interfaces.

// storeEngines lists the store engines by config name.
var storeEngines = map[string]func(StoreConfig) (store.Store, error){
	"bolt": func(c StoreConfig) (store.Store, error) { return bolt.Open(bolt.Config{Path: c.Path}) },
	"etcd": openEtcd,
}

func openStore(c StoreConfig) (store.Store, error) {
	open, ok := storeEngines[c.Engine]
	if !ok {
		return nil, fmt.Errorf("store.engine %q is unknown (valid: bolt, etcd)", c.Engine)
	}
	return open(c)
}

func openEtcd(c StoreConfig) (store.Store, error) {
	cfg := etcd.Config{Endpoints: c.Endpoints, Prefix: c.Prefix, Username: c.Username,
		MaxTxnOps: c.MaxTxnOps, MaxRequestBytes: c.MaxRequestBytes, LeaderTTL: c.LeaderTTL}
	if c.PasswordFile != "" {
		pw, err := os.ReadFile(c.PasswordFile)
		if err != nil {
			return nil, fmt.Errorf("store.password_file: %w", err)
		}
		cfg.Password = strings.TrimRight(string(pw), "\r\n")
	}
	if c.TLS != (StoreTLSConfig{}) {
		tc, err := etcdTLS(c.TLS)
		if err != nil {
			return nil, err
		}
		cfg.TLS = tc
	}
	if err := cfg.Validate(); err != nil {
		return nil, fmt.Errorf("store: %w", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	return etcd.Open(ctx, cfg)
}

// etcdTLS builds the client TLS config for etcd from PEM files with etcd's
// own transport package, as etcdctl does: the client certificate is read
// again at each handshake, so a rotated certificate takes effect without a
// restart.
func etcdTLS(c StoreTLSConfig) (*tls.Config, error) {
	if (c.CertFile == "") != (c.KeyFile == "") {
		return nil, errors.New("store.tls: cert_file and key_file go together")
	}
	if c.CAFile != "" {
		if _, err := os.Stat(c.CAFile); err != nil {
			return nil, fmt.Errorf("store.tls.ca_file: %w", err)
		}
	}
	tc, err := transport.TLSInfo{CertFile: c.CertFile, KeyFile: c.KeyFile, TrustedCAFile: c.CAFile}.ClientConfig()
	if err != nil {
		return nil, fmt.Errorf("store.tls: %w", err)
	}
	tc.MinVersion = tls.VersionTLS12
	return tc, nil
}

// newSinks builds the audit export sinks named in the config.
func newSinks(cfgs []SinkConfig) []server.AuditSink {
	var out []server.AuditSink
	for _, c := range cfgs {
		switch c.Type {
		case "file":
			out = append(out, &auditsink.File{Path: c.Path})
		case "stdout":
			out = append(out, &auditsink.Writer{ID: "stdout", W: os.Stdout})
		}
	}
	return out
}

// newBackends registers every backend this build serves; close releases
// their connections. self is the broker's identity, presented to rotation
// webhooks; execDir is where the exec backend may run rotators from.
func newBackends(self identity.Source, execDir string) (r *backends.Registry, close func()) {
	r = backends.NewRegistry()
	r.Register(static.Name, static.Backend{})
	r.Register(oauth2.Name, &oauth2.Backend{})
	r.Register(exec.Name, exec.Backend{Dir: execDir})
	r.Register(exec.WebhookName, exec.Webhook{ClientCertificate: tlsconfig.GetClientCertificate(self)})
	pg := postgres.New()
	r.Register(postgres.Name, pg)
	r.Register(postgres.StaticRoleName, postgres.StaticRole{Backend: pg})
	return r, pg.Close
}

package main

import (
	"bytes"
	"errors"
	"flag"
	"fmt"
	"os"
	"strings"
	"time"

	"go.yaml.in/yaml/v3"
)

// Config is the broker's configuration file (YAML). Unknown keys are
// rejected. Every setting can be overridden by an environment variable and
// a flag (flag > env > file); see settings below and docs/configuration.md.
type Config struct {
	// Listen is the host:port of the gRPC listener.
	Listen string `yaml:"listen"`
	// TrustDomain whose SVIDs may call the broker, e.g. "example.org".
	TrustDomain string `yaml:"trust_domain"`
	// Admins are the SPIFFE IDs allowed to call AdminService.
	Admins   []string       `yaml:"admins"`
	Identity IdentityConfig `yaml:"identity"`
	Store    StoreConfig    `yaml:"store"`
	// KEKFile holds the key-encryption key (base64, mode 0600). Keep it out
	// of the store's directory backups.
	KEKFile  string         `yaml:"kek_file"`
	Leases   LeaseConfig    `yaml:"leases"`
	Audit    AuditConfig    `yaml:"audit"`
	Metrics  MetricsConfig  `yaml:"metrics"`
	Log      LogConfig      `yaml:"log"`
	Anomaly  AnomalyConfig  `yaml:"anomaly"`
	Limits   LimitsConfig   `yaml:"limits"`
	Rotators RotatorsConfig `yaml:"rotators"`
}

// RotatorsConfig says which programs the exec backend may run.
type RotatorsConfig struct {
	// ExecDir is the only directory rotator programs (exec backend) may be
	// run from; empty turns the exec backend off.
	ExecDir string `yaml:"exec_dir"`
}

// LimitsConfig bounds what one connection may hold (0: the defaults).
type LimitsConfig struct {
	// HandshakeTimeout closes connections that have not finished their TLS
	// handshake by then (default 10s).
	HandshakeTimeout time.Duration `yaml:"handshake_timeout"`
	// MaxConcurrentStreams caps concurrent RPCs per connection (default 1000).
	MaxConcurrentStreams uint32 `yaml:"max_concurrent_streams"`
}

// AnomalyConfig: where the anomaly guard reports (see grants'
// expected_credentials).
type AnomalyConfig struct {
	// WebhookURL receives a JSON POST per refused anomalous acquire; https,
	// or http to loopback. Empty: audit trail and log only.
	WebhookURL string `yaml:"webhook_url"`
}

// MetricsConfig turns on the Prometheus endpoint.
type MetricsConfig struct {
	// Listen, e.g. "127.0.0.1:9464", serves /metrics; empty is off. Keep it
	// on loopback or a private network: it is plain HTTP.
	Listen string `yaml:"listen"`
}

// AuditConfig shapes the audit trail.
type AuditConfig struct {
	// Deadline bounds the wait for a write to become durable; past it the
	// request fails with Unavailable and nothing is issued. Default 5s.
	Deadline time.Duration `yaml:"deadline"`
	// Sinks receive a copy of every record as JSON lines.
	Sinks []SinkConfig `yaml:"sinks"`
	// Retention removes the oldest records; zero keeps everything.
	Retention RetentionConfig `yaml:"retention"`
}

// RetentionConfig bounds the audit trail by age and/or count. Records an
// export sink has not taken are kept; the chain stays verifiable from the
// last removed record.
type RetentionConfig struct {
	MaxAge     time.Duration `yaml:"max_age"`
	MaxRecords uint64        `yaml:"max_records"`
}

// SinkConfig is one export sink: {type: file, path: ...} or {type: stdout}.
type SinkConfig struct {
	Type string `yaml:"type"`
	Path string `yaml:"path"`
}

// IdentityConfig says where the broker's own SVID comes from: PEM files
// (all three set) or the SPIFFE Workload API.
type IdentityConfig struct {
	// WorkloadAPISocket, e.g. "unix:///run/spire/agent.sock". Empty with no
	// files set means the SPIFFE_ENDPOINT_SOCKET environment variable.
	WorkloadAPISocket string `yaml:"workload_api_socket"`
	CertFile          string `yaml:"cert_file"`
	KeyFile           string `yaml:"key_file"`
	BundleFile        string `yaml:"bundle_file"`
}

// StoreConfig picks the store engine.
type StoreConfig struct {
	// Engine is "bolt" (the embedded default) or "etcd" (several brokers
	// sharing one etcd cluster).
	Engine string `yaml:"engine"`
	// Path of the bolt database file.
	Path string `yaml:"path"`

	// Endpoints are the etcd members' client URLs (https with tls).
	Endpoints []string `yaml:"endpoints"`
	// Prefix is put before every etcd key (default "/leasehold/"); brokers
	// sharing records use the same one.
	Prefix string `yaml:"prefix"`
	// TLS reaches etcd over TLS, with a client certificate for mTLS.
	TLS StoreTLSConfig `yaml:"tls"`
	// Username and PasswordFile authenticate to etcd (role-based access).
	Username     string `yaml:"username"`
	PasswordFile string `yaml:"password_file"`
	// MaxTxnOps and MaxRequestBytes must not exceed etcd's --max-txn-ops
	// and --max-request-bytes (defaults: etcd's own, 128 and 1.5 MiB).
	MaxTxnOps       int `yaml:"max_txn_ops"`
	MaxRequestBytes int `yaml:"max_request_bytes"`
	// LeaderTTL is how long a vanished broker keeps leadership of the
	// background work before another takes over (default 5s).
	LeaderTTL time.Duration `yaml:"leader_ttl"`
}

// StoreTLSConfig names the PEM files for TLS to etcd.
type StoreTLSConfig struct {
	// CAFile verifies etcd's serving certificates (default: system roots).
	CAFile string `yaml:"ca_file"`
	// CertFile and KeyFile are the broker's client certificate for mTLS.
	CertFile string `yaml:"cert_file"`
	KeyFile  string `yaml:"key_file"`
}

// LeaseConfig bounds leases. Quotas: zero takes the default, a negative
// value turns the quota off.
type LeaseConfig struct {
	DefaultTTL     time.Duration `yaml:"default_ttl"`
	MaxTTL         time.Duration `yaml:"max_ttl"`
	MaxLifetime    time.Duration `yaml:"max_lifetime"`
	ReaperInterval time.Duration `yaml:"reaper_interval"`
	// MaxActivePerAgent caps an agent's active leases (default 1000).
	MaxActivePerAgent int `yaml:"max_active_per_agent"`
	// MaxPerTask caps the leases one task id may get (default off).
	MaxPerTask int `yaml:"max_per_task"`
	// MaxDelegationDepth is the most a grant's max_delegation_depth may be
	// (default 3).
	MaxDelegationDepth int `yaml:"max_delegation_depth"`
	// AcquireRate (per second) and AcquireBurst bound acquires per agent and
	// credential (defaults 20 and 40).
	AcquireRate  float64 `yaml:"acquire_rate"`
	AcquireBurst int     `yaml:"acquire_burst"`
}

// LogConfig shapes the log on stderr.
type LogConfig struct {
	// Level: debug, info, warn, error.
	Level string `yaml:"level"`
	// Format: json or text.
	Format string `yaml:"format"`
}

func defaultConfig() Config {
	return Config{
		Listen: "127.0.0.1:8443",
		Store:  StoreConfig{Engine: "bolt", Path: "/var/lib/leasehold/leasehold.db"},
		Log:    LogConfig{Level: "info", Format: "json"},
	}
}

// Validate reports every problem at once.
func (c Config) Validate() error {
	var errs []error
	if c.Listen == "" {
		errs = append(errs, errors.New("listen is required"))
	}
	if c.TrustDomain == "" {
		errs = append(errs, errors.New("trust_domain is required"))
	}
	if len(c.Admins) == 0 {
		errs = append(errs, errors.New("admins: at least one admin SPIFFE ID is required"))
	}
	if st := c.Store; st.Engine != "etcd" && (len(st.Endpoints) > 0 || st.Prefix != "" || st.TLS != (StoreTLSConfig{}) ||
		st.Username != "" || st.PasswordFile != "" || st.MaxTxnOps != 0 || st.MaxRequestBytes != 0 || st.LeaderTTL != 0) {
		// Endpoints without the engine would run a broker on a bbolt file
		// of its own while the operator believes it shares etcd.
		errs = append(errs, fmt.Errorf("store: etcd settings (endpoints, prefix, tls, ...) are set but store.engine is %q: set store.engine: etcd", st.Engine))
	}
	files := 0
	for _, f := range []string{c.Identity.CertFile, c.Identity.KeyFile, c.Identity.BundleFile} {
		if f != "" {
			files++
		}
	}
	if files != 0 && files != 3 {
		errs = append(errs, errors.New("identity: cert_file, key_file and bundle_file go together"))
	}
	if files == 3 && c.Identity.WorkloadAPISocket != "" {
		errs = append(errs, errors.New("identity: use either the files or workload_api_socket, not both"))
	}
	if c.Audit.Retention.MaxAge < 0 || c.Audit.Deadline < 0 {
		errs = append(errs, errors.New("audit: durations must not be negative"))
	}
	if c.KEKFile == "" {
		errs = append(errs, errors.New("kek_file is required"))
	}
	for i, sk := range c.Audit.Sinks {
		switch {
		case sk.Type == "file" && sk.Path == "":
			errs = append(errs, fmt.Errorf("audit.sinks[%d]: a file sink needs a path", i))
		case sk.Type == "stdout" && sk.Path != "":
			errs = append(errs, fmt.Errorf("audit.sinks[%d]: a stdout sink takes no path", i))
		case sk.Type != "file" && sk.Type != "stdout":
			errs = append(errs, fmt.Errorf("audit.sinks[%d]: type %q is unknown (valid: file, stdout)", i, sk.Type))
		}
	}
	switch c.Log.Level {
	case "debug", "info", "warn", "error":
	default:
		errs = append(errs, fmt.Errorf("log.level %q: want debug, info, warn or error", c.Log.Level))
	}
	switch c.Log.Format {
	case "json", "text":
	default:
		errs = append(errs, fmt.Errorf("log.format %q: want json or text", c.Log.Format))
	}
	return errors.Join(errs...)
}

// loadConfigFile decodes a YAML file over defaults, rejecting unknown keys.
func loadConfigFile(path string, into *Config) error {
	data, err := os.ReadFile(path)
	if err != nil {
		return fmt.Errorf("config: %w", err)
	}
	dec := yaml.NewDecoder(bytes.NewReader(data))
	dec.KnownFields(true)
	if err := dec.Decode(into); err != nil {
		return fmt.Errorf("config %s: %w", path, err)
	}
	return nil
}

// setting is one overridable config key.
type setting struct {
	flag, env, usage string
	set              func(*Config, string) error
}

func str(p func(*Config) *string) func(*Config, string) error {
	return func(c *Config, v string) error { *p(c) = v; return nil }
}

func dur(p func(*Config) *time.Duration) func(*Config, string) error {
	return func(c *Config, v string) error {
		d, err := time.ParseDuration(v)
		if err != nil {
			return err
		}
		*p(c) = d
		return nil
	}
}

var settings = []setting{
	{"listen", "LEASEHOLD_LISTEN", "host:port to serve gRPC on", str(func(c *Config) *string { return &c.Listen })},
	{"trust-domain", "LEASEHOLD_TRUST_DOMAIN", "trust domain whose SVIDs may call", str(func(c *Config) *string { return &c.TrustDomain })},
	{"admins", "LEASEHOLD_ADMINS", "comma-separated admin SPIFFE IDs", func(c *Config, v string) error {
		c.Admins = nil
		for _, a := range strings.Split(v, ",") {
			if a = strings.TrimSpace(a); a != "" {
				c.Admins = append(c.Admins, a)
			}
		}
		return nil
	}},
	{"workload-api-socket", "LEASEHOLD_WORKLOAD_API_SOCKET", "SPIFFE Workload API socket (unix:///...)", str(func(c *Config) *string { return &c.Identity.WorkloadAPISocket })},
	{"cert-file", "LEASEHOLD_CERT_FILE", "broker SVID certificate chain (PEM)", str(func(c *Config) *string { return &c.Identity.CertFile })},
	{"key-file", "LEASEHOLD_KEY_FILE", "broker SVID private key (PEM)", str(func(c *Config) *string { return &c.Identity.KeyFile })},
	{"bundle-file", "LEASEHOLD_BUNDLE_FILE", "trust bundle (PEM)", str(func(c *Config) *string { return &c.Identity.BundleFile })},
	{"store-engine", "LEASEHOLD_STORE_ENGINE", "store engine (bolt or etcd)", str(func(c *Config) *string { return &c.Store.Engine })},
	{"store-path", "LEASEHOLD_STORE_PATH", "bolt database file", str(func(c *Config) *string { return &c.Store.Path })},
	{"store-endpoints", "LEASEHOLD_STORE_ENDPOINTS", "comma-separated etcd client URLs", func(c *Config, v string) error {
		c.Store.Endpoints = nil
		for _, e := range strings.Split(v, ",") {
			if e = strings.TrimSpace(e); e != "" {
				c.Store.Endpoints = append(c.Store.Endpoints, e)
			}
		}
		return nil
	}},
	{"store-prefix", "LEASEHOLD_STORE_PREFIX", "etcd key prefix", str(func(c *Config) *string { return &c.Store.Prefix })},
	{"kek-file", "LEASEHOLD_KEK_FILE", "key-encryption key file", str(func(c *Config) *string { return &c.KEKFile })},
	{"default-ttl", "LEASEHOLD_DEFAULT_TTL", "lease length when none is asked for", dur(func(c *Config) *time.Duration { return &c.Leases.DefaultTTL })},
	{"max-ttl", "LEASEHOLD_MAX_TTL", "longest lease anyone may ask for", dur(func(c *Config) *time.Duration { return &c.Leases.MaxTTL })},
	{"max-lifetime", "LEASEHOLD_MAX_LIFETIME", "longest grant max_lifetime", dur(func(c *Config) *time.Duration { return &c.Leases.MaxLifetime })},
	{"reaper-interval", "LEASEHOLD_REAPER_INTERVAL", "how often expired leases are ended", dur(func(c *Config) *time.Duration { return &c.Leases.ReaperInterval })},
	{"audit-deadline", "LEASEHOLD_AUDIT_DEADLINE", "longest wait for a durable audit write", dur(func(c *Config) *time.Duration { return &c.Audit.Deadline })},
	{"audit-max-age", "LEASEHOLD_AUDIT_MAX_AGE", "remove audit records older than this", dur(func(c *Config) *time.Duration { return &c.Audit.Retention.MaxAge })},
	{"rotator-exec-dir", "LEASEHOLD_ROTATOR_EXEC_DIR", "directory the exec backend may run rotators from (off when empty)", str(func(c *Config) *string { return &c.Rotators.ExecDir })},
	{"anomaly-webhook-url", "LEASEHOLD_ANOMALY_WEBHOOK_URL", "URL the anomaly guard POSTs to (off when empty)", str(func(c *Config) *string { return &c.Anomaly.WebhookURL })},
	{"metrics-listen", "LEASEHOLD_METRICS_LISTEN", "host:port for Prometheus /metrics (off when empty)", str(func(c *Config) *string { return &c.Metrics.Listen })},
	{"log-level", "LEASEHOLD_LOG_LEVEL", "debug, info, warn or error", str(func(c *Config) *string { return &c.Log.Level })},
	{"log-format", "LEASEHOLD_LOG_FORMAT", "json or text", str(func(c *Config) *string { return &c.Log.Format })},
}

// registerSettings adds one string flag per setting to fs.
func registerSettings(fs *flag.FlagSet) map[string]*string {
	vals := make(map[string]*string, len(settings))
	for _, s := range settings {
		vals[s.flag] = fs.String(s.flag, "", s.usage+" (env "+s.env+")")
	}
	return vals
}

// applyOverrides applies env, then flags that were set, over cfg.
func applyOverrides(cfg *Config, fs *flag.FlagSet, vals map[string]*string, getenv func(string) string) error {
	setFlags := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { setFlags[f.Name] = true })
	for _, s := range settings {
		if v := getenv(s.env); v != "" {
			if err := s.set(cfg, v); err != nil {
				return fmt.Errorf("%s: %w", s.env, err)
			}
		}
		if setFlags[s.flag] {
			if err := s.set(cfg, *vals[s.flag]); err != nil {
				return fmt.Errorf("--%s: %w", s.flag, err)
			}
		}
	}
	return nil
}

package main

import (
	"flag"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

func writeFile(t *testing.T, body string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "leasehold.yaml")
	require.NoError(t, os.WriteFile(p, []byte(body), 0o600))
	return p
}

func TestConfigRejectsUnknownKeys(t *testing.T) {
	cfg := defaultConfig()
	err := loadConfigFile(writeFile(t, "listen: 127.0.0.1:1\nlisten_addr: x\n"), &cfg)
	require.ErrorContains(t, err, "field listen_addr not found")
	cfg = defaultConfig()
	err = loadConfigFile(writeFile(t, "store:\n  engine: bolt\n  pth: /x\n"), &cfg)
	require.ErrorContains(t, err, "field pth not found", "nested keys too")
}

func TestConfigPrecedenceFlagOverEnvOverFile(t *testing.T) {
	cfg := defaultConfig()
	require.NoError(t, loadConfigFile(writeFile(t, `
listen: 127.0.0.1:1000
trust_domain: file.example
admins: [spiffe://file.example/admin]
kek_file: /file/kek
leases:
  default_ttl: 2m
`), &cfg))
	require.Equal(t, 2*time.Minute, cfg.Leases.DefaultTTL)
	fs := flag.NewFlagSet("serve", flag.ContinueOnError)
	vals := registerSettings(fs)
	require.NoError(t, fs.Parse([]string{"--listen", "127.0.0.1:3000", "--max-ttl", "1h"}))
	env := map[string]string{
		"LEASEHOLD_LISTEN": "127.0.0.1:2000", "LEASEHOLD_TRUST_DOMAIN": "env.example",
		"LEASEHOLD_ADMINS": "spiffe://env.example/a, spiffe://env.example/b",
	}
	require.NoError(t, applyOverrides(&cfg, fs, vals, func(k string) string { return env[k] }))
	require.Equal(t, "127.0.0.1:3000", cfg.Listen, "flag wins")
	require.Equal(t, "env.example", cfg.TrustDomain, "env beats file")
	require.Equal(t, []string{"spiffe://env.example/a", "spiffe://env.example/b"}, cfg.Admins)
	require.Equal(t, "/file/kek", cfg.KEKFile, "file value kept when nothing overrides it")
	require.Equal(t, time.Hour, cfg.Leases.MaxTTL)

	require.NoError(t, fs.Parse([]string{"--default-ttl", "soon"}))
	require.ErrorContains(t, applyOverrides(&cfg, fs, vals, func(string) string { return "" }), "--default-ttl")
}

func TestConfigValidate(t *testing.T) {
	cfg := defaultConfig()
	err := cfg.Validate()
	require.ErrorContains(t, err, "trust_domain is required")
	require.ErrorContains(t, err, "admins")
	require.ErrorContains(t, err, "kek_file is required")
	cfg.TrustDomain, cfg.Admins, cfg.KEKFile = "x.org", []string{"spiffe://x.org/a"}, "/k"
	cfg.Identity.CertFile = "/c"
	require.ErrorContains(t, cfg.Validate(), "go together")
	cfg.Identity.CertFile = ""
	cfg.Log.Format = "xml"
	require.ErrorContains(t, cfg.Validate(), "log.format")
	cfg.Log.Format = "json"
	cfg.Audit.Sinks = []SinkConfig{{Type: "file"}, {Type: "kafka"}}
	err = cfg.Validate()
	require.ErrorContains(t, err, "audit.sinks[0]: a file sink needs a path")
	require.ErrorContains(t, err, `audit.sinks[1]: type "kafka" is unknown`)
	cfg.Audit.Sinks = nil
	require.NoError(t, cfg.Validate())
	// etcd endpoints without engine: etcd would leave the broker on its own
	// bbolt file.
	cfg.Store.Endpoints = []string{"https://10.0.0.1:2379"}
	require.ErrorContains(t, cfg.Validate(), `etcd settings (endpoints, prefix, tls, ...) are set but store.engine is "bolt": set store.engine: etcd`)
	cfg.Store.Engine = "etcd"
	require.NoError(t, cfg.Validate())
}

// A misspelt key is refused, naming it, rather than silently ignored.
func TestConfigRefusesUnknownKeys(t *testing.T) {
	for doc, key := range map[string]string{
		"listn: 127.0.0.1:1\n":       "listn",
		"leases:\n  max_tll: 1h\n":   "max_tll",
		"rotators: {exec-dir: /x}\n": "exec-dir",
	} {
		path := filepath.Join(t.TempDir(), "c.yaml")
		require.NoError(t, os.WriteFile(path, []byte(doc), 0o600))
		var c Config
		require.ErrorContains(t, loadConfigFile(path, &c), key, doc)
	}
}

package main

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/leasehold/leasehold/store/etcd/etcdtest"
)

// The benchmark tool keeps working: a small run generates, serves and
// queries, and its last line is the machine-readable summary.
func TestAuditBenchSmall(t *testing.T) {
	var out bytes.Buffer
	db := filepath.Join(t.TempDir(), "audit.db")
	require.NoError(t, runAudit([]string{"--db", db, "--records", "3000", "--queries", "40"}, &out))
	lines := bytes.Split(bytes.TrimSpace(out.Bytes()), []byte("\n"))
	require.Regexp(t, regexp.MustCompile(`^records=3000 pages=\d+ returned=\d+ p50_ms=[\d.]+ p90_ms=[\d.]+ p99_ms=[\d.]+ max_ms=[\d.]+$`), string(lines[len(lines)-1]))
	out.Reset()
	require.NoError(t, runAudit([]string{"--db", db, "--records", "3000", "--queries", "9"}, &out))
	require.Contains(t, out.String(), "store holds 3000 records already", "re-runs reuse the file")
}

// TestMain lets the test binary play the broker child the acquire benchmark
// re-executes.
func TestMain(m *testing.M) {
	if dir := os.Getenv(brokerEnv); dir != "" {
		if err := runBroker(dir); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// The acquire benchmark runs end to end: a broker child on a prefilled
// store, agents with their own SVIDs, the ceiling and the acquire phases,
// RevokeAgent on an agent with many leases, and the machine-readable line.
func TestAcquireBenchSmall(t *testing.T) {
	var out bytes.Buffer
	err := acquireBench(acquireOpts{dir: t.TempDir(), agents: 3, duration: time.Second, prefill: 300, revokeLeases: 40}, &out)
	require.NoError(t, err, out.String())
	require.Contains(t, out.String(), "RevokeAgent ended 40 leases")
	require.Contains(t, out.String(), "  acquire    1s", "progress is shown while it runs")
	lines := bytes.Split(bytes.TrimSpace(out.Bytes()), []byte("\n"))
	last := string(lines[len(lines)-1])
	require.Regexp(t, regexp.MustCompile(`^acquire_per_s=[1-9]\d* ceiling_per_s=[1-9]\d* ratio=[\d.]+ p50_ms=[\d.]+ p90_ms=[\d.]+ p99_ms=[\d.]+ release_p99_ms=[\d.]+ errors=0 agents=3 broker_cpu_cores=[\d.]+ peak_rss_mb=[1-9]\d* anon_rss_mb=[1-9]\d* startup_ms=[\d.]+ active_leases=340 revoke_ms=[\d.]+ store=bolt brokers=1$`), last)
}

// With --store etcd and two brokers, the tool starts its own etcd member
// and spreads the agents over both brokers, which share it.
func TestAcquireBenchEtcdTwoBrokers(t *testing.T) {
	t.Setenv("LEASEHOLD_ETCD", etcdtest.Binary(t))
	var out bytes.Buffer
	err := acquireBench(acquireOpts{dir: t.TempDir(), agents: 4, duration: time.Second, store: "etcd", brokers: 2}, &out)
	require.NoError(t, err, out.String())
	require.Contains(t, out.String(), "broker 1: ")
	lines := bytes.Split(bytes.TrimSpace(out.Bytes()), []byte("\n"))
	require.Regexp(t, regexp.MustCompile(`^acquire_per_s=[1-9]\d* .* errors=0 agents=4 .* store=etcd brokers=2$`), string(lines[len(lines)-1]))
}

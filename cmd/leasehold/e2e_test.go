package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/leasehold/leasehold/store/etcd/etcdtest"
)

// The end-to-end tests run the built leasehold binary as users do.

var leaseholdBin string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "leasehold-e2e")
	if err != nil {
		panic(err)
	}
	leaseholdBin = filepath.Join(dir, "leasehold")
	if out, err := exec.Command("go", "build", "-o", leaseholdBin, ".").CombinedOutput(); err != nil {
		fmt.Fprintf(os.Stderr, "build leasehold: %v\n%s", err, out)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// toolPath finds a tool pinned under tools/ and installed into bin/ by
// `make tools`: from the environment variable, else ../../bin/name. In CI a
// missing tool fails the test instead of skipping it.
func toolPath(t *testing.T, envVar, name string) string {
	t.Helper()
	for _, c := range []string{os.Getenv(envVar), "../../bin/" + name} {
		if c == "" {
			continue
		}
		if abs, err := filepath.Abs(c); err == nil {
			if _, err := os.Stat(abs); err == nil {
				return abs
			}
		}
	}
	if os.Getenv("CI") == "true" {
		t.Fatalf("%s not found: run 'make tools' (CI must not skip this test)", name)
	}
	t.Skipf("%s not found; run 'make tools'", name)
	return ""
}

func grpcurlPath(t *testing.T) string { return toolPath(t, "LEASEHOLD_GRPCURL", "grpcurl") }

// startProcess starts the binary with its stdout and stderr captured; the
// process is stopped with SIGTERM at cleanup and must exit cleanly.
func startProcess(t *testing.T, dir string, args ...string) (*exec.Cmd, *lockedBuffer, *lockedBuffer) {
	t.Helper()
	return startProcessEnv(t, dir, nil, args...)
}

// startProcessEnv is startProcess with extra environment variables.
func startProcessEnv(t *testing.T, dir string, env []string, args ...string) (*exec.Cmd, *lockedBuffer, *lockedBuffer) {
	t.Helper()
	return startBinary(t, leaseholdBin, dir, env, args...)
}

// startBinary is startProcessEnv for a copy of the binary at another path.
func startBinary(t *testing.T, bin, dir string, env []string, args ...string) (*exec.Cmd, *lockedBuffer, *lockedBuffer) {
	t.Helper()
	cmd := exec.Command(bin, args...)
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), env...)
	stdout, stderr := &lockedBuffer{}, &lockedBuffer{}
	cmd.Stdout, cmd.Stderr = stdout, stderr
	require.NoError(t, cmd.Start())
	t.Cleanup(func() {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		done := make(chan error, 1)
		go func() { done <- cmd.Wait() }()
		select {
		case err := <-done:
			require.NoError(t, err, "the broker exits cleanly on SIGTERM; log:\n%s", stderr.String())
		case <-time.After(15 * time.Second):
			_ = cmd.Process.Kill()
			t.Error("broker did not stop on SIGTERM")
		}
	})
	return cmd, stdout, stderr
}

// servingAddr waits for `leasehold serve`'s JSON log line "leasehold
// serving" and returns the address it names.
func servingAddr(t *testing.T, stderr *lockedBuffer, within time.Duration) string {
	t.Helper()
	var addr string
	require.Eventually(t, func() bool {
		sc := bufio.NewScanner(strings.NewReader(stderr.String()))
		for sc.Scan() {
			var line struct{ Msg, Addr string }
			if json.Unmarshal(sc.Bytes(), &line) == nil && line.Msg == "leasehold serving" {
				addr = line.Addr
				return true
			}
		}
		return false
	}, within, 20*time.Millisecond, "serve did not start:\n%s", stderr)
	return addr
}

var devReadyRE = regexp.MustCompile(`Leasehold dev broker on (\S+) `)

// startDev runs `leasehold dev` in dir on a free port and returns host:port.
func startDev(t *testing.T, dir, devDir string, env ...string) string {
	t.Helper()
	_, stdout, stderr := startProcessEnv(t, dir, env, "dev", "--dir", devDir, "--listen", "127.0.0.1:0")
	var addr string
	require.Eventually(t, func() bool {
		if m := devReadyRE.FindStringSubmatch(stdout.String()); m != nil {
			addr = m[1]
			return true
		}
		return false
	}, 20*time.Second, 20*time.Millisecond, "dev broker did not start:\n%s", stderr)
	return addr
}

func quickstartBlock(t *testing.T) string {
	t.Helper()
	readme, err := os.ReadFile("../../README.md")
	require.NoError(t, err)
	s := string(readme)
	begin, end := strings.Index(s, "<!-- quickstart-begin -->"), strings.Index(s, "<!-- quickstart-end -->")
	require.True(t, begin >= 0 && end > begin, "README quickstart markers missing")
	block := s[begin:end]
	block = block[strings.Index(block, "```sh\n")+len("```sh\n"):]
	return block[:strings.LastIndex(block, "```")]
}

// TestReadmeQuickstart runs the README's grpcurl quickstart verbatim (only
// the port is changed) against `leasehold dev`.
func TestReadmeQuickstart(t *testing.T) {
	grpcurl := grpcurlPath(t)
	dir := t.TempDir()
	addr := startDev(t, dir, ".leasehold-dev")
	_, port, _ := strings.Cut(addr, ":")
	script := strings.ReplaceAll(quickstartBlock(t), "localhost:8443", "localhost:"+port)

	cmd := exec.Command("bash", "-c", script)
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), "PATH="+filepath.Dir(grpcurl)+":"+os.Getenv("PATH"))
	out, _ := cmd.CombinedOutput() // two commands are meant to fail
	got := string(out)

	// In order: services, the credential, the grant, the lease with its
	// secret, agent-2 denied, the revocation, agent-1 denied, the audit trail.
	expect := []string{
		"grpc.health.v1.Health", "leasehold.v1.AdminService", "leasehold.v1.BrokerService",
		`"currentVersion": "1"`,
		`"spiffeId": "spiffe://leasehold.dev/agents/agent-1"`,
		`"api_key": "sk-live-123"`,
		"Code: PermissionDenied", "no grant allows spiffe://leasehold.dev/agents/agent-2",
		`"leasesRevoked": 1`,
		"Code: PermissionDenied", "spiffe://leasehold.dev/agents/agent-1 is revoked",
		"AUDIT_EVENT_AGENT_REVOKE", "AUDIT_EVENT_LEASE_REVOKE", "AUDIT_EVENT_LEASE_ACQUIRE",
	}
	rest := got
	for _, want := range expect {
		i := strings.Index(rest, want)
		require.GreaterOrEqual(t, i, 0, "expected %q after what came before; output:\n%s", want, got)
		rest = rest[i+len(want):]
	}
	require.Equal(t, 2, strings.Count(got, "ERROR:"), "exactly the two denials fail; output:\n%s", got)
}

func TestDemoScript(t *testing.T) {
	dir := t.TempDir()
	cmd := exec.Command("bash", "../../scripts/demo.sh")
	cmd.Env = append(os.Environ(), "LEASEHOLD="+leaseholdBin, "DEMO_DIR="+filepath.Join(dir, "demo"))
	out, err := cmd.CombinedOutput()
	require.NoError(t, err, "%s", out)
	m := regexp.MustCompile(`for task ticket-4711 \(trace ([0-9a-f]{32})\)`).FindStringSubmatch(string(out))
	require.NotNil(t, m, "the demo names the task's trace")
	traceSection := string(out)[strings.Index(string(out), "The task's trace leads to its audit records"):]
	require.Equal(t, 2, strings.Count(traceSection, "ticket-4711"), "acquire and release of the task are in its trace:\n%s", traceSection)
	for _, want := range []string{"the leased key is the stored one", "LEASE_STATE_RELEASED",
		"PermissionDenied", "lease_acquire   allow", "lease_release   allow", "lease_acquire   deny"} {
		require.Contains(t, string(out), want)
	}
	key, err := os.ReadFile(filepath.Join(dir, "demo", "crm-api-key"))
	require.NoError(t, err)
	st, err := os.Stat(filepath.Join(dir, "demo", "crm-api-key"))
	require.NoError(t, err)
	require.Equal(t, os.FileMode(0o600), st.Mode().Perm(), "the demo's key file is owner-only")
	require.NotContains(t, string(out), strings.TrimSpace(string(key)), "the demo never prints the secret")
	log, err := os.ReadFile(filepath.Join(dir, "demo", "broker.log"))
	require.NoError(t, err)
	require.NotContains(t, string(log), strings.TrimSpace(string(key)), "nor does the broker log")
}

// The example orchestrator's make target: two sub-agents, each leasing only
// its own credential; the orchestrator itself is refused.
func TestExampleOrchestrator(t *testing.T) {
	cmd := exec.Command("bash", "scripts/orchestrator.sh")
	cmd.Dir = "../.."
	cmd.Env = append(os.Environ(), "LEASEHOLD="+leaseholdBin, "DEMO_DIR="+filepath.Join(t.TempDir(), "orch"))
	out, err := cmd.CombinedOutput()
	require.NoError(t, err, "%s", out)
	require.Contains(t, string(out), "delegated crm/salesforce (read) to agent-1 for report-42/crm")
	require.Contains(t, string(out), "agent-1 did report-42/crm with crm/salesforce")
	require.Contains(t, string(out), "agent-2 did report-42/db with db/warehouse")
	for _, refused := range []string{"db/warehouse: ", "crm/salesforce write: ", "crm/salesforce outside its subtask: ", "delegating on to agent-2: "} {
		require.Contains(t, string(out), "agent-1 is refused "+refused, "no escalation")
	}
	require.NotContains(t, string(out), "unexpected")
	require.Regexp(t, `"delegatedGrantsDeleted":\s*2`, string(out), "one revocation of the orchestrator cuts the tree") // protojson varies spacing
	require.Contains(t, string(out), "agent-1 afterwards: leasehold: PermissionDenied")
	require.Regexp(t, `lease_release\s+allow\s+spiffe://leasehold.dev/agents/agent-2\s+\S+\s+db/warehouse\s+report-42/db\s+ls_\w+\s+spiffe://leasehold.dev/agents/orchestrator`,
		string(out), "the trail says agent-2 acted for the orchestrator")
}

// The cluster example's make target: three etcd members, two dev brokers on
// them, a revocation on one in force on the other, the leader killed and
// replaced, an etcd member killed.
func TestExampleCluster(t *testing.T) {
	cmd := exec.Command("bash", "scripts/cluster.sh")
	cmd.Dir = "../.."
	cmd.Env = append(os.Environ(), "LEASEHOLD="+leaseholdBin, "ETCD="+etcdtest.Binary(t), "DEMO_DIR="+filepath.Join(t.TempDir(), "cluster"))
	out, err := cmd.CombinedOutput()
	require.NoError(t, err, "%s", out)
	require.Regexp(t, `agent-1 on b got lease ls_\w+`, string(out), "a grant made on a is used on b")
	require.Contains(t, string(out), "leasehold: PermissionDenied: agent spiffe://leasehold.dev/agents/agent-1 is revoked")
	require.Regexp(t, `broker [ab] took over the background work`, string(out))
	require.Regexp(t, `(?s)an etcd member is killed.*agent-2 on [ab] got lease ls_\w+`, string(out))
	require.Contains(t, string(out), "audit chain OK: 8 records checked")
	require.NotContains(t, string(out), "unexpected")
}

// TestServeWithConfigFile runs `leasehold serve --config` on the files a dev
// setup writes, and checks the CLI against it.
func TestServeWithConfigFile(t *testing.T) {
	dir := t.TempDir()
	dev := filepath.Join(dir, "dev")
	cfg, err := prepareDev(dev, "example.org", "127.0.0.1:0")
	require.NoError(t, err)
	conf := fmt.Sprintf(`listen: 127.0.0.1:0
trust_domain: example.org
admins: [spiffe://example.org/admin]
identity:
  cert_file: %s
  key_file: %s
  bundle_file: %s
store:
  engine: bolt
  path: %s
kek_file: %s
audit:
  deadline: 3s
  retention:
    max_age: 2160h
    max_records: 1000000
  sinks:
    - type: file
      path: %s
metrics:
  listen: 127.0.0.1:0
limits:
  handshake_timeout: 5s
  max_concurrent_streams: 100
log:
  format: json
`, cfg.Identity.CertFile, cfg.Identity.KeyFile, cfg.Identity.BundleFile, filepath.Join(dir, "data", "leasehold.db"), cfg.KEKFile,
		filepath.Join(dir, "audit.jsonl"))
	require.NoError(t, os.WriteFile(filepath.Join(dir, "leasehold.yaml"), []byte(conf), 0o600))

	_, _, stderr := startProcess(t, dir, "serve", "--config", "leasehold.yaml", "--log-level", "debug")
	addr := servingAddr(t, stderr, 20*time.Second)

	cli := func(as string, args ...string) (string, error) {
		all := append([]string{"--addr", addr, "--dev-dir", dev, "--as", as}, args...)
		out, err := exec.Command(leaseholdBin, all...).CombinedOutput()
		return string(out), err
	}
	out, err := cli("admin", "health")
	require.NoError(t, err, out)
	require.Contains(t, out, "SERVING")
	out, err = cli("admin", "credential", "put", "db/analytics", "--set", "password=pw-1")
	require.NoError(t, err, out)
	out, err = cli("admin", "grant", "create", "--credential", "db/analytics", "--spiffe-id-prefix", "spiffe://example.org/agents", "--scopes", "read")
	require.NoError(t, err, out)
	out, err = cli("agent-2", "acquire", "db/analytics", "--scopes", "read", "--task", "t-9", "--format", "env")
	require.NoError(t, err, out)
	require.Contains(t, out, "PASSWORD='pw-1'")
	out, err = cli("agent-1", "agent", "list")
	require.Error(t, err)
	require.Contains(t, out, "PermissionDenied")
	out, err = cli("admin", "audit", "query", "--agent", "spiffe://example.org/agents/agent-2", "--format", "json")
	require.NoError(t, err, out)
	require.Contains(t, out, "AUDIT_EVENT_LEASE_ACQUIRE")
	require.Contains(t, out, "t-9")
	require.NotContains(t, stderr.String(), "pw-1", "the log never holds a secret")
	require.Eventually(t, func() bool {
		data, _ := os.ReadFile(filepath.Join(dir, "audit.jsonl"))
		return strings.Contains(string(data), `"task_id":"t-9"`)
	}, 10*time.Second, 20*time.Millisecond, "the configured file sink receives the trail")
	data, err := os.ReadFile(filepath.Join(dir, "audit.jsonl"))
	require.NoError(t, err)
	require.NotContains(t, string(data), "pw-1", "nor does the export")

	// Prometheus metrics on their own loopback listener.
	var metricsAddr string
	sc := bufio.NewScanner(strings.NewReader(stderr.String()))
	for sc.Scan() {
		var line struct{ Msg, Addr string }
		if json.Unmarshal(sc.Bytes(), &line) == nil && line.Msg == "prometheus metrics" {
			metricsAddr = line.Addr
		}
	}
	require.NotEmpty(t, metricsAddr)
	resp, err := http.Get("http://" + metricsAddr + "/metrics")
	require.NoError(t, err)
	body, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	require.NoError(t, err)
	require.Regexp(t, `(?m)^leasehold_leases_active\{[^}]*\} 1$`, string(body))
	require.Regexp(t, `(?m)^leasehold_decisions_total\{code="OK",decision="allow",operation="lease.acquire",[^}]*\} 1$`, string(body))
	require.Contains(t, string(body), `le="0.0005"`, "second-scale bucket boundaries")
	require.Regexp(t, `(?m)^leasehold_acquire_duration_seconds_count\{decision="allow",[^}]*\} 1$`, string(body))
	require.NotContains(t, string(body), "pw-1")
}

func TestServeRejectsBadConfig(t *testing.T) {
	dir := t.TempDir()
	require.NoError(t, os.WriteFile(filepath.Join(dir, "bad.yaml"), []byte("listen: x\nlisten_port: 1\n"), 0o600))
	cmd := exec.Command(leaseholdBin, "serve", "--config", "bad.yaml")
	cmd.Dir = dir
	out, err := cmd.CombinedOutput()
	require.Error(t, err)
	require.Contains(t, string(out), "field listen_port not found")

	require.NoError(t, os.WriteFile(filepath.Join(dir, "kek"), []byte("x"), 0o644))
	cmd = exec.Command(leaseholdBin, "serve", "--trust-domain", "x.org", "--admins", "spiffe://x.org/a", "--kek-file", "kek", "--cert-file", "c", "--key-file", "k", "--bundle-file", "b")
	cmd.Dir = dir
	out, err = cmd.CombinedOutput()
	require.Error(t, err)
	require.Contains(t, string(out), "chmod 600", "a KEK readable by others is refused")
}

type lockedBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *lockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *lockedBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

var _ io.Writer = (*lockedBuffer)(nil)

func writeSecret(path, v string) error { return os.WriteFile(path, []byte(v+"\n"), 0o600) }

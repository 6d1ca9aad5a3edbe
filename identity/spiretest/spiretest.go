// Package spiretest runs a real SPIRE server and agent for tests: the
// spire-server and spire-agent binaries pinned in tools/spire (built into
// bin/ by `make tools`), a sqlite datastore and sockets in a short temporary
// directory, join-token node attestation and the unix workload attestor with
// binary paths discovered, so a test tells workloads apart by the path of
// the program they run (unix:path:...). Everything is stopped when the test
// ends, also on failure.
package spiretest

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// TrustDomain is the trust domain of the test SPIRE server.
const TrustDomain = "spire.test"

// NodeID is the SPIFFE ID the agent's node attests as; entries use it as
// their parent.
const NodeID = "spiffe://" + TrustDomain + "/node/ci"

// SPIRE is a running SPIRE server and agent.
type SPIRE struct {
	// Dir holds configs, data and sockets.
	Dir string
	// AgentSocket is the Workload API socket path.
	AgentSocket string

	serverBin, agentBin, serverSocket string
	mu                                sync.Mutex
	logs                              map[string]*bytes.Buffer
}

// WorkloadAddr is the Workload API address, "unix:///...".
func (s *SPIRE) WorkloadAddr() string { return "unix://" + s.AgentSocket }

// Binaries finds spire-server and spire-agent: LEASEHOLD_SPIRE_SERVER and
// LEASEHOLD_SPIRE_AGENT, else bin/ at the module root. Without them the test
// is skipped, or fails under CI=true.
func Binaries(t testing.TB) (server, agent string) {
	t.Helper()
	server, agent = os.Getenv("LEASEHOLD_SPIRE_SERVER"), os.Getenv("LEASEHOLD_SPIRE_AGENT")
	if server == "" || agent == "" {
		if root := moduleRoot(); root != "" {
			server, agent = filepath.Join(root, "bin", "spire-server"), filepath.Join(root, "bin", "spire-agent")
		}
	}
	for _, p := range []string{server, agent} {
		if _, err := os.Stat(p); p == "" || err != nil {
			if os.Getenv("CI") == "true" {
				t.Fatalf("SPIRE binaries not found (%q): run 'make tools' (CI must not skip this test)", p)
			}
			t.Skipf("SPIRE binaries not found (%q); run 'make tools'", p)
		}
	}
	return server, agent
}

func moduleRoot() string {
	dir, err := os.Getwd()
	if err != nil {
		return ""
	}
	for {
		if b, err := os.ReadFile(filepath.Join(dir, "go.mod")); err == nil && bytes.Contains(b, []byte("module github.com/leasehold/leasehold\n")) {
			return dir
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return ""
		}
		dir = parent
	}
}

// Start starts a SPIRE server and an agent attested to it, and returns once
// the agent's Workload API answers. Register workloads with CreateEntry.
func Start(t testing.TB) *SPIRE {
	t.Helper()
	serverBin, agentBin := Binaries(t)
	// Unix socket paths must stay under ~108 bytes: keep the directory short.
	dir, err := os.MkdirTemp("/tmp", "lhspire")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	s := &SPIRE{Dir: dir, AgentSocket: filepath.Join(dir, "agent", "api.sock"), serverSocket: filepath.Join(dir, "server", "api.sock"),
		serverBin: serverBin, agentBin: agentBin, logs: map[string]*bytes.Buffer{}}
	for _, d := range []string{"server/data", "agent/data"} {
		if err := os.MkdirAll(filepath.Join(dir, d), 0o700); err != nil {
			t.Fatal(err)
		}
	}
	port := freePort(t)
	write(t, filepath.Join(dir, "server.conf"), fmt.Sprintf(serverConf, port, s.serverSocket, TrustDomain, filepath.Join(dir, "server", "data"),
		filepath.Join(dir, "server", "data", "datastore.sqlite3")))
	s.start(t, "spire-server", serverBin, "run", "-config", filepath.Join(dir, "server.conf"))
	s.waitFor(t, "spire-server healthcheck", func() error {
		_, err := s.run(serverBin, "healthcheck", "-socketPath", s.serverSocket)
		return err
	})
	bundle, err := s.run(serverBin, "bundle", "show", "-socketPath", s.serverSocket)
	if err != nil {
		t.Fatal(err)
	}
	write(t, filepath.Join(dir, "bootstrap.crt"), bundle)
	out, err := s.run(serverBin, "token", "generate", "-socketPath", s.serverSocket, "-spiffeID", NodeID, "-ttl", "600")
	if err != nil {
		t.Fatal(err)
	}
	token := strings.TrimSpace(strings.TrimPrefix(strings.TrimSpace(out), "Token:"))
	write(t, filepath.Join(dir, "agent.conf"), fmt.Sprintf(agentConf, filepath.Join(dir, "agent", "data"), port, s.AgentSocket,
		filepath.Join(dir, "bootstrap.crt"), TrustDomain))
	s.start(t, "spire-agent", agentBin, "run", "-config", filepath.Join(dir, "agent.conf"), "-joinToken", token)
	s.waitFor(t, "spire-agent healthcheck", func() error {
		_, err := s.run(agentBin, "healthcheck", "-socketPath", s.AgentSocket)
		return err
	})
	return s
}

// Entry describes a registration entry.
type Entry struct {
	SPIFFEID  string
	Selectors []string // e.g. "unix:path:/tmp/x/bin/agent"
	DNSNames  []string
	// X509SVIDTTL defaults to SPIRE's default (one hour).
	X509SVIDTTL time.Duration
}

// CreateEntry registers a workload under the agent's node and returns the
// entry id.
func (s *SPIRE) CreateEntry(t testing.TB, e Entry) string {
	t.Helper()
	args := []string{"entry", "create", "-socketPath", s.serverSocket, "-parentID", NodeID, "-spiffeID", e.SPIFFEID, "-output", "json"}
	for _, sel := range e.Selectors {
		args = append(args, "-selector", sel)
	}
	for _, d := range e.DNSNames {
		args = append(args, "-dns", d)
	}
	if e.X509SVIDTTL > 0 {
		args = append(args, "-x509SVIDTTL", strconv.Itoa(int(e.X509SVIDTTL.Seconds())))
	}
	out, err := s.run(s.serverBin, args...)
	if err != nil {
		t.Fatal(err)
	}
	var resp struct {
		Results []struct {
			Entry struct {
				ID string `json:"id"`
			} `json:"entry"`
		} `json:"results"`
	}
	if err := json.Unmarshal([]byte(out), &resp); err != nil || len(resp.Results) != 1 || resp.Results[0].Entry.ID == "" {
		t.Fatalf("spire-server entry create: unexpected output %q (%v)", out, err)
	}
	return resp.Results[0].Entry.ID
}

// DeleteEntry removes a registration entry.
func (s *SPIRE) DeleteEntry(t testing.TB, id string) {
	t.Helper()
	if _, err := s.run(s.serverBin, "entry", "delete", "-socketPath", s.serverSocket, "-entryID", id); err != nil {
		t.Fatal(err)
	}
}

// PrepareCA makes the server prepare its next X.509 authority: it joins the
// trust bundle that agents and workloads receive, but signs nothing yet.
// It returns the new authority's id for ActivateCA.
func (s *SPIRE) PrepareCA(t testing.TB) string {
	t.Helper()
	out, err := s.run(s.serverBin, "localauthority", "x509", "prepare", "-socketPath", s.serverSocket, "-output", "json")
	if err != nil {
		t.Fatal(err)
	}
	var resp struct {
		PreparedAuthority struct {
			AuthorityID string `json:"authority_id"`
		} `json:"prepared_authority"`
	}
	if err := json.Unmarshal([]byte(out), &resp); err != nil || resp.PreparedAuthority.AuthorityID == "" {
		t.Fatalf("spire-server localauthority x509 prepare: unexpected output %q (%v)", out, err)
	}
	return resp.PreparedAuthority.AuthorityID
}

// ActivateCA makes a prepared authority the one that signs new SVIDs.
func (s *SPIRE) ActivateCA(t testing.TB, authorityID string) {
	t.Helper()
	if _, err := s.run(s.serverBin, "localauthority", "x509", "activate", "-socketPath", s.serverSocket, "-authorityID", authorityID); err != nil {
		t.Fatal(err)
	}
}

// Logs returns what the server and agent printed, for failure messages.
func (s *SPIRE) Logs() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	var b strings.Builder
	for name, l := range s.logs {
		fmt.Fprintf(&b, "--- %s\n%s\n", name, l.String())
	}
	return b.String()
}

func (s *SPIRE) run(bin string, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, args...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return "", fmt.Errorf("%s %s: %w\n%s%s", filepath.Base(bin), strings.Join(args[:min(2, len(args))], " "), err, stdout.String(), stderr.String())
	}
	return stdout.String(), nil
}

type lockedWriter struct {
	mu *sync.Mutex
	b  *bytes.Buffer
}

func (w lockedWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.b.Write(p)
}

func (s *SPIRE) start(t testing.TB, name, bin string, args ...string) {
	t.Helper()
	cmd := exec.Command(bin, args...)
	cmd.Dir = s.Dir
	buf := &bytes.Buffer{}
	s.mu.Lock()
	s.logs[name] = buf
	s.mu.Unlock()
	cmd.Stdout, cmd.Stderr = lockedWriter{&s.mu, buf}, lockedWriter{&s.mu, buf}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		done := make(chan struct{})
		go func() { _ = cmd.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			_ = cmd.Process.Kill()
			<-done
		}
		if t.Failed() {
			t.Logf("%s log:\n%s", name, s.logsOf(name))
		}
	})
}

func (s *SPIRE) logsOf(name string) string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.logs[name].String()
}

func (s *SPIRE) waitFor(t testing.TB, what string, ok func() error) {
	t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	for {
		err := ok()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s did not succeed within a minute: %v\n%s", what, err, s.Logs())
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func freePort(t testing.TB) int {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

func write(t testing.TB, path, content string) {
	if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
}

const serverConf = `server {
    bind_address = "127.0.0.1"
    bind_port = "%d"
    socket_path = "%s"
    trust_domain = "%s"
    data_dir = "%s"
    log_level = "INFO"
    ca_ttl = "24h"
    default_x509_svid_ttl = "1h"
}
plugins {
    DataStore "sql" {
        plugin_data {
            database_type = "sqlite3"
            connection_string = "%s"
        }
    }
    NodeAttestor "join_token" {
        plugin_data {}
    }
    KeyManager "memory" {
        plugin_data {}
    }
}
`

const agentConf = `agent {
    data_dir = "%s"
    log_level = "INFO"
    server_address = "127.0.0.1"
    server_port = "%d"
    socket_path = "%s"
    trust_bundle_path = "%s"
    trust_domain = "%s"
}
plugins {
    NodeAttestor "join_token" {
        plugin_data {}
    }
    KeyManager "memory" {
        plugin_data {}
    }
    WorkloadAttestor "unix" {
        plugin_data {
            discover_workload_path = true
        }
    }
}
`

package main

import (
	"context"
	"encoding/pem"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

func TestProxyInjectsWithoutTheAgentSeeingTheSecret(t *testing.T) {
	const canary = "CANARY-proxy-4e1f"
	dir := t.TempDir()
	addr := startDev(t, dir, "dev")
	dev := filepath.Join(dir, "dev")
	admin := func(args ...string) string {
		out, err := exec.Command(leaseholdBin, append([]string{"--addr", addr, "--dev-dir", dev, "--as", "admin"}, args...)...).CombinedOutput()
		require.NoError(t, err, "%s", out)
		return string(out)
	}
	admin("credential", "put", "crm/salesforce", "--set", "api_key="+canary)
	admin("grant", "create", "--credential", "crm/salesforce", "--spiffe-id", "spiffe://leasehold.dev/agents/agent-1", "--scopes", "read")

	upstream := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("Authorization") != "Bearer "+canary {
			http.Error(w, "no key", http.StatusUnauthorized)
			return
		}
		_, _ = io.WriteString(w, "contacts: 3")
	}))
	defer upstream.Close()
	u, _ := url.Parse(upstream.URL)
	caFile := filepath.Join(dir, "upstream-ca.pem")
	require.NoError(t, os.WriteFile(caFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: upstream.Certificate().Raw}), 0o600))

	sockDir, err := os.MkdirTemp("", "lhp") // unix socket paths must stay short
	require.NoError(t, err)
	defer os.RemoveAll(sockDir)
	socket := filepath.Join(sockDir, "proxy.sock")
	cfgPath := filepath.Join(dir, "proxy.yaml")
	require.NoError(t, os.WriteFile(cfgPath, []byte(`socket: `+socket+`
upstream_ca_file: `+caFile+`
routes:
  - host: 127.0.0.1
    credential: crm/salesforce
    scopes: [read]
    bearer: api_key
`), 0o600))
	cfg, routes, err := loadProxyConfig(cfgPath)
	require.NoError(t, err)
	logs := &lockedBuffer{}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		done <- runProxy(ctx, cfg, routes, &connFlags{addr: addr, devDir: dev, as: "agent-1", timeout: 10 * time.Second},
			slog.New(slog.NewJSONHandler(logs, nil)))
	}()
	defer func() { cancel(); require.NoError(t, <-done) }()
	require.Eventually(t, func() bool { _, err := os.Stat(socket); return err == nil }, 10*time.Second, 10*time.Millisecond)
	st, err := os.Stat(socket)
	require.NoError(t, err)
	require.Equal(t, os.FileMode(0o600), st.Mode().Perm(), "only the agent's own user may connect")

	// The agent: plain HTTP over the unix socket, no key anywhere.
	agent := &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, "unix", socket)
	}}}
	do := func(method, target, task string) (int, string, http.Header) {
		t.Helper()
		req, err := http.NewRequest(method, target, nil)
		require.NoError(t, err)
		if task != "" {
			req.Header.Set("Leasehold-Task", task)
		}
		resp, err := agent.Do(req)
		require.NoError(t, err)
		defer resp.Body.Close()
		body, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(body), resp.Header
	}
	code, body, hdr := do(http.MethodGet, "http://127.0.0.1:"+u.Port()+"/v1/contacts", "ticket-1")
	require.Equal(t, http.StatusOK, code, body)
	require.Equal(t, "contacts: 3", body, "the upstream got the key over TLS")
	require.NotContains(t, body+strings.Join(flatten(hdr), " "), canary, "nothing the agent receives holds the key")

	code, body, _ = do(http.MethodGet, "http://example.invalid/x", "ticket-1")
	require.Equal(t, http.StatusForbidden, code)
	require.Contains(t, body, "not mapped")
	code, _, _ = do(http.MethodGet, "http://127.0.0.1:"+u.Port()+"/", "")
	require.Equal(t, http.StatusBadRequest, code, "a task id is required")

	// Ending the task releases its lease.
	code, _, _ = do(http.MethodPost, "http://leasehold.proxy/end-task", "ticket-1")
	require.Equal(t, http.StatusNoContent, code)
	require.Contains(t, admin("lease", "list", "--agent", "spiffe://leasehold.dev/agents/agent-1"), "LEASE_STATE_RELEASED")

	// A revocation cuts the agent off within a second.
	code, _, _ = do(http.MethodGet, "http://127.0.0.1:"+u.Port()+"/v1/contacts", "ticket-2")
	require.Equal(t, http.StatusOK, code)
	admin("agent", "revoke", "spiffe://leasehold.dev/agents/agent-1", "--reason", "test")
	require.Eventually(t, func() bool {
		code, _, _ := do(http.MethodGet, "http://127.0.0.1:"+u.Port()+"/v1/contacts", "ticket-2")
		return code == http.StatusForbidden
	}, time.Second, 20*time.Millisecond)
	require.NotContains(t, logs.String(), canary, "nor does the proxy's log")
	// This test process is the agent: the key is in neither its environment
	// nor its arguments (the admin put it through a separate CLI process).
	require.NotContains(t, strings.Join(os.Environ(), "\n"), canary)
	require.NotContains(t, strings.Join(os.Args, " "), canary)
}

func flatten(h http.Header) []string {
	var out []string
	for k, vs := range h {
		out = append(out, k+": "+strings.Join(vs, ","))
	}
	return out
}

func TestProxyConfigIsChecked(t *testing.T) {
	dir := t.TempDir()
	for body, want := range map[string]string{
		"socket: /x\nroutes:\n  - host: a\n    credential: c\n    scopes: [r]\n":                                   "exactly one of bearer, basic, header",
		"socket: /x\nroutes:\n  - host: a\n    credential: c\n    scopes: [r]\n    bearer: k\n    basic: [u, p]\n": "exactly one",
		"routes: []\n": "socket is required",
		"socket: /x\nroutes:\n  - host: a\n    scopes: [r]\n    bearer: k\n": "needs host, credential and scopes",
		"socket: /x\nlisten: 0.0.0.0:80\n":                                   "field listen not found",
	} {
		p := filepath.Join(dir, "p.yaml")
		require.NoError(t, os.WriteFile(p, []byte(body), 0o600))
		_, _, err := loadProxyConfig(p)
		require.ErrorContains(t, err, want, body)
	}
}

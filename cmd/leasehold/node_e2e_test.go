package main

import (
	"crypto/sha256"
	"encoding/hex"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"testing"

	"github.com/stretchr/testify/require"
)

// The Node.js agent in examples/node, with the same protos and a dev SVID,
// acquires and releases a lease; agent-2 without a grant is refused.
func TestNodeClientRoundTrip(t *testing.T) {
	node, err := exec.LookPath("node")
	if err != nil || !fileExists("../../examples/node/node_modules/@grpc/grpc-js/package.json") {
		if os.Getenv("CI") == "true" {
			t.Fatal("node or examples/node/node_modules missing: run 'make tools' (CI must not skip this test)")
		}
		t.Skip("node or examples/node/node_modules missing; run 'make tools'")
	}
	dir := t.TempDir()
	addr := startDev(t, dir, "dev")
	dev := filepath.Join(dir, "dev")
	for _, args := range [][]string{
		{"credential", "put", "crm/salesforce", "--set", "api_key=CANARY-node-5"},
		{"grant", "create", "--credential", "crm/salesforce", "--spiffe-id", "spiffe://leasehold.dev/agents/agent-1", "--scopes", "read"},
	} {
		out, err := exec.Command(leaseholdBin, append([]string{"--addr", addr, "--dev-dir", dev, "--as", "admin"}, args...)...).CombinedOutput()
		require.NoError(t, err, "%s", out)
	}
	_, port, err := net.SplitHostPort(addr)
	require.NoError(t, err)
	run := func(as string) (string, error) {
		cmd := exec.Command(node, "../../examples/node/agent.js", "crm/salesforce", "read", "ticket-node")
		cmd.Env = append(os.Environ(), "LEASEHOLD_ADDR=localhost:"+port, "LEASEHOLD_DEV_DIR="+dev, "LEASEHOLD_AS="+as)
		out, err := cmd.CombinedOutput()
		return string(out), err
	}
	out, err := run("agent-1")
	require.NoError(t, err, out)
	require.Contains(t, out, "spiffe_id=spiffe://leasehold.dev/agents/agent-1")
	require.Regexp(t, `lease_id=ls_[0-9a-f]{32} state=LEASE_STATE_ACTIVE`, out)
	require.Contains(t, out, "released state=LEASE_STATE_RELEASED")
	sum := sha256.Sum256([]byte(`{"api_key":"CANARY-node-5"}`))
	require.Contains(t, out, "secret_sha256="+hex.EncodeToString(sum[:])[:16], "the Node agent got the secret")
	require.NotContains(t, out, "CANARY")

	out, err = run("agent-2")
	require.Error(t, err)
	require.Regexp(t, regexp.MustCompile(`error code=7 .*no grant allows`), out, "PermissionDenied (7) with the broker's message")
}

func fileExists(p string) bool { _, err := os.Stat(p); return err == nil }

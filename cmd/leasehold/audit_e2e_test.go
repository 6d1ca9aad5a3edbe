package main

import (
	"bufio"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// A security reviewer's session: reports that match the records, explain,
// a checkpoint kept outside and verified later, and a live watch.
func TestAuditCommandsAgainstDevBroker(t *testing.T) {
	dir := t.TempDir()
	addr := startDev(t, dir, "dev")
	cli := func(as string, args ...string) (string, error) {
		t.Helper()
		cmd := exec.Command(leaseholdBin, append([]string{"--addr", addr, "--dev-dir", filepath.Join(dir, "dev"), "--as", as}, args...)...)
		out, err := cmd.CombinedOutput()
		return string(out), err
	}
	must := func(as string, args ...string) string {
		t.Helper()
		out, err := cli(as, args...)
		require.NoError(t, err, out)
		return out
	}
	const a1, a2 = "spiffe://leasehold.dev/agents/agent-1", "spiffe://leasehold.dev/agents/agent-2"
	must("admin", "credential", "put", "crm/x", "--set", "k=v")
	must("admin", "grant", "create", "--credential", "crm/x", "--spiffe-id", a1, "--scopes", "read")
	var leases []string
	for _, task := range []string{"t-1", "t-2", "t-3"} {
		out := must("agent-1", "acquire", "crm/x", "--scopes", "read", "--task", task, "--format", "env")
		id := strings.Trim(strings.TrimPrefix(strings.Split(out, "\n")[0], "LEASEHOLD_LEASE_ID="), "'")
		leases = append(leases, id)
	}
	must("agent-1", "release", leases[0])
	for range 2 {
		_, err := cli("agent-2", "acquire", "crm/x", "--scopes", "read", "--task", "t-9")
		require.Error(t, err)
	}

	var rep report
	require.NoError(t, json.Unmarshal([]byte(must("admin", "report", "agent", a1, "--since", "1h", "--json")), &rep))
	require.Len(t, rep.Grants, 1)
	require.Equal(t, []accessRow{{Key: "crm/x", Acquired: 3, Released: 1, Tasks: []string{"t-1", "t-2", "t-3"}, Last: rep.Access[0].Last}}, rep.Access)
	require.NoError(t, json.Unmarshal([]byte(must("admin", "report", "credential", "crm/x", "--json")), &rep))
	require.Len(t, rep.Access, 2)
	require.Equal(t, a1, rep.Access[0].Key)
	require.Equal(t, 3, rep.Access[0].Acquired)
	require.Equal(t, a2, rep.Access[1].Key)
	require.Equal(t, 2, rep.Access[1].Denied)
	require.Equal(t, []string{"t-9"}, rep.Access[1].Tasks)
	table := must("admin", "report", "credential", "crm/x")
	require.Contains(t, table, "Who accessed it")
	require.Contains(t, table, a2)

	out, _ := cli("admin", "explain", a2, "crm/x", "--scopes", "read")
	require.Contains(t, out, "DENIED (PermissionDenied): no grant allows "+a2)
	out = must("admin", "explain", a1, "crm/x", "--scopes", "read")
	require.Contains(t, out, "ALLOWED (OK)")

	cp := filepath.Join(dir, "checkpoint.json")
	require.NoError(t, os.WriteFile(cp, []byte(must("admin", "audit", "checkpoint")), 0o600))
	out = must("admin", "audit", "verify", "--checkpoint", cp)
	require.Contains(t, out, "audit chain OK")
	require.Contains(t, out, "1 checkpoints matched")

	// A live watch sees a new acquire. It starts after the current head, so
	// it sees the record whether it connects before or after the write.
	var head struct{ Sequence string }
	require.NoError(t, json.Unmarshal([]byte(must("admin", "audit", "checkpoint")), &head))
	watch := exec.Command(leaseholdBin, "--addr", addr, "--dev-dir", filepath.Join(dir, "dev"), "--as", "admin",
		"audit", "watch", "--after", head.Sequence, "--agent", a1, "--format", "json")
	stdout, err := watch.StdoutPipe()
	require.NoError(t, err)
	require.NoError(t, watch.Start())
	defer func() { _ = watch.Process.Kill(); _ = watch.Wait() }()
	lines := make(chan string, 10)
	go func() {
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			lines <- sc.Text()
		}
	}()
	must("agent-1", "acquire", "crm/x", "--scopes", "read", "--task", "live-1")
	select {
	case line := <-lines:
		require.Contains(t, line, `"taskId":"live-1"`)
		require.Contains(t, line, "AUDIT_EVENT_LEASE_ACQUIRE")
	case <-time.After(10 * time.Second):
		t.Fatal("the watch did not show the new record")
	}
}

package main

import (
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// Rotation as a new user sets it up: a rotator script following the
// documented contract, `credential put --backend exec --rotate-every`, and
// the CLI showing new versions while an agent keeps acquiring by name.
func TestScheduledRotationWithTheCLI(t *testing.T) {
	dir := t.TempDir()
	dev := filepath.Join(dir, "dev")
	addr := startDev(t, dir, dev, "LEASEHOLD_ROTATOR_EXEC_DIR="+dir) // rotators may only run from there
	upstream := filepath.Join(dir, "upstream")
	require.NoError(t, os.MkdirAll(upstream, 0o700))
	require.NoError(t, os.WriteFile(filepath.Join(upstream, "k-initial"), nil, 0o600))
	rotator := filepath.Join(dir, "rotate-crm-key")
	require.NoError(t, os.WriteFile(rotator, []byte(`#!/bin/sh
# Example rotator: the "upstream" is a directory with one file per valid key.
set -e
in=$(cat)
up=`+upstream+`
field() { printf '%s' "$in" | sed -n "s/.*\"$1\": *{[^}]*\"api_key\": *\"\([^\"]*\)\".*/\1/p"; }
case "$1" in
  create) id=$(printf '%s' "$in" | sed -n 's/.*"rotation_id": *"\([^"]*\)".*/\1/p')
          touch "$up/k-$id"; printf '{"secret": {"api_key": "k-%s"}}' "$id" ;;
  verify) test -e "$up/$(field next)" ;;
  retire) rm -f "$up/$(field old)" ;;
  *) exit 2 ;;
esac
`), 0o700))

	cli := func(as string, args ...string) string {
		t.Helper()
		out, err := exec.Command(leaseholdBin, append([]string{"--addr", addr, "--dev-dir", dev, "--as", as}, args...)...).CombinedOutput()
		require.NoError(t, err, "%s", out)
		return string(out)
	}
	cli("admin", "credential", "put", "crm/api", "--backend", "exec", "--config", "command="+rotator,
		"--set", "api_key=k-initial", "--rotate-every", "2s", "--rotation-overlap", "1s")
	cli("admin", "grant", "create", "--credential", "crm/api", "--spiffe-id", "spiffe://leasehold.dev/agents/agent-1", "--scopes", "read")

	keys := map[string]bool{}
	deadline := time.Now().Add(90 * time.Second)
	for i := 0; time.Now().Before(deadline); i++ {
		var l struct {
			Secret map[string]string `json:"secret"`
		}
		out := cli("agent-1", "acquire", "crm/api", "--scopes", "read", "--task", "sync-"+strings.Repeat("x", i%5+1)+time.Now().Format("150405.000"), "--format", "json")
		require.NoError(t, json.Unmarshal([]byte(out[strings.Index(out, "{"):]), &l))
		key := l.Secret["api_key"]
		_, err := os.Stat(filepath.Join(upstream, key))
		require.NoError(t, err, "the key handed out (%s) is valid upstream", key)
		keys[key] = true
		var c struct {
			Credential struct {
				CurrentVersion string `json:"currentVersion"`
			} `json:"credential"`
		}
		out = cli("admin", "credential", "get", "crm/api")
		require.NoError(t, json.Unmarshal([]byte(out[strings.Index(out, "{"):]), &c))
		if v, _ := strconv.Atoi(c.Credential.CurrentVersion); v >= 3 && len(keys) >= 3 {
			break
		}
		time.Sleep(200 * time.Millisecond)
	}
	require.GreaterOrEqual(t, len(keys), 3, "the agent saw the rotations without any change on its side")
	out := cli("admin", "credential", "get", "crm/api")
	require.Contains(t, out, "rotationState")
	require.Contains(t, out, "nextDue")
	_, err := os.Stat(filepath.Join(upstream, "k-initial"))
	require.True(t, os.IsNotExist(err), "the first key was retired upstream")
}

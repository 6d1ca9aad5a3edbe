package auditsink_test

import (
	"bufio"
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/leasehold/leasehold/server/auditsink"
	"github.com/leasehold/leasehold/store"
)

func TestFileSinkWritesStableJSONLines(t *testing.T) {
	path := filepath.Join(t.TempDir(), "audit.jsonl")
	sink := &auditsink.File{Path: path}
	at := time.Date(2026, 11, 25, 12, 0, 0, 5, time.UTC)
	recs := []*store.AuditRecord{
		{Sequence: 1, Time: at, Event: store.EventLeaseAcquire, Decision: store.Allow, AgentID: "spiffe://td/a",
			Credential: "crm/x", Scopes: []string{"read"}, TaskID: "t-1", LeaseID: "ls_1", Hash: []byte{0xab}},
		{Sequence: 2, Time: at, Event: store.EventLeaseAcquire, Decision: store.Deny, PrevHash: []byte{0xab}, Hash: []byte{0xcd}},
	}
	require.NoError(t, sink.Write(context.Background(), recs[:1]))
	require.NoError(t, os.Rename(path, path+".1"), "a rotator moves the file away")
	require.NoError(t, sink.Write(context.Background(), recs[1:]))

	read := func(p string) []map[string]any {
		f, err := os.Open(p)
		require.NoError(t, err)
		defer f.Close()
		var out []map[string]any
		sc := bufio.NewScanner(f)
		for sc.Scan() {
			var m map[string]any
			require.NoError(t, json.Unmarshal(sc.Bytes(), &m))
			out = append(out, m)
		}
		return out
	}
	first := read(path + ".1")
	require.Len(t, first, 1)
	require.Equal(t, map[string]any{
		"sequence": float64(1), "time": "2026-11-25T12:00:00.000000005Z", "event": "lease.acquire", "decision": "allow",
		"agent_id": "spiffe://td/a", "credential": "crm/x", "scopes": []any{"read"}, "task_id": "t-1", "lease_id": "ls_1",
		"hash": "ab",
	}, first[0], "field names are a stable interface")
	second := read(path)
	require.Len(t, second, 1)
	require.Equal(t, "ab", second[0]["prev_hash"])
	st, err := os.Stat(path)
	require.NoError(t, err)
	require.Equal(t, os.FileMode(0o600), st.Mode().Perm())
}

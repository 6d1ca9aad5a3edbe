package main

import (
	"bytes"
	"path/filepath"
	"regexp"
	"testing"

	"github.com/stretchr/testify/require"
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

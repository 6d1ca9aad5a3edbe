package main

import (
	"os/exec"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

const module = "github.com/leasehold/leasehold"

// TestDependencyDirection holds the import rules of docs/design.md for
// non-test code: store and its engines stay below the server, the server
// never picks a concrete engine or backend, the client never reaches into
// the server or the store, and only cmd/ wires things together.
func TestDependencyDirection(t *testing.T) {
	out, err := exec.Command("go", "list", "-f", `{{.ImportPath}} {{join .Imports " "}}`, module+"/...").Output()
	require.NoError(t, err)
	internal := func(p string) bool { return strings.HasPrefix(p, module+"/") }
	rel := func(p string) string { return strings.TrimPrefix(p, module+"/") }
	stdlib := func(p string) bool { return !strings.Contains(strings.SplitN(p, "/", 2)[0], ".") }
	under := func(p, dir string) bool { return p == dir || strings.HasPrefix(p, dir+"/") }

	checked := 0
	for _, line := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		fields := strings.Fields(line)
		pkg, imports := rel(fields[0]), fields[1:]
		for _, imp := range imports {
			ri := rel(imp)
			bad := ""
			switch {
			case !under(pkg, "cmd") && internal(imp) && (under(ri, "cmd") || under(ri, "server")) && !under(pkg, "server"):
				bad = "only cmd/ imports cmd/ or server/"
			case pkg == "store" && !stdlib(imp):
				bad = "the store interface uses the standard library only"
			case under(pkg, "store") && internal(imp) && ri != "store" && ri != "store/internal/kv":
				bad = "store engines import only store and the shared record layout"
			case pkg == "backends" && !stdlib(imp):
				bad = "the backends interface uses the standard library only"
			case under(pkg, "backends") && internal(imp) && ri != "backends":
				bad = "a backend imports only backends and its own SDK"
			case under(pkg, "identity") && internal(imp):
				bad = "identity imports nothing of ours"
			case under(pkg, "server") && internal(imp) &&
				(under(ri, "store/bolt") || under(ri, "store/etcd") || under(ri, "store/internal") || (under(ri, "backends") && ri != "backends") || under(ri, "client")):
				bad = "server uses interfaces, never a concrete engine, backend or the client"
			case pkg == "server" && under(ri, "server/auditsink"):
				bad = "the server uses the AuditSink interface; cmd/ picks the sinks"
			case under(pkg, "server/auditsink") && internal(imp) && ri != "store":
				bad = "sinks import only store's record types"
			case under(pkg, "client") && internal(imp) && !under(ri, "proto") && !under(ri, "identity"):
				bad = "client imports only proto and identity"
			}
			require.Empty(t, bad, "%s imports %s: %s", pkg, imp, bad)
			checked++
		}
	}
	require.Greater(t, checked, 50, "sanity: imports were listed")
}

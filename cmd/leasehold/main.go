// Command leasehold runs the Leasehold credential broker and talks to it.
//
//	leasehold serve --config leasehold.yaml     run a broker
//	leasehold dev --dir DIR                      run a dev broker with a dev CA
//	leasehold [connection flags] VERB ...        admin and agent verbs
//
// Run "leasehold help" for the verbs.
package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"
)

const usage = `Usage: leasehold [connection flags] COMMAND [flags] [args]

Broker:
  serve --config FILE              run the broker (flags and LEASEHOLD_* env override the file)
  dev --dir DIR --listen ADDR      run a dev broker with a dev CA, SVIDs and KEK under DIR

Agent (caller is the SVID in the connection flags):
  acquire CREDENTIAL --scopes S --task ID [--purpose P] [--ttl D] [--format json|env]
  renew LEASE_ID [--ttl D]
  release LEASE_ID
  delegate CREDENTIAL --task ID --subtask S --to SPIFFE_ID --scopes S --ttl D [--max-ttl D]
                                   give a sub-agent part of your grant for a subtask
  undelegate GRANT_ID --reason R   delete a grant you delegated, and everything below it
  whoami
  health
  proxy --config FILE              a sidecar: agents send plain HTTP over a unix socket, the proxy
                                   adds the leased credential and forwards over TLS

Admin:
  credential put NAME [--backend static] [--set k=v]... [--set-file k=PATH]... [--config k=v]... [--description D]
                 [--rotate-every D [--rotation-overlap D]]   (exec backend: scheduled two-phase rotation)
  credential get NAME | credential list | credential delete NAME | credential rotate NAME
  grant create --credential C (--spiffe-id ID | --spiffe-id-prefix ID) --scopes a,b [--max-ttl D] [--max-lifetime D]
               [--max-delegation-depth N] [--task ID] [--expires-in D]
               [--expected-credentials C1,C2 [--suspend-on-anomaly]]
  grant list [--credential C] | grant delete GRANT_ID
  agent revoke SPIFFE_ID --reason R | agent reinstate SPIFFE_ID | agent list [--revoked]
  lease list [--agent ID] [--task T] [--active] | lease revoke LEASE_ID [--reason R]
  task revoke TASK_ID --reason R   revoke every lease of a task and its subtasks (TASK_ID/...)
  task end TASK_ID                 (as an agent) release your leases for a task and its subtasks
  audit query [--agent ID] [--credential C] [--task T] [--lease L] [--trace ID] [--decision allow|deny]
              [--since D] [--until D] [--oldest-first] [--limit N] [--format table|json]
  audit watch [same filters] [--after SEQ | --from-now] [--format table|json]
  audit checkpoint                 print the chain head; keep it outside the broker
  audit verify [--from SEQ] [--to SEQ] [--checkpoint FILE]...
  explain SPIFFE_ID CREDENTIAL --scopes S [--ttl D]     would an acquire be allowed, and why
  report agent SPIFFE_ID [--since D] [--json]           what it may access and what it did access
  report credential NAME [--since D] [--json]           who may access it and who did

Connection flags (or env LEASEHOLD_ADDR, LEASEHOLD_CERT, LEASEHOLD_KEY, LEASEHOLD_BUNDLE):
  --addr HOST:PORT   broker address (default 127.0.0.1:8443)
  --cert, --key, --bundle FILE     SVID chain, key and trust bundle (PEM)
  --dev-dir DIR --as NAME          shorthand for DIR/NAME.pem, DIR/NAME-key.pem, DIR/bundle.pem
  With none of these, SPIFFE_ENDPOINT_SOCKET (the Workload API) is used.
`

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

func run(args []string, stdout, stderr io.Writer) int {
	err := dispatch(args, stdout, stderr)
	switch {
	case err == nil:
		return 0
	case errors.Is(err, flag.ErrHelp):
		return 0
	case errors.Is(err, errUsage):
		fmt.Fprintln(stderr, "leasehold:", err)
		fmt.Fprint(stderr, usage)
		return 2
	}
	fmt.Fprintln(stderr, "leasehold:", err)
	return 1
}

var errUsage = errors.New("usage")

func usageErr(format string, args ...any) error {
	return fmt.Errorf("%w: %s", errUsage, fmt.Sprintf(format, args...))
}

func dispatch(args []string, stdout, stderr io.Writer) error {
	gfs := flag.NewFlagSet("leasehold", flag.ContinueOnError)
	gfs.SetOutput(stderr)
	gfs.Usage = func() { fmt.Fprint(stderr, usage) }
	conn := registerConnFlags(gfs)
	if err := gfs.Parse(args); err != nil {
		return err
	}
	args = gfs.Args()
	if len(args) == 0 {
		return usageErr("no command")
	}
	verb, rest := args[0], args[1:]
	switch verb {
	case "help", "-h", "--help":
		fmt.Fprint(stdout, usage)
		return nil
	case "serve":
		return cmdServe(rest, stderr)
	case "dev":
		return cmdDev(rest, stdout, stderr)
	case "proxy":
		return cmdProxy(rest, conn, stderr)
	case "acquire", "renew", "release", "whoami", "health", "delegate", "undelegate":
		return cmdAgent(verb, rest, conn, stdout, stderr)
	case "audit", "report", "explain":
		return cmdAudit(verb, rest, conn, stdout, stderr)
	case "credential", "grant", "agent", "lease", "task":
		if len(rest) == 0 {
			return usageErr("%s needs a sub-command", verb)
		}
		return cmdAdmin(verb+" "+rest[0], rest[1:], conn, stdout, stderr)
	}
	return usageErr("unknown command %q", verb)
}

// parseInterleaved parses flags that may come before or after positional
// arguments, as in "credential put NAME --set k=v".
func parseInterleaved(fs *flag.FlagSet, args []string) ([]string, error) {
	var pos []string
	for {
		if err := fs.Parse(args); err != nil {
			return nil, err
		}
		args = fs.Args()
		if len(args) == 0 {
			return pos, nil
		}
		if args[0] == "--" {
			return append(pos, args[1:]...), nil
		}
		pos = append(pos, args[0])
		args = args[1:]
	}
}

func splitList(v string) []string {
	var out []string
	for _, s := range strings.Split(v, ",") {
		if s = strings.TrimSpace(s); s != "" {
			out = append(out, s)
		}
	}
	return out
}

// multiFlag collects a repeatable flag.
type multiFlag []string

func (m *multiFlag) String() string     { return strings.Join(*m, ",") }
func (m *multiFlag) Set(v string) error { *m = append(*m, v); return nil }

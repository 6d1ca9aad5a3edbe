// Command orchestrator is an example of a multi-agent task with Leasehold:
// an orchestrator holds grants for a task's credentials, splits the task
// into two subtasks, and delegates to each sub-agent (its own SPIFFE
// identity) only the credential and scope its subtask needs, for that
// subtask and ten minutes. Each sub-agent leases it, uses it and releases
// it; the orchestrator never leases anything and never sees a secret. A
// sub-agent that reaches for more is refused. All of it runs under one
// trace: set OTEL_TRACES_EXPORTER=otlp (and OTEL_EXPORTER_OTLP_ENDPOINT).
//
// Run it with `make example-orchestrator`, which starts a dev broker, stores
// the two credentials, grants them to the orchestrator with one level of
// delegation, and afterwards revokes the orchestrator to show the whole
// tree cut off.
package main

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"flag"
	"fmt"
	"log"
	"os"
	"path/filepath"
	"sync"
	"time"

	"go.opentelemetry.io/otel/exporters/otlp/otlptrace/otlptracegrpc"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/trace"
	"go.opentelemetry.io/otel/trace/noop"

	"github.com/leasehold/leasehold/client"
	"github.com/leasehold/leasehold/identity"
)

// subtask is one sub-agent's share of the work.
type subtask struct {
	agent      string // dev identity file name
	id         string
	credential string
	field      string
}

func main() {
	addr := flag.String("addr", "127.0.0.1:8443", "broker address")
	dir := flag.String("dev-dir", ".leasehold-dev", "directory written by 'leasehold dev'")
	flag.Parse()
	ctx := context.Background()

	var tp trace.TracerProvider = noop.NewTracerProvider()
	if os.Getenv("OTEL_TRACES_EXPORTER") == "otlp" {
		exp, err := otlptracegrpc.New(ctx)
		if err != nil {
			log.Fatal(err)
		}
		sdk := sdktrace.NewTracerProvider(sdktrace.WithBatcher(exp))
		defer func() {
			if err := sdk.Shutdown(ctx); err != nil {
				log.Printf("flushing traces: %v", err)
			}
		}()
		tp = sdk
	}
	connect := func(name string) *client.Client {
		src, err := identity.NewFileSource(identity.FileConfig{CertFile: filepath.Join(*dir, name+".pem"),
			KeyFile: filepath.Join(*dir, name+"-key.pem"), BundleFile: filepath.Join(*dir, "bundle.pem")})
		if err != nil {
			log.Fatal(err)
		}
		c, err := client.New(ctx, client.Config{Address: *addr, Source: src, TracerProvider: tp})
		if err != nil {
			log.Fatal(err)
		}
		return c
	}

	orchestrator := connect("orchestrator")
	defer orchestrator.Close()
	me, err := orchestrator.WhoAmI(ctx)
	if err != nil {
		log.Fatal(err)
	}
	ctx, span := tp.Tracer("orchestrator").Start(ctx, "task report-42")
	defer span.End()
	fmt.Printf("orchestrator %s starts task report-42\n", me)
	if span.SpanContext().IsValid() {
		fmt.Printf("  trace %s\n", span.SpanContext().TraceID())
	}

	subtasks := []subtask{
		{agent: "agent-1", id: "report-42/crm", credential: "crm/salesforce", field: "api_key"},
		{agent: "agent-2", id: "report-42/db", credential: "db/warehouse", field: "password"},
	}
	const me2 = "spiffe://leasehold.dev/agents/"
	for _, st := range subtasks {
		g, err := orchestrator.Delegate(ctx, client.Delegation{Credential: st.credential, TaskID: "report-42",
			Subtask: st.id[len("report-42/"):], To: me2 + st.agent, Scopes: []string{"read"}, TTL: 10 * time.Minute})
		if err != nil {
			log.Fatalf("delegate %s to %s: %v", st.credential, st.agent, err)
		}
		fmt.Printf("  delegated %s (read) to %s for %s until %s: grant %s\n", st.credential, st.agent, g.GetTaskId(),
			g.GetExpiresAt().AsTime().Format(time.TimeOnly), g.GetId())
	}
	var wg sync.WaitGroup
	results := make([]string, len(subtasks))
	for i, st := range subtasks {
		wg.Add(1)
		go func() { // in production each sub-agent is its own process with its own SVID
			defer wg.Done()
			c := connect(st.agent)
			defer c.Close()
			err := c.WithLease(ctx, st.credential, client.AcquireOptions{Scopes: []string{"read"}, TaskID: st.id,
				Purpose: "quarterly report"}, func(l *client.Lease) error {
				v, err := l.Get(st.field)
				if err != nil {
					return err
				}
				sum := sha256.Sum256([]byte(v)) // stands for calling the upstream with it
				results[i] = fmt.Sprintf("%s did %s with %s (lease %s, key sha256 %s…)", st.agent, st.id, st.credential, l.ID, hex.EncodeToString(sum[:4]))
				return nil
			})
			if err != nil {
				results[i] = fmt.Sprintf("%s could not do %s: %v", st.agent, st.id, err)
			}
		}()
	}
	wg.Wait()
	for _, r := range results {
		fmt.Println("  " + r)
	}
	// Escalation attempts by a sub-agent: the other sub-agent's credential,
	// a scope it was not given, a task outside its subtask, delegating on.
	a1 := connect("agent-1")
	defer a1.Close()
	for _, try := range []struct {
		what string
		run  func() error
	}{
		{"db/warehouse", func() error {
			_, err := a1.Acquire(ctx, "db/warehouse", client.AcquireOptions{Scopes: []string{"read"}, TaskID: "report-42/crm"})
			return err
		}},
		{"crm/salesforce write", func() error {
			_, err := a1.Acquire(ctx, "crm/salesforce", client.AcquireOptions{Scopes: []string{"write"}, TaskID: "report-42/crm"})
			return err
		}},
		{"crm/salesforce outside its subtask", func() error {
			_, err := a1.Acquire(ctx, "crm/salesforce", client.AcquireOptions{Scopes: []string{"read"}, TaskID: "report-43"})
			return err
		}},
		{"delegating on to agent-2", func() error {
			_, err := a1.Delegate(ctx, client.Delegation{Credential: "crm/salesforce", TaskID: "report-42/crm", Subtask: "more",
				To: me2 + "agent-2", Scopes: []string{"read"}, TTL: time.Minute})
			return err
		}},
	} {
		if err := try.run(); err != nil {
			fmt.Printf("agent-1 is refused %s: %v\n", try.what, err)
		} else {
			fmt.Printf("agent-1 was allowed %s (unexpected)\n", try.what)
		}
	}
}

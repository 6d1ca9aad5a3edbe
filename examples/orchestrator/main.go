// Command orchestrator is an example of a multi-agent task with Leasehold:
// an orchestrator splits a report into two subtasks and hands each to a
// sub-agent with its own SPIFFE identity. Each sub-agent leases only the
// credential its subtask needs, uses it and releases it; the orchestrator
// never touches their secrets. All of it runs under one trace: set
// OTEL_TRACES_EXPORTER=otlp (and OTEL_EXPORTER_OTLP_ENDPOINT) to see it.
//
// Run it with `make example-orchestrator`, which starts a dev broker,
// stores the two credentials and grants each sub-agent its own.
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
		defer sdk.Shutdown(ctx)
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
	// The orchestrator holds no grant of its own: it cannot lease what its
	// sub-agents use.
	if _, err := orchestrator.Acquire(ctx, "crm/salesforce", client.AcquireOptions{Scopes: []string{"read"}, TaskID: "report-42"}); err != nil {
		fmt.Printf("orchestrator itself is refused crm/salesforce: %v\n", err)
	}
}

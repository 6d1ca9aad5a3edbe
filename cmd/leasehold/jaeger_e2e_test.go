package main

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/exporters/otlp/otlptrace/otlptracegrpc"
	"go.opentelemetry.io/otel/sdk/resource"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"

	"github.com/leasehold/leasehold/client"
	"github.com/leasehold/leasehold/identity"
)

func freePort(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

func jaegerPath(t *testing.T) string { return toolPath(t, "LEASEHOLD_JAEGER", "jaeger") }

// startJaeger runs Jaeger all-in-one with in-memory storage, every endpoint
// on loopback, and returns its OTLP gRPC and query HTTP addresses.
func startJaeger(t *testing.T) (otlp, query string) {
	t.Helper()
	bin := jaegerPath(t)
	dir := t.TempDir()
	otlpGRPC, otlpHTTP, queryHTTP, queryGRPC, health := freePort(t), freePort(t), freePort(t), freePort(t), freePort(t)
	config := fmt.Sprintf(`service:
  extensions: [jaeger_storage, jaeger_query, healthcheckv2]
  pipelines:
    traces:
      receivers: [otlp]
      exporters: [jaeger_storage_exporter]
  telemetry:
    metrics:
      level: none
    logs:
      level: warn
extensions:
  jaeger_query:
    storage:
      traces: mem
    http:
      endpoint: 127.0.0.1:%d
    grpc:
      endpoint: 127.0.0.1:%d
  jaeger_storage:
    backends:
      mem:
        memory:
          max_traces: 10000
  healthcheckv2:
    use_v2: true
    http:
      endpoint: 127.0.0.1:%d
receivers:
  otlp:
    protocols:
      grpc:
        endpoint: 127.0.0.1:%d
      http:
        endpoint: 127.0.0.1:%d
exporters:
  jaeger_storage_exporter:
    trace_storage: mem
`, queryHTTP, queryGRPC, health, otlpGRPC, otlpHTTP)
	path := filepath.Join(dir, "jaeger.yaml")
	require.NoError(t, os.WriteFile(path, []byte(config), 0o600))
	cmd := exec.Command(bin, "--config", "file:"+path)
	logs := &lockedBuffer{}
	cmd.Stdout, cmd.Stderr = logs, logs
	require.NoError(t, cmd.Start())
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	query = fmt.Sprintf("127.0.0.1:%d", queryHTTP)
	require.Eventually(t, func() bool {
		resp, err := http.Get("http://" + query + "/api/services")
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusOK
	}, 60*time.Second, 100*time.Millisecond, "jaeger did not start:\n%s", logs)
	return fmt.Sprintf("127.0.0.1:%d", otlpGRPC), query
}

type jaegerTrace struct {
	Data []struct {
		Spans []struct {
			SpanID        string `json:"spanID"`
			OperationName string `json:"operationName"`
			ProcessID     string `json:"processID"`
			References    []struct {
				RefType string `json:"refType"`
				SpanID  string `json:"spanID"`
			} `json:"references"`
		} `json:"spans"`
		Processes map[string]struct {
			ServiceName string `json:"serviceName"`
		} `json:"processes"`
	} `json:"data"`
}

// An SRE points the broker at Jaeger: the orchestrator's task span, the
// client's spans and the broker's spans arrive as one trace, in order.
func TestTraceRoundTripThroughJaeger(t *testing.T) {
	otlpAddr, query := startJaeger(t)
	dir := t.TempDir()
	addr := startDev(t, dir, "dev", "OTEL_TRACES_EXPORTER=otlp", "OTEL_EXPORTER_OTLP_ENDPOINT=http://"+otlpAddr,
		"OTEL_EXPORTER_OTLP_PROTOCOL=grpc", "OTEL_BSP_SCHEDULE_DELAY=100", "OTEL_SERVICE_NAME=leasehold-e2e")
	dev := filepath.Join(dir, "dev")
	for _, args := range [][]string{
		{"credential", "put", "crm/salesforce", "--set", "api_key=CANARY-jaeger-1"},
		{"grant", "create", "--credential", "crm/salesforce", "--spiffe-id", "spiffe://leasehold.dev/agents/agent-1", "--scopes", "read"},
	} {
		out, err := exec.Command(leaseholdBin, append([]string{"--addr", addr, "--dev-dir", dev, "--as", "admin"}, args...)...).CombinedOutput()
		require.NoError(t, err, "%s", out)
	}

	// The orchestrator: its own tracer provider exporting to the same Jaeger.
	ctx := context.Background()
	exp, err := otlptracegrpc.New(ctx, otlptracegrpc.WithEndpoint(otlpAddr), otlptracegrpc.WithInsecure())
	require.NoError(t, err)
	res, err := resource.New(ctx, resource.WithAttributes(attribute.String("service.name", "orchestrator")))
	require.NoError(t, err)
	tp := sdktrace.NewTracerProvider(sdktrace.WithSyncer(exp), sdktrace.WithResource(res))
	src, err := identity.NewFileSource(identity.FileConfig{CertFile: filepath.Join(dev, "agent-1.pem"),
		KeyFile: filepath.Join(dev, "agent-1-key.pem"), BundleFile: filepath.Join(dev, "bundle.pem")})
	require.NoError(t, err)
	defer src.Close()
	c, err := client.New(ctx, client.Config{Address: addr, Source: src, TracerProvider: tp})
	require.NoError(t, err)
	defer c.Close()
	taskCtx, task := tp.Tracer("orchestrator").Start(ctx, "task ticket-4711")
	_, err = c.Acquire(taskCtx, "crm/salesforce", client.AcquireOptions{Scopes: []string{"read"}, TaskID: "ticket-4711"})
	require.NoError(t, err)
	task.End()
	require.NoError(t, tp.Shutdown(ctx))
	traceID := task.SpanContext().TraceID().String()

	var tr jaegerTrace
	byName := map[string]string{} // operation → span id
	parent := map[string]string{} // span id → parent span id
	service := map[string]string{}
	require.Eventually(t, func() bool {
		resp, err := http.Get("http://" + query + "/api/traces/" + traceID)
		if err != nil {
			return false
		}
		defer resp.Body.Close()
		tr = jaegerTrace{}
		if json.NewDecoder(resp.Body).Decode(&tr) != nil || len(tr.Data) != 1 {
			return false
		}
		for _, s := range tr.Data[0].Spans {
			byName[tr.Data[0].Processes[s.ProcessID].ServiceName+" "+s.OperationName] = s.SpanID
			service[s.SpanID] = tr.Data[0].Processes[s.ProcessID].ServiceName
			for _, r := range s.References {
				if r.RefType == "CHILD_OF" {
					parent[s.SpanID] = r.SpanID
				}
			}
		}
		_, ok := byName["leasehold-e2e backend.issue"]
		return ok
	}, 30*time.Second, 200*time.Millisecond, "the broker's spans reached Jaeger in the task's trace")

	chain := []string{
		"orchestrator task ticket-4711",
		"orchestrator leasehold.client.Acquire",
		"orchestrator leasehold.v1.BrokerService/AcquireLease",
		"leasehold-e2e leasehold.v1.BrokerService/AcquireLease",
		"leasehold-e2e lease.acquire",
		"leasehold-e2e backend.issue",
	}
	for i := 1; i < len(chain); i++ {
		child, ok := byName[chain[i]]
		require.True(t, ok, "missing span %q in %v", chain[i], byName)
		require.Equal(t, byName[chain[i-1]], parent[child], "%q is a child of %q", chain[i], chain[i-1])
	}
	raw, err := json.Marshal(tr)
	require.NoError(t, err)
	require.NotContains(t, string(raw), "CANARY")

	out, err := exec.Command(leaseholdBin, "--addr", addr, "--dev-dir", dev, "--as", "admin", "audit", "query",
		"--trace", traceID, "--format", "json").CombinedOutput()
	require.NoError(t, err, "%s", out)
	require.Contains(t, string(out), "ticket-4711", "the trace id finds the acquire's audit record")
	require.Contains(t, string(out), traceID)
}

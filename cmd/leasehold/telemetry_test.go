package main

import (
	"bytes"
	"context"
	"testing"

	"github.com/stretchr/testify/require"
)

func TestTracingFromTheEnvironment(t *testing.T) {
	ctx := context.Background()
	env := func(m map[string]string) string {
		for _, k := range []string{"OTEL_TRACES_EXPORTER", "OTEL_EXPORTER_OTLP_PROTOCOL", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
			"OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_SERVICE_NAME", "OTEL_RESOURCE_ATTRIBUTES"} {
			t.Setenv(k, m[k])
		}
		return "none"
	}

	tp, _, err := setupTracing(ctx, env(nil), nil)
	require.NoError(t, err)
	require.Nil(t, tp, "off unless asked for")

	var out bytes.Buffer
	tp, shutdown, err := setupTracing(ctx, env(map[string]string{"OTEL_TRACES_EXPORTER": "console",
		"OTEL_SERVICE_NAME": "broker-eu1", "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=test"}), &out)
	require.NoError(t, err)
	_, span := tp.Tracer("t").Start(ctx, "probe-span")
	span.End()
	require.NoError(t, shutdown(ctx))
	require.Contains(t, out.String(), "probe-span")
	require.Contains(t, out.String(), "broker-eu1")
	require.Contains(t, out.String(), "deployment.environment")

	for _, proto := range []string{"grpc", "http/protobuf"} {
		tp, shutdown, err := setupTracing(ctx, env(map[string]string{"OTEL_TRACES_EXPORTER": "otlp",
			"OTEL_EXPORTER_OTLP_PROTOCOL": proto, "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:1"}), nil)
		require.NoError(t, err, proto)
		require.NotNil(t, tp)
		_ = shutdown(ctx) // nothing listens; flushing may fail, configuring must not
	}
	_, _, err = setupTracing(ctx, env(map[string]string{"OTEL_TRACES_EXPORTER": "zipkin"}), nil)
	require.ErrorContains(t, err, "want otlp, console or none")
	_, _, err = setupTracing(ctx, env(map[string]string{"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "carrier-pigeon"}), nil)
	require.ErrorContains(t, err, "want grpc or http/protobuf")
}

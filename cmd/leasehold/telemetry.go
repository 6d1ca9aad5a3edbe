package main

import (
	"context"
	"fmt"
	"io"
	"os"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/exporters/otlp/otlptrace/otlptracegrpc"
	"go.opentelemetry.io/otel/exporters/otlp/otlptrace/otlptracehttp"
	"go.opentelemetry.io/otel/exporters/stdout/stdouttrace"
	"go.opentelemetry.io/otel/sdk/resource"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/trace"
)

// setupTracing builds the broker's tracer provider from the standard
// OpenTelemetry environment:
//
//	OTEL_TRACES_EXPORTER             otlp | console | none (default: def)
//	OTEL_EXPORTER_OTLP_PROTOCOL      grpc (default) | http/protobuf; also _TRACES_PROTOCOL
//	OTEL_EXPORTER_OTLP_ENDPOINT, OTEL_EXPORTER_OTLP_HEADERS, ...  read by the OTLP exporters
//	OTEL_TRACES_SAMPLER, OTEL_TRACES_SAMPLER_ARG                 read by the SDK
//	OTEL_SERVICE_NAME (default "leasehold"), OTEL_RESOURCE_ATTRIBUTES
//
// It returns a nil provider when tracing is off, and a shutdown func that
// flushes what is buffered.
func setupTracing(ctx context.Context, def string, console io.Writer) (trace.TracerProvider, func(context.Context) error, error) {
	noop := func(context.Context) error { return nil }
	kind := os.Getenv("OTEL_TRACES_EXPORTER")
	if kind == "" {
		kind = def
	}
	var exp sdktrace.SpanExporter
	var err error
	switch kind {
	case "none", "":
		return nil, noop, nil
	case "console":
		exp, err = stdouttrace.New(stdouttrace.WithWriter(console))
	case "otlp":
		proto := os.Getenv("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
		if proto == "" {
			proto = os.Getenv("OTEL_EXPORTER_OTLP_PROTOCOL")
		}
		switch proto {
		case "", "grpc":
			exp, err = otlptracegrpc.New(ctx)
		case "http/protobuf":
			exp, err = otlptracehttp.New(ctx)
		default:
			return nil, noop, fmt.Errorf("OTEL_EXPORTER_OTLP_PROTOCOL %q: want grpc or http/protobuf", proto)
		}
	default:
		return nil, noop, fmt.Errorf("OTEL_TRACES_EXPORTER %q: want otlp, console or none", kind)
	}
	if err != nil {
		return nil, noop, fmt.Errorf("trace exporter: %w", err)
	}
	res, err := resource.New(ctx, resource.WithAttributes(attribute.String("service.name", "leasehold")),
		resource.WithFromEnv(), resource.WithTelemetrySDK())
	if err != nil {
		return nil, noop, fmt.Errorf("trace resource: %w", err)
	}
	tp := sdktrace.NewTracerProvider(sdktrace.WithBatcher(exp), sdktrace.WithResource(res))
	return tp, tp.Shutdown, nil
}

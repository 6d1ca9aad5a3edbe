package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"time"

	prom "github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"go.opentelemetry.io/otel/exporters/otlp/otlpmetric/otlpmetricgrpc"
	"go.opentelemetry.io/otel/exporters/otlp/otlpmetric/otlpmetrichttp"
	otelprom "go.opentelemetry.io/otel/exporters/prometheus"
	"go.opentelemetry.io/otel/metric"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"

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

// setupMetrics builds the broker's meter provider: OTLP when
// OTEL_METRICS_EXPORTER=otlp (protocol as for traces), and a Prometheus
// /metrics endpoint on promListen when set. It returns a nil provider when
// both are off, and a shutdown func.
func setupMetrics(ctx context.Context, promListen string, log *slog.Logger) (metric.MeterProvider, func(context.Context) error, error) {
	noop := func(context.Context) error { return nil }
	var opts []sdkmetric.Option
	var closers []func(context.Context) error
	switch kind := os.Getenv("OTEL_METRICS_EXPORTER"); kind {
	case "", "none":
	case "otlp":
		proto := os.Getenv("OTEL_EXPORTER_OTLP_METRICS_PROTOCOL")
		if proto == "" {
			proto = os.Getenv("OTEL_EXPORTER_OTLP_PROTOCOL")
		}
		var exp sdkmetric.Exporter
		var err error
		switch proto {
		case "", "grpc":
			exp, err = otlpmetricgrpc.New(ctx)
		case "http/protobuf":
			exp, err = otlpmetrichttp.New(ctx)
		default:
			return nil, noop, fmt.Errorf("OTEL_EXPORTER_OTLP_PROTOCOL %q: want grpc or http/protobuf", proto)
		}
		if err != nil {
			return nil, noop, fmt.Errorf("metric exporter: %w", err)
		}
		opts = append(opts, sdkmetric.WithReader(sdkmetric.NewPeriodicReader(exp)))
	default:
		return nil, noop, fmt.Errorf("OTEL_METRICS_EXPORTER %q: want otlp or none", kind)
	}
	if promListen != "" {
		reg := prom.NewRegistry()
		exp, err := otelprom.New(otelprom.WithRegisterer(reg))
		if err != nil {
			return nil, noop, err
		}
		opts = append(opts, sdkmetric.WithReader(exp))
		if host, port, err := net.SplitHostPort(promListen); err == nil && host == "" {
			promListen = net.JoinHostPort("127.0.0.1", port) // no host: loopback, not every interface
		}
		lis, err := net.Listen("tcp", promListen)
		if err != nil {
			return nil, noop, fmt.Errorf("metrics.listen: %w", err)
		}
		mux := http.NewServeMux()
		mux.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
		srv := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
		go func() { _ = srv.Serve(lis) }()
		log.Info("prometheus metrics", "addr", lis.Addr().String(), "path", "/metrics")
		closers = append(closers, srv.Shutdown)
	}
	if len(opts) == 0 {
		return nil, noop, nil
	}
	res, err := resource.New(ctx, resource.WithAttributes(attribute.String("service.name", "leasehold")),
		resource.WithFromEnv(), resource.WithTelemetrySDK())
	if err != nil {
		return nil, noop, err
	}
	mp := sdkmetric.NewMeterProvider(append(opts, sdkmetric.WithResource(res))...)
	closers = append(closers, mp.Shutdown)
	return mp, func(ctx context.Context) error {
		var errs []error
		for _, c := range closers {
			errs = append(errs, c(ctx))
		}
		return errors.Join(errs...)
	}, nil
}

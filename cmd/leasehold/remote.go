package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"go.opentelemetry.io/otel/propagation"
	"google.golang.org/grpc"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"

	"github.com/leasehold/leasehold/client"
	"github.com/leasehold/leasehold/identity"
)

type connFlags struct {
	addr, cert, key, bundle, devDir, as, serverID string
	timeout                                       time.Duration
}

func envOr(name, def string) string {
	if v := os.Getenv(name); v != "" {
		return v
	}
	return def
}

func registerConnFlags(fs *flag.FlagSet) *connFlags {
	c := &connFlags{}
	fs.StringVar(&c.addr, "addr", envOr("LEASEHOLD_ADDR", "127.0.0.1:8443"), "broker address")
	fs.StringVar(&c.cert, "cert", os.Getenv("LEASEHOLD_CERT"), "SVID certificate chain (PEM)")
	fs.StringVar(&c.key, "key", os.Getenv("LEASEHOLD_KEY"), "SVID private key (PEM)")
	fs.StringVar(&c.bundle, "bundle", os.Getenv("LEASEHOLD_BUNDLE"), "trust bundle (PEM)")
	fs.StringVar(&c.devDir, "dev-dir", os.Getenv("LEASEHOLD_DEV_DIR"), "dev directory written by 'leasehold dev'")
	fs.StringVar(&c.as, "as", os.Getenv("LEASEHOLD_AS"), "identity in --dev-dir: admin, agent-1, agent-2")
	fs.StringVar(&c.serverID, "server-id", os.Getenv("LEASEHOLD_SERVER_ID"), "accept only this SPIFFE ID for the broker")
	fs.DurationVar(&c.timeout, "timeout", 30*time.Second, "per-call timeout")
	return c
}

func (c *connFlags) source(ctx context.Context) (identity.Source, error) {
	cert, key, bundle := c.cert, c.key, c.bundle
	if c.devDir != "" {
		if c.as == "" {
			return nil, usageErr("--dev-dir needs --as (admin, agent-1 or agent-2)")
		}
		cert, key, bundle = filepath.Join(c.devDir, c.as+".pem"), filepath.Join(c.devDir, c.as+"-key.pem"), filepath.Join(c.devDir, "bundle.pem")
	}
	if cert != "" || key != "" || bundle != "" {
		if cert == "" || key == "" || bundle == "" {
			return nil, usageErr("--cert, --key and --bundle go together")
		}
		return identity.NewFileSource(identity.FileConfig{CertFile: cert, KeyFile: key, BundleFile: bundle})
	}
	if os.Getenv("SPIFFE_ENDPOINT_SOCKET") == "" {
		return nil, errors.New("no identity: pass --cert/--key/--bundle, --dev-dir/--as, or set SPIFFE_ENDPOINT_SOCKET")
	}
	wctx, cancel := context.WithTimeout(ctx, c.timeout)
	defer cancel()
	return identity.NewWorkloadSource(wctx, "")
}

// dial connects with the chosen identity; the returned func closes both.
func (c *connFlags) dial(ctx context.Context) (*grpc.ClientConn, func(), error) {
	src, err := c.source(ctx)
	if err != nil {
		return nil, nil, err
	}
	cfg := client.Config{Address: c.addr, Source: src}
	if c.serverID != "" {
		if cfg.ServerID, err = spiffeid.FromString(c.serverID); err != nil {
			src.Close()
			return nil, nil, fmt.Errorf("--server-id: %w", err)
		}
	}
	conn, err := client.Dial(cfg)
	if err != nil {
		src.Close()
		return nil, nil, err
	}
	return conn, func() { conn.Close(); src.Close() }, nil
}

// callContext is the context for the CLI's RPCs: it joins the trace named
// by the TRACEPARENT (and TRACESTATE) environment variables, the
// OpenTelemetry convention for command-line tools, so a script's calls for
// one task land in one trace.
func callContext(ctx context.Context, timeout time.Duration) (context.Context, context.CancelFunc) {
	carrier := propagation.MapCarrier{}
	if tp := os.Getenv("TRACEPARENT"); tp != "" {
		carrier.Set("traceparent", tp)
		carrier.Set("tracestate", os.Getenv("TRACESTATE"))
		ctx = propagation.TraceContext{}.Extract(ctx, carrier)
	}
	if timeout <= 0 {
		return context.WithCancel(ctx)
	}
	return context.WithTimeout(ctx, timeout)
}

var jsonOut = protojson.MarshalOptions{Multiline: true, Indent: "  ", EmitUnpopulated: false}

func printProto(w interface{ Write([]byte) (int, error) }, m proto.Message) error {
	b, err := jsonOut.Marshal(m)
	if err != nil {
		return err
	}
	_, err = w.Write(append(b, '\n'))
	return err
}

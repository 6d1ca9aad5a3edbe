package identity

import (
	"context"
	"fmt"
	"os"

	"github.com/spiffe/go-spiffe/v2/workloadapi"
)

// NewWorkloadSource connects to the SPIFFE Workload API (a SPIRE agent, for
// example) and keeps the SVID and bundles it streams. addr is a
// "unix:///path" socket address; empty means the SPIFFE_ENDPOINT_SOCKET
// environment variable. It returns once the first SVID has arrived or ctx
// ends.
func NewWorkloadSource(ctx context.Context, addr string) (Source, error) {
	var opts []workloadapi.X509SourceOption
	if addr != "" {
		opts = append(opts, workloadapi.WithClientOptions(workloadapi.WithAddr(addr)))
	}
	src, err := workloadapi.NewX509Source(ctx, opts...)
	if err != nil {
		if ctx.Err() != nil {
			// The agent answers an unregistered workload with "no identity
			// issued" and go-spiffe keeps retrying until ctx ends.
			return nil, fmt.Errorf("workload API %s: no SVID arrived (is this workload registered for its selectors?): %w", addrOrEnv(addr), err)
		}
		return nil, fmt.Errorf("workload API %s: %w", addrOrEnv(addr), err)
	}
	return src, nil
}

func addrOrEnv(addr string) string {
	if addr != "" {
		return addr
	}
	return "$SPIFFE_ENDPOINT_SOCKET (" + os.Getenv("SPIFFE_ENDPOINT_SOCKET") + ")"
}

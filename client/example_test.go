package client_test

import (
	"context"
	"errors"
	"fmt"
	"log"
	"time"

	"github.com/leasehold/leasehold/client"
	"github.com/leasehold/leasehold/identity"
)

// An agent leases a credential for one task, uses it and releases it. The
// agent's identity comes from PEM files here; under SPIRE use
// identity.NewWorkloadSource(ctx, "") instead.
func Example() {
	ctx := context.Background()
	src, err := identity.NewFileSource(identity.FileConfig{
		CertFile: ".leasehold-dev/agent-1.pem", KeyFile: ".leasehold-dev/agent-1-key.pem",
		BundleFile: ".leasehold-dev/bundle.pem",
	})
	if err != nil {
		log.Fatal(err)
	}
	defer src.Close()

	c, err := client.New(ctx, client.Config{Address: "127.0.0.1:8443", Source: src})
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close()

	lease, err := c.Acquire(ctx, "crm/salesforce", client.AcquireOptions{
		Scopes:  []string{"read"},
		TTL:     2 * time.Minute,
		TaskID:  "ticket-4711",
		Purpose: "sync contacts",
	})
	switch {
	case errors.Is(err, client.ErrDenied):
		log.Fatal("no grant for this agent: ", err)
	case err != nil:
		log.Fatal(err)
	}
	defer c.Release(ctx, lease.ID)

	apiKey, _ := lease.Get("api_key")
	_ = apiKey // call the CRM with it; never log it
	fmt.Println("lease", lease.ID, "expires", lease.ExpiresAt)
}

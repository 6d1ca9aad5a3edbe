package client_test

import (
	"context"
	"errors"
	"fmt"
	"log"
	"net/http"
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
		Scopes:    []string{"read"},
		TTL:       2 * time.Minute,
		TaskID:    "ticket-4711",
		Purpose:   "sync contacts",
		AutoRenew: true, // until Release; stops if the broker refuses
	})
	switch {
	case errors.Is(err, client.ErrDenied):
		log.Fatal("no grant for this agent: ", err)
	case err != nil:
		log.Fatal(err)
	}
	defer lease.Release(ctx)

	// Ask for the secret each time it is used: after a revocation this
	// fails (within a second) instead of handing out a dead key.
	apiKey, err := lease.Get("api_key")
	if errors.Is(err, client.ErrRevoked) {
		log.Fatal("access was revoked: stop the task")
	}
	_ = apiKey // call the CRM with it; never log it
	fmt.Println("lease", lease.ID, "expires", lease.ExpiresAt())
}

// WithLease retrieves a credential, hands it to a function and releases it
// when the function returns.
func ExampleClient_WithLease() {
	ctx := context.Background()
	var c *client.Client // from client.New
	err := c.WithLease(ctx, "db/analytics", client.AcquireOptions{Scopes: []string{"read"}, TaskID: "report-7"},
		func(l *client.Lease) error {
			dsn, err := l.Get("dsn")
			if err != nil {
				return err
			}
			_ = dsn // connect, query, disconnect
			return nil
		})
	if err != nil {
		log.Fatal(err)
	}
}

// An agent calls an API through a Transport that adds the leased key to
// every request for api.crm.example and refuses any other host; the code
// making the calls never sees the key.
func ExampleTransport() {
	var c *client.Client // from client.New
	t := &client.Transport{
		Client: c, TaskID: "ticket-4711", Purpose: "sync contacts",
		Routes: map[string]client.Route{
			"api.crm.example": {Credential: "crm/salesforce", Scopes: []string{"read"}, Inject: client.Bearer("api_key")},
		},
	}
	defer t.Close(context.Background())
	httpClient := &http.Client{Transport: t}
	resp, err := httpClient.Get("https://api.crm.example/v1/contacts")
	if err != nil {
		log.Fatal(err)
	}
	resp.Body.Close()
}

package main

import (
	"fmt"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"os"

	"github.com/leasehold/leasehold/backends"
	"github.com/leasehold/leasehold/backends/exec"
	"github.com/leasehold/leasehold/backends/oauth2"
	"github.com/leasehold/leasehold/backends/postgres"
	"github.com/leasehold/leasehold/backends/static"
	"github.com/leasehold/leasehold/identity"
	"github.com/leasehold/leasehold/server"
	"github.com/leasehold/leasehold/server/auditsink"
	"github.com/leasehold/leasehold/store"
	"github.com/leasehold/leasehold/store/bolt"
)

// This file is the one place that chooses concrete store engines and
// backends; server/ only sees their interfaces.

// storeEngines lists the store engines by config name.
var storeEngines = map[string]func(StoreConfig) (store.Store, error){
	"bolt": func(c StoreConfig) (store.Store, error) { return bolt.Open(bolt.Config{Path: c.Path}) },
}

func openStore(c StoreConfig) (store.Store, error) {
	open, ok := storeEngines[c.Engine]
	if !ok {
		return nil, fmt.Errorf("store.engine %q is unknown (valid: bolt)", c.Engine)
	}
	return open(c)
}

// newSinks builds the audit export sinks named in the config.
func newSinks(cfgs []SinkConfig) []server.AuditSink {
	var out []server.AuditSink
	for _, c := range cfgs {
		switch c.Type {
		case "file":
			out = append(out, &auditsink.File{Path: c.Path})
		case "stdout":
			out = append(out, &auditsink.Writer{ID: "stdout", W: os.Stdout})
		}
	}
	return out
}

// newBackends registers every backend this build serves; close releases
// their connections. self is the broker's identity, presented to rotation
// webhooks; execDir is where the exec backend may run rotators from.
func newBackends(self identity.Source, execDir string) (r *backends.Registry, close func()) {
	r = backends.NewRegistry()
	r.Register(static.Name, static.Backend{})
	r.Register(oauth2.Name, &oauth2.Backend{})
	r.Register(exec.Name, exec.Backend{Dir: execDir})
	r.Register(exec.WebhookName, exec.Webhook{ClientCertificate: tlsconfig.GetClientCertificate(self)})
	pg := postgres.New()
	r.Register(postgres.Name, pg)
	r.Register(postgres.StaticRoleName, postgres.StaticRole{Backend: pg})
	return r, pg.Close
}

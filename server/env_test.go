package server_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/stretchr/testify/require"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/leasehold/leasehold/backends"
	"github.com/leasehold/leasehold/backends/exec"
	"github.com/leasehold/leasehold/backends/oauth2"
	"github.com/leasehold/leasehold/backends/postgres"
	"github.com/leasehold/leasehold/backends/static"
	"github.com/leasehold/leasehold/client"
	"github.com/leasehold/leasehold/identity"
	leaseholdv1 "github.com/leasehold/leasehold/proto/leasehold/v1"
	"github.com/leasehold/leasehold/server"
	"github.com/leasehold/leasehold/store"
	"github.com/leasehold/leasehold/store/bolt"
	"github.com/leasehold/leasehold/store/seal"
)

var td = spiffeid.RequireTrustDomainFromString("leasehold.test")

const (
	adminID  = "spiffe://leasehold.test/admin"
	agent1ID = "spiffe://leasehold.test/agents/agent-1"
	agent2ID = "spiffe://leasehold.test/agents/agent-2"
)

// clock is a movable clock for the broker.
type clock struct{ off atomic.Int64 }

func (c *clock) Now() time.Time          { return time.Now().Add(time.Duration(c.off.Load())) }
func (c *clock) Advance(d time.Duration) { c.off.Add(int64(d)) }

// faultStore wraps the real store to inject audit write failures.
type faultStore struct {
	store.Store
	failAudit atomic.Bool
	// stall, when set, blocks every write until the channel is closed.
	stall atomic.Pointer[chan struct{}]
}

type faultTx struct{ store.Tx }

func (faultTx) AppendAudit(*store.AuditRecord) (uint64, error) {
	return 0, errors.New("injected: audit disk full")
}

func (f *faultStore) Update(ctx context.Context, fn func(store.Tx) error) error {
	if p := f.stall.Load(); p != nil {
		<-*p
	}
	return f.Store.Update(ctx, func(tx store.Tx) error {
		if f.failAudit.Load() {
			tx = faultTx{tx}
		}
		return fn(tx)
	})
}

// syncBuffer collects the broker's log.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// env is a broker on loopback with real mTLS and a real bolt file.
type env struct {
	t      testing.TB
	dir    string
	ca     *identity.DevCA
	keyr   *seal.Keyring
	clock  *clock
	logs   *syncBuffer
	cfg    server.Config
	bolt   *bolt.Store
	store  *faultStore
	srv    *server.Server
	addr   string
	served chan error

	spans          *tracetest.SpanRecorder
	metrics        *sdkmetric.ManualReader
	pg             *postgres.Backend
	sinks          []server.AuditSink
	admin          leaseholdv1.AdminServiceClient
	agent1, agent2 leaseholdv1.BrokerServiceClient
}

func newEnv(t testing.TB, opts ...func(*server.Config)) *env {
	t.Helper()
	dir := t.TempDir()
	// On disk (dir/ca) so tests can craft malformed certificates with it.
	ca, err := identity.LoadOrCreateDevCA(filepath.Join(dir, "ca"), td)
	require.NoError(t, err)
	require.NoError(t, seal.CreateFile(filepath.Join(dir, "kek")))
	keyr, err := seal.LoadFile(filepath.Join(dir, "kek"))
	require.NoError(t, err)
	admins, err := identity.NewAdminSet(td, []string{adminID})
	require.NoError(t, err)
	e := &env{t: t, dir: dir, ca: ca, keyr: keyr, clock: &clock{}, logs: &syncBuffer{}, spans: tracetest.NewSpanRecorder(),
		cfg: server.Config{TrustDomain: td, Admins: admins, ReaperInterval: 20 * time.Millisecond}}
	for _, o := range opts {
		o(&e.cfg)
	}
	e.pg = postgres.New()
	t.Cleanup(e.pg.Close)
	e.start()
	t.Cleanup(e.stop)
	return e
}

func (e *env) svid(id string, opts identity.SVIDOptions) *x509svid.SVID {
	e.t.Helper()
	svid, err := e.ca.Issue(spiffeid.RequireFromString(id), opts)
	require.NoError(e.t, err)
	return svid
}

func (e *env) source(id string) identity.Source {
	return identity.StaticSource{SVID: e.svid(id, identity.SVIDOptions{}), Bundle: e.ca.Bundle()}
}

func (e *env) dial(id string) *grpc.ClientConn {
	e.t.Helper()
	conn, err := client.Dial(client.Config{Address: e.addr, Source: e.source(id)})
	require.NoError(e.t, err)
	e.t.Cleanup(func() { conn.Close() })
	return conn
}

func (e *env) start() {
	t := e.t
	t.Helper()
	b, err := bolt.Open(bolt.Config{Path: filepath.Join(e.dir, "leasehold.db")})
	require.NoError(t, err)
	e.bolt = b
	if e.store == nil {
		e.store = &faultStore{}
	}
	e.store.Store = b
	e.metrics = sdkmetric.NewManualReader() // a reader belongs to one provider
	brokerSrc := identity.StaticSource{SVID: e.svid("spiffe://leasehold.test/leasehold/broker", identity.SVIDOptions{}), Bundle: e.ca.Bundle()}
	reg := backends.NewRegistry()
	reg.Register(static.Name, static.Backend{})
	reg.Register("recording", recorder)
	reg.Register("gated", gated)
	reg.Register(postgres.Name, e.pg)
	reg.Register(postgres.StaticRoleName, postgres.StaticRole{Backend: e.pg})
	reg.Register(oauth2.Name, &oauth2.Backend{})
	reg.Register(exec.Name, exec.Backend{Dir: os.TempDir()}) // the tests' rotators live in t.TempDir()
	reg.Register(exec.WebhookName, exec.Webhook{ClientCertificate: tlsconfig.GetClientCertificate(brokerSrc)})
	e.srv, err = server.New(e.cfg, server.Deps{
		Store: e.store, Backends: reg, Keyring: e.keyr,
		Credentials:    identity.ServerCredentials(brokerSrc, td),
		Logger:         slog.New(slog.NewJSONHandler(e.logs, &slog.HandlerOptions{Level: slog.LevelDebug})),
		Now:            e.clock.Now,
		TracerProvider: sdktrace.NewTracerProvider(sdktrace.WithSpanProcessor(e.spans)),
		MeterProvider:  sdkmetric.NewMeterProvider(sdkmetric.WithReader(e.metrics)),
		AuditSinks:     e.sinks,
	})
	require.NoError(t, err)
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	e.addr = lis.Addr().String()
	e.served = make(chan error, 1)
	go func() { e.served <- e.srv.Serve(lis) }()
	e.admin = leaseholdv1.NewAdminServiceClient(e.dial(adminID))
	e.agent1 = leaseholdv1.NewBrokerServiceClient(e.dial(agent1ID))
	e.agent2 = leaseholdv1.NewBrokerServiceClient(e.dial(agent2ID))
}

func (e *env) stop() {
	if e.srv == nil {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	e.srv.Stop(ctx)
	require.NoError(e.t, <-e.served)
	require.NoError(e.t, e.bolt.Close())
	e.srv = nil
	re, err := bolt.Open(bolt.Config{Path: filepath.Join(e.dir, "leasehold.db")})
	require.NoError(e.t, err)
	require.NoError(e.t, re.Check(), "bbolt consistency check")
	require.NoError(e.t, re.Close())
}

// restart stops the broker and starts a new one on the same files.
func (e *env) restart() {
	e.stop()
	e.start()
}

var ctx = context.Background()

// requireCode asserts a gRPC status code and that the message contains want.
func requireCode(t *testing.T, err error, code codes.Code, want string) {
	t.Helper()
	require.Error(t, err)
	st, ok := status.FromError(err)
	require.True(t, ok, "not a gRPC status: %v", err)
	require.Equal(t, code, st.Code(), "message: %s", st.Message())
	require.Contains(t, st.Message(), want)
}

func (e *env) putStatic(name string, secret map[string]string) {
	e.t.Helper()
	_, err := e.admin.PutCredential(ctx, &leaseholdv1.PutCredentialRequest{Name: name, Secret: secret})
	require.NoError(e.t, err)
}

func (e *env) grant(credential, spiffeID string, scopes ...string) *leaseholdv1.Grant {
	e.t.Helper()
	resp, err := e.admin.CreateGrant(ctx, &leaseholdv1.CreateGrantRequest{Grant: &leaseholdv1.Grant{
		Subject: &leaseholdv1.Grant_SpiffeId{SpiffeId: spiffeID}, Credential: credential, Scopes: scopes,
	}})
	require.NoError(e.t, err)
	return resp.GetGrant()
}

func acquireReq(credential, task string, scopes ...string) *leaseholdv1.AcquireLeaseRequest {
	return &leaseholdv1.AcquireLeaseRequest{Credential: credential, Scopes: scopes,
		Task: &leaseholdv1.Task{Id: task, Purpose: "test " + task}}
}

func withTTL(r *leaseholdv1.AcquireLeaseRequest, d time.Duration) *leaseholdv1.AcquireLeaseRequest {
	r.Ttl = durationpb.New(d)
	return r
}

// audit returns the audit trail, newest first.
func (e *env) audit(q *leaseholdv1.QueryAuditRequest) []*leaseholdv1.AuditRecord {
	e.t.Helper()
	if q == nil {
		q = &leaseholdv1.QueryAuditRequest{}
	}
	q.PageSize = 1000
	resp, err := e.admin.QueryAudit(ctx, q)
	require.NoError(e.t, err)
	return resp.GetRecords()
}

// snapshot renders everything in the store, to show that a refused request
// changed nothing.
func (e *env) snapshot() string {
	e.t.Helper()
	var out bytes.Buffer
	require.NoError(e.t, e.bolt.View(ctx, func(tx store.ReadTx) error {
		last, _ := tx.LastAuditSequence()
		fmt.Fprintf(&out, "audit=%d\n", last)
		cs, _ := tx.ListCredentials("", 0)
		for _, c := range cs {
			fmt.Fprintf(&out, "cred %s v%d %v\n", c.Name, c.CurrentVersion, c.UpdatedAt)
		}
		gs, _ := tx.ListGrants("", "", 0)
		for _, g := range gs {
			fmt.Fprintf(&out, "grant %s %s\n", g.ID, g.Credential)
		}
		as, _ := tx.ListAgents("", 0)
		for _, a := range as {
			fmt.Fprintf(&out, "agent %s %v %v\n", a.ID, a.Revoked, a.LastSeen)
		}
		ls, _ := tx.ListLeases(store.LeaseFilter{}, "", 0)
		for _, l := range ls {
			fmt.Fprintf(&out, "lease %s %v %v\n", l.ID, l.State, l.ExpiresAt)
		}
		return nil
	}))
	return out.String()
}

// recordingBackend is a dynamic backend double: it mints a per-lease secret
// and records upstream revokes, so tests see that ending a lease reaches
// upstream. It wraps nothing real: a fake for counting and injecting, next
// to the real PostgreSQL and OAuth2 backends tested elsewhere.
type recordingBackend struct {
	mu      sync.Mutex
	revoked map[string]bool
	arts    []string // every artifact issued, in order
	issued  atomic.Int64
}

var recorder = &recordingBackend{revoked: map[string]bool{}}

func (r *recordingBackend) Validate(backends.Spec) error { return nil }

func (r *recordingBackend) Issue(_ context.Context, req backends.IssueRequest) (*backends.Issued, error) {
	r.issued.Add(1)
	r.mu.Lock()
	r.arts = append(r.arts, "role_"+req.LeaseID)
	r.mu.Unlock()
	return &backends.Issued{
		Secret:   map[string][]byte{"user": []byte("role_" + req.LeaseID)},
		Artifact: []byte("role_" + req.LeaseID),
	}, nil
}

func (r *recordingBackend) Renew(_ context.Context, _ backends.LeaseRef, at time.Time) (time.Time, error) {
	return at, nil
}

func (r *recordingBackend) Revoke(_ context.Context, ref backends.LeaseRef) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.revoked[string(ref.Artifact)] = true
	return nil
}

func (r *recordingBackend) wasRevoked(artifact string) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.revoked[artifact]
}

func durationMinutes(n int) *durationpb.Duration {
	return durationpb.New(time.Duration(n) * time.Minute)
}

// gatedBackend is a static backend whose Issue waits for the test to open
// its gate, to hold an acquire between its policy check and its commit.
type gatedBackend struct {
	mu      sync.Mutex
	gate    chan struct{}
	entered chan struct{}
}

var gated = &gatedBackend{}

// hold makes the next Issue wait; entered is closed when it is waiting,
// release lets it go.
func (g *gatedBackend) hold() (entered <-chan struct{}, release func()) {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.gate, g.entered = make(chan struct{}), make(chan struct{})
	gate := g.gate
	return g.entered, func() { close(gate) }
}

func (g *gatedBackend) Validate(backends.Spec) error { return nil }

func (g *gatedBackend) Issue(ctx context.Context, req backends.IssueRequest) (*backends.Issued, error) {
	g.mu.Lock()
	gate, entered := g.gate, g.entered
	g.gate, g.entered = nil, nil
	g.mu.Unlock()
	if gate != nil {
		close(entered)
		select {
		case <-gate:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	return static.Backend{}.Issue(ctx, req)
}

func (g *gatedBackend) Renew(_ context.Context, _ backends.LeaseRef, at time.Time) (time.Time, error) {
	return at, nil
}

func (g *gatedBackend) Revoke(context.Context, backends.LeaseRef) error { return nil }

package server_test

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/stretchr/testify/require"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"

	"github.com/leasehold/leasehold/backends"
	"github.com/leasehold/leasehold/backends/static"
	"github.com/leasehold/leasehold/client"
	"github.com/leasehold/leasehold/identity"
	leaseholdv1 "github.com/leasehold/leasehold/proto/leasehold/v1"
	"github.com/leasehold/leasehold/server"
	"github.com/leasehold/leasehold/store"
	"github.com/leasehold/leasehold/store/etcd"
	"github.com/leasehold/leasehold/store/etcd/etcdtest"
	"github.com/leasehold/leasehold/store/seal"
)

// outageBackend issues a per-lease artifact and fails every revocation
// while down: the queue keeps them until the upstream is back. A fake only
// to inject the outage.
type outageBackend struct {
	down    atomic.Bool
	mu      sync.Mutex
	revoked map[string]int
}

func (o *outageBackend) Validate(backends.Spec) error { return nil }
func (o *outageBackend) Issue(_ context.Context, req backends.IssueRequest) (*backends.Issued, error) {
	return &backends.Issued{Secret: map[string][]byte{"user": []byte("u_" + req.LeaseID)}, Artifact: []byte("u_" + req.LeaseID)}, nil
}
func (o *outageBackend) Renew(_ context.Context, _ backends.LeaseRef, at time.Time) (time.Time, error) {
	return at, nil
}
func (o *outageBackend) Revoke(_ context.Context, ref backends.LeaseRef) error {
	if o.down.Load() {
		return fmt.Errorf("%w: upstream is down", backends.ErrUpstreamUnavailable)
	}
	o.mu.Lock()
	defer o.mu.Unlock()
	o.revoked[string(ref.Artifact)]++
	return nil
}
func (o *outageBackend) count(artifact string) int {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.revoked[artifact]
}

// replica is one broker of a cluster, on its own etcd client.
type replica struct {
	st      *etcd.Store
	srv     *server.Server
	addr    string
	served  chan error
	logs    *syncBuffer
	metrics *sdkmetric.ManualReader
}

type cluster struct {
	t        *testing.T
	etcd     *etcdtest.Cluster
	ca       *identity.DevCA
	keyr     *seal.Keyring
	upstream *outageBackend
	prefix   string
	// server adjusts the brokers' config.
	server func(*server.Config)
}

func newCluster(t *testing.T, members int) *cluster {
	dir := t.TempDir()
	ca, err := identity.LoadOrCreateDevCA(filepath.Join(dir, "ca"), td)
	require.NoError(t, err)
	require.NoError(t, seal.CreateFile(filepath.Join(dir, "kek")))
	keyr, err := seal.LoadFile(filepath.Join(dir, "kek"))
	require.NoError(t, err)
	// The Txn limits docs/deployment.md asks etcd and brokers to run with.
	return &cluster{t: t, etcd: etcdtest.Start(t, etcdtest.Options{Members: members, MaxTxnOps: 32768, MaxRequestBytes: 8 << 20}),
		ca: ca, keyr: keyr, upstream: &outageBackend{revoked: map[string]int{}}, prefix: "/cluster-test/"}
}

func (c *cluster) start(mod ...func(*etcd.Config)) *replica {
	t := c.t
	cfg := etcd.Config{Endpoints: c.etcd.Endpoints(), Prefix: c.prefix, LeaderTTL: time.Second,
		MaxTxnOps: 32768, MaxRequestBytes: 8 << 20, RequestTimeout: 2 * time.Second}
	for _, m := range mod {
		m(&cfg)
	}
	st, err := etcd.Open(ctx, cfg)
	require.NoError(t, err)
	admins, err := identity.NewAdminSet(td, []string{adminID})
	require.NoError(t, err)
	reg := backends.NewRegistry()
	reg.Register(static.Name, static.Backend{})
	reg.Register("outage", c.upstream)
	svid, err := c.ca.Issue(spiffeid.RequireFromString("spiffe://leasehold.test/leasehold/broker"), identity.SVIDOptions{})
	require.NoError(t, err)
	r := &replica{st: st, logs: &syncBuffer{}, served: make(chan error, 1), metrics: sdkmetric.NewManualReader()}
	scfg := server.Config{TrustDomain: td, Admins: admins, ReaperInterval: 50 * time.Millisecond, AcquireRate: -1,
		RevocationPoll: 50 * time.Millisecond, RevocationMinBackoff: 50 * time.Millisecond, RevocationMaxBackoff: 200 * time.Millisecond}
	if c.server != nil {
		c.server(&scfg)
	}
	r.srv, err = server.New(scfg,
		server.Deps{Store: st, Backends: reg, Keyring: c.keyr,
			Credentials:   identity.ServerCredentials(identity.StaticSource{SVID: svid, Bundle: c.ca.Bundle()}, td),
			Logger:        slog.New(slog.NewJSONHandler(r.logs, nil)),
			MeterProvider: sdkmetric.NewMeterProvider(sdkmetric.WithReader(r.metrics))})
	require.NoError(t, err)
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	r.addr = lis.Addr().String()
	go func() { r.served <- r.srv.Serve(lis) }()
	t.Cleanup(func() { r.stop() })
	return r
}

// stop is a clean shutdown: leadership is resigned.
func (r *replica) stop() {
	if r.srv == nil {
		return
	}
	sctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	r.srv.Stop(sctx)
	<-r.served
	_ = r.st.Close()
	r.srv = nil
}

// crash cuts the replica off from etcd first, as a dead process would be:
// it does not resign, so its leadership lasts until its session lease
// expires.
func (r *replica) crash() {
	_ = r.st.Client().Close()
	r.stop()
}

func (c *cluster) dial(r *replica, id string) *grpc.ClientConn {
	svid, err := c.ca.Issue(spiffeid.RequireFromString(id), identity.SVIDOptions{})
	require.NoError(c.t, err)
	conn, err := client.Dial(client.Config{Address: r.addr, Source: identity.StaticSource{SVID: svid, Bundle: c.ca.Bundle()}})
	require.NoError(c.t, err)
	c.t.Cleanup(func() { conn.Close() })
	return conn
}

func leaderOf(t *testing.T, rs ...*replica) *replica {
	t.Helper()
	var found *replica
	require.Eventually(t, func() bool {
		n := 0
		for _, r := range rs {
			if r.srv != nil && r.srv.Leading() {
				found = r
				n++
			}
		}
		return n == 1
	}, 10*time.Second, 20*time.Millisecond, "exactly one replica leads")
	return found
}

// Two brokers on one etcd: a grant made on A is used on B; RevokeAgent on
// A is in force on B when it returns; the leader is killed with
// revocations queued (the upstream is down) and the other replica takes
// over and finishes them, each artifact destroyed.
func TestTwoBrokersOneEtcd(t *testing.T) {
	c := newCluster(t, 1)
	a, b := c.start(), c.start()
	adminA := leaseholdv1.NewAdminServiceClient(c.dial(a, adminID))
	agentOnA := leaseholdv1.NewBrokerServiceClient(c.dial(a, agent1ID))
	agentOnB := leaseholdv1.NewBrokerServiceClient(c.dial(b, agent1ID))
	otherOnB := leaseholdv1.NewBrokerServiceClient(c.dial(b, agent2ID))

	_, err := adminA.PutCredential(ctx, &leaseholdv1.PutCredentialRequest{Name: "db/app", Backend: "outage", Secret: map[string]string{"k": "v"}})
	require.NoError(t, err)
	_, err = adminA.CreateGrant(ctx, &leaseholdv1.CreateGrantRequest{Grant: &leaseholdv1.Grant{
		Subject:    &leaseholdv1.Grant_SpiffeIdPrefix{SpiffeIdPrefix: "spiffe://leasehold.test/agents"},
		Credential: "db/app", Scopes: []string{"read"}}})
	require.NoError(t, err)

	// The grant made on A is used on B, at once.
	l1, err := agentOnB.AcquireLease(ctx, acquireReq("db/app", "t1", "read"))
	require.NoError(t, err)
	l2, err := agentOnA.AcquireLease(ctx, acquireReq("db/app", "t2", "read"))
	require.NoError(t, err)
	other, err := otherOnB.AcquireLease(ctx, acquireReq("db/app", "t3", "read"))
	require.NoError(t, err)

	// The agent watches its leases on B.
	wctx, stopWatch := context.WithCancel(ctx)
	defer stopWatch()
	watch, err := agentOnB.WatchLeases(wctx, &leaseholdv1.WatchLeasesRequest{FromNow: true})
	require.NoError(t, err)
	_, err = watch.Recv() // the sync marker
	require.NoError(t, err)
	events := make(chan *leaseholdv1.WatchLeasesResponse, 8)
	go func() {
		for {
			ev, err := watch.Recv()
			if err != nil {
				return
			}
			events <- ev
		}
	}()

	// RevokeAgent on A with the upstream down: denied on B as soon as it
	// returns, and both of the agent's leases are ended, their artifacts
	// queued.
	c.upstream.down.Store(true)
	resp, err := adminA.RevokeAgent(ctx, &leaseholdv1.RevokeAgentRequest{SpiffeId: agent1ID, Reason: "compromised"})
	require.NoError(t, err)
	require.EqualValues(t, 2, resp.GetLeasesRevoked())
	// B's watch stream hears of A's revocation (B itself committed nothing).
	revoked := map[string]bool{}
	for len(revoked) < 2 {
		select {
		case ev := <-events:
			if ev.GetEvent() == leaseholdv1.LeaseEvent_LEASE_EVENT_REVOKED {
				revoked[ev.GetLeaseId()] = true
			}
		case <-time.After(5 * time.Second):
			t.Fatalf("the watch on B did not report the revocation made on A (got %v)", revoked)
		}
	}
	require.True(t, revoked[l1.GetLease().GetId()] && revoked[l2.GetLease().GetId()])
	_, err = agentOnB.AcquireLease(ctx, acquireReq("db/app", "t4", "read"))
	requireCode(t, err, codes.PermissionDenied, "revoked")
	_, err = agentOnB.RenewLease(ctx, &leaseholdv1.RenewLeaseRequest{LeaseId: l1.GetLease().GetId()})
	require.Error(t, err, "a lease ended on A cannot be renewed on B")
	_, err = otherOnB.RenewLease(ctx, &leaseholdv1.RenewLeaseRequest{LeaseId: other.GetLease().GetId()})
	require.NoError(t, err, "another agent is untouched")

	pending := func(r *replica) int {
		var n int
		require.NoError(t, r.st.View(ctx, func(tx store.ReadTx) error {
			var err error
			n, err = tx.PendingRevocations()
			return err
		}))
		return n
	}
	// The leader tries and fails; the queue keeps both.
	leader := leaderOf(t, a, b)
	follower := a
	if leader == a {
		follower = b
	}
	require.EqualValues(t, 1, collectMetrics(t, leader.metrics)["leasehold.leader"])
	lead, ok := collectMetrics(t, follower.metrics)["leasehold.leader"]
	require.True(t, ok, "the follower reports the gauge too")
	require.Zero(t, lead)
	require.Eventually(t, func() bool { return strings.Contains(leader.logs.String(), "upstream is down") }, 5*time.Second, 20*time.Millisecond)
	require.Equal(t, 2, pending(a))

	// Kill the leader, bring the upstream back: the survivor leads and
	// finishes the queue, each artifact destroyed once.
	survivor := a
	if leader == a {
		survivor = b
	}
	leader.crash()
	c.upstream.down.Store(false)
	require.Same(t, survivor, leaderOf(t, a, b))
	require.EqualValues(t, 1, collectMetrics(t, survivor.metrics)["leasehold.leader"])
	require.Eventually(t, func() bool { return pending(survivor) == 0 }, 15*time.Second, 50*time.Millisecond,
		"the new leader finishes the queued revocations")
	for _, l := range []*leaseholdv1.AcquireLeaseResponse{l1, l2} {
		require.Equal(t, 1, c.upstream.count("u_"+l.GetLease().GetId()))
	}
	require.Zero(t, c.upstream.count("u_"+other.GetLease().GetId()))

	// The trail, written by both brokers, is one intact chain.
	adminS := leaseholdv1.NewAdminServiceClient(c.dial(survivor, adminID))
	v, err := adminS.VerifyAudit(ctx, &leaseholdv1.VerifyAuditRequest{})
	require.NoError(t, err)
	require.True(t, v.GetOk(), "%s at %d", v.GetProblem(), v.GetFirstBrokenSequence())
}

// A three-member etcd cluster loses a member under load from two brokers:
// both keep serving, and every acquire they acknowledged is in the store.
func TestBrokersSurviveEtcdMemberLoss(t *testing.T) {
	c := newCluster(t, 3)
	a, b := c.start(), c.start()
	admin := leaseholdv1.NewAdminServiceClient(c.dial(a, adminID))
	_, err := admin.PutCredential(ctx, &leaseholdv1.PutCredentialRequest{Name: "crm/api", Secret: map[string]string{"api_key": "k"}})
	require.NoError(t, err)
	_, err = admin.CreateGrant(ctx, &leaseholdv1.CreateGrantRequest{Grant: &leaseholdv1.Grant{
		Subject: &leaseholdv1.Grant_SpiffeIdPrefix{SpiffeIdPrefix: "spiffe://leasehold.test/agents"}, Credential: "crm/api", Scopes: []string{"read"}}})
	require.NoError(t, err)

	var (
		mu     sync.Mutex
		acked  []string
		failed atomic.Int64
		stop   atomic.Bool
		wg     sync.WaitGroup
	)
	for i, r := range []*replica{a, b, a, b} {
		agent := leaseholdv1.NewBrokerServiceClient(c.dial(r, fmt.Sprintf("spiffe://leasehold.test/agents/w%d", i)))
		wg.Go(func() {
			for n := 0; !stop.Load(); n++ {
				cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
				resp, err := agent.AcquireLease(cctx, acquireReq("crm/api", fmt.Sprintf("w%d-%d", i, n), "read"))
				cancel()
				if err != nil {
					failed.Add(1)
					time.Sleep(20 * time.Millisecond)
					continue
				}
				mu.Lock()
				acked = append(acked, resp.GetLease().GetId())
				mu.Unlock()
			}
		})
	}
	count := func() int { mu.Lock(); defer mu.Unlock(); return len(acked) }
	require.Eventually(t, func() bool { return count() >= 50 }, 20*time.Second, 10*time.Millisecond)
	c.etcd.Kill(0)
	before := count()
	require.Eventually(t, func() bool { return count() >= before+100 }, 30*time.Second, 10*time.Millisecond,
		"both brokers keep serving after a member is lost")
	stop.Store(true)
	wg.Wait()
	t.Logf("%d acquires acknowledged, %d failed around the member loss", count(), failed.Load())

	require.NoError(t, b.st.View(ctx, func(tx store.ReadTx) error {
		for _, id := range acked {
			l, err := tx.GetLease(id)
			require.NoError(t, err, "acknowledged lease %s is in the store", id)
			require.Equal(t, store.LeaseActive, l.State)
		}
		return nil
	}))
	v, err := admin.VerifyAudit(ctx, &leaseholdv1.VerifyAuditRequest{})
	require.NoError(t, err)
	require.True(t, v.GetOk(), v.GetProblem())
}

// RevokeAgent ends all of an agent's leases in one etcd Txn. An agent at
// the default quota (1,000 active leases) fits under the limits
// docs/deployment.md gives. Under smaller ones the revocation is made in
// parts — the agent refused everywhere first, then its leases ended in
// batches — and is just as complete when the call returns.
func TestRevokeAgentTxnLimits(t *testing.T) {
	c := newCluster(t, 1)
	documented := c.start()
	small := c.start(func(cfg *etcd.Config) { cfg.MaxTxnOps = 1024 })
	admin := leaseholdv1.NewAdminServiceClient(c.dial(documented, adminID))
	_, err := admin.PutCredential(ctx, &leaseholdv1.PutCredentialRequest{Name: "db/app", Backend: "outage", Secret: map[string]string{"k": "v"}})
	require.NoError(t, err)
	_, err = admin.CreateGrant(ctx, &leaseholdv1.CreateGrantRequest{Grant: &leaseholdv1.Grant{
		Subject: &leaseholdv1.Grant_SpiffeIdPrefix{SpiffeIdPrefix: "spiffe://leasehold.test/agents"}, Credential: "db/app", Scopes: []string{"read"}}})
	require.NoError(t, err)
	fill := func(agentID string, n int) leaseholdv1.BrokerServiceClient {
		agent := leaseholdv1.NewBrokerServiceClient(c.dial(documented, agentID))
		var g sync.WaitGroup
		var failed atomic.Int64
		for w := range 32 {
			g.Go(func() {
				for i := w; i < n; i += 32 {
					if _, err := agent.AcquireLease(ctx, acquireReq("db/app", fmt.Sprint("t", i), "read")); err != nil {
						failed.Add(1)
					}
				}
			})
		}
		g.Wait()
		require.Zero(t, failed.Load())
		return agent
	}
	active := func(agentID string) int {
		r, err := admin.ListLeases(ctx, &leaseholdv1.ListLeasesRequest{AgentId: agentID, ActiveOnly: true, PageSize: 1000})
		require.NoError(t, err)
		return len(r.GetLeases())
	}
	partsRecord := func(agentID string) bool {
		for page := ""; ; {
			r, err := admin.QueryAudit(ctx, &leaseholdv1.QueryAuditRequest{AgentId: agentID, PageSize: 1000, PageToken: page})
			require.NoError(t, err)
			for _, rec := range r.GetRecords() {
				if rec.GetEvent() == leaseholdv1.AuditEvent_AUDIT_EVENT_AGENT_REVOKE {
					return strings.Contains(rec.GetReason(), "in batches")
				}
			}
			if page = r.GetNextPageToken(); page == "" {
				break
			}
		}
		t.Fatalf("no agent.revoke record for %s", agentID)
		return false
	}

	// At the quota, under the documented limits: one transaction.
	agent1 := fill(agent1ID, 1000)
	lease := mustLeaseID(t, admin, agent1ID)
	resp, err := admin.RevokeAgent(ctx, &leaseholdv1.RevokeAgentRequest{SpiffeId: agent1ID, Reason: "compromised"})
	require.NoError(t, err)
	require.EqualValues(t, 1000, resp.GetLeasesRevoked())
	require.Zero(t, active(agent1ID))
	require.False(t, partsRecord(agent1ID))
	_, err = agent1.RenewLease(ctx, &leaseholdv1.RenewLeaseRequest{LeaseId: lease})
	require.Error(t, err)

	// The same through a broker whose limit is too small for one: in parts.
	agent2 := fill(agent2ID, 150)
	lease = mustLeaseID(t, admin, agent2ID)
	smallAdmin := leaseholdv1.NewAdminServiceClient(c.dial(small, adminID))
	resp, err = smallAdmin.RevokeAgent(ctx, &leaseholdv1.RevokeAgentRequest{SpiffeId: agent2ID, Reason: "compromised"})
	require.NoError(t, err)
	require.EqualValues(t, 150, resp.GetLeasesRevoked())
	require.Zero(t, active(agent2ID), "every lease ended when the call returns")
	require.True(t, partsRecord(agent2ID))
	_, err = agent2.AcquireLease(ctx, acquireReq("db/app", "after", "read"))
	requireCode(t, err, codes.PermissionDenied, "revoked")
	_, err = agent2.RenewLease(ctx, &leaseholdv1.RenewLeaseRequest{LeaseId: lease})
	require.Error(t, err)
	v, err := admin.VerifyAudit(ctx, &leaseholdv1.VerifyAuditRequest{})
	require.NoError(t, err)
	require.True(t, v.GetOk(), v.GetProblem())
}

func mustLeaseID(t *testing.T, admin leaseholdv1.AdminServiceClient, agent string) string {
	t.Helper()
	r, err := admin.ListLeases(ctx, &leaseholdv1.ListLeasesRequest{AgentId: agent, ActiveOnly: true, PageSize: 1})
	require.NoError(t, err)
	require.NotEmpty(t, r.GetLeases())
	return r.GetLeases()[0].GetId()
}

// Audit retention on etcd prunes in batches that fit the store's Txn
// limits: a batch that does not fit is halved, not retried whole forever.
func TestRetentionWithinTxnLimits(t *testing.T) {
	c := newCluster(t, 1)
	c.server = func(cfg *server.Config) {
		cfg.RetentionMaxRecords, cfg.RetentionInterval = 20, 2*time.Second
	}
	// About eight keys per audit record: 300 records do not fit 1,024.
	r := c.start(func(cfg *etcd.Config) { cfg.MaxTxnOps = 1024 })
	admin := leaseholdv1.NewAdminServiceClient(c.dial(r, adminID))
	for i := range 300 {
		_, err := admin.PutCredential(ctx, &leaseholdv1.PutCredentialRequest{Name: fmt.Sprint("c/", i%5), Secret: map[string]string{"k": fmt.Sprint(i)}})
		require.NoError(t, err)
	}
	require.Eventually(t, func() bool {
		v, err := admin.VerifyAudit(ctx, &leaseholdv1.VerifyAuditRequest{})
		return err == nil && v.GetOk() && v.GetHead().GetSequence()-v.GetFloor().GetSequence() <= 40
	}, 20*time.Second, 100*time.Millisecond, "retention brought the trail down to its bound")
	require.NotContains(t, r.logs.String(), "audit retention\"", "no retention run failed")
}

// DeleteCredential and RevokeTask over more leases than one store
// transaction holds end them in batches first, then finish as usual.
func TestLargeDeletesWithinTxnLimits(t *testing.T) {
	c := newCluster(t, 1)
	r := c.start(func(cfg *etcd.Config) { cfg.MaxTxnOps = 1024 })
	admin := leaseholdv1.NewAdminServiceClient(c.dial(r, adminID))
	agent := leaseholdv1.NewBrokerServiceClient(c.dial(r, agent1ID))
	for _, cred := range []string{"db/a", "db/b"} {
		_, err := admin.PutCredential(ctx, &leaseholdv1.PutCredentialRequest{Name: cred, Backend: "outage", Secret: map[string]string{"k": "v"}})
		require.NoError(t, err)
		_, err = admin.CreateGrant(ctx, &leaseholdv1.CreateGrantRequest{Grant: &leaseholdv1.Grant{
			Subject: &leaseholdv1.Grant_SpiffeId{SpiffeId: agent1ID}, Credential: cred, Scopes: []string{"read"}}})
		require.NoError(t, err)
	}
	var g sync.WaitGroup
	var failed atomic.Int64
	for w := range 16 {
		g.Go(func() {
			for i := w; i < 300; i += 16 {
				cred, task := "db/a", fmt.Sprint("big/", i) // db/a: one task tree
				if i%2 == 1 {
					cred, task = "db/b", fmt.Sprint("other-", i)
				}
				if _, err := agent.AcquireLease(ctx, acquireReq(cred, task, "read")); err != nil {
					failed.Add(1)
				}
			}
		})
	}
	g.Wait()
	require.Zero(t, failed.Load())

	task, err := admin.RevokeTask(ctx, &leaseholdv1.RevokeTaskRequest{TaskId: "big", Reason: "runaway"})
	require.NoError(t, err)
	require.EqualValues(t, 150, task.GetLeasesRevoked())
	del, err := admin.DeleteCredential(ctx, &leaseholdv1.DeleteCredentialRequest{Name: "db/b"})
	require.NoError(t, err)
	require.EqualValues(t, 150, del.GetLeasesRevoked())
	require.EqualValues(t, 1, del.GetGrantsDeleted())
	r2, err := admin.ListLeases(ctx, &leaseholdv1.ListLeasesRequest{AgentId: agent1ID, ActiveOnly: true})
	require.NoError(t, err)
	require.Empty(t, r2.GetLeases())
	_, err = admin.GetCredential(ctx, &leaseholdv1.GetCredentialRequest{Name: "db/b"})
	requireCode(t, err, codes.NotFound, "db/b")
	v, err := admin.VerifyAudit(ctx, &leaseholdv1.VerifyAuditRequest{})
	require.NoError(t, err)
	require.True(t, v.GetOk(), v.GetProblem())
}

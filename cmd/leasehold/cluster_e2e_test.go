package main

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/leasehold/leasehold/client"
	"github.com/leasehold/leasehold/identity"
	leaseholdv1 "github.com/leasehold/leasehold/proto/leasehold/v1"
	"github.com/leasehold/leasehold/store/etcd/etcdtest"
)

// TestTwoBrokersOnEtcdCluster runs the deployment docs/deployment.md
// describes, as a new user would: three etcd members, two `leasehold serve`
// processes with `store: {engine: etcd}` and the same KEK, admins and agents
// using the CLI against either broker. A grant made on A is used on B;
// RevokeAgent on A denies on B at once; the broker leading background work
// is killed with SIGKILL under load and the other takes over (it ends the
// expired leases); an etcd member is killed and the surviving broker keeps
// serving; the killed broker restarts. No acknowledged lease or audit record
// is lost, and the trail verifies.
func TestTwoBrokersOnEtcdCluster(t *testing.T) {
	cluster := etcdtest.Start(t, etcdtest.Options{Members: 3, MaxTxnOps: 32768, MaxRequestBytes: 8 << 20})
	dir := t.TempDir()
	dev := filepath.Join(dir, "dev")
	cfg, err := prepareDev(dev, "example.org", "127.0.0.1:0")
	require.NoError(t, err)
	brokers := map[string]string{} // name -> address
	for _, name := range []string{"a", "b"} {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		require.NoError(t, err)
		brokers[name] = l.Addr().String()
		require.NoError(t, l.Close())
		conf := fmt.Sprintf(`listen: %s
trust_domain: example.org
admins: [spiffe://example.org/admin]
identity: {cert_file: %s, key_file: %s, bundle_file: %s}
store:
  engine: etcd
  endpoints: [%s]
  prefix: /leasehold/
  max_txn_ops: 32768
  max_request_bytes: 8388608
  leader_ttl: 2s
kek_file: %s
leases: {reaper_interval: 200ms, acquire_rate: -1, max_active_per_agent: -1}
log: {format: json}
`, brokers[name], cfg.Identity.CertFile, cfg.Identity.KeyFile, cfg.Identity.BundleFile,
			strings.Join(cluster.Endpoints(), ", "), cfg.KEKFile)
		require.NoError(t, os.MkdirAll(filepath.Join(dir, name), 0o700))
		require.NoError(t, os.WriteFile(filepath.Join(dir, name, "leasehold.yaml"), []byte(conf), 0o600))
	}
	procs := map[string]*crashable{"a": startCrashable(t, filepath.Join(dir, "a")), "b": startCrashable(t, filepath.Join(dir, "b"))}

	cli := func(on, as string, args ...string) (string, error) {
		all := append([]string{"--addr", brokers[on], "--dev-dir", dev, "--as", as}, args...)
		out, err := exec.Command(leaseholdBin, all...).CombinedOutput()
		return string(out), err
	}
	out, err := cli("a", "admin", "credential", "put", "crm/api", "--set", "api_key=cluster-canary")
	require.NoError(t, err, out)
	out, err = cli("a", "admin", "grant", "create", "--credential", "crm/api", "--spiffe-id-prefix", "spiffe://example.org/agents", "--scopes", "read")
	require.NoError(t, err, out)
	// The grant made on A is used on B.
	out, err = cli("b", "agent-1", "acquire", "crm/api", "--scopes", "read", "--task", "t-1", "--format", "env")
	require.NoError(t, err, out)
	require.Contains(t, out, "API_KEY='cluster-canary'")
	// RevokeAgent on A is in force on B when it returns.
	out, err = cli("a", "admin", "agent", "revoke", "spiffe://example.org/agents/agent-1", "--reason", "compromised")
	require.NoError(t, err, out)
	out, err = cli("b", "agent-1", "acquire", "crm/api", "--scopes", "read", "--task", "t-2")
	require.Error(t, err)
	require.Contains(t, out, "revoked")

	// Load from agent-2 on both brokers: short leases, half released.
	dial := func(on, as string) *grpc.ClientConn {
		src, err := identity.NewFileSource(identity.FileConfig{CertFile: filepath.Join(dev, as+".pem"),
			KeyFile: filepath.Join(dev, as+"-key.pem"), BundleFile: filepath.Join(dev, "bundle.pem")})
		require.NoError(t, err)
		conn, err := client.Dial(client.Config{Address: brokers[on], Source: src})
		require.NoError(t, err)
		t.Cleanup(func() { conn.Close(); src.Close() })
		return conn
	}
	var (
		mu      sync.Mutex
		acked   = map[string]bool{} // lease id -> released
		stopped atomic.Bool
		wg      sync.WaitGroup
	)
	load := func(on string, w int) {
		agent := leaseholdv1.NewBrokerServiceClient(dial(on, "agent-2"))
		wg.Go(func() {
			for n := 0; !stopped.Load(); n++ {
				cctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
				resp, err := agent.AcquireLease(cctx, &leaseholdv1.AcquireLeaseRequest{Credential: "crm/api", Scopes: []string{"read"},
					Task: &leaseholdv1.Task{Id: fmt.Sprintf("%s%d-%d", on, w, n)}, Ttl: durationpb.New(2 * time.Second)})
				cancel()
				if err != nil {
					time.Sleep(20 * time.Millisecond)
					continue
				}
				id := resp.GetLease().GetId()
				mu.Lock()
				acked[id] = false
				mu.Unlock()
				if n%2 == 1 {
					cctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
					_, err := agent.ReleaseLease(cctx, &leaseholdv1.ReleaseLeaseRequest{LeaseId: id})
					cancel()
					if err == nil {
						mu.Lock()
						acked[id] = true
						mu.Unlock()
					}
				}
			}
		})
	}
	count := func() int { mu.Lock(); defer mu.Unlock(); return len(acked) }
	for w := range 2 {
		load("a", w)
		load("b", w)
	}
	require.Eventually(t, func() bool { return count() >= 40 }, 30*time.Second, 20*time.Millisecond)

	// Kill the broker that leads background work.
	leader, survivor := "a", "b"
	require.Eventually(t, func() bool {
		a, b := strings.Contains(procs["a"].stderr.String(), "leading background work"), strings.Contains(procs["b"].stderr.String(), "leading background work")
		if b && !a {
			leader, survivor = "b", "a"
		}
		return a != b
	}, 10*time.Second, 20*time.Millisecond, "one broker leads")
	procs[leader].kill()
	killedAt := count()
	require.Eventually(t, func() bool { return strings.Contains(procs[survivor].stderr.String(), "leading background work") },
		15*time.Second, 50*time.Millisecond, "the survivor takes over background work")
	require.Eventually(t, func() bool { return count() >= killedAt+40 }, 30*time.Second, 20*time.Millisecond, "the survivor serves")

	// Kill one etcd member: the survivor keeps serving.
	cluster.Kill(1)
	afterMember := count()
	require.Eventually(t, func() bool { return count() >= afterMember+40 }, 30*time.Second, 20*time.Millisecond,
		"serving goes on with two of three etcd members")

	// The killed broker restarts and serves again.
	procs[leader] = startCrashable(t, filepath.Join(dir, leader))
	require.Eventually(t, func() bool { return count() >= afterMember+80 }, 30*time.Second, 20*time.Millisecond)
	stopped.Store(true)
	wg.Wait()

	// Every acknowledged lease is there; the 2-second ones that were not
	// released were ended by whichever broker leads the reaper now.
	admin := leaseholdv1.NewAdminServiceClient(dial(survivor, "admin"))
	ctx := context.Background()
	states := map[string]leaseholdv1.LeaseState{}
	for page := ""; ; {
		r, err := admin.ListLeases(ctx, &leaseholdv1.ListLeasesRequest{AgentId: "spiffe://example.org/agents/agent-2", PageSize: 1000, PageToken: page})
		require.NoError(t, err)
		for _, l := range r.GetLeases() {
			states[l.GetId()] = l.GetState()
		}
		if page = r.GetNextPageToken(); page == "" {
			break
		}
	}
	mu.Lock()
	defer mu.Unlock()
	for id, released := range acked {
		st, ok := states[id]
		require.True(t, ok, "acknowledged lease %s is in the store", id)
		if released {
			require.Equal(t, leaseholdv1.LeaseState_LEASE_STATE_RELEASED, st, id)
		}
	}
	require.Eventually(t, func() bool {
		r, err := admin.ListLeases(ctx, &leaseholdv1.ListLeasesRequest{AgentId: "spiffe://example.org/agents/agent-2", ActiveOnly: true})
		return err == nil && len(r.GetLeases()) == 0
	}, 15*time.Second, 100*time.Millisecond, "the reaper, now on another broker, ends every expired lease")
	// And each has its acquire record in the trail.
	acquired := map[string]bool{}
	for page := ""; ; {
		r, err := admin.QueryAudit(ctx, &leaseholdv1.QueryAuditRequest{AgentId: "spiffe://example.org/agents/agent-2", PageSize: 1000, PageToken: page})
		require.NoError(t, err)
		for _, rec := range r.GetRecords() {
			if rec.GetEvent() == leaseholdv1.AuditEvent_AUDIT_EVENT_LEASE_ACQUIRE {
				acquired[rec.GetLeaseId()] = true
			}
		}
		if page = r.GetNextPageToken(); page == "" {
			break
		}
	}
	for id := range acked {
		require.True(t, acquired[id], "acknowledged lease %s has its acquire record", id)
	}
	v, err := admin.VerifyAudit(ctx, &leaseholdv1.VerifyAuditRequest{})
	require.NoError(t, err)
	require.True(t, v.GetOk(), "%s at %d", v.GetProblem(), v.GetFirstBrokenSequence())
	t.Logf("%d leases acknowledged across a broker kill, an etcd member kill and a restart; %d audit records verified",
		len(acked), v.GetRecordsChecked())
	for _, p := range procs {
		require.NotContains(t, p.stderr.String(), "cluster-canary", "no secret in a broker's log")
	}
	// Nor in what etcd stored: every member's WAL, snapshots and bbolt file.
	scanned, names := 0, 0
	for i := range 3 {
		require.NoError(t, filepath.WalkDir(cluster.DataDir(i), func(path string, d os.DirEntry, err error) error {
			if err != nil || d.IsDir() {
				return err
			}
			data, err := os.ReadFile(path)
			if err != nil {
				return err
			}
			scanned += len(data)
			names += strings.Count(string(data), `"crm/api"`)
			require.NotContains(t, string(data), "cluster-canary", "secret in plaintext in %s", path)
			return nil
		}))
	}
	require.Greater(t, scanned, 1<<20, "sanity: the members' files were read")
	require.Positive(t, names, "positive control: the credential's name, which is not secret, is found in plaintext")
}

package main

import (
	"context"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"

	"github.com/leasehold/leasehold/client"
	"github.com/leasehold/leasehold/identity"
	leaseholdv1 "github.com/leasehold/leasehold/proto/leasehold/v1"
	"github.com/leasehold/leasehold/store/bolt"
)

// TestCrashCycles runs the broker binary under acquire/release/revoke load
// from several agents, kills it with SIGKILL at a random moment, restarts
// it on the same files and checks what every acknowledged answer promised:
// each lease id a client received exists with its acquire record in the
// audit trail (no secret left without a durable record); each acknowledged
// release ended its lease; an acknowledged RevokeAgent is still in force
// with the agent's earlier leases ended; the audit chain verifies; and at
// the end bbolt's consistency check passes. LEASEHOLD_CRASH_CYCLES sets the
// number of cycles (default 3; `make soak` runs 50).
func TestCrashCycles(t *testing.T) {
	cycles := 3
	if v := os.Getenv("LEASEHOLD_CRASH_CYCLES"); v != "" {
		n, err := strconv.Atoi(v)
		require.NoError(t, err)
		cycles = n
	}
	dir := t.TempDir()
	dev := filepath.Join(dir, "dev")
	cfg, err := prepareDev(dev, "example.org", "127.0.0.1:0")
	require.NoError(t, err)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	addr := l.Addr().String()
	require.NoError(t, l.Close())
	dbPath := filepath.Join(dir, "data", "leasehold.db")
	conf := fmt.Sprintf(`listen: %s
trust_domain: example.org
admins: [spiffe://example.org/admin]
identity: {cert_file: %s, key_file: %s, bundle_file: %s}
store: {path: %s}
kek_file: %s
leases: {acquire_rate: -1, max_active_per_agent: -1}
log: {format: json}
`, addr, cfg.Identity.CertFile, cfg.Identity.KeyFile, cfg.Identity.BundleFile, dbPath, cfg.KEKFile)
	require.NoError(t, os.WriteFile(filepath.Join(dir, "leasehold.yaml"), []byte(conf), 0o600))

	dial := func(as string) *grpc.ClientConn {
		src, err := identity.NewFileSource(identity.FileConfig{CertFile: filepath.Join(dev, as+".pem"),
			KeyFile: filepath.Join(dev, as+"-key.pem"), BundleFile: filepath.Join(dev, "bundle.pem")})
		require.NoError(t, err)
		// Reconnect quickly after each kill instead of backing off for
		// longer than a cycle.
		conn, err := client.Dial(client.Config{Address: addr, Source: src, DialOptions: []grpc.DialOption{
			grpc.WithConnectParams(grpc.ConnectParams{MinConnectTimeout: 2 * time.Second,
				Backoff: backoff.Config{BaseDelay: 20 * time.Millisecond, Multiplier: 1.6, MaxDelay: 200 * time.Millisecond}})}})
		require.NoError(t, err)
		t.Cleanup(func() { conn.Close(); src.Close() })
		return conn
	}
	admin := leaseholdv1.NewAdminServiceClient(dial("admin"))
	agents := map[string]leaseholdv1.BrokerServiceClient{
		"spiffe://example.org/agents/agent-1": leaseholdv1.NewBrokerServiceClient(dial("agent-1")),
		"spiffe://example.org/agents/agent-2": leaseholdv1.NewBrokerServiceClient(dial("agent-2")),
	}
	const victim = "spiffe://example.org/agents/agent-2"
	ctx := context.Background()

	broker := startCrashable(t, dir)
	_, err = admin.PutCredential(ctx, &leaseholdv1.PutCredentialRequest{Name: "crm/api", Secret: map[string]string{"api_key": "crash-canary"}})
	require.NoError(t, err)
	_, err = admin.CreateGrant(ctx, &leaseholdv1.CreateGrantRequest{Grant: &leaseholdv1.Grant{
		Subject: &leaseholdv1.Grant_SpiffeIdPrefix{SpiffeIdPrefix: "spiffe://example.org/agents"}, Credential: "crm/api", Scopes: []string{"read"}}})
	require.NoError(t, err)

	type acked struct {
		id, agent string
		released  bool
		at        time.Time
	}
	var totalAcked, totalReleased int
	for cycle := range cycles {
		for _, c := range agents {
			wctx, cancel := context.WithTimeout(ctx, 20*time.Second)
			_, err := c.WhoAmI(wctx, &leaseholdv1.WhoAmIRequest{}, grpc.WaitForReady(true))
			cancel()
			require.NoError(t, err, "agents reconnect after a restart")
		}
		var (
			mu       sync.Mutex
			leases   []*acked
			revokeAt time.Time // when RevokeAgent(victim) was acknowledged
			killed   atomic.Bool
			wg       sync.WaitGroup
		)
		for id, c := range agents {
			for w := range 3 {
				wg.Go(func() {
					for n := 0; !killed.Load(); n++ {
						cctx, cancel := context.WithTimeout(ctx, 2*time.Second)
						resp, err := c.AcquireLease(cctx, &leaseholdv1.AcquireLeaseRequest{Credential: "crm/api", Scopes: []string{"read"},
							Task: &leaseholdv1.Task{Id: fmt.Sprintf("c%d-w%d-%d", cycle, w, n)}})
						cancel()
						if err != nil {
							continue
						}
						a := &acked{id: resp.GetLease().GetId(), agent: id, at: time.Now()}
						mu.Lock()
						leases = append(leases, a)
						mu.Unlock()
						if n%2 == 0 {
							continue // keep some active
						}
						cctx, cancel = context.WithTimeout(ctx, 2*time.Second)
						_, err = c.ReleaseLease(cctx, &leaseholdv1.ReleaseLeaseRequest{LeaseId: a.id})
						cancel()
						if err == nil {
							mu.Lock()
							a.released = true
							mu.Unlock()
						}
					}
				})
			}
		}
		killAfter := time.Duration(300+rand.IntN(900)) * time.Millisecond
		wg.Go(func() {
			time.Sleep(time.Duration(rand.Int64N(int64(killAfter))))
			if _, err := admin.RevokeAgent(ctx, &leaseholdv1.RevokeAgentRequest{SpiffeId: victim, Reason: "crash test"}); err == nil {
				mu.Lock()
				revokeAt = time.Now()
				mu.Unlock()
			}
		})
		time.Sleep(killAfter)
		broker.kill()
		killed.Store(true)
		wg.Wait()

		broker = startCrashable(t, dir)
		active := map[string]leaseholdv1.LeaseState{}
		for id := range agents {
			var token string
			for {
				resp, err := admin.ListLeases(ctx, &leaseholdv1.ListLeasesRequest{AgentId: id, PageSize: 1000, PageToken: token})
				require.NoError(t, err)
				for _, l := range resp.GetLeases() {
					active[l.GetId()] = l.GetState()
				}
				if token = resp.GetNextPageToken(); token == "" {
					break
				}
			}
		}
		for _, a := range leases {
			state, ok := active[a.id]
			require.True(t, ok, "cycle %d: lease %s was answered to %s but is gone after the crash", cycle, a.id, a.agent)
			recs, err := admin.QueryAudit(ctx, &leaseholdv1.QueryAuditRequest{LeaseId: a.id, PageSize: 10, OldestFirst: true})
			require.NoError(t, err)
			require.NotEmpty(t, recs.GetRecords(), "cycle %d: lease %s has no audit record", cycle, a.id)
			first := recs.GetRecords()[0]
			require.Equal(t, leaseholdv1.AuditEvent_AUDIT_EVENT_LEASE_ACQUIRE, first.GetEvent())
			require.Equal(t, leaseholdv1.Decision_DECISION_ALLOW, first.GetDecision())
			if a.released {
				require.NotEqual(t, leaseholdv1.LeaseState_LEASE_STATE_ACTIVE, state, "cycle %d: released lease %s is active again", cycle, a.id)
				totalReleased++
			}
			if !revokeAt.IsZero() && a.agent == victim && a.at.Before(revokeAt) {
				require.NotEqual(t, leaseholdv1.LeaseState_LEASE_STATE_ACTIVE, state, "cycle %d: %s outlived its agent's revocation", cycle, a.id)
			}
		}
		totalAcked += len(leases)
		if !revokeAt.IsZero() {
			resp, err := admin.ListAgents(ctx, &leaseholdv1.ListAgentsRequest{})
			require.NoError(t, err)
			found := false
			for _, ag := range resp.GetAgents() {
				if ag.GetSpiffeId() == victim {
					found = true
					require.True(t, ag.GetRevoked(), "cycle %d: an acknowledged revocation was lost", cycle)
				}
			}
			require.True(t, found)
		}
		v, err := admin.VerifyAudit(ctx, &leaseholdv1.VerifyAuditRequest{})
		require.NoError(t, err)
		require.True(t, v.GetOk(), "cycle %d: audit chain broken at %d: %s", cycle, v.GetFirstBrokenSequence(), v.GetProblem())
		// Next cycle starts with the victim reinstated.
		_, _ = admin.ReinstateAgent(ctx, &leaseholdv1.ReinstateAgentRequest{SpiffeId: victim})
		t.Logf("cycle %d: killed after %s; %d leases acknowledged, revoke acknowledged: %v; all found intact", cycle, killAfter, len(leases), !revokeAt.IsZero())
	}
	broker.stop(t)
	require.Positive(t, totalAcked, "the load ran")
	require.Positive(t, totalReleased)
	st, err := bolt.Open(bolt.Config{Path: dbPath})
	require.NoError(t, err)
	require.NoError(t, st.Check(), "bbolt consistency check after the last crash")
	require.NoError(t, st.Close())
}

type crashable struct {
	cmd    *exec.Cmd
	stderr *lockedBuffer
	done   chan struct{}
}

// startCrashable starts `leasehold serve` in dir and waits until it serves.
func startCrashable(t *testing.T, dir string) *crashable {
	t.Helper()
	cmd := exec.Command(leaseholdBin, "serve", "--config", "leasehold.yaml")
	cmd.Dir = dir
	c := &crashable{cmd: cmd, stderr: &lockedBuffer{}, done: make(chan struct{})}
	cmd.Stderr = c.stderr
	require.NoError(t, cmd.Start())
	go func() { _ = cmd.Wait(); close(c.done) }()
	t.Cleanup(func() { c.kill() })
	servingAddr(t, c.stderr, 20*time.Second)
	return c
}

func (c *crashable) kill() {
	_ = c.cmd.Process.Signal(syscall.SIGKILL)
	<-c.done
}

func (c *crashable) stop(t *testing.T) {
	_ = c.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-c.done:
	case <-time.After(15 * time.Second):
		t.Error("broker did not stop on SIGTERM")
		c.kill()
	}
}

package main

import (
	"bufio"
	"context"
	"encoding/hex"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime/pprof"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc"

	"github.com/leasehold/leasehold/backends"
	"github.com/leasehold/leasehold/backends/static"
	"github.com/leasehold/leasehold/client"
	"github.com/leasehold/leasehold/identity"
	leaseholdv1 "github.com/leasehold/leasehold/proto/leasehold/v1"
	"github.com/leasehold/leasehold/server"
	"github.com/leasehold/leasehold/store"
	"github.com/leasehold/leasehold/store/bolt"
	"github.com/leasehold/leasehold/store/etcd"
	"github.com/leasehold/leasehold/store/seal"
)

// The acquire benchmark.
//
// The broker runs in a child process (this binary, re-executed with
// brokerEnv set) so that its CPU time and peak RSS are measured apart from
// the load generator's. The parent creates the dev CA, optionally fills the
// store with active leases, starts the child, seeds a static credential and
// a grant over the admin API, and gives each agent its own SVID and mTLS
// connection. It then measures, from the same callers against the same
// server: WhoAmI (the ceiling, no store write), and acquire+release cycles
// (each with its fsync'd audit record).

const (
	brokerEnv     = "LEASEHOLD_BENCH_BROKER_DIR"
	profileEnv    = "LEASEHOLD_BENCH_BROKER_CPUPROFILE"
	etcdEnv       = "LEASEHOLD_BENCH_ETCD"
	benchCred     = "bench/static"
	benchAdminID  = "spiffe://bench.test/admin"
	benchBrokerID = "spiffe://bench.test/broker"
	victimID      = "spiffe://bench.test/victim"
)

type acquireOpts struct {
	dir          string
	store        string // bolt or etcd
	brokers      int
	etcd         string // endpoints; empty: start one member
	agents       int
	duration     time.Duration
	prefill      int
	revokeLeases int
	cpuProfile   string
}

func runAcquire(args []string, out io.Writer) error {
	fs := flag.NewFlagSet("acquire", flag.ContinueOnError)
	var o acquireOpts
	fs.StringVar(&o.dir, "dir", "", "directory for the CA and the store (default: a new temporary directory, removed after)")
	fs.IntVar(&o.agents, "agents", 64, "concurrent agents, each with its own SVID and connection")
	fs.DurationVar(&o.duration, "duration", 10*time.Second, "how long each phase (ceiling, acquire) runs")
	fs.IntVar(&o.prefill, "prefill", 0, "active leases (of 10k other agents) in the store before the broker starts; reused if the store already holds them")
	fs.StringVar(&o.cpuProfile, "broker-cpuprofile", "", "write the broker's CPU profile of the acquire phase to this file")
	fs.IntVar(&o.revokeLeases, "revoke-leases", 0, "after the run, time RevokeAgent for an agent holding this many active leases")
	fs.StringVar(&o.store, "store", "bolt", "store engine: bolt (one broker) or etcd (--brokers share it)")
	fs.IntVar(&o.brokers, "brokers", 1, "broker processes sharing the etcd store; agents are spread over them")
	fs.StringVar(&o.etcd, "etcd-endpoints", "", "etcd client URLs (default: a one-member etcd this tool starts on loopback, fsync on, data in --dir)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if o.agents < 1 || o.duration <= 0 {
		return errors.New("--agents must be at least 1 and --duration positive")
	}
	switch {
	case o.store != "bolt" && o.store != "etcd":
		return fmt.Errorf("--store %q: bolt or etcd", o.store)
	case o.brokers < 1 || (o.store == "bolt" && o.brokers != 1):
		return errors.New("--brokers: 1 with bolt (one process owns the file), 1 or more with etcd")
	case o.store == "etcd" && (o.prefill > 0 || o.revokeLeases > 0):
		return errors.New("--prefill and --revoke-leases fill a bbolt file: use them with --store bolt")
	}
	if o.dir == "" {
		d, err := os.MkdirTemp("", "leasehold-bench-")
		if err != nil {
			return err
		}
		defer os.RemoveAll(d)
		o.dir = d
	}
	return acquireBench(o, out)
}

func acquireBench(o acquireOpts, out io.Writer) error {
	ctx := context.Background()
	o.brokers = max(o.brokers, 1)
	if o.store == "" {
		o.store = "bolt"
	}
	ca, err := identity.LoadOrCreateDevCA(filepath.Join(o.dir, "ca"), td)
	if err != nil {
		return err
	}
	dbPath := filepath.Join(o.dir, "leasehold.db")
	if err := prefill(dbPath, o.prefill, o.revokeLeases, out); err != nil {
		return err
	}
	if o.store == "etcd" && o.etcd == "" {
		e, err := startEtcdChild(filepath.Join(o.dir, "etcd"))
		if err != nil {
			return err
		}
		defer e.stop()
		o.etcd = e.addr
		fmt.Fprintf(out, "etcd (one member, fsync on) pid %d at %s\n", e.cmd.Process.Pid, e.addr)
	}
	var children []*brokerChild
	for range o.brokers {
		c, err := startBroker(o.dir, o.cpuProfile, o.etcd)
		if err != nil {
			return err
		}
		defer c.stop()
		children = append(children, c)
	}
	child := children[0]

	issue := func(id string) (identity.StaticSource, error) {
		svid, err := ca.Issue(spiffeid.RequireFromString(id), identity.SVIDOptions{TTL: 24 * time.Hour})
		return identity.StaticSource{SVID: svid, Bundle: ca.Bundle()}, err
	}
	dial := func(id string) (*grpc.ClientConn, error) {
		src, err := issue(id)
		if err != nil {
			return nil, err
		}
		return client.Dial(client.Config{Address: child.addr, Source: src})
	}
	adminConn, err := dial(benchAdminID)
	if err != nil {
		return err
	}
	defer adminConn.Close()
	admin := leaseholdv1.NewAdminServiceClient(adminConn)
	if _, err := leaseholdv1.NewBrokerServiceClient(adminConn).WhoAmI(ctx, &leaseholdv1.WhoAmIRequest{}, grpc.WaitForReady(true)); err != nil {
		return err
	}
	dialOn := func(i int, id string) (*grpc.ClientConn, error) {
		src, err := issue(id)
		if err != nil {
			return nil, err
		}
		return client.Dial(client.Config{Address: children[i%len(children)].addr, Source: src})
	}
	child.startupMS = ms(time.Since(child.started))
	fmt.Fprintf(out, "broker pid %d on %s answered its first RPC %.1f ms after exec, with %d active leases in its store\n",
		child.cmd.Process.Pid, child.addr, child.startupMS, child.active)
	if err := seed(ctx, admin); err != nil {
		return err
	}

	agents := make([]leaseholdv1.BrokerServiceClient, o.agents)
	for i := range agents {
		conn, err := dialOn(i, fmt.Sprintf("spiffe://bench.test/agents/load-%03d", i))
		if err != nil {
			return err
		}
		defer conn.Close()
		agents[i] = leaseholdv1.NewBrokerServiceClient(conn)
		if _, err := agents[i].WhoAmI(ctx, &leaseholdv1.WhoAmIRequest{}); err != nil {
			return fmt.Errorf("agent %d: %w", i, err)
		}
	}

	fmt.Fprintf(out, "ceiling: WhoAmI from %d agents for %s\n", o.agents, o.duration)
	ceiling := phase(out, "whoami", agents, o.duration, func(c leaseholdv1.BrokerServiceClient, _ int, lat *[]time.Duration) error {
		t0 := time.Now()
		_, err := c.WhoAmI(ctx, &leaseholdv1.WhoAmIRequest{})
		*lat = append(*lat, time.Since(t0))
		return err
	})

	cpu0, err := cpuOf(children)
	if err != nil {
		return err
	}
	if o.cpuProfile != "" {
		_ = child.cmd.Process.Signal(syscall.SIGUSR1)
	}
	fmt.Fprintf(out, "acquire+release from %d agents for %s\n", o.agents, o.duration)
	var releaseLat []time.Duration
	var relMu sync.Mutex
	acq := phase(out, "acquire", agents, o.duration, func(c leaseholdv1.BrokerServiceClient, n int, lat *[]time.Duration) error {
		t0 := time.Now()
		resp, err := c.AcquireLease(ctx, &leaseholdv1.AcquireLeaseRequest{Credential: benchCred, Scopes: []string{"read"},
			Task: &leaseholdv1.Task{Id: "bench-" + strconv.Itoa(n), Purpose: "load test"}})
		*lat = append(*lat, time.Since(t0))
		if err != nil {
			return err
		}
		t1 := time.Now()
		_, err = c.ReleaseLease(ctx, &leaseholdv1.ReleaseLeaseRequest{LeaseId: resp.GetLease().GetId()})
		d := time.Since(t1)
		relMu.Lock()
		releaseLat = append(releaseLat, d)
		relMu.Unlock()
		return err
	})
	cpu1, err := cpuOf(children)
	if err != nil {
		return err
	}
	if o.cpuProfile != "" {
		_ = child.cmd.Process.Signal(syscall.SIGUSR2)
	}
	cores := (cpu1 - cpu0).Seconds() / acq.elapsed.Seconds()

	revokeMS := -1.0
	if o.revokeLeases > 0 {
		t0 := time.Now()
		resp, err := admin.RevokeAgent(ctx, &leaseholdv1.RevokeAgentRequest{SpiffeId: victimID, Reason: "benchmark"})
		if err != nil {
			return fmt.Errorf("revoke agent: %w", err)
		}
		revokeMS = ms(time.Since(t0))
		fmt.Fprintf(out, "RevokeAgent ended %d leases, durable in %.1f ms\n", resp.GetLeasesRevoked(), revokeMS)
	}
	rss, anon, file, err := child.memory()
	if err != nil {
		return err
	}
	var all []string
	for i, c := range children {
		if len(children) > 1 {
			all = append(all, fmt.Sprintf("broker %d: %s", i, c.stop()))
		} else {
			all = append(all, c.stop())
		}
	}
	stats := strings.Join(all, "; ")

	ratio := acq.perSec / ceiling.perSec
	p := percentiles(acq.lat)
	rp := percentiles(releaseLat)
	fmt.Fprintf(out, "ceiling %.0f/s (p99 %.2f ms); acquire+release %.0f cycles/s (acquire p50 %.2f p99 %.2f ms, release p99 %.2f ms); broker %.2f cores, peak RSS %.0f MB (at the end %.0f MB anonymous, %.0f MB of the mapped store file); %s\n",
		ceiling.perSec, percentiles(ceiling.lat)[2], acq.perSec, p[0], p[2], rp[2], cores, rss, anon, file, stats)
	fmt.Fprintf(out, "acquire_per_s=%.0f ceiling_per_s=%.0f ratio=%.3f p50_ms=%.2f p90_ms=%.2f p99_ms=%.2f release_p99_ms=%.2f errors=%d agents=%d broker_cpu_cores=%.2f peak_rss_mb=%.0f anon_rss_mb=%.0f startup_ms=%.1f active_leases=%d revoke_ms=%.1f store=%s brokers=%d\n",
		acq.perSec, ceiling.perSec, ratio, p[0], p[1], p[2], rp[2], acq.errors+ceiling.errors, o.agents, cores, rss, anon, child.startupMS, child.active, revokeMS, o.store, o.brokers)
	if acq.firstErr != nil {
		return fmt.Errorf("%d calls failed, first: %w", acq.errors, acq.firstErr)
	}
	return nil
}

type phaseResult struct {
	perSec   float64
	elapsed  time.Duration
	lat      []time.Duration
	errors   int64
	firstErr error
}

// phase runs op from every agent in a loop for d, printing progress each
// second.
func phase(out io.Writer, name string, agents []leaseholdv1.BrokerServiceClient, d time.Duration,
	op func(c leaseholdv1.BrokerServiceClient, n int, lat *[]time.Duration) error) phaseResult {
	var (
		done     atomic.Int64
		errs     atomic.Int64
		firstErr atomic.Pointer[error]
		stop     atomic.Bool
		wg       sync.WaitGroup
		seq      atomic.Int64
	)
	lats := make([][]time.Duration, len(agents))
	start := time.Now()
	for i, c := range agents {
		wg.Go(func() {
			for !stop.Load() {
				if err := op(c, int(seq.Add(1)), &lats[i]); err != nil {
					errs.Add(1)
					firstErr.CompareAndSwap(nil, &err)
					continue
				}
				done.Add(1)
			}
		})
	}
	tick := time.NewTicker(time.Second)
	var last int64
	for range tick.C {
		n := done.Load()
		el := time.Since(start)
		fmt.Fprintf(out, "  %s %4.0fs  %8.0f/s  total %d  errors %d\n", name, el.Seconds(), float64(n-last), n, errs.Load())
		last = n
		if el >= d {
			break
		}
	}
	tick.Stop()
	stop.Store(true)
	elapsed := time.Since(start)
	n := done.Load()
	wg.Wait()
	var all []time.Duration
	for _, l := range lats {
		all = append(all, l...)
	}
	r := phaseResult{perSec: float64(n) / elapsed.Seconds(), elapsed: elapsed, lat: all, errors: errs.Load()}
	if e := firstErr.Load(); e != nil {
		r.firstErr = *e
	}
	return r
}

func seed(ctx context.Context, admin leaseholdv1.AdminServiceClient) error {
	if _, err := admin.GetCredential(ctx, &leaseholdv1.GetCredentialRequest{Name: benchCred}); err == nil {
		return nil // a reused store is already seeded
	}
	if _, err := admin.PutCredential(ctx, &leaseholdv1.PutCredentialRequest{Name: benchCred, Backend: static.Name,
		Secret: map[string]string{"api_key": "bench-not-a-secret"}}); err != nil {
		return fmt.Errorf("put credential: %w", err)
	}
	for _, subj := range []*leaseholdv1.Grant{
		{Subject: &leaseholdv1.Grant_SpiffeIdPrefix{SpiffeIdPrefix: "spiffe://bench.test/agents"}},
		{Subject: &leaseholdv1.Grant_SpiffeId{SpiffeId: victimID}},
	} {
		subj.Credential, subj.Scopes = benchCred, []string{"read"}
		if _, err := admin.CreateGrant(ctx, &leaseholdv1.CreateGrantRequest{Grant: subj}); err != nil {
			return fmt.Errorf("create grant: %w", err)
		}
	}
	return nil
}

// prefill writes active leases straight into the store (bulk transactions,
// no fsync: this is set-up, not the measured path): n spread over 10k other
// agents, and victim leases held by one agent for the RevokeAgent timing. A
// store that already holds them is reused.
func prefill(path string, n, victim int, out io.Writer) error {
	if n == 0 && victim == 0 {
		return nil
	}
	st, err := bolt.Open(bolt.Config{Path: path, NoSync: true})
	if err != nil {
		return err
	}
	defer st.Close()
	ctx := context.Background()
	var have int64
	if err := st.View(ctx, func(tx store.ReadTx) error {
		have, err = tx.ActiveLeaseCount()
		return err
	}); err != nil {
		return err
	}
	want := int64(n + victim)
	if have >= want {
		fmt.Fprintf(out, "store holds %d active leases already\n", have)
		return nil
	}
	now := time.Now()
	t0 := time.Now()
	const batch = 20_000
	// Ids like the broker's own: milliseconds first, so they sort by age
	// (here: 100 leases per millisecond, starting an hour ago).
	base := uint64(now.Add(-time.Hour).UnixMilli())
	mk := func(i int, agent string) *store.Lease {
		var id [16]byte
		ms := base + uint64(i/100)
		for b := range 6 {
			id[b] = byte(ms >> (8 * (5 - b)))
		}
		for b := range 4 {
			id[6+b] = byte(uint32(i) >> (8 * (3 - b)))
		}
		copy(id[10:], "prefil")
		return &store.Lease{ID: "ls_" + hex.EncodeToString(id[:]), AgentID: agent, Credential: benchCred, Backend: static.Name,
			Scopes: []string{"read"}, TaskID: fmt.Sprintf("prefill-%d", i/10), GrantID: "gr_prefill", State: store.LeaseActive,
			TTL: 24 * time.Hour, IssuedAt: now, ExpiresAt: now.Add(24 * time.Hour), MaxExpiresAt: now.Add(24 * time.Hour), CredentialVersion: 1}
	}
	total := n + victim
	for lo := int(have); lo < total; lo += batch {
		hi := min(lo+batch, total)
		if err := st.Update(ctx, func(tx store.Tx) error {
			for i := lo; i < hi; i++ {
				agent := fmt.Sprintf("spiffe://bench.test/prefill/p%05d", i%10_000)
				if i >= n {
					agent = victimID
				}
				if err := tx.PutLease(mk(i, agent)); err != nil {
					return err
				}
			}
			return nil
		}); err != nil {
			return err
		}
		if hi%200_000 == 0 || hi == total {
			fmt.Fprintf(out, "  prefill %d/%d leases (%.0f/s)\n", hi, total, float64(hi-int(have))/time.Since(t0).Seconds())
		}
	}
	return nil
}

// brokerChild is the broker process under measurement.
type brokerChild struct {
	cmd     *exec.Cmd
	addr    string
	started time.Time
	// startupMS is from exec until the broker answered its first RPC.
	startupMS float64
	active    int64
	lines     *bufio.Scanner
	once      sync.Once
	stats     string
}

// cpuOf sums the brokers' CPU time.
func cpuOf(children []*brokerChild) (time.Duration, error) {
	var sum time.Duration
	for _, c := range children {
		d, err := c.cpu()
		if err != nil {
			return 0, err
		}
		sum += d
	}
	return sum, nil
}

func startBroker(dir, cpuProfile, etcdEndpoints string) (*brokerChild, error) {
	self, err := os.Executable()
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(self, "broker")
	cmd.Env = append(os.Environ(), brokerEnv+"="+dir, profileEnv+"="+cpuProfile, etcdEnv+"="+etcdEndpoints)
	cmd.Stderr = os.Stderr
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	started := time.Now()
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	c := &brokerChild{cmd: cmd, lines: bufio.NewScanner(stdout), started: started}
	if !c.lines.Scan() {
		_ = cmd.Wait()
		return nil, errors.New("broker exited before it was ready")
	}
	// "ready ADDR MS_TO_LISTEN ACTIVE"
	f := strings.Fields(c.lines.Text())
	if len(f) != 4 || f[0] != "ready" {
		c.stop()
		return nil, fmt.Errorf("unexpected line from broker: %q", c.lines.Text())
	}
	c.addr = f[1]
	c.active, _ = strconv.ParseInt(f[3], 10, 64)
	return c, nil
}

// cpu is the broker's user+system CPU time so far.
func (c *brokerChild) cpu() (time.Duration, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", c.cmd.Process.Pid))
	if err != nil {
		return 0, err
	}
	// Fields after the command name, which is in parentheses.
	rest := strings.Fields(string(b[strings.LastIndexByte(string(b), ')')+2:]))
	if len(rest) < 13 {
		return 0, errors.New("short /proc stat")
	}
	ut, _ := strconv.ParseInt(rest[11], 10, 64)
	st, _ := strconv.ParseInt(rest[12], 10, 64)
	const hz = 100 // USER_HZ on Linux
	return time.Duration(ut+st) * time.Second / hz, nil
}

// memory reads the broker's peak resident set (VmHWM) and the current
// split of its resident set into anonymous memory (Go heap, stacks) and
// pages of the mmap'd store file (page cache the kernel can reclaim), in MB.
func (c *brokerChild) memory() (peak, anon, file float64, err error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", c.cmd.Process.Pid))
	if err != nil {
		return 0, 0, 0, err
	}
	fields := map[string]*float64{"VmHWM:": &peak, "RssAnon:": &anon, "RssFile:": &file}
	for _, line := range strings.Split(string(b), "\n") {
		for name, dst := range fields {
			if v, ok := strings.CutPrefix(line, name); ok {
				kb, err := strconv.ParseFloat(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 64)
				if err != nil {
					return 0, 0, 0, err
				}
				*dst = kb / 1024
			}
		}
	}
	if peak == 0 {
		return 0, 0, 0, errors.New("no VmHWM in /proc status")
	}
	return peak, anon, file, nil
}

// stop ends the broker and returns its commit statistics line.
func (c *brokerChild) stop() string {
	c.once.Do(func() {
		_ = c.cmd.Process.Signal(syscall.SIGTERM)
		for c.lines.Scan() {
			if s, ok := strings.CutPrefix(c.lines.Text(), "stats "); ok {
				c.stats = s
			}
		}
		_ = c.cmd.Wait()
	})
	return c.stats
}

// runBroker is the child process: a broker on a fsync'd bbolt store in dir,
// with the per-agent quotas off (they are policy, not capacity), until
// SIGTERM. Its first line says where it listens and how long start-up took.
func runBroker(dir string) error {
	start := time.Now()
	ctx := context.Background()
	ca, err := identity.LoadOrCreateDevCA(filepath.Join(dir, "ca"), td)
	if err != nil {
		return err
	}
	svid, err := ca.Issue(spiffeid.RequireFromString(benchBrokerID), identity.SVIDOptions{TTL: 24 * time.Hour})
	if err != nil {
		return err
	}
	st, stats, err := openBenchStore(dir, os.Getenv(etcdEnv))
	if err != nil {
		return err
	}
	defer st.Close()
	admins, err := identity.NewAdminSet(td, []string{benchAdminID})
	if err != nil {
		return err
	}
	kekPath := filepath.Join(dir, "kek")
	if err := seal.EnsureFile(kekPath); err != nil {
		return err
	}
	kek, err := seal.LoadFile(kekPath)
	if err != nil {
		return err
	}
	reg := backends.NewRegistry()
	reg.Register(static.Name, static.Backend{})
	srv, err := server.New(server.Config{TrustDomain: td, Admins: admins, AcquireRate: -1, MaxActiveLeasesPerAgent: -1},
		server.Deps{Store: st, Backends: reg, Keyring: kek,
			Credentials: identity.ServerCredentials(identity.StaticSource{SVID: svid, Bundle: ca.Bundle()}, td),
			Logger:      slog.New(slog.DiscardHandler)})
	if err != nil {
		return err
	}
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	served := make(chan error, 1)
	go func() { served <- srv.Serve(lis) }()
	var active int64
	if err := st.View(ctx, func(tx store.ReadTx) error {
		active, err = tx.ActiveLeaseCount()
		return err
	}); err != nil {
		return err
	}
	fmt.Printf("ready %s %.1f %d\n", lis.Addr(), ms(time.Since(start)), active)
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, os.Interrupt, syscall.SIGUSR1, syscall.SIGUSR2)
wait:
	for {
		select {
		case s := <-sig:
			if s != syscall.SIGUSR1 && s != syscall.SIGUSR2 {
				break wait
			}
			if err := profile(s == syscall.SIGUSR1); err != nil {
				return err
			}
		case err := <-served:
			return err
		}
	}
	srv.Stop(ctx)
	fmt.Printf("stats %s\n", stats())
	return nil
}

// openBenchStore opens the broker's store: the bbolt file in dir, or the
// etcd cluster at endpoints. stats describes its commits afterwards.
func openBenchStore(dir, endpoints string) (store.Store, func() string, error) {
	if endpoints == "" {
		st, err := bolt.Open(bolt.Config{Path: filepath.Join(dir, "leasehold.db")})
		if err != nil {
			return nil, nil, err
		}
		return st, func() string {
			s := st.CommitStats()
			return fmt.Sprintf("%d store writes in %d commits (%.1f per fsync, %.1f pages each), %d batches retried",
				s.Calls, s.Commits, float64(s.Calls)/max(float64(s.Commits), 1), float64(s.PagesWritten)/max(float64(s.Commits), 1), s.Retries)
		}, nil
	}
	st, err := etcd.Open(context.Background(), etcd.Config{Endpoints: strings.Split(endpoints, ","), Prefix: "/leasehold-bench/",
		MaxTxnOps: etcdMaxTxnOps, MaxRequestBytes: etcdMaxRequestBytes})
	if err != nil {
		return nil, nil, err
	}
	return st, func() string {
		s := st.CommitStats()
		return fmt.Sprintf("%d store writes in %d etcd commits (%.1f per commit), %d lost to another broker's commit (%d groups then under the write lock), %.1f reads from etcd per write, read cache %d hits %d misses",
			s.Calls, s.Commits, float64(s.Calls)/max(float64(s.Commits), 1), s.Conflicts, s.Locked, float64(s.Reads)/max(float64(s.Calls), 1), s.CacheHits, s.CacheMisses)
	}, nil
}

// profile starts or stops the broker's CPU profile (SIGUSR1, SIGUSR2 from
// the parent around the acquire phase).
func profile(start bool) error {
	path := os.Getenv(profileEnv)
	if path == "" {
		return nil
	}
	if !start {
		pprof.StopCPUProfile()
		return nil
	}
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	return pprof.StartCPUProfile(f)
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

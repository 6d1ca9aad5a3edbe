// Command leasehold-bench measures Leasehold at scale.
//
//	leasehold-bench acquire --agents 64 --duration 10s [--prefill 1000000] [--revoke-leases 10000]
//	leasehold-bench audit --db /var/tmp/audit.db --records 10000000 --queries 2000
//
// The acquire benchmark runs a broker (in a child process, so its CPU and
// peak RSS are its own) and N agents with their own SVIDs over mTLS; it
// measures WhoAmI from the same agents as the ceiling, then acquire+release
// cycles with durable audit, and prints the ratio. See acquire.go.
//
// The audit benchmark fills a bbolt store with synthetic audit records
// (10k agents, 1k credentials, ~1M tasks, 30 days; reusing the file if it
// already holds enough), then starts a real broker on it over mTLS on
// loopback and times QueryAudit pages of 100 for a mix of filters. The last
// line is machine-readable.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"text/tabwriter"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/leasehold/leasehold/backends"
	"github.com/leasehold/leasehold/client"
	"github.com/leasehold/leasehold/identity"
	leaseholdv1 "github.com/leasehold/leasehold/proto/leasehold/v1"
	"github.com/leasehold/leasehold/server"
	"github.com/leasehold/leasehold/store"
	"github.com/leasehold/leasehold/store/bolt"
	"github.com/leasehold/leasehold/store/seal"
)

func main() {
	var err error
	switch {
	case os.Getenv(brokerEnv) != "":
		err = runBroker(os.Getenv(brokerEnv))
	case len(os.Args) >= 2 && os.Args[1] == "audit":
		err = runAudit(os.Args[2:], os.Stdout)
	case len(os.Args) >= 2 && os.Args[1] == "acquire":
		err = runAcquire(os.Args[2:], os.Stdout)
	default:
		fmt.Fprintln(os.Stderr, "usage: leasehold-bench audit --db PATH [--records N] [--queries N]")
		fmt.Fprintln(os.Stderr, "       leasehold-bench acquire [--agents 64] [--duration 10s] [--prefill N] [--revoke-leases N] [--dir DIR]")
		fmt.Fprintln(os.Stderr, "                                 [--store etcd [--brokers N] [--etcd-endpoints URLS]]")
		os.Exit(2)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "leasehold-bench:", err)
		os.Exit(1)
	}
}

const (
	benchAgents      = 10_000
	benchCredentials = 1_000
	benchSpan        = 30 * 24 * time.Hour
)

var td = spiffeid.RequireTrustDomainFromString("bench.test")

func agentID(i int) string  { return fmt.Sprintf("spiffe://bench.test/agents/a%05d", i) }
func credName(i int) string { return fmt.Sprintf("cred/c%04d", i) }

func runAudit(args []string, out io.Writer) error {
	fs := flag.NewFlagSet("audit", flag.ContinueOnError)
	dbPath := fs.String("db", "", "bbolt file to fill (kept for re-runs)")
	records := fs.Int("records", 1_000_000, "audit records the store must hold")
	queries := fs.Int("queries", 1000, "queries to time")
	pageSize := fs.Int("page", 100, "records per page")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *dbPath == "" {
		return errors.New("--db is required")
	}
	start := time.Now().Add(-benchSpan).UTC().Truncate(time.Second)
	if err := generate(*dbPath, *records, start, out); err != nil {
		return err
	}
	return measure(*dbPath, *queries, *pageSize, out)
}

// generate appends synthetic records until the store holds n.
func generate(path string, n int, start time.Time, out io.Writer) error {
	st, err := bolt.Open(bolt.Config{Path: path, NoSync: true})
	if err != nil {
		return err
	}
	defer st.Close()
	ctx := context.Background()
	var have uint64
	if err := st.View(ctx, func(tx store.ReadTx) error {
		have, err = tx.LastAuditSequence()
		return err
	}); err != nil {
		return err
	}
	if int(have) >= n {
		fmt.Fprintf(out, "store holds %d records already\n", have)
		return nil
	}
	rng := rand.New(rand.NewPCG(uint64(have), 7))
	step := benchSpan / time.Duration(n)
	began := time.Now()
	const batch = 20_000
	for i := int(have); i < n; {
		err := st.Update(ctx, func(tx store.Tx) error {
			for j := 0; j < batch && i < n; j++ {
				r := synthetic(rng, i)
				r.Time = start.Add(time.Duration(i) * step)
				if _, err := tx.AppendAudit(r); err != nil {
					return err
				}
				i++
			}
			return nil
		})
		if err != nil {
			return err
		}
		if i%500_000 < batch || i == n {
			el := time.Since(began)
			fmt.Fprintf(out, "generated %d/%d records (%.0f/s)\n", i, n, float64(i-int(have))/el.Seconds())
		}
	}
	return nil
}

// synthetic makes record i: a lease's acquire, renew and release in a row,
// one acquire in ten denied.
func synthetic(rng *rand.Rand, i int) *store.AuditRecord {
	lease := i / 3
	lr := rand.New(rand.NewPCG(uint64(lease), 1)) // the same agent/credential/task for a lease's events
	agent, cred := agentID(lr.IntN(benchAgents)), credName(lr.IntN(benchCredentials))
	task := fmt.Sprintf("task-%07d", lr.IntN(1_000_000))
	r := &store.AuditRecord{Actor: agent, AgentID: agent, Credential: cred, Scopes: []string{"read"},
		TaskID: task, TaskPurpose: "synthetic load", Decision: store.Allow, Code: "OK",
		RequestID: fmt.Sprintf("%024x", rng.Uint64())}
	switch i % 3 {
	case 0:
		r.Event = store.EventLeaseAcquire
		if lr.IntN(10) == 0 {
			r.Decision, r.Code, r.Reason = store.Deny, "PermissionDenied", "scopes: write not granted"
			return r
		}
	case 1:
		r.Event = store.EventLeaseRenew
	default:
		r.Event = store.EventLeaseRelease
	}
	r.LeaseID = fmt.Sprintf("ls_%032x", lease)
	r.GrantID = fmt.Sprintf("gr_%032x", lr.IntN(50_000))
	return r
}

type kind struct {
	name string
	make func(rng *rand.Rand, start time.Time, n uint64) *leaseholdv1.QueryAuditRequest
}

var kinds = []kind{
	{"agent", func(r *rand.Rand, _ time.Time, _ uint64) *leaseholdv1.QueryAuditRequest {
		return &leaseholdv1.QueryAuditRequest{AgentId: agentID(r.IntN(benchAgents))}
	}},
	{"credential", func(r *rand.Rand, _ time.Time, _ uint64) *leaseholdv1.QueryAuditRequest {
		return &leaseholdv1.QueryAuditRequest{Credential: credName(r.IntN(benchCredentials))}
	}},
	{"task", func(r *rand.Rand, _ time.Time, _ uint64) *leaseholdv1.QueryAuditRequest {
		return &leaseholdv1.QueryAuditRequest{TaskId: fmt.Sprintf("task-%07d", r.IntN(1_000_000))}
	}},
	{"lease", func(r *rand.Rand, _ time.Time, n uint64) *leaseholdv1.QueryAuditRequest {
		return &leaseholdv1.QueryAuditRequest{LeaseId: fmt.Sprintf("ls_%032x", r.Uint64N(n/3))}
	}},
	{"agent+deny", func(r *rand.Rand, _ time.Time, _ uint64) *leaseholdv1.QueryAuditRequest {
		return &leaseholdv1.QueryAuditRequest{AgentId: agentID(r.IntN(benchAgents)), Decision: leaseholdv1.Decision_DECISION_DENY}
	}},
	{"credential+day", func(r *rand.Rand, start time.Time, _ uint64) *leaseholdv1.QueryAuditRequest {
		from := start.Add(time.Duration(r.IntN(29)) * 24 * time.Hour)
		return &leaseholdv1.QueryAuditRequest{Credential: credName(r.IntN(benchCredentials)),
			StartTime: timestamppb.New(from), EndTime: timestamppb.New(from.Add(24 * time.Hour))}
	}},
	{"hour", func(r *rand.Rand, start time.Time, _ uint64) *leaseholdv1.QueryAuditRequest {
		from := start.Add(time.Duration(r.IntN(29*24)) * time.Hour)
		return &leaseholdv1.QueryAuditRequest{StartTime: timestamppb.New(from), EndTime: timestamppb.New(from.Add(time.Hour))}
	}},
	{"credential,oldest", func(r *rand.Rand, _ time.Time, _ uint64) *leaseholdv1.QueryAuditRequest {
		return &leaseholdv1.QueryAuditRequest{Credential: credName(r.IntN(benchCredentials)), OldestFirst: true}
	}},
	{"deny", func(*rand.Rand, time.Time, uint64) *leaseholdv1.QueryAuditRequest {
		return &leaseholdv1.QueryAuditRequest{Decision: leaseholdv1.Decision_DECISION_DENY}
	}},
}

// measure serves the store from a real broker and times query pages.
func measure(path string, queries, pageSize int, out io.Writer) error {
	ctx := context.Background()
	st, err := bolt.Open(bolt.Config{Path: path})
	if err != nil {
		return err
	}
	defer st.Close()
	var n uint64
	var first time.Time
	if err := st.View(ctx, func(tx store.ReadTx) error {
		if n, err = tx.LastAuditSequence(); err != nil {
			return err
		}
		rs, err := tx.QueryAudit(store.AuditQuery{Ascending: true, Limit: 1})
		if len(rs) == 1 {
			first = rs[0].Time
		}
		return err
	}); err != nil {
		return err
	}
	ca, err := identity.NewDevCA(td)
	if err != nil {
		return err
	}
	issue := func(id string) (identity.StaticSource, error) {
		svid, err := ca.Issue(spiffeid.RequireFromString(id), identity.SVIDOptions{})
		return identity.StaticSource{SVID: svid, Bundle: ca.Bundle()}, err
	}
	brokerSrc, err := issue("spiffe://bench.test/broker")
	if err != nil {
		return err
	}
	adminSrc, err := issue("spiffe://bench.test/admin")
	if err != nil {
		return err
	}
	admins, err := identity.NewAdminSet(td, []string{"spiffe://bench.test/admin"})
	if err != nil {
		return err
	}
	kek, err := seal.New(make([]byte, seal.KeySize))
	if err != nil {
		return err
	}
	srv, err := server.New(server.Config{TrustDomain: td, Admins: admins, ReaperInterval: time.Hour},
		server.Deps{Store: st, Backends: backends.NewRegistry(), Keyring: kek, Credentials: identity.ServerCredentials(brokerSrc, td),
			Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		return err
	}
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	go func() { _ = srv.Serve(lis) }()
	defer srv.Stop(ctx)
	conn, err := client.Dial(client.Config{Address: lis.Addr().String(), Source: adminSrc})
	if err != nil {
		return err
	}
	defer conn.Close()
	admin := leaseholdv1.NewAdminServiceClient(conn)
	if _, err := admin.GetAuditCheckpoint(ctx, &leaseholdv1.GetAuditCheckpointRequest{}); err != nil {
		return err
	}
	var size int64
	if fi, err := os.Stat(path); err == nil {
		size = fi.Size()
	}
	fmt.Fprintf(out, "querying %d records (%s, %.1f GB) with %d pages of %d over mTLS\n", n, filepath.Base(path), float64(size)/1e9, queries, pageSize)

	rng := rand.New(rand.NewPCG(42, 42))
	lat := map[string][]time.Duration{}
	var all []time.Duration
	var returned int
	for q := range queries {
		k := kinds[q%len(kinds)]
		req := k.make(rng, first, n)
		req.PageSize = int32(pageSize)
		// Every other query also fetches its second page.
		pages := 1 + q/len(kinds)%2
		for p := 0; p < pages; p++ {
			t0 := time.Now()
			resp, err := admin.QueryAudit(ctx, req)
			d := time.Since(t0)
			if err != nil {
				return fmt.Errorf("%s: %w", k.name, err)
			}
			returned += len(resp.GetRecords())
			lat[k.name] = append(lat[k.name], d)
			all = append(all, d)
			if req.PageToken = resp.GetNextPageToken(); req.PageToken == "" {
				break
			}
		}
	}
	tw := tabwriter.NewWriter(out, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "query\tpages\tp50 ms\tp90 ms\tp99 ms\tmax ms\t")
	names := make([]string, 0, len(lat))
	for name := range lat {
		names = append(names, name)
	}
	sort.Strings(names)
	for _, name := range names {
		p := percentiles(lat[name])
		fmt.Fprintf(tw, "%s\t%d\t%.2f\t%.2f\t%.2f\t%.2f\t\n", name, len(lat[name]), p[0], p[1], p[2], p[3])
	}
	tw.Flush()
	p := percentiles(all)
	fmt.Fprintf(out, "records=%d pages=%d returned=%d p50_ms=%.2f p90_ms=%.2f p99_ms=%.2f max_ms=%.2f\n",
		n, len(all), returned, p[0], p[1], p[2], p[3])
	return nil
}

func percentiles(ds []time.Duration) [4]float64 {
	s := slices.Clone(ds)
	slices.Sort(s)
	at := func(q float64) float64 {
		i := int(q * float64(len(s)-1))
		return float64(s[i].Microseconds()) / 1000
	}
	return [4]float64{at(0.5), at(0.9), at(0.99), float64(s[len(s)-1].Microseconds()) / 1000}
}

package server_test

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"go.opentelemetry.io/otel/sdk/metric/metricdata"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/leasehold/leasehold/backends/oauth2/hydratest"
	"github.com/leasehold/leasehold/backends/postgres/pgtest"
	leaseholdv1 "github.com/leasehold/leasehold/proto/leasehold/v1"
	"github.com/leasehold/leasehold/server"
	"github.com/leasehold/leasehold/server/auditsink"
)

// TestLeakScan runs the whole flow on every backend — static, PostgreSQL
// (a role per lease) and OAuth2 (a token per lease, on Hydra) — with canary
// values as stored secrets, plus denials, a rejected put that echoes
// nothing, delegation, revocation and expiry. Then it scans everything the
// broker writes or says for every stored secret and every issued one: the
// log, the spans, the metrics, the audit trail (API and exported file),
// error messages, and the raw bytes of the store file.
func TestLeakScan(t *testing.T) {
	pg := pgtest.Start(t)
	const pgAdminPW = "CANARY-leak-pg-admin-8d1f"
	pg.Exec(t, "CREATE ROLE leak_admin LOGIN CREATEROLE PASSWORD '"+pgAdminPW+"'")
	pg.Exec(t, "CREATE ROLE leak_read NOLOGIN")
	hy := hydratest.Start(t)
	oc := hy.CreateClient(t, "client_secret_basic", "mail.read")

	exported := filepath.Join(t.TempDir(), "audit.jsonl")
	e := newEnv(t, noQuotas, func(c *server.Config) {
		c.RevocationMinBackoff, c.RevocationMaxBackoff, c.RevocationPoll = 50*time.Millisecond, 200*time.Millisecond, 50*time.Millisecond
	})
	e.stop()
	e.sinks = append(e.sinks, &auditsink.File{Path: exported})
	e.start()

	const staticCanary = "CANARY-leak-static-4c2a"
	stored := []string{staticCanary, pgAdminPW, oc.Secret}
	var issued []string
	var errs []string

	e.putStatic("crm/api", map[string]string{"api_key": staticCanary})
	_, err := e.admin.PutCredential(ctx, &leaseholdv1.PutCredentialRequest{Name: "db/leak", Backend: "postgres",
		Config: map[string]string{"host": pg.Host, "port": strconv.Itoa(pg.Port), "database": "postgres", "sslmode": "disable",
			"admin_user": "leak_admin", "scope.read": "GRANT leak_read TO {{role}}"},
		Secret: map[string]string{"admin_password": pgAdminPW}})
	require.NoError(t, err)
	_, err = e.admin.PutCredential(ctx, &leaseholdv1.PutCredentialRequest{Name: "mail/api", Backend: "oauth2",
		Config: map[string]string{"token_url": hy.TokenURL(), "revocation_url": hy.RevocationURL(), "scopes": "mail.read"},
		Secret: map[string]string{"client_id": oc.ID, "client_secret": oc.Secret}})
	require.NoError(t, err)
	// A rejected put does not echo the value it was given.
	_, err = e.admin.PutCredential(ctx, &leaseholdv1.PutCredentialRequest{Name: "mail/bad", Backend: "oauth2",
		Config: map[string]string{"token_url": "ftp://x"}, Secret: map[string]string{"client_secret": staticCanary}})
	require.Error(t, err)
	errs = append(errs, err.Error())

	for _, c := range []string{"crm/api", "db/leak", "mail/api"} {
		_, err := e.admin.CreateGrant(ctx, &leaseholdv1.CreateGrantRequest{Grant: &leaseholdv1.Grant{
			Subject: &leaseholdv1.Grant_SpiffeId{SpiffeId: agent1ID}, Credential: c,
			Scopes: map[string][]string{"crm/api": {"read"}, "db/leak": {"read"}, "mail/api": {"mail.read"}}[c], MaxDelegationDepth: 1}})
		require.NoError(t, err)
	}
	acquire := func(cred, task, scope string, ttl time.Duration) *leaseholdv1.AcquireLeaseResponse {
		t.Helper()
		l, err := e.agent1.AcquireLease(ctx, &leaseholdv1.AcquireLeaseRequest{Credential: cred, Scopes: []string{scope},
			Task: &leaseholdv1.Task{Id: task}, Ttl: durationpb.New(ttl)})
		require.NoError(t, err)
		// The secret fields (not host, port, database or token_type).
		for _, k := range []string{"api_key", "password", "dsn", "access_token"} {
			if v := l.GetSecret()[k]; v != "" {
				issued = append(issued, v)
			}
		}
		return l
	}
	s1 := acquire("crm/api", "leak-1", "read", time.Minute)
	p1 := acquire("db/leak", "leak-1", "read", time.Minute)
	o1 := acquire("mail/api", "leak-1", "mail.read", time.Minute)
	acquire("db/leak", "leak-2", "read", time.Minute)
	acquire("mail/api", "leak-2", "mail.read", time.Minute)
	require.Contains(t, issued, staticCanary, "sanity: the static secret was handed out")

	// Denials, a delegation, releases, an expiry, a revocation.
	_, err = e.agent2.AcquireLease(ctx, acquireReq("crm/api", "leak-1", "read"))
	errs = append(errs, err.Error())
	_, err = e.agent1.DelegateGrant(ctx, &leaseholdv1.DelegateGrantRequest{Credential: "crm/api", TaskId: "leak-1", Subtask: "sub",
		DelegateSpiffeId: agent2ID, Scopes: []string{"read"}, Ttl: durationpb.New(time.Minute)})
	require.NoError(t, err)
	_, err = e.agent2.AcquireLease(ctx, acquireReq("crm/api", "leak-1/sub", "read"))
	require.NoError(t, err)
	for _, l := range []*leaseholdv1.AcquireLeaseResponse{s1, p1, o1} {
		_, err = e.agent1.ReleaseLease(ctx, &leaseholdv1.ReleaseLeaseRequest{LeaseId: l.GetLease().GetId()})
		require.NoError(t, err)
	}
	e.clock.Advance(2 * time.Minute)
	time.Sleep(200 * time.Millisecond) // let the reaper and the revocation queue run
	_, err = e.admin.RevokeAgent(ctx, &leaseholdv1.RevokeAgentRequest{SpiffeId: agent1ID, Reason: "leak scan"})
	require.NoError(t, err)
	_, err = e.agent1.AcquireLease(ctx, acquireReq("crm/api", "leak-3", "read"))
	errs = append(errs, err.Error())
	require.Eventually(t, func() bool {
		resp, err := e.admin.ListLeases(ctx, &leaseholdv1.ListLeasesRequest{AgentId: agent1ID})
		require.NoError(t, err)
		for _, l := range resp.GetLeases() {
			if l.GetCredential() != "crm/api" && l.GetUpstreamRevocation().GetState() != leaseholdv1.UpstreamRevocation_STATE_DONE {
				return false
			}
		}
		return true
	}, 20*time.Second, 50*time.Millisecond, "upstream credentials revoked")
	require.Eventually(t, func() bool {
		data, _ := os.ReadFile(exported)
		return strings.Contains(string(data), "agent.revoke")
	}, 10*time.Second, 20*time.Millisecond, "the export caught up")

	// What the broker said and wrote.
	audit, err := protojson.Marshal(&leaseholdv1.QueryAuditResponse{Records: e.audit(nil)})
	require.NoError(t, err)
	var spans strings.Builder
	for _, s := range e.spans.Ended() {
		fmt.Fprint(&spans, s.Name(), s.Attributes(), s.Events(), s.Status(), "\n")
	}
	var rm metricdata.ResourceMetrics
	require.NoError(t, e.metrics.Collect(ctx, &rm))
	metrics := fmt.Sprintf("%+v", rm)
	e.stop()
	exportedBytes, err := os.ReadFile(exported)
	require.NoError(t, err)
	db, err := os.ReadFile(filepath.Join(e.dir, "leasehold.db"))
	require.NoError(t, err)

	places := map[string]string{
		"log": e.logs.String(), "spans": spans.String(), "metrics": metrics, "audit (API)": string(audit),
		"audit (exported file)": string(exportedBytes), "errors": strings.Join(errs, "\n"), "store file": string(db),
	}
	require.NotEmpty(t, places["log"])
	require.NotEmpty(t, places["spans"])
	for _, secret := range append(stored, issued...) {
		for where, text := range places {
			if strings.Contains(text, secret) {
				t.Errorf("a secret (%.12s…) appears in the %s", secret, where)
			}
		}
	}
	require.Contains(t, string(db), "db/leak", "sanity: the store file is the one that was written")
	t.Logf("scanned %d stored and %d issued secrets across %d places", len(stored), len(issued), len(places))
}

package server_test

import (
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"google.golang.org/grpc/codes"

	leaseholdv1 "github.com/leasehold/leasehold/proto/leasehold/v1"
	"github.com/leasehold/leasehold/server"
)

// webhook is an HTTP receiver on loopback collecting what the broker posts.
type webhook struct {
	mu     sync.Mutex
	events []server.AnomalyEvent
	raw    []string
}

func startWebhook(t *testing.T) (*webhook, string) {
	w := &webhook{}
	srv := httptest.NewServer(http.HandlerFunc(func(rw http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		var ev server.AnomalyEvent
		if json.Unmarshal(body, &ev) == nil && r.Header.Get("Content-Type") == "application/json" {
			w.mu.Lock()
			w.events, w.raw = append(w.events, ev), append(w.raw, string(body))
			w.mu.Unlock()
		}
		rw.WriteHeader(http.StatusNoContent)
	}))
	t.Cleanup(srv.Close)
	return w, srv.URL
}

func (w *webhook) got() []server.AnomalyEvent {
	w.mu.Lock()
	defer w.mu.Unlock()
	return append([]server.AnomalyEvent(nil), w.events...)
}

// A task is expected to use the CRM and the mailer. Reaching for the
// production database in that task is refused, audited, posted to the
// webhook and — as the grant asks — suspends the agent; the same database
// in another task, before that, was fine.
func TestAnomalyGuardSuspendsAndNotifies(t *testing.T) {
	hook, url := startWebhook(t)
	e := newEnv(t, noQuotas, func(c *server.Config) { c.AnomalyWebhookURL = url })
	for _, c := range []string{"crm/api", "mail/api", "db/prod"} {
		e.putStatic(c, map[string]string{"k": "CANARY-anomaly-" + c})
	}
	_, err := e.admin.CreateGrant(ctx, &leaseholdv1.CreateGrantRequest{Grant: &leaseholdv1.Grant{
		Subject: &leaseholdv1.Grant_SpiffeId{SpiffeId: agent1ID}, Credential: "crm/api", Scopes: []string{"read"},
		ExpectedCredentials: []string{"mail/api"}, SuspendOnAnomaly: true}})
	require.NoError(t, err)
	e.grant("mail/api", agent1ID, "read")
	e.grant("db/prod", agent1ID, "read")

	_, err = e.agent1.AcquireLease(ctx, acquireReq("db/prod", "nightly-backup", "read"))
	require.NoError(t, err, "another task may use the database")
	crm, err := e.agent1.AcquireLease(ctx, acquireReq("crm/api", "ticket-5", "read"))
	require.NoError(t, err)
	_, err = e.agent1.AcquireLease(ctx, acquireReq("mail/api", "ticket-5", "read"))
	require.NoError(t, err, "the mailer is expected in this task")

	_, err = e.agent1.AcquireLease(ctx, acquireReq("db/prod", "ticket-5", "read"))
	requireCode(t, err, codes.PermissionDenied, "anomaly: task ticket-5 was expected to use only crm/api, mail/api")
	require.Contains(t, err.Error(), "suspended")

	// Suspended: revoked like RevokeAgent, every lease ended.
	agents, err := e.admin.ListAgents(ctx, &leaseholdv1.ListAgentsRequest{})
	require.NoError(t, err)
	for _, a := range agents.GetAgents() {
		if a.GetSpiffeId() == agent1ID {
			require.True(t, a.GetRevoked())
			require.Equal(t, "leasehold:anomaly-guard", a.GetRevokedBy())
		}
	}
	active, err := e.admin.ListLeases(ctx, &leaseholdv1.ListLeasesRequest{AgentId: agent1ID, ActiveOnly: true})
	require.NoError(t, err)
	require.Empty(t, active.GetLeases())
	_, err = e.agent1.AcquireLease(ctx, acquireReq("crm/api", "ticket-6", "read"))
	requireCode(t, err, codes.PermissionDenied, "revoked")

	recs := e.audit(&leaseholdv1.QueryAuditRequest{AgentId: agent1ID, Decision: leaseholdv1.Decision_DECISION_DENY})
	var denied *leaseholdv1.AuditRecord
	for _, r := range recs {
		if r.GetCredential() == "db/prod" && r.GetTaskId() == "ticket-5" {
			denied = r
		}
	}
	require.NotNil(t, denied, "the anomaly is on the audit trail")
	require.Contains(t, denied.GetReason(), "anomaly")

	require.Eventually(t, func() bool { return len(hook.got()) == 1 }, 10*time.Second, 20*time.Millisecond, "the webhook is notified")
	ev := hook.got()[0]
	require.Equal(t, "leasehold.anomaly", ev.Type)
	require.Equal(t, agent1ID, ev.AgentID)
	require.Equal(t, "ticket-5", ev.TaskID)
	require.Equal(t, "db/prod", ev.Credential)
	require.Equal(t, []string{"crm/api", "mail/api"}, ev.ExpectedCredentials)
	require.True(t, ev.Suspended)
	require.Equal(t, denied.GetSequence(), ev.AuditSequence)
	require.NotContains(t, hook.raw[0], "CANARY", "no secret in the notification")

	// Reinstated, the agent works again; the crm lease it had stays ended.
	_, err = e.admin.ReinstateAgent(ctx, &leaseholdv1.ReinstateAgentRequest{SpiffeId: agent1ID})
	require.NoError(t, err)
	_, err = e.agent1.AcquireLease(ctx, acquireReq("crm/api", "ticket-7", "read"))
	require.NoError(t, err)
	_ = crm
}

// Without suspend_on_anomaly the acquire is refused and reported, and the
// agent keeps working.
func TestAnomalyGuardDeniesWithoutSuspending(t *testing.T) {
	hook, url := startWebhook(t)
	e := newEnv(t, noQuotas, func(c *server.Config) { c.AnomalyWebhookURL = url })
	e.putStatic("crm/api", map[string]string{"k": "v"})
	e.putStatic("db/prod", map[string]string{"k": "v"})
	_, err := e.admin.CreateGrant(ctx, &leaseholdv1.CreateGrantRequest{Grant: &leaseholdv1.Grant{
		Subject: &leaseholdv1.Grant_SpiffeId{SpiffeId: agent1ID}, Credential: "crm/api", Scopes: []string{"read"},
		ExpectedCredentials: []string{"mail/api"}}})
	require.NoError(t, err)
	_, err = e.agent1.AcquireLease(ctx, acquireReq("crm/api", "t", "read"))
	require.NoError(t, err)
	_, err = e.agent1.AcquireLease(ctx, acquireReq("db/prod", "t", "read"))
	requireCode(t, err, codes.PermissionDenied, "anomaly")
	require.NotContains(t, err.Error(), "suspended")
	require.Eventually(t, func() bool { return len(hook.got()) == 1 }, 10*time.Second, 20*time.Millisecond)
	require.False(t, hook.got()[0].Suspended)
	_, err = e.agent1.AcquireLease(ctx, acquireReq("crm/api", "t2", "read"))
	require.NoError(t, err, "not suspended")

	_, err = e.admin.CreateGrant(ctx, &leaseholdv1.CreateGrantRequest{Grant: &leaseholdv1.Grant{
		Subject: &leaseholdv1.Grant_SpiffeId{SpiffeId: agent2ID}, Credential: "crm/api", Scopes: []string{"read"}, SuspendOnAnomaly: true}})
	requireCode(t, err, codes.InvalidArgument, "grant.suspend_on_anomaly")
}

// The guard holds when two acquires race in one task: the database acquire
// passed the policy check before the CRM lease (whose grant expects only
// the mailer) existed, but by its commit the CRM lease is there, so the
// commit refuses it as an anomaly.
func TestAnomalyGuardRecheckedAtCommit(t *testing.T) {
	e := newEnv(t, noQuotas)
	e.putStatic("crm/api", map[string]string{"k": "v"})
	_, err := e.admin.PutCredential(ctx, &leaseholdv1.PutCredentialRequest{Name: "db/prod", Backend: "gated", Secret: map[string]string{"k": "v"}})
	require.NoError(t, err)
	_, err = e.admin.CreateGrant(ctx, &leaseholdv1.CreateGrantRequest{Grant: &leaseholdv1.Grant{
		Subject: &leaseholdv1.Grant_SpiffeId{SpiffeId: agent1ID}, Credential: "crm/api", Scopes: []string{"read"},
		ExpectedCredentials: []string{"mail/api"}}})
	require.NoError(t, err)
	e.grant("db/prod", agent1ID, "read")

	entered, release := gated.hold()
	dbErr := make(chan error, 1)
	go func() {
		_, err := e.agent1.AcquireLease(ctx, acquireReq("db/prod", "race-1", "read"))
		dbErr <- err
	}()
	<-entered // the database acquire passed its policy check and waits in Issue
	_, err = e.agent1.AcquireLease(ctx, acquireReq("crm/api", "race-1", "read"))
	require.NoError(t, err)
	release()
	requireCode(t, <-dbErr, codes.PermissionDenied, "anomaly")
	leases, err := e.admin.ListLeases(ctx, &leaseholdv1.ListLeasesRequest{AgentId: agent1ID, TaskId: "race-1"})
	require.NoError(t, err)
	require.Len(t, leases.GetLeases(), 1, "only the CRM lease was stored")
}

package server_test

import (
	"context"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/leasehold/leasehold/backends/postgres/pgtest"
	leaseholdv1 "github.com/leasehold/leasehold/proto/leasehold/v1"
	"github.com/leasehold/leasehold/server"
)

const pgAdminPassword = "CANARY-pg-admin-5b7e"

// pgEnv is a broker with a PostgreSQL credential "db/analytics" on a
// throwaway cluster: agent-1 may lease read, agent-2 read and write.
func pgEnv(t *testing.T) (*env, *pgtest.Cluster) { return pgEnvB(t) }

func pgEnvB(t testing.TB) (*env, *pgtest.Cluster) {
	c := pgtest.Start(t)
	c.Exec(t, "CREATE ROLE leasehold_admin LOGIN CREATEROLE PASSWORD '"+pgAdminPassword+"'")
	c.Exec(t, "CREATE SCHEMA app AUTHORIZATION leasehold_admin")
	c.Exec(t, "CREATE TABLE app.events (id serial PRIMARY KEY, body text)")
	c.Exec(t, "ALTER TABLE app.events OWNER TO leasehold_admin")
	c.Exec(t, "INSERT INTO app.events (body) VALUES ('hello')")
	// Group roles carry the privileges; a lease role only joins one (see
	// docs/postgres.md: direct grants to thousands of roles overflow the
	// table's ACL).
	c.Exec(t, "CREATE ROLE app_read NOLOGIN")
	c.Exec(t, "GRANT USAGE ON SCHEMA app TO app_read")
	c.Exec(t, "GRANT SELECT ON ALL TABLES IN SCHEMA app TO app_read")
	c.Exec(t, "CREATE ROLE app_write NOLOGIN")
	c.Exec(t, "GRANT USAGE ON SCHEMA app TO app_write")
	c.Exec(t, "GRANT INSERT ON ALL TABLES IN SCHEMA app TO app_write")
	c.Exec(t, "GRANT USAGE ON ALL SEQUENCES IN SCHEMA app TO app_write")
	e := newEnv(t, noQuotas, func(cfg *server.Config) {
		cfg.RevocationMinBackoff, cfg.RevocationMaxBackoff, cfg.RevocationPoll = 50*time.Millisecond, 200*time.Millisecond, 50*time.Millisecond
	})
	_, err := e.admin.PutCredential(ctx, &leaseholdv1.PutCredentialRequest{Name: "db/analytics", Backend: "postgres",
		Config: map[string]string{"host": c.Host, "port": strconv.Itoa(c.Port), "database": "postgres", "sslmode": "disable",
			"admin_user": "leasehold_admin",
			"scope.read": "GRANT app_read TO {{role}}", "scope.write": "GRANT app_write TO {{role}}"},
		Secret: map[string]string{"admin_password": pgAdminPassword}})
	require.NoError(t, err)
	e.grant("db/analytics", agent1ID, "read")
	e.grant("db/analytics", agent2ID, "read", "write")
	return e, c
}

func roleExists(t testing.TB, c *pgtest.Cluster, role string) bool {
	t.Helper()
	var n int
	require.NoError(t, c.Connect(t).QueryRow(context.Background(), "SELECT count(*) FROM pg_roles WHERE rolname = $1", role).Scan(&n))
	return n == 1
}

func TestPostgresReadOnlyLoginWorksThenStops(t *testing.T) {
	e, c := pgEnv(t)
	l, err := e.agent1.AcquireLease(ctx, withTTL(acquireReq("db/analytics", "report-1", "read"), 2*time.Minute))
	require.NoError(t, err)
	for _, k := range []string{"host", "port", "database", "user", "password", "dsn"} {
		require.NotEmpty(t, l.GetSecret()[k], k)
	}
	conn, err := pgx.Connect(ctx, l.GetSecret()["dsn"])
	require.NoError(t, err)
	defer conn.Close(ctx)
	var body string
	require.NoError(t, conn.QueryRow(ctx, "SELECT body FROM app.events").Scan(&body))
	_, err = conn.Exec(ctx, "INSERT INTO app.events (body) VALUES ('x')")
	require.ErrorContains(t, err, "permission denied")
	_, err = e.agent1.AcquireLease(ctx, acquireReq("db/analytics", "t", "write"))
	requireCode(t, err, codes.PermissionDenied, "scopes: write not granted")

	// Renew moves VALID UNTIL.
	_, err = e.agent1.RenewLease(ctx, &leaseholdv1.RenewLeaseRequest{LeaseId: l.GetLease().GetId(), Ttl: durationMinutes(5)})
	require.NoError(t, err)
	var until time.Time
	require.NoError(t, c.Connect(t).QueryRow(ctx, "SELECT rolvaliduntil FROM pg_roles WHERE rolname = $1", l.GetSecret()["user"]).Scan(&until))
	require.WithinDuration(t, time.Now().Add(5*time.Minute), until, 30*time.Second)

	_, err = e.agent1.ReleaseLease(ctx, &leaseholdv1.ReleaseLeaseRequest{LeaseId: l.GetLease().GetId()})
	require.NoError(t, err)
	require.Eventually(t, func() bool { return !roleExists(t, c, l.GetSecret()["user"]) }, 10*time.Second, 20*time.Millisecond)
	require.Error(t, conn.Ping(ctx), "the open session was terminated")
	_, err = pgx.Connect(ctx, l.GetSecret()["dsn"])
	require.Error(t, err, "the login no longer works")
}

func TestPostgresExpiryDropsTheRole(t *testing.T) {
	e, c := pgEnv(t)
	l, err := e.agent2.AcquireLease(ctx, withTTL(acquireReq("db/analytics", "etl", "write"), time.Minute))
	require.NoError(t, err)
	require.True(t, roleExists(t, c, l.GetSecret()["user"]))
	e.clock.Advance(2 * time.Minute)
	require.Eventually(t, func() bool { return !roleExists(t, c, l.GetSecret()["user"]) }, 10*time.Second, 20*time.Millisecond)
}

// The database is down when the agent is revoked, and the broker restarts
// before it comes back: no revocation is lost, and every role goes.
func TestPostgresRevocationSurvivesOutageAndRestart(t *testing.T) {
	e, c := pgEnv(t)
	var users []string
	var sessions []*pgx.Conn
	for i := range 3 {
		l, err := e.agent2.AcquireLease(ctx, acquireReq("db/analytics", "batch-"+strconv.Itoa(i), "read"))
		require.NoError(t, err)
		users = append(users, l.GetSecret()["user"])
		conn, err := pgx.Connect(ctx, l.GetSecret()["dsn"])
		require.NoError(t, err)
		defer conn.Close(ctx)
		sessions = append(sessions, conn)
	}
	other, err := e.agent1.AcquireLease(ctx, acquireReq("db/analytics", "keep", "read"))
	require.NoError(t, err)

	c.StopServer(t)
	resp, err := e.admin.RevokeAgent(ctx, &leaseholdv1.RevokeAgentRequest{SpiffeId: agent2ID, Reason: "compromised"})
	require.NoError(t, err, "revocation is accepted while the database is down")
	require.Equal(t, int32(3), resp.GetLeasesRevoked())
	_, err = e.agent2.AcquireLease(ctx, acquireReq("db/analytics", "t", "read"))
	requireCode(t, err, codes.PermissionDenied, "is revoked")

	pending := func() []*leaseholdv1.Lease {
		r, err := e.admin.ListLeases(ctx, &leaseholdv1.ListLeasesRequest{AgentId: agent2ID})
		require.NoError(t, err)
		return r.GetLeases()
	}
	require.Eventually(t, func() bool {
		for _, l := range pending() {
			if l.GetUpstreamRevocation().GetAttempts() < 2 {
				return false
			}
		}
		return true
	}, 10*time.Second, 20*time.Millisecond, "failed attempts are retried")
	for _, l := range pending() {
		u := l.GetUpstreamRevocation()
		require.Equal(t, leaseholdv1.UpstreamRevocation_STATE_PENDING, u.GetState())
		require.NotEmpty(t, u.GetLastError())
		require.NotContains(t, u.GetLastError(), pgAdminPassword)
	}

	e.restart()
	c.StartServer(t)
	require.Eventually(t, func() bool {
		for _, l := range pending() {
			if l.GetUpstreamRevocation().GetState() != leaseholdv1.UpstreamRevocation_STATE_DONE {
				return false
			}
		}
		return true
	}, 20*time.Second, 50*time.Millisecond, "the restarted broker finishes the queue once the database is back")
	for _, u := range users {
		require.False(t, roleExists(t, c, u), "role %s is gone", u)
	}
	for _, s := range sessions {
		require.Error(t, s.Ping(ctx), "its sessions ended with the outage and cannot come back")
	}
	require.True(t, roleExists(t, c, other.GetSecret()["user"]), "another agent's lease is untouched")
	require.NotContains(t, e.logs.String(), pgAdminPassword)
	require.NotContains(t, strings.Join(auditText(e), "\n"), pgAdminPassword)
}

func TestPostgresRevokeAgentKillsLiveSessions(t *testing.T) {
	e, c := pgEnv(t)
	l, err := e.agent2.AcquireLease(ctx, acquireReq("db/analytics", "t", "write"))
	require.NoError(t, err)
	conn, err := pgx.Connect(ctx, l.GetSecret()["dsn"])
	require.NoError(t, err)
	defer conn.Close(ctx)
	require.NoError(t, conn.Ping(ctx))
	_, err = e.admin.RevokeAgent(ctx, &leaseholdv1.RevokeAgentRequest{SpiffeId: agent2ID, Reason: "r"})
	require.NoError(t, err)
	require.Eventually(t, func() bool { return conn.Ping(ctx) != nil }, 10*time.Second, 20*time.Millisecond)
	require.Eventually(t, func() bool { return !roleExists(t, c, l.GetSecret()["user"]) }, 10*time.Second, 20*time.Millisecond)
}

func auditText(e *env) []string {
	var out []string
	for _, r := range e.audit(nil) {
		out = append(out, r.String())
	}
	return out
}

func TestPostgresErrorsAreClearAndInjectionFails(t *testing.T) {
	e, c := pgEnv(t)
	// Injection through request fields is refused before anything runs.
	for _, req := range []*leaseholdv1.AcquireLeaseRequest{
		acquireReq("db/analytics'; DROP TABLE app.events; --", "t", "read"),
		acquireReq("db/analytics", "t'; DROP TABLE app.events; --", "read"),
		acquireReq("db/analytics", "t", "read; DROP TABLE app.events"),
	} {
		_, err := e.agent2.AcquireLease(ctx, req)
		requireCode(t, err, codes.InvalidArgument, "")
	}
	var n int
	require.NoError(t, c.Connect(t).QueryRow(ctx, "SELECT count(*) FROM app.events").Scan(&n))

	// A scope granted by the broker but missing from the templates.
	_, err := e.admin.CreateGrant(ctx, &leaseholdv1.CreateGrantRequest{Grant: &leaseholdv1.Grant{
		Subject: &leaseholdv1.Grant_SpiffeId{SpiffeId: agent1ID}, Credential: "db/analytics", Scopes: []string{"admin"}}})
	require.NoError(t, err)
	_, err = e.agent1.AcquireLease(ctx, acquireReq("db/analytics", "t", "admin"))
	requireCode(t, err, codes.InvalidArgument, `scopes: unsupported scope: "admin" has no template`)

	// A template the database rejects.
	_, err = e.admin.PutCredential(ctx, &leaseholdv1.PutCredentialRequest{Name: "db/broken", Backend: "postgres",
		Config: map[string]string{"host": c.Host, "port": strconv.Itoa(c.Port), "database": "postgres", "sslmode": "disable",
			"admin_user": "leasehold_admin", "scope.read": "GRANT SELEKT ON app.events TO {{role}}"},
		Secret: map[string]string{"admin_password": pgAdminPassword}})
	require.NoError(t, err)
	e.grant("db/broken", agent1ID, "read")
	_, err = e.agent1.AcquireLease(ctx, acquireReq("db/broken", "t", "read"))
	requireCode(t, err, codes.FailedPrecondition, `credential "db/broken" is misconfigured`)
	requireCode(t, err, codes.FailedPrecondition, "SQLSTATE 42601")

	// The database is down.
	c.StopServer(t)
	_, err = e.agent1.AcquireLease(ctx, acquireReq("db/analytics", "t", "read"))
	requireCode(t, err, codes.Unavailable, `credential "db/analytics": its upstream is unavailable`)
	require.NotContains(t, e.logs.String(), pgAdminPassword)
}

func TestPostgresRotateCredential(t *testing.T) {
	e, c := pgEnv(t)
	before, err := e.agent2.AcquireLease(ctx, acquireReq("db/analytics", "t", "write"))
	require.NoError(t, err)
	conn, err := pgx.Connect(ctx, before.GetSecret()["dsn"])
	require.NoError(t, err)
	defer conn.Close(ctx)

	resp, err := e.admin.RotateCredential(ctx, &leaseholdv1.RotateCredentialRequest{Name: "db/analytics"})
	require.NoError(t, err)
	require.Equal(t, uint64(2), resp.GetCredential().GetCurrentVersion())
	_, err = pgx.Connect(ctx, c.DSN("leasehold_admin", pgAdminPassword))
	require.Error(t, err, "the old admin password no longer works")

	require.NoError(t, conn.Ping(ctx), "a lease issued before the rotation keeps working")
	after, err := e.agent2.AcquireLease(ctx, acquireReq("db/analytics", "t", "read"))
	require.NoError(t, err, "new leases are made with the new admin password")
	_, err = e.agent2.ReleaseLease(ctx, &leaseholdv1.ReleaseLeaseRequest{LeaseId: before.GetLease().GetId()})
	require.NoError(t, err)
	require.Eventually(t, func() bool { return !roleExists(t, c, before.GetSecret()["user"]) }, 10*time.Second, 20*time.Millisecond,
		"and old leases are revoked with it too")
	require.True(t, roleExists(t, c, after.GetSecret()["user"]))
	rot := e.audit(&leaseholdv1.QueryAuditRequest{Credential: "db/analytics"})
	found := false
	for _, r := range rot {
		found = found || r.GetEvent() == leaseholdv1.AuditEvent_AUDIT_EVENT_CREDENTIAL_ROTATE
	}
	require.True(t, found, "the rotation is audited")

	e.putStatic("api/key", map[string]string{"k": "v"})
	_, err = e.admin.RotateCredential(ctx, &leaseholdv1.RotateCredentialRequest{Name: "api/key"})
	requireCode(t, err, codes.FailedPrecondition, "cannot rotate")
	_, err = e.admin.RotateCredential(ctx, &leaseholdv1.RotateCredentialRequest{Name: "api/none"})
	requireCode(t, err, codes.NotFound, "")
}

// A static database login rotated every two seconds with a one-second
// overlap, alternating between two roles, while an agent keeps acquiring
// and logging in: no login fails across several rotations, and once a
// version's overlap is over its password no longer logs in.
func TestPostgresStaticRoleRotation(t *testing.T) {
	c := pgtest.Start(t)
	c.Exec(t, "CREATE ROLE leasehold_admin LOGIN CREATEROLE PASSWORD '"+pgAdminPassword+"'")
	c.Exec(t, "CREATE ROLE app_a LOGIN PASSWORD 'CANARY-initial-app-pw'")
	c.Exec(t, "CREATE ROLE app_b NOLOGIN")
	c.Exec(t, "CREATE TABLE reports (id int)")
	c.Exec(t, "GRANT SELECT ON reports TO app_a, app_b")
	e := newEnv(t, noQuotas, func(cfg *server.Config) { cfg.RotationPoll = 50 * time.Millisecond })
	_, err := e.admin.PutCredential(ctx, &leaseholdv1.PutCredentialRequest{Name: "db/reports", Backend: "postgres-static-role",
		Config: map[string]string{"host": c.Host, "port": strconv.Itoa(c.Port), "database": "postgres", "sslmode": "disable",
			"admin_user": "leasehold_admin", "users": "app_a,app_b"},
		Secret:   map[string]string{"admin_password": pgAdminPassword, "user": "app_a", "password": "CANARY-initial-app-pw"},
		Rotation: &leaseholdv1.RotationPolicy{Interval: durationpb.New(2 * time.Second), Overlap: durationpb.New(time.Second)}})
	require.NoError(t, err)
	e.grant("db/reports", agent1ID, "read")

	var logins, failed int
	var dsns []string
	deadline := time.Now().Add(2 * time.Minute)
	for i := 0; ; i++ {
		cred, err := e.admin.GetCredential(ctx, &leaseholdv1.GetCredentialRequest{Name: "db/reports"})
		require.NoError(t, err)
		if cred.GetCredential().GetCurrentVersion() >= 4 || time.Now().After(deadline) {
			break
		}
		l, err := e.agent1.AcquireLease(ctx, acquireReq("db/reports", "report-"+strconv.Itoa(i), "read"))
		require.NoError(t, err)
		conn, err := pgx.Connect(ctx, l.GetSecret()["dsn"])
		logins++
		if err != nil {
			failed++
			t.Logf("login as %s failed: %v", l.GetSecret()["user"], err)
		} else {
			var n int
			require.NoError(t, conn.QueryRow(ctx, "SELECT count(*) FROM reports").Scan(&n))
			conn.Close(ctx)
		}
		if len(dsns) == 0 || dsns[len(dsns)-1] != l.GetSecret()["dsn"] {
			dsns = append(dsns, l.GetSecret()["dsn"])
		}
		_, err = e.agent1.ReleaseLease(ctx, &leaseholdv1.ReleaseLeaseRequest{LeaseId: l.GetLease().GetId()})
		require.NoError(t, err)
		time.Sleep(20 * time.Millisecond)
	}
	cred, err := e.admin.GetCredential(ctx, &leaseholdv1.GetCredentialRequest{Name: "db/reports"})
	require.NoError(t, err)
	require.GreaterOrEqual(t, cred.GetCredential().GetCurrentVersion(), uint64(4), "three rotations: %v", cred.GetCredential().GetRotationState())
	require.Zero(t, failed, "no failed login in %d across the rotations", logins)
	require.GreaterOrEqual(t, len(dsns), 3, "the agent got the new passwords with no change on its side")

	// The first password's overlap is long over: it no longer logs in.
	_, err = pgx.Connect(ctx, dsns[0])
	require.Error(t, err, "a retired password does not log in")

	// No password — the initial one or any the rotations made — in the
	// audit trail, the log or the store file.
	audit, err := protojson.Marshal(&leaseholdv1.QueryAuditResponse{Records: e.audit(nil)})
	require.NoError(t, err)
	e.stop()
	db, err := os.ReadFile(filepath.Join(e.dir, "leasehold.db"))
	require.NoError(t, err)
	passwords := []string{"CANARY-initial-app-pw", pgAdminPassword}
	for _, dsn := range dsns {
		u, err := url.Parse(dsn)
		require.NoError(t, err)
		pw, _ := u.User.Password()
		passwords = append(passwords, pw)
	}
	for _, pw := range passwords {
		for where, text := range map[string]string{"audit": string(audit), "log": e.logs.String(), "store file": string(db)} {
			if strings.Contains(text, pw) {
				t.Errorf("a password (%.6s…) appears in the %s", pw, where)
			}
		}
	}
}

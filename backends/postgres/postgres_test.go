package postgres_test

import (
	"context"
	"fmt"
	"strconv"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/require"

	"github.com/leasehold/leasehold/backends"
	"github.com/leasehold/leasehold/backends/backendtest"
	"github.com/leasehold/leasehold/backends/postgres"
	"github.com/leasehold/leasehold/backends/postgres/pgtest"
)

const adminPassword = "CANARY-pg-admin-9d1e"

// setup starts a cluster with an application schema, a table and a
// non-superuser admin role for the broker, and returns the credential spec.
func setup(t *testing.T) (*pgtest.Cluster, backends.Spec) {
	t.Helper()
	c := pgtest.Start(t)
	c.Exec(t, "CREATE ROLE leasehold_admin LOGIN CREATEROLE PASSWORD '"+adminPassword+"'")
	c.Exec(t, "CREATE SCHEMA app AUTHORIZATION leasehold_admin")
	c.Exec(t, "CREATE TABLE app.events (id serial PRIMARY KEY, body text)")
	c.Exec(t, "ALTER TABLE app.events OWNER TO leasehold_admin")
	c.Exec(t, "ALTER SEQUENCE app.events_id_seq OWNER TO leasehold_admin")
	c.Exec(t, "INSERT INTO app.events (body) VALUES ('hello')")
	spec := backends.Spec{Name: "db/analytics", Config: map[string]string{
		"host": c.Host, "port": strconv.Itoa(c.Port), "database": "postgres", "sslmode": "disable",
		"admin_user": "leasehold_admin",
		"scope.read": "GRANT USAGE ON SCHEMA app TO {{role}}; GRANT SELECT ON ALL TABLES IN SCHEMA app TO {{role}}",
		"scope.write": "GRANT USAGE ON SCHEMA app TO {{role}}; GRANT INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA app TO {{role}};" +
			" GRANT USAGE ON ALL SEQUENCES IN SCHEMA app TO {{role}}",
	}, Secret: map[string][]byte{"admin_password": []byte(adminPassword)}}
	return c, spec
}

func TestConformance(t *testing.T) {
	_, spec := setup(t)
	down := backends.Spec{Name: spec.Name, Config: map[string]string{}, Secret: spec.Secret}
	for k, v := range spec.Config {
		down.Config[k] = v
	}
	down.Config["port"] = "1" // nothing listens there
	b := postgres.New()
	defer b.Close()
	backendtest.Run(t, backendtest.Case{Backend: b, Spec: spec, Scopes: []string{"read"}, Dynamic: true, Unreachable: &down})
}

func leaseID(n int) string { return fmt.Sprintf("ls_%032x", n) }

func issue(t *testing.T, b *postgres.Backend, spec backends.Spec, n int, scopes ...string) *backends.Issued {
	t.Helper()
	got, err := b.Issue(context.Background(), backends.IssueRequest{Spec: spec, LeaseID: leaseID(n), Scopes: scopes,
		ExpiresAt: time.Now().Add(time.Minute)})
	require.NoError(t, err)
	return got
}

func TestScopesAreExactlyWhatIsGranted(t *testing.T) {
	_, spec := setup(t)
	b := postgres.New()
	defer b.Close()
	ctx := context.Background()

	read := issue(t, b, spec, 1, "read")
	require.GreaterOrEqual(t, len(read.Secret["password"]), 32)
	require.Equal(t, "lh_"+fmt.Sprintf("%032x", 1), string(read.Secret["user"]))
	conn, err := pgx.Connect(ctx, string(read.Secret["dsn"]))
	require.NoError(t, err)
	defer conn.Close(ctx)
	var body string
	require.NoError(t, conn.QueryRow(ctx, "SELECT body FROM app.events LIMIT 1").Scan(&body))
	require.Equal(t, "hello", body)
	_, err = conn.Exec(ctx, "INSERT INTO app.events (body) VALUES ('nope')")
	require.ErrorContains(t, err, "permission denied", "a read lease cannot write")

	write := issue(t, b, spec, 2, "write")
	wconn, err := pgx.Connect(ctx, string(write.Secret["dsn"]))
	require.NoError(t, err)
	defer wconn.Close(ctx)
	_, err = wconn.Exec(ctx, "INSERT INTO app.events (body) VALUES ('written')")
	require.NoError(t, err)
	err = wconn.QueryRow(ctx, "SELECT body FROM app.events LIMIT 1").Scan(&body)
	require.ErrorContains(t, err, "permission denied", "a write lease was not given read")

	_, err = b.Issue(ctx, backends.IssueRequest{Spec: spec, LeaseID: leaseID(3), Scopes: []string{"admin"}, ExpiresAt: time.Now().Add(time.Minute)})
	require.ErrorIs(t, err, backends.ErrUnsupportedScope)
}

func TestRevokeEndsLoginsAndSessions(t *testing.T) {
	_, spec := setup(t)
	b := postgres.New()
	defer b.Close()
	ctx := context.Background()
	got := issue(t, b, spec, 1, "read")
	conn, err := pgx.Connect(ctx, string(got.Secret["dsn"]))
	require.NoError(t, err)
	defer conn.Close(ctx)
	require.NoError(t, conn.Ping(ctx))

	require.NoError(t, b.Revoke(ctx, backends.LeaseRef{Spec: spec, LeaseID: leaseID(1), Artifact: got.Artifact}))
	require.Error(t, conn.Ping(ctx), "the open session was terminated")
	_, err = pgx.Connect(ctx, string(got.Secret["dsn"]))
	require.Error(t, err, "the role can no longer log in")
}

func TestRenewMovesValidUntil(t *testing.T) {
	c, spec := setup(t)
	b := postgres.New()
	defer b.Close()
	ctx := context.Background()
	got := issue(t, b, spec, 1, "read")
	until := time.Now().Add(2 * time.Hour).Truncate(time.Second)
	granted, err := b.Renew(ctx, backends.LeaseRef{Spec: spec, LeaseID: leaseID(1), Artifact: got.Artifact}, until)
	require.NoError(t, err)
	require.True(t, granted.Equal(until))
	var valid time.Time
	require.NoError(t, c.Connect(t).QueryRow(ctx, "SELECT rolvaliduntil FROM pg_roles WHERE rolname = $1", string(got.Artifact)).Scan(&valid))
	require.WithinDuration(t, until, valid, time.Second)
}

func TestConfigAndInjection(t *testing.T) {
	_, spec := setup(t)
	b := postgres.New()
	defer b.Close()
	ctx := context.Background()
	with := func(k, v string) backends.Spec {
		s := backends.Spec{Name: spec.Name, Config: map[string]string{}, Secret: spec.Secret}
		for kk, vv := range spec.Config {
			s.Config[kk] = vv
		}
		s.Config[k] = v
		return s
	}
	for name, tc := range map[string]struct {
		spec backends.Spec
		want string
	}{
		"template without the role": {with("scope.read", "GRANT SELECT ON app.events TO PUBLIC"), "must grant to {{role}}"},
		"other placeholder":         {with("scope.read", "GRANT SELECT ON {{table}} TO {{role}}"), "only placeholder"},
		"prefix that could inject":  {with("role_prefix", `x"; DROP TABLE app.events; --`), "role_prefix"},
		"unknown setting":           {with("hostname", "x"), "unknown setting"},
		"bad port":                  {with("port", "99999"), "config.port"},
		"bad sslmode":               {with("sslmode", "maybe"), "config.sslmode"},
		"missing admin password":    {backends.Spec{Name: spec.Name, Config: spec.Config}, "secret.admin_password is required"},
	} {
		err := b.Validate(tc.spec)
		require.ErrorIs(t, err, backends.ErrInvalidConfig, name)
		require.ErrorContains(t, err, tc.want, name)
		require.NotContains(t, err.Error(), adminPassword)
	}

	// A template that is not valid SQL fails clearly at issue time and
	// leaves no role behind.
	bad := with("scope.read", "GRANT SELEKT ON app.events TO {{role}}")
	_, err := b.Issue(ctx, backends.IssueRequest{Spec: bad, LeaseID: leaseID(7), Scopes: []string{"read"}, ExpiresAt: time.Now().Add(time.Minute)})
	require.ErrorContains(t, err, `scope "read" template`)
	require.ErrorContains(t, err, "SQLSTATE 42601")
	require.NotErrorIs(t, err, backends.ErrUpstreamUnavailable, "a bad template is not retried as an outage")

	// Request fields never reach SQL: scopes select templates by name, the
	// lease id must be a lease id.
	for _, scope := range []string{`read"; DROP TABLE app.events; --`, "read; DROP TABLE app.events"} {
		_, err := b.Issue(ctx, backends.IssueRequest{Spec: spec, LeaseID: leaseID(8), Scopes: []string{scope}, ExpiresAt: time.Now().Add(time.Minute)})
		require.ErrorIs(t, err, backends.ErrUnsupportedScope)
	}
	_, err = b.Issue(ctx, backends.IssueRequest{Spec: spec, LeaseID: `ls_x"; DROP ROLE postgres; --`, Scopes: []string{"read"}, ExpiresAt: time.Now().Add(time.Minute)})
	require.ErrorContains(t, err, "is not a lease id")
	err = b.Revoke(ctx, backends.LeaseRef{Spec: spec, Artifact: []byte(`lh_1"; DROP TABLE app.events; --`)})
	require.ErrorContains(t, err, "is not a lease role")
	got := issue(t, b, spec, 9, "read")
	conn, err := pgx.Connect(ctx, string(got.Secret["dsn"]))
	require.NoError(t, err)
	defer conn.Close(ctx)
	var n int
	require.NoError(t, conn.QueryRow(ctx, "SELECT count(*) FROM app.events").Scan(&n), "the table is still there")
}

// After the server restarts, pooled connections fail with 57P01; that is an
// outage to retry, not a rejected statement.
func TestRestartedServerIsAnOutageNotARejection(t *testing.T) {
	c, spec := setup(t)
	b := postgres.New()
	defer b.Close()
	issue(t, b, spec, 1, "read") // fills the pool
	c.StopServer(t)
	_, err := b.Issue(context.Background(), backends.IssueRequest{Spec: spec, LeaseID: leaseID(2), Scopes: []string{"read"}, ExpiresAt: time.Now().Add(time.Minute)})
	require.ErrorIs(t, err, backends.ErrUpstreamUnavailable)
	require.NotErrorIs(t, err, backends.ErrUpstreamRejected)
	c.StartServer(t)
	issue(t, b, spec, 3, "read") // and it recovers
}

// Passwords never reach the server as text: a server that logs DDL (common
// in production) must not log the lease's password or a rotated admin
// password.
func TestPasswordsNeverReachTheServerLog(t *testing.T) {
	c, spec := setup(t)
	b := postgres.New()
	defer b.Close()
	got := issue(t, b, spec, 1, "read")
	next, err := b.NextSecret(spec)
	require.NoError(t, err)
	require.NoError(t, b.Rotate(context.Background(), spec, next))
	conn, err := pgx.Connect(context.Background(), c.DSN("leasehold_admin", string(next["admin_password"])))
	require.NoError(t, err, "the rotated password works")
	conn.Close(context.Background())
	log := c.Log(t)
	require.Contains(t, log, "CREATE ROLE", "sanity: the server logs DDL")
	require.NotContains(t, log, string(got.Secret["password"]))
	require.NotContains(t, log, string(next["admin_password"]))
}

// Rotate-root in two phases: Create replaces the admin password with one
// derived from the current password and the rotation id, so a broker that
// crashed after the ALTER ROLE and resumes with the stored (old) password
// gets the same new one; Verify logs in with it; the old one is dead.
func TestRotateRootCreateIsResumable(t *testing.T) {
	c, spec := setup(t)
	b := postgres.New()
	defer b.Close()
	ctx := context.Background()
	next, err := b.Create(ctx, spec, "rot_1")
	require.NoError(t, err)
	require.NoError(t, b.Verify(ctx, spec, next))
	_, err = pgx.Connect(ctx, c.DSN("leasehold_admin", adminPassword))
	require.Error(t, err, "the old admin password no longer logs in")

	// The crash: the broker never stored next and resumes with spec.
	again, err := b.Create(ctx, spec, "rot_1")
	require.NoError(t, err)
	require.Equal(t, string(next["admin_password"]), string(again["admin_password"]), "the same rotation yields the same password")
	require.NoError(t, b.Verify(ctx, spec, again))
	require.NoError(t, b.Retire(ctx, spec, spec.Secret))

	// The new password runs the backend as before.
	newSpec := backends.Spec{Name: spec.Name, Config: spec.Config, Secret: next}
	got, err := b.Issue(ctx, backends.IssueRequest{Spec: newSpec, LeaseID: leaseID(77), Scopes: []string{"read"}, ExpiresAt: time.Now().Add(time.Minute)})
	require.NoError(t, err)
	require.NoError(t, b.Revoke(ctx, backends.LeaseRef{Spec: newSpec, LeaseID: leaseID(77), Artifact: got.Artifact}))
}

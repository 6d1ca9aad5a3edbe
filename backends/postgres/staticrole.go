package postgres

import (
	"context"
	"crypto/rand"
	"encoding/base64"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/leasehold/leasehold/backends"
)

// StaticRoleName is the registry name of the static-role backend.
const StaticRoleName = "postgres-static-role"

// StaticRole serves a long-lived database login, for tools that cannot take
// a new user per lease, and rotates its password on the broker's two-phase
// schedule. For an overlap without a window where no password works, it
// alternates between two roles with the same privileges (config.users,
// e.g. "app_a,app_b"): a rotation sets a fresh password on the role not in
// use and enables its login, the broker promotes it, and after the overlap
// the previous role's login is disabled and its sessions terminated.
//
// Config: host, port, database, sslmode (as the postgres backend),
// admin_user (a role with CREATEROLE), users (the two roles). Secret:
// admin_password, user (the role in use) and password. Agents get host,
// port, database, user, password and dsn, never the admin password.
type StaticRole struct {
	// Backend supplies the admin connection pools.
	Backend *Backend
}

var (
	_ backends.Backend         = StaticRole{}
	_ backends.TwoPhaseRotator = StaticRole{}
)

type staticConfig struct {
	*config
	users         [2]string
	user, userPwd string
}

var staticSettings = map[string]bool{"host": true, "port": true, "database": true, "sslmode": true, "admin_user": true, "users": true}

func parseStatic(spec backends.Spec) (*staticConfig, error) {
	for k := range spec.Config {
		if !staticSettings[k] {
			return nil, invalid("config.%s: unknown setting (valid: host, port, database, sslmode, admin_user, users)", k)
		}
	}
	c := &staticConfig{config: &config{port: "5432", sslmode: "verify-full", host: spec.Config["host"], database: spec.Config["database"],
		adminUser: spec.Config["admin_user"]}}
	if v := spec.Config["port"]; v != "" {
		c.port = v
	}
	if v := spec.Config["sslmode"]; v != "" {
		c.sslmode = v
	}
	for _, f := range []struct{ k, v string }{{"host", c.host}, {"database", c.database}, {"admin_user", c.adminUser}} {
		if f.v == "" {
			return nil, invalid("config.%s is required", f.k)
		}
	}
	if p, err := strconv.Atoi(c.port); err != nil || p < 1 || p > 65535 {
		return nil, invalid("config.port %q is not a port", c.port)
	}
	if !sslModes[c.sslmode] {
		return nil, invalid("config.sslmode %q: want disable, require, verify-ca or verify-full", c.sslmode)
	}
	users := strings.Split(spec.Config["users"], ",")
	if len(users) != 2 || users[0] == users[1] || !roleRE.MatchString(users[0]) || !roleRE.MatchString(users[1]) {
		return nil, invalid("config.users: two distinct role names, comma-separated (the roles a rotation alternates between)")
	}
	c.users = [2]string{users[0], users[1]}
	for k := range spec.Secret {
		if k != "admin_password" && k != "user" && k != "password" {
			return nil, invalid("secret.%s: only admin_password, user and password are stored", k)
		}
	}
	c.adminPassword, c.user, c.userPwd = string(spec.Secret["admin_password"]), string(spec.Secret["user"]), string(spec.Secret["password"])
	if c.adminPassword == "" || c.userPwd == "" {
		return nil, invalid("secret: admin_password and password are required")
	}
	if !slices.Contains(c.users[:], c.user) {
		return nil, invalid("secret.user: must be one of config.users (%s, %s)", c.users[0], c.users[1])
	}
	return c, nil
}

// Validate implements backends.Backend.
func (s StaticRole) Validate(spec backends.Spec) error {
	_, err := parseStatic(spec)
	return err
}

// Issue implements backends.Backend: the role in use and its password.
func (s StaticRole) Issue(_ context.Context, req backends.IssueRequest) (*backends.Issued, error) {
	c, err := parseStatic(req.Spec)
	if err != nil {
		return nil, err
	}
	return &backends.Issued{Secret: map[string][]byte{
		"host": []byte(c.host), "port": []byte(c.port), "database": []byte(c.database),
		"user": []byte(c.user), "password": []byte(c.userPwd), "dsn": []byte(c.dsn(c.user, c.userPwd)),
	}}, nil
}

// Renew implements backends.Backend: the login does not expire per lease.
func (s StaticRole) Renew(_ context.Context, _ backends.LeaseRef, at time.Time) (time.Time, error) {
	return at, nil
}

// Revoke implements backends.Backend: leases share the login; rotation
// retires it.
func (s StaticRole) Revoke(context.Context, backends.LeaseRef) error { return nil }

// Create implements backends.TwoPhaseRotator: a fresh password on the role
// not in use, and its login enabled. Run again (same rotation after a
// crash) it sets another fresh password: only the last one is valid.
func (s StaticRole) Create(ctx context.Context, spec backends.Spec, _ string) (map[string][]byte, error) {
	c, err := parseStatic(spec)
	if err != nil {
		return nil, err
	}
	next := c.users[0]
	if c.user == next {
		next = c.users[1]
	}
	raw := make([]byte, 24)
	if _, err := rand.Read(raw); err != nil {
		return nil, err
	}
	pw := base64.RawURLEncoding.EncodeToString(raw)
	verifier, err := scramVerifier(pw)
	if err != nil {
		return nil, err
	}
	pool, err := s.Backend.pool(ctx, c.config)
	if err != nil {
		return nil, err
	}
	if _, err := pool.Exec(ctx, "ALTER ROLE "+pgx.Identifier{next}.Sanitize()+" WITH LOGIN PASSWORD "+quoteLiteral(verifier)); err != nil {
		return nil, upstream(err, c.config, "set the next role's password", pw)
	}
	return map[string][]byte{"admin_password": []byte(c.adminPassword), "user": []byte(next), "password": []byte(pw)}, nil
}

// Verify implements backends.TwoPhaseRotator: log in as the next role.
func (s StaticRole) Verify(ctx context.Context, spec backends.Spec, next map[string][]byte) error {
	c, err := parseStatic(spec)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	conn, err := pgx.Connect(ctx, c.dsn(string(next["user"]), string(next["password"])))
	if err != nil {
		return upstream(err, c.config, "log in with the next password", string(next["password"]))
	}
	defer func() { _ = conn.Close(context.Background()) }() // a check connection: nothing to flush
	var one int
	if err := conn.QueryRow(ctx, "SELECT 1").Scan(&one); err != nil {
		return upstream(err, c.config, "query with the next password", string(next["password"]))
	}
	return nil
}

// Retire implements backends.TwoPhaseRotator: the old role can no longer
// log in, and its open sessions are ended.
func (s StaticRole) Retire(ctx context.Context, spec backends.Spec, old map[string][]byte) error {
	c, err := parseStatic(spec)
	if err != nil {
		return err
	}
	role := string(old["user"])
	if !slices.Contains(c.users[:], role) {
		return fmt.Errorf("%w: retire: %q is not one of config.users", backends.ErrInvalidConfig, role)
	}
	pool, err := s.Backend.pool(ctx, c.config)
	if err != nil {
		return err
	}
	script := "ALTER ROLE " + pgx.Identifier{role}.Sanitize() + " WITH NOLOGIN PASSWORD NULL;\n" +
		"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = " + quoteLiteral(role) + ";"
	if err := runScript(ctx, pool, script); err != nil {
		return upstream(err, c.config, "retire the previous role", string(old["password"]))
	}
	return nil
}

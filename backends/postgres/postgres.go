// Package postgres issues a PostgreSQL login role per lease, granted exactly
// the requested scopes' SQL templates, valid until the lease expires, and
// drops it (after terminating its sessions) when the lease ends.
//
// Credential config (all strings):
//
//	host, port (5432), database     where to connect
//	sslmode                         disable | require | verify-ca | verify-full (default verify-full)
//	admin_user                      a role with CREATEROLE that owns or can grant the objects;
//	                                it becomes a member of each lease role it creates
//	role_prefix                     prefix of lease roles (default "lh_"); [a-z_][a-z0-9_]{0,15}
//	max_ttl                         optional cap on a lease, e.g. "1h"
//	scope.<name>                    SQL run to give a lease role that scope; {{role}} stands for
//	                                the role's quoted name, e.g.
//	                                scope.read = GRANT USAGE ON SCHEMA app TO {{role}};
//	                                             GRANT SELECT ON ALL TABLES IN SCHEMA app TO {{role}}
//
// Secret: admin_password. The agent gets host, port, database, user,
// password and dsn.
//
// Passwords are sent as SCRAM-SHA-256 verifiers, never as text, so a
// server that logs DDL does not log them.
//
// Nothing from a request reaches SQL as text: the role name is the prefix
// and the lease id's hex digits, both checked; scopes only select templates
// from the admin's config; the password and expiry are quoted literals.
package postgres

import (
	"context"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"errors"
	"fmt"
	"net"
	"net/url"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/leasehold/leasehold/backends"
)

// Name is the registry name of this backend.
const Name = "postgres"

const (
	scopePrefix = "scope."
	placeholder = "{{role}}"
)

var (
	prefixRE = regexp.MustCompile(`^[a-z_][a-z0-9_]{0,15}$`)
	roleRE   = regexp.MustCompile(`^[a-z_][a-z0-9_]{1,62}$`)
	leaseRE  = regexp.MustCompile(`^ls_([0-9a-f]{32})$`)
	settings = map[string]bool{"host": true, "port": true, "database": true, "sslmode": true,
		"admin_user": true, "role_prefix": true, "max_ttl": true}
	sslModes = map[string]bool{"disable": true, "require": true, "verify-ca": true, "verify-full": true}
)

// Backend is the PostgreSQL backend. It keeps one small connection pool per
// distinct admin connection; it is safe for concurrent use.
type Backend struct {
	mu    sync.Mutex
	pools map[[32]byte]*pgxpool.Pool
}

// New returns a backend with no open connections.
func New() *Backend { return &Backend{pools: map[[32]byte]*pgxpool.Pool{}} }

var _ backends.Backend = (*Backend)(nil)

type config struct {
	host, port, database, sslmode, adminUser, prefix string
	maxTTL                                           time.Duration
	scopes                                           map[string]string
	adminPassword                                    string
}

func invalid(format string, args ...any) error {
	return fmt.Errorf("%w: %s", backends.ErrInvalidConfig, fmt.Sprintf(format, args...))
}

func parse(spec backends.Spec) (*config, error) {
	c := &config{port: "5432", sslmode: "verify-full", prefix: "lh_", scopes: map[string]string{}}
	for k, v := range spec.Config {
		if name, ok := strings.CutPrefix(k, scopePrefix); ok {
			if name == "" {
				return nil, invalid("config.%s: a scope needs a name", k)
			}
			if !strings.Contains(v, placeholder) {
				return nil, invalid("config.%s: the template must grant to %s", k, placeholder)
			}
			if strings.Count(v, "{{") != strings.Count(v, placeholder) {
				return nil, invalid("config.%s: %s is the only placeholder", k, placeholder)
			}
			c.scopes[name] = v
			continue
		}
		if !settings[k] {
			return nil, invalid("config.%s: unknown setting (valid: host, port, database, sslmode, admin_user, role_prefix, max_ttl, scope.<name>)", k)
		}
	}
	get := func(k string, def *string, required bool) error {
		if v := spec.Config[k]; v != "" {
			*def = v
		} else if required {
			return invalid("config.%s is required", k)
		}
		return nil
	}
	for _, f := range []struct {
		k   string
		p   *string
		req bool
	}{{"host", &c.host, true}, {"port", &c.port, false}, {"database", &c.database, true},
		{"sslmode", &c.sslmode, false}, {"admin_user", &c.adminUser, true}, {"role_prefix", &c.prefix, false}} {
		if err := get(f.k, f.p, f.req); err != nil {
			return nil, err
		}
	}
	if p, err := strconv.Atoi(c.port); err != nil || p < 1 || p > 65535 {
		return nil, invalid("config.port %q is not a port", c.port)
	}
	if !sslModes[c.sslmode] {
		return nil, invalid("config.sslmode %q: want disable, require, verify-ca or verify-full", c.sslmode)
	}
	if !prefixRE.MatchString(c.prefix) {
		return nil, invalid("config.role_prefix %q: want [a-z_][a-z0-9_]{0,15}", c.prefix)
	}
	if v := spec.Config["max_ttl"]; v != "" {
		d, err := time.ParseDuration(v)
		if err != nil || d <= 0 {
			return nil, invalid("config.max_ttl %q is not a positive duration", v)
		}
		c.maxTTL = d
	}
	if len(c.scopes) == 0 {
		return nil, invalid("config: at least one scope.<name> template is required")
	}
	pw, ok := spec.Secret["admin_password"]
	if !ok || len(pw) == 0 {
		return nil, invalid("secret.admin_password is required")
	}
	c.adminPassword = string(pw)
	for k := range spec.Secret {
		if k != "admin_password" {
			return nil, invalid("secret.%s: only admin_password is stored", k)
		}
	}
	return c, nil
}

// dsn builds a connection string; passwords are URL-escaped.
func (c *config) dsn(user, password string) string {
	u := url.URL{Scheme: "postgres", User: url.UserPassword(user, password),
		Host: net.JoinHostPort(c.host, c.port), Path: "/" + c.database}
	u.RawQuery = url.Values{"sslmode": {c.sslmode}}.Encode()
	return u.String()
}

// Validate implements backends.Backend.
func (b *Backend) Validate(spec backends.Spec) error {
	_, err := parse(spec)
	return err
}

func (b *Backend) pool(ctx context.Context, c *config) (*pgxpool.Pool, error) {
	key := sha256.Sum256([]byte(c.dsn(c.adminUser, c.adminPassword)))
	b.mu.Lock()
	defer b.mu.Unlock()
	if p, ok := b.pools[key]; ok {
		return p, nil
	}
	pc, err := pgxpool.ParseConfig(c.dsn(c.adminUser, c.adminPassword))
	if err != nil {
		return nil, invalid("connection settings: %v", redact(err, c))
	}
	pc.MaxConns = 8
	pc.ConnConfig.ConnectTimeout = 5 * time.Second
	p, err := pgxpool.NewWithConfig(ctx, pc)
	if err != nil {
		return nil, invalid("connection settings: %v", redact(err, c))
	}
	b.pools[key] = p
	return p, nil
}

// Close closes every pool.
func (b *Backend) Close() {
	b.mu.Lock()
	defer b.mu.Unlock()
	for k, p := range b.pools {
		p.Close()
		delete(b.pools, k)
	}
}

// redact removes the admin password from an error's text and keeps only
// the message.
func redact(err error, c *config, secrets ...string) string {
	msg := err.Error()
	for _, s := range append(secrets, c.adminPassword) {
		if s != "" {
			msg = strings.ReplaceAll(msg, s, "[redacted]")
		}
	}
	return msg
}

// upstream classifies a failure: connection trouble is ErrUpstreamUnavailable
// (retried by the revocation queue); anything else is returned as is.
func upstream(err error, c *config, what string, secrets ...string) error {
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) && !transient(pgErr.Code) {
		return fmt.Errorf("%w: postgres %s: %s", backends.ErrUpstreamRejected, what, redact(err, c, secrets...))
	}
	return fmt.Errorf("%w: postgres %s: %s", backends.ErrUpstreamUnavailable, what, redact(err, c, secrets...))
}

// runScript runs several statements in one simple-protocol round trip,
// which PostgreSQL executes as one implicit transaction.
func runScript(ctx context.Context, pool *pgxpool.Pool, script string) error {
	conn, err := pool.Acquire(ctx)
	if err != nil {
		return err
	}
	defer conn.Release()
	_, err = conn.Conn().PgConn().Exec(ctx, script).ReadAll()
	return err
}

// catalogLock is the advisory lock key under which lease roles are
// created, granted and dropped: PostgreSQL refuses concurrent GRANTs on the
// same object ("tuple concurrently updated"), so these statements take
// turns per database, across every broker that shares it. Each holds it
// for one short transaction.
const catalogLock = 0x6c65617365686f6c // "leasehol"

// transient reports SQLSTATE classes that mean the server is going away or
// overloaded rather than refusing the statement: connection exception (08),
// insufficient resources (53), operator intervention (57, e.g. 57P01 on
// shutdown) and system error (58).
func transient(code string) bool {
	switch code[:min(2, len(code))] {
	case "08", "53", "57", "58":
		return true
	}
	return false
}

func roleFor(c *config, leaseID string) (string, error) {
	m := leaseRE.FindStringSubmatch(leaseID)
	if m == nil {
		return "", fmt.Errorf("postgres: lease id %q is not a lease id", leaseID)
	}
	return c.prefix + m[1], nil
}

func quoteLiteral(s string) string { return "'" + strings.ReplaceAll(s, "'", "''") + "'" }

func timestamp(t time.Time) string {
	return quoteLiteral(t.UTC().Format("2006-01-02 15:04:05.999999Z07:00"))
}

// Issue implements backends.Backend.
func (b *Backend) Issue(ctx context.Context, req backends.IssueRequest) (*backends.Issued, error) {
	c, err := parse(req.Spec)
	if err != nil {
		return nil, err
	}
	scopes := append([]string(nil), req.Scopes...)
	sort.Strings(scopes)
	for _, s := range scopes {
		if _, ok := c.scopes[s]; !ok {
			return nil, fmt.Errorf("%w: %q has no template in credential %q", backends.ErrUnsupportedScope, s, req.Spec.Name)
		}
	}
	role, err := roleFor(c, req.LeaseID)
	if err != nil {
		return nil, err
	}
	expires := req.ExpiresAt
	if c.maxTTL > 0 && time.Now().Add(c.maxTTL).Before(expires) {
		expires = time.Now().Add(c.maxTTL)
	}
	raw := make([]byte, 32)
	if _, err := rand.Read(raw); err != nil {
		return nil, err
	}
	password := base64.RawURLEncoding.EncodeToString(raw) // 43 characters
	pool, err := b.pool(ctx, c)
	if err != nil {
		return nil, err
	}
	verifier, err := scramVerifier(password)
	if err != nil {
		return nil, err
	}
	ident := pgx.Identifier{role}.Sanitize()
	// One script, one round trip: statements sent together in the simple
	// protocol run as a single transaction, so a failing template leaves no
	// role behind. Membership lets the admin terminate the role's sessions
	// and reassign what it owns when the lease ends.
	var script strings.Builder
	fmt.Fprintf(&script, "CREATE ROLE %s LOGIN PASSWORD %s VALID UNTIL %s;\n", ident, quoteLiteral(verifier), timestamp(expires))
	fmt.Fprintf(&script, "GRANT %s TO CURRENT_USER;\n", ident)
	fmt.Fprintf(&script, "SELECT pg_advisory_xact_lock(%d);\n", int64(catalogLock))
	starts := make([]int, len(scopes))
	for i, sc := range scopes {
		starts[i] = len([]rune(script.String()))
		fmt.Fprintf(&script, "%s;\n", strings.ReplaceAll(c.scopes[sc], placeholder, ident))
	}
	if err = runScript(ctx, pool, script.String()); err != nil {
		var pgErr *pgconn.PgError
		if errors.As(err, &pgErr) && !transient(pgErr.Code) && pgErr.Code != "42710" { // 42710: the role exists
			failed := strings.Join(scopes, ", ")
			if pos := int(pgErr.Position); pos > starts[0] { // 1-based character offset
				for i := range scopes {
					if pos > starts[i] {
						failed = scopes[i]
					}
				}
			}
			err = fmt.Errorf("scope %q template: %w", failed, err)
		}
	}
	if err != nil {
		return nil, upstream(err, c, "create role", password)
	}
	return &backends.Issued{
		Secret: map[string][]byte{
			"host": []byte(c.host), "port": []byte(c.port), "database": []byte(c.database),
			"user": []byte(role), "password": []byte(password), "dsn": []byte(c.dsn(role, password)),
		},
		Artifact:  []byte(role),
		ExpiresAt: expires,
	}, nil
}

// Renew implements backends.Backend: it moves VALID UNTIL.
func (b *Backend) Renew(ctx context.Context, ref backends.LeaseRef, expiresAt time.Time) (time.Time, error) {
	c, err := parse(ref.Spec)
	if err != nil {
		return time.Time{}, err
	}
	role := string(ref.Artifact)
	if !roleRE.MatchString(role) {
		return time.Time{}, fmt.Errorf("postgres: %q is not a lease role", role)
	}
	if c.maxTTL > 0 && time.Now().Add(c.maxTTL).Before(expiresAt) {
		expiresAt = time.Now().Add(c.maxTTL)
	}
	pool, err := b.pool(ctx, c)
	if err != nil {
		return time.Time{}, err
	}
	if _, err := pool.Exec(ctx, fmt.Sprintf("ALTER ROLE %s VALID UNTIL %s", pgx.Identifier{role}.Sanitize(), timestamp(expiresAt))); err != nil {
		return time.Time{}, upstream(err, c, "renew role")
	}
	return expiresAt, nil
}

var (
	_ backends.Rotator      = (*Backend)(nil)
	_ backends.BatchRevoker = (*Backend)(nil)
)

// RevokeBatch implements backends.BatchRevoker: the roles of one credential
// are dropped in one transaction (one catalog scan for all of them). If that
// fails, each is revoked on its own so one bad role does not hold up the
// others.
func (b *Backend) RevokeBatch(ctx context.Context, refs []backends.LeaseRef) []error {
	errs := make([]error, len(refs))
	if len(refs) == 0 {
		return errs
	}
	c, err := parse(refs[0].Spec)
	if err != nil {
		for i := range errs {
			errs[i] = err
		}
		return errs
	}
	roles := make([]string, 0, len(refs))
	for i, r := range refs {
		if !roleRE.MatchString(string(r.Artifact)) {
			errs[i] = fmt.Errorf("postgres: %q is not a lease role", r.Artifact)
			continue
		}
		roles = append(roles, string(r.Artifact))
	}
	pool, err := b.pool(ctx, c)
	if err == nil {
		err = dropRoles(ctx, pool, roles)
	}
	if err == nil {
		return errs
	}
	for i, r := range refs {
		if errs[i] == nil {
			errs[i] = b.Revoke(ctx, r)
		}
	}
	return errs
}

// dropRoles drops those of roles that exist, in one transaction.
func dropRoles(ctx context.Context, pool *pgxpool.Pool, roles []string) error {
	rows, err := pool.Query(ctx, "SELECT rolname FROM pg_roles WHERE rolname = ANY($1)", roles)
	if err != nil {
		return err
	}
	existing, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil || len(existing) == 0 {
		return err
	}
	idents := make([]string, len(existing))
	literals := make([]string, len(existing))
	for i, r := range existing {
		idents[i], literals[i] = pgx.Identifier{r}.Sanitize(), quoteLiteral(r)
	}
	var script strings.Builder
	fmt.Fprintf(&script, "SELECT pg_advisory_xact_lock(%d);\n", int64(catalogLock))
	for _, id := range idents {
		fmt.Fprintf(&script, "ALTER ROLE %s NOLOGIN;\n", id)
	}
	list := strings.Join(idents, ", ")
	fmt.Fprintf(&script, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename IN (%s);\n", strings.Join(literals, ", "))
	fmt.Fprintf(&script, "REASSIGN OWNED BY %s TO CURRENT_USER;\nDROP OWNED BY %s;\nDROP ROLE %s;", list, list, list)
	return runScript(ctx, pool, script.String())
}

// NextSecret implements backends.Rotator: a new random admin password.
func (b *Backend) NextSecret(spec backends.Spec) (map[string][]byte, error) {
	if _, err := parse(spec); err != nil {
		return nil, err
	}
	raw := make([]byte, 32)
	if _, err := rand.Read(raw); err != nil {
		return nil, err
	}
	return map[string][]byte{"admin_password": []byte(base64.RawURLEncoding.EncodeToString(raw))}, nil
}

// Rotate implements backends.Rotator: ALTER ROLE CURRENT_USER PASSWORD. The
// pool for the old password is closed; connections it had open end, and
// lease roles are not touched.
func (b *Backend) Rotate(ctx context.Context, spec backends.Spec, next map[string][]byte) error {
	c, err := parse(spec)
	if err != nil {
		return err
	}
	pw := string(next["admin_password"])
	if len(pw) < 16 {
		return invalid("secret.admin_password: the new password is too short")
	}
	pool, err := b.pool(ctx, c)
	if err != nil {
		return err
	}
	verifier, err := scramVerifier(pw)
	if err != nil {
		return err
	}
	if _, err := pool.Exec(ctx, "ALTER ROLE CURRENT_USER PASSWORD "+quoteLiteral(verifier)); err != nil {
		return upstream(err, c, "rotate admin password", pw)
	}
	key := sha256.Sum256([]byte(c.dsn(c.adminUser, c.adminPassword)))
	b.mu.Lock()
	delete(b.pools, key)
	b.mu.Unlock()
	pool.Close()
	return nil
}

// Revoke implements backends.Backend: it stops new logins, terminates the
// role's sessions, drops what it owns and drops it. A role that is already
// gone is success.
func (b *Backend) Revoke(ctx context.Context, ref backends.LeaseRef) error {
	c, err := parse(ref.Spec)
	if err != nil {
		return err
	}
	role := string(ref.Artifact)
	if !roleRE.MatchString(role) {
		return fmt.Errorf("postgres: %q is not a lease role", role)
	}
	pool, err := b.pool(ctx, c)
	if err != nil {
		return err
	}
	ident := pgx.Identifier{role}.Sanitize()
	var exists bool
	if err := pool.QueryRow(ctx, "SELECT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = $1)", role).Scan(&exists); err != nil {
		return upstream(err, c, "drop role")
	}
	if !exists {
		return nil
	}
	// One transaction, one round trip (see Issue). The role name is checked
	// against roleRE above, so it is safe as a literal too.
	script := fmt.Sprintf(`SELECT pg_advisory_xact_lock(%d);
ALTER ROLE %[2]s NOLOGIN;
SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %[3]s;
REASSIGN OWNED BY %[2]s TO CURRENT_USER;
DROP OWNED BY %[2]s;
DROP ROLE %[2]s;`, int64(catalogLock), ident, quoteLiteral(role))
	if err := runScript(ctx, pool, script); err != nil {
		var pgErr *pgconn.PgError
		if errors.As(err, &pgErr) && pgErr.Code == "42704" { // undefined_object: dropped meanwhile
			return nil
		}
		return upstream(err, c, "drop role")
	}
	return nil
}

// LeasesIndependentOfSecret implements backends.LeaseIndependent: a lease
// is its own role; rotating the admin password leaves it alone.
func (b *Backend) LeasesIndependentOfSecret() bool { return true }

// Two-phase rotation of the admin password (rotate-root) on the broker's
// schedule. One role cannot have two passwords, so there is no overlap
// upstream: Create replaces the password, Verify logs in with it, Retire has
// nothing left to do. What makes it safe is that Create derives the new
// password from the current one and the rotation id: a broker that crashed
// after the ALTER ROLE and before storing the result finds, on resume, that
// the stored password no longer logs in, derives the same new one, and
// continues with it.

var _ backends.TwoPhaseRotator = (*Backend)(nil)

func derivePassword(current, rotationID string) string {
	m := hmac.New(sha256.New, []byte(current))
	m.Write([]byte("leasehold/rotate-root/" + rotationID))
	return base64.RawURLEncoding.EncodeToString(m.Sum(nil))
}

// Create implements backends.TwoPhaseRotator.
func (b *Backend) Create(ctx context.Context, spec backends.Spec, rotationID string) (map[string][]byte, error) {
	c, err := parse(spec)
	if err != nil {
		return nil, err
	}
	next := derivePassword(c.adminPassword, rotationID)
	nextSpec := backends.Spec{Name: spec.Name, Config: spec.Config, Secret: map[string][]byte{"admin_password": []byte(next)}}
	err = b.Rotate(ctx, spec, nextSpec.Secret)
	if err == nil {
		return nextSpec.Secret, nil
	}
	// Resumed after the ALTER ROLE already ran: the new password works.
	if verr := b.Verify(ctx, spec, nextSpec.Secret); verr == nil {
		return nextSpec.Secret, nil
	}
	return nil, err
}

// Verify implements backends.TwoPhaseRotator: log in with the new password.
func (b *Backend) Verify(ctx context.Context, spec backends.Spec, next map[string][]byte) error {
	c, err := parse(backends.Spec{Name: spec.Name, Config: spec.Config, Secret: next})
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	conn, err := pgx.Connect(ctx, c.dsn(c.adminUser, c.adminPassword))
	if err != nil {
		return upstream(err, c, "log in with the new admin password")
	}
	return conn.Close(context.Background())
}

// Retire implements backends.TwoPhaseRotator: the old admin password
// stopped working when Create replaced it.
func (b *Backend) Retire(context.Context, backends.Spec, map[string][]byte) error { return nil }

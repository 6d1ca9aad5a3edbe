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
// Nothing from a request reaches SQL as text: the role name is the prefix
// and the lease id's hex digits, both checked; scopes only select templates
// from the admin's config; the password and expiry are quoted literals.
package postgres

import (
	"context"
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
	ident := pgx.Identifier{role}.Sanitize()
	err = pgx.BeginFunc(ctx, pool, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, fmt.Sprintf("CREATE ROLE %s LOGIN PASSWORD %s VALID UNTIL %s", ident,
			quoteLiteral(password), timestamp(expires))); err != nil {
			return err
		}
		// Membership lets the admin terminate the role's sessions and
		// reassign what it owns when the lease ends.
		if _, err := tx.Exec(ctx, "GRANT "+ident+" TO CURRENT_USER"); err != nil {
			return err
		}
		for _, s := range scopes {
			sql := strings.ReplaceAll(c.scopes[s], placeholder, ident)
			// Simple protocol: a template may hold several statements.
			if _, err := tx.Conn().PgConn().Exec(ctx, sql).ReadAll(); err != nil {
				return fmt.Errorf("scope %q template: %w", s, err)
			}
		}
		return nil
	})
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

var _ backends.Rotator = (*Backend)(nil)

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
	if _, err := pool.Exec(ctx, "ALTER ROLE CURRENT_USER PASSWORD "+quoteLiteral(pw)); err != nil {
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
	err = pgx.BeginFunc(ctx, pool, func(tx pgx.Tx) error {
		var exists bool
		if err := tx.QueryRow(ctx, "SELECT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = $1)", role).Scan(&exists); err != nil {
			return err
		}
		if !exists {
			return nil
		}
		if _, err := tx.Exec(ctx, "ALTER ROLE "+ident+" NOLOGIN"); err != nil {
			return err
		}
		if _, err := tx.Exec(ctx, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1", role); err != nil {
			return err
		}
		for _, sql := range []string{
			"REASSIGN OWNED BY " + ident + " TO CURRENT_USER",
			"DROP OWNED BY " + ident,
			"DROP ROLE " + ident,
		} {
			if _, err := tx.Exec(ctx, sql); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		return upstream(err, c, "drop role")
	}
	return nil
}

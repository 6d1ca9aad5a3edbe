// Package pgtest starts throwaway PostgreSQL clusters for tests: initdb and
// pg_ctl from Debian's packages (scripts/install-deps.sh installs them) in a
// temporary directory, on a free loopback port, with password (SCRAM) auth
// on TCP so logins, passwords and VALID UNTIL are really checked. When run
// as root the server runs as the postgres user, as initdb requires.
package pgtest

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"sort"
	"strconv"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
)

// Cluster is a running throwaway PostgreSQL server.
type Cluster struct {
	Host     string
	Port     int
	Password string // of the superuser "postgres"
	dir      string
	bin      string
	cred     *syscall.Credential
}

// Start starts a cluster that is stopped and deleted when the test ends.
// Without PostgreSQL installed the test is skipped, or fails under CI=true.
func Start(t testing.TB) *Cluster {
	t.Helper()
	bins, _ := filepath.Glob("/usr/lib/postgresql/*/bin/initdb")
	if len(bins) == 0 {
		if os.Getenv("CI") == "true" {
			t.Fatal("PostgreSQL is not installed: run scripts/install-deps.sh (CI must not skip this test)")
		}
		t.Skip("PostgreSQL is not installed; run scripts/install-deps.sh")
	}
	sort.Strings(bins)
	c := &Cluster{Host: "127.0.0.1", bin: filepath.Dir(bins[len(bins)-1])}
	dir, err := os.MkdirTemp("", "lh-pg-")
	if err != nil {
		t.Fatal(err)
	}
	c.dir = dir
	t.Cleanup(func() {
		c.run(t, false, "pg_ctl", "-D", c.data(), "-m", "immediate", "-w", "stop")
		os.RemoveAll(dir)
	})
	if os.Geteuid() == 0 {
		u, err := user.Lookup("postgres")
		if err != nil {
			t.Fatalf("running as root needs the postgres user: %v", err)
		}
		uid, _ := strconv.Atoi(u.Uid)
		gid, _ := strconv.Atoi(u.Gid)
		c.cred = &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid)}
		if err := os.Chown(dir, uid, gid); err != nil {
			t.Fatal(err)
		}
	}
	pw := make([]byte, 16)
	_, _ = rand.Read(pw)
	c.Password = hex.EncodeToString(pw)
	pwfile := filepath.Join(dir, "pwfile")
	if err := os.WriteFile(pwfile, []byte(c.Password+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if c.cred != nil {
		_ = os.Chown(pwfile, int(c.cred.Uid), int(c.cred.Gid))
	}
	c.run(t, true, "initdb", "-D", c.data(), "-U", "postgres", "--auth-local=trust", "--auth-host=scram-sha-256",
		"--pwfile="+pwfile, "-E", "UTF8", "--no-locale", "--no-sync")
	c.Port = freePort(t)
	c.StartServer(t)
	return c
}

func (c *Cluster) data() string { return filepath.Join(c.dir, "data") }

func (c *Cluster) run(t testing.TB, must bool, name string, args ...string) {
	t.Helper()
	cmd := exec.Command(filepath.Join(c.bin, name), args...)
	if c.cred != nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: c.cred}
	}
	out, err := cmd.CombinedOutput()
	if err != nil && must {
		log, _ := os.ReadFile(filepath.Join(c.dir, "log"))
		t.Fatalf("%s: %v\n%s\n%s", name, err, out, log)
	}
}

// StartServer (re)starts the server on its port.
func (c *Cluster) StartServer(t testing.TB) {
	t.Helper()
	c.run(t, true, "pg_ctl", "-D", c.data(), "-l", filepath.Join(c.dir, "log"), "-w", "-o",
		fmt.Sprintf("-c listen_addresses=127.0.0.1 -p %d -k %s -c fsync=off -c max_connections=200 -c log_statement=ddl", c.Port, c.dir), "start")
}

// Log returns the server's log so far. Statements that change roles are
// logged (log_statement=ddl), as on many production servers.
func (c *Cluster) Log(t testing.TB) string {
	t.Helper()
	data, err := os.ReadFile(filepath.Join(c.dir, "log"))
	if err != nil {
		t.Fatal(err)
	}
	return string(data)
}

// StopServer stops the server (fast shutdown), keeping its data.
func (c *Cluster) StopServer(t testing.TB) {
	t.Helper()
	c.run(t, true, "pg_ctl", "-D", c.data(), "-m", "fast", "-w", "stop")
}

// DSN is a connection string for user and password on database postgres.
func (c *Cluster) DSN(user, password string) string {
	return fmt.Sprintf("postgres://%s:%s@%s:%d/postgres?sslmode=disable&connect_timeout=5", user, password, c.Host, c.Port)
}

// Connect connects as the superuser.
func (c *Cluster) Connect(t testing.TB) *pgx.Conn {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	conn, err := pgx.Connect(ctx, c.DSN("postgres", c.Password))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close(context.Background()) })
	return conn
}

// Exec runs SQL as the superuser.
func (c *Cluster) Exec(t testing.TB, sql string, args ...any) {
	t.Helper()
	conn := c.Connect(t)
	if _, err := conn.Exec(context.Background(), sql, args...); err != nil {
		t.Fatalf("%s: %v", sql, err)
	}
}

func freePort(t testing.TB) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

package main

import (
	"context"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/require"

	"github.com/leasehold/leasehold/backends/postgres/pgtest"
)

// An analytics agent, as a new user would drive it with the CLI: a
// read-only login that works, then stops working when the lease ends.
func TestPostgresLeaseThroughTheCLI(t *testing.T) {
	c := pgtest.Start(t)
	c.Exec(t, "CREATE ROLE leasehold_admin LOGIN CREATEROLE PASSWORD 'admin-pw-e2e'")
	c.Exec(t, "CREATE TABLE public.sales (amount int)")
	c.Exec(t, "INSERT INTO public.sales VALUES (42)")
	c.Exec(t, "CREATE ROLE analytics_read NOLOGIN")
	c.Exec(t, "GRANT SELECT ON public.sales TO analytics_read")
	c.Exec(t, "GRANT analytics_read TO leasehold_admin WITH ADMIN OPTION")

	dir := t.TempDir()
	addr := startDev(t, dir, "dev")
	cli := func(as string, args ...string) string {
		t.Helper()
		out, err := exec.Command(leaseholdBin, append([]string{"--addr", addr, "--dev-dir", filepath.Join(dir, "dev"), "--as", as}, args...)...).CombinedOutput()
		require.NoError(t, err, "%s", out)
		return string(out)
	}
	pwFile := filepath.Join(dir, "pg-admin")
	require.NoError(t, writeSecret(pwFile, "admin-pw-e2e"))
	cli("admin", "credential", "put", "db/analytics", "--backend", "postgres",
		"--config", "host=127.0.0.1", "--config", "port="+strconv.Itoa(c.Port), "--config", "database=postgres",
		"--config", "sslmode=disable", "--config", "admin_user=leasehold_admin",
		"--config", "scope.read=GRANT analytics_read TO {{role}}", "--set-file", "admin_password="+pwFile)
	cli("admin", "grant", "create", "--credential", "db/analytics", "--spiffe-id", "spiffe://leasehold.dev/agents/agent-1",
		"--scopes", "read", "--max-ttl", "5m")

	env := cli("agent-1", "acquire", "db/analytics", "--scopes", "read", "--task", "q4-report", "--format", "env")
	dsn := regexp.MustCompile(`(?m)^DSN='([^']+)'$`).FindStringSubmatch(env)
	require.NotNil(t, dsn, env)
	lease := regexp.MustCompile(`(?m)^LEASEHOLD_LEASE_ID='([^']+)'$`).FindStringSubmatch(env)[1]

	ctx := context.Background()
	conn, err := pgx.Connect(ctx, dsn[1])
	require.NoError(t, err)
	defer conn.Close(ctx)
	var amount int
	require.NoError(t, conn.QueryRow(ctx, "SELECT amount FROM public.sales").Scan(&amount))
	require.Equal(t, 42, amount)
	_, err = conn.Exec(ctx, "DELETE FROM public.sales")
	require.ErrorContains(t, err, "permission denied")

	cli("agent-1", "release", lease)
	require.Eventually(t, func() bool {
		c2, err := pgx.Connect(ctx, dsn[1])
		if err == nil {
			c2.Close(ctx)
		}
		return err != nil
	}, 15*time.Second, 50*time.Millisecond, "the login stops working once the lease ends")
	require.Error(t, conn.Ping(ctx), "and the open session was ended")
	require.Eventually(t, func() bool {
		return strings.Contains(cli("admin", "lease", "list", "--agent", "spiffe://leasehold.dev/agents/agent-1"), "STATE_DONE")
	}, 15*time.Second, 50*time.Millisecond, "lease list shows the role destroyed")
}

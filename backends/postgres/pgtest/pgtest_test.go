package pgtest_test

import (
	"context"
	"testing"

	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/require"

	"github.com/leasehold/leasehold/backends/postgres/pgtest"
)

func TestClusterEnforcesPasswords(t *testing.T) {
	c := pgtest.Start(t)
	c.Exec(t, "CREATE ROLE probe LOGIN PASSWORD 'right-password'")
	ctx := context.Background()
	conn, err := pgx.Connect(ctx, c.DSN("probe", "right-password"))
	require.NoError(t, err)
	conn.Close(ctx)
	_, err = pgx.Connect(ctx, c.DSN("probe", "wrong-password"))
	require.ErrorContains(t, err, "password authentication failed", "TCP logins need the password")
	c.StopServer(t)
	_, err = pgx.Connect(ctx, c.DSN("probe", "right-password"))
	require.Error(t, err)
	c.StartServer(t)
	conn, err = pgx.Connect(ctx, c.DSN("probe", "right-password"))
	require.NoError(t, err)
	conn.Close(ctx)
}

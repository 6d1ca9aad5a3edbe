package server_test

import (
	"errors"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"google.golang.org/grpc/codes"

	leaseholdv1 "github.com/leasehold/leasehold/proto/leasehold/v1"
	"github.com/leasehold/leasehold/server"
)

// A flood of idle connections and of slow, never-finished TLS handshakes
// does not keep other agents from being served, and the broker drops the
// stalled ones after its handshake timeout. Bounded and on loopback.
func TestIdleAndSlowConnectionsDoNotStarveAgents(t *testing.T) {
	e := newEnv(t, noQuotas, func(c *server.Config) { c.HandshakeTimeout = time.Second })
	e.putStatic("crm/api", map[string]string{"k": "v"})
	e.grant("crm/api", agent1ID, "read")
	var conns []net.Conn
	t.Cleanup(func() {
		for _, c := range conns {
			c.Close()
		}
	})
	for i := range 200 {
		c, err := net.Dial("tcp", e.addr)
		require.NoError(t, err)
		conns = append(conns, c)
		if i%2 == 0 {
			// The first bytes of a TLS ClientHello record, then nothing.
			_, err = c.Write([]byte{0x16, 0x03, 0x01, 0x02, 0x00, 0x01})
			require.NoError(t, err)
		}
	}
	for i := range 20 {
		_, err := e.agent1.AcquireLease(ctx, acquireReq("crm/api", "t-"+strings.Repeat("x", i+1), "read"))
		require.NoError(t, err, "served while 200 connections stall")
	}
	// Each stalled connection is closed by the broker.
	for _, c := range conns[:10] {
		require.NoError(t, c.SetReadDeadline(time.Now().Add(10*time.Second)))
		_, err := c.Read(make([]byte, 1))
		require.Error(t, err)
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			t.Fatalf("the broker kept a stalled connection open past its handshake timeout")
		}
	}
}

// An oversized request is refused before it is read into memory.
func TestOversizedRequestIsRefused(t *testing.T) {
	e := newEnv(t)
	e.putStatic("crm/api", map[string]string{"k": "v"})
	e.grant("crm/api", agent1ID, "read")
	req := acquireReq("crm/api", "t", "read")
	req.Task.Purpose = strings.Repeat("p", 5<<20)
	_, err := e.agent1.AcquireLease(ctx, req)
	requireCode(t, err, codes.ResourceExhausted, "larger than max")
	_, err = e.agent1.WhoAmI(ctx, &leaseholdv1.WhoAmIRequest{})
	require.NoError(t, err, "the connection is still good")
}

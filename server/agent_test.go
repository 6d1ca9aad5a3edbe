package server_test

import (
	"context"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/leasehold/leasehold/client"
	leaseholdv1 "github.com/leasehold/leasehold/proto/leasehold/v1"
)

func (e *env) agentClient(id string) *client.Client {
	e.t.Helper()
	c, err := client.New(ctx, client.Config{Address: e.addr, Source: e.source(id)})
	require.NoError(e.t, err)
	e.t.Cleanup(func() { c.Close() })
	return c
}

func TestRevocationReachesAWatchingClientWithinASecond(t *testing.T) {
	e := newEnv(t)
	e.putStatic("crm/salesforce", map[string]string{"api_key": "k"})
	e.grant("crm/salesforce", agent1ID, "read")
	c := e.agentClient(agent1ID)
	l, err := c.Acquire(ctx, "crm/salesforce", client.AcquireOptions{Scopes: []string{"read"}, TaskID: "t"})
	require.NoError(t, err)
	v, err := l.Get("api_key")
	require.NoError(t, err)
	require.Equal(t, "k", v)

	start := time.Now()
	_, err = e.admin.RevokeAgent(ctx, &leaseholdv1.RevokeAgentRequest{SpiffeId: agent1ID, Reason: "prompt injection suspected"})
	require.NoError(t, err)
	select {
	case <-l.Done():
	case <-time.After(time.Second):
		t.Fatal("the client did not learn of the revocation within a second")
	}
	t.Logf("revocation reached the client in %v", time.Since(start))
	_, err = l.Secret()
	require.ErrorIs(t, err, client.ErrRevoked)
	require.ErrorIs(t, err, client.ErrLeaseEnded)
	require.ErrorContains(t, err, "prompt injection suspected")
}

func TestAutoRenewKeepsALeaseAliveAndStopsOnRefusal(t *testing.T) {
	e := newEnv(t)
	e.putStatic("crm/salesforce", map[string]string{"api_key": "k"})
	_, err := e.admin.CreateGrant(ctx, &leaseholdv1.CreateGrantRequest{Grant: &leaseholdv1.Grant{
		Subject: &leaseholdv1.Grant_SpiffeId{SpiffeId: agent1ID}, Credential: "crm/salesforce", Scopes: []string{"read"},
		MaxTtl: durationpb.New(3 * time.Second), MaxLifetime: durationpb.New(time.Hour)}})
	require.NoError(t, err)
	// No watch: the refusal of a renewal is the only way this client learns.
	c, err := client.New(ctx, client.Config{Address: e.addr, Source: e.source(agent1ID), NoWatch: true})
	require.NoError(t, err)
	defer c.Close()
	// A 3s lease is renewed at ~2s: a second of slack for a loaded machine.
	l, err := c.Acquire(ctx, "crm/salesforce", client.AcquireOptions{Scopes: []string{"read"}, TaskID: "t", TTL: 3 * time.Second, AutoRenew: true})
	require.NoError(t, err)
	first := l.ExpiresAt()
	time.Sleep(4 * time.Second) // past the lease's first expiry
	_, err = l.Secret()
	require.NoError(t, err, "renewed in the background")
	require.True(t, l.ExpiresAt().After(first.Add(time.Second)), "the expiry moved")

	// A refused renewal ends the lease and renewals stop (no storm).
	_, err = e.admin.RevokeLease(ctx, &leaseholdv1.RevokeLeaseRequest{LeaseId: l.ID})
	require.NoError(t, err)
	select {
	case <-l.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("lease not ended")
	}
	_, err = l.Secret()
	require.ErrorIs(t, err, client.ErrLeaseEnded, "the refused renewal ended it: %v", err)
	renewals := func() int {
		n := 0
		for _, r := range e.audit(&leaseholdv1.QueryAuditRequest{LeaseId: l.ID}) {
			if r.GetEvent() == leaseholdv1.AuditEvent_AUDIT_EVENT_LEASE_RENEW {
				n++
			}
		}
		return n
	}
	n := renewals()
	time.Sleep(1500 * time.Millisecond)
	require.Equal(t, n, renewals(), "no renew attempts after the lease ended")
}

func TestWithLeaseReleasesWhenDone(t *testing.T) {
	e := newEnv(t)
	e.putStatic("db/x", map[string]string{"dsn": "postgres://x"})
	e.grant("db/x", agent1ID, "read")
	c := e.agentClient(agent1ID)
	var held *client.Lease
	boom := errors.New("query failed")
	err := c.WithLease(ctx, "db/x", client.AcquireOptions{Scopes: []string{"read"}, TaskID: "t"}, func(l *client.Lease) error {
		held = l
		v, err := l.Get("dsn")
		require.NoError(t, err)
		require.Equal(t, "postgres://x", v)
		return boom
	})
	require.ErrorIs(t, err, boom)
	_, err = held.Secret()
	require.ErrorIs(t, err, client.ErrLeaseEnded, "discarded after use")
	leases, err := e.admin.ListLeases(ctx, &leaseholdv1.ListLeasesRequest{AgentId: agent1ID})
	require.NoError(t, err)
	require.Equal(t, leaseholdv1.LeaseState_LEASE_STATE_RELEASED, leases.GetLeases()[0].GetState())
}

func TestTransportInjectsForMappedHostsOnly(t *testing.T) {
	e := newEnv(t)
	e.putStatic("crm/salesforce", map[string]string{"api_key": "CANARY-rt-8", "user": "u", "password": "p"})
	e.grant("crm/salesforce", agent1ID, "read")
	var got []http.Header
	upstream := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		got = append(got, r.Header.Clone())
		_, _ = io.WriteString(w, "ok")
	}))
	defer upstream.Close()
	u, _ := url.Parse(upstream.URL)

	for name, tc := range map[string]struct {
		inject client.Injection
		check  func(http.Header)
	}{
		"bearer": {client.Bearer("api_key"), func(h http.Header) { require.Equal(t, "Bearer CANARY-rt-8", h.Get("Authorization")) }},
		"basic":  {client.Basic("user", "password"), func(h http.Header) { require.Equal(t, "Basic dTpw", h.Get("Authorization")) }},
		"header": {client.Header("X-Api-Key", "api_key"), func(h http.Header) { require.Equal(t, "CANARY-rt-8", h.Get("X-Api-Key")) }},
	} {
		t.Run(name, func(t *testing.T) {
			got = nil
			tr := &client.Transport{Client: e.agentClient(agent1ID), TaskID: "t-" + name,
				Routes: map[string]client.Route{u.Hostname(): {Credential: "crm/salesforce", Scopes: []string{"read"}, Inject: tc.inject}}}
			defer tr.Close(context.Background())
			hc := &http.Client{Transport: tr}
			req, _ := http.NewRequest(http.MethodGet, upstream.URL, nil)
			resp, err := hc.Do(req)
			require.NoError(t, err)
			resp.Body.Close()
			require.Len(t, got, 1)
			tc.check(got[0])
			require.Empty(t, req.Header, "the caller's request is not modified")

			resp, err = hc.Get("http://unmapped.example/")
			if err == nil {
				resp.Body.Close()
			}
			require.ErrorIs(t, err, client.ErrUnmappedHost)
			require.Len(t, got, 1, "nothing was sent for an unmapped host")
		})
	}
}

func TestWatchLeasesShowsOnlyTheCallersLeases(t *testing.T) {
	e := newEnv(t)
	e.putStatic("a/b", map[string]string{"k": "v"})
	e.grant("a/b", agent1ID, "read")
	e.grant("a/b", agent2ID, "read")
	sctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stream, err := e.agent2.WatchLeases(sctx, &leaseholdv1.WatchLeasesRequest{})
	require.NoError(t, err)
	sync, err := stream.Recv()
	require.NoError(t, err)
	require.Equal(t, leaseholdv1.LeaseEvent_LEASE_EVENT_UNSPECIFIED, sync.GetEvent(), "the first message is the sync marker")

	mine, err := e.agent2.AcquireLease(ctx, acquireReq("a/b", "t2", "read"))
	require.NoError(t, err)
	theirs, err := e.agent1.AcquireLease(ctx, acquireReq("a/b", "t1", "read"))
	require.NoError(t, err)
	_, err = e.admin.RevokeLease(ctx, &leaseholdv1.RevokeLeaseRequest{LeaseId: theirs.GetLease().GetId()})
	require.NoError(t, err)
	_, err = e.admin.RevokeLease(ctx, &leaseholdv1.RevokeLeaseRequest{LeaseId: mine.GetLease().GetId(), Reason: "r"})
	require.NoError(t, err)
	for _, want := range []leaseholdv1.LeaseEvent{leaseholdv1.LeaseEvent_LEASE_EVENT_ACQUIRED, leaseholdv1.LeaseEvent_LEASE_EVENT_REVOKED} {
		ev, err := stream.Recv()
		require.NoError(t, err)
		require.Equal(t, want, ev.GetEvent())
		require.Equal(t, mine.GetLease().GetId(), ev.GetLeaseId(), "never another agent's lease")
	}
}

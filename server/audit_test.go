package server_test

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	bbolt "go.etcd.io/bbolt"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	leaseholdv1 "github.com/leasehold/leasehold/proto/leasehold/v1"
	"github.com/leasehold/leasehold/store"
)

// activity makes some audit records: puts, grants, acquires and releases.
func (e *env) activity(n int) {
	e.t.Helper()
	e.putStatic("crm/salesforce", map[string]string{"api_key": "k"})
	e.grant("crm/salesforce", agent1ID, "read")
	for i := range n {
		l, err := e.agent1.AcquireLease(ctx, acquireReq("crm/salesforce", fmt.Sprint("t-", i), "read"))
		require.NoError(e.t, err)
		_, err = e.agent1.ReleaseLease(ctx, &leaseholdv1.ReleaseLeaseRequest{LeaseId: l.GetLease().GetId()})
		require.NoError(e.t, err)
	}
}

func u64key(v uint64) []byte { return binary.BigEndian.AppendUint64(nil, v) }

// editRecords opens the stopped broker's bbolt file directly, as an
// attacker with file access would, and changes the audit bucket.
func (e *env) editRecords(fn func(audit, meta *bbolt.Bucket) error) {
	e.t.Helper()
	db, err := bbolt.Open(filepath.Join(e.dir, "leasehold.db"), 0o600, nil)
	require.NoError(e.t, err)
	require.NoError(e.t, db.Update(func(tx *bbolt.Tx) error { return fn(tx.Bucket([]byte("audit")), tx.Bucket([]byte("meta"))) }))
	require.NoError(e.t, db.Close())
}

func getRecord(t testing.TB, audit *bbolt.Bucket, seq uint64) *store.AuditRecord {
	var r store.AuditRecord
	require.NoError(t, json.Unmarshal(audit.Get(u64key(seq)), &r))
	return &r
}

func putRecord(t testing.TB, audit *bbolt.Bucket, r *store.AuditRecord) {
	data, err := json.Marshal(r)
	require.NoError(t, err)
	require.NoError(t, audit.Put(u64key(r.Sequence), data))
}

func copyFile(t testing.TB, from, to string) {
	in, err := os.Open(from)
	require.NoError(t, err)
	defer in.Close()
	out, err := os.Create(to)
	require.NoError(t, err)
	_, err = io.Copy(out, in)
	require.NoError(t, err)
	require.NoError(t, out.Close())
}

func TestVerifyAuditDetectsTampering(t *testing.T) {
	e := newEnv(t)
	e.activity(5) // 2 + 10 records
	ok, err := e.admin.VerifyAudit(ctx, &leaseholdv1.VerifyAuditRequest{})
	require.NoError(t, err)
	require.True(t, ok.GetOk(), ok.GetProblem())
	require.Equal(t, uint64(12), ok.GetRecordsChecked())
	cp, err := e.admin.GetAuditCheckpoint(ctx, &leaseholdv1.GetAuditCheckpointRequest{})
	require.NoError(t, err)
	require.Equal(t, uint64(12), cp.GetCheckpoint().GetSequence())
	require.Equal(t, ok.GetHead().GetHash(), cp.GetCheckpoint().GetHash())
	mid := e.audit(&leaseholdv1.QueryAuditRequest{})[5] // sequence 7
	require.Equal(t, uint64(7), mid.GetSequence())
	exported := []*leaseholdv1.AuditCheckpoint{{Sequence: 7, Hash: mid.GetHash()}, cp.GetCheckpoint()}

	e.stop()
	pristine := filepath.Join(e.dir, "pristine.db")
	copyFile(t, filepath.Join(e.dir, "leasehold.db"), pristine)

	cases := []struct {
		name   string
		edit   func(audit, meta *bbolt.Bucket) error
		broken uint64
		want   string
	}{
		{"a field edited", func(audit, _ *bbolt.Bucket) error {
			r := getRecord(t, audit, 5)
			r.Reason = "nothing to see here"
			putRecord(t, audit, r)
			return nil
		}, 5, "record 5 was altered"},
		{"raw bytes corrupted", func(audit, _ *bbolt.Bucket) error {
			return audit.Put(u64key(6), []byte(`{"seq":6,`))
		}, 6, "record 6 cannot be decoded"},
		{"a record deleted", func(audit, _ *bbolt.Bucket) error { return audit.Delete(u64key(4)) }, 4, "record 4 is missing"},
		{"edited and re-hashed", func(audit, _ *bbolt.Bucket) error {
			r := getRecord(t, audit, 5)
			r.AgentID = "spiffe://leasehold.test/agents/someone-else"
			r.Hash = store.AuditHash(r)
			putRecord(t, audit, r)
			return nil
		}, 6, "record 6 does not link to record 5"},
		{"the tail rewritten consistently", func(audit, meta *bbolt.Bucket) error {
			// Re-chain everything from record 3 on, head included: only an
			// exported checkpoint can tell.
			prev := getRecord(t, audit, 2).Hash
			var last *store.AuditRecord
			for seq := uint64(3); seq <= 12; seq++ {
				r := getRecord(t, audit, seq)
				if seq == 3 {
					r.TaskPurpose = "rewritten"
				}
				store.ChainAudit(r, prev)
				putRecord(t, audit, r)
				prev, last = r.Hash, r
			}
			head, _ := json.Marshal(map[string]any{"seq": last.Sequence, "hash": last.Hash, "time": last.Time})
			return meta.Put([]byte("audit_head"), head)
		}, 7, "record 7 differs from the checkpoint"},
		{"the last record removed", func(audit, _ *bbolt.Bucket) error { return audit.Delete(u64key(12)) }, 12, "record 12 is missing"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			copyFile(t, pristine, filepath.Join(e.dir, "leasehold.db"))
			e.editRecords(tc.edit)
			e.start()
			defer e.stop()
			res, err := e.admin.VerifyAudit(ctx, &leaseholdv1.VerifyAuditRequest{Checkpoints: exported})
			require.NoError(t, err)
			require.False(t, res.GetOk())
			require.Equal(t, tc.broken, res.GetFirstBrokenSequence(), res.GetProblem())
			require.Contains(t, res.GetProblem(), tc.want)
		})
	}

	// Untouched, the exported checkpoints still verify, and a range works.
	copyFile(t, pristine, filepath.Join(e.dir, "leasehold.db"))
	e.start()
	res, err := e.admin.VerifyAudit(ctx, &leaseholdv1.VerifyAuditRequest{Checkpoints: exported})
	require.NoError(t, err)
	require.True(t, res.GetOk(), res.GetProblem())
	res, err = e.admin.VerifyAudit(ctx, &leaseholdv1.VerifyAuditRequest{FromSequence: 4, ToSequence: 8})
	require.NoError(t, err)
	require.True(t, res.GetOk(), res.GetProblem())
	require.Equal(t, uint64(5), res.GetRecordsChecked())
	_, err = e.admin.VerifyAudit(ctx, &leaseholdv1.VerifyAuditRequest{Checkpoints: []*leaseholdv1.AuditCheckpoint{{Sequence: 1, Hash: "zz"}}})
	requireCode(t, err, codes.InvalidArgument, "checkpoints[0]")
	_, err = e.admin.VerifyAudit(ctx, &leaseholdv1.VerifyAuditRequest{FromSequence: 5, ToSequence: 2})
	requireCode(t, err, codes.InvalidArgument, "to_sequence")
}

// A watcher that disconnects and resumes after the last sequence it got
// sees every record exactly once, in order, while agents write concurrently.
func TestWatchAuditResumesWithoutGapsOrDuplicates(t *testing.T) {
	e := newEnv(t)
	e.putStatic("crm/salesforce", map[string]string{"api_key": "k"})
	e.grant("crm/salesforce", agent1ID, "read")
	e.grant("crm/salesforce", agent2ID, "read")

	var wg sync.WaitGroup
	for w := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			agent := e.agent1
			if w%2 == 1 {
				agent = e.agent2
			}
			for i := range 20 {
				l, err := agent.AcquireLease(ctx, acquireReq("crm/salesforce", fmt.Sprintf("w%d-%d", w, i), "read"))
				if err != nil {
					t.Error(err)
					return
				}
				if _, err := agent.ReleaseLease(ctx, &leaseholdv1.ReleaseLeaseRequest{LeaseId: l.GetLease().GetId()}); err != nil {
					t.Error(err)
					return
				}
			}
		}()
	}
	writersDone := make(chan struct{})
	go func() { wg.Wait(); close(writersDone) }()

	var got []uint64
	var cursor uint64
	target := uint64(0)
	for reconnects := 0; ; reconnects++ {
		if target == 0 {
			select {
			case <-writersDone:
				cp, err := e.admin.GetAuditCheckpoint(ctx, &leaseholdv1.GetAuditCheckpointRequest{})
				require.NoError(t, err)
				target = cp.GetCheckpoint().GetSequence()
			default:
			}
		}
		if target != 0 && cursor == target {
			require.Greater(t, reconnects, 10, "the test did reconnect many times")
			break
		}
		// Take a few records, then drop the connection mid-stream. A stream
		// that goes quiet past its deadline is one more disconnect.
		cctx, cancel := context.WithTimeout(ctx, 500*time.Millisecond)
		stream, err := e.admin.WatchAudit(cctx, &leaseholdv1.WatchAuditRequest{AfterSequence: cursor})
		require.NoError(t, err)
		for n := 0; n < 7 && (target == 0 || cursor < target); n++ {
			msg, err := stream.Recv()
			// The deadline reaches the server too, which may end the stream
			// cleanly (EOF) before the client notices it.
			if errors.Is(err, io.EOF) || status.Code(err) == codes.DeadlineExceeded {
				break
			}
			require.NoError(t, err)
			got = append(got, msg.GetRecord().GetSequence())
			cursor = msg.GetRecord().GetSequence()
		}
		cancel()
	}
	require.Len(t, got, int(target))
	for i, seq := range got {
		require.Equal(t, uint64(i+1), seq, "no gap, no duplicate, in order")
	}

	// A filtered watch from the start sees exactly what the query finds.
	want := e.audit(&leaseholdv1.QueryAuditRequest{AgentId: agent2ID, OldestFirst: true})
	cctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stream, err := e.admin.WatchAudit(cctx, &leaseholdv1.WatchAuditRequest{AgentId: agent2ID})
	require.NoError(t, err)
	for _, w := range want {
		msg, err := stream.Recv()
		require.NoError(t, err)
		require.Equal(t, w.GetSequence(), msg.GetRecord().GetSequence())
	}
	// And a new record arrives live.
	_, err = e.agent2.AcquireLease(ctx, acquireReq("crm/salesforce", "live", "read"))
	require.NoError(t, err)
	msg, err := stream.Recv()
	require.NoError(t, err)
	require.Equal(t, "live", msg.GetRecord().GetTaskId())
}

func TestQueryAuditByLeaseOldestFirst(t *testing.T) {
	e := newEnv(t)
	e.putStatic("crm/salesforce", map[string]string{"api_key": "k"})
	e.grant("crm/salesforce", agent1ID, "read")
	l, err := e.agent1.AcquireLease(ctx, acquireReq("crm/salesforce", "t", "read"))
	require.NoError(t, err)
	id := l.GetLease().GetId()
	_, err = e.agent1.RenewLease(ctx, &leaseholdv1.RenewLeaseRequest{LeaseId: id})
	require.NoError(t, err)
	_, err = e.agent1.ReleaseLease(ctx, &leaseholdv1.ReleaseLeaseRequest{LeaseId: id})
	require.NoError(t, err)

	resp, err := e.admin.QueryAudit(ctx, &leaseholdv1.QueryAuditRequest{LeaseId: id, OldestFirst: true, PageSize: 2})
	require.NoError(t, err)
	require.Len(t, resp.GetRecords(), 2)
	require.Equal(t, leaseholdv1.AuditEvent_AUDIT_EVENT_LEASE_ACQUIRE, resp.GetRecords()[0].GetEvent())
	require.Equal(t, leaseholdv1.AuditEvent_AUDIT_EVENT_LEASE_RENEW, resp.GetRecords()[1].GetEvent())
	next, err := e.admin.QueryAudit(ctx, &leaseholdv1.QueryAuditRequest{LeaseId: id, OldestFirst: true, PageToken: resp.GetNextPageToken()})
	require.NoError(t, err)
	require.Len(t, next.GetRecords(), 1)
	require.Equal(t, leaseholdv1.AuditEvent_AUDIT_EVENT_LEASE_RELEASE, next.GetRecords()[0].GetEvent())
	_, err = e.admin.QueryAudit(ctx, &leaseholdv1.QueryAuditRequest{LeaseId: id, PageToken: resp.GetNextPageToken()})
	requireCode(t, err, codes.InvalidArgument, "page_token:")
	_, err = e.admin.QueryAudit(ctx, &leaseholdv1.QueryAuditRequest{LeaseId: "ls_1"})
	requireCode(t, err, codes.InvalidArgument, "lease_id:")
	require.Len(t, next.GetRecords()[0].GetHash(), 64)
}

func TestExplainAccess(t *testing.T) {
	e := newEnv(t)
	e.putStatic("crm/salesforce", map[string]string{"api_key": "k"})
	g := e.grant("crm/salesforce", agent1ID, "read")
	explain := func(agent, cred string, scopes ...string) *leaseholdv1.ExplainAccessResponse {
		t.Helper()
		r, err := e.admin.ExplainAccess(ctx, &leaseholdv1.ExplainAccessRequest{AgentId: agent, Credential: cred, Scopes: scopes})
		require.NoError(t, err)
		return r
	}
	before := e.snapshot()
	r := explain(agent1ID, "crm/salesforce", "read")
	require.True(t, r.GetAllowed())
	require.Equal(t, g.GetId(), r.GetGrant().GetId())
	require.Contains(t, r.GetReason(), g.GetId())

	r = explain(agent1ID, "crm/salesforce", "write")
	require.False(t, r.GetAllowed())
	require.Equal(t, "PermissionDenied", r.GetCode())
	require.Contains(t, r.GetReason(), "scopes: write not granted")
	require.Len(t, r.GetMatchingGrants(), 1)

	r = explain(agent2ID, "crm/salesforce", "read")
	require.Contains(t, r.GetReason(), "no grant allows")
	require.Empty(t, r.GetMatchingGrants())
	r = explain(agent1ID, "crm/nope", "read")
	require.Equal(t, "NotFound", r.GetCode())
	require.Equal(t, before, e.snapshot(), "explaining issues and records nothing")

	_, err := e.admin.RevokeAgent(ctx, &leaseholdv1.RevokeAgentRequest{SpiffeId: agent1ID, Reason: "r"})
	require.NoError(t, err)
	r = explain(agent1ID, "crm/salesforce", "read")
	require.False(t, r.GetAllowed())
	require.Contains(t, r.GetReason(), "is revoked")

	_, err = e.admin.ExplainAccess(ctx, &leaseholdv1.ExplainAccessRequest{AgentId: "x", Credential: "crm/salesforce", Scopes: []string{"read"}})
	requireCode(t, err, codes.InvalidArgument, "agent_id:")
	_, err = e.admin.ExplainAccess(ctx, &leaseholdv1.ExplainAccessRequest{AgentId: agent1ID, Credential: "crm/salesforce"})
	requireCode(t, err, codes.InvalidArgument, "scopes:")

	grants, err := e.admin.ListGrants(ctx, &leaseholdv1.ListGrantsRequest{SpiffeId: agent1ID})
	require.NoError(t, err)
	require.Len(t, grants.GetGrants(), 1)
	grants, err = e.admin.ListGrants(ctx, &leaseholdv1.ListGrantsRequest{SpiffeId: agent2ID})
	require.NoError(t, err)
	require.Empty(t, grants.GetGrants())
}

func TestWatchAuditRejectsBadFilters(t *testing.T) {
	e := newEnv(t)
	for _, tc := range []struct {
		req  *leaseholdv1.WatchAuditRequest
		want string
	}{
		{&leaseholdv1.WatchAuditRequest{AgentId: "agent-1"}, "agent_id:"},
		{&leaseholdv1.WatchAuditRequest{LeaseId: "nope"}, "lease_id:"},
		{&leaseholdv1.WatchAuditRequest{Credential: "Bad Name"}, "credential:"},
		{&leaseholdv1.WatchAuditRequest{Decision: 7}, "decision:"},
	} {
		stream, err := e.admin.WatchAudit(ctx, tc.req)
		require.NoError(t, err)
		_, err = stream.Recv()
		requireCode(t, err, codes.InvalidArgument, tc.want)
	}
	stream, err := leaseholdv1.NewAdminServiceClient(e.dial(agent1ID)).WatchAudit(ctx, &leaseholdv1.WatchAuditRequest{})
	require.NoError(t, err)
	_, err = stream.Recv()
	requireCode(t, err, codes.PermissionDenied, "is not an admin")
}

// Shutting down ends open watches cleanly, telling them where to resume,
// instead of waiting for them until the grace period runs out.
func TestStopEndsWatchStreams(t *testing.T) {
	e := newEnv(t)
	e.activity(1)
	stream, err := e.admin.WatchAudit(ctx, &leaseholdv1.WatchAuditRequest{})
	require.NoError(t, err)
	for range 4 {
		_, err := stream.Recv()
		require.NoError(t, err)
	}
	stopped := make(chan struct{})
	go func() {
		sctx, cancel := context.WithTimeout(ctx, time.Minute)
		defer cancel()
		e.srv.Stop(sctx)
		close(stopped)
	}()
	_, err = stream.Recv()
	requireCode(t, err, codes.FailedPrecondition, "resume after sequence 4")
	<-stopped
}

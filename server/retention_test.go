package server_test

import (
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	leaseholdv1 "github.com/leasehold/leasehold/proto/leasehold/v1"
	"github.com/leasehold/leasehold/server"
)

func TestRetentionKeepsTheChainVerifiable(t *testing.T) {
	e := newEnv(t, func(c *server.Config) {
		c.RetentionMaxRecords = 10
		c.RetentionInterval = 20 * time.Millisecond
	})
	e.activity(3) // 8 records
	cp, err := e.admin.GetAuditCheckpoint(ctx, &leaseholdv1.GetAuditCheckpointRequest{})
	require.NoError(t, err)
	e.activity(6) // 2 + 12 more

	var res *leaseholdv1.VerifyAuditResponse
	require.Eventually(t, func() bool {
		res, err = e.admin.VerifyAudit(ctx, &leaseholdv1.VerifyAuditRequest{})
		require.NoError(t, err)
		return res.GetFloor().GetSequence() > 0
	}, 5*time.Second, 20*time.Millisecond)
	require.True(t, res.GetOk(), res.GetProblem())

	// Retention keeps max_records (10) plus at most its slack (2), and then
	// stops: its own prune records do not set off further prunes.
	require.Eventually(t, func() bool {
		h := e.head()
		time.Sleep(100 * time.Millisecond)
		return h == e.head()
	}, 5*time.Second, time.Millisecond, "retention settles")
	head := e.head()
	time.Sleep(200 * time.Millisecond) // ten more rounds
	require.Equal(t, head, e.head(), "retention does not churn on its own records")
	recs := e.audit(&leaseholdv1.QueryAuditRequest{OldestFirst: true})
	require.GreaterOrEqual(t, len(recs), 10)
	require.LessOrEqual(t, len(recs), 12)
	res, err = e.admin.VerifyAudit(ctx, &leaseholdv1.VerifyAuditRequest{})
	require.NoError(t, err)
	require.Equal(t, res.GetFloor().GetSequence()+1, recs[0].GetSequence(), "the oldest kept record follows the floor")
	require.Equal(t, res.GetFloor().GetHash(), recs[0].GetPrevHash(), "and links to it")
	prune := e.audit(&leaseholdv1.QueryAuditRequest{})[0]
	for _, r := range e.audit(nil) {
		if r.GetEvent() == leaseholdv1.AuditEvent_AUDIT_EVENT_AUDIT_PRUNE {
			prune = r
			break
		}
	}
	require.Equal(t, leaseholdv1.AuditEvent_AUDIT_EVENT_AUDIT_PRUNE, prune.GetEvent(), "the prune is on the trail")
	require.Contains(t, prune.GetReason(), "removed by retention")

	// A checkpoint taken before pruning verifies while its record is kept,
	// and is set aside once pruned.
	res, err = e.admin.VerifyAudit(ctx, &leaseholdv1.VerifyAuditRequest{Checkpoints: []*leaseholdv1.AuditCheckpoint{cp.GetCheckpoint()}})
	require.NoError(t, err)
	require.True(t, res.GetOk(), res.GetProblem())
}

func TestRetentionNeverOutrunsASink(t *testing.T) {
	sink := &flakySink{}
	sink.fail.Store(true)
	e := newEnv(t, func(c *server.Config) {
		c.RetentionMaxRecords = 5
		c.RetentionInterval = 20 * time.Millisecond
	})
	e.stop()
	e.sinks = []server.AuditSink{sink}
	e.start()
	e.activity(5)
	time.Sleep(200 * time.Millisecond) // several retention rounds
	res, err := e.admin.VerifyAudit(ctx, &leaseholdv1.VerifyAuditRequest{})
	require.NoError(t, err)
	require.Zero(t, res.GetFloor().GetSequence(), "nothing the sink has not taken is removed")

	sink.fail.Store(false)
	require.Eventually(t, func() bool {
		res, err = e.admin.VerifyAudit(ctx, &leaseholdv1.VerifyAuditRequest{})
		require.NoError(t, err)
		return res.GetFloor().GetSequence() > 0
	}, 40*time.Second, 20*time.Millisecond)
	got := sink.got()
	require.Equal(t, uint64(1), got[0], "the sink received the oldest records before they went")
}

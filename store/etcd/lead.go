package etcd

import (
	"context"
	"fmt"
	"os"
	"strconv"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/client/v3/concurrency"
)

// electionPrefix is where brokers campaign for leadership of background
// work.
func (s *Store) electionPrefix() string { return s.prefix + "leader" }

// Lead implements store.Elector with an etcd election: the campaign's key
// is attached to a session lease of LeaderTTL that this process keeps
// alive. A broker that crashes or is cut off from etcd loses leadership when
// the lease expires, and the next campaigner in line takes over. A leader
// that loses its lease learns it from the session ending and stops; for a
// moment two brokers may both believe they lead, so background steps are
// idempotent (see docs/deployment.md).
func (s *Store) Lead(ctx context.Context) (context.Context, func(), error) {
	ttl := max(int(s.cfg.LeaderTTL.Seconds()), 1)
	sess, err := concurrency.NewSession(s.cli, concurrency.WithTTL(ttl), concurrency.WithContext(ctx))
	if err != nil {
		return nil, nil, fmt.Errorf("etcd: leader session: %w", err)
	}
	el := concurrency.NewElection(sess, s.electionPrefix())
	if err := el.Campaign(ctx, candidateName()); err != nil {
		_ = sess.Close()
		return nil, nil, fmt.Errorf("etcd: campaign: %w", err)
	}
	led, cancel := context.WithCancel(ctx)
	go func() {
		select {
		case <-sess.Done():
		case <-led.Done():
		}
		cancel()
	}()
	resign := func() {
		cancel()
		rctx, done := context.WithTimeout(context.Background(), s.cfg.RequestTimeout)
		defer done()
		_ = el.Resign(rctx)
		_ = sess.Close()
	}
	return led, resign, nil
}

// Leader returns the name of the broker leading background work ("" when
// none does).
func (s *Store) Leader(ctx context.Context) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, s.cfg.RequestTimeout)
	defer cancel()
	resp, err := s.cli.Get(ctx, s.electionPrefix()+"/", clientv3.WithFirstCreate()...)
	if err != nil {
		return "", fmt.Errorf("etcd: read leader: %w", err)
	}
	if len(resp.Kvs) == 0 {
		return "", nil
	}
	return string(resp.Kvs[0].Value), nil
}

// candidateName names this process in the election: host and process id.
func candidateName() string {
	h, _ := os.Hostname()
	return h + "/" + strconv.Itoa(os.Getpid())
}

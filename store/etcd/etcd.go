// Package etcd is Leasehold's distributed store engine, for several brokers
// serving one trust domain: the same records, indexes and audit chain as
// store/bolt (the layout of store/internal/kv), kept in an etcd cluster
// under a key prefix.
//
// Consistency. A transaction reads one etcd revision, a consistent
// snapshot, and buffers its writes. Update commits them in one etcd Txn
// guarded by a compare on the commit key (<prefix>commit): the Txn applies
// only if no other commit, from this broker or another, happened since the
// snapshot was taken; otherwise the closures run again on a fresh snapshot.
// Commits are therefore serializable across every broker, and a write that
// Update has returned from is durable on a quorum of etcd members. One key
// orders every commit because every broker write appends to the audit chain
// anyway, and the chain has one order: finer-grained read sets would
// conflict on its head just the same. As in the bbolt engine, a broker groups
// its concurrent Updates into one Txn (see commit.go).
//
// Limits. etcd refuses a Txn with more operations than its --max-txn-ops
// (default 128) or larger than --max-request-bytes (default 1.5 MiB).
// Config.MaxTxnOps and MaxRequestBytes must not exceed them: a group of
// Updates is cut to fit, and one Update that alone exceeds them (a
// RevokeAgent over thousands of leases) fails whole, changing nothing, with
// an error naming the setting. docs/deployment.md gives the values to run.
//
// Reads. Point reads are answered by a read cache when an etcd watch proves
// the cached value is the one at the transaction's snapshot (cache.go);
// everything else is read from etcd at the snapshot's revision. The same
// watch tells OnCommit's callbacks about every broker's commits.
//
// Leadership. Lead (store.Elector) campaigns in an etcd election; the
// server runs its background work only while it leads (lead.go).
//
// Values are the kv layout's JSON records; <prefix>meta/schema_version holds
// the schema version and a broker refuses a newer one. Every key the engine
// uses is under the prefix, so an etcd role limited to it suffices.
package etcd

import (
	"context"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/client/v3/concurrency"
	"go.uber.org/zap"

	"github.com/leasehold/leasehold/store"
	"github.com/leasehold/leasehold/store/internal/kv"
)

// Config configures the engine.
type Config struct {
	// Endpoints are the etcd members' client URLs.
	Endpoints []string
	// Prefix is put before every key; brokers sharing records use the
	// same one. Default "/leasehold/". It must end with "/".
	Prefix string
	// TLS, when set, is used to reach etcd (mTLS: include a client
	// certificate). Endpoints then use https.
	TLS *tls.Config
	// Username and Password, when set, authenticate to etcd.
	Username, Password string
	// DialTimeout bounds connecting at Open. Default 5s.
	DialTimeout time.Duration
	// RequestTimeout bounds each etcd request. Default 5s.
	RequestTimeout time.Duration
	// MaxTxnOps and MaxRequestBytes must not exceed the cluster's
	// --max-txn-ops and --max-request-bytes. Defaults 128 and 1.5 MiB,
	// etcd's own defaults.
	MaxTxnOps       int
	MaxRequestBytes int
	// LeaderTTL is how long a broker that stops (crash, partition) keeps
	// leadership of background work before another takes over. Default 5s.
	LeaderTTL time.Duration
	// CacheBytes bounds the read cache (see cache.go). Default 64 MiB;
	// negative turns it off.
	CacheBytes int
}

const (
	defaultMaxTxnOps       = 128
	defaultMaxRequestBytes = 3 << 19 // 1.5 MiB
)

// Validate reports a missing or unusable setting.
func (c Config) Validate() error {
	if len(c.Endpoints) == 0 {
		return errors.New("etcd: endpoints are required")
	}
	if c.Prefix != "" && !strings.HasSuffix(c.Prefix, "/") {
		return fmt.Errorf("etcd: prefix %q must end with \"/\"", c.Prefix)
	}
	if c.MaxTxnOps < 0 || c.MaxRequestBytes < 0 {
		return errors.New("etcd: max_txn_ops and max_request_bytes must not be negative")
	}
	if c.LeaderTTL != 0 && c.LeaderTTL < time.Second {
		return fmt.Errorf("etcd: leader_ttl %s is below etcd's one-second lease resolution", c.LeaderTTL)
	}
	return nil
}

// Store is the etcd engine. It is safe for concurrent use.
type Store struct {
	cfg    Config
	cli    *clientv3.Client
	prefix string
	closed atomic.Bool

	queue      chan *call
	quit       chan struct{}
	writerDone chan struct{}
	stats      commitCounters

	cache   *readCache // nil when off
	hooksMu sync.Mutex
	hooks   []func()
	// lockSession holds the write lock's lease; only the writer uses it.
	lockSession *concurrency.Session
	stopFollow  context.CancelFunc
}

var (
	_ store.Store          = (*Store)(nil)
	_ store.Elector        = (*Store)(nil)
	_ store.CommitNotifier = (*Store)(nil)
)

// commitKey is the key whose revision orders every commit.
func (s *Store) commitKey() string { return s.prefix + "commit" }

// Open connects to etcd, checks the schema version under the prefix and
// records it on first use.
func Open(ctx context.Context, cfg Config) (*Store, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if cfg.Prefix == "" {
		cfg.Prefix = "/leasehold/"
	}
	if cfg.DialTimeout == 0 {
		cfg.DialTimeout = 5 * time.Second
	}
	if cfg.RequestTimeout == 0 {
		cfg.RequestTimeout = 5 * time.Second
	}
	if cfg.MaxTxnOps == 0 {
		cfg.MaxTxnOps = defaultMaxTxnOps
	}
	if cfg.MaxRequestBytes == 0 {
		cfg.MaxRequestBytes = defaultMaxRequestBytes
	}
	if cfg.LeaderTTL == 0 {
		cfg.LeaderTTL = 5 * time.Second
	}
	cli, err := clientv3.New(clientv3.Config{
		Endpoints:          cfg.Endpoints,
		TLS:                cfg.TLS,
		Username:           cfg.Username,
		Password:           cfg.Password,
		DialTimeout:        cfg.DialTimeout,
		DialKeepAliveTime:  10 * time.Second,
		MaxCallSendMsgSize: cfg.MaxRequestBytes + 64<<10,
		// Snapshot ranges can be large; the server bounds them.
		MaxCallRecvMsgSize: 64 << 20,
		Logger:             zap.NewNop(),
		Context:            context.WithoutCancel(ctx),
	})
	if err != nil {
		return nil, fmt.Errorf("etcd: connect to %s: %w", strings.Join(cfg.Endpoints, ","), err)
	}
	s := &Store{cfg: cfg, cli: cli, prefix: cfg.Prefix, queue: make(chan *call), quit: make(chan struct{}), writerDone: make(chan struct{})}
	if err := s.initialise(ctx); err != nil {
		_ = cli.Close()
		return nil, err
	}
	if cfg.CacheBytes >= 0 {
		if cfg.CacheBytes == 0 {
			cfg.CacheBytes = 64 << 20
		}
		s.cache = newReadCache(cfg.CacheBytes)
	}
	fctx, stop := context.WithCancel(context.WithoutCancel(ctx))
	s.stopFollow = stop
	go s.follow(fctx)
	go s.writer() // #nosec G118 -- the writer outlives Open's ctx; Close stops it
	return s, nil
}

// initialise checks the schema version and creates the commit key and the
// version record when the prefix is empty.
func (s *Store) initialise(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, s.cfg.DialTimeout)
	defer cancel()
	schemaKey := s.prefix + string(kv.BMeta) + "/" + string(kv.KeySchema)
	resp, err := s.cli.Get(ctx, schemaKey)
	if err != nil {
		return fmt.Errorf("etcd: read schema version at %s: %w", strings.Join(s.cfg.Endpoints, ","), err)
	}
	if len(resp.Kvs) > 0 {
		v := resp.Kvs[0].Value
		if len(v) != 8 {
			return fmt.Errorf("etcd: %s is corrupt", schemaKey)
		}
		if got := binary.BigEndian.Uint64(v); got > store.SchemaVersion {
			return fmt.Errorf("%w: etcd prefix %s has %d, this build reads up to %d", store.ErrSchema, s.prefix, got, store.SchemaVersion)
		}
		return nil
	}
	ver := string(binary.BigEndian.AppendUint64(nil, store.SchemaVersion))
	_, err = s.cli.Txn(ctx).
		If(clientv3.Compare(clientv3.CreateRevision(schemaKey), "=", 0)).
		Then(clientv3.OpPut(schemaKey, ver), clientv3.OpPut(s.commitKey(), "")).
		Commit()
	if err != nil {
		return fmt.Errorf("etcd: record schema version: %w", err)
	}
	return nil
}

// snapshot returns the current revision and the commit key's revision at
// it, with a linearizable read: the snapshot includes every commit that
// finished before the call.
func (s *Store) snapshot(ctx context.Context) (rev, commitRev int64, err error) {
	ctx, cancel := context.WithTimeout(ctx, s.cfg.RequestTimeout)
	defer cancel()
	resp, err := s.cli.Get(ctx, s.commitKey())
	if err != nil {
		return 0, 0, fmt.Errorf("etcd: read commit key: %w", err)
	}
	if len(resp.Kvs) > 0 {
		commitRev = resp.Kvs[0].ModRevision
	}
	return resp.Header.Revision, commitRev, nil
}

// View implements store.Store: fn reads one consistent revision.
func (s *Store) View(ctx context.Context, fn func(store.ReadTx) error) error {
	if s.closed.Load() {
		return store.ErrClosed
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	rev, commitRev, err := s.snapshot(ctx)
	if err != nil {
		return err
	}
	return fn(kv.NewTx(newTxn(ctx, s, rev, commitRev, false)))
}

// Ready implements store.Store: a quorum answers a linearizable read.
func (s *Store) Ready(ctx context.Context) error {
	if s.closed.Load() {
		return store.ErrClosed
	}
	_, _, err := s.snapshot(ctx)
	return err
}

// Close implements store.Store. Leadership held through Lead is given up.
func (s *Store) Close() error {
	if s.closed.Swap(true) {
		return nil
	}
	close(s.quit)
	<-s.writerDone
	if s.stopFollow != nil {
		s.stopFollow()
	}
	return s.cli.Close()
}

// OnCommit implements store.CommitNotifier: fn runs after each commit any
// broker makes under the prefix, as the watch reports it.
func (s *Store) OnCommit(fn func()) {
	s.hooksMu.Lock()
	defer s.hooksMu.Unlock()
	s.hooks = append(s.hooks, fn)
}

func (s *Store) committed() {
	s.hooksMu.Lock()
	hooks := s.hooks
	s.hooksMu.Unlock()
	for _, fn := range hooks {
		fn()
	}
}

// Client is the engine's etcd client, for tools and tests that inspect the
// cluster.
func (s *Store) Client() *clientv3.Client { return s.cli }

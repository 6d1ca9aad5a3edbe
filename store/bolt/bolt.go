// Package bolt is Leasehold's embedded store engine, on go.etcd.io/bbolt:
// one file, one writer (with group commit, see commit.go), the record layout
// of store/internal/kv with one bbolt bucket per kv bucket.
package bolt

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync/atomic"
	"time"

	bbolt "go.etcd.io/bbolt"

	"github.com/leasehold/leasehold/store"
	"github.com/leasehold/leasehold/store/internal/kv"
)

// Config configures the engine.
type Config struct {
	// Path of the database file; its directory is created (0700) if missing.
	Path string
	// OpenTimeout bounds the wait for the file lock held by another process.
	OpenTimeout time.Duration
	// NoSync skips fsync on commit. Only for tests that measure nothing durable.
	NoSync bool
}

// Validate reports a missing or unusable setting.
func (c Config) Validate() error {
	if c.Path == "" {
		return errors.New("bolt: path is required")
	}
	return nil
}

// Store is the bbolt engine. It is safe for concurrent use.
type Store struct {
	db     *bbolt.DB
	closed atomic.Bool

	queue      chan *call
	quit       chan struct{}
	writerDone chan struct{}
	waiting    atomic.Int64 // Update calls not yet taken by the writer
	stats      commitCounters
}

var _ store.Store = (*Store)(nil)

// Open opens or creates the database at cfg.Path, creating its buckets and
// recording the schema version.
func Open(cfg Config) (*Store, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if cfg.OpenTimeout == 0 {
		cfg.OpenTimeout = 5 * time.Second
	}
	if err := os.MkdirAll(filepath.Dir(cfg.Path), 0o700); err != nil {
		return nil, fmt.Errorf("bolt: create directory: %w", err)
	}
	db, err := bbolt.Open(cfg.Path, 0o600, &bbolt.Options{Timeout: cfg.OpenTimeout, NoSync: cfg.NoSync})
	if err != nil {
		return nil, fmt.Errorf("bolt: open %s: %w", cfg.Path, err)
	}
	err = db.Update(func(tx *bbolt.Tx) error {
		for _, name := range kv.Buckets {
			if _, err := tx.CreateBucketIfNotExists(name); err != nil {
				return err
			}
		}
		meta := tx.Bucket(kv.BMeta)
		if v := meta.Get(kv.KeySchema); v != nil {
			if got := binary.BigEndian.Uint64(v); got > store.SchemaVersion {
				return fmt.Errorf("%w: file has %d, this build reads up to %d", store.ErrSchema, got, store.SchemaVersion)
			}
		}
		return meta.Put(kv.KeySchema, u64(store.SchemaVersion))
	})
	if err != nil {
		_ = db.Close()
		return nil, fmt.Errorf("bolt: initialise %s: %w", cfg.Path, err)
	}
	s := &Store{db: db, queue: make(chan *call), quit: make(chan struct{}), writerDone: make(chan struct{})}
	go s.writer()
	return s, nil
}

// View implements store.Store.
func (s *Store) View(ctx context.Context, fn func(store.ReadTx) error) error {
	if s.closed.Load() {
		return store.ErrClosed
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	return s.db.View(func(tx *bbolt.Tx) error { return fn(kv.NewTx(boltTxn{tx})) })
}

// Ready implements store.Store.
func (s *Store) Ready(ctx context.Context) error {
	if s.closed.Load() {
		return store.ErrClosed
	}
	return s.db.View(func(tx *bbolt.Tx) error {
		if tx.Bucket(kv.BMeta) == nil {
			return errors.New("bolt: meta bucket missing")
		}
		return nil
	})
}

// Close implements store.Store.
func (s *Store) Close() error {
	if s.closed.Swap(true) {
		return nil
	}
	// Calls the writer already holds finish; callers still waiting to hand
	// theirs over get ErrClosed.
	close(s.quit)
	<-s.writerDone
	return s.db.Close()
}

// Check runs bbolt's consistency check over the whole file and returns the
// first problem found.
func (s *Store) Check() error {
	return s.db.View(func(tx *bbolt.Tx) error {
		for err := range tx.Check() {
			return err
		}
		return nil
	})
}

// ---- the bbolt side of kv.Txn ----

type boltTxn struct{ tx *bbolt.Tx }

func (t boltTxn) Bucket(name []byte) kv.Bucket { return boltBucket{t.tx.Bucket(name)} }

type boltBucket struct{ *bbolt.Bucket }

func (b boltBucket) Cursor() kv.Cursor       { return boltCursor{b.Bucket.Cursor()} }
func (b boltBucket) KeyN() int               { return b.Stats().KeyN }
func (b boltBucket) AppendOnly(fill float64) { b.FillPercent = fill }

type boltCursor struct{ *bbolt.Cursor }

func (c boltCursor) SeekBefore(key []byte) ([]byte, []byte) {
	if k, _ := c.Seek(key); k == nil {
		return c.Last()
	}
	return c.Prev()
}

func u64(v uint64) []byte {
	b := make([]byte, 8)
	binary.BigEndian.PutUint64(b, v)
	return b
}

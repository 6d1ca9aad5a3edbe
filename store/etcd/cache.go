package etcd

import (
	"context"
	"sync"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
)

// readCache answers point reads at a snapshot revision without a round
// trip, exactly as etcd would have.
//
// It holds values read earlier and follows every change under the prefix
// through an etcd watch. Every write of records also writes the commit key,
// so the records at a snapshot are those at the commit key's revision R
// then. A value may answer a read at that snapshot only when the watch has
// applied every change up to R and the key has not changed after R (its
// last change, which the cache remembers for every key the watch reports,
// is at or before R): then the value is the one etcd holds at R. Anything else (the watch behind, a change after R, a key never read)
// is a miss and goes to etcd. So a broker answering from its cache sees a
// RevokeAgent committed by another broker exactly when a read from etcd
// would: in every transaction whose snapshot is taken after it.
//
// The cache is bounded by bytes; when full it starts over. When the watch
// fails (compaction, a lost connection) the cache empties and the watch
// restarts at the current revision.
type readCache struct {
	mu sync.Mutex
	// applied: the watch has applied every change up to this revision.
	applied int64
	// floor: changed is complete for revisions above it.
	floor   int64
	entries map[string]cached
	changed map[string]int64
	bytes   int
	max     int
	caught  chan struct{} // closed and replaced each time applied grows

	hits, misses uint64
}

// cacheWait is how long a transaction waits, once, for the watch to apply
// its snapshot before reading from etcd instead.
const cacheWait = 5 * time.Millisecond

type cached struct {
	val  []byte // nil: the key is absent
	asOf int64
}

func newReadCache(maxBytes int) *readCache {
	return &readCache{entries: map[string]cached{}, changed: map[string]int64{}, max: maxBytes, caught: make(chan struct{})}
}

// reset empties the cache; the watch restarts at rev.
func (c *readCache) reset(rev int64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.entries, c.changed, c.bytes = map[string]cached{}, map[string]int64{}, 0
	c.applied, c.floor = rev, rev
	close(c.caught)
	c.caught = make(chan struct{})
}

// usable reports whether a read at rev may be answered; the caller holds mu.
func (c *readCache) usable(key string, rev int64) bool {
	return c.applied >= rev && rev >= c.floor && c.changed[key] <= rev
}

// get returns the value of key at rev, and whether the cache knows it.
func (c *readCache) get(key string, rev int64) ([]byte, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	e, ok := c.entries[key]
	if !ok || !c.usable(key, rev) {
		c.misses++
		return nil, false
	}
	c.hits++
	return e.val, true
}

// put remembers a value etcd returned for key at rev (nil: absent).
func (c *readCache) put(key string, val []byte, rev int64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	// A change after rev that the watch has applied makes val stale; one
	// not applied yet will replace it when it comes (it is newer than rev).
	if rev < c.floor || c.changed[key] > rev {
		return
	}
	if e, ok := c.entries[key]; ok && e.asOf >= rev {
		return
	}
	c.store(key, cached{val: val, asOf: rev})
}

func (c *readCache) store(key string, e cached) {
	if old, ok := c.entries[key]; ok {
		c.bytes -= len(key) + len(old.val)
	}
	c.bytes += len(key) + len(e.val)
	c.entries[key] = e
	if c.bytes > c.max {
		c.entries, c.bytes = map[string]cached{}, 0
	}
}

// apply records the watch's changes, then that everything up to rev is in.
func (c *readCache) apply(events []*clientv3.Event, rev int64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, ev := range events {
		key, mod := string(ev.Kv.Key), ev.Kv.ModRevision
		c.changed[key] = mod
		if e, ok := c.entries[key]; ok && mod > e.asOf {
			var val []byte
			if ev.Type == clientv3.EventTypePut {
				val = ev.Kv.Value
				if val == nil {
					val = []byte{}
				}
			}
			c.store(key, cached{val: val, asOf: mod})
		}
	}
	if len(c.changed) > 4*len(c.entries)+100_000 {
		// Forget old changes: reads below this revision miss from now on.
		c.changed, c.floor = map[string]int64{}, rev
	}
	if rev > c.applied {
		c.applied = rev
		close(c.caught)
		c.caught = make(chan struct{})
	}
}

// through is how far a watch response proves the watch has come: events
// arrive in revision order with a revision never split across responses,
// so through the last event's revision; a progress notification, through
// its header's. (A response's header revision alone can run ahead of events
// still to come when etcd splits a long catch-up into several responses.)
func through(wr clientv3.WatchResponse) int64 {
	if n := len(wr.Events); n > 0 {
		return wr.Events[n-1].Kv.ModRevision
	}
	if wr.IsProgressNotify() {
		return wr.Header.Revision
	}
	return 0
}

// waitFor waits up to d for the watch to apply rev, so that a transaction
// whose snapshot is the newest revision can use the cache.
func (c *readCache) waitFor(rev int64, d time.Duration) {
	deadline := time.NewTimer(d)
	defer deadline.Stop()
	for {
		c.mu.Lock()
		applied, caught := c.applied, c.caught
		c.mu.Unlock()
		if applied >= rev {
			return
		}
		select {
		case <-caught:
		case <-deadline.C:
			return
		}
	}
}

// follow keeps the cache current and tells OnCommit's callbacks about
// every commit, this broker's or another's, until ctx ends.
func (s *Store) follow(ctx context.Context) {
	for ctx.Err() == nil {
		rctx, cancel := context.WithTimeout(ctx, s.cfg.RequestTimeout)
		resp, err := s.cli.Get(rctx, s.commitKey())
		cancel()
		if err != nil {
			select {
			case <-ctx.Done():
			case <-time.After(time.Second):
			}
			continue
		}
		start := resp.Header.Revision
		if s.cache != nil {
			s.cache.reset(start)
		}
		// Commits between the last event seen and start are not replayed:
		// wake the listeners once so they look.
		s.committed()
		wctx, wcancel := context.WithCancel(clientv3.WithRequireLeader(ctx))
		for wr := range s.cli.Watch(wctx, s.prefix, clientv3.WithPrefix(), clientv3.WithRev(start+1), clientv3.WithProgressNotify()) {
			if wr.Err() != nil {
				break
			}
			if s.cache != nil {
				s.cache.apply(wr.Events, through(wr))
			}
			for _, ev := range wr.Events {
				if string(ev.Kv.Key) == s.commitKey() {
					s.committed()
					break
				}
			}
		}
		wcancel()
	}
}

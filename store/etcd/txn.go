package etcd

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"slices"
	"sort"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/leasehold/leasehold/store/internal/kv"
)

// A transaction reads one etcd revision (a consistent snapshot) and keeps
// its writes in memory until commit, where they are applied in one etcd Txn
// guarded by a compare on the commit key: see Store.Update.

// pageSize is how many keys a cursor fetches per range request.
const pageSize = 256

// bucketSequences is the pseudo-bucket holding each bucket's sequence,
// keyed by bucket name; it is not one of kv.Buckets.
var bucketSequences = []byte("sequences")

var errReadOnly = errors.New("etcd: write in a read-only transaction")

type txn struct {
	s   *Store
	ctx context.Context
	// rev is the snapshot's revision; commitRev the commit key's revision
	// at it: no record changed between the two.
	rev, commitRev int64
	writable       bool
	buckets        map[string]*bucket
	waited         bool // for the read cache to catch up, once
}

func newTxn(ctx context.Context, s *Store, rev, commitRev int64, writable bool) *txn {
	return &txn{s: s, ctx: ctx, rev: rev, commitRev: commitRev, writable: writable, buckets: map[string]*bucket{}}
}

// cached looks key up in the store's read cache (see readCache).
func (t *txn) cached(key string) ([]byte, bool) {
	c := t.s.cache
	if c == nil {
		return nil, false
	}
	if !t.waited {
		t.waited = true
		c.waitFor(t.commitRev, cacheWait)
	}
	return c.get(key, t.commitRev)
}

// remember offers a value read from etcd to the read cache.
func (t *txn) remember(key string, val []byte) {
	if t.s.cache != nil {
		t.s.cache.put(key, val, t.commitRev)
	}
}

func (t *txn) Bucket(name []byte) kv.Bucket { return t.bucket(name) }

func (t *txn) bucket(name []byte) *bucket {
	b := t.buckets[string(name)]
	if b == nil {
		b = &bucket{t: t, name: string(name), prefix: t.s.prefix + string(name) + "/",
			writes: map[string]write{}, reads: map[string][]byte{}}
		t.buckets[string(name)] = b
	}
	return b
}

// ops lists the transaction's writes as etcd operations, in a stable order.
func (t *txn) ops() []clientv3.Op {
	var ops []clientv3.Op
	names := make([]string, 0, len(t.buckets))
	for n := range t.buckets {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		b := t.buckets[n]
		for _, k := range b.sortedWrites() {
			w := b.writes[k]
			if w.del {
				ops = append(ops, clientv3.OpDelete(b.prefix+k))
			} else {
				ops = append(ops, clientv3.OpPut(b.prefix+k, string(w.val)))
			}
		}
	}
	return ops
}

// writeCount is the number of keys the transaction writes or deletes.
func (t *txn) writeCount() int {
	n := 0
	for _, b := range t.buckets {
		n += len(b.writes)
	}
	return n
}

// size estimates the Txn request's bytes.
func (t *txn) size() int {
	n := 0
	for _, b := range t.buckets {
		for k, w := range b.writes {
			n += len(b.prefix) + len(k) + len(w.val) + 16
		}
	}
	return n
}

// get reads keys at the snapshot revision; a failure aborts the record
// method in progress (kv.Fail). The read is serializable: the member
// answers from its own state without a consensus round, which is exact for
// a fixed revision the member has applied. The snapshot revision came from
// a linearizable read, normally on the same member; one that has not caught
// up yet answers "future revision", and the read is then made linearizable.
func (t *txn) get(key string, opts ...clientv3.OpOption) *clientv3.GetResponse {
	ctx, cancel := context.WithTimeout(t.ctx, t.s.cfg.RequestTimeout)
	defer cancel()
	t.s.stats.reads.Add(1)
	opts = append(opts, clientv3.WithRev(t.rev))
	resp, err := t.s.cli.Get(ctx, key, append(opts, clientv3.WithSerializable())...)
	if errors.Is(err, rpctypes.ErrFutureRev) {
		resp, err = t.s.cli.Get(ctx, key, opts...)
	}
	if err != nil {
		kv.Fail(fmt.Errorf("etcd: read at revision %d: %w", t.rev, err))
	}
	return resp
}

type write struct {
	val []byte
	del bool
}

type bucket struct {
	t      *txn
	name   string
	prefix string
	writes map[string]write
	sorted []string // keys of writes, sorted; nil when stale
	reads  map[string][]byte
}

func (b *bucket) sortedWrites() []string {
	if b.sorted == nil {
		b.sorted = make([]string, 0, len(b.writes))
		for k := range b.writes {
			b.sorted = append(b.sorted, k)
		}
		sort.Strings(b.sorted)
	}
	return b.sorted
}

// stored returns the key's value at the snapshot, ignoring this
// transaction's writes (nil when absent).
func (b *bucket) stored(k string) []byte {
	if v, ok := b.reads[k]; ok {
		return v
	}
	if v, ok := b.t.cached(b.prefix + k); ok {
		b.reads[k] = v
		return v
	}
	var v []byte
	if resp := b.t.get(b.prefix + k); len(resp.Kvs) > 0 {
		v = resp.Kvs[0].Value
		if v == nil {
			v = []byte{}
		}
	}
	b.reads[k] = v
	b.t.remember(b.prefix+k, v)
	return v
}

func (b *bucket) Get(key []byte) []byte {
	if w, ok := b.writes[string(key)]; ok {
		if w.del {
			return nil
		}
		return w.val
	}
	return b.stored(string(key))
}

func (b *bucket) set(key string, w write) error {
	if !b.t.writable {
		return errReadOnly
	}
	if _, ok := b.writes[key]; !ok {
		b.sorted = nil
	}
	b.writes[key] = w
	return nil
}

func (b *bucket) Put(key, value []byte) error {
	if len(key) == 0 {
		return errors.New("etcd: empty key")
	}
	v := bytes.Clone(value)
	if v == nil {
		v = []byte{}
	}
	return b.set(string(key), write{val: v})
}

func (b *bucket) Delete(key []byte) error { return b.set(string(key), write{del: true}) }

func (b *bucket) NextSequence() (uint64, error) {
	n := b.Sequence() + 1
	return n, b.t.bucket(bucketSequences).Put([]byte(b.name), binary.BigEndian.AppendUint64(nil, n))
}

func (b *bucket) Sequence() uint64 {
	v := b.t.bucket(bucketSequences).Get([]byte(b.name))
	if len(v) != 8 {
		return 0
	}
	return binary.BigEndian.Uint64(v)
}

// KeyN counts the keys at the snapshot and adjusts for this transaction's
// writes.
func (b *bucket) KeyN() int {
	n := int(b.t.get(b.prefix, clientv3.WithPrefix(), clientv3.WithCountOnly()).Count)
	for k, w := range b.writes {
		existed := b.stored(k) != nil
		switch {
		case w.del && existed:
			n--
		case !w.del && !existed:
			n++
		}
	}
	return n
}

func (b *bucket) AppendOnly(float64) {}

func (b *bucket) Cursor() kv.Cursor { return &cursor{b: b} }

// ---- cursors ----

type entry struct{ k, v []byte }

// cursor merges the snapshot's keys, fetched a page at a time, with the
// transaction's writes.
type cursor struct {
	b   *bucket
	key []byte // current key; nil when off either end

	// asc holds every snapshot key in [ascFrom, last of asc], and all the
	// keys after ascFrom when !ascMore.
	asc     []entry
	ascFrom []byte
	ascMore bool
	ascOK   bool
	// desc holds every snapshot key in [descLo, descHi), newest first;
	// descLo nil means from the bucket's start.
	desc           []entry
	descLo, descHi []byte
	descOK         bool
}

func (c *cursor) First() ([]byte, []byte)              { return c.move(c.after(nil, true)) }
func (c *cursor) Seek(k []byte) ([]byte, []byte)       { return c.move(c.after(k, true)) }
func (c *cursor) Next() ([]byte, []byte)               { return c.step(true) }
func (c *cursor) Prev() ([]byte, []byte)               { return c.step(false) }
func (c *cursor) SeekBefore(k []byte) ([]byte, []byte) { return c.move(c.before(k)) }

func (c *cursor) step(fwd bool) ([]byte, []byte) {
	if c.key == nil {
		return nil, nil
	}
	if fwd {
		return c.move(c.after(c.key, false))
	}
	return c.move(c.before(c.key))
}

func (c *cursor) move(k []byte) ([]byte, []byte) {
	c.key = k
	if k == nil {
		return nil, nil
	}
	return k, c.b.Get(k)
}

// after returns the first visible key at or after k (inclusive) or strictly
// after it.
func (c *cursor) after(k []byte, inclusive bool) []byte {
	for from, incl := k, inclusive; ; {
		s := c.snapshotAfter(from, incl)
		w := c.writeAfter(from, incl)
		switch {
		case s == nil && w == nil:
			return nil
		case w != nil && (s == nil || bytes.Compare(w, s) <= 0):
			return w
		}
		if ww, ok := c.b.writes[string(s)]; ok && ww.del {
			from, incl = s, false // deleted in this transaction
			continue
		}
		return s
	}
}

// before returns the last visible key strictly before k (nil k: the end).
func (c *cursor) before(k []byte) []byte {
	for hi := k; ; {
		s := c.snapshotBefore(hi)
		w := c.writeBefore(hi)
		switch {
		case s == nil && w == nil:
			return nil
		case w != nil && (s == nil || bytes.Compare(w, s) >= 0):
			return w
		}
		if ww, ok := c.b.writes[string(s)]; ok && ww.del {
			hi = s
			continue
		}
		return s
	}
}

// writeAfter is the first key this transaction put (not deleted) after k.
func (c *cursor) writeAfter(k []byte, inclusive bool) []byte {
	keys := c.b.sortedWrites()
	i := sort.SearchStrings(keys, string(k))
	for ; i < len(keys); i++ {
		if !inclusive && keys[i] == string(k) {
			continue
		}
		if !c.b.writes[keys[i]].del {
			return []byte(keys[i])
		}
	}
	return nil
}

func (c *cursor) writeBefore(k []byte) []byte {
	keys := c.b.sortedWrites()
	i := len(keys)
	if k != nil {
		i = sort.SearchStrings(keys, string(k))
	}
	for i--; i >= 0; i-- {
		if !c.b.writes[keys[i]].del {
			return []byte(keys[i])
		}
	}
	return nil
}

func (c *cursor) snapshotAfter(k []byte, inclusive bool) []byte {
	if c.ascOK && bytes.Compare(c.ascFrom, k) <= 0 {
		i := sort.Search(len(c.asc), func(i int) bool {
			d := bytes.Compare(c.asc[i].k, k)
			return d > 0 || (inclusive && d == 0)
		})
		if i < len(c.asc) {
			return c.keep(c.asc[i])
		}
		if !c.ascMore {
			return nil
		}
	}
	start := c.b.prefix + string(k)
	if !inclusive {
		start += "\x00"
	}
	resp := c.b.t.get(start, clientv3.WithRange(clientv3.GetPrefixRangeEnd(c.b.prefix)), clientv3.WithLimit(pageSize))
	c.asc, c.ascFrom, c.ascMore, c.ascOK = c.entries(resp), []byte(start[len(c.b.prefix):]), resp.More, true
	if len(c.asc) == 0 {
		return nil
	}
	return c.keep(c.asc[0])
}

// snapshotBefore finds the last snapshot key below hi (nil: the bucket's
// end). etcd sorts a descending range by reading all of it, so the range
// is walked backwards in windows: the key's last eight bytes, read as a
// number, minus a width that grows sixteen-fold while windows come back
// empty. Leasehold's backward walks are over keys ending in a big-endian
// sequence, where the first window holds the keys wanted.
func (c *cursor) snapshotBefore(hi []byte) []byte {
	if c.descOK && (c.descHi == nil || (hi != nil && bytes.Compare(hi, c.descHi) <= 0)) &&
		(hi == nil || c.descLo == nil || bytes.Compare(c.descLo, hi) < 0) {
		for _, e := range c.desc {
			if hi == nil || bytes.Compare(e.k, hi) < 0 {
				return c.keep(e)
			}
		}
		if c.descLo == nil {
			return nil
		}
		hi = c.descLo
	}
	end := clientv3.GetPrefixRangeEnd(c.b.prefix)
	if hi != nil {
		end = c.b.prefix + string(hi)
	}
	width := uint64(pageSize)
	for {
		lo := windowStart(hi, width)
		start := c.b.prefix + string(lo)
		resp := c.b.t.get(start, clientv3.WithRange(end), clientv3.WithSort(clientv3.SortByKey, clientv3.SortDescend))
		c.desc, c.descLo, c.descHi, c.descOK = c.entries(resp), lo, hi, true
		if len(c.desc) > 0 {
			return c.keep(c.desc[0])
		}
		if lo == nil {
			return nil
		}
		hi, end = lo, start
		width = min(width*16, 1<<60)
	}
}

// windowStart is a key below k whose last eight bytes are smaller by width
// (nil: the bucket's start, when that would underflow or k is nil).
func windowStart(k []byte, width uint64) []byte {
	if len(k) < 8 {
		return nil
	}
	n := binary.BigEndian.Uint64(k[len(k)-8:])
	if n < width {
		return nil
	}
	return binary.BigEndian.AppendUint64(slices.Clone(k[:len(k)-8]), n-width)
}

func (c *cursor) entries(resp *clientv3.GetResponse) []entry {
	out := make([]entry, len(resp.Kvs))
	for i, e := range resp.Kvs {
		out[i] = entry{k: e.Key[len(c.b.prefix):], v: e.Value}
	}
	return out
}

// keep remembers a fetched value so the Get that follows a move needs no
// round trip, and returns its key.
func (c *cursor) keep(e entry) []byte {
	if _, ok := c.b.reads[string(e.k)]; !ok {
		v := e.v
		if v == nil {
			v = []byte{}
		}
		c.b.reads[string(e.k)] = v
		c.b.t.remember(c.b.prefix+string(e.k), v)
	}
	return e.k
}

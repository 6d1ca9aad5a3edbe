// Package etcdtest runs real etcd members (go.etcd.io/etcd/server/v3/embed)
// in the test process, on loopback, for tests of the etcd store engine and
// of several brokers sharing one cluster.
package etcdtest

import (
	"fmt"
	"net"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"

	"go.etcd.io/etcd/server/v3/embed"
	"go.uber.org/zap"
)

// Options tune the cluster.
type Options struct {
	// Members is the cluster size (default 1).
	Members int
	// MaxTxnOps and MaxRequestBytes raise etcd's limits (0: etcd's defaults).
	MaxTxnOps       uint
	MaxRequestBytes uint
	// NoFsync trades durability for speed in tests that measure nothing durable.
	NoFsync bool
}

// Cluster is a running etcd cluster.
type Cluster struct {
	t       testing.TB
	mu      sync.Mutex
	members []*embed.Etcd
	clients []string
}

// Start starts the cluster and stops it when the test ends.
func Start(t testing.TB, o Options) *Cluster {
	t.Helper()
	if o.Members == 0 {
		o.Members = 1
	}
	peers := make([]string, o.Members)
	clientURLs := make([]string, o.Members)
	var initial []string
	for i := range o.Members {
		peers[i] = "http://" + freeAddr(t)
		clientURLs[i] = "http://" + freeAddr(t)
		initial = append(initial, fmt.Sprintf("m%d=%s", i, peers[i]))
	}
	token := fmt.Sprintf("leasehold-test-%d", time.Now().UnixNano())
	c := &Cluster{t: t, clients: clientURLs, members: make([]*embed.Etcd, o.Members)}
	t.Cleanup(c.stopAll)
	var wg sync.WaitGroup
	errs := make([]error, o.Members)
	for i := range o.Members {
		cfg := embed.NewConfig()
		cfg.Name = fmt.Sprintf("m%d", i)
		cfg.Dir = t.TempDir()
		cfg.ListenPeerUrls = []url.URL{mustURL(peers[i])}
		cfg.AdvertisePeerUrls = cfg.ListenPeerUrls
		cfg.ListenClientUrls = []url.URL{mustURL(clientURLs[i])}
		cfg.AdvertiseClientUrls = cfg.ListenClientUrls
		cfg.InitialCluster = strings.Join(initial, ",")
		cfg.InitialClusterToken = token
		cfg.ZapLoggerBuilder = embed.NewZapLoggerBuilder(zap.NewNop())
		cfg.UnsafeNoFsync = o.NoFsync
		if o.MaxTxnOps > 0 {
			cfg.MaxTxnOps = o.MaxTxnOps
		}
		if o.MaxRequestBytes > 0 {
			cfg.MaxRequestBytes = o.MaxRequestBytes
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			e, err := embed.StartEtcd(cfg)
			if err != nil {
				errs[i] = err
				return
			}
			c.mu.Lock()
			c.members[i] = e
			c.mu.Unlock()
			select {
			case <-e.Server.ReadyNotify():
			case <-time.After(60 * time.Second):
				errs[i] = fmt.Errorf("etcd member %d not ready after 60s", i)
			}
		}()
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Fatalf("etcdtest: start member %d: %v", i, err)
		}
	}
	return c
}

// Endpoints are the members' client URLs.
func (c *Cluster) Endpoints() []string { return append([]string(nil), c.clients...) }

// Kill stops member i at once (its peers see it vanish).
func (c *Cluster) Kill(i int) {
	c.mu.Lock()
	e := c.members[i]
	c.members[i] = nil
	c.mu.Unlock()
	if e != nil {
		e.Server.HardStop()
		e.Close()
	}
}

func (c *Cluster) stopAll() {
	for i := range c.members {
		c.Kill(i)
	}
}

func freeAddr(t testing.TB) string {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("etcdtest: %v", err)
	}
	defer l.Close()
	return l.Addr().String()
}

func mustURL(s string) url.URL {
	u, err := url.Parse(s)
	if err != nil {
		panic(err)
	}
	return *u
}

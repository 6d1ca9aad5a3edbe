// Package etcdtest runs a real etcd cluster for tests: members are the
// pinned etcd binary (tools/etcd, installed as bin/etcd by `make tools`),
// started on loopback in their own processes so that a test can kill one
// as a crash would (SIGKILL).
package etcdtest

import (
	"bytes"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
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
	// MutualTLS serves clients over https and requires a client
	// certificate signed by the cluster's test CA (see Cluster.TLS).
	MutualTLS bool
}

// TLSFiles are the PEM files of a MutualTLS cluster: the CA that signed the
// members' and the client's certificates, and the client's pair.
type TLSFiles struct {
	CAFile, CertFile, KeyFile string
}

// Cluster is a running etcd cluster.
type Cluster struct {
	t       testing.TB
	mu      sync.Mutex
	procs   []*exec.Cmd
	done    []chan struct{}
	clients []string
	logs    []*lockedBuffer
	tls     TLSFiles
	dirs    []string
}

// DataDir is member i's data directory (its WAL and bbolt file), for tests
// that scan what etcd stored.
func (c *Cluster) DataDir(i int) string { return c.dirs[i] }

// TLS returns the client-side files of a MutualTLS cluster.
func (c *Cluster) TLS() TLSFiles { return c.tls }

// Binary returns the etcd binary: $LEASEHOLD_ETCD, or bin/etcd at the
// repository's root. Without it the test is skipped, or fails under CI=true.
func Binary(t testing.TB) string {
	t.Helper()
	if p := os.Getenv("LEASEHOLD_ETCD"); p != "" {
		return p
	}
	dir, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			if p := filepath.Join(dir, "bin", "etcd"); fileExists(p) {
				return p
			}
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			break
		}
		dir = parent
	}
	if os.Getenv("CI") == "true" {
		t.Fatal("etcd binary not found: run 'make tools' or set LEASEHOLD_ETCD (CI must not skip this test)")
	}
	t.Skip("etcd binary not found; run 'make tools' or set LEASEHOLD_ETCD")
	return ""
}

func fileExists(p string) bool {
	st, err := os.Stat(p)
	return err == nil && !st.IsDir()
}

// Start starts the cluster and stops it when the test ends.
func Start(t testing.TB, o Options) *Cluster {
	t.Helper()
	bin := Binary(t)
	if o.Members == 0 {
		o.Members = 1
	}
	peers := make([]string, o.Members)
	c := &Cluster{t: t, clients: make([]string, o.Members), procs: make([]*exec.Cmd, o.Members),
		done: make([]chan struct{}, o.Members), logs: make([]*lockedBuffer, o.Members)}
	scheme := "http://"
	var serverTLS []string
	if o.MutualTLS {
		scheme = "https://"
		dir := t.TempDir()
		serverTLS = writeTestPKI(t, dir)
		c.tls = TLSFiles{CAFile: filepath.Join(dir, "ca.pem"), CertFile: filepath.Join(dir, "client.pem"), KeyFile: filepath.Join(dir, "client-key.pem")}
	}
	var initial []string
	for i := range o.Members {
		peers[i] = "http://" + freeAddr(t)
		c.clients[i] = scheme + freeAddr(t)
		initial = append(initial, fmt.Sprintf("m%d=%s", i, peers[i]))
	}
	dataDirs := make([]string, o.Members)
	for i := range dataDirs {
		dataDirs[i] = t.TempDir()
	}
	// Registered after the temporary directories, so it runs before their
	// removal: the members are dead before their files go.
	c.dirs = dataDirs
	t.Cleanup(c.stopAll)
	token := fmt.Sprintf("leasehold-test-%d", time.Now().UnixNano())
	for i := range o.Members {
		args := []string{"--name", fmt.Sprintf("m%d", i), "--data-dir", dataDirs[i],
			"--listen-peer-urls", peers[i], "--initial-advertise-peer-urls", peers[i],
			"--listen-client-urls", c.clients[i], "--advertise-client-urls", c.clients[i],
			"--initial-cluster", strings.Join(initial, ","), "--initial-cluster-token", token,
			"--initial-cluster-state", "new", "--log-level", "error"}
		if o.MaxTxnOps > 0 {
			args = append(args, "--max-txn-ops", fmt.Sprint(o.MaxTxnOps))
		}
		if o.MaxRequestBytes > 0 {
			args = append(args, "--max-request-bytes", fmt.Sprint(o.MaxRequestBytes))
		}
		if o.NoFsync {
			args = append(args, "--unsafe-no-fsync")
		}
		args = append(args, serverTLS...)
		cmd := exec.Command(bin, args...)
		c.logs[i] = &lockedBuffer{}
		cmd.Stdout, cmd.Stderr = c.logs[i], c.logs[i]
		if err := cmd.Start(); err != nil {
			t.Fatalf("etcdtest: start member %d: %v", i, err)
		}
		c.procs[i], c.done[i] = cmd, make(chan struct{})
		go func() { _ = cmd.Wait(); close(c.done[i]) }()
	}
	deadline := time.Now().Add(30 * time.Second)
	for i := range o.Members {
		for !c.healthy(i) {
			select {
			case <-c.done[i]:
				t.Fatalf("etcdtest: member %d exited:\n%s", i, c.logs[i].String())
			default:
			}
			if time.Now().After(deadline) {
				t.Fatalf("etcdtest: member %d not healthy after 30s:\n%s", i, c.logs[i].String())
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	return c
}

func (c *Cluster) healthy(i int) bool {
	cl := http.Client{Timeout: time.Second}
	if c.tls.CAFile != "" {
		tc, err := clientTLS(c.tls)
		if err != nil {
			c.t.Fatal(err)
		}
		cl.Transport = &http.Transport{TLSClientConfig: tc}
	}
	resp, err := cl.Get(c.clients[i] + "/health")
	if err != nil {
		return false
	}
	defer resp.Body.Close()
	var body bytes.Buffer
	_, _ = body.ReadFrom(resp.Body)
	return resp.StatusCode == http.StatusOK && strings.Contains(body.String(), `"health":"true"`)
}

// Endpoints are the members' client URLs.
func (c *Cluster) Endpoints() []string { return append([]string(nil), c.clients...) }

// Kill kills member i with SIGKILL, as a crash would.
func (c *Cluster) Kill(i int) {
	c.mu.Lock()
	cmd := c.procs[i]
	c.procs[i] = nil
	c.mu.Unlock()
	if cmd != nil {
		_ = cmd.Process.Signal(syscall.SIGKILL)
		<-c.done[i]
	}
}

// Logs returns what member i wrote.
func (c *Cluster) Logs(i int) string { return c.logs[i].String() }

func (c *Cluster) stopAll() {
	for i := range c.procs {
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

type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

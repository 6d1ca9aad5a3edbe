package main

import (
	"bufio"
	"errors"
	"fmt"
	"net"
	"net/url"
	"os"
	"os/exec"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"go.etcd.io/etcd/server/v3/embed"
	"go.uber.org/zap"
)

// The etcd the acquire benchmark starts when --store etcd names no
// endpoints: one member in a child process (its CPU apart from the
// brokers'), data in --dir, fsync on, with the Txn limits the brokers are
// configured for (docs/deployment.md).
const (
	etcdChildEnv        = "LEASEHOLD_BENCH_ETCD_DIR"
	etcdMaxTxnOps       = 16384
	etcdMaxRequestBytes = 16 << 20
)

type etcdChild struct {
	cmd  *exec.Cmd
	addr string
}

// startEtcdChild starts a fresh member: what an earlier run left in dir is
// removed.
func startEtcdChild(dir string) (*etcdChild, error) {
	if err := os.RemoveAll(dir); err != nil {
		return nil, err
	}
	self, err := os.Executable()
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(self, "etcd")
	cmd.Env = append(os.Environ(), etcdChildEnv+"="+dir)
	cmd.Stderr = os.Stderr
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	lines := bufio.NewScanner(stdout)
	if !lines.Scan() {
		_ = cmd.Wait()
		return nil, errors.New("etcd exited before it was ready")
	}
	addr, ok := strings.CutPrefix(lines.Text(), "ready ")
	if !ok {
		_ = cmd.Process.Kill()
		return nil, fmt.Errorf("unexpected line from etcd: %q", lines.Text())
	}
	return &etcdChild{cmd: cmd, addr: addr}, nil
}

func (e *etcdChild) stop() {
	_ = e.cmd.Process.Signal(syscall.SIGTERM)
	_ = e.cmd.Wait()
}

// runEtcd is the etcd child process, until SIGTERM.
func runEtcd(dir string) error {
	free := func() (url.URL, error) {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return url.URL{}, err
		}
		defer l.Close()
		return url.URL{Scheme: "http", Host: l.Addr().String()}, nil
	}
	peer, err := free()
	if err != nil {
		return err
	}
	cli, err := free()
	if err != nil {
		return err
	}
	cfg := embed.NewConfig()
	cfg.Name = "bench"
	cfg.Dir = dir
	cfg.ListenPeerUrls, cfg.AdvertisePeerUrls = []url.URL{peer}, []url.URL{peer}
	cfg.ListenClientUrls, cfg.AdvertiseClientUrls = []url.URL{cli}, []url.URL{cli}
	cfg.InitialCluster = "bench=" + peer.String()
	cfg.MaxTxnOps, cfg.MaxRequestBytes = etcdMaxTxnOps, etcdMaxRequestBytes
	cfg.ZapLoggerBuilder = embed.NewZapLoggerBuilder(zap.NewNop())
	e, err := embed.StartEtcd(cfg)
	if err != nil {
		return err
	}
	defer e.Close()
	select {
	case <-e.Server.ReadyNotify():
	case <-time.After(60 * time.Second):
		return errors.New("etcd not ready after 60s")
	}
	fmt.Printf("ready %s\n", cli.String())
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, os.Interrupt)
	select {
	case <-sig:
	case err := <-e.Err():
		return err
	}
	return nil
}

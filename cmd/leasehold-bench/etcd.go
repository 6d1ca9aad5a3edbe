package main

import (
	"bytes"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"time"
)

// The etcd the acquire benchmark starts when --store etcd names no
// endpoints: one member of the pinned etcd binary (bin/etcd from `make
// tools`, or $LEASEHOLD_ETCD) in its own process, data in --dir, fsync on,
// with the Txn limits the brokers are configured for (docs/deployment.md).
const (
	etcdMaxTxnOps       = 32768
	etcdMaxRequestBytes = 8 << 20
)

type etcdChild struct {
	cmd  *exec.Cmd
	addr string
	logs bytes.Buffer
}

// startEtcdChild starts a fresh member: what an earlier run left in dir is
// removed.
func startEtcdChild(dir string) (*etcdChild, error) {
	bin := os.Getenv("LEASEHOLD_ETCD")
	if bin == "" {
		p, err := exec.LookPath("etcd")
		if err != nil {
			return nil, errors.New("no etcd binary: run 'make tools' (bin/etcd) or set LEASEHOLD_ETCD")
		}
		bin = p
	}
	if err := os.RemoveAll(dir); err != nil {
		return nil, err
	}
	free := func() (string, error) {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return "", err
		}
		defer l.Close()
		return "http://" + l.Addr().String(), nil
	}
	peer, err := free()
	if err != nil {
		return nil, err
	}
	client, err := free()
	if err != nil {
		return nil, err
	}
	e := &etcdChild{addr: client}
	e.cmd = exec.Command(bin, "--name", "bench", "--data-dir", dir,
		"--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer, "--initial-cluster", "bench="+peer,
		"--listen-client-urls", client, "--advertise-client-urls", client, "--log-level", "error",
		"--max-txn-ops", fmt.Sprint(etcdMaxTxnOps), "--max-request-bytes", fmt.Sprint(etcdMaxRequestBytes))
	e.cmd.Stdout, e.cmd.Stderr = &e.logs, &e.logs
	if err := e.cmd.Start(); err != nil {
		return nil, err
	}
	cl := http.Client{Timeout: time.Second}
	for deadline := time.Now().Add(30 * time.Second); ; {
		if resp, err := cl.Get(client + "/health"); err == nil {
			var body bytes.Buffer
			_, _ = body.ReadFrom(resp.Body)
			resp.Body.Close()
			if strings.Contains(body.String(), `"health":"true"`) {
				return e, nil
			}
		}
		if time.Now().After(deadline) {
			e.stop()
			return nil, fmt.Errorf("etcd not healthy after 30s:\n%s", e.logs.String())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func (e *etcdChild) stop() {
	_ = e.cmd.Process.Signal(syscall.SIGTERM)
	_ = e.cmd.Wait()
}

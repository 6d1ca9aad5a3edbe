package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"io"
	"math/big"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/stretchr/testify/require"

	"github.com/leasehold/leasehold/client"
	"github.com/leasehold/leasehold/identity"
	"github.com/leasehold/leasehold/identity/spiretest"
	"github.com/leasehold/leasehold/store/seal"
)

// TestSPIREEndToEnd runs the broker, an admin and agents on SVIDs from a
// real SPIRE server and agent, told apart by the unix workload attestor from
// the path of the program each runs: copies of the leasehold binary, and
// this test binary as one more agent. SVIDs live 20 seconds, so both the
// broker and the in-process agent rotate during the test, with no restarts.
func TestSPIREEndToEnd(t *testing.T) {
	sp := spiretest.Start(t)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()

	bins := filepath.Join(sp.Dir, "bin")
	require.NoError(t, os.MkdirAll(bins, 0o755))
	bin := func(name string) string {
		p := filepath.Join(bins, name)
		if _, err := os.Stat(p); err != nil {
			copyFile(t, leaseholdBin, p)
		}
		return p
	}
	self, err := os.Executable()
	require.NoError(t, err)
	const ttl = 20 * time.Second
	td := "spiffe://" + spiretest.TrustDomain
	brokerID, adminID := td+"/leasehold/broker", td+"/admin"
	agent1ID, agent2ID := td+"/agents/agent-1", td+"/agents/agent-2"
	sp.CreateEntry(t, spiretest.Entry{SPIFFEID: brokerID, Selectors: []string{"unix:path:" + bin("broker")},
		DNSNames: []string{"localhost"}, X509SVIDTTL: ttl})
	sp.CreateEntry(t, spiretest.Entry{SPIFFEID: adminID, Selectors: []string{"unix:path:" + bin("admin")}})
	agent1Entry := sp.CreateEntry(t, spiretest.Entry{SPIFFEID: agent1ID, Selectors: []string{"unix:path:" + bin("agent-1")}, X509SVIDTTL: ttl})
	sp.CreateEntry(t, spiretest.Entry{SPIFFEID: agent2ID, Selectors: []string{"unix:path:" + self}, X509SVIDTTL: ttl})
	bin("stranger") // no entry

	dir := t.TempDir()
	kek := filepath.Join(dir, "kek")
	require.NoError(t, seal.EnsureFile(kek))
	conf := fmt.Sprintf(`listen: 127.0.0.1:0
trust_domain: %s
admins: [%s]
identity:
  workload_api_socket: %s
store:
  path: %s
kek_file: %s
log:
  format: json
`, spiretest.TrustDomain, adminID, sp.WorkloadAddr(), filepath.Join(dir, "leasehold.db"), kek)
	require.NoError(t, os.WriteFile(filepath.Join(dir, "leasehold.yaml"), []byte(conf), 0o600))
	_, _, stderr := startBinary(t, bin("broker"), dir, nil, "serve", "--config", "leasehold.yaml")
	addr := servingAddr(t, stderr, time.Minute) // the broker waits for its SVID first

	env := []string{"SPIFFE_ENDPOINT_SOCKET=" + sp.WorkloadAddr()}
	cli := func(as string, args ...string) (string, error) {
		cmd := exec.Command(bin(as), append([]string{"--addr", addr, "--server-id", brokerID, "--timeout", "20s"}, args...)...)
		cmd.Env = append(os.Environ(), env...)
		out, err := cmd.CombinedOutput()
		return string(out), err
	}
	out, err := cli("admin", "credential", "put", "crm/api", "--set", "api_key=spire-canary-7f3a")
	require.NoError(t, err, out)
	out, err = cli("admin", "grant", "create", "--credential", "crm/api", "--spiffe-id-prefix", td+"/agents", "--scopes", "read")
	require.NoError(t, err, out)

	// An agent process on its SPIRE SVID acquires and releases.
	out, err = cli("agent-1", "whoami")
	require.NoError(t, err, out)
	require.Contains(t, out, agent1ID)
	out, err = cli("agent-1", "acquire", "crm/api", "--scopes", "read", "--task", "spire-1", "--format", "json")
	require.NoError(t, err, out)
	require.Contains(t, out, "spire-canary-7f3a")
	var acquired struct {
		Lease struct {
			ID string `json:"id"`
		} `json:"lease"`
	}
	require.NoError(t, json.Unmarshal([]byte(out[strings.Index(out, "{"):]), &acquired), out)
	out, err = cli("agent-1", "release", acquired.Lease.ID)
	require.NoError(t, err, out)

	// A process with no registration entry gets no SVID and cannot call.
	out, err = cli("stranger", "--timeout", "3s", "whoami")
	require.Error(t, err)
	require.Contains(t, out, "no SVID arrived")

	// The in-process agent (this test binary) on the Workload API.
	wctx, wcancel := context.WithTimeout(ctx, time.Minute)
	src, err := identity.NewWorkloadSource(wctx, sp.WorkloadAddr())
	wcancel()
	require.NoError(t, err)
	defer src.Close()
	dial := func() *client.Client {
		c, err := client.New(ctx, client.Config{Address: addr, Source: src, ServerID: spiffeid.RequireFromString(brokerID)})
		require.NoError(t, err)
		t.Cleanup(func() { c.Close() })
		return c
	}
	long := dial()
	use := func(c *client.Client, task string) {
		t.Helper()
		l, err := c.Acquire(ctx, "crm/api", client.AcquireOptions{Scopes: []string{"read"}, TaskID: task})
		require.NoError(t, err)
		require.NoError(t, l.Release(ctx))
	}
	use(long, "before-rotation")
	mySerial := func() *big.Int {
		s, err := src.GetX509SVID()
		require.NoError(t, err)
		return s.Certificates[0].SerialNumber
	}
	bundle, err := src.GetX509BundleForTrustDomain(spiffeid.RequireTrustDomainFromString(spiretest.TrustDomain))
	require.NoError(t, err)
	brokerSerial := func() *big.Int { return handshakeSerial(t, addr, bundle.X509Authorities()) }
	mine0, broker0 := mySerial(), brokerSerial()

	// Rotation: SPIRE renews both SVIDs at about half their TTL. The broker
	// presents its new certificate on new handshakes, the agent's source
	// holds the new one, and both the old connection and a new one work.
	require.Eventually(t, func() bool {
		return mySerial().Cmp(mine0) != 0 && brokerSerial().Cmp(broker0) != 0
	}, 2*time.Minute, 500*time.Millisecond, "SVIDs did not rotate\n%s", sp.Logs())
	use(long, "after-rotation-same-connection")
	use(dial(), "after-rotation-new-connection")
	out, err = cli("agent-1", "whoami")
	require.NoError(t, err, out)

	// CA rotation: the prepared authority reaches the broker and the agents
	// as a bundle update from the Workload API; once it signs, SVIDs from the
	// new CA are accepted on both sides without a restart.
	td0 := spiffeid.RequireTrustDomainFromString(spiretest.TrustDomain)
	authorities := func() []*x509.Certificate {
		b, err := src.GetX509BundleForTrustDomain(td0)
		require.NoError(t, err)
		return b.X509Authorities()
	}
	oldRoots := authorities()
	require.Len(t, oldRoots, 1)
	authority := sp.PrepareCA(t)
	require.Eventually(t, func() bool { return len(authorities()) == 2 }, time.Minute, 200*time.Millisecond,
		"the prepared CA did not arrive in the Workload API bundle\n%s", sp.Logs())
	sp.ActivateCA(t, authority)
	var newRoots []*x509.Certificate
	for _, r := range authorities() {
		if !r.Equal(oldRoots[0]) {
			newRoots = append(newRoots, r)
		}
	}
	signedByNew := func(leaf *x509.Certificate) bool {
		pool := x509.NewCertPool()
		pool.AddCert(newRoots[0])
		_, err := leaf.Verify(x509.VerifyOptions{Roots: pool, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}})
		return err == nil
	}
	require.Eventually(t, func() bool {
		s, err := src.GetX509SVID()
		return err == nil && signedByNew(s.Certificates[0]) && brokerSignedBy(t, addr, newRoots)
	}, 2*time.Minute, 500*time.Millisecond, "SVIDs from the new CA did not arrive\n%s", sp.Logs())
	use(dial(), "after-ca-rotation")
	use(long, "after-ca-rotation-same-connection")
	out, err = cli("agent-1", "whoami")
	require.NoError(t, err, out)

	// Deleting an agent's entry: the SPIRE agent stops serving it an SVID,
	// so its new processes cannot connect.
	sp.DeleteEntry(t, agent1Entry)
	require.Eventually(t, func() bool {
		out, err := cli("agent-1", "--timeout", "3s", "whoami")
		return err != nil && strings.Contains(out, "no SVID arrived")
	}, time.Minute, 500*time.Millisecond, "agent-1 kept getting an SVID after its entry was deleted")

	out, err = cli("admin", "audit", "query", "--credential", "crm/api", "--format", "json")
	require.NoError(t, err, out)
	for _, task := range []string{"spire-1", "before-rotation", "after-rotation-same-connection", "after-rotation-new-connection"} {
		require.Contains(t, out, task)
	}
	require.Contains(t, out, agent2ID)
	require.NotContains(t, stderr.String(), "spire-canary-7f3a")
}

// brokerSignedBy reports whether the broker's current certificate chains to
// roots.
func brokerSignedBy(t *testing.T, addr string, roots []*x509.Certificate) bool {
	t.Helper()
	pool := x509.NewCertPool()
	for _, r := range roots {
		pool.AddCert(r)
	}
	ok := false
	conn, err := tls.Dial("tcp", addr, &tls.Config{
		InsecureSkipVerify: true, // checked below
		NextProtos:         []string{"h2"},
		VerifyPeerCertificate: func(raw [][]byte, _ [][]*x509.Certificate) error {
			leaf, err := x509.ParseCertificate(raw[0])
			if err != nil {
				return err
			}
			inter := x509.NewCertPool()
			for _, r := range raw[1:] {
				if c, err := x509.ParseCertificate(r); err == nil {
					inter.AddCert(c)
				}
			}
			_, err = leaf.Verify(x509.VerifyOptions{Roots: pool, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}})
			ok = err == nil
			return nil
		},
	})
	if err == nil {
		_ = conn.Close()
	}
	return ok
}

// handshakeSerial opens a TLS connection to the broker and returns the
// serial of the certificate it presents, verified against roots. No client
// certificate is sent, so the broker ends the connection afterwards.
func handshakeSerial(t *testing.T, addr string, roots []*x509.Certificate) *big.Int {
	t.Helper()
	pool := x509.NewCertPool()
	for _, r := range roots {
		pool.AddCert(r)
	}
	var serial *big.Int
	conf := &tls.Config{
		InsecureSkipVerify: true, // verified below against the SPIRE bundle
		NextProtos:         []string{"h2"},
		VerifyPeerCertificate: func(raw [][]byte, _ [][]*x509.Certificate) error {
			leaf, err := x509.ParseCertificate(raw[0])
			if err != nil {
				return err
			}
			if _, err := leaf.Verify(x509.VerifyOptions{Roots: pool, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err != nil {
				return err
			}
			serial = leaf.SerialNumber
			return nil
		},
	}
	conn, err := tls.Dial("tcp", addr, conf)
	if err == nil {
		_ = conn.Close()
	}
	require.NotNil(t, serial, "no certificate from the broker: %v", err)
	return serial
}

func copyFile(t *testing.T, from, to string) {
	t.Helper()
	in, err := os.Open(from)
	require.NoError(t, err)
	defer in.Close()
	out, err := os.OpenFile(to, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o755)
	require.NoError(t, err)
	_, err = io.Copy(out, in)
	require.NoError(t, err)
	require.NoError(t, out.Close())
}

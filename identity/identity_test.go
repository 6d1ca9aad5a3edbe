package identity_test

import (
	"bytes"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/stretchr/testify/require"

	"github.com/leasehold/leasehold/identity"
)

var td = spiffeid.RequireTrustDomainFromString("leasehold.test")

// svidFiles is a dev CA and one SVID for id written to files in a temp
// dir, with a FileSource watching them.
type svidFiles struct {
	ca        *identity.DevCA
	id        spiffeid.ID
	cert, key string
	first     *x509svid.SVID
	src       *identity.FileSource
	log       syncBuffer
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.String()
}

func newSVIDFiles(t *testing.T, id string) *svidFiles {
	t.Helper()
	dir := t.TempDir()
	ca, err := identity.LoadOrCreateDevCA(dir, td)
	require.NoError(t, err)
	f := &svidFiles{ca: ca, id: spiffeid.RequireFromString(id), cert: filepath.Join(dir, "svid.pem"), key: filepath.Join(dir, "svid-key.pem")}
	bundle := filepath.Join(dir, "bundle.pem")
	require.NoError(t, identity.WriteBundle(ca.Bundle(), bundle))
	f.first = f.rotate(t)
	f.src, err = identity.NewFileSource(identity.FileConfig{CertFile: f.cert, KeyFile: f.key, BundleFile: bundle, ReloadInterval: 10 * time.Millisecond,
		Logger: slog.New(slog.NewTextHandler(&f.log, nil))})
	require.NoError(t, err)
	t.Cleanup(func() { f.src.Close() })
	return f
}

// rotate writes a fresh SVID over the files and returns it.
func (f *svidFiles) rotate(t *testing.T) *x509svid.SVID {
	t.Helper()
	svid, err := f.ca.Issue(f.id, identity.SVIDOptions{})
	require.NoError(t, err)
	require.NoError(t, identity.WriteSVID(svid, f.cert, f.key))
	return svid
}

func TestFileSourceReloadsRotatedFiles(t *testing.T) {
	f := newSVIDFiles(t, "spiffe://leasehold.test/agents/a")
	src, cert, first := f.src, f.cert, f.first
	st, err := os.Stat(f.key)
	require.NoError(t, err)
	require.Equal(t, os.FileMode(0o600), st.Mode().Perm(), "private keys are written 0600")
	got, err := src.GetX509SVID()
	require.NoError(t, err)
	require.Equal(t, first.Certificates[0].SerialNumber, got.Certificates[0].SerialNumber)
	b, err := src.GetX509BundleForTrustDomain(td)
	require.NoError(t, err)
	require.Len(t, b.X509Authorities(), 1)
	_, err = src.GetX509BundleForTrustDomain(spiffeid.RequireTrustDomainFromString("other.org"))
	require.Error(t, err)

	// A broken write is logged and ignored; the previous SVID stays.
	require.NoError(t, os.WriteFile(cert, []byte("garbage"), 0o644))
	require.Eventually(t, func() bool { return strings.Contains(f.log.String(), "keeping the previous SVID") },
		5*time.Second, 10*time.Millisecond, "a broken file is reported")
	got, err = src.GetX509SVID()
	require.NoError(t, err)
	require.Equal(t, first.Certificates[0].SerialNumber, got.Certificates[0].SerialNumber)

	second := f.rotate(t)
	require.Eventually(t, func() bool {
		got, err := src.GetX509SVID()
		return err == nil && got.Certificates[0].SerialNumber.Cmp(second.Certificates[0].SerialNumber) == 0
	}, 5*time.Second, 10*time.Millisecond, "rotated files are picked up without a restart")
}

func TestDevCAIsReusedAcrossStarts(t *testing.T) {
	dir := t.TempDir()
	a, err := identity.LoadOrCreateDevCA(dir, td)
	require.NoError(t, err)
	b, err := identity.LoadOrCreateDevCA(dir, td)
	require.NoError(t, err)
	require.True(t, a.Bundle().Equal(b.Bundle()), "a restarted dev broker keeps its CA")
	c, err := identity.LoadOrCreateDevCA(dir, spiffeid.RequireTrustDomainFromString("other.test"))
	require.NoError(t, err)
	require.False(t, a.Bundle().X509Authorities()[0].Equal(c.Bundle().X509Authorities()[0]))
	st, err := os.Stat(filepath.Join(dir, "ca-key.pem"))
	require.NoError(t, err)
	require.Equal(t, os.FileMode(0o600), st.Mode().Perm())

	_, err = a.Issue(spiffeid.RequireFromString("spiffe://other.test/x"), identity.SVIDOptions{})
	require.Error(t, err, "a CA signs only its own trust domain")
}

func TestAdminSet(t *testing.T) {
	s, err := identity.NewAdminSet(td, []string{"spiffe://leasehold.test/admin"})
	require.NoError(t, err)
	require.True(t, s.IsAdmin(spiffeid.RequireFromString("spiffe://leasehold.test/admin")))
	require.False(t, s.IsAdmin(spiffeid.RequireFromString("spiffe://leasehold.test/admin/sub")))
	_, err = identity.NewAdminSet(td, []string{"spiffe://other.test/admin"})
	require.ErrorContains(t, err, "not in trust domain")
	_, err = identity.NewAdminSet(td, []string{"admin"})
	require.Error(t, err)
}

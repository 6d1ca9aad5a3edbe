package identity

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

// DevCA is a self-signed SPIFFE certificate authority for development and
// tests. It signs X.509 SVIDs directly (no intermediate). Never use it in
// production: its key sits in a file next to the certificates it signs.
type DevCA struct {
	td   spiffeid.TrustDomain
	cert *x509.Certificate
	key  crypto.Signer
}

// NewDevCA creates a CA for td in memory, valid for a year.
func NewDevCA(td spiffeid.TrustDomain) (*DevCA, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber:          randomSerial(),
		Subject:               pkix.Name{Organization: []string{"Leasehold dev CA"}, CommonName: td.Name()},
		URIs:                  []*url.URL{td.ID().URL()},
		NotBefore:             now.Add(-time.Minute),
		NotAfter:              now.Add(365 * 24 * time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		return nil, err
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, err
	}
	return &DevCA{td: td, cert: cert, key: key}, nil
}

// LoadOrCreateDevCA reuses ca.pem and ca-key.pem in dir when they hold a CA
// for td valid for at least another day, and otherwise (re)creates them (key
// mode 0600).
func LoadOrCreateDevCA(dir string, td spiffeid.TrustDomain) (*DevCA, error) {
	certPath, keyPath := filepath.Join(dir, "ca.pem"), filepath.Join(dir, "ca-key.pem")
	if ca, err := loadCAFiles(certPath, keyPath, td); err == nil {
		return ca, nil
	}
	ca, err := NewDevCA(td)
	if err != nil {
		return nil, err
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	if err := writePEMFile(certPath, 0o644, pemBlock("CERTIFICATE", ca.cert.Raw)); err != nil {
		return nil, err
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(ca.key)
	if err != nil {
		return nil, err
	}
	if err := writePEMFile(keyPath, 0o600, pemBlock("PRIVATE KEY", keyDER)); err != nil {
		return nil, err
	}
	return ca, nil
}

func loadCAFiles(certPath, keyPath string, td spiffeid.TrustDomain) (*DevCA, error) {
	certPEM, err := os.ReadFile(certPath)
	if err != nil {
		return nil, err
	}
	keyPEM, err := os.ReadFile(keyPath)
	if err != nil {
		return nil, err
	}
	cb, _ := pem.Decode(certPEM)
	kb, _ := pem.Decode(keyPEM)
	if cb == nil || kb == nil {
		return nil, errors.New("dev CA files are not PEM")
	}
	cert, err := x509.ParseCertificate(cb.Bytes)
	if err != nil {
		return nil, err
	}
	key, err := x509.ParsePKCS8PrivateKey(kb.Bytes)
	if err != nil {
		return nil, err
	}
	signer, ok := key.(crypto.Signer)
	if !ok || !cert.IsCA || len(cert.URIs) != 1 || cert.URIs[0].String() != td.IDString() ||
		time.Now().Add(24*time.Hour).After(cert.NotAfter) {
		return nil, errors.New("dev CA files do not hold a usable CA for this trust domain")
	}
	return &DevCA{td: td, cert: cert, key: signer}, nil
}

// TrustDomain is the CA's trust domain.
func (ca *DevCA) TrustDomain() spiffeid.TrustDomain { return ca.td }

// Bundle is the trust bundle holding the CA certificate.
func (ca *DevCA) Bundle() *x509bundle.Bundle {
	return x509bundle.FromX509Authorities(ca.td, []*x509.Certificate{ca.cert})
}

// SVIDOptions shape an issued SVID.
type SVIDOptions struct {
	// TTL defaults to one hour.
	TTL time.Duration
	// NotBefore defaults to one minute ago (clock skew).
	NotBefore time.Time
	// DNSNames and IPAddresses are added as SANs so standard TLS clients
	// (grpcurl) can verify a server by host name.
	DNSNames    []string
	IPAddresses []net.IP
}

// Issue signs a new X.509 SVID for id with a fresh P-256 key.
func (ca *DevCA) Issue(id spiffeid.ID, opts SVIDOptions) (*x509svid.SVID, error) {
	if id.TrustDomain() != ca.td {
		return nil, fmt.Errorf("dev CA for %q cannot sign %q", ca.td, id)
	}
	if opts.TTL <= 0 {
		opts.TTL = time.Hour
	}
	if opts.NotBefore.IsZero() {
		opts.NotBefore = time.Now().Add(-time.Minute)
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber:          randomSerial(),
		Subject:               pkix.Name{Organization: []string{"Leasehold dev"}},
		URIs:                  []*url.URL{id.URL()},
		DNSNames:              opts.DNSNames,
		IPAddresses:           opts.IPAddresses,
		NotBefore:             opts.NotBefore,
		NotAfter:              opts.NotBefore.Add(opts.TTL),
		KeyUsage:              x509.KeyUsageDigitalSignature,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		BasicConstraintsValid: true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, key.Public(), ca.key)
	if err != nil {
		return nil, err
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, err
	}
	return &x509svid.SVID{ID: id, Certificates: []*x509.Certificate{cert}, PrivateKey: key}, nil
}

// WriteSVID writes an SVID's chain and key as PEM (key mode 0600), each file
// replaced atomically so a FileSource never reads half a file.
func WriteSVID(svid *x509svid.SVID, certPath, keyPath string) error {
	certPEM, keyPEM, err := svid.Marshal()
	if err != nil {
		return err
	}
	if err := writePEMFile(keyPath, 0o600, keyPEM); err != nil {
		return err
	}
	return writePEMFile(certPath, 0o644, certPEM)
}

// WriteBundle writes a bundle's CA certificates as PEM.
func WriteBundle(b *x509bundle.Bundle, path string) error {
	data, err := b.Marshal()
	if err != nil {
		return err
	}
	return writePEMFile(path, 0o644, data)
}

func pemBlock(kind string, der []byte) []byte {
	return pem.EncodeToMemory(&pem.Block{Type: kind, Bytes: der})
}

func writePEMFile(path string, mode os.FileMode, data []byte) error {
	tmp, err := os.CreateTemp(filepath.Dir(path), ".tmp-"+filepath.Base(path))
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name())
	if _, err := tmp.Write(data); err != nil {
		return errors.Join(err, tmp.Close())
	}
	if err := tmp.Chmod(mode); err != nil {
		return errors.Join(err, tmp.Close())
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	return os.Rename(tmp.Name(), path)
}

func randomSerial() *big.Int {
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		panic(err) // crypto/rand does not fail on supported platforms
	}
	return n.Add(n, big.NewInt(1))
}

// StaticSource is a Source holding one SVID and one bundle in memory, for
// tests and programs that manage certificates themselves.
type StaticSource struct {
	SVID   *x509svid.SVID
	Bundle *x509bundle.Bundle
}

// GetX509SVID implements x509svid.Source.
func (s StaticSource) GetX509SVID() (*x509svid.SVID, error) { return s.SVID, nil }

// GetX509BundleForTrustDomain implements x509bundle.Source.
func (s StaticSource) GetX509BundleForTrustDomain(td spiffeid.TrustDomain) (*x509bundle.Bundle, error) {
	return s.Bundle.GetX509BundleForTrustDomain(td)
}

// Close implements io.Closer.
func (StaticSource) Close() error { return nil }

package identity

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"sync"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

// FileConfig names the PEM files of a FileSource.
type FileConfig struct {
	// CertFile holds the SVID certificate chain, leaf first.
	CertFile string
	// KeyFile holds the SVID's PKCS#8 private key.
	KeyFile string
	// BundleFile holds the trust domain's CA certificates.
	BundleFile string
	// ReloadInterval is how often the files are checked for changes
	// (default 5s). The files are reloaded when any modification time or
	// size changes; a bad new file is logged and the previous SVID kept.
	ReloadInterval time.Duration
	Logger         *slog.Logger
}

// Validate reports a missing file name.
func (c FileConfig) Validate() error {
	var errs []error
	if c.CertFile == "" {
		errs = append(errs, errors.New("cert_file is required"))
	}
	if c.KeyFile == "" {
		errs = append(errs, errors.New("key_file is required"))
	}
	if c.BundleFile == "" {
		errs = append(errs, errors.New("bundle_file is required"))
	}
	return errors.Join(errs...)
}

// FileSource is a Source read from PEM files, as written by a dev CA, cert
// managers or mesh sidecars that mount certificates.
type FileSource struct {
	cfg    FileConfig
	log    *slog.Logger
	mu     sync.RWMutex
	svid   *x509svid.SVID
	bundle *x509bundle.Bundle
	stamp  string
	cancel context.CancelFunc
	done   chan struct{}
}

var _ Source = (*FileSource)(nil)

// NewFileSource loads the files and watches them until Close.
func NewFileSource(cfg FileConfig) (*FileSource, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if cfg.ReloadInterval <= 0 {
		cfg.ReloadInterval = 5 * time.Second
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	s := &FileSource{cfg: cfg, log: cfg.Logger, done: make(chan struct{})}
	if err := s.reload(); err != nil {
		return nil, err
	}
	ctx, cancel := context.WithCancel(context.Background())
	s.cancel = cancel
	go s.watch(ctx)
	return s, nil
}

func (s *FileSource) fileStamp() string {
	stamp := ""
	for _, p := range []string{s.cfg.CertFile, s.cfg.KeyFile, s.cfg.BundleFile} {
		if st, err := os.Stat(p); err == nil {
			stamp += fmt.Sprintf("%d/%d;", st.ModTime().UnixNano(), st.Size())
		}
	}
	return stamp
}

func (s *FileSource) reload() error {
	stamp := s.fileStamp()
	svid, err := x509svid.Load(s.cfg.CertFile, s.cfg.KeyFile)
	if err != nil {
		return fmt.Errorf("load SVID from %s: %w", s.cfg.CertFile, err)
	}
	bundle, err := x509bundle.Load(svid.ID.TrustDomain(), s.cfg.BundleFile)
	if err != nil {
		return fmt.Errorf("load bundle from %s: %w", s.cfg.BundleFile, err)
	}
	s.mu.Lock()
	s.svid, s.bundle, s.stamp = svid, bundle, stamp
	s.mu.Unlock()
	return nil
}

func (s *FileSource) watch(ctx context.Context) {
	defer close(s.done)
	t := time.NewTicker(s.cfg.ReloadInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		s.mu.RLock()
		old := s.stamp
		s.mu.RUnlock()
		if s.fileStamp() == old {
			continue
		}
		if err := s.reload(); err != nil {
			s.log.Warn("identity files changed but did not load; keeping the previous SVID", "error", err)
			continue
		}
		s.log.Info("identity files reloaded", "cert_file", s.cfg.CertFile)
	}
}

// GetX509SVID implements x509svid.Source.
func (s *FileSource) GetX509SVID() (*x509svid.SVID, error) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.svid, nil
}

// GetX509BundleForTrustDomain implements x509bundle.Source.
func (s *FileSource) GetX509BundleForTrustDomain(td spiffeid.TrustDomain) (*x509bundle.Bundle, error) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.bundle.GetX509BundleForTrustDomain(td)
}

// Close stops watching the files.
func (s *FileSource) Close() error {
	s.cancel()
	<-s.done
	return nil
}

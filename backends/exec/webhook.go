package exec

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"strings"
	"time"

	"github.com/leasehold/leasehold/backends"
)

// WebhookName is the registry name of the webhook rotator backend.
const WebhookName = "webhook"

// Webhook serves stored secrets like the exec backend and rotates them
// through an HTTPS endpoint instead of a command, with the same contract:
// the broker POSTs the same JSON object to URL/create, URL/verify and
// URL/retire; a 2xx answer is success, and create answers
// {"secret": {...}}. The broker authenticates with its own SVID as a TLS
// client certificate (mTLS), so the endpoint can check it is talking to the
// broker; it verifies the endpoint against the system roots or
// config.ca_file.
//
// Config: url (https, or http to loopback), ca_file (optional PEM bundle),
// timeout (default 30s).
type Webhook struct {
	// ClientCertificate supplies the broker's SVID for mTLS; nil sends none.
	ClientCertificate func(*tls.CertificateRequestInfo) (*tls.Certificate, error)
}

var (
	_ backends.Backend         = Webhook{}
	_ backends.TwoPhaseRotator = Webhook{}
)

// Validate requires a usable URL and a secret.
func (w Webhook) Validate(spec backends.Spec) error {
	for k := range spec.Config {
		if k != "url" && k != "ca_file" && k != "timeout" {
			return fmt.Errorf("%w: config.%s: unknown setting (valid: url, ca_file, timeout)", backends.ErrInvalidConfig, k)
		}
	}
	if err := backends.CheckEndpointURL("config.url", spec.Config["url"], true); err != nil {
		return err
	}
	if _, err := timeout(spec); err != nil {
		return err
	}
	if _, err := w.client(spec); err != nil {
		return err
	}
	if len(spec.Secret) == 0 {
		return fmt.Errorf("%w: secret: at least one field is required", backends.ErrInvalidConfig)
	}
	return nil
}

// Issue, Renew and Revoke serve the stored secret.
func (w Webhook) Issue(ctx context.Context, req backends.IssueRequest) (*backends.Issued, error) {
	return Backend{}.Issue(ctx, req)
}

// Renew implements backends.Backend.
func (w Webhook) Renew(_ context.Context, _ backends.LeaseRef, at time.Time) (time.Time, error) {
	return at, nil
}

// Revoke implements backends.Backend.
func (w Webhook) Revoke(context.Context, backends.LeaseRef) error { return nil }

// Create implements backends.TwoPhaseRotator.
func (w Webhook) Create(ctx context.Context, spec backends.Spec, rotationID string) (map[string][]byte, error) {
	out, err := w.post(ctx, spec, "create", request{RotationID: rotationID})
	if err != nil {
		return nil, err
	}
	return decodeCreated(out)
}

// Verify implements backends.TwoPhaseRotator.
func (w Webhook) Verify(ctx context.Context, spec backends.Spec, next map[string][]byte) error {
	_, err := w.post(ctx, spec, "verify", request{Next: plain(next)})
	return err
}

// Retire implements backends.TwoPhaseRotator.
func (w Webhook) Retire(ctx context.Context, spec backends.Spec, old map[string][]byte) error {
	_, err := w.post(ctx, spec, "retire", request{Old: plain(old)})
	return err
}

func (w Webhook) client(spec backends.Spec) (*http.Client, error) {
	cfg := &tls.Config{MinVersion: tls.VersionTLS12, GetClientCertificate: w.ClientCertificate}
	if path := spec.Config["ca_file"]; path != "" {
		pem, err := os.ReadFile(path)
		if err != nil {
			return nil, fmt.Errorf("%w: config.ca_file: %w", backends.ErrInvalidConfig, err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("%w: config.ca_file: no PEM certificates in %s", backends.ErrInvalidConfig, path)
		}
		cfg.RootCAs = pool
	}
	d, err := timeout(spec)
	if err != nil {
		return nil, err
	}
	return &http.Client{Timeout: d, Transport: &http.Transport{TLSClientConfig: cfg}}, nil
}

func (w Webhook) post(ctx context.Context, spec backends.Spec, verb string, req request) ([]byte, error) {
	client, err := w.client(spec)
	if err != nil {
		return nil, err
	}
	defer client.CloseIdleConnections()
	req.Credential, req.Config, req.Secret = spec.Name, spec.Config, plain(spec.Secret)
	body, err := json.Marshal(req)
	if err != nil {
		return nil, err
	}
	defer clear(body)
	hreq, err := http.NewRequestWithContext(ctx, http.MethodPost, strings.TrimRight(spec.Config["url"], "/")+"/"+verb, bytes.NewReader(body))
	if err != nil {
		return nil, fmt.Errorf("%w: config.url: %w", backends.ErrInvalidConfig, err)
	}
	hreq.Header.Set("Content-Type", "application/json")
	resp, err := client.Do(hreq)
	if err != nil {
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		var ue *url.Error
		if errors.As(err, &ue) {
			err = ue.Err // without the URL's query
		}
		var cv *tls.CertificateVerificationError
		if errors.As(err, &cv) {
			// Not an outage: the endpoint is not who config says to trust.
			return nil, fmt.Errorf("%w: rotator %s: the endpoint's certificate is not trusted (config.ca_file): %s",
				backends.ErrUpstreamRejected, verb, scrub(err.Error(), req))
		}
		return nil, fmt.Errorf("%w: rotator %s: %s", backends.ErrUpstreamUnavailable, verb, scrub(err.Error(), req))
	}
	defer resp.Body.Close()
	out, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		return nil, fmt.Errorf("%w: rotator %s: reading the answer: %w", backends.ErrUpstreamUnavailable, verb, err)
	}
	switch {
	case resp.StatusCode/100 == 2:
		return out, nil
	case resp.StatusCode >= 500 || resp.StatusCode == http.StatusTooManyRequests:
		return nil, fmt.Errorf("%w: rotator %s answered %d: %s", backends.ErrUpstreamUnavailable, verb, resp.StatusCode, scrub(firstLine(string(out)), req))
	}
	return nil, fmt.Errorf("%w: rotator %s answered %d: %s", backends.ErrUpstreamRejected, verb, resp.StatusCode, scrub(firstLine(string(out)), req))
}

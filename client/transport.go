package client

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"sync"
)

// ErrUnmappedHost is returned by Transport for a host with no Route: the
// request is not sent.
var ErrUnmappedHost = errors.New("leasehold: host is not mapped to a credential")

// Injection puts a secret into an outgoing request.
type Injection func(r *http.Request, secret map[string]string) error

func field(secret map[string]string, name string) (string, error) {
	v, ok := secret[name]
	if !ok {
		return "", fmt.Errorf("leasehold: the credential has no field %q", name)
	}
	return v, nil
}

// Bearer sets "Authorization: Bearer <secret[field]>".
func Bearer(fieldName string) Injection {
	return func(r *http.Request, s map[string]string) error {
		v, err := field(s, fieldName)
		if err == nil {
			r.Header.Set("Authorization", "Bearer "+v)
		}
		return err
	}
}

// Basic sets HTTP basic authentication from two fields.
func Basic(userField, passwordField string) Injection {
	return func(r *http.Request, s map[string]string) error {
		u, err := field(s, userField)
		if err != nil {
			return err
		}
		p, err := field(s, passwordField)
		if err == nil {
			r.SetBasicAuth(u, p)
		}
		return err
	}
}

// Header sets a custom header, e.g. Header("X-Api-Key", "api_key").
func Header(name, fieldName string) Injection {
	return func(r *http.Request, s map[string]string) error {
		v, err := field(s, fieldName)
		if err == nil {
			r.Header.Set(name, v)
		}
		return err
	}
}

// Route says which credential a host's requests carry, and how.
type Route struct {
	Credential string
	Scopes     []string
	Inject     Injection
}

// Transport is an http.RoundTripper that adds a leased credential to each
// request for a mapped host and refuses every other host. Leases are
// acquired on first use for the Transport's task, renewed in the
// background, and re-acquired after they end; Close releases them. The
// code making requests never handles the secret.
type Transport struct {
	Client  *Client
	TaskID  string
	Purpose string
	// Routes maps a host name (without port) to its credential.
	Routes map[string]Route
	// Base sends the requests; http.DefaultTransport when nil.
	Base http.RoundTripper

	mu     sync.Mutex
	leases map[string]*Lease
}

// RoundTrip implements http.RoundTripper.
func (t *Transport) RoundTrip(req *http.Request) (*http.Response, error) {
	host := req.URL.Hostname()
	route, ok := t.Routes[host]
	if !ok {
		if req.Body != nil {
			req.Body.Close()
		}
		return nil, fmt.Errorf("%w: %s", ErrUnmappedHost, host)
	}
	secret, err := t.secret(req.Context(), host, route)
	if err != nil {
		if req.Body != nil {
			req.Body.Close()
		}
		return nil, err
	}
	out := req.Clone(req.Context())
	err = route.Inject(out, secret)
	clear(secret)
	if err != nil {
		return nil, err
	}
	base := t.Base
	if base == nil {
		base = http.DefaultTransport
	}
	return base.RoundTrip(out)
}

// secret returns the host's current secret, acquiring a lease when there is
// none or the last one ended.
func (t *Transport) secret(ctx context.Context, host string, route Route) (map[string]string, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.leases == nil {
		t.leases = map[string]*Lease{}
	}
	if l := t.leases[host]; l != nil {
		if s, err := l.Secret(); err == nil {
			return s, nil
		}
		delete(t.leases, host)
	}
	l, err := t.Client.Acquire(context.WithoutCancel(ctx), route.Credential, AcquireOptions{
		Scopes: route.Scopes, TaskID: t.TaskID, Purpose: t.Purpose, AutoRenew: true})
	if err != nil {
		return nil, err
	}
	t.leases[host] = l
	return l.Secret()
}

// Close releases every lease the Transport holds.
func (t *Transport) Close(ctx context.Context) error {
	t.mu.Lock()
	defer t.mu.Unlock()
	var errs []error
	for host, l := range t.leases {
		if l.Err() == nil {
			errs = append(errs, l.Release(ctx))
		}
		delete(t.leases, host)
	}
	return errors.Join(errs...)
}

// Package oauth2 mints short-lived OAuth2 access tokens for leases. The
// broker holds the client's long-lived secret; each lease gets an access
// token for exactly the requested scopes from the client-credentials grant,
// and the token is revoked at the server (RFC 7009) when the lease ends, if
// the credential names a revocation endpoint. The agent receives
// access_token, token_type, expires_at and scope, never the client secret.
//
// Credential config:
//
//	token_url        the token endpoint (https, or http on loopback)
//	revocation_url   optional RFC 7009 revocation endpoint
//	scopes           space-separated scopes this credential may ever grant
//	auth_method      client_secret_basic (default) or client_secret_post
//	audience         optional audience parameter sent with each request
//
// Credential secret: client_id, client_secret.
package oauth2

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"time"

	"golang.org/x/oauth2"
	"golang.org/x/oauth2/clientcredentials"

	"github.com/leasehold/leasehold/backends"
)

// Name is the registry name of this backend.
const Name = "oauth2"

// Backend is the OAuth2 client-credentials backend.
type Backend struct {
	// HTTPClient talks to the authorization server. Default: a client with
	// a 10 s timeout.
	HTTPClient *http.Client
}

var _ backends.Backend = (*Backend)(nil)

type config struct {
	tokenURL, revocationURL, audience string
	scopes                            []string
	authStyle                         oauth2.AuthStyle
	clientID, clientSecret            string
}

var knownConfig = []string{"token_url", "revocation_url", "scopes", "auth_method", "audience"}

func parse(spec backends.Spec) (*config, error) {
	for k := range spec.Config {
		if !slices.Contains(knownConfig, k) {
			return nil, fmt.Errorf("%w: config.%s: unknown setting (valid: %s)", backends.ErrInvalidConfig, k, strings.Join(knownConfig, ", "))
		}
	}
	c := &config{tokenURL: spec.Config["token_url"], revocationURL: spec.Config["revocation_url"], audience: spec.Config["audience"],
		scopes: strings.Fields(spec.Config["scopes"])}
	if err := checkURL("config.token_url", c.tokenURL, true); err != nil {
		return nil, err
	}
	if err := checkURL("config.revocation_url", c.revocationURL, false); err != nil {
		return nil, err
	}
	if len(c.scopes) == 0 {
		return nil, fmt.Errorf("%w: config.scopes: list the scopes this credential may grant, space-separated", backends.ErrInvalidConfig)
	}
	switch spec.Config["auth_method"] {
	case "", "client_secret_basic":
		c.authStyle = oauth2.AuthStyleInHeader
	case "client_secret_post":
		c.authStyle = oauth2.AuthStyleInParams
	default:
		return nil, fmt.Errorf("%w: config.auth_method: must be client_secret_basic or client_secret_post", backends.ErrInvalidConfig)
	}
	for k := range spec.Secret {
		if k != "client_id" && k != "client_secret" {
			return nil, fmt.Errorf("%w: secret.%s: unknown field (valid: client_id, client_secret)", backends.ErrInvalidConfig, k)
		}
	}
	c.clientID, c.clientSecret = string(spec.Secret["client_id"]), string(spec.Secret["client_secret"])
	if c.clientID == "" || c.clientSecret == "" {
		return nil, fmt.Errorf("%w: secret: client_id and client_secret are required", backends.ErrInvalidConfig)
	}
	return c, nil
}

// checkURL accepts https URLs, and http only to a loopback host (a local
// test server or a sidecar); tokens never cross a network in clear text.
func checkURL(field, raw string, required bool) error {
	if raw == "" {
		if required {
			return fmt.Errorf("%w: %s: is required", backends.ErrInvalidConfig, field)
		}
		return nil
	}
	u, err := url.Parse(raw)
	if err != nil || u.Host == "" {
		return fmt.Errorf("%w: %s: not an absolute URL", backends.ErrInvalidConfig, field)
	}
	switch u.Scheme {
	case "https":
		return nil
	case "http":
		if ip := net.ParseIP(u.Hostname()); (ip != nil && ip.IsLoopback()) || u.Hostname() == "localhost" {
			return nil
		}
		return fmt.Errorf("%w: %s: http is allowed only to a loopback host; use https", backends.ErrInvalidConfig, field)
	}
	return fmt.Errorf("%w: %s: scheme must be https", backends.ErrInvalidConfig, field)
}

// Validate implements backends.Backend.
func (b *Backend) Validate(spec backends.Spec) error {
	_, err := parse(spec)
	return err
}

func (b *Backend) client() *http.Client {
	if b.HTTPClient != nil {
		return b.HTTPClient
	}
	return &http.Client{Timeout: 10 * time.Second}
}

// Issue implements backends.Backend: a new access token for exactly the
// requested scopes. The lease ends no later than the token.
func (b *Backend) Issue(ctx context.Context, req backends.IssueRequest) (*backends.Issued, error) {
	c, err := parse(req.Spec)
	if err != nil {
		return nil, err
	}
	if len(req.Scopes) == 0 {
		return nil, fmt.Errorf("%w: an OAuth2 lease needs at least one scope (this credential grants: %s)",
			backends.ErrUnsupportedScope, strings.Join(c.scopes, " "))
	}
	for _, s := range req.Scopes {
		if !slices.Contains(c.scopes, s) {
			return nil, fmt.Errorf("%w: %q (this credential grants: %s)", backends.ErrUnsupportedScope, s, strings.Join(c.scopes, " "))
		}
	}
	cc := clientcredentials.Config{ClientID: c.clientID, ClientSecret: c.clientSecret, TokenURL: c.tokenURL,
		Scopes: req.Scopes, AuthStyle: c.authStyle}
	if c.audience != "" {
		cc.EndpointParams = url.Values{"audience": {c.audience}}
	}
	tok, err := cc.Token(context.WithValue(ctx, oauth2.HTTPClient, b.client()))
	if err != nil {
		return nil, upstreamError("token request", err)
	}
	if tok.AccessToken == "" {
		return nil, fmt.Errorf("%w: token response without access_token", backends.ErrUpstreamRejected)
	}
	scope := strings.Join(req.Scopes, " ")
	if s, ok := tok.Extra("scope").(string); ok && s != "" {
		scope = s
	}
	exp := req.ExpiresAt
	if !tok.Expiry.IsZero() && tok.Expiry.Before(exp) {
		exp = tok.Expiry
	}
	typ := tok.Type()
	return &backends.Issued{
		Secret: map[string][]byte{
			"access_token": []byte(tok.AccessToken),
			"token_type":   []byte(typ),
			"expires_at":   []byte(exp.UTC().Format(time.RFC3339)),
			"scope":        []byte(scope),
		},
		Artifact:  encodeArtifact(tok.AccessToken, exp),
		ExpiresAt: exp,
	}, nil
}

// The artifact is "<expiry unix seconds> <access token>": Revoke needs the
// token, Renew its expiry.
func encodeArtifact(token string, exp time.Time) []byte {
	return []byte(strconv.FormatInt(exp.Unix(), 10) + " " + token)
}

// decodeArtifact returns the token and, when recorded, its expiry; an
// artifact without one is taken as a bare token.
func decodeArtifact(a []byte) (token string, exp time.Time) {
	secs, tok, found := strings.Cut(string(a), " ")
	n, err := strconv.ParseInt(secs, 10, 64)
	if !found || err != nil || tok == "" {
		return string(a), time.Time{}
	}
	return tok, time.Unix(n, 0)
}

// Renew implements backends.Backend. An access token cannot be extended:
// a lease renews up to its token's expiry and no further; an agent that
// needs longer acquires again and gets a fresh token.
func (b *Backend) Renew(_ context.Context, ref backends.LeaseRef, expiresAt time.Time) (time.Time, error) {
	if _, exp := decodeArtifact(ref.Artifact); !exp.IsZero() && exp.Before(expiresAt) {
		return exp, nil
	}
	return expiresAt, nil
}

// Revoke implements backends.Backend: RFC 7009 revocation of the lease's
// access token, when the credential has a revocation endpoint. Revoking a
// token the server no longer knows succeeds (the RFC answers 200).
func (b *Backend) Revoke(ctx context.Context, ref backends.LeaseRef) error {
	c, err := parse(ref.Spec)
	if err != nil {
		return err
	}
	if c.revocationURL == "" || len(ref.Artifact) == 0 {
		return nil
	}
	token, _ := decodeArtifact(ref.Artifact)
	form := url.Values{"token": {token}, "token_type_hint": {"access_token"}}
	if c.authStyle == oauth2.AuthStyleInParams {
		form.Set("client_id", c.clientID)
		form.Set("client_secret", c.clientSecret)
	}
	hreq, err := http.NewRequestWithContext(ctx, http.MethodPost, c.revocationURL, strings.NewReader(form.Encode()))
	if err != nil {
		return fmt.Errorf("%w: revocation_url: %v", backends.ErrInvalidConfig, err)
	}
	hreq.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	if c.authStyle == oauth2.AuthStyleInHeader {
		hreq.SetBasicAuth(url.QueryEscape(c.clientID), url.QueryEscape(c.clientSecret))
	}
	resp, err := b.client().Do(hreq)
	if err != nil {
		return fmt.Errorf("%w: revocation request: %s", backends.ErrUpstreamUnavailable, scrubURLError(err))
	}
	defer resp.Body.Close()
	switch {
	case resp.StatusCode == http.StatusOK:
		return nil
	case resp.StatusCode >= 500 || resp.StatusCode == http.StatusTooManyRequests:
		return fmt.Errorf("%w: revocation endpoint answered %d", backends.ErrUpstreamUnavailable, resp.StatusCode)
	default:
		return fmt.Errorf("%w: revocation endpoint answered %d", backends.ErrUpstreamRejected, resp.StatusCode)
	}
}

// upstreamError classifies a token endpoint failure without echoing the
// request or the response body (which could hold credentials).
func upstreamError(what string, err error) error {
	var re *oauth2.RetrieveError
	if errors.As(err, &re) {
		code := re.ErrorCode
		status := 0
		if re.Response != nil {
			status = re.Response.StatusCode
		}
		desc := "status " + strconv.Itoa(status)
		if code != "" {
			desc = code + " (" + desc + ")"
		}
		switch {
		case code == "invalid_scope":
			return fmt.Errorf("%w: the authorization server refused the scope: %s", backends.ErrUnsupportedScope, desc)
		case status >= 500 || status == http.StatusTooManyRequests:
			return fmt.Errorf("%w: %s: %s", backends.ErrUpstreamUnavailable, what, desc)
		default:
			return fmt.Errorf("%w: %s: %s", backends.ErrUpstreamRejected, what, desc)
		}
	}
	return fmt.Errorf("%w: %s: %s", backends.ErrUpstreamUnavailable, what, scrubURLError(err))
}

// scrubURLError keeps what went wrong on the wire, not the request.
func scrubURLError(err error) string {
	var ue *url.Error
	if errors.As(err, &ue) {
		return ue.Op + " " + redactQuery(ue.URL) + ": " + ue.Err.Error()
	}
	var ne net.Error
	if errors.As(err, &ne) {
		return ne.Error()
	}
	return "request failed"
}

func redactQuery(raw string) string {
	u, err := url.Parse(raw)
	if err != nil {
		return "(url)"
	}
	u.RawQuery, u.User = "", nil
	return u.String()
}

// Package oauth2 mints short-lived OAuth2 access tokens for leases. The
// broker holds the long-lived material; each lease gets an access token for
// exactly the requested scopes, and the token is revoked at the server
// (RFC 7009) when the lease ends, if the credential names a revocation
// endpoint. The agent receives access_token, token_type, expires_at and
// scope, never the client secret or a refresh token.
//
// Two grants:
//
//   - client_credentials (default): the broker holds the client id and
//     secret and asks for a token per lease;
//   - refresh_token (delegated user access): the broker also holds a user's
//     refresh token and redeems it per lease, asking for the lease's scopes
//     only. When the server returns a new refresh token (rotation), it is
//     stored as the credential's new version before the token is used again;
//     refreshes of one credential run one at a time, since servers that
//     rotate treat the reuse of a replaced refresh token as theft. Access
//     tokens from this grant are not revoked when their lease ends (servers
//     such as Hydra would revoke the user's refresh token with them); they
//     expire on their own.
//
// Credential config:
//
//	token_url        the token endpoint (https, or http on loopback)
//	revocation_url   optional RFC 7009 revocation endpoint
//	scopes           space-separated scopes this credential may ever grant
//	grant            client_credentials (default) or refresh_token
//	auth_method      client_secret_basic (default), client_secret_post, or
//	                 private_key_jwt (RFC 7523: secret.private_key, a P-256
//	                 EC or RSA key in PEM, signs a one-minute assertion per
//	                 request; no client secret is stored)
//	key_id           optional kid for private_key_jwt assertions
//	audience         optional audience parameter sent with each request
//	scope_narrowing  required (default): a token whose granted scope is
//	                 broader than the lease's is revoked and the lease
//	                 refused; best_effort: it is handed out, and its
//	                 scope field says what it really carries
//
// Credential secret: client_id, client_secret (or private_key for
// private_key_jwt), and refresh_token for the refresh_token grant.
package oauth2

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"maps"
	"net"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.org/x/oauth2"
	"golang.org/x/oauth2/clientcredentials"

	"github.com/leasehold/leasehold/backends"
)

// Name is the registry name of this backend.
const Name = "oauth2"

// Backend is the OAuth2 backend. Use it as a pointer; the zero value is
// ready.
type Backend struct {
	// HTTPClient talks to the authorization server. Default: a client with
	// a 10 s timeout.
	HTTPClient *http.Client

	mu      sync.Mutex
	refresh map[string]*refreshChain // by credential name
}

// refreshChain serializes one credential's refreshes and remembers the
// refresh tokens this process has seen replaced, so that a spec read from
// the store just before a rotation was stored still uses the newest token.
type refreshChain struct {
	mu       sync.Mutex
	replaced map[[32]byte]bool // hashes of refresh tokens the server replaced
	latest   []byte
}

func (b *Backend) chain(name string) *refreshChain {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.refresh == nil {
		b.refresh = map[string]*refreshChain{}
	}
	c := b.refresh[name]
	if c == nil {
		c = &refreshChain{replaced: map[[32]byte]bool{}}
		b.refresh[name] = c
	}
	return c
}

var _ backends.Backend = (*Backend)(nil)

type config struct {
	tokenURL, revocationURL, audience string
	scopes                            []string
	authStyle                         oauth2.AuthStyle
	clientID, clientSecret            string
	refreshToken                      []byte  // set for the refresh_token grant
	bestEffort                        bool    // scope_narrowing: best_effort
	signer                            *signer // private_key_jwt
}

var knownConfig = []string{"token_url", "revocation_url", "scopes", "grant", "auth_method", "audience", "scope_narrowing", "key_id"}

func parse(spec backends.Spec) (*config, error) {
	for k := range spec.Config {
		if !slices.Contains(knownConfig, k) {
			return nil, fmt.Errorf("%w: config.%s: unknown setting (valid: %s)", backends.ErrInvalidConfig, k, strings.Join(knownConfig, ", "))
		}
	}
	c := &config{tokenURL: spec.Config["token_url"], revocationURL: spec.Config["revocation_url"], audience: spec.Config["audience"],
		scopes: strings.Fields(spec.Config["scopes"])}
	if err := backends.CheckEndpointURL("config.token_url", c.tokenURL, true); err != nil {
		return nil, err
	}
	if err := backends.CheckEndpointURL("config.revocation_url", c.revocationURL, false); err != nil {
		return nil, err
	}
	if len(c.scopes) == 0 {
		return nil, fmt.Errorf("%w: config.scopes: list the scopes this credential may grant, space-separated", backends.ErrInvalidConfig)
	}
	switch spec.Config["auth_method"] {
	case "", "client_secret_basic":
		c.authStyle = oauth2.AuthStyleInHeader
	case "client_secret_post", "private_key_jwt":
		c.authStyle = oauth2.AuthStyleInParams
	default:
		return nil, fmt.Errorf("%w: config.auth_method: must be client_secret_basic, client_secret_post or private_key_jwt", backends.ErrInvalidConfig)
	}
	switch spec.Config["scope_narrowing"] {
	case "", "required":
	case "best_effort":
		c.bestEffort = true
	default:
		return nil, fmt.Errorf("%w: config.scope_narrowing: must be required or best_effort", backends.ErrInvalidConfig)
	}
	fields := []string{"client_id", "client_secret"}
	jwt := spec.Config["auth_method"] == "private_key_jwt"
	if jwt {
		fields = []string{"client_id", "private_key"}
	}
	switch spec.Config["grant"] {
	case "", "client_credentials":
	case "refresh_token":
		fields = append(fields, "refresh_token")
		c.refreshToken = spec.Secret["refresh_token"]
		if len(c.refreshToken) == 0 {
			return nil, fmt.Errorf("%w: secret.refresh_token: is required for the refresh_token grant", backends.ErrInvalidConfig)
		}
	default:
		return nil, fmt.Errorf("%w: config.grant: must be client_credentials or refresh_token", backends.ErrInvalidConfig)
	}
	for k := range spec.Secret {
		if !slices.Contains(fields, k) {
			return nil, fmt.Errorf("%w: secret.%s: unknown field for this grant (valid: %s)", backends.ErrInvalidConfig, k, strings.Join(fields, ", "))
		}
	}
	c.clientID, c.clientSecret = string(spec.Secret["client_id"]), string(spec.Secret["client_secret"])
	if jwt {
		if c.clientID == "" || len(spec.Secret["private_key"]) == 0 {
			return nil, fmt.Errorf("%w: secret: client_id and private_key are required for private_key_jwt", backends.ErrInvalidConfig)
		}
		s, err := parseSigner(spec.Secret["private_key"], spec.Config["key_id"])
		if err != nil {
			return nil, err
		}
		c.signer = s
		return c, nil
	}
	if c.clientID == "" || c.clientSecret == "" {
		return nil, fmt.Errorf("%w: secret: client_id and client_secret are required", backends.ErrInvalidConfig)
	}
	return c, nil
}

// tokenRequest is a token endpoint request for scopes with c's client
// authentication and extra form parameters. x/oauth2's client-credentials
// request is used for every grant: it sends scope, accepts extra
// parameters and lets grant_type be replaced.
func (c *config) tokenRequest(scopes []string, extra url.Values) (*clientcredentials.Config, error) {
	cc := &clientcredentials.Config{ClientID: c.clientID, ClientSecret: c.clientSecret, TokenURL: c.tokenURL,
		Scopes: scopes, AuthStyle: c.authStyle, EndpointParams: url.Values{}}
	for k, v := range extra {
		cc.EndpointParams[k] = v
	}
	if c.audience != "" {
		cc.EndpointParams.Set("audience", c.audience)
	}
	if c.signer != nil {
		a, err := c.signer.assertion(c.clientID, c.tokenURL)
		if err != nil {
			return nil, err
		}
		cc.ClientSecret = "" // client_id only, in the form
		cc.EndpointParams.Set("client_assertion_type", jwtBearer)
		cc.EndpointParams.Set("client_assertion", a)
	}
	return cc, nil
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
	var tok *oauth2.Token
	if c.refreshToken != nil {
		tok, err = b.redeem(ctx, req, c)
	} else {
		var cc *clientcredentials.Config
		if cc, err = c.tokenRequest(req.Scopes, nil); err == nil {
			tok, err = cc.Token(context.WithValue(ctx, oauth2.HTTPClient, b.client()))
		}
	}
	if err != nil {
		return nil, upstreamError("token request", err)
	}
	if tok.AccessToken == "" {
		return nil, fmt.Errorf("%w: token response without access_token", backends.ErrUpstreamRejected)
	}
	scope := strings.Join(req.Scopes, " ")
	if s, ok := tok.Extra("scope").(string); ok && s != "" {
		scope = s // RFC 6749 5.1: present when it differs from the request
	}
	if extra := broader(strings.Fields(scope), req.Scopes); len(extra) > 0 && !c.bestEffort {
		// Least privilege or nothing: take the token back (it never left).
		_ = b.Revoke(context.WithoutCancel(ctx), backends.LeaseRef{Spec: req.Spec, LeaseID: req.LeaseID, Artifact: []byte(tok.AccessToken)})
		return nil, fmt.Errorf("%w: the server granted %q for a lease of %q, which is broader (it does not narrow this grant); "+
			"consent only the scopes needed, or set config.scope_narrowing=best_effort to accept it",
			backends.ErrUpstreamRejected, scope, strings.Join(req.Scopes, " "))
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

// broader lists the granted scopes beyond the requested ones, ignoring
// offline_access/offline: they allow refresh tokens, which the agent never
// receives.
func broader(granted, requested []string) []string {
	var extra []string
	for _, g := range granted {
		if g != "offline_access" && g != "offline" && !slices.Contains(requested, g) {
			extra = append(extra, g)
		}
	}
	return extra
}

// redeem runs the refresh_token grant for req's scopes, one at a time per
// credential, and stores a refresh token the server rotated before the
// next redemption can use it.
func (b *Backend) redeem(ctx context.Context, req backends.IssueRequest, c *config) (*oauth2.Token, error) {
	ch := b.chain(req.Spec.Name)
	ch.mu.Lock()
	defer ch.mu.Unlock()
	rt := c.refreshToken
	if ch.latest != nil && ch.replaced[sha256.Sum256(rt)] {
		// The store still has a token this process already saw replaced
		// (its update may be in flight): use the newest.
		rt = ch.latest
	}
	// The refresh grant with the lease's scopes (RFC 6749 section 6 lets a
	// refresh narrow them). x/oauth2's own refresh cannot send a scope;
	// its client-credentials request can, and allows replacing grant_type.
	cc, err := c.tokenRequest(req.Scopes, url.Values{"grant_type": {"refresh_token"}, "refresh_token": {string(rt)}})
	if err != nil {
		return nil, err
	}
	tok, err := cc.Token(context.WithValue(ctx, oauth2.HTTPClient, b.client()))
	if err != nil {
		return nil, err
	}
	if tok.RefreshToken != "" && tok.RefreshToken != string(rt) {
		next := maps.Clone(req.Spec.Secret)
		next["refresh_token"] = []byte(tok.RefreshToken)
		if req.UpdateSecret != nil {
			if err := req.UpdateSecret(ctx, next); err != nil {
				// Keep the chain in memory so this process still uses the
				// newest token; the error fails this lease.
				ch.replaced[sha256.Sum256(rt)], ch.latest = true, []byte(tok.RefreshToken)
				return nil, fmt.Errorf("%w: storing the rotated refresh token: %w", backends.ErrUpstreamUnavailable, err)
			}
		}
		ch.replaced[sha256.Sum256(rt)], ch.latest = true, []byte(tok.RefreshToken)
	}
	return tok, nil
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

// ReissueOnRenew implements backends.Reissuer: renewing an OAuth2 lease
// mints a fresh access token (client_credentials) and revokes the old one.
// Under the refresh_token grant the lease renews only up to its token's
// expiry (Renew): redeeming the user's refresh token again for every renewal
// would rotate it needlessly.
func (b *Backend) ReissueOnRenew(spec backends.Spec) bool {
	return spec.Config["grant"] != "refresh_token"
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
	if c.revocationURL == "" || len(ref.Artifact) == 0 || c.refreshToken != nil {
		// Under the refresh_token grant, servers built on fosite (Hydra)
		// revoke every token of the grant, the user's refresh token
		// included, when one access token is revoked; the lease's token is
		// left to expire (minutes) instead of ending the delegation.
		return nil
	}
	token, _ := decodeArtifact(ref.Artifact)
	form := url.Values{"token": {token}, "token_type_hint": {"access_token"}}
	switch {
	case c.signer != nil:
		// The assertion's audience is the token endpoint, as servers
		// (Hydra among them) expect for every endpoint they authenticate.
		a, err := c.signer.assertion(c.clientID, c.tokenURL)
		if err != nil {
			return err
		}
		form.Set("client_id", c.clientID)
		form.Set("client_assertion_type", jwtBearer)
		form.Set("client_assertion", a)
	case c.authStyle == oauth2.AuthStyleInParams:
		form.Set("client_id", c.clientID)
		form.Set("client_secret", c.clientSecret)
	}
	hreq, err := http.NewRequestWithContext(ctx, http.MethodPost, c.revocationURL, strings.NewReader(form.Encode()))
	if err != nil {
		return fmt.Errorf("%w: revocation_url: %w", backends.ErrInvalidConfig, err)
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

// Package hydratest runs a real ORY Hydra v2 OAuth2 server for tests: the
// binary pinned in tools/hydra (built into bin/ by `make tools`), in-memory
// storage, public and admin ports on loopback. Clients are created through
// its admin API and tokens checked with its introspection endpoint.
package hydratest

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"net/http/cookiejar"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// Hydra is a running server.
type Hydra struct {
	// PublicURL serves /oauth2/token and /oauth2/revoke.
	PublicURL string
	// AdminURL serves /admin/clients and /admin/oauth2/introspect.
	AdminURL string
}

// TokenURL and RevocationURL are the endpoints a credential names.
func (h *Hydra) TokenURL() string      { return h.PublicURL + "/oauth2/token" }
func (h *Hydra) RevocationURL() string { return h.PublicURL + "/oauth2/revoke" }

// Binary finds hydra: LEASEHOLD_HYDRA, else bin/hydra at the module root.
// Without it the test is skipped, or fails under CI=true.
func Binary(t testing.TB) string {
	t.Helper()
	p := os.Getenv("LEASEHOLD_HYDRA")
	if p == "" {
		if dir, err := os.Getwd(); err == nil {
			for ; ; dir = filepath.Dir(dir) {
				if _, err := os.Stat(filepath.Join(dir, "tools", "hydra", "go.mod")); err == nil {
					p = filepath.Join(dir, "bin", "hydra")
					break
				}
				if filepath.Dir(dir) == dir {
					break
				}
			}
		}
	}
	if _, err := os.Stat(p); p == "" || err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatalf("hydra not found (%q): run 'make tools' (CI must not skip this test)", p)
		}
		t.Skipf("hydra not found (%q); run 'make tools'", p)
	}
	return p
}

// Start runs Hydra until the test ends.
func Start(t testing.TB) *Hydra {
	t.Helper()
	bin := Binary(t)
	pub, adm := freePort(t), freePort(t)
	secret := make([]byte, 24)
	_, _ = rand.Read(secret)
	h := &Hydra{PublicURL: fmt.Sprintf("http://127.0.0.1:%d", pub), AdminURL: fmt.Sprintf("http://127.0.0.1:%d", adm)}
	cmd := exec.Command(bin, "serve", "all", "--dev", "--sqa-opt-out")
	cmd.Env = append(os.Environ(), "DSN=memory", "SECRETS_SYSTEM="+hex.EncodeToString(secret),
		"URLS_SELF_ISSUER="+h.PublicURL, "SERVE_PUBLIC_HOST=127.0.0.1", fmt.Sprintf("SERVE_PUBLIC_PORT=%d", pub),
		"SERVE_ADMIN_HOST=127.0.0.1", fmt.Sprintf("SERVE_ADMIN_PORT=%d", adm), "LOG_LEVEL=warn",
		// The login and consent "apps" are never contacted: UserRefreshToken
		// reads the challenges from the redirects and accepts them through
		// the admin API.
		"URLS_LOGIN=http://127.0.0.1:9/login", "URLS_CONSENT=http://127.0.0.1:9/consent")
	var log lockedBuffer
	cmd.Stdout, cmd.Stderr = &log, &log
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		done := make(chan struct{})
		go func() { _ = cmd.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			_ = cmd.Process.Kill()
			<-done
		}
		if t.Failed() {
			t.Logf("hydra log:\n%s", log.String())
		}
	})
	deadline := time.Now().Add(time.Minute)
	for {
		resp, err := http.Get(h.AdminURL + "/health/ready")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return h
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("hydra not ready within a minute: %v\n%s", err, log.String())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// Client is an OAuth2 client registered in Hydra.
type Client struct {
	ID, Secret string
}

// CreateClient registers a client-credentials client allowed scopes, with
// authMethod "client_secret_basic" or "client_secret_post".
func (h *Hydra) CreateClient(t testing.TB, authMethod string, scopes ...string) Client {
	t.Helper()
	return h.createClient(t, map[string]any{
		"grant_types": []string{"client_credentials"}, "scope": strings.Join(scopes, " "),
		"token_endpoint_auth_method": authMethod, "access_token_strategy": "opaque",
	})
}

// CreateJWTClient registers a client-credentials client that authenticates
// with private_key_jwt, signing with the key whose public JWK is given.
func (h *Hydra) CreateJWTClient(t testing.TB, jwk map[string]string, scopes ...string) Client {
	t.Helper()
	return h.createClient(t, map[string]any{
		"grant_types": []string{"client_credentials"}, "scope": strings.Join(scopes, " "),
		"token_endpoint_auth_method": "private_key_jwt", "token_endpoint_auth_signing_alg": jwk["alg"],
		"jwks": map[string]any{"keys": []map[string]string{jwk}}, "access_token_strategy": "opaque",
	})
}

func (h *Hydra) createClient(t testing.TB, client map[string]any) Client {
	t.Helper()
	body, _ := json.Marshal(client)
	resp, err := http.Post(h.AdminURL+"/admin/clients", "application/json", bytes.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var out struct {
		ClientID     string `json:"client_id"`
		ClientSecret string `json:"client_secret"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&out); err != nil || resp.StatusCode != http.StatusCreated {
		t.Fatalf("hydra create client: status %d, %v", resp.StatusCode, err)
	}
	return Client{ID: out.ClientID, Secret: out.ClientSecret}
}

// redirectURI is registered for user clients; nothing listens there, the
// code is read from the redirect.
const redirectURI = "http://127.0.0.1:9/callback"

// CreateUserClient registers a client for delegated user access: the
// authorization-code and refresh-token grants, offline_access plus scopes.
func (h *Hydra) CreateUserClient(t testing.TB, scopes ...string) Client {
	t.Helper()
	return h.createClient(t, map[string]any{
		"grant_types": []string{"authorization_code", "refresh_token"}, "response_types": []string{"code"},
		"scope": strings.Join(append([]string{"offline_access"}, scopes...), " "), "redirect_uris": []string{redirectURI},
		"token_endpoint_auth_method": "client_secret_basic", "access_token_strategy": "opaque",
	})
}

// UserRefreshToken runs the authorization-code flow for subject, as a user
// logging in and consenting to scopes (plus offline_access) would, and
// returns the refresh token the client receives.
func (h *Hydra) UserRefreshToken(t testing.TB, c Client, subject string, scopes ...string) string {
	t.Helper()
	jar, _ := cookiejar.New(nil)
	browser := &http.Client{Jar: jar, Timeout: 10 * time.Second,
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	all := append([]string{"offline_access"}, scopes...)
	state := make([]byte, 16)
	_, _ = rand.Read(state)
	next := h.PublicURL + "/oauth2/auth?" + url.Values{"client_id": {c.ID}, "response_type": {"code"},
		"scope": {strings.Join(all, " ")}, "redirect_uri": {redirectURI}, "state": {hex.EncodeToString(state)}}.Encode()
	follow := func(u, param string) string {
		resp, err := browser.Get(u)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		loc, err := url.Parse(resp.Header.Get("Location"))
		if err != nil || loc.Query().Get(param) == "" {
			t.Fatalf("hydra flow: expected a redirect with %s, got %d %q", param, resp.StatusCode, resp.Header.Get("Location"))
		}
		return loc.Query().Get(param)
	}
	accept := func(kind, challenge string, body map[string]any) string {
		b, _ := json.Marshal(body)
		req, _ := http.NewRequest(http.MethodPut, h.AdminURL+"/admin/oauth2/auth/requests/"+kind+"/accept?"+kind+"_challenge="+url.QueryEscape(challenge), bytes.NewReader(b))
		req.Header.Set("Content-Type", "application/json")
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		var out struct {
			RedirectTo string `json:"redirect_to"`
		}
		if err := json.NewDecoder(resp.Body).Decode(&out); err != nil || out.RedirectTo == "" {
			t.Fatalf("hydra accept %s: status %d, %v", kind, resp.StatusCode, err)
		}
		return out.RedirectTo
	}
	login := follow(next, "login_challenge")
	consent := follow(accept("login", login, map[string]any{"subject": subject}), "consent_challenge")
	code := follow(accept("consent", consent, map[string]any{"grant_scope": all}), "code")

	req, _ := http.NewRequest(http.MethodPost, h.TokenURL(), strings.NewReader(url.Values{
		"grant_type": {"authorization_code"}, "code": {code}, "redirect_uri": {redirectURI}}.Encode()))
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	req.SetBasicAuth(url.QueryEscape(c.ID), url.QueryEscape(c.Secret))
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var tok struct {
		RefreshToken string `json:"refresh_token"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&tok); err != nil || tok.RefreshToken == "" {
		t.Fatalf("hydra code exchange: status %d, no refresh token (%v)", resp.StatusCode, err)
	}
	return tok.RefreshToken
}

// Introspection is what Hydra says about a token.
type Introspection struct {
	Active   bool   `json:"active"`
	Subject  string `json:"sub"`
	Scope    string `json:"scope"`
	ClientID string `json:"client_id"`
	Exp      int64  `json:"exp"`
}

// Introspect asks Hydra's admin API whether token is active.
func (h *Hydra) Introspect(t testing.TB, token string) Introspection {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodPost, h.AdminURL+"/admin/oauth2/introspect",
		strings.NewReader(url.Values{"token": {token}}.Encode()))
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var out Introspection
	if err := json.NewDecoder(resp.Body).Decode(&out); err != nil {
		t.Fatalf("hydra introspect: %v", err)
	}
	return out
}

func freePort(t testing.TB) int {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (b *lockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.Write(p)
}

func (b *lockedBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.String()
}

package main

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httputil"
	"os"
	"os/signal"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"time"

	"go.yaml.in/yaml/v3"

	"github.com/leasehold/leasehold/client"
)

// ProxyConfig is the `leasehold proxy` configuration file.
type ProxyConfig struct {
	// Socket is the unix socket the agent talks to; it is created with mode
	// 0600, so only processes of the same user can use it.
	Socket string `yaml:"socket"`
	// UpstreamCAFile, when set, is the only CA trusted for upstreams
	// (otherwise the system roots).
	UpstreamCAFile string       `yaml:"upstream_ca_file"`
	Routes         []ProxyRoute `yaml:"routes"`
}

// ProxyRoute maps an upstream host to a credential and how to inject it.
type ProxyRoute struct {
	Host       string   `yaml:"host"`
	Credential string   `yaml:"credential"`
	Scopes     []string `yaml:"scopes"`
	// Exactly one of these.
	Bearer string    `yaml:"bearer"` // secret field → "Authorization: Bearer <value>"
	Basic  []string  `yaml:"basic"`  // [user field, password field]
	Header *struct { // a custom header
		Name  string `yaml:"name"`
		Field string `yaml:"field"`
	} `yaml:"header"`
}

const (
	taskHeader  = "Leasehold-Task"
	controlHost = "leasehold.proxy" // requests to it control the proxy itself
)

var proxyTaskRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$`)

func (r ProxyRoute) injection() (client.Injection, error) {
	n := 0
	var inj client.Injection
	if r.Bearer != "" {
		n, inj = n+1, client.Bearer(r.Bearer)
	}
	if len(r.Basic) > 0 {
		if len(r.Basic) != 2 {
			return nil, fmt.Errorf("route %s: basic takes [user field, password field]", r.Host)
		}
		n, inj = n+1, client.Basic(r.Basic[0], r.Basic[1])
	}
	if r.Header != nil {
		if r.Header.Name == "" || r.Header.Field == "" {
			return nil, fmt.Errorf("route %s: header needs name and field", r.Host)
		}
		n, inj = n+1, client.Header(r.Header.Name, r.Header.Field)
	}
	if n != 1 {
		return nil, fmt.Errorf("route %s: give exactly one of bearer, basic, header", r.Host)
	}
	return inj, nil
}

func loadProxyConfig(path string) (*ProxyConfig, map[string]client.Route, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, nil, err
	}
	cfg := &ProxyConfig{}
	dec := yaml.NewDecoder(bytes.NewReader(data))
	dec.KnownFields(true)
	if err := dec.Decode(cfg); err != nil {
		return nil, nil, fmt.Errorf("proxy config %s: %w", path, err)
	}
	if cfg.Socket == "" {
		return nil, nil, errors.New("proxy config: socket is required")
	}
	routes := map[string]client.Route{}
	for _, r := range cfg.Routes {
		if r.Host == "" || r.Credential == "" || len(r.Scopes) == 0 {
			return nil, nil, fmt.Errorf("proxy config: route %q needs host, credential and scopes", r.Host)
		}
		inj, err := r.injection()
		if err != nil {
			return nil, nil, err
		}
		routes[strings.ToLower(r.Host)] = client.Route{Credential: r.Credential, Scopes: r.Scopes, Inject: inj}
	}
	return cfg, routes, nil
}

// credentialProxy forwards an agent's plain HTTP requests to HTTPS
// upstreams, adding the leased credential; one client.Transport per task.
type credentialProxy struct {
	c      *client.Client
	routes map[string]client.Route
	base   http.RoundTripper
	log    *slog.Logger

	mu    sync.Mutex
	tasks map[string]*client.Transport
}

type taskKey struct{}

func (p *credentialProxy) transport(task string) *client.Transport {
	p.mu.Lock()
	defer p.mu.Unlock()
	t := p.tasks[task]
	if t == nil {
		t = &client.Transport{Client: p.c, TaskID: task, Purpose: "via leasehold proxy", Routes: p.routes, Base: p.base}
		p.tasks[task] = t
	}
	return t
}

// endTask releases the task's leases.
func (p *credentialProxy) endTask(ctx context.Context, task string) error {
	p.mu.Lock()
	t := p.tasks[task]
	delete(p.tasks, task)
	p.mu.Unlock()
	if t == nil {
		return nil
	}
	return t.Close(ctx)
}

func (p *credentialProxy) RoundTrip(r *http.Request) (*http.Response, error) {
	return p.transport(r.Context().Value(taskKey{}).(string)).RoundTrip(r)
}

func (p *credentialProxy) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	host := strings.ToLower(r.Host)
	if h, _, err := net.SplitHostPort(host); err == nil {
		host = h
	}
	task := r.Header.Get(taskHeader)
	if !proxyTaskRE.MatchString(task) {
		http.Error(w, "leasehold proxy: a "+taskHeader+" header with a task id is required", http.StatusBadRequest)
		return
	}
	if host == controlHost {
		// POST http://leasehold.proxy/end-task with the task header.
		if r.Method != http.MethodPost || r.URL.Path != "/end-task" {
			http.Error(w, "leasehold proxy: POST /end-task", http.StatusNotFound)
			return
		}
		if err := p.endTask(r.Context(), task); err != nil {
			http.Error(w, "leasehold proxy: releasing the task's leases failed", http.StatusBadGateway)
			return
		}
		w.WriteHeader(http.StatusNoContent)
		return
	}
	if _, ok := p.routes[host]; !ok {
		p.log.Warn("proxy refused an unmapped host", "host", host, "task", task)
		http.Error(w, "leasehold proxy: host "+host+" is not mapped to a credential", http.StatusForbidden)
		return
	}
	rp := &httputil.ReverseProxy{
		Rewrite: func(pr *httputil.ProxyRequest) {
			pr.Out.URL.Scheme, pr.Out.URL.Host, pr.Out.Host = "https", r.Host, r.Host
			pr.Out.Header.Del(taskHeader)
			pr.Out.Header.Del("Authorization") // the proxy decides what authenticates the agent upstream
		},
		Transport: p,
		ErrorHandler: func(w http.ResponseWriter, _ *http.Request, err error) {
			code := http.StatusBadGateway
			if errors.Is(err, client.ErrDenied) || errors.Is(err, client.ErrLeaseEnded) {
				code = http.StatusForbidden
			}
			p.log.Warn("proxy request failed", "host", host, "task", task, "error", err.Error())
			http.Error(w, "leasehold proxy: "+http.StatusText(code), code)
		},
	}
	rp.ServeHTTP(w, r.WithContext(context.WithValue(r.Context(), taskKey{}, task)))
}

func cmdProxy(args []string, conn *connFlags, stderr io.Writer) error {
	fs := flag.NewFlagSet("proxy", flag.ContinueOnError)
	fs.SetOutput(stderr)
	configPath := fs.String("config", "", "proxy configuration file (YAML)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *configPath == "" {
		return usageErr("proxy needs --config")
	}
	cfg, routes, err := loadProxyConfig(*configPath)
	if err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	return runProxy(ctx, cfg, routes, conn, slog.New(slog.NewJSONHandler(stderr, nil)))
}

func runProxy(ctx context.Context, cfg *ProxyConfig, routes map[string]client.Route, conn *connFlags, log *slog.Logger) error {
	src, err := conn.source(ctx)
	if err != nil {
		return err
	}
	defer src.Close()
	c, err := client.New(ctx, client.Config{Address: conn.addr, Source: src})
	if err != nil {
		return err
	}
	defer c.Close()
	tlsCfg := &tls.Config{MinVersion: tls.VersionTLS12}
	if cfg.UpstreamCAFile != "" {
		pem, err := os.ReadFile(cfg.UpstreamCAFile)
		if err != nil {
			return fmt.Errorf("upstream_ca_file: %w", err)
		}
		tlsCfg.RootCAs = x509.NewCertPool()
		if !tlsCfg.RootCAs.AppendCertsFromPEM(pem) {
			return errors.New("upstream_ca_file holds no certificate")
		}
	}
	base := http.DefaultTransport.(*http.Transport).Clone()
	base.TLSClientConfig = tlsCfg
	p := &credentialProxy{c: c, routes: routes, base: base, log: log, tasks: map[string]*client.Transport{}}

	_ = os.Remove(cfg.Socket)
	old := syscall.Umask(0o177) // the socket is born 0600: same user only
	lis, err := net.Listen("unix", cfg.Socket)
	syscall.Umask(old)
	if err != nil {
		return err
	}
	srv := &http.Server{Handler: p, ReadHeaderTimeout: 10 * time.Second}
	log.Info("leasehold proxy serving", "socket", cfg.Socket, "routes", len(routes))
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(lis) }()
	select {
	case err := <-errc:
		return err
	case <-ctx.Done():
	}
	sctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_ = srv.Shutdown(sctx)
	p.mu.Lock()
	tasks := make([]string, 0, len(p.tasks))
	for t := range p.tasks {
		tasks = append(tasks, t)
	}
	p.mu.Unlock()
	for _, t := range tasks {
		_ = p.endTask(sctx, t)
	}
	return nil
}

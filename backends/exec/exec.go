// Package exec serves stored secrets like the static backend and rotates
// them through an operator-supplied command, for upstreams Leasehold has no
// built-in rotator for (an API key minted by a vendor's API, a service
// account key, a webhook secret).
//
// Credential config:
//
//	command   absolute path of the rotator program (required), inside the
//	          directory the broker's own configuration allows (Dir); a
//	          credential put over the API cannot name any other program
//	timeout   per invocation, a Go duration (default 30s)
//
// The contract. The broker runs `command create`, `command verify` or
// `command retire` with an empty environment (PATH only) and writes one JSON
// object to its standard input:
//
//	{"credential": "crm/api", "config": {...}, "rotation_id": "rot_...",
//	 "secret": {...current...}, "next": {...}, "old": {...}}
//
// (next for verify, old for retire). create must print
// {"secret": {"field": "value", ...}} on standard output: a new secret,
// valid upstream alongside the current one; called again with the same
// rotation_id (the broker resumes after a crash) it must print the same
// secret or another valid one, never leave two. verify exits 0 if next
// works. retire makes old stop working and exits 0, also when it is already
// gone. A non-zero exit is a failure; the first line of standard error (with
// any secret value removed) is recorded as the reason.
package exec

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"github.com/leasehold/leasehold/backends"
)

// Name is the registry name of this backend.
const Name = "exec"

// Backend is the exec backend.
type Backend struct {
	// Dir is the only directory rotator programs may be run from (the
	// broker config's rotators.exec_dir). Empty turns the backend off: an
	// admin credential must not be enough to run an arbitrary program on
	// the broker's host.
	Dir string
}

var (
	_ backends.Backend         = Backend{}
	_ backends.TwoPhaseRotator = Backend{}
)

// Validate requires a command inside Dir and a secret.
func (b Backend) Validate(spec backends.Spec) error {
	for k := range spec.Config {
		if k != "command" && k != "timeout" {
			return fmt.Errorf("%w: config.%s: unknown setting (valid: command, timeout)", backends.ErrInvalidConfig, k)
		}
	}
	if _, err := b.command(spec); err != nil {
		return err
	}
	if _, err := timeout(spec); err != nil {
		return err
	}
	if len(spec.Secret) == 0 {
		return fmt.Errorf("%w: secret: at least one field is required", backends.ErrInvalidConfig)
	}
	return nil
}

// command resolves config.command and checks that it lies in Dir, after
// symbolic links are followed.
func (b Backend) command(spec backends.Spec) (string, error) {
	if b.Dir == "" {
		return "", fmt.Errorf("%w: the exec backend is off: the broker's configuration names no rotators.exec_dir", backends.ErrInvalidConfig)
	}
	cmd := spec.Config["command"]
	if cmd == "" || !filepath.IsAbs(cmd) {
		return "", fmt.Errorf("%w: config.command: the rotator's absolute path is required", backends.ErrInvalidConfig)
	}
	dir, err := filepath.EvalSymlinks(b.Dir)
	if err != nil {
		return "", fmt.Errorf("%w: rotators.exec_dir: %w", backends.ErrInvalidConfig, err)
	}
	real, err := filepath.EvalSymlinks(cmd)
	if err != nil {
		return "", fmt.Errorf("%w: config.command: %w", backends.ErrInvalidConfig, err)
	}
	if rel, err := filepath.Rel(dir, real); err != nil || rel == ".." || strings.HasPrefix(rel, ".."+string(filepath.Separator)) {
		return "", fmt.Errorf("%w: config.command: %s is not inside the broker's rotators.exec_dir (%s)", backends.ErrInvalidConfig, cmd, b.Dir)
	}
	return real, nil
}

func timeout(spec backends.Spec) (time.Duration, error) {
	v := spec.Config["timeout"]
	if v == "" {
		return 30 * time.Second, nil
	}
	d, err := time.ParseDuration(v)
	if err != nil || d <= 0 {
		return 0, fmt.Errorf("%w: config.timeout: a positive Go duration such as 30s", backends.ErrInvalidConfig)
	}
	return d, nil
}

// Issue returns a copy of the stored secret, as the static backend does.
func (Backend) Issue(_ context.Context, req backends.IssueRequest) (*backends.Issued, error) {
	out := make(map[string][]byte, len(req.Spec.Secret))
	for k, v := range req.Spec.Secret {
		out[k] = append([]byte(nil), v...)
	}
	return &backends.Issued{Secret: out}, nil
}

// Renew implements backends.Backend.
func (Backend) Renew(ctx context.Context, ref backends.LeaseRef, at time.Time) (time.Time, error) {
	return at, nil
}

// Revoke implements backends.Backend: nothing per lease exists upstream.
func (Backend) Revoke(context.Context, backends.LeaseRef) error { return nil }

type request struct {
	Credential string            `json:"credential"`
	Config     map[string]string `json:"config"`
	RotationID string            `json:"rotation_id,omitempty"`
	Secret     map[string]string `json:"secret"`
	Next       map[string]string `json:"next,omitempty"`
	Old        map[string]string `json:"old,omitempty"`
}

// Create implements backends.TwoPhaseRotator.
func (b Backend) Create(ctx context.Context, spec backends.Spec, rotationID string) (map[string][]byte, error) {
	out, err := b.run(ctx, spec, "create", request{RotationID: rotationID})
	if err != nil {
		return nil, err
	}
	return decodeCreated(out)
}

// decodeCreated reads a rotator's answer to create: {"secret": {...}}.
func decodeCreated(out []byte) (map[string][]byte, error) {
	defer clear(out)
	var resp struct {
		Secret map[string]string `json:"secret"`
	}
	if err := json.Unmarshal(out, &resp); err != nil || len(resp.Secret) == 0 {
		return nil, fmt.Errorf("%w: rotator create: the answer is not {\"secret\": {...}}", backends.ErrUpstreamRejected)
	}
	next := make(map[string][]byte, len(resp.Secret))
	for k, v := range resp.Secret {
		next[k] = []byte(v)
	}
	return next, nil
}

// Verify implements backends.TwoPhaseRotator.
func (b Backend) Verify(ctx context.Context, spec backends.Spec, next map[string][]byte) error {
	_, err := b.run(ctx, spec, "verify", request{Next: plain(next)})
	return err
}

// Retire implements backends.TwoPhaseRotator.
func (b Backend) Retire(ctx context.Context, spec backends.Spec, old map[string][]byte) error {
	_, err := b.run(ctx, spec, "retire", request{Old: plain(old)})
	return err
}

func plain(m map[string][]byte) map[string]string {
	out := make(map[string]string, len(m))
	for k, v := range m {
		out[k] = string(v)
	}
	return out
}

func (b Backend) run(ctx context.Context, spec backends.Spec, verb string, req request) ([]byte, error) {
	// Checked at every run too: the allowed directory is the broker's
	// configuration, which may have changed since the credential was put.
	path, err := b.command(spec)
	if err != nil {
		return nil, err
	}
	d, err := timeout(spec)
	if err != nil {
		return nil, err
	}
	req.Credential, req.Config, req.Secret = spec.Name, spec.Config, plain(spec.Secret)
	in, err := json.Marshal(req)
	if err != nil {
		return nil, err
	}
	defer clear(in)
	ctx, cancel := context.WithTimeout(ctx, d)
	defer cancel()
	cmd := exec.CommandContext(ctx, path, verb) //nolint:gosec // a program in the operator's rotators.exec_dir
	cmd.Env = []string{"PATH=/usr/local/bin:/usr/bin:/bin"}
	cmd.Stdin = bytes.NewReader(in)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err = cmd.Run()
	if ctx.Err() != nil && errors.Is(ctx.Err(), context.DeadlineExceeded) {
		return nil, fmt.Errorf("%w: rotator %s timed out after %v", backends.ErrUpstreamUnavailable, verb, d)
	}
	if err != nil {
		if ctxErr := context.Cause(ctx); ctxErr != nil {
			return nil, ctxErr
		}
		return nil, fmt.Errorf("%w: rotator %s: %w: %s", backends.ErrUpstreamRejected, verb, err, scrub(firstLine(stderr.String()), req))
	}
	return stdout.Bytes(), nil
}

func firstLine(s string) string {
	s, _, _ = strings.Cut(strings.TrimSpace(s), "\n")
	if len(s) > 200 {
		s = s[:200]
	}
	return s
}

// scrub removes every secret value the rotator was given from its message.
func scrub(msg string, req request) string {
	for _, m := range []map[string]string{req.Secret, req.Next, req.Old} {
		for v := range maps.Values(m) {
			if len(v) >= 4 {
				msg = strings.ReplaceAll(msg, v, "[redacted]")
			}
		}
	}
	return msg
}

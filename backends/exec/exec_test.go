package exec_test

import (
	"context"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/leasehold/leasehold/backends"
	"github.com/leasehold/leasehold/backends/backendtest"
	"github.com/leasehold/leasehold/backends/exec"
)

func TestConformance(t *testing.T) {
	backendtest.Run(t, backendtest.Case{Backend: exec.Backend{Dir: "/bin"},
		Spec:   backends.Spec{Name: "crm/api", Config: map[string]string{"command": "/bin/true"}, Secret: map[string][]byte{"api_key": []byte("exec-canary")}},
		Scopes: []string{"read"}})
}

// The rotator's failure message reaches the broker without any secret it
// was given, and a create that prints no secret is refused.
func TestRotatorContract(t *testing.T) {
	dir := t.TempDir()
	script := filepath.Join(dir, "rotator")
	require.NoError(t, os.WriteFile(script, []byte(`#!/bin/sh
case "$1" in
  create) echo '{"nope": 1}' ;;
  verify) echo "cannot log in with $(cat)" >&2; exit 3 ;;
  retire) cat >/dev/null ;;
esac
`), 0o700))
	spec := backends.Spec{Name: "crm/api", Config: map[string]string{"command": script}, Secret: map[string][]byte{"api_key": []byte("current-canary")}}
	b := exec.Backend{Dir: dir}
	require.NoError(t, b.Validate(spec))
	_, err := b.Create(context.Background(), spec, "rot_1")
	require.ErrorIs(t, err, backends.ErrUpstreamRejected)
	err = b.Verify(context.Background(), spec, map[string][]byte{"api_key": []byte("next-canary")})
	require.ErrorIs(t, err, backends.ErrUpstreamRejected)
	require.ErrorContains(t, err, "cannot log in")
	require.NotContains(t, err.Error(), "next-canary")
	require.NotContains(t, err.Error(), "current-canary")
	require.NoError(t, b.Retire(context.Background(), spec, map[string][]byte{"api_key": []byte("old")}))

	for _, bad := range []map[string]string{{}, {"command": "relative/path"}, {"command": script, "timeout": "soon"}, {"command": script, "x": "y"}} {
		require.ErrorIs(t, b.Validate(backends.Spec{Config: bad, Secret: spec.Secret}), backends.ErrInvalidConfig)
	}
}

// Only programs inside the broker's configured directory can be named by a
// credential, also through a symbolic link; no directory, no exec backend.
func TestCommandMustBeInTheAllowedDir(t *testing.T) {
	allowed, other := t.TempDir(), t.TempDir()
	inside := filepath.Join(allowed, "rotator")
	outside := filepath.Join(other, "rotator")
	for _, p := range []string{inside, outside} {
		require.NoError(t, os.WriteFile(p, []byte("#!/bin/sh\n"), 0o700))
	}
	link := filepath.Join(allowed, "escape")
	require.NoError(t, os.Symlink(outside, link))
	spec := func(cmd string) backends.Spec {
		return backends.Spec{Config: map[string]string{"command": cmd}, Secret: map[string][]byte{"k": []byte("v")}}
	}
	b := exec.Backend{Dir: allowed}
	require.NoError(t, b.Validate(spec(inside)))
	for name, cmd := range map[string]string{"outside": outside, "symlink out": link, "dot-dot": allowed + "/../" + filepath.Base(other) + "/rotator", "system": "/bin/sh"} {
		err := b.Validate(spec(cmd))
		require.ErrorIs(t, err, backends.ErrInvalidConfig, name)
		require.ErrorContains(t, err, "not inside the broker's rotators.exec_dir", name)
	}
	_, err := b.Create(context.Background(), spec(outside), "rot_1")
	require.ErrorIs(t, err, backends.ErrInvalidConfig, "checked at run time too")
	err = exec.Backend{}.Validate(spec(inside))
	require.ErrorIs(t, err, backends.ErrInvalidConfig)
	require.ErrorContains(t, err, "the exec backend is off")
}

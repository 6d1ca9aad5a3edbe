// Package backendtest is the conformance suite every backend passes.
package backendtest

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/leasehold/leasehold/backends"
)

// Case gives the suite a working credential for the backend under test.
type Case struct {
	Backend backends.Backend
	// Spec is a valid credential; its secret values should be canaries.
	Spec backends.Spec
	// Scopes the backend can mint for Spec.
	Scopes []string
	// Dynamic backends mint a distinct upstream credential per lease and
	// return an artifact; static ones return the stored secret.
	Dynamic bool
	// Unreachable, for backends with an upstream, is Spec pointing at an
	// upstream that does not answer.
	Unreachable *backends.Spec
}

// Run runs the suite.
func Run(t *testing.T, c Case) {
	ctx := context.Background()
	t.Run("ValidateAcceptsTheSpec", func(t *testing.T) {
		require.NoError(t, c.Backend.Validate(c.Spec))
	})
	t.Run("ValidateErrorsWrapErrInvalidConfigAndHideSecrets", func(t *testing.T) {
		bad := backends.Spec{Name: c.Spec.Name, Config: map[string]string{"not_a_setting": "x"}}
		err := c.Backend.Validate(bad)
		require.ErrorIs(t, err, backends.ErrInvalidConfig)
		for _, v := range c.Spec.Secret {
			require.NotContains(t, err.Error(), string(v))
		}
	})
	t.Run("IssueRenewRevoke", func(t *testing.T) {
		exp := time.Now().Add(time.Minute)
		req := func(id string) backends.IssueRequest {
			return backends.IssueRequest{Spec: c.Spec, LeaseID: id, AgentID: "spiffe://t/a", TaskID: "t", Scopes: c.Scopes, ExpiresAt: exp}
		}
		idA, idB := "ls_"+strings.Repeat("a", 32), "ls_"+strings.Repeat("b", 32)
		a, err := c.Backend.Issue(ctx, req(idA))
		require.NoError(t, err)
		require.NotEmpty(t, a.Secret)
		require.True(t, a.ExpiresAt.IsZero() || !a.ExpiresAt.After(exp), "a backend may shorten a lease, never lengthen it")
		b, err := c.Backend.Issue(ctx, req(idB))
		require.NoError(t, err)
		if c.Dynamic {
			require.NotEmpty(t, a.Artifact)
			require.NotEqual(t, fmt.Sprint(a.Secret), fmt.Sprint(b.Secret), "each lease gets its own credential")
		} else {
			require.Empty(t, a.Artifact)
			require.Equal(t, len(c.Spec.Secret), len(a.Secret))
			for k, v := range c.Spec.Secret {
				require.Equal(t, v, a.Secret[k])
			}
			// The returned secret is a copy: clearing it must not touch the spec.
			for _, v := range a.Secret {
				clear(v)
			}
			for k, v := range c.Spec.Secret {
				require.NotEqual(t, strings.Repeat("\x00", len(v)), string(v), k)
			}
		}
		ref := backends.LeaseRef{Spec: c.Spec, LeaseID: idB, Artifact: b.Artifact}
		defer func() { _ = c.Backend.Revoke(ctx, backends.LeaseRef{Spec: c.Spec, LeaseID: idA, Artifact: a.Artifact}) }()
		got, err := c.Backend.Renew(ctx, ref, exp.Add(time.Minute))
		require.NoError(t, err)
		require.False(t, got.After(exp.Add(time.Minute)))
		require.NoError(t, c.Backend.Revoke(ctx, ref))
		require.NoError(t, c.Backend.Revoke(ctx, ref), "revoke is idempotent")
		if c.Dynamic {
			unknown := backends.LeaseRef{Spec: c.Spec, LeaseID: "ls_ffffffffffffffffffffffffffffffff", Artifact: []byte("lh_ffffffffffffffffffffffffffffffff")}
			require.NoError(t, c.Backend.Revoke(ctx, unknown), "revoking what never existed succeeds")
		}
	})
	if br, ok := c.Backend.(backends.BatchRevoker); ok {
		t.Run("RevokeBatch", func(t *testing.T) {
			var refs []backends.LeaseRef
			for i := range 5 {
				id := fmt.Sprintf("ls_%032x", 0xbb00+i)
				got, err := c.Backend.Issue(ctx, backends.IssueRequest{Spec: c.Spec, LeaseID: id, Scopes: c.Scopes, ExpiresAt: time.Now().Add(time.Minute)})
				require.NoError(t, err)
				refs = append(refs, backends.LeaseRef{Spec: c.Spec, LeaseID: id, Artifact: got.Artifact})
			}
			refs = append(refs, backends.LeaseRef{Spec: c.Spec, LeaseID: "ls_" + strings.Repeat("e", 32), Artifact: []byte("lh_" + strings.Repeat("e", 32))})
			for i, err := range br.RevokeBatch(ctx, refs) {
				require.NoError(t, err, "ref %d", i)
			}
			for i, err := range br.RevokeBatch(ctx, refs) {
				require.NoError(t, err, "again, ref %d: batches are idempotent too", i)
			}
		})
	}
	if c.Unreachable != nil {
		t.Run("UpstreamDownIsUnavailable", func(t *testing.T) {
			_, err := c.Backend.Issue(ctx, backends.IssueRequest{Spec: *c.Unreachable, LeaseID: "ls_00000000000000000000000000000001",
				Scopes: c.Scopes, ExpiresAt: time.Now().Add(time.Minute)})
			require.ErrorIs(t, err, backends.ErrUpstreamUnavailable)
			err = c.Backend.Revoke(ctx, backends.LeaseRef{Spec: *c.Unreachable, LeaseID: "ls_00000000000000000000000000000001", Artifact: []byte("lh_00000000000000000000000000000001")})
			require.ErrorIs(t, err, backends.ErrUpstreamUnavailable, "a revoke that could not run is retryable, not done")
			for _, v := range c.Unreachable.Secret {
				require.NotContains(t, err.Error(), string(v), "errors never carry the stored secret")
			}
		})
	}
}

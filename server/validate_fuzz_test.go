package server

import (
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc/codes"

	"github.com/leasehold/leasehold/store"
)

// Validators never panic, name the field when they refuse, and accept only
// what the rest of the broker can store and index safely.
func FuzzValidCredentialName(f *testing.F) {
	for _, s := range []string{"crm/salesforce", "db/analytics", "", "A", "a//b", "a/", "x\x00y", strings.Repeat("a", 129), "../etc"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		err := validCredentialName("credential", s)
		if err != nil {
			require.Equal(t, codes.InvalidArgument, codeOf(err))
			require.True(t, strings.HasPrefix(err.Error(), "credential: "), err.Error())
			return
		}
		require.LessOrEqual(t, len(s), maxNameLen)
		require.NotContains(t, s, "\x00")
		require.NotContains(t, s, "//")
		require.Equal(t, strings.ToLower(s), s)
	})
}

func FuzzValidScopesAndTaskID(f *testing.F) {
	f.Add("read", "ticket-4711")
	f.Add("https://www.googleapis.com/auth/gmail.readonly", "a:b/c")
	f.Add("", "")
	f.Add("a b", "\x00")
	f.Fuzz(func(t *testing.T, scope, task string) {
		if err := validScopes("scopes", []string{scope}, true); err == nil {
			require.NotContains(t, scope, "\x00")
			require.NotContains(t, scope, ",", "scopes are joined with commas in messages")
			require.LessOrEqual(t, len(scope), maxNameLen)
		} else {
			require.Contains(t, err.Error(), "scopes")
		}
		if err := validTaskID("task.id", task, true); err == nil {
			require.NotContains(t, task, "\x00")
			require.NotEmpty(t, task)
		} else {
			require.True(t, strings.HasPrefix(err.Error(), "task.id: "))
		}
	})
}

func FuzzLeaseAndGrantIDs(f *testing.F) {
	f.Add("ls_" + strings.Repeat("0", 32))
	f.Add("gr_" + strings.Repeat("f", 32))
	f.Add("ls_")
	f.Add("ls_" + strings.Repeat("G", 32))
	f.Fuzz(func(t *testing.T, s string) {
		if validLeaseID("lease_id", s) == nil {
			require.Len(t, s, 35)
			require.True(t, strings.HasPrefix(s, "ls_"))
		}
		if validGrantID("id", s) == nil {
			require.Len(t, s, 35)
			require.True(t, strings.HasPrefix(s, "gr_"))
		}
	})
}

func FuzzPageToken(f *testing.F) {
	f.Add("credentials", "crm/a", "")
	f.Add("audit", "42", "YXVkaXQ6NDI")
	f.Add("leases", "", "!!")
	f.Fuzz(func(t *testing.T, kind, key, tok string) {
		if key != "" && !strings.Contains(kind, ":") {
			got, err := parsePageToken("page_token", kind, pageToken(kind, key))
			if err == nil {
				require.Equal(t, key, got, "tokens round-trip")
			}
		}
		if _, err := parsePageToken("page_token", kind, tok); err != nil {
			require.True(t, strings.HasPrefix(err.Error(), "page_token: "))
		}
	})
}

// grantMatches agrees with the definition: equal, or below the prefix on a
// path-segment boundary, in the same trust domain.
func FuzzGrantMatches(f *testing.F) {
	f.Add("spiffe://td/agents", "spiffe://td/agents/a")
	f.Add("spiffe://td/agents/a", "spiffe://td/agents/ab")
	f.Add("spiffe://td", "spiffe://td/x")
	f.Add("spiffe://td/a", "spiffe://other/a/b")
	f.Fuzz(func(t *testing.T, prefix, id string) {
		p, err1 := spiffeid.FromString(prefix)
		i, err2 := spiffeid.FromString(id)
		if err1 != nil || err2 != nil {
			return
		}
		g := &store.Grant{SpiffeIDPrefix: p.String(), MaxTTL: time.Minute}
		want := p.TrustDomain() == i.TrustDomain() && (i.Path() == p.Path() || strings.HasPrefix(i.Path(), p.Path()+"/"))
		require.Equal(t, want, grantMatches(g, i))
		exact := &store.Grant{SpiffeID: p.String()}
		require.Equal(t, p == i, grantMatches(exact, i))
	})
}

// SPIFFE IDs from requests: refused with the field named, or accepted only
// in the broker's trust domain, in canonical form.
func FuzzValidSpiffeID(f *testing.F) {
	for _, s := range []string{"spiffe://leasehold.test/agents/a", "spiffe://other.test/a", "spiffe://leasehold.test",
		"spiffe://LEASEHOLD.test/a", "spiffe://leasehold.test/a/../b", "spiffe://leasehold.test/a?x=1", "http://leasehold.test/a",
		"spiffe://leasehold.test/a%2fb", "spiffe://leasehold.test//a", "", "spiffe://user@leasehold.test/a"} {
		f.Add(s)
	}
	td := spiffeid.RequireTrustDomainFromString("leasehold.test")
	f.Fuzz(func(t *testing.T, s string) {
		id, err := validSpiffeID("spiffe_id", s, td)
		if err != nil {
			require.Equal(t, codes.InvalidArgument, codeOf(err))
			require.True(t, strings.HasPrefix(err.Error(), "spiffe_id: "), err.Error())
			return
		}
		require.Equal(t, td, id.TrustDomain())
		require.Equal(t, s, id.String(), "only canonical IDs are accepted")
	})
}

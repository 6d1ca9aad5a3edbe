package server

import (
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/leasehold/leasehold/store"
)

// BenchmarkGrantMatch is the policy check every acquire runs against each
// grant of the credential: an exact ID, and a path prefix.
func BenchmarkGrantMatch(b *testing.B) {
	id := spiffeid.RequireFromString("spiffe://example.org/agents/mail/summarizer-17")
	exact := &store.Grant{SpiffeID: "spiffe://example.org/agents/mail/summarizer-17"}
	prefix := &store.Grant{SpiffeIDPrefix: "spiffe://example.org/agents/mail"}
	other := &store.Grant{SpiffeIDPrefix: "spiffe://example.org/agents/crm"}
	b.ReportAllocs()
	for b.Loop() {
		if !grantMatches(exact, id) || !grantMatches(prefix, id) || grantMatches(other, id) {
			b.Fatal("wrong match")
		}
	}
}

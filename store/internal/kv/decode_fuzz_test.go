package kv

import (
	"encoding/json"
	"testing"

	"github.com/leasehold/leasehold/store"
)

// Whatever bytes a record holds (a torn or tampered file), decoding returns
// a record or an error, never a panic, and a decoded record encodes again.
func FuzzDecodeRecords(f *testing.F) {
	for _, s := range []string{
		`{"id":"ls_01","agent_id":"spiffe://td/a","state":1,"expires_at":"2026-01-01T00:00:00Z"}`,
		`{"id":"gr_01","spiffe_id_prefix":"spiffe://td/agents","scopes":["read"],"max_ttl":60000000000,"chain":["spiffe://td/o"]}`,
		`{"seq":7,"event":"lease.acquire","decision":"allow","hash":"AAEC","delegation_chain":["x"]}`,
		`{"name":"crm/x","current_version":3}`, `{"seq":1,"hash":"AA==","time":"2026-01-01T00:00:00Z"}`,
		`null`, `[]`, `{"expires_at":"not a time"}`, `{"state":"x"}`, "\x00\xff", ``,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		check := func(v any, err error) {
			if err != nil {
				return
			}
			if _, err := json.Marshal(v); err != nil {
				t.Fatalf("decoded but cannot encode again: %v", err)
			}
		}
		check(decode[store.Lease](data, "lease"))
		check(decode[store.Grant](data, "grant"))
		check(decode[store.AuditRecord](data, "audit record"))
		check(decode[store.Credential](data, "credential"))
		check(decode[store.Agent](data, "agent"))
		check(decode[store.Revocation](data, "revocation"))
		check(decode[auditHead](data, "audit head"))
	})
}

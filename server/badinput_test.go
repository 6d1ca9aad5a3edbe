package server_test

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/timestamppb"

	leaseholdv1 "github.com/leasehold/leasehold/proto/leasehold/v1"
)

// Each bad request gets the right code, a message naming the field, and
// changes nothing in the store (not even the audit trail).
func TestBadInputIsRejectedAndChangesNothing(t *testing.T) {
	e := newEnv(t)
	e.putStatic("crm/salesforce", map[string]string{"api_key": "k"})
	g := e.grant("crm/salesforce", agent1ID, "read")
	held, err := e.agent1.AcquireLease(ctx, acquireReq("crm/salesforce", "t", "read"))
	require.NoError(t, err)
	_ = held

	long := strings.Repeat("a", 129)
	type call func(context.Context) error
	acq := func(r *leaseholdv1.AcquireLeaseRequest) call {
		return func(ctx context.Context) error { _, err := e.agent1.AcquireLease(ctx, r); return err }
	}
	grant := func(gr *leaseholdv1.Grant) call {
		return func(ctx context.Context) error {
			_, err := e.admin.CreateGrant(ctx, &leaseholdv1.CreateGrantRequest{Grant: gr})
			return err
		}
	}
	exact := func(id string) *leaseholdv1.Grant_SpiffeId { return &leaseholdv1.Grant_SpiffeId{SpiffeId: id} }
	cases := []struct {
		name string
		call call
		code codes.Code
		want string
	}{
		{"unknown credential", acq(acquireReq("crm/nope", "t", "read")), codes.NotFound, `credential "crm/nope" not found`},
		{"empty credential", acq(acquireReq("", "t", "read")), codes.InvalidArgument, "credential: is required"},
		{"oversized credential", acq(acquireReq(long, "t", "read")), codes.InvalidArgument, "credential: is longer than 128"},
		{"credential with bad characters", acq(acquireReq("CRM/Sales force", "t", "read")), codes.InvalidArgument, "credential:"},
		{"no scopes", acq(acquireReq("crm/salesforce", "t")), codes.InvalidArgument, "scopes: at least one"},
		{"empty scope", acq(acquireReq("crm/salesforce", "t", "")), codes.InvalidArgument, "scopes[0]: is empty"},
		{"duplicate scope", acq(acquireReq("crm/salesforce", "t", "read", "read")), codes.InvalidArgument, "scopes[1]"},
		{"no task", acq(&leaseholdv1.AcquireLeaseRequest{Credential: "crm/salesforce", Scopes: []string{"read"}}), codes.InvalidArgument, "task: is required"},
		{"empty task id", acq(acquireReq("crm/salesforce", "", "read")), codes.InvalidArgument, "task.id: is required"},
		{"zero ttl", acq(withTTL(acquireReq("crm/salesforce", "t", "read"), 0)), codes.InvalidArgument, "ttl: must be positive"},
		{"negative ttl", acq(withTTL(acquireReq("crm/salesforce", "t", "read"), -time.Second)), codes.InvalidArgument, "ttl: must be positive"},
		{"ttl above broker cap", acq(withTTL(acquireReq("crm/salesforce", "t", "read"), 48*time.Hour)), codes.InvalidArgument, "ttl: 48h0m0s is above the broker's limit"},
		{"malformed renew lease id", func(ctx context.Context) error {
			_, err := e.agent1.RenewLease(ctx, &leaseholdv1.RenewLeaseRequest{LeaseId: "../../etc"})
			return err
		}, codes.InvalidArgument, "lease_id:"},
		{"malformed release lease id", func(ctx context.Context) error {
			_, err := e.agent1.ReleaseLease(ctx, &leaseholdv1.ReleaseLeaseRequest{LeaseId: "ls_XYZ"})
			return err
		}, codes.InvalidArgument, "lease_id:"},
		{"unknown lease", func(ctx context.Context) error {
			_, err := e.agent1.ReleaseLease(ctx, &leaseholdv1.ReleaseLeaseRequest{LeaseId: "ls_" + strings.Repeat("0", 32)})
			return err
		}, codes.NotFound, "not found"},
		{"grant with invalid SPIFFE ID", grant(&leaseholdv1.Grant{Subject: exact("https://evil/x"), Credential: "crm/salesforce", Scopes: []string{"read"}}), codes.InvalidArgument, "grant.spiffe_id:"},
		{"grant in another trust domain", grant(&leaseholdv1.Grant{Subject: exact("spiffe://other.org/a"), Credential: "crm/salesforce", Scopes: []string{"read"}}), codes.InvalidArgument, "not in the broker's trust domain"},
		{"grant with bad prefix", grant(&leaseholdv1.Grant{Subject: &leaseholdv1.Grant_SpiffeIdPrefix{SpiffeIdPrefix: "spiffe://leasehold.test/agents/"}, Credential: "crm/salesforce", Scopes: []string{"read"}}), codes.InvalidArgument, "grant.spiffe_id_prefix:"},
		{"grant without subject", grant(&leaseholdv1.Grant{Credential: "crm/salesforce", Scopes: []string{"read"}}), codes.InvalidArgument, "grant.spiffe_id:"},
		{"grant without scopes", grant(&leaseholdv1.Grant{Subject: exact(agent2ID), Credential: "crm/salesforce"}), codes.InvalidArgument, "grant.scopes:"},
		{"grant for unknown credential", grant(&leaseholdv1.Grant{Subject: exact(agent2ID), Credential: "crm/nope", Scopes: []string{"read"}}), codes.NotFound, "grant.credential:"},
		{"grant with id set", grant(&leaseholdv1.Grant{Id: g.GetId(), Subject: exact(agent2ID), Credential: "crm/salesforce", Scopes: []string{"read"}}), codes.InvalidArgument, "grant.id:"},
		{"grant max_ttl above cap", grant(&leaseholdv1.Grant{Subject: exact(agent2ID), Credential: "crm/salesforce", Scopes: []string{"read"}, MaxTtl: durationpb.New(100 * time.Hour)}), codes.InvalidArgument, "grant.max_ttl:"},
		{"grant lifetime below ttl", grant(&leaseholdv1.Grant{Subject: exact(agent2ID), Credential: "crm/salesforce", Scopes: []string{"read"}, MaxTtl: durationpb.New(time.Hour), MaxLifetime: durationpb.New(time.Minute)}), codes.InvalidArgument, "grant.max_lifetime:"},
		{"grant nil", grant(nil), codes.InvalidArgument, "grant: is required"},
		{"put without name", func(ctx context.Context) error {
			_, err := e.admin.PutCredential(ctx, &leaseholdv1.PutCredentialRequest{Secret: map[string]string{"k": "v"}})
			return err
		}, codes.InvalidArgument, "name: is required"},
		{"put new without secret", func(ctx context.Context) error {
			_, err := e.admin.PutCredential(ctx, &leaseholdv1.PutCredentialRequest{Name: "new/one"})
			return err
		}, codes.InvalidArgument, "secret: is required"},
		{"put with unknown backend", func(ctx context.Context) error {
			_, err := e.admin.PutCredential(ctx, &leaseholdv1.PutCredentialRequest{Name: "new/one", Backend: "vault9", Secret: map[string]string{"k": "v"}})
			return err
		}, codes.InvalidArgument, "backend:"},
		{"put with bad secret key", func(ctx context.Context) error {
			_, err := e.admin.PutCredential(ctx, &leaseholdv1.PutCredentialRequest{Name: "new/one", Secret: map[string]string{"bad key": "v"}})
			return err
		}, codes.InvalidArgument, "secret:"},
		{"put static with config", func(ctx context.Context) error {
			_, err := e.admin.PutCredential(ctx, &leaseholdv1.PutCredentialRequest{Name: "new/one", Config: map[string]string{"host": "h"}, Secret: map[string]string{"k": "v"}})
			return err
		}, codes.InvalidArgument, "config.host"},
		{"put oversized secret value", func(ctx context.Context) error {
			_, err := e.admin.PutCredential(ctx, &leaseholdv1.PutCredentialRequest{Name: "new/one", Secret: map[string]string{"k": strings.Repeat("x", 65<<10)}})
			return err
		}, codes.InvalidArgument, "secret.k:"},
		{"revoke without reason", func(ctx context.Context) error {
			_, err := e.admin.RevokeAgent(ctx, &leaseholdv1.RevokeAgentRequest{SpiffeId: agent1ID})
			return err
		}, codes.InvalidArgument, "reason: is required"},
		{"revoke invalid id", func(ctx context.Context) error {
			_, err := e.admin.RevokeAgent(ctx, &leaseholdv1.RevokeAgentRequest{SpiffeId: "agent-1", Reason: "r"})
			return err
		}, codes.InvalidArgument, "spiffe_id:"},
		{"delete unknown grant", func(ctx context.Context) error {
			_, err := e.admin.DeleteGrant(ctx, &leaseholdv1.DeleteGrantRequest{Id: "gr_" + strings.Repeat("a", 32)})
			return err
		}, codes.NotFound, "not found"},
		{"delete malformed grant id", func(ctx context.Context) error {
			_, err := e.admin.DeleteGrant(ctx, &leaseholdv1.DeleteGrantRequest{Id: "1"})
			return err
		}, codes.InvalidArgument, "id:"},
		{"revoke unknown lease", func(ctx context.Context) error {
			_, err := e.admin.RevokeLease(ctx, &leaseholdv1.RevokeLeaseRequest{LeaseId: "ls_" + strings.Repeat("1", 32)})
			return err
		}, codes.NotFound, "not found"},
		{"query with bad page token", func(ctx context.Context) error {
			_, err := e.admin.QueryAudit(ctx, &leaseholdv1.QueryAuditRequest{PageToken: "!!!"})
			return err
		}, codes.InvalidArgument, "page_token:"},
		{"query with another list's token", func(ctx context.Context) error {
			_, err := e.admin.QueryAudit(ctx, &leaseholdv1.QueryAuditRequest{PageToken: "Z3JhbnRzOmdyXzE"})
			return err
		}, codes.InvalidArgument, "page_token:"},
		{"query with page size too big", func(ctx context.Context) error {
			_, err := e.admin.QueryAudit(ctx, &leaseholdv1.QueryAuditRequest{PageSize: 5000})
			return err
		}, codes.InvalidArgument, "page_size:"},
		{"query with reversed times", func(ctx context.Context) error {
			now := time.Now()
			_, err := e.admin.QueryAudit(ctx, &leaseholdv1.QueryAuditRequest{StartTime: timestamppb.New(now), EndTime: timestamppb.New(now.Add(-time.Hour))})
			return err
		}, codes.InvalidArgument, "end_time:"},
		{"list leases with bad agent", func(ctx context.Context) error {
			_, err := e.admin.ListLeases(ctx, &leaseholdv1.ListLeasesRequest{AgentId: "nope"})
			return err
		}, codes.InvalidArgument, "agent_id:"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			before := e.snapshot()
			requireCode(t, tc.call(ctx), tc.code, tc.want)
			require.Equal(t, before, e.snapshot(), "a rejected request changes nothing")
		})
	}
}

func TestPagination(t *testing.T) {
	e := newEnv(t)
	for _, n := range []string{"a/1", "a/2", "a/3", "a/4", "a/5"} {
		e.putStatic(n, map[string]string{"k": "v"})
	}
	var names []string
	tok := ""
	for {
		resp, err := e.admin.ListCredentials(ctx, &leaseholdv1.ListCredentialsRequest{PageSize: 2, PageToken: tok})
		require.NoError(t, err)
		require.LessOrEqual(t, len(resp.GetCredentials()), 2)
		for _, c := range resp.GetCredentials() {
			names = append(names, c.GetName())
		}
		if tok = resp.GetNextPageToken(); tok == "" {
			break
		}
	}
	require.Equal(t, []string{"a/1", "a/2", "a/3", "a/4", "a/5"}, names)

	var seqs []uint64
	tok = ""
	for {
		resp, err := e.admin.QueryAudit(ctx, &leaseholdv1.QueryAuditRequest{PageSize: 2, PageToken: tok, Credential: ""})
		require.NoError(t, err)
		for _, r := range resp.GetRecords() {
			seqs = append(seqs, r.GetSequence())
		}
		if tok = resp.GetNextPageToken(); tok == "" {
			break
		}
	}
	require.Equal(t, []uint64{5, 4, 3, 2, 1}, seqs)
}

// An agent refused an admin RPC is a decision: it is audited, and nothing
// else changes.
func TestRefusedAdminCallIsAudited(t *testing.T) {
	e := newEnv(t)
	before := len(e.audit(nil))
	_, err := leaseholdv1.NewAdminServiceClient(e.dial(agent1ID)).RevokeAgent(ctx, &leaseholdv1.RevokeAgentRequest{SpiffeId: agent2ID, Reason: "r"})
	requireCode(t, err, codes.PermissionDenied, "is not an admin")
	_, err = leaseholdv1.NewAdminServiceClient(e.dial(agent2ID)).ListCredentials(ctx, &leaseholdv1.ListCredentialsRequest{})
	requireCode(t, err, codes.PermissionDenied, "is not an admin")

	recs := e.audit(nil)
	require.Len(t, recs, before+2)
	require.Equal(t, leaseholdv1.AuditEvent_AUDIT_EVENT_ACCESS_DENY, recs[0].GetEvent())
	require.Equal(t, agent2ID, recs[0].GetActor())
	require.Contains(t, recs[0].GetReason(), "/leasehold.v1.AdminService/ListCredentials")
	require.Equal(t, leaseholdv1.Decision_DECISION_DENY, recs[1].GetDecision())
	require.Contains(t, recs[1].GetReason(), "RevokeAgent")

	who, err := e.agent2.WhoAmI(ctx, &leaseholdv1.WhoAmIRequest{})
	require.NoError(t, err)
	require.False(t, who.GetRevoked(), "the refused RevokeAgent did nothing")
}

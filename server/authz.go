package server

import (
	"context"

	"google.golang.org/grpc/codes"

	"github.com/leasehold/leasehold/identity"
	"github.com/leasehold/leasehold/store"
)

// access says who may call an RPC.
type access int

const (
	// accessPeer: any verified SVID from the broker's trust domain.
	accessPeer access = iota + 1
	// accessAdmin: only the configured admin SPIFFE IDs.
	accessAdmin
)

// methodAccess is the deny-by-default authorization table, keyed by full
// method name. An RPC with no entry is refused; TestEveryMethodHasAnEntry
// fails when a registered method is missing here.
var methodAccess = map[string]access{
	"/leasehold.v1.BrokerService/AcquireLease": accessPeer,
	"/leasehold.v1.BrokerService/RenewLease":   accessPeer,
	"/leasehold.v1.BrokerService/ReleaseLease": accessPeer,
	"/leasehold.v1.BrokerService/WhoAmI":       accessPeer,
	"/leasehold.v1.BrokerService/EndTask":      accessPeer,
	"/leasehold.v1.BrokerService/WatchLeases":  accessPeer,
	// Delegation checks inside: only from the caller's own active lease,
	// and only grants in the caller's chain can be revoked.
	"/leasehold.v1.BrokerService/DelegateGrant":    accessPeer,
	"/leasehold.v1.BrokerService/RevokeDelegation": accessPeer,

	"/leasehold.v1.AdminService/PutCredential":      accessAdmin,
	"/leasehold.v1.AdminService/GetCredential":      accessAdmin,
	"/leasehold.v1.AdminService/ListCredentials":    accessAdmin,
	"/leasehold.v1.AdminService/DeleteCredential":   accessAdmin,
	"/leasehold.v1.AdminService/RotateCredential":   accessAdmin,
	"/leasehold.v1.AdminService/CreateGrant":        accessAdmin,
	"/leasehold.v1.AdminService/ListGrants":         accessAdmin,
	"/leasehold.v1.AdminService/DeleteGrant":        accessAdmin,
	"/leasehold.v1.AdminService/RevokeAgent":        accessAdmin,
	"/leasehold.v1.AdminService/ReinstateAgent":     accessAdmin,
	"/leasehold.v1.AdminService/ListAgents":         accessAdmin,
	"/leasehold.v1.AdminService/ListLeases":         accessAdmin,
	"/leasehold.v1.AdminService/RevokeLease":        accessAdmin,
	"/leasehold.v1.AdminService/RevokeTask":         accessAdmin,
	"/leasehold.v1.AdminService/QueryAudit":         accessAdmin,
	"/leasehold.v1.AdminService/WatchAudit":         accessAdmin,
	"/leasehold.v1.AdminService/GetAuditCheckpoint": accessAdmin,
	"/leasehold.v1.AdminService/VerifyAudit":        accessAdmin,
	"/leasehold.v1.AdminService/ExplainAccess":      accessAdmin,

	"/grpc.health.v1.Health/Check": accessPeer,
	"/grpc.health.v1.Health/Watch": accessPeer,
	"/grpc.health.v1.Health/List":  accessPeer,

	"/grpc.reflection.v1.ServerReflection/ServerReflectionInfo":      accessPeer,
	"/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": accessPeer,
}

// authorize checks the caller against methodAccess and returns a context
// carrying the caller's SPIFFE ID.
func (s *Server) authorize(ctx context.Context, fullMethod string) (context.Context, error) {
	id, ok := identity.PeerID(ctx)
	if !ok {
		return ctx, newAPIError(codes.Unauthenticated, "no SPIFFE ID: the broker requires an mTLS client SVID")
	}
	if id.TrustDomain() != s.cfg.TrustDomain {
		return ctx, newAPIError(codes.Unauthenticated, "%s is not in trust domain %q", id, s.cfg.TrustDomain.Name())
	}
	var denial error
	switch methodAccess[fullMethod] {
	case accessPeer:
	case accessAdmin:
		if !s.cfg.Admins.IsAdmin(id) {
			denial = errDenied("%s is not an admin; %s is an admin RPC", id, fullMethod)
			break
		}
		// A configured admin that has been revoked (its SVID stolen, say)
		// is refused until another admin reinstates it.
		err := s.store.View(ctx, func(tx store.ReadTx) error {
			denial = checkAgentActive(tx, id.String())
			return nil
		})
		if err != nil {
			return ctx, err
		}
	default:
		denial = errDenied("%s is not in the broker's authorization table", fullMethod)
	}
	if denial != nil {
		// Refusals are decisions: they go on the audit trail (or, if it
		// cannot be written, the answer is Unavailable).
		return ctx, s.deny(ctx, &store.AuditRecord{Event: store.EventAccessDeny, Actor: id.String(), AgentID: id.String()}, denial)
	}
	return withCaller(ctx, id), nil
}

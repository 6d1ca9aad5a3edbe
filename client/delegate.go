package client

import (
	"context"
	"time"

	"go.opentelemetry.io/otel/attribute"
	"google.golang.org/protobuf/types/known/durationpb"

	leaseholdv1 "github.com/leasehold/leasehold/proto/leasehold/v1"
)

// Delegation describes part of the caller's access handed to a sub-agent.
type Delegation struct {
	// Credential and TaskID: what the caller could acquire, and its task.
	Credential string
	TaskID     string
	// Subtask: the delegated grant is bound to TaskID + "/" + Subtask.
	Subtask string
	// To is the sub-agent's exact SPIFFE ID.
	To string
	// Scopes: a subset of the caller's grant's.
	Scopes []string
	// TTL is how long the delegated grant lasts (required).
	TTL time.Duration
	// MaxTTL caps each lease under it (default: the caller's grant's).
	MaxTTL time.Duration
}

// Delegate creates a grant for another agent out of the caller's own, for
// a subtask. The caller needs no lease and sees no secret to do it; it
// cannot use the grant it creates. It returns the delegated grant (its id
// is what RevokeDelegation takes).
func (c *Client) Delegate(ctx context.Context, d Delegation) (_ *leaseholdv1.Grant, err error) {
	ctx, end := c.span(ctx, "leasehold.client.Delegate", attribute.String("leasehold.credential", d.Credential),
		attribute.String("leasehold.task.id", d.TaskID), attribute.String("leasehold.delegate", d.To))
	defer func() { end(err) }()
	req := &leaseholdv1.DelegateGrantRequest{Credential: d.Credential, TaskId: d.TaskID, Subtask: d.Subtask,
		DelegateSpiffeId: d.To, Scopes: d.Scopes, Ttl: durationpb.New(d.TTL)}
	if d.MaxTTL != 0 {
		req.MaxTtl = durationpb.New(d.MaxTTL)
	}
	resp, err := c.broker.DelegateGrant(ctx, req)
	if err != nil {
		return nil, wrap(err)
	}
	return resp.GetGrant(), nil
}

// RevokeDelegation deletes a grant the caller delegated, everything
// delegated below it, and their leases.
func (c *Client) RevokeDelegation(ctx context.Context, grantID, reason string) (err error) {
	ctx, end := c.span(ctx, "leasehold.client.RevokeDelegation", attribute.String("leasehold.grant.id", grantID))
	defer func() { end(err) }()
	_, err = c.broker.RevokeDelegation(ctx, &leaseholdv1.RevokeDelegationRequest{GrantId: grantID, Reason: reason})
	return wrap(err)
}

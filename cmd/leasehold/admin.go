package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/timestamppb"

	leaseholdv1 "github.com/leasehold/leasehold/proto/leasehold/v1"
)

func parseKV(field string, items []string) (map[string]string, error) {
	if len(items) == 0 {
		return nil, nil
	}
	m := make(map[string]string, len(items))
	for _, it := range items {
		k, v, ok := strings.Cut(it, "=")
		if !ok || k == "" {
			return nil, usageErr("%s wants key=value, got %q", field, strings.SplitN(it, "=", 2)[0])
		}
		m[k] = v
	}
	return m, nil
}

func cmdAdmin(verb string, args []string, conn *connFlags, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet(verb, flag.ContinueOnError)
	fs.SetOutput(stderr)
	var sets, setFiles, configs multiFlag
	fs.Var(&sets, "set", "secret field key=value (repeatable; prefer --set-file)")
	fs.Var(&setFiles, "set-file", "secret field key=PATH, value read from the file (repeatable)")
	fs.Var(&configs, "config", "backend config key=value (repeatable)")
	backend := fs.String("backend", "", "backend name (default static)")
	rotateEvery := fs.Duration("rotate-every", 0, "credential put: scheduled two-phase rotation interval (exec backend)")
	rotationOverlap := fs.Duration("rotation-overlap", 0, "credential put: how long the previous version stays valid (default 5m)")
	description := fs.String("description", "", "description")
	credential := fs.String("credential", "", "credential name")
	spiffeID := fs.String("spiffe-id", "", "exact SPIFFE ID")
	prefix := fs.String("spiffe-id-prefix", "", "SPIFFE ID path prefix")
	scopes := fs.String("scopes", "", "comma-separated scopes")
	maxTTL := fs.Duration("max-ttl", 0, "grant: longest lease or renewal step")
	maxLifetime := fs.Duration("max-lifetime", 0, "grant: longest total lease life")
	delegation := fs.Int("max-delegation-depth", 0, "grant: levels of delegation allowed below it (0: none)")
	expires := fs.Duration("expires-in", 0, "grant: it allows nothing after this long")
	expected := fs.String("expected-credentials", "", "grant: comma-separated credentials a task under it may also use (anomaly guard)")
	suspend := fs.Bool("suspend-on-anomaly", false, "grant: an acquire outside --expected-credentials suspends the agent")
	reason := fs.String("reason", "", "reason, recorded in the audit trail")
	revoked := fs.Bool("revoked", false, "only revoked agents")
	agent := fs.String("agent", "", "agent SPIFFE ID")
	task := fs.String("task", "", "task id")
	active := fs.Bool("active", false, "only active leases")
	limit := fs.Int("limit", 50, "page size")
	pageToken := fs.String("page-token", "", "page token from a previous call")
	pos, err := parseInterleaved(fs, args)
	if err != nil {
		return err
	}
	one := func() (string, error) {
		if len(pos) != 1 {
			return "", usageErr("%s takes exactly one argument", verb)
		}
		return pos[0], nil
	}
	dur := func(d time.Duration) *durationpb.Duration {
		if d == 0 {
			return nil
		}
		return durationpb.New(d)
	}

	ctx, cancel := callContext(context.Background(), conn.timeout)
	defer cancel()
	cc, closeConn, err := conn.dial(ctx)
	if err != nil {
		return err
	}
	defer closeConn()
	admin := leaseholdv1.NewAdminServiceClient(cc)
	switch verb {
	case "credential put":
		name, err := one()
		if err != nil {
			return err
		}
		secret, err := parseKV("--set", sets)
		if err != nil {
			return err
		}
		files, err := parseKV("--set-file", setFiles)
		if err != nil {
			return err
		}
		for k, path := range files {
			data, err := os.ReadFile(path)
			if err != nil {
				return fmt.Errorf("--set-file %s: %w", k, err)
			}
			if secret == nil {
				secret = map[string]string{}
			}
			secret[k] = strings.TrimRight(string(data), "\r\n")
		}
		cfg, err := parseKV("--config", configs)
		if err != nil {
			return err
		}
		req := &leaseholdv1.PutCredentialRequest{Name: name, Backend: *backend, Description: *description, Config: cfg, Secret: secret}
		if *rotateEvery != 0 || *rotationOverlap != 0 {
			req.Rotation = &leaseholdv1.RotationPolicy{Interval: durationpb.New(*rotateEvery)}
			if *rotationOverlap != 0 {
				req.Rotation.Overlap = durationpb.New(*rotationOverlap)
			}
		}
		r, err := admin.PutCredential(ctx, req)
		return emit(stdout, r, err)
	case "credential get":
		name, err := one()
		if err != nil {
			return err
		}
		r, err := admin.GetCredential(ctx, &leaseholdv1.GetCredentialRequest{Name: name})
		return emit(stdout, r, err)
	case "credential list":
		r, err := admin.ListCredentials(ctx, &leaseholdv1.ListCredentialsRequest{PageSize: int32(*limit), PageToken: *pageToken})
		return emit(stdout, r, err)
	case "credential rotate":
		name, err := one()
		if err != nil {
			return err
		}
		r, err := admin.RotateCredential(ctx, &leaseholdv1.RotateCredentialRequest{Name: name})
		return emit(stdout, r, err)
	case "credential delete":
		name, err := one()
		if err != nil {
			return err
		}
		r, err := admin.DeleteCredential(ctx, &leaseholdv1.DeleteCredentialRequest{Name: name})
		return emit(stdout, r, err)
	case "grant create":
		g := &leaseholdv1.Grant{Credential: *credential, Scopes: splitList(*scopes), MaxTtl: dur(*maxTTL),
			MaxLifetime: dur(*maxLifetime), Description: *description, MaxDelegationDepth: int32(*delegation), TaskId: *task,
			ExpectedCredentials: splitList(*expected), SuspendOnAnomaly: *suspend}
		if *expires != 0 {
			g.ExpiresAt = timestamppb.New(time.Now().Add(*expires))
		}
		switch {
		case *spiffeID != "" && *prefix != "":
			return usageErr("use --spiffe-id or --spiffe-id-prefix, not both")
		case *spiffeID != "":
			g.Subject = &leaseholdv1.Grant_SpiffeId{SpiffeId: *spiffeID}
		case *prefix != "":
			g.Subject = &leaseholdv1.Grant_SpiffeIdPrefix{SpiffeIdPrefix: *prefix}
		}
		r, err := admin.CreateGrant(ctx, &leaseholdv1.CreateGrantRequest{Grant: g})
		return emit(stdout, r, err)
	case "grant list":
		r, err := admin.ListGrants(ctx, &leaseholdv1.ListGrantsRequest{Credential: *credential, PageSize: int32(*limit), PageToken: *pageToken})
		return emit(stdout, r, err)
	case "grant delete":
		id, err := one()
		if err != nil {
			return err
		}
		r, err := admin.DeleteGrant(ctx, &leaseholdv1.DeleteGrantRequest{Id: id})
		return emit(stdout, r, err)
	case "agent revoke":
		id, err := one()
		if err != nil {
			return err
		}
		r, err := admin.RevokeAgent(ctx, &leaseholdv1.RevokeAgentRequest{SpiffeId: id, Reason: *reason})
		return emit(stdout, r, err)
	case "agent reinstate":
		id, err := one()
		if err != nil {
			return err
		}
		r, err := admin.ReinstateAgent(ctx, &leaseholdv1.ReinstateAgentRequest{SpiffeId: id})
		return emit(stdout, r, err)
	case "agent list":
		r, err := admin.ListAgents(ctx, &leaseholdv1.ListAgentsRequest{RevokedOnly: *revoked, PageSize: int32(*limit), PageToken: *pageToken})
		return emit(stdout, r, err)
	case "lease list":
		r, err := admin.ListLeases(ctx, &leaseholdv1.ListLeasesRequest{AgentId: *agent, TaskId: *task, ActiveOnly: *active, PageSize: int32(*limit), PageToken: *pageToken})
		return emit(stdout, r, err)
	case "task revoke":
		id, err := one()
		if err != nil {
			return err
		}
		r, err := admin.RevokeTask(ctx, &leaseholdv1.RevokeTaskRequest{TaskId: id, Reason: *reason})
		return emit(stdout, r, err)
	case "task end":
		id, err := one()
		if err != nil {
			return err
		}
		r, err := leaseholdv1.NewBrokerServiceClient(cc).EndTask(ctx, &leaseholdv1.EndTaskRequest{TaskId: id})
		return emit(stdout, r, err)
	case "lease revoke":
		id, err := one()
		if err != nil {
			return err
		}
		r, err := admin.RevokeLease(ctx, &leaseholdv1.RevokeLeaseRequest{LeaseId: id, Reason: *reason})
		return emit(stdout, r, err)
	}
	return usageErr("unknown command %q", verb)
}

// emit prints a response as JSON, or the RPC error as "Code: message".
func emit(w io.Writer, m proto.Message, err error) error {
	if err != nil {
		return rpcErr(err)
	}
	return printProto(w, m)
}

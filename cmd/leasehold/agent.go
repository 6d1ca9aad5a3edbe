package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"regexp"
	"slices"
	"strings"
	"time"

	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"

	leaseholdv1 "github.com/leasehold/leasehold/proto/leasehold/v1"
)

func cmdAgent(verb string, args []string, conn *connFlags, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet(verb, flag.ContinueOnError)
	fs.SetOutput(stderr)
	scopes := fs.String("scopes", "", "comma-separated scopes")
	task := fs.String("task", "", "task id")
	purpose := fs.String("purpose", "", "why the task needs the credential")
	ttl := fs.Duration("ttl", 0, "lease length (default: broker default)")
	format := fs.String("format", "json", "json or env")
	to := fs.String("to", "", "delegate: the sub-agent's SPIFFE ID")
	subtask := fs.String("subtask", "", "delegate: the subtask the delegated grant is bound to")
	maxTTL := fs.Duration("max-ttl", 0, "delegate: longest lease under the delegated grant")
	reason := fs.String("reason", "", "undelegate: why (recorded in the audit trail)")
	pos, err := parseInterleaved(fs, args)
	if err != nil {
		return err
	}
	ctx, cancel := callContext(context.Background(), conn.timeout)
	defer cancel()
	cc, closeConn, err := conn.dial(ctx)
	if err != nil {
		return err
	}
	defer closeConn()
	broker := leaseholdv1.NewBrokerServiceClient(cc)
	var d *durationpb.Duration
	if *ttl != 0 {
		d = durationpb.New(*ttl)
	}
	switch verb {
	case "acquire":
		if len(pos) != 1 {
			return usageErr("acquire takes one credential name")
		}
		if *format != "json" && *format != "env" {
			return usageErr("--format must be json or env")
		}
		resp, err := broker.AcquireLease(ctx, &leaseholdv1.AcquireLeaseRequest{
			Credential: pos[0], Scopes: splitList(*scopes), Ttl: d,
			Task: &leaseholdv1.Task{Id: *task, Purpose: *purpose},
		})
		if err != nil {
			return rpcErr(err)
		}
		if *format == "env" {
			return printEnv(stdout, resp)
		}
		return printProto(stdout, resp)
	case "renew":
		if len(pos) != 1 {
			return usageErr("renew takes one lease id")
		}
		resp, err := broker.RenewLease(ctx, &leaseholdv1.RenewLeaseRequest{LeaseId: pos[0], Ttl: d})
		if err != nil {
			return rpcErr(err)
		}
		return printProto(stdout, resp)
	case "release":
		if len(pos) != 1 {
			return usageErr("release takes one lease id")
		}
		resp, err := broker.ReleaseLease(ctx, &leaseholdv1.ReleaseLeaseRequest{LeaseId: pos[0]})
		if err != nil {
			return rpcErr(err)
		}
		return printProto(stdout, resp)
	case "delegate":
		if len(pos) != 1 {
			return usageErr("delegate takes one credential name")
		}
		req := &leaseholdv1.DelegateGrantRequest{Credential: pos[0], TaskId: *task, Subtask: *subtask,
			DelegateSpiffeId: *to, Scopes: splitList(*scopes), Ttl: d}
		if *maxTTL != 0 {
			req.MaxTtl = durationpb.New(*maxTTL)
		}
		resp, err := broker.DelegateGrant(ctx, req)
		if err != nil {
			return rpcErr(err)
		}
		return printProto(stdout, resp)
	case "undelegate":
		if len(pos) != 1 {
			return usageErr("undelegate takes one grant id")
		}
		resp, err := broker.RevokeDelegation(ctx, &leaseholdv1.RevokeDelegationRequest{GrantId: pos[0], Reason: *reason})
		if err != nil {
			return rpcErr(err)
		}
		return printProto(stdout, resp)
	case "whoami":
		resp, err := broker.WhoAmI(ctx, &leaseholdv1.WhoAmIRequest{})
		if err != nil {
			return rpcErr(err)
		}
		return printProto(stdout, resp)
	case "health":
		resp, err := healthpb.NewHealthClient(cc).Check(ctx, &healthpb.HealthCheckRequest{})
		if err != nil {
			return rpcErr(err)
		}
		fmt.Fprintln(stdout, resp.GetStatus())
		if resp.GetStatus() != healthpb.HealthCheckResponse_SERVING {
			return errors.New("broker is not serving")
		}
		return nil
	}
	return usageErr("unknown command %q", verb)
}

var envKeyRE = regexp.MustCompile(`[^A-Z0-9_]`)

// printEnv prints the lease as shell-quoted KEY=value lines: the lease id
// and expiry, then each secret field upper-cased.
func printEnv(w io.Writer, resp *leaseholdv1.AcquireLeaseResponse) error {
	fmt.Fprintf(w, "LEASEHOLD_LEASE_ID=%s\n", shellQuote(resp.GetLease().GetId()))
	fmt.Fprintf(w, "LEASEHOLD_LEASE_EXPIRES_AT=%s\n", shellQuote(resp.GetLease().GetExpiresAt().AsTime().Format(time.RFC3339)))
	keys := make([]string, 0, len(resp.GetSecret()))
	for k := range resp.GetSecret() {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	for _, k := range keys {
		name := envKeyRE.ReplaceAllString(strings.ToUpper(k), "_")
		fmt.Fprintf(w, "%s=%s\n", name, shellQuote(resp.GetSecret()[k]))
	}
	return nil
}

func shellQuote(s string) string { return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'" }

// rpcErr renders a gRPC error as "Code: message".
func rpcErr(err error) error {
	if st, ok := status.FromError(err); ok {
		return fmt.Errorf("%s: %s", st.Code(), st.Message())
	}
	return err
}

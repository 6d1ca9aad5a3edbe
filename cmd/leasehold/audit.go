package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"slices"
	"sort"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/timestamppb"

	leaseholdv1 "github.com/leasehold/leasehold/proto/leasehold/v1"
)

// cmdAudit runs the audit verbs, explain and report.
func cmdAudit(verb string, args []string, conn *connFlags, stdout, stderr io.Writer) error {
	sub := ""
	if verb != "explain" {
		if len(args) == 0 {
			return usageErr("%s needs a sub-command", verb)
		}
		sub, args = args[0], args[1:]
	}
	fs := flag.NewFlagSet(strings.TrimSpace(verb+" "+sub), flag.ContinueOnError)
	fs.SetOutput(stderr)
	agent := fs.String("agent", "", "agent SPIFFE ID")
	credential := fs.String("credential", "", "credential name")
	task := fs.String("task", "", "task id")
	lease := fs.String("lease", "", "lease id")
	traceID := fs.String("trace", "", "trace id (32 hex digits)")
	decision := fs.String("decision", "", "allow or deny")
	since := fs.Duration("since", 0, "only records newer than this (e.g. 24h)")
	until := fs.Duration("until", 0, "only records older than this")
	oldest := fs.Bool("oldest-first", false, "oldest records first")
	limit := fs.Int("limit", 50, "page size")
	pageToken := fs.String("page-token", "", "page token from a previous call")
	format := fs.String("format", "table", "table or json")
	after := fs.Uint64("after", 0, "watch: records after this sequence")
	fromNow := fs.Bool("from-now", false, "watch: only records written from now on")
	from := fs.Uint64("from", 0, "verify: first sequence")
	to := fs.Uint64("to", 0, "verify: last sequence")
	var checkpoints multiFlag
	fs.Var(&checkpoints, "checkpoint", "verify: a file written by 'audit checkpoint' (repeatable)")
	scopes := fs.String("scopes", "", "explain: comma-separated scopes")
	ttl := fs.Duration("ttl", 0, "explain: lease length")
	asJSON := fs.Bool("json", false, "report: JSON instead of tables")
	pos, err := parseInterleaved(fs, args)
	if err != nil {
		return err
	}
	dec := leaseholdv1.Decision_DECISION_UNSPECIFIED
	switch *decision {
	case "":
	case "allow":
		dec = leaseholdv1.Decision_DECISION_ALLOW
	case "deny":
		dec = leaseholdv1.Decision_DECISION_DENY
	default:
		return usageErr("--decision must be allow or deny")
	}
	if *format != "table" && *format != "json" {
		return usageErr("--format must be table or json")
	}

	ctx, cancel := callContext(context.Background(), conn.timeout)
	if verb == "audit" && sub == "watch" {
		ctx, cancel = signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	}
	defer cancel()
	cc, closeConn, err := conn.dial(ctx)
	if err != nil {
		return err
	}
	defer closeConn()
	admin := leaseholdv1.NewAdminServiceClient(cc)

	switch verb + " " + sub {
	case "audit query":
		q := &leaseholdv1.QueryAuditRequest{AgentId: *agent, Credential: *credential, TaskId: *task, LeaseId: *lease, TraceId: *traceID,
			Decision: dec, PageSize: int32(*limit), PageToken: *pageToken, OldestFirst: *oldest}
		if *since > 0 {
			q.StartTime = timestamppb.New(time.Now().Add(-*since))
		}
		if *until > 0 {
			q.EndTime = timestamppb.New(time.Now().Add(-*until))
		}
		r, err := admin.QueryAudit(ctx, q)
		if err != nil || *format == "json" {
			return emit(stdout, r, err)
		}
		printAuditTable(stdout, r.GetRecords(), true)
		if r.GetNextPageToken() != "" {
			fmt.Fprintf(stdout, "(more: --page-token %s)\n", r.GetNextPageToken())
		}
		return nil
	case "audit watch":
		stream, err := admin.WatchAudit(ctx, &leaseholdv1.WatchAuditRequest{AgentId: *agent, Credential: *credential,
			TaskId: *task, LeaseId: *lease, TraceId: *traceID, Decision: dec, AfterSequence: *after, FromNow: *fromNow})
		if err != nil {
			return rpcErr(err)
		}
		header := true
		for {
			msg, err := stream.Recv()
			if err != nil {
				if ctx.Err() != nil || status.Code(err) == codes.Canceled {
					return nil
				}
				return rpcErr(err)
			}
			if *format == "json" {
				b, err := protojson.Marshal(msg.GetRecord())
				if err != nil {
					return err
				}
				fmt.Fprintln(stdout, string(b))
				continue
			}
			printAuditTable(stdout, []*leaseholdv1.AuditRecord{msg.GetRecord()}, header)
			header = false
		}
	case "audit checkpoint":
		r, err := admin.GetAuditCheckpoint(ctx, &leaseholdv1.GetAuditCheckpointRequest{})
		if err != nil {
			return rpcErr(err)
		}
		return printProto(stdout, r.GetCheckpoint())
	case "audit verify":
		req := &leaseholdv1.VerifyAuditRequest{FromSequence: *from, ToSequence: *to}
		for _, path := range checkpoints {
			data, err := os.ReadFile(path)
			if err != nil {
				return fmt.Errorf("--checkpoint: %w", err)
			}
			cp := &leaseholdv1.AuditCheckpoint{}
			if err := protojson.Unmarshal(data, cp); err != nil {
				return fmt.Errorf("--checkpoint %s: %w", path, err)
			}
			req.Checkpoints = append(req.Checkpoints, cp)
		}
		r, err := admin.VerifyAudit(ctx, req)
		if err != nil {
			return rpcErr(err)
		}
		if *format == "json" {
			if err := printProto(stdout, r); err != nil {
				return err
			}
		} else if r.GetOk() {
			fmt.Fprintf(stdout, "audit chain OK: %d records checked, %d checkpoints matched; head %d %s\n",
				r.GetRecordsChecked(), len(req.GetCheckpoints()), r.GetHead().GetSequence(), r.GetHead().GetHash())
		}
		if !r.GetOk() {
			return fmt.Errorf("audit chain BROKEN at record %d: %s", r.GetFirstBrokenSequence(), r.GetProblem())
		}
		return nil
	case "explain ":
		if len(pos) != 2 {
			return usageErr("explain takes a SPIFFE ID and a credential")
		}
		req := &leaseholdv1.ExplainAccessRequest{AgentId: pos[0], Credential: pos[1], Scopes: splitList(*scopes)}
		if *ttl > 0 {
			req.Ttl = durationpb.New(*ttl)
		}
		r, err := admin.ExplainAccess(ctx, req)
		if err != nil || *format == "json" {
			return emit(stdout, r, err)
		}
		verdict := "DENIED"
		if r.GetAllowed() {
			verdict = "ALLOWED"
		}
		fmt.Fprintf(stdout, "%s (%s): %s\n", verdict, r.GetCode(), r.GetReason())
		if len(r.GetMatchingGrants()) > 0 {
			fmt.Fprintln(stdout, "\nGrants on this credential that cover the agent:")
			printGrants(stdout, r.GetMatchingGrants())
		}
		return nil
	case "report agent", "report credential":
		if len(pos) != 1 {
			return usageErr("report %s takes one argument", sub)
		}
		rep, err := buildReport(ctx, admin, sub, pos[0], *since)
		if err != nil {
			return err
		}
		if *asJSON {
			enc := json.NewEncoder(stdout)
			enc.SetIndent("", "  ")
			return enc.Encode(rep)
		}
		rep.print(stdout)
		return nil
	}
	return usageErr("unknown command %q", strings.TrimSpace(verb+" "+sub))
}

func printAuditTable(w io.Writer, recs []*leaseholdv1.AuditRecord, header bool) {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	if header {
		fmt.Fprintln(tw, "SEQ\tTIME\tEVENT\tDECISION\tACTOR\tAGENT\tCREDENTIAL\tTASK\tLEASE\tDELEGATED BY\tREASON")
	}
	for _, rec := range recs {
		event := strings.ToLower(strings.TrimPrefix(rec.GetEvent().String(), "AUDIT_EVENT_"))
		dec := strings.ToLower(strings.TrimPrefix(rec.GetDecision().String(), "DECISION_"))
		fmt.Fprintf(tw, "%d\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", rec.GetSequence(),
			rec.GetTime().AsTime().Local().Format("15:04:05.000"), event, dec, dash(rec.GetActor()), dash(rec.GetAgentId()),
			dash(rec.GetCredential()), dash(rec.GetTaskId()), dash(rec.GetLeaseId()),
			dash(strings.Join(rec.GetDelegationChain(), " > ")), dash(rec.GetReason()))
	}
	tw.Flush()
}

func printGrants(w io.Writer, grants []*leaseholdv1.Grant) {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "GRANT\tSUBJECT\tCREDENTIAL\tSCOPES\tMAX_TTL\tMAX_LIFETIME")
	for _, g := range grants {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%v\t%v\n", g.GetId(), grantSubject(g), g.GetCredential(),
			strings.Join(g.GetScopes(), ","), g.GetMaxTtl().AsDuration(), g.GetMaxLifetime().AsDuration())
	}
	tw.Flush()
}

func grantSubject(g *leaseholdv1.Grant) string {
	if p := g.GetSpiffeIdPrefix(); p != "" {
		return p + "/*"
	}
	return g.GetSpiffeId()
}

func dash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

// report answers, for one agent or one credential, who may access what
// (grants) and who did (the audit trail since a time).
type report struct {
	Kind    string      `json:"kind"`
	Subject string      `json:"subject"`
	Revoked bool        `json:"revoked,omitempty"`
	Since   *time.Time  `json:"since,omitempty"`
	Grants  []grantRow  `json:"grants"`
	Access  []accessRow `json:"access"`
	Records int         `json:"records_examined"`
	Capped  bool        `json:"capped,omitempty"`
}

type grantRow struct {
	ID          string   `json:"id"`
	Subject     string   `json:"subject"`
	Credential  string   `json:"credential"`
	Scopes      []string `json:"scopes"`
	MaxTTL      string   `json:"max_ttl"`
	MaxLifetime string   `json:"max_lifetime"`
}

// accessRow sums lease events for one credential (agent report) or one
// agent (credential report).
type accessRow struct {
	Key      string    `json:"key"`
	Acquired int       `json:"acquired"`
	Denied   int       `json:"denied"`
	Renewed  int       `json:"renewed"`
	Released int       `json:"released"`
	Expired  int       `json:"expired"`
	Revoked  int       `json:"revoked"`
	Tasks    []string  `json:"tasks"`
	Last     time.Time `json:"last"`
}

const reportRecordCap = 100_000

func buildReport(ctx context.Context, admin leaseholdv1.AdminServiceClient, kind, subject string, since time.Duration) (*report, error) {
	rep := &report{Kind: kind, Subject: subject, Grants: []grantRow{}, Access: []accessRow{}}
	grantReq := &leaseholdv1.ListGrantsRequest{PageSize: 1000}
	auditReq := &leaseholdv1.QueryAuditRequest{PageSize: 1000}
	if kind == "agent" {
		grantReq.SpiffeId, auditReq.AgentId = subject, subject
	} else {
		grantReq.Credential, auditReq.Credential = subject, subject
		if _, err := admin.GetCredential(ctx, &leaseholdv1.GetCredentialRequest{Name: subject}); err != nil {
			return nil, rpcErr(err)
		}
	}
	if since > 0 {
		t := time.Now().Add(-since).UTC()
		rep.Since, auditReq.StartTime = &t, timestamppb.New(t)
	}
	for {
		r, err := admin.ListGrants(ctx, grantReq)
		if err != nil {
			return nil, rpcErr(err)
		}
		for _, g := range r.GetGrants() {
			rep.Grants = append(rep.Grants, grantRow{ID: g.GetId(), Subject: grantSubject(g), Credential: g.GetCredential(),
				Scopes: g.GetScopes(), MaxTTL: g.GetMaxTtl().AsDuration().String(), MaxLifetime: g.GetMaxLifetime().AsDuration().String()})
		}
		if grantReq.PageToken = r.GetNextPageToken(); grantReq.PageToken == "" {
			break
		}
	}
	if kind == "agent" {
		agents := &leaseholdv1.ListAgentsRequest{RevokedOnly: true, PageSize: 1000}
		for {
			r, err := admin.ListAgents(ctx, agents)
			if err != nil {
				return nil, rpcErr(err)
			}
			for _, a := range r.GetAgents() {
				rep.Revoked = rep.Revoked || a.GetSpiffeId() == subject
			}
			if agents.PageToken = r.GetNextPageToken(); agents.PageToken == "" {
				break
			}
		}
	}
	rows := map[string]*accessRow{}
	for {
		r, err := admin.QueryAudit(ctx, auditReq)
		if err != nil {
			return nil, rpcErr(err)
		}
		for _, rec := range r.GetRecords() {
			rep.Records++
			key := rec.GetCredential()
			if kind == "credential" {
				key = rec.GetAgentId()
			}
			if key == "" {
				continue
			}
			row := rows[key]
			if row == nil {
				row = &accessRow{Key: key, Tasks: []string{}}
				rows[key] = row
			}
			if !countEvent(row, rec) {
				continue
			}
			if t := rec.GetTaskId(); t != "" && !slices.Contains(row.Tasks, t) {
				row.Tasks = append(row.Tasks, t)
			}
			if at := rec.GetTime().AsTime(); at.After(row.Last) {
				row.Last = at
			}
		}
		if rep.Records >= reportRecordCap {
			rep.Capped = true
			break
		}
		if auditReq.PageToken = r.GetNextPageToken(); auditReq.PageToken == "" {
			break
		}
	}
	for _, row := range rows {
		if row.Acquired+row.Denied+row.Renewed+row.Released+row.Expired+row.Revoked > 0 {
			sort.Strings(row.Tasks)
			rep.Access = append(rep.Access, *row)
		}
	}
	sort.Slice(rep.Access, func(i, j int) bool { return rep.Access[i].Key < rep.Access[j].Key })
	return rep, nil
}

// countEvent adds a lease event to row and reports whether it was one.
func countEvent(row *accessRow, rec *leaseholdv1.AuditRecord) bool {
	deny := rec.GetDecision() == leaseholdv1.Decision_DECISION_DENY
	switch rec.GetEvent() {
	case leaseholdv1.AuditEvent_AUDIT_EVENT_LEASE_ACQUIRE:
		if deny {
			row.Denied++
		} else {
			row.Acquired++
		}
	case leaseholdv1.AuditEvent_AUDIT_EVENT_LEASE_RENEW:
		if deny {
			row.Denied++
		} else {
			row.Renewed++
		}
	case leaseholdv1.AuditEvent_AUDIT_EVENT_LEASE_RELEASE:
		if deny {
			row.Denied++
		} else {
			row.Released++
		}
	case leaseholdv1.AuditEvent_AUDIT_EVENT_LEASE_EXPIRE:
		row.Expired++
	case leaseholdv1.AuditEvent_AUDIT_EVENT_LEASE_REVOKE:
		row.Revoked++
	default:
		return false
	}
	return true
}

func (r *report) print(w io.Writer) {
	window := "all time"
	if r.Since != nil {
		window = "since " + r.Since.Local().Format(time.RFC3339)
	}
	if r.Kind == "agent" {
		state := "active"
		if r.Revoked {
			state = "REVOKED"
		}
		fmt.Fprintf(w, "Agent %s (%s)\n\nMay access (grants covering it):\n", r.Subject, state)
	} else {
		fmt.Fprintf(w, "Credential %s\n\nWho may access it (grants):\n", r.Subject)
	}
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "  GRANT\tSUBJECT\tCREDENTIAL\tSCOPES\tMAX_TTL\tMAX_LIFETIME")
	for _, g := range r.Grants {
		fmt.Fprintf(tw, "  %s\t%s\t%s\t%s\t%s\t%s\n", g.ID, g.Subject, g.Credential, strings.Join(g.Scopes, ","), g.MaxTTL, g.MaxLifetime)
	}
	tw.Flush()
	if len(r.Grants) == 0 {
		fmt.Fprintln(w, "  (none)")
	}
	col := "CREDENTIAL"
	if r.Kind == "credential" {
		col = "AGENT"
	}
	heading := "What it accessed"
	if r.Kind == "credential" {
		heading = "Who accessed it"
	}
	fmt.Fprintf(w, "\n%s (%s, %d audit records):\n", heading, window, r.Records)
	tw = tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintf(tw, "  %s\tACQUIRED\tDENIED\tRENEWED\tRELEASED\tEXPIRED\tREVOKED\tLAST\tTASKS\n", col)
	for _, a := range r.Access {
		tasks := strings.Join(a.Tasks, ",")
		if len(a.Tasks) > 5 {
			tasks = strings.Join(a.Tasks[:5], ",") + fmt.Sprintf(",… (%d)", len(a.Tasks))
		}
		fmt.Fprintf(tw, "  %s\t%d\t%d\t%d\t%d\t%d\t%d\t%s\t%s\n", a.Key, a.Acquired, a.Denied, a.Renewed, a.Released,
			a.Expired, a.Revoked, a.Last.Local().Format(time.RFC3339), tasks)
	}
	tw.Flush()
	if len(r.Access) == 0 {
		fmt.Fprintln(w, "  (nothing)")
	}
	if r.Capped {
		fmt.Fprintf(w, "\n(stopped after %d records: narrow --since)\n", reportRecordCap)
	}
}

package server

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"slices"
	"strings"
	"time"

	"github.com/leasehold/leasehold/store"
)

// The anomaly guard.
//
// A grant may say which credentials a task is expected to use
// (expected_credentials). Once an agent holds a lease under such a grant for
// a task, its acquire of a credential outside that set for the same task is
// an anomaly — the pattern of a hijacked agent reaching for more than its
// job needs. It is denied and audited; with suspend_on_anomaly the agent is
// revoked in the same transaction (leases ended, delegations deleted); and a
// notification goes to the broker's anomaly webhook, if configured.

const anomalyActor = "leasehold:anomaly-guard"

// anomaly describes an acquire outside a task's expected credentials.
type anomaly struct {
	grant    *store.Grant
	expected []string
}

// taskAnomaly checks an acquire of credential for task by agent against the
// expected credentials of the grants its leases in that task are under.
func taskAnomaly(tx store.ReadTx, agent, task, credential string) (*anomaly, error) {
	leases, err := tx.ListLeases(store.LeaseFilter{AgentID: agent, TaskID: task}, "", 0)
	if err != nil {
		return nil, err
	}
	seen := map[string]bool{}
	for _, l := range leases {
		if seen[l.GrantID] {
			continue
		}
		seen[l.GrantID] = true
		g, err := tx.GetGrant(l.GrantID)
		if err != nil {
			continue // a deleted grant constrains nothing any more
		}
		if len(g.ExpectedCredentials) == 0 {
			continue
		}
		expected := append([]string{g.Credential}, g.ExpectedCredentials...)
		if !slices.Contains(expected, credential) {
			return &anomaly{grant: g, expected: expected}, nil
		}
	}
	return nil, nil
}

// anomalyError carries an anomaly found at commit out of the transaction.
type anomalyError struct{ a *anomaly }

func (e *anomalyError) Error() string { return "anomaly: credential outside the task's expected set" }

func (a *anomaly) denial(task, credential string) error {
	return errDenied("anomaly: task %s was expected to use only %s (grant %s); %s is outside that set",
		task, strings.Join(a.expected, ", "), a.grant.ID, credential)
}

// denyAnomaly records the refused acquire, suspends the agent when the
// grant says so (same transaction), and notifies the webhook.
func (s *Server) denyAnomaly(ctx context.Context, rec *store.AuditRecord, a *anomaly, denial error) error {
	rec.Decision, rec.Reason, rec.Code = store.Deny, denial.Error(), codeOf(denial).String()
	rec.GrantID = a.grant.ID
	now := s.now()
	suspended := false
	err := s.store.Update(ctx, func(tx store.Tx) error {
		suspended = false
		if _, err := tx.AppendAudit(stamp(ctx, rec)); err != nil {
			return err
		}
		if !a.grant.SuspendOnAnomaly {
			return nil
		}
		suspended = true
		_, err := revokeAgentTx(ctx, tx, rec.AgentID, "suspended by the anomaly guard: "+denial.Error(), anomalyActor, now)
		return err
	})
	if err != nil {
		return s.writeFailed(ctx, err)
	}
	s.log.WarnContext(ctx, "anomaly: acquire outside the task's expected credentials", "agent", rec.AgentID, "task", rec.TaskID,
		"credential", rec.Credential, "grant_id", a.grant.ID, "suspended", suspended, "audit_sequence", rec.Sequence)
	s.notifyAnomaly(AnomalyEvent{Type: "leasehold.anomaly", Time: now.UTC(), AgentID: rec.AgentID, TaskID: rec.TaskID,
		Credential: rec.Credential, ExpectedCredentials: a.expected, GrantID: a.grant.ID, Suspended: suspended,
		AuditSequence: rec.Sequence, Reason: denial.Error()})
	if suspended {
		return errDenied("%s; the agent is suspended until an admin reinstates it", denial.Error())
	}
	return denial
}

// AnomalyEvent is the JSON body POSTed to the anomaly webhook. It holds no
// secret.
type AnomalyEvent struct {
	Type                string    `json:"type"`
	Time                time.Time `json:"time"`
	AgentID             string    `json:"agent_id"`
	TaskID              string    `json:"task_id"`
	Credential          string    `json:"credential"`
	ExpectedCredentials []string  `json:"expected_credentials"`
	GrantID             string    `json:"grant_id"`
	Suspended           bool      `json:"suspended"`
	AuditSequence       uint64    `json:"audit_sequence"`
	Reason              string    `json:"reason"`
}

// notifyAnomaly POSTs ev to the configured webhook in the background, with
// a few retries; failures are logged (the audit trail has the event either
// way).
func (s *Server) notifyAnomaly(ev AnomalyEvent) {
	if s.cfg.AnomalyWebhookURL == "" {
		return
	}
	body, err := json.Marshal(ev)
	if err != nil {
		s.log.Error("anomaly webhook: encode", "error", err.Error())
		return
	}
	s.life.Lock()
	defer s.life.Unlock()
	if s.stopped {
		return
	}
	s.bg.Add(1)
	go func() {
		defer s.bg.Done()
		client := s.webhookClient
		delay := 200 * time.Millisecond
		for attempt := 1; ; attempt++ {
			err := postJSON(client, s.cfg.AnomalyWebhookURL, body)
			if err == nil {
				return
			}
			if attempt == 4 {
				s.log.Error("anomaly webhook: giving up", "url", s.cfg.AnomalyWebhookURL, "attempts", attempt, "error", err.Error())
				return
			}
			select {
			case <-s.stop:
				return
			case <-time.After(delay):
			}
			delay *= 4
		}
	}()
}

func postJSON(client *http.Client, url string, body []byte) error {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, url, bytes.NewReader(body))
	if err != nil {
		return err
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := client.Do(req)
	if err != nil {
		return err
	}
	_ = resp.Body.Close()
	if resp.StatusCode/100 != 2 {
		return fmt.Errorf("status %d", resp.StatusCode)
	}
	return nil
}

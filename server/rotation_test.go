package server_test

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/types/known/durationpb"

	leaseholdv1 "github.com/leasehold/leasehold/proto/leasehold/v1"
	"github.com/leasehold/leasehold/server"
)

// The rotator the exec backend runs in these tests is this test binary,
// behind a small script (the backend clears the environment): its
// "upstream" is a directory holding one file per valid secret.
const rotatorEnv = "LEASEHOLD_TEST_ROTATOR_DIR"

func TestMain(m *testing.M) {
	if dir := os.Getenv(rotatorEnv); dir != "" {
		os.Exit(fakeUpstreamRotator(dir, os.Args[len(os.Args)-1]))
	}
	os.Exit(m.Run())
}

func fakeUpstreamRotator(dir, verb string) int {
	in, _ := io.ReadAll(os.Stdin)
	var req struct {
		RotationID string            `json:"rotation_id"`
		Next       map[string]string `json:"next"`
		Old        map[string]string `json:"old"`
	}
	if err := json.Unmarshal(in, &req); err != nil {
		fmt.Fprintln(os.Stderr, "bad input:", err)
		return 2
	}
	exists := func(p string) bool { _, err := os.Stat(filepath.Join(dir, p)); return err == nil }
	switch verb {
	case "create":
		if b, err := os.ReadFile(filepath.Join(dir, "ids", req.RotationID)); err == nil {
			fmt.Printf(`{"secret": {"api_key": %q}}`, string(b)) // the same rotation again: the same secret
			return 0
		}
		b := make([]byte, 8)
		_, _ = rand.Read(b)
		key := "key-" + hex.EncodeToString(b)
		_ = os.WriteFile(filepath.Join(dir, "valid", key), nil, 0o600)
		_ = os.WriteFile(filepath.Join(dir, "ids", req.RotationID), []byte(key), 0o600)
		if exists("slow-create") {
			time.Sleep(30 * time.Second) // created upstream, then the broker goes away
		}
		fmt.Printf(`{"secret": {"api_key": %q}}`, key)
	case "verify":
		if exists("slow-verify") {
			time.Sleep(30 * time.Second) // the broker goes away while verifying
		}
		if exists("fail-verify") {
			fmt.Fprintf(os.Stderr, "upstream refused %s\n", req.Next["api_key"]) // the broker must scrub this
			return 1
		}
		if !exists(filepath.Join("valid", req.Next["api_key"])) {
			return 1
		}
	case "retire":
		_ = os.Remove(filepath.Join(dir, "valid", req.Old["api_key"]))
	default:
		return 2
	}
	return 0
}

type upstream struct{ dir string }

func (u upstream) valid(key string) bool {
	_, err := os.Stat(filepath.Join(u.dir, "valid", key))
	return err == nil
}

func (u upstream) count(sub string) int {
	ents, _ := os.ReadDir(filepath.Join(u.dir, sub))
	return len(ents)
}

func (u upstream) flag(name string, on bool) {
	p := filepath.Join(u.dir, name)
	if on {
		_ = os.WriteFile(p, nil, 0o600)
	} else {
		_ = os.Remove(p)
	}
}

// rotatorEnvSetup creates the fake upstream with one valid key and an exec
// credential "crm/api" rotated by it.
func rotatorSetup(t *testing.T, e *env, rotation *leaseholdv1.RotationPolicy) upstream {
	t.Helper()
	u := upstream{dir: t.TempDir()}
	for _, d := range []string{"valid", "ids"} {
		require.NoError(t, os.MkdirAll(filepath.Join(u.dir, d), 0o700))
	}
	require.NoError(t, os.WriteFile(filepath.Join(u.dir, "valid", "key-initial"), nil, 0o600))
	self, err := os.Executable()
	require.NoError(t, err)
	script := filepath.Join(u.dir, "rotator")
	require.NoError(t, os.WriteFile(script, []byte(fmt.Sprintf("#!/bin/sh\n%s=%s exec %s \"$@\"\n", rotatorEnv, u.dir, self)), 0o700))
	_, err = e.admin.PutCredential(ctx, &leaseholdv1.PutCredentialRequest{Name: "crm/api", Backend: "exec",
		Config: map[string]string{"command": script}, Secret: map[string]string{"api_key": "key-initial"}, Rotation: rotation})
	require.NoError(t, err)
	e.grant("crm/api", agent1ID, "read")
	return u
}

func credentialState(t *testing.T, e *env) *leaseholdv1.Credential {
	t.Helper()
	resp, err := e.admin.GetCredential(ctx, &leaseholdv1.GetCredentialRequest{Name: "crm/api"})
	require.NoError(t, err)
	return resp.GetCredential()
}

// Scheduled rotation every second with a one-second overlap while an agent
// acquires continuously: every secret handed out is valid upstream when it
// is handed out, a lease held across a rotation hears "rotated" and ends
// when its version is retired, and retired versions are gone upstream.
func TestScheduledTwoPhaseRotation(t *testing.T) {
	e := newEnv(t, noQuotas, func(c *server.Config) { c.RotationPoll = 50 * time.Millisecond })
	u := rotatorSetup(t, e, &leaseholdv1.RotationPolicy{Interval: durationpb.New(time.Second), Overlap: durationpb.New(time.Second)})

	held, err := e.agent1.AcquireLease(ctx, withTTL(acquireReq("crm/api", "long-job", "read"), 10*time.Minute))
	require.NoError(t, err)
	require.Equal(t, "key-initial", held.GetSecret()["api_key"])
	wctx, cancel := context.WithCancel(ctx)
	defer cancel()
	watch, err := e.agent1.WatchLeases(wctx, &leaseholdv1.WatchLeasesRequest{})
	require.NoError(t, err)
	var events sync.Map // lease id + event → seen
	go func() {
		for {
			ev, err := watch.Recv()
			if err != nil {
				return
			}
			events.Store(ev.GetLeaseId()+"/"+ev.GetEvent().String(), true)
		}
	}()

	var handedOut, invalid atomic.Int64
	seen := sync.Map{}
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Go(func() {
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			l, err := e.agent1.AcquireLease(ctx, acquireReq("crm/api", fmt.Sprintf("job-%d", i), "read"))
			if err != nil {
				continue
			}
			key := l.GetSecret()["api_key"]
			handedOut.Add(1)
			seen.Store(key, true)
			if !u.valid(key) {
				invalid.Add(1)
			}
			_, _ = e.agent1.ReleaseLease(ctx, &leaseholdv1.ReleaseLeaseRequest{LeaseId: l.GetLease().GetId()})
		}
	})
	require.Eventually(t, func() bool { return credentialState(t, e).GetCurrentVersion() >= 4 }, 20*time.Second, 50*time.Millisecond,
		"three rotations")
	close(stop)
	wg.Wait()
	require.Positive(t, handedOut.Load())
	require.Zero(t, invalid.Load(), "no secret was handed out that was not valid upstream")
	distinct := 0
	seen.Range(func(any, any) bool { distinct++; return true })
	require.GreaterOrEqual(t, distinct, 2, "agents got the new versions without any change on their side")

	// The lease held across the rotation heard of it, then ended with its version.
	require.Eventually(t, func() bool {
		_, rotated := events.Load(held.GetLease().GetId() + "/LEASE_EVENT_ROTATED")
		_, revoked := events.Load(held.GetLease().GetId() + "/LEASE_EVENT_REVOKED")
		return rotated && revoked
	}, 10*time.Second, 20*time.Millisecond)
	require.False(t, u.valid("key-initial"), "the first version was retired upstream")
	require.Eventually(t, func() bool { return u.count("valid") <= 2 }, 10*time.Second, 20*time.Millisecond,
		"at most the current and the overlapping previous version are valid upstream")

	c := credentialState(t, e)
	require.NotNil(t, c.GetRotationState().GetLastRotated())
	require.NotNil(t, c.GetRotationState().GetNextDue())
	require.Empty(t, c.GetRotationState().GetLastError())
	// Every record of the credential, all pages (the agent made thousands).
	var recs []*leaseholdv1.AuditRecord
	for token := ""; ; {
		resp, err := e.admin.QueryAudit(ctx, &leaseholdv1.QueryAuditRequest{Credential: "crm/api", PageSize: 1000, PageToken: token})
		require.NoError(t, err)
		recs = append(recs, resp.GetRecords()...)
		if token = resp.GetNextPageToken(); token == "" {
			break
		}
	}
	var phases []string
	for _, r := range recs {
		if r.GetEvent() == leaseholdv1.AuditEvent_AUDIT_EVENT_CREDENTIAL_ROTATE {
			phases = append(phases, r.GetReason())
			for _, key := range []string{"key-initial"} {
				require.NotContains(t, r.GetReason(), key)
			}
		}
	}
	all := strings.Join(phases, "\n")
	for _, want := range []string{"started", "stored as pending", "verified and promoted", "leases holding version", "retired upstream"} {
		require.Contains(t, all, want, "each phase is audited")
	}
}

// A failed verify keeps the current version, records the error without the
// secret, takes the new version back upstream, and the next try succeeds.
func TestRotationVerifyFailureKeepsCurrent(t *testing.T) {
	e := newEnv(t, noQuotas)
	u := rotatorSetup(t, e, &leaseholdv1.RotationPolicy{Overlap: durationpb.New(time.Hour)})
	u.flag("fail-verify", true)
	_, err := e.admin.RotateCredential(ctx, &leaseholdv1.RotateCredentialRequest{Name: "crm/api"})
	requireCode(t, err, codes.FailedPrecondition, "failed at verify")
	require.NotContains(t, err.Error(), "key-", "the rotator's message is scrubbed of secrets")
	c := credentialState(t, e)
	require.Equal(t, uint64(1), c.GetCurrentVersion())
	require.Equal(t, int32(1), c.GetRotationState().GetFailures())
	require.Contains(t, c.GetRotationState().GetLastError(), "verify")
	require.NotNil(t, c.GetRotationState().GetNextDue(), "retried with backoff")
	require.Equal(t, 1, u.count("valid"), "the unverified version was retired upstream")
	l, err := e.agent1.AcquireLease(ctx, acquireReq("crm/api", "t", "read"))
	require.NoError(t, err)
	require.Equal(t, "key-initial", l.GetSecret()["api_key"])

	u.flag("fail-verify", false)
	resp, err := e.admin.RotateCredential(ctx, &leaseholdv1.RotateCredentialRequest{Name: "crm/api"})
	require.NoError(t, err)
	require.Equal(t, leaseholdv1.RotationState_PHASE_OVERLAP, resp.GetCredential().GetRotationState().GetPhase())
	require.Greater(t, resp.GetCredential().GetCurrentVersion(), uint64(1))
	require.True(t, u.valid("key-initial"), "the previous version stays valid during the overlap")
	l2, err := e.agent1.AcquireLease(ctx, acquireReq("crm/api", "t2", "read"))
	require.NoError(t, err)
	require.NotEqual(t, "key-initial", l2.GetSecret()["api_key"], "new leases get the new version")
	_, err = e.admin.RotateCredential(ctx, &leaseholdv1.RotateCredentialRequest{Name: "crm/api"})
	requireCode(t, err, codes.FailedPrecondition, "in progress")
}

// A broker stopped after the rotator created the new secret upstream but
// before storing it resumes the same rotation on restart: the rotator sees
// the same rotation id and nothing is created twice.
func TestRotationResumesAfterRestart(t *testing.T) {
	e := newEnv(t, noQuotas, func(c *server.Config) { c.RotationPoll = 50 * time.Millisecond })
	u := rotatorSetup(t, e, &leaseholdv1.RotationPolicy{Interval: durationpb.New(time.Second), Overlap: durationpb.New(time.Hour)})
	u.flag("slow-create", true)
	require.Eventually(t, func() bool { return u.count("ids") == 1 }, 10*time.Second, 20*time.Millisecond, "the rotator created upstream")
	e.stop() // mid-create: the rotator is killed, the phase stays "creating"
	e.start()
	require.Eventually(t, func() bool {
		return credentialState(t, e).GetRotationState().GetPhase() == leaseholdv1.RotationState_PHASE_OVERLAP
	}, 20*time.Second, 50*time.Millisecond, "the rotation resumed and was promoted")
	require.Equal(t, 1, u.count("ids"), "created once, not twice")
	require.Equal(t, 2, u.count("valid"), "the initial key and the one new key")
	ids, err := os.ReadDir(filepath.Join(u.dir, "ids"))
	require.NoError(t, err)
	key, err := os.ReadFile(filepath.Join(u.dir, "ids", ids[0].Name()))
	require.NoError(t, err)
	l, err := e.agent1.AcquireLease(ctx, acquireReq("crm/api", "after", "read"))
	require.NoError(t, err)
	require.Equal(t, string(key), l.GetSecret()["api_key"])
}

// A crash while verifying resumes with the stored pending version (nothing
// is created again), and a crash during the overlap still retires the
// previous version once its time is up.
func TestRotationResumesAtEachPhase(t *testing.T) {
	e := newEnv(t, noQuotas, func(c *server.Config) { c.RotationPoll = 50 * time.Millisecond })
	u := rotatorSetup(t, e, &leaseholdv1.RotationPolicy{Interval: durationpb.New(500 * time.Millisecond), Overlap: durationpb.New(2 * time.Second)})
	phase := func() leaseholdv1.RotationState_Phase { return credentialState(t, e).GetRotationState().GetPhase() }

	u.flag("slow-verify", true)
	require.Eventually(t, func() bool { return phase() == leaseholdv1.RotationState_PHASE_VERIFYING }, 20*time.Second, 20*time.Millisecond)
	e.stop() // mid-verify
	u.flag("slow-verify", false)
	e.start()
	require.Eventually(t, func() bool { return phase() == leaseholdv1.RotationState_PHASE_OVERLAP }, 20*time.Second, 20*time.Millisecond,
		"verify resumed and the pending version was promoted")
	require.Equal(t, 1, u.count("ids"), "the resumed rotation did not create again")
	require.True(t, u.valid("key-initial"), "still in its overlap")

	e.stop() // mid-overlap
	time.Sleep(2500 * time.Millisecond)
	e.start()
	require.Eventually(t, func() bool { return !u.valid("key-initial") }, 20*time.Second, 20*time.Millisecond,
		"after the restart the overdue previous version is retired")
}

// The webhook rotator: the same contract over HTTPS, the broker presenting
// its own SVID (mTLS) to an endpoint that requires it.
func TestWebhookRotatorOverMTLS(t *testing.T) {
	e := newEnv(t, noQuotas)
	valid := map[string]bool{"key-initial": true}
	var mu sync.Mutex
	var callers []string
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		defer mu.Unlock()
		callers = append(callers, r.TLS.PeerCertificates[0].URIs[0].String())
		var req struct {
			RotationID string            `json:"rotation_id"`
			Secret     map[string]string `json:"secret"`
			Next       map[string]string `json:"next"`
			Old        map[string]string `json:"old"`
		}
		if err := json.NewDecoder(r.Body).Decode(&req); err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		switch r.URL.Path {
		case "/rotate/create":
			key := "key-" + req.RotationID
			valid[key] = true
			fmt.Fprintf(w, `{"secret": {"api_key": %q}}`, key)
		case "/rotate/verify":
			if !valid[req.Next["api_key"]] {
				http.Error(w, "not valid", http.StatusConflict)
			}
		case "/rotate/retire":
			delete(valid, req.Old["api_key"])
		default:
			http.NotFound(w, r)
		}
	}))
	pool := x509.NewCertPool()
	for _, c := range e.ca.Bundle().X509Authorities() {
		pool.AddCert(c)
	}
	srv.TLS = &tls.Config{ClientAuth: tls.RequireAndVerifyClientCert, ClientCAs: pool}
	srv.StartTLS()
	defer srv.Close()
	caFile := filepath.Join(t.TempDir(), "webhook-ca.pem")
	require.NoError(t, os.WriteFile(caFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: srv.Certificate().Raw}), 0o600))

	_, err := e.admin.PutCredential(ctx, &leaseholdv1.PutCredentialRequest{Name: "crm/api", Backend: "webhook",
		Config: map[string]string{"url": srv.URL + "/rotate", "ca_file": caFile}, Secret: map[string]string{"api_key": "key-initial"},
		Rotation: &leaseholdv1.RotationPolicy{Overlap: durationpb.New(time.Millisecond)}})
	require.NoError(t, err)
	e.grant("crm/api", agent1ID, "read")
	resp, err := e.admin.RotateCredential(ctx, &leaseholdv1.RotateCredentialRequest{Name: "crm/api"})
	require.NoError(t, err)
	require.Equal(t, uint64(2), resp.GetCredential().GetCurrentVersion())
	l, err := e.agent1.AcquireLease(ctx, acquireReq("crm/api", "t", "read"))
	require.NoError(t, err)
	require.True(t, strings.HasPrefix(l.GetSecret()["api_key"], "key-rot_"))
	require.Eventually(t, func() bool {
		mu.Lock()
		defer mu.Unlock()
		return !valid["key-initial"]
	}, 10*time.Second, 20*time.Millisecond, "the overlap passed and the old key was retired through the webhook")
	mu.Lock()
	defer mu.Unlock()
	for _, c := range callers {
		require.Equal(t, "spiffe://leasehold.test/leasehold/broker", c, "the webhook saw the broker's SVID")
	}

	// Without the broker's certificate the endpoint refuses: the rotation
	// fails and the current version stays.
	_, err = e.admin.PutCredential(ctx, &leaseholdv1.PutCredentialRequest{Name: "crm/other", Backend: "webhook",
		Config: map[string]string{"url": srv.URL + "/rotate"}, Secret: map[string]string{"api_key": "k"}})
	require.NoError(t, err)
	_, err = e.admin.RotateCredential(ctx, &leaseholdv1.RotateCredentialRequest{Name: "crm/other"})
	requireCode(t, err, codes.FailedPrecondition, "failed at create") // unknown server CA without ca_file
}

// An unavailable upstream during verify is not a verdict: the rotation
// stays at verify and resumes after the backoff with the same new version.
func TestRotationPausesWhileUpstreamUnavailable(t *testing.T) {
	e := newEnv(t, noQuotas, func(c *server.Config) {
		c.RotationPoll, c.RevocationMinBackoff, c.RevocationMaxBackoff = 50*time.Millisecond, 100*time.Millisecond, 200*time.Millisecond
	})
	var mu sync.Mutex
	verifyCalls, creates := 0, 0
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		defer mu.Unlock()
		switch r.URL.Path {
		case "/create":
			creates++
			fmt.Fprint(w, `{"secret": {"api_key": "key-next"}}`)
		case "/verify":
			verifyCalls++
			if verifyCalls == 1 {
				http.Error(w, "upstream busy", http.StatusServiceUnavailable)
			}
		}
	}))
	defer srv.Close()
	_, err := e.admin.PutCredential(ctx, &leaseholdv1.PutCredentialRequest{Name: "crm/api", Backend: "webhook",
		Config: map[string]string{"url": srv.URL}, Secret: map[string]string{"api_key": "key-initial"},
		Rotation: &leaseholdv1.RotationPolicy{Overlap: durationpb.New(time.Hour)}})
	require.NoError(t, err)
	_, err = e.admin.RotateCredential(ctx, &leaseholdv1.RotateCredentialRequest{Name: "crm/api"})
	requireCode(t, err, codes.Unavailable, "paused at verify")
	c := credentialState(t, e)
	require.Equal(t, leaseholdv1.RotationState_PHASE_VERIFYING, c.GetRotationState().GetPhase(), "the pending version is kept")
	require.Equal(t, uint64(1), c.GetCurrentVersion())
	require.Eventually(t, func() bool {
		return credentialState(t, e).GetRotationState().GetPhase() == leaseholdv1.RotationState_PHASE_OVERLAP
	}, 10*time.Second, 20*time.Millisecond, "the scheduler resumed verify and promoted")
	mu.Lock()
	defer mu.Unlock()
	require.Equal(t, 1, creates, "nothing was created again")
	require.Equal(t, 2, verifyCalls)
}

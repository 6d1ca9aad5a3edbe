package spiretest_test

import (
	"context"
	"os"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/leasehold/leasehold/identity"
	"github.com/leasehold/leasehold/identity/spiretest"
)

// The harness brings up a real SPIRE and the Workload API serves this test
// process the SVID its binary path is registered for.
func TestHarnessServesRegisteredWorkload(t *testing.T) {
	s := spiretest.Start(t)
	self, err := os.Executable()
	require.NoError(t, err)
	id := "spiffe://" + spiretest.TrustDomain + "/harness"
	s.CreateEntry(t, spiretest.Entry{SPIFFEID: id, Selectors: []string{"unix:path:" + self}})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	src, err := identity.NewWorkloadSource(ctx, s.WorkloadAddr())
	require.NoError(t, err, s.Logs())
	defer src.Close()
	svid, err := src.GetX509SVID()
	require.NoError(t, err)
	require.Equal(t, id, svid.ID.String())
}

package static_test

import (
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/leasehold/leasehold/backends"
	"github.com/leasehold/leasehold/backends/backendtest"
	"github.com/leasehold/leasehold/backends/static"
)

func TestConformance(t *testing.T) {
	backendtest.Run(t, backendtest.Case{
		Backend: static.Backend{},
		Spec:    backends.Spec{Name: "crm/x", Secret: map[string][]byte{"api_key": []byte("CANARY-static-1")}},
		Scopes:  []string{"read"},
	})
}

func TestValidateNeedsASecret(t *testing.T) {
	err := static.Backend{}.Validate(backends.Spec{Name: "crm/x"})
	require.ErrorIs(t, err, backends.ErrInvalidConfig)
	require.ErrorContains(t, err, "secret:")
}

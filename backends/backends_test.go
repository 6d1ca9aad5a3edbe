package backends_test

import (
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/leasehold/leasehold/backends"
	"github.com/leasehold/leasehold/backends/static"
)

func TestRegistry(t *testing.T) {
	r := backends.NewRegistry()
	r.Register("static", static.Backend{})
	r.Register("other", static.Backend{})
	_, err := r.Lookup("static")
	require.NoError(t, err)
	_, err = r.Lookup("vault")
	require.ErrorIs(t, err, backends.ErrUnknownBackend)
	require.ErrorContains(t, err, "valid: other, static", "the error lists the valid names")
	require.Panics(t, func() { r.Register("static", static.Backend{}) })
}

func TestSubsetOf(t *testing.T) {
	require.True(t, backends.SubsetOf(nil, []string{"a"}))
	require.True(t, backends.SubsetOf([]string{"a"}, []string{"b", "a"}))
	require.False(t, backends.SubsetOf([]string{"a", "c"}, []string{"a", "b"}))
	require.False(t, backends.SubsetOf([]string{"a"}, nil))
}

func TestCheckEndpointURL(t *testing.T) {
	for raw, ok := range map[string]bool{
		"https://auth.example.com/token": true, "http://127.0.0.1:4444/token": true, "http://localhost/x": true, "http://[::1]:80/": true,
		"http://auth.example.com/token": false, "ftp://x/y": false, "/relative": false, "https://": false,
	} {
		err := backends.CheckEndpointURL("config.url", raw, true)
		if ok {
			require.NoError(t, err, raw)
		} else {
			require.ErrorIs(t, err, backends.ErrInvalidConfig, raw)
			require.ErrorContains(t, err, "config.url", raw)
		}
	}
	require.ErrorContains(t, backends.CheckEndpointURL("config.url", "", true), "is required")
	require.NoError(t, backends.CheckEndpointURL("config.url", "", false))
}

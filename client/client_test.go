package client_test

import (
	"errors"
	"testing"

	"github.com/stretchr/testify/require"
	"google.golang.org/grpc/codes"

	"github.com/leasehold/leasehold/client"
)

func TestErrorsMatchSentinels(t *testing.T) {
	cases := map[codes.Code]error{
		codes.PermissionDenied:   client.ErrDenied,
		codes.NotFound:           client.ErrNotFound,
		codes.InvalidArgument:    client.ErrInvalid,
		codes.FailedPrecondition: client.ErrLeaseEnded,
		codes.Unavailable:        client.ErrUnavailable,
		codes.Unauthenticated:    client.ErrUnauthenticated,
	}
	for code, want := range cases {
		err := error(&client.Error{Code: code, Message: "m"})
		require.ErrorIs(t, err, want, code.String())
		for other, sentinel := range cases {
			if other != code {
				require.False(t, errors.Is(err, sentinel), "%v must not match %v", code, sentinel)
			}
		}
	}
}

func TestConfigIsValidated(t *testing.T) {
	_, err := client.Dial(client.Config{})
	require.ErrorContains(t, err, "Address is required")
	_, err = client.Dial(client.Config{Address: "127.0.0.1:1"})
	require.ErrorContains(t, err, "Source is required")
}

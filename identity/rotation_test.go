package identity_test

import (
	"crypto/tls"
	"crypto/x509"
	"math/big"
	"net"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/leasehold/leasehold/identity"
)

// A server whose SVID comes from files presents the rotated certificate on
// new handshakes, with no restart: the TLS config asks the source each time.
func TestServerPresentsRotatedSVIDOnNewHandshakes(t *testing.T) {
	f := newSVIDFiles(t, "spiffe://leasehold.test/leasehold/broker")
	ca, src, first := f.ca, f.src, f.first
	srv := grpc.NewServer(grpc.Creds(identity.ServerCredentials(src, td)))
	healthpb.RegisterHealthServer(srv, health.NewServer())
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	go func() { _ = srv.Serve(lis) }()
	defer srv.Stop()

	client, err := ca.Issue(spiffeid.RequireFromString("spiffe://leasehold.test/agents/a"), identity.SVIDOptions{})
	require.NoError(t, err)
	clientCert := tls.Certificate{PrivateKey: client.PrivateKey, Certificate: [][]byte{client.Certificates[0].Raw}}
	serverSerial := func() *big.Int {
		conn, err := tls.Dial("tcp", lis.Addr().String(), &tls.Config{
			Certificates: []tls.Certificate{clientCert}, InsecureSkipVerify: true, NextProtos: []string{"h2"},
			VerifyPeerCertificate: func([][]byte, [][]*x509.Certificate) error { return nil },
		})
		require.NoError(t, err)
		defer conn.Close()
		return conn.ConnectionState().PeerCertificates[0].SerialNumber
	}
	require.Equal(t, 0, serverSerial().Cmp(first.Certificates[0].SerialNumber))

	second := f.rotate(t)
	require.Eventually(t, func() bool { return serverSerial().Cmp(second.Certificates[0].SerialNumber) == 0 },
		5*time.Second, 20*time.Millisecond, "new handshakes present the rotated SVID")
}

package main

import (
	"context"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/leasehold/leasehold/store"
	"github.com/leasehold/leasehold/store/etcd/etcdtest"
)

// store: {engine: etcd, tls: ...} reaches an etcd cluster that requires
// client certificates; bad settings are refused by name.
func TestOpenEtcdStoreFromConfig(t *testing.T) {
	c := etcdtest.Start(t, etcdtest.Options{NoFsync: true, MutualTLS: true})
	f := c.TLS()
	st, err := openStore(StoreConfig{Engine: "etcd", Endpoints: c.Endpoints(), Prefix: "/cfg-test/",
		TLS: StoreTLSConfig{CAFile: f.CAFile, CertFile: f.CertFile, KeyFile: f.KeyFile}})
	require.NoError(t, err)
	require.NoError(t, st.Update(context.Background(), func(tx store.Tx) error { return tx.PutCursor("x", 1) }))
	require.NoError(t, st.Close())

	for _, tc := range []struct {
		cfg  StoreConfig
		want string
	}{
		{StoreConfig{Engine: "etcd"}, "endpoints are required"},
		{StoreConfig{Engine: "etcd", Endpoints: c.Endpoints(), Prefix: "no-slash"}, `prefix "no-slash" must end with "/"`},
		{StoreConfig{Engine: "etcd", Endpoints: c.Endpoints(), TLS: StoreTLSConfig{CertFile: f.CertFile}}, "cert_file and key_file go together"},
		{StoreConfig{Engine: "etcd", Endpoints: c.Endpoints(), TLS: StoreTLSConfig{CAFile: f.CertFile + ".missing"}}, "store.tls.ca_file"},
		{StoreConfig{Engine: "etcd", Endpoints: c.Endpoints(), PasswordFile: "/nonexistent"}, "store.password_file"},
		{StoreConfig{Engine: "zookeeper"}, `store.engine "zookeeper" is unknown (valid: bolt, etcd)`},
	} {
		_, err := openStore(tc.cfg)
		require.ErrorContains(t, err, tc.want)
	}
}

package bolt_test

import (
	"context"
	"encoding/binary"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/require"
	bbolt "go.etcd.io/bbolt"

	"github.com/leasehold/leasehold/store"
	"github.com/leasehold/leasehold/store/bolt"
	"github.com/leasehold/leasehold/store/storetest"
)

func TestConformance(t *testing.T) {
	storetest.Run(t, func(t *testing.T) store.Store {
		path := filepath.Join(t.TempDir(), "leasehold.db")
		s, err := bolt.Open(bolt.Config{Path: path})
		require.NoError(t, err)
		t.Cleanup(func() {
			// After each test the file must pass bbolt's consistency check.
			re, err := bolt.Open(bolt.Config{Path: path})
			require.NoError(t, err)
			require.NoError(t, re.Check())
			require.NoError(t, re.Close())
		})
		return s
	})
}

func TestReopenKeepsData(t *testing.T) {
	path := filepath.Join(t.TempDir(), "leasehold.db")
	s, err := bolt.Open(bolt.Config{Path: path})
	require.NoError(t, err)
	require.NoError(t, s.Update(context.Background(), func(tx store.Tx) error {
		_, err := tx.AppendAudit(&store.AuditRecord{Event: store.EventAgentRevoke})
		return err
	}))
	require.NoError(t, s.Close())
	s, err = bolt.Open(bolt.Config{Path: path})
	require.NoError(t, err)
	defer s.Close()
	require.NoError(t, s.Update(context.Background(), func(tx store.Tx) error {
		seq, err := tx.AppendAudit(&store.AuditRecord{Event: store.EventAgentRevoke})
		require.Equal(t, uint64(2), seq, "sequences continue across restarts")
		return err
	}))
}

func TestRefusesNewerSchema(t *testing.T) {
	path := filepath.Join(t.TempDir(), "leasehold.db")
	s, err := bolt.Open(bolt.Config{Path: path})
	require.NoError(t, err)
	require.NoError(t, s.Close())
	db, err := bbolt.Open(path, 0o600, nil)
	require.NoError(t, err)
	require.NoError(t, db.Update(func(tx *bbolt.Tx) error {
		v := make([]byte, 8)
		binary.BigEndian.PutUint64(v, store.SchemaVersion+1)
		return tx.Bucket([]byte("meta")).Put([]byte("schema_version"), v)
	}))
	require.NoError(t, db.Close())
	_, err = bolt.Open(bolt.Config{Path: path})
	require.ErrorIs(t, err, store.ErrSchema)
}

func TestRejectsKeysWithNUL(t *testing.T) {
	s, err := bolt.Open(bolt.Config{Path: filepath.Join(t.TempDir(), "db")})
	require.NoError(t, err)
	defer s.Close()
	err = s.Update(context.Background(), func(tx store.Tx) error {
		return tx.PutAgent(&store.Agent{ID: "spiffe://td/a\x00b"})
	})
	require.Error(t, err, "a NUL would corrupt the index key layout")
}

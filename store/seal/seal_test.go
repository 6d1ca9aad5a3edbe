package seal_test

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/leasehold/leasehold/store/seal"
)

func TestRoundTripAndBinding(t *testing.T) {
	path := filepath.Join(t.TempDir(), "kek")
	require.NoError(t, seal.CreateFile(path))
	st, err := os.Stat(path)
	require.NoError(t, err)
	require.Equal(t, os.FileMode(0o600), st.Mode().Perm())
	require.ErrorIs(t, seal.CreateFile(path), os.ErrExist, "an existing KEK is never overwritten")

	k, err := seal.LoadFile(path)
	require.NoError(t, err)
	wrapped, err := k.NewDataKey([]byte("cred-a"))
	require.NoError(t, err)
	secret := []byte("canary-5b3f9e")
	sealed, err := k.Seal(wrapped, []byte("cred-a"), secret, []byte("cred-a/v1"))
	require.NoError(t, err)
	require.False(t, bytes.Contains(sealed, secret))

	got, err := k.Open(wrapped, []byte("cred-a"), sealed, []byte("cred-a/v1"))
	require.NoError(t, err)
	require.Equal(t, secret, got)

	_, err = k.Open(wrapped, []byte("cred-a"), sealed, []byte("cred-a/v2"))
	require.ErrorIs(t, err, seal.ErrOpen, "value moved to another version")
	_, err = k.Open(wrapped, []byte("cred-b"), sealed, []byte("cred-a/v1"))
	require.ErrorIs(t, err, seal.ErrOpen, "data key moved to another credential")
	tampered := bytes.Clone(sealed)
	tampered[len(tampered)-1] ^= 1
	_, err = k.Open(wrapped, []byte("cred-a"), tampered, []byte("cred-a/v1"))
	require.ErrorIs(t, err, seal.ErrOpen)

	other, err := seal.New(bytes.Repeat([]byte{7}, seal.KeySize))
	require.NoError(t, err)
	_, err = other.Open(wrapped, []byte("cred-a"), sealed, []byte("cred-a/v1"))
	require.ErrorIs(t, err, seal.ErrOpen, "another KEK")
}

func TestLoadFileRejectsLooseModeAndBadKeys(t *testing.T) {
	dir := t.TempDir()
	loose := filepath.Join(dir, "loose")
	require.NoError(t, seal.CreateFile(loose))
	require.NoError(t, os.Chmod(loose, 0o644))
	_, err := seal.LoadFile(loose)
	require.ErrorContains(t, err, "chmod 600")

	short := filepath.Join(dir, "short")
	require.NoError(t, os.WriteFile(short, []byte("c2hvcnQ=\n"), 0o600))
	_, err = seal.LoadFile(short)
	require.ErrorContains(t, err, "32 bytes")

	_, err = seal.LoadFile(filepath.Join(dir, "missing"))
	require.Error(t, err)
}

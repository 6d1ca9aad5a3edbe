// Package seal encrypts secret material at rest with AES-256-GCM envelope
// encryption: each credential has its own random data key, stored only
// wrapped (encrypted) under a key-encryption key (KEK) that lives in a file
// outside the store. Every ciphertext is bound to where it belongs by
// additional authenticated data, so a sealed value copied to another record
// does not open.
package seal

import (
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"strings"
)

// KeySize is the size of KEKs and data keys: AES-256.
const KeySize = 32

const formatV1 = 1

// ErrOpen is returned when a ciphertext does not decrypt: wrong key, wrong
// binding, or tampering. It never says which.
var ErrOpen = errors.New("seal: message authentication failed")

// Keyring holds the KEK in memory.
type Keyring struct {
	kek cipher.AEAD
	id  [8]byte // first bytes of SHA-256(KEK); identifies the KEK in wrapped keys
}

// New makes a keyring from a 32-byte KEK.
func New(kek []byte) (*Keyring, error) {
	if len(kek) != KeySize {
		return nil, fmt.Errorf("seal: KEK must be %d bytes, got %d", KeySize, len(kek))
	}
	aead, err := newGCM(kek)
	if err != nil {
		return nil, err
	}
	k := &Keyring{kek: aead}
	sum := sha256.Sum256(kek)
	copy(k.id[:], sum[:])
	return k, nil
}

// LoadFile reads a KEK file: the key base64-encoded (standard encoding) on
// one line. The file must not be readable by group or others.
func LoadFile(path string) (*Keyring, error) {
	st, err := os.Stat(path)
	if err != nil {
		return nil, fmt.Errorf("seal: KEK file: %w", err)
	}
	if st.Mode().Perm()&0o077 != 0 {
		return nil, fmt.Errorf("seal: KEK file %s has mode %v; it must not be readable by group or others (chmod 600)", path, st.Mode().Perm())
	}
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("seal: KEK file: %w", err)
	}
	kek, err := base64.StdEncoding.DecodeString(strings.TrimSpace(string(data)))
	if err != nil {
		return nil, fmt.Errorf("seal: KEK file %s is not base64", path)
	}
	return New(kek)
}

// CreateFile writes a new random KEK to path with mode 0600. It fails with
// fs.ErrExist rather than overwrite a key.
func CreateFile(path string) error {
	kek := make([]byte, KeySize)
	if _, err := rand.Read(kek); err != nil {
		return err
	}
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return fmt.Errorf("seal: create KEK file: %w", err)
	}
	_, err = f.WriteString(base64.StdEncoding.EncodeToString(kek) + "\n")
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return err
}

// EnsureFile creates a KEK file at path unless one exists.
func EnsureFile(path string) error {
	if err := CreateFile(path); err != nil && !errors.Is(err, fs.ErrExist) {
		return err
	}
	return nil
}

func newGCM(key []byte) (cipher.AEAD, error) {
	block, err := aes.NewCipher(key)
	if err != nil {
		return nil, err
	}
	return cipher.NewGCM(block)
}

// NewDataKey makes a random data key and returns it wrapped under the KEK,
// bound to aad (e.g. the credential's name).
func (k *Keyring) NewDataKey(aad []byte) ([]byte, error) {
	dek := make([]byte, KeySize)
	if _, err := rand.Read(dek); err != nil {
		return nil, err
	}
	defer clear(dek)
	return k.seal(k.kek, dek, aad)
}

// Seal encrypts plaintext with the data key in wrappedKey, binding it to aad.
func (k *Keyring) Seal(wrappedKey, wrapAAD, plaintext, aad []byte) ([]byte, error) {
	dek, err := k.unwrap(wrappedKey, wrapAAD)
	if err != nil {
		return nil, err
	}
	return k.seal(dek, plaintext, aad)
}

// Open decrypts a value made by Seal with the same keys and bindings.
func (k *Keyring) Open(wrappedKey, wrapAAD, sealed, aad []byte) ([]byte, error) {
	dek, err := k.unwrap(wrappedKey, wrapAAD)
	if err != nil {
		return nil, err
	}
	return k.open(dek, sealed, aad)
}

func (k *Keyring) unwrap(wrapped, aad []byte) (cipher.AEAD, error) {
	dek, err := k.open(k.kek, wrapped, aad)
	if err != nil {
		return nil, err
	}
	defer clear(dek)
	return newGCM(dek)
}

// Format: version (1) | KEK id (8) | nonce (12) | GCM ciphertext+tag.
func (k *Keyring) seal(a cipher.AEAD, plaintext, aad []byte) ([]byte, error) {
	out := make([]byte, 1+len(k.id), 1+len(k.id)+a.NonceSize()+len(plaintext)+a.Overhead())
	out[0] = formatV1
	copy(out[1:], k.id[:])
	nonce := make([]byte, a.NonceSize())
	if _, err := rand.Read(nonce); err != nil {
		return nil, err
	}
	out = append(out, nonce...)
	return a.Seal(out, nonce, plaintext, aad), nil
}

func (k *Keyring) open(a cipher.AEAD, sealed, aad []byte) ([]byte, error) {
	head := 1 + len(k.id) + a.NonceSize()
	if len(sealed) < head+a.Overhead() || sealed[0] != formatV1 {
		return nil, ErrOpen
	}
	if string(sealed[1:1+len(k.id)]) != string(k.id[:]) {
		return nil, fmt.Errorf("%w: sealed under a different KEK", ErrOpen)
	}
	pt, err := a.Open(nil, sealed[1+len(k.id):head], sealed[head:], aad)
	if err != nil {
		return nil, ErrOpen
	}
	return pt, nil
}

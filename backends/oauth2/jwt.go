package oauth2

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"time"

	"github.com/leasehold/leasehold/backends"
)

// jwtBearer is the client_assertion_type of private_key_jwt (RFC 7523).
const jwtBearer = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer" //nolint:gosec // a URN, not a credential

// signer makes private_key_jwt client assertions with an ES256 (P-256) or
// RS256 key.
type signer struct {
	key crypto.Signer
	alg string
	kid string
}

func parseSigner(pemKey []byte, kid string) (*signer, error) {
	block, _ := pem.Decode(pemKey)
	if block == nil {
		return nil, fmt.Errorf("%w: secret.private_key: not a PEM block", backends.ErrInvalidConfig)
	}
	var key any
	var err error
	switch block.Type {
	case "EC PRIVATE KEY":
		key, err = x509.ParseECPrivateKey(block.Bytes)
	case "RSA PRIVATE KEY":
		key, err = x509.ParsePKCS1PrivateKey(block.Bytes)
	default:
		key, err = x509.ParsePKCS8PrivateKey(block.Bytes)
	}
	if err != nil {
		return nil, fmt.Errorf("%w: secret.private_key: not a private key this backend can use", backends.ErrInvalidConfig)
	}
	switch k := key.(type) {
	case *ecdsa.PrivateKey:
		if k.Curve != elliptic.P256() {
			return nil, fmt.Errorf("%w: secret.private_key: EC keys must be P-256 (ES256)", backends.ErrInvalidConfig)
		}
		return &signer{key: k, alg: "ES256", kid: kid}, nil
	case *rsa.PrivateKey:
		if k.N.BitLen() < 2048 {
			return nil, fmt.Errorf("%w: secret.private_key: RSA keys must have at least 2048 bits", backends.ErrInvalidConfig)
		}
		return &signer{key: k, alg: "RS256", kid: kid}, nil
	}
	return nil, fmt.Errorf("%w: secret.private_key: use a P-256 EC or RSA key", backends.ErrInvalidConfig)
}

// assertion signs a one-minute client assertion for audience (the token
// endpoint), with a fresh jti so the server can refuse replays.
func (s *signer) assertion(clientID, audience string) (string, error) {
	header := map[string]string{"alg": s.alg, "typ": "JWT"}
	if s.kid != "" {
		header["kid"] = s.kid
	}
	jti := make([]byte, 16)
	if _, err := rand.Read(jti); err != nil {
		return "", err
	}
	now := time.Now()
	claims := map[string]any{"iss": clientID, "sub": clientID, "aud": audience, "jti": hex.EncodeToString(jti),
		"iat": now.Unix(), "exp": now.Add(time.Minute).Unix()}
	h, err := json.Marshal(header)
	if err != nil {
		return "", err
	}
	c, err := json.Marshal(claims)
	if err != nil {
		return "", err
	}
	enc := base64.RawURLEncoding
	signing := enc.EncodeToString(h) + "." + enc.EncodeToString(c)
	digest := sha256.Sum256([]byte(signing))
	var sig []byte
	switch k := s.key.(type) {
	case *ecdsa.PrivateKey:
		r, ss, err := ecdsa.Sign(rand.Reader, k, digest[:])
		if err != nil {
			return "", err
		}
		sig = make([]byte, 64) // JWS: r and s, 32 bytes each
		r.FillBytes(sig[:32])
		ss.FillBytes(sig[32:])
	case *rsa.PrivateKey:
		if sig, err = rsa.SignPKCS1v15(rand.Reader, k, crypto.SHA256, digest[:]); err != nil {
			return "", err
		}
	}
	return signing + "." + enc.EncodeToString(sig), nil
}

// PublicJWK is the public half of an ES256 key as a JSON Web Key, for
// registering a private_key_jwt client with an authorization server.
func PublicJWK(pub *ecdsa.PublicKey, kid string) map[string]string {
	enc := base64.RawURLEncoding
	point, err := pub.Bytes() // 0x04 || X || Y, 32 bytes each for P-256
	if err != nil || len(point) != 65 {
		return nil
	}
	return map[string]string{"kty": "EC", "crv": "P-256", "x": enc.EncodeToString(point[1:33]), "y": enc.EncodeToString(point[33:]),
		"kid": kid, "use": "sig", "alg": "ES256"}
}

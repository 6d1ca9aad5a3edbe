package server

import (
	"encoding/base64"
	"regexp"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/protobuf/types/known/durationpb"
)

// Limits on request fields. They keep records small and indexes usable, and
// are documented in the API reference (docs/api.md).
const (
	maxNameLen        = 128
	maxScopes         = 64
	maxTextLen        = 1024
	maxSecretFields   = 64
	maxSecretValueLen = 64 << 10
	maxConfigFields   = 64
	maxPageSize       = 1000
	defaultPageSize   = 100
)

var (
	credentialNameRE = regexp.MustCompile(`^[a-z0-9][a-z0-9._/-]*$`)
	scopeRE          = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._:/-]*$`)
	taskIDRE         = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._:/-]*$`)
	fieldKeyRE       = regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_.-]*$`)
	leaseIDRE        = regexp.MustCompile(`^ls_[0-9a-f]{32}$`)
	grantIDRE        = regexp.MustCompile(`^gr_[0-9a-f]{32}$`)
)

func validCredentialName(field, v string) error {
	switch {
	case v == "":
		return errInvalid(field, "is required")
	case len(v) > maxNameLen:
		return errInvalid(field, "is longer than %d characters", maxNameLen)
	case !credentialNameRE.MatchString(v):
		return errInvalid(field, "%q must be lowercase letters, digits and . _ / -, starting with a letter or digit", v)
	case strings.Contains(v, "//") || strings.HasSuffix(v, "/"):
		return errInvalid(field, "%q has an empty path segment", v)
	}
	return nil
}

func validScopes(field string, scopes []string, required bool) error {
	if required && len(scopes) == 0 {
		return errInvalid(field, "at least one scope is required")
	}
	if len(scopes) > maxScopes {
		return errInvalid(field, "at most %d scopes", maxScopes)
	}
	seen := make(map[string]bool, len(scopes))
	for i, s := range scopes {
		f := field + "[" + strconv.Itoa(i) + "]"
		switch {
		case s == "":
			return errInvalid(f, "is empty")
		case len(s) > maxNameLen:
			return errInvalid(f, "is longer than %d characters", maxNameLen)
		case !scopeRE.MatchString(s):
			return errInvalid(f, "%q must be letters, digits and . _ : / -", s)
		case seen[s]:
			return errInvalid(f, "%q is listed twice", s)
		}
		seen[s] = true
	}
	return nil
}

func validTaskID(field, v string, required bool) error {
	switch {
	case v == "" && required:
		return errInvalid(field, "is required: every lease is for a task")
	case v == "":
		return nil
	case len(v) > maxNameLen:
		return errInvalid(field, "is longer than %d characters", maxNameLen)
	case !taskIDRE.MatchString(v):
		return errInvalid(field, "%q must be letters, digits and . _ : / -, starting with a letter or digit", v)
	}
	return nil
}

func validText(field, v string) error {
	if len(v) > maxTextLen {
		return errInvalid(field, "is longer than %d bytes", maxTextLen)
	}
	for _, r := range v {
		if r < 0x20 && r != '\t' {
			return errInvalid(field, "contains a control character")
		}
	}
	return nil
}

// validDuration checks an optional duration: when set it must be in (0, max].
func validDuration(field string, d *durationpb.Duration, max time.Duration) (time.Duration, error) {
	if d == nil {
		return 0, nil
	}
	if err := d.CheckValid(); err != nil {
		return 0, errInvalid(field, "is not a valid duration")
	}
	v := d.AsDuration()
	if v <= 0 {
		return 0, errInvalid(field, "must be positive, got %v", v)
	}
	if v > max {
		return 0, errInvalid(field, "%v is above the broker's limit of %v", v, max)
	}
	return v, nil
}

// validSpiffeID parses a SPIFFE ID that must be in the broker's trust domain.
func validSpiffeID(field, v string, td spiffeid.TrustDomain) (spiffeid.ID, error) {
	if v == "" {
		return spiffeid.ID{}, errInvalid(field, "is required")
	}
	id, err := spiffeid.FromString(v)
	if err != nil {
		return spiffeid.ID{}, errInvalid(field, "%q is not a valid SPIFFE ID: %v", v, err)
	}
	if id.TrustDomain() != td {
		return spiffeid.ID{}, errInvalid(field, "%q is not in the broker's trust domain %q", v, td.Name())
	}
	return id, nil
}

func validLeaseID(field, v string) error {
	if v == "" {
		return errInvalid(field, "is required")
	}
	if !leaseIDRE.MatchString(v) {
		return errInvalid(field, "%q is not a lease id (ls_ followed by 32 hex digits)", truncate(v, 80))
	}
	return nil
}

func validGrantID(field, v string) error {
	if v == "" {
		return errInvalid(field, "is required")
	}
	if !grantIDRE.MatchString(v) {
		return errInvalid(field, "%q is not a grant id (gr_ followed by 32 hex digits)", truncate(v, 80))
	}
	return nil
}

func validFields(field string, m map[string]string, maxFields, maxValue int) error {
	if len(m) > maxFields {
		return errInvalid(field, "at most %d fields", maxFields)
	}
	for k, v := range m {
		switch {
		case len(k) > maxNameLen || !fieldKeyRE.MatchString(k):
			return errInvalid(field, "key %q must be letters, digits and _ . -, starting with a letter or _", truncate(k, 80))
		case len(v) > maxValue:
			// Never echo a value: it may be a secret.
			return errInvalid(field+"."+k, "value is longer than %d bytes", maxValue)
		}
	}
	return nil
}

func validPageSize(field string, n int32) (int, error) {
	switch {
	case n < 0:
		return 0, errInvalid(field, "must not be negative")
	case n == 0:
		return defaultPageSize, nil
	case n > maxPageSize:
		return 0, errInvalid(field, "at most %d", maxPageSize)
	}
	return int(n), nil
}

// Page tokens are opaque to callers: base64url of "<kind>:<key>".
func pageToken(kind, key string) string {
	return base64.RawURLEncoding.EncodeToString([]byte(kind + ":" + key))
}

func parsePageToken(field, kind, tok string) (string, error) {
	if tok == "" {
		return "", nil
	}
	raw, err := base64.RawURLEncoding.DecodeString(tok)
	if err != nil || !utf8.Valid(raw) {
		return "", errInvalid(field, "is malformed")
	}
	key, ok := strings.CutPrefix(string(raw), kind+":")
	if !ok || key == "" {
		return "", errInvalid(field, "is malformed or belongs to another list")
	}
	return key, nil
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "…"
}

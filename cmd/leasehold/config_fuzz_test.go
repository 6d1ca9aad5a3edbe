package main

import (
	"os"
	"path/filepath"
	"testing"
)

// A config file, whatever its bytes, is loaded or refused with an error,
// never a panic. (Unknown keys are refused: config_test.go.)
func FuzzConfigFile(f *testing.F) {
	for _, s := range []string{
		"listen: 127.0.0.1:8443\ntrust_domain: example.org\nadmins: [spiffe://example.org/admin]\n",
		"store: {engine: bolt, path: /tmp/x.db}\nleases: {default_ttl: 5m, max_ttl: 24h}\n",
		"audit:\n  sinks:\n    - type: file\n      path: /tmp/a\n",
		"nope: 1\n", "listen: [1,2]\n", "leases: {default_ttl: forever}\n", "- a\n- b\n", "{{{", "",
	} {
		f.Add(s)
	}
	dir := f.TempDir()
	f.Fuzz(func(t *testing.T, data string) {
		path := filepath.Join(dir, "c.yaml")
		if err := os.WriteFile(path, []byte(data), 0o600); err != nil {
			t.Fatal(err)
		}
		var c Config
		if err := loadConfigFile(path, &c); err != nil {
			return
		}
		_ = c.Validate() // and validating what loaded never panics either
	})
}

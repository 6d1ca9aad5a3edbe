#!/usr/bin/env bash
# Installs the Debian packages the tests need, when they are missing:
# PostgreSQL (the server binaries; tests start throwaway clusters themselves).
# Idempotent; runs as root or through sudo. Called by `make deps` (and so by
# `make test`).
set -euo pipefail

have_postgres() { compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null; }

if have_postgres; then
  exit 0
fi
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO=sudo
echo "install-deps: installing PostgreSQL from Debian's packages" >&2
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq postgresql >/dev/null
# Debian starts a system cluster on install; the tests use their own.
$SUDO service postgresql stop >/dev/null 2>&1 || true
have_postgres

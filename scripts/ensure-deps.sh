#!/usr/bin/env bash
# Installs what the tests and `make run` need from the system's packages, where missing:
# redis-server and the PostgreSQL server. Runs `apt-get update` at most once.
set -euo pipefail

missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && ! command -v initdb >/dev/null 2>&1; then
    missing+=(postgresql)
fi
command -v psql >/dev/null 2>&1 || missing+=(postgresql-client)

if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi

echo "ensure-deps: installing ${missing[*]} from the system's packages" >&2
sudo=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        sudo="sudo"
    else
        echo "ensure-deps: ${missing[*]} missing and not running as root; install them with your package manager" >&2
        exit 1
    fi
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "ensure-deps: no apt-get here; install ${missing[*]} with your package manager" >&2
    exit 1
fi
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq redis-server postgresql >/dev/null
echo "ensure-deps: done" >&2

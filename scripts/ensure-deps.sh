#!/usr/bin/env bash
# Installs what `make run` needs, where missing: redis-server, the PostgreSQL server and openssl
# (the TLS tests' certificates), from the system's packages. With --ops, also what `make test`
# needs to validate the operations artefacts: promtool (prometheus) and docker-compose (no
# engine is needed) from the system's packages, and kubernetes-validate and schemathesis from
# PyPI into target/ops-venv.
# Runs `apt-get update` at most once, and only when something is missing.
#
# Packages that ship a system service (redis-server, postgresql, prometheus) would start it,
# listening on the standard port (Prometheus on every interface), and enable it at boot: this
# script runs its own servers on other ports. So during its install no service may start
# (a policy-rc.d that says no, where none exists), and afterwards the services of the packages
# it installed itself are disabled. Services that were installed, or running, before are left
# as they are.
set -euo pipefail
cd "$(dirname "$0")/.."
ops=false
[ "${1:-}" = "--ops" ] && ops=true

if ! command -v cargo >/dev/null 2>&1; then
    echo "ensure-deps: cargo is missing; install Rust with rustup (https://rustup.rs), then run this again" >&2
    exit 1
fi

missing=()
# Rust links through the system's C compiler, and some crates (ring) compile C.
if ! command -v cc >/dev/null 2>&1 && ! command -v gcc >/dev/null 2>&1 && ! command -v clang >/dev/null 2>&1; then
    echo "ensure-deps: no C compiler (cc); Rust needs one to link: installing gcc and libc6-dev" >&2
    missing+=(gcc libc6-dev)
fi
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && ! command -v initdb >/dev/null 2>&1; then
    missing+=(postgresql)
fi
command -v psql >/dev/null 2>&1 || missing+=(postgresql-client)
# The TLS tests make their certificates with the openssl command.
command -v openssl >/dev/null 2>&1 || missing+=(openssl)
if $ops; then
    command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
    command -v docker-compose >/dev/null 2>&1 || missing+=(docker-compose)
    python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || missing+=(python3-venv)
fi

if [ ${#missing[@]} -gt 0 ]; then
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
    # No service starts while this installs (invoke-rc.d and deb-systemd-invoke ask policy-rc.d).
    policy="${POLICY_RC_D:-/usr/sbin/policy-rc.d}"
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\n# ensure-deps: no service starts during its install\nexit 101\n' | $sudo tee "$policy" >/dev/null
        $sudo chmod 755 "$policy"
        trap '$sudo rm -f "$policy"' EXIT
    fi
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    # ...nor at the next boot: the services of the packages installed here, and only those.
    for package in "${missing[@]}"; do
        case "$package" in
            redis-server) services=(redis-server) ;;
            postgresql) services=(postgresql) ;;
            prometheus) services=(prometheus) ;;
            *) services=() ;;
        esac
        for service in "${services[@]}"; do
            if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
                $sudo systemctl disable --now "$service" >/dev/null 2>&1 || true
            elif command -v update-rc.d >/dev/null 2>&1; then
                $sudo update-rc.d "$service" disable >/dev/null 2>&1 || true
            fi
            echo "ensure-deps: installed $package; its system service $service is left stopped and disabled" >&2
        done
    done
fi

$ops || exit 0

# Python tools, pinned, in a venv of the project's own.
venv=target/ops-venv
want="kubernetes-validate==1.37.0 schemathesis==4.32.5"
if [ ! -x "$venv/bin/schemathesis" ] || [ ! -x "$venv/bin/kubernetes-validate" ] || [ "$(cat "$venv/.pinned" 2>/dev/null)" != "$want" ]; then
    echo "ensure-deps: installing $want into $venv" >&2
    rm -rf "$venv"
    mkdir -p target
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q --disable-pip-version-check $want
    echo "$want" > "$venv/.pinned"
fi

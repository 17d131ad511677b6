#!/usr/bin/env bash
# `make test`: the shell scripts parse, and ensure-deps.sh, on a machine missing redis-server,
# installs it with no service allowed to start (policy-rc.d answers 101 during the install),
# disables the service of the package it installed, and removes its policy-rc.d afterwards.
# apt-get, update-rc.d and the tools found present are fakes here: nothing is installed.
set -euo pipefail
cd "$(dirname "$0")/.."

for script in scripts/*.sh; do
    bash -n "$script"
done

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
fake="$work/bin"
mkdir -p "$fake"
for tool in bash ls dirname tee chmod rm id cat; do
    ln -s "$(command -v "$tool")" "$fake/$tool"
done
for tool in cargo cc psql openssl initdb; do
    printf '#!/bin/sh\nexit 0\n' > "$fake/$tool"
done
cat > "$fake/apt-get" <<'FAKE'
#!/bin/sh
if [ "$1" = install ] || [ "$2" = install ] || [ "$3" = install ]; then
    "$POLICY_RC_D" redis-server start; echo "install $* policy=$?" >> "$LOG"
fi
FAKE
printf '#!/bin/sh\necho "update-rc.d $*" >> "$LOG"\n' > "$fake/update-rc.d"
chmod +x "$fake"/*

export LOG="$work/log" POLICY_RC_D="$work/policy-rc.d"
if [ "$(id -u)" -ne 0 ]; then
    echo "check-scripts: not root; ensure-deps' install path not checked" >&2
    exit 0
fi
PATH="$fake" bash scripts/ensure-deps.sh 2>"$work/stderr" || { cat "$work/stderr" >&2; exit 1; }
fail() { echo "check-scripts: ensure-deps: $*" >&2; cat "$LOG" >&2; exit 1; }
grep -q 'install .*redis-server.* policy=101' "$LOG" || fail "installed redis-server with services allowed to start"
grep -qx 'update-rc.d redis-server disable' "$LOG" || fail "left redis-server's service enabled"
grep -q 'update-rc.d postgresql' "$LOG" && fail "touched the service of a package it did not install"
[ ! -e "$POLICY_RC_D" ] || fail "left its policy-rc.d behind"
echo "check-scripts: scripts parse; ensure-deps installs without starting or enabling services"

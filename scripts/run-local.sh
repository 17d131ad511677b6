#!/usr/bin/env bash
# `make run`: starts a local Redis and PostgreSQL under .run/, applies the migrations, seeds demo
# chats on first start, then runs the services in the foreground. Ctrl-C stops everything.
#
# The MAX API is the workspace's simulator (maxsim), never the real one.
# Ports can be changed with REDIS_PORT, PG_PORT, API_PORT, SYNCD_PORT and MAXSIM_PORT.
set -euo pipefail
cd "$(dirname "$0")/.."

STATE="$PWD/.run"
REDIS_PORT="${REDIS_PORT:-6399}"
PG_PORT="${PG_PORT:-5499}"
API_PORT="${API_PORT:-8082}"
SYNCD_PORT="${SYNCD_PORT:-9091}"
MAXSIM_PORT="${MAXSIM_PORT:-9099}"
DEMO_CHATS="${DEMO_CHATS:-2000}"
mkdir -p "$STATE"

log() { printf '\033[1mrun:\033[0m %s\n' "$*" >&2; }

port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

PGBIN="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)"
[ -n "$PGBIN" ] || PGBIN="$(dirname "$(command -v initdb)")"
as_postgres() {
    # From /, which the postgres user can enter whatever the checkout's mode (paths are absolute).
    if [ "$(id -u)" -eq 0 ]; then (cd / && runuser -u postgres -- "$@"); else "$@"; fi
}

# The cluster's directory. Postgres refuses to run as root, so as root the server runs as the
# `postgres` user, which must reach the directory: under a checkout it cannot enter (e.g.
# /root, mode 700) the cluster lives under /var/tmp instead, named after this checkout, and
# .run/pg links to it.
PGDATA="$STATE/pg"
if [ "$(id -u)" -eq 0 ] && ! as_postgres test -x "$STATE"; then
    PGDATA="/var/tmp/participants-run-$(printf '%s' "$PWD" | cksum | cut -d' ' -f1)/pg"
    mkdir -p "$PGDATA"
    chown postgres:postgres "$(dirname "$PGDATA")" "$PGDATA"
    chmod 700 "$(dirname "$PGDATA")"
    if [ -L "$STATE/pg" ] || [ ! -e "$STATE/pg" ]; then ln -sfn "$PGDATA" "$STATE/pg"; fi
fi

pids=()
cleanup() {
    log "stopping"
    # Newest first: the api and syncd stop before the MAX simulator they depend on.
    for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
        kill "${pids[i]}" 2>/dev/null || true
        wait "${pids[i]}" 2>/dev/null || true
    done
    if [ -f "$STATE/redis.pid" ]; then kill "$(cat "$STATE/redis.pid")" 2>/dev/null || true; fi
    as_postgres "$PGBIN/pg_ctl" -D "$PGDATA" -m fast -w stop >/dev/null 2>&1 || true
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# PostgreSQL
if [ ! -f "$PGDATA/PG_VERSION" ]; then
    log "creating a PostgreSQL cluster in $PGDATA"
    mkdir -p "$PGDATA"
    if [ "$(id -u)" -eq 0 ]; then chown postgres:postgres "$PGDATA"; fi
    as_postgres "$PGBIN/initdb" -D "$PGDATA" -U postgres --auth=trust -E UTF8 --locale=C.UTF-8 >/dev/null
fi
if port_busy "$PG_PORT"; then
    log "port $PG_PORT is taken; set PG_PORT to a free port"; exit 1
fi
if [ "$(id -u)" -eq 0 ]; then chown postgres:postgres "$PGDATA"; fi
as_postgres "$PGBIN/pg_ctl" -D "$PGDATA" -l "$PGDATA/server.log" -w \
    -o "-p $PG_PORT -k $PGDATA -c listen_addresses=127.0.0.1" start >/dev/null
log "postgres on 127.0.0.1:$PG_PORT (data in $PGDATA)"

# Redis
if port_busy "$REDIS_PORT"; then
    log "port $REDIS_PORT is taken; set REDIS_PORT to a free port"; exit 1
fi
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --daemonize yes --save '' --appendonly no \
    --maxmemory-policy volatile-lru --dir "$STATE" --pidfile "$STATE/redis.pid" --logfile "$STATE/redis.log"
log "redis on 127.0.0.1:$REDIS_PORT"

log "building (release)"
cargo build --release --quiet -p api -p syncd -p maxsim

export DATABASE_URL="postgres://postgres@127.0.0.1:$PG_PORT/postgres"
# One role locally: the migration runs as the same owner (production separates them).
export MIGRATE_DATABASE_URL="$DATABASE_URL"
export REDIS_URL="redis://127.0.0.1:$REDIS_PORT"
export JWT_SECRET="${JWT_SECRET:-local-development-secret-change-me}"
export API_LISTEN_ADDR="127.0.0.1:$API_PORT"
export LOG_FORMAT="${LOG_FORMAT:-text}"
# Short freshness windows so that the loop is visible within a minute.
export PARTICIPANTS_STALE_THRESHOLD="${PARTICIPANTS_STALE_THRESHOLD:-2m}"
export PARTICIPANTS_CACHE_TTL="${PARTICIPANTS_CACHE_TTL:-10m}"
export PARTICIPANTS_UPDATE_INTERVAL="${PARTICIPANTS_UPDATE_INTERVAL:-1m}"
export MAX_API_URL="http://127.0.0.1:$MAXSIM_PORT"
export MAX_API_TOKEN="sim-token"
export MAX_API_RPS="${MAX_API_RPS:-30}"
export SYNCD_LISTEN_ADDR="127.0.0.1:$SYNCD_PORT"

./target/release/api migrate
if [ "$(psql -X -q -A -t "$DATABASE_URL" -c 'select count(*) from chats')" = "0" ]; then
    log "seeding $DEMO_CHATS demo chats"
    psql -X -q "$DATABASE_URL" -v n="$DEMO_CHATS" -f scripts/seed-demo.sql
fi

for port in "$API_PORT" "$SYNCD_PORT" "$MAXSIM_PORT"; do
    if port_busy "$port"; then
        log "port $port is taken; set API_PORT, SYNCD_PORT or MAXSIM_PORT to a free port"; exit 1
    fi
done
./target/release/maxsim --listen-addr "127.0.0.1:$MAXSIM_PORT" --token "$MAX_API_TOKEN" \
    --rate-limit "$MAX_API_RPS" --latency 30ms --removed-permille 20 --churn-period 5m &
pids+=($!)
./target/release/syncd run &
pids+=($!)
./target/release/api serve &
pids+=($!)
for _ in $(seq 1 100); do
    port_busy "$API_PORT" && break
    sleep 0.1
done
# The api answers reads once its read model has loaded the chats (/health/ready).
if command -v curl >/dev/null 2>&1; then
    for _ in $(seq 1 100); do
        curl -sf "http://127.0.0.1:$API_PORT/health/ready" >/dev/null && break
        sleep 0.1
    done
fi

TOKEN="$(./target/release/api token --allow-token-minting --role super_admin --ttl 24h)"
cat >&2 <<MSG

  The api is up on http://127.0.0.1:$API_PORT. Try:

    curl -s -H "Authorization: Bearer $TOKEN" 'http://127.0.0.1:$API_PORT/chats/all?limit=3&search=Математика' | python3 -m json.tool

  Health: curl -s http://127.0.0.1:$API_PORT/health/detailed
  syncd:  curl -s http://127.0.0.1:$SYNCD_PORT/metrics | grep ^participants_
  MAX simulator: curl -s http://127.0.0.1:$MAXSIM_PORT/_sim/stats | head -c 300

  A stale chat you read is refreshed by syncd within a second or two: read it again.
  Ctrl-C stops everything; data stays in .run/ for the next start.

MSG
wait -n "${pids[@]}"

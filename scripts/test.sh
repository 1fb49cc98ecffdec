#!/usr/bin/env bash
# Runs every test of the workspace against real PostgreSQL and Redis.
#
#   scripts/test.sh [extra cargo test arguments]       (README's test command: `make test`)
#
# 1. Installs what is missing (scripts/prereqs.sh test): cmake, a C compiler, PostgreSQL,
#    Redis, openssl, curl, nginx, python3, promtool; and the Python example upstream's venv
#    (.venv/upstream-python: PyJWT, for the suite's kit_upstream tests).
# 2. PostgreSQL: uses ONEPROTECT_TEST_DATABASE_URL when it is set and answers; otherwise
#    starts a private, throwaway server: initdb into a temp dir, `postgres` on a free
#    loopback port (as the unprivileged `postgres` user, or `nobody`, when run as root,
#    since PostgreSQL refuses root), trust auth, a database `test`.
# 3. Redis: uses ONEPROTECT_TEST_REDIS_URL when it is set and answers; otherwise starts
#    `redis-server --port <free> --save ''` in the same temp dir.
# 4. Runs `cargo test --workspace --locked` with both URLs exported (only the named
#    packages when the arguments carry `-p`).
# 5. Stops what it started and removes the temp dir on exit, Ctrl-C or failure: nothing
#    is left running and no system service is touched. Two runs in parallel (two clones)
#    get their own ports and directories.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/prereqs.sh

say() { printf '==> %s\n' "$*" >&2; }

ensure_prereqs test
ensure_python_example

WORK=$(mktemp -d "${TMPDIR:-/tmp}/oneprotect-test.XXXXXX")
PG_PID="" REDIS_PID=""
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  [ -n "$PG_PID" ] && stop_postgres
  if [ -n "$REDIS_PID" ] && kill -0 "$REDIS_PID" 2>/dev/null; then
    say "stopping the private Redis (pid $REDIS_PID)"
    kill -TERM "$REDIS_PID" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "$REDIS_PID" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$REDIS_PID" 2>/dev/null || true
  fi
  rm -rf "$WORK"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

stop_postgres() {
  # The postmaster is the wrapper's child when it runs as another user: its pid is in
  # postmaster.pid. SIGINT is PostgreSQL's fast shutdown.
  local pm
  pm=$(head -1 "$WORK/pg/data/postmaster.pid" 2>/dev/null || true)
  say "stopping the private PostgreSQL (pid ${pm:-$PG_PID})"
  for p in $pm $PG_PID; do kill -INT "$p" 2>/dev/null || true; done
  for _ in $(seq 1 100); do
    kill -0 "${pm:-$PG_PID}" 2>/dev/null || break
    sleep 0.1
  done
  for p in $pm $PG_PID; do kill -KILL "$p" 2>/dev/null || true; done
  wait "$PG_PID" 2>/dev/null || true
  PG_PID=""
}

port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
random_port() { # a port in 20000..59999 nobody listens on right now
  local p
  for _ in $(seq 1 50); do
    p=$(( 20000 + (RANDOM * 32768 + RANDOM) % 40000 ))
    port_in_use "$p" || { echo "$p"; return; }
  done
  say "no free port found"; exit 1
}

pg_answers() { # pg_answers <url>
  "$(pg_bin_dir)/pg_isready" -q -t 3 -d "$1" 2>/dev/null
}
redis_answers() { # redis_answers <url>
  [ "$(timeout 3 redis-cli -u "$1" ping 2>/dev/null)" = PONG ]
}

# The user a private PostgreSQL runs as: PostgreSQL refuses to run as root.
pg_run_as() {
  if [ "$(id -u)" -ne 0 ]; then "$@"; return; fi
  local user=postgres
  id -u "$user" >/dev/null 2>&1 || user=nobody
  if command -v runuser >/dev/null 2>&1; then
    runuser -u "$user" -- "$@"
  else
    su -s /bin/sh "$user" -c "$(printf '%q ' "$@")"
  fi
}

start_private_postgres() {
  local bin dir port
  bin=$(pg_bin_dir)
  dir="$WORK/pg"
  mkdir -p "$dir"
  if [ "$(id -u)" -eq 0 ]; then
    local user=postgres
    id -u "$user" >/dev/null 2>&1 || user=nobody
    chown "$user" "$dir"
    chmod 755 "$WORK"
  fi
  say "PostgreSQL: initdb into $dir ($("$bin/postgres" --version))"
  pg_run_as "$bin/initdb" -D "$dir/data" -U postgres --auth=trust --no-sync -E UTF8 \
    --locale=C >"$WORK/initdb.log" 2>&1 || { cat "$WORK/initdb.log" >&2; exit 1; }
  for attempt in 1 2 3 4 5; do
    port=$(random_port)
    pg_run_as "$bin/postgres" -D "$dir/data" -k "$dir" -h 127.0.0.1 -p "$port" \
      -c fsync=off -c synchronous_commit=off -c full_page_writes=off \
      -c max_connections=300 -c shared_buffers=128MB -c logging_collector=off \
      >"$WORK/postgres.log" 2>&1 &
    PG_PID=$!
    for _ in $(seq 1 100); do
      "$bin/pg_isready" -q -h 127.0.0.1 -p "$port" && break
      kill -0 "$PG_PID" 2>/dev/null || break
      sleep 0.1
    done
    if "$bin/pg_isready" -q -h 127.0.0.1 -p "$port"; then
      "$bin/createdb" -h 127.0.0.1 -p "$port" -U postgres test
      export ONEPROTECT_TEST_DATABASE_URL="postgres://postgres@127.0.0.1:$port/test"
      say "PostgreSQL: private server on 127.0.0.1:$port (pid $PG_PID)"
      return
    fi
    say "PostgreSQL did not start on port $port (attempt $attempt):"
    tail -5 "$WORK/postgres.log" >&2
    stop_postgres
  done
  exit 1
}

start_private_redis() {
  local port
  for attempt in 1 2 3 4 5; do
    port=$(random_port)
    redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no \
      --dir "$WORK" --logfile "$WORK/redis.log" --maxclients 4000 &
    REDIS_PID=$!
    for _ in $(seq 1 50); do
      [ "$(redis-cli -p "$port" ping 2>/dev/null)" = PONG ] && break
      kill -0 "$REDIS_PID" 2>/dev/null || break
      sleep 0.1
    done
    if [ "$(redis-cli -p "$port" ping 2>/dev/null)" = PONG ]; then
      export ONEPROTECT_TEST_REDIS_URL="redis://127.0.0.1:$port"
      say "Redis: private server on 127.0.0.1:$port (pid $REDIS_PID, $(redis-server --version | cut -d' ' -f3))"
      return
    fi
    say "Redis did not start on port $port (attempt $attempt):"
    tail -5 "$WORK/redis.log" >&2 || true
    kill "$REDIS_PID" 2>/dev/null || true
    wait "$REDIS_PID" 2>/dev/null || true
    REDIS_PID=""
  done
  exit 1
}

if [ -n "${ONEPROTECT_TEST_DATABASE_URL:-}" ] && pg_answers "$ONEPROTECT_TEST_DATABASE_URL"; then
  say "PostgreSQL: using ONEPROTECT_TEST_DATABASE_URL (it answers)"
else
  [ -n "${ONEPROTECT_TEST_DATABASE_URL:-}" ] &&
    say "PostgreSQL: ONEPROTECT_TEST_DATABASE_URL does not answer; starting a private one"
  start_private_postgres
fi
if [ -n "${ONEPROTECT_TEST_REDIS_URL:-}" ] && redis_answers "$ONEPROTECT_TEST_REDIS_URL"; then
  say "Redis: using ONEPROTECT_TEST_REDIS_URL (it answers)"
else
  [ -n "${ONEPROTECT_TEST_REDIS_URL:-}" ] &&
    say "Redis: ONEPROTECT_TEST_REDIS_URL does not answer; starting a private one"
  start_private_redis
fi

# The end-to-end tests run the workspace's binaries (gateway, enroll-api, dev stack,
# agent, bench); build them all in one go first (tests/src/lib.rs ensure_binary).
say "cargo build --workspace --bins --locked (from nothing the first build takes about 20 minutes on 2 cores)"
cargo build --workspace --bins --locked
# Every package, unless the arguments name some (`scripts/test.sh -p oneprotect-identity`).
scope=(--workspace)
for a in "$@"; do
  case $a in -p | -p* | --package | --package=*) scope=() ;; esac
done
say "cargo test ${scope[*]} --locked $*"
cargo test "${scope[@]}" --locked "$@"

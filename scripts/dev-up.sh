#!/usr/bin/env bash
# Starts the local system on embedded defaults and prints what to try next:
#   - enroll-api on SQLite (data under $DATA), dev root CA generated on first start,
#     HTTPS on 127.0.0.1:7443 and plain HTTP on 127.0.0.1:7080 (loopback, behind the gateway);
#   - a trivial upstream on 127.0.0.1:8081 (the bench harness' upstream: answers "ok");
#   - the gateway: mTLS on 127.0.0.1:8443, admin/metrics on 127.0.0.1:9090, revocation
#     state from Redis (REDIS_URL, default redis://127.0.0.1:6379).
# A bootstrap tenant and admin key are created on the first start and kept in $DATA/bootstrap.env.
# Ctrl-C stops everything. Issue 6 replaces this script with `oneprotect-dev up`.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-.data/dev}
REDIS_URL=${REDIS_URL:-redis://127.0.0.1:6379}
BIN=target/debug

redis_hostport=${REDIS_URL#redis://}; redis_hostport=${redis_hostport%%/*}
if ! (exec 3<>"/dev/tcp/${redis_hostport%:*}/${redis_hostport#*:}") 2>/dev/null; then
  echo "Redis is not answering at $REDIS_URL. Start one:" >&2
  echo "  redis-server --daemonize yes --port 6379 --save '' --appendonly no" >&2
  exit 1
fi

echo "==> building (first time: several minutes)"
cargo build -q -p oneprotect-enroll-api -p oneprotect-gateway -p oneprotect-agent -p oneprotect-bench

mkdir -p "$DATA"
DATA=$(cd "$DATA" && pwd)
# The gateway's assertion signing key, and the enroll-api entry that trusts it
# (the rotation endpoints accept only assertions signed by a pinned key).
if [ ! -f "$DATA/gateway-assertion.pem" ]; then
  $BIN/oneprotect-gateway --generate-assertion-key "$DATA/gateway-assertion.pem" --kid dev-gateway \
    >"$DATA/gateway-assertion.toml"
fi
cat > "$DATA/enroll-api.toml" <<TOML
trust_domain = "oneprotect.local"
data_dir = "$DATA/enroll-api"
[listen]
https = "127.0.0.1:7443"
http = "127.0.0.1:7080"
[redis]
url = "$REDIS_URL"
$(cat "$DATA/gateway-assertion.toml")
TOML

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM

wait_port() { # wait_port <port> <name> <log>
  for _ in $(seq 1 200); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.1
  done
  echo "$2 did not start; last lines of $3:" >&2; tail -20 "$3" >&2; exit 1
}

echo "==> enroll-api (log: $DATA/enroll-api.log)"
$BIN/oneprotect-enroll-api -c "$DATA/enroll-api.toml" serve >"$DATA/enroll-api.log" 2>&1 &
pids+=($!)
wait_port 7443 enroll-api "$DATA/enroll-api.log"
SERVER_CA="$DATA/enroll-api/tls/dev-cert.pem"
curl -sf --cacert "$SERVER_CA" https://127.0.0.1:7443/api/v1/trust-bundle >"$DATA/trust-bundle.pem"

if [ ! -f "$DATA/bootstrap.env" ]; then
  tenant=$($BIN/oneprotect-enroll-api -c "$DATA/enroll-api.toml" tenant create --name "Dev tenant" | grep -Eo '[0-9a-f-]{36}' | head -1)
  key=$($BIN/oneprotect-enroll-api -c "$DATA/enroll-api.toml" admin-key create --tenant "$tenant" --name dev | grep -Eo 'opak_[A-Za-z0-9_-]+' | head -1)
  umask 077
  printf 'TENANT_ID=%s\nADMIN_KEY=%s\n' "$tenant" "$key" >"$DATA/bootstrap.env"
fi
# shellcheck disable=SC1091
. "$DATA/bootstrap.env"

echo "==> upstream (log: $DATA/upstream.log)"
$BIN/oneprotect-bench upstream --listen 127.0.0.1:8081 >"$DATA/upstream.log" 2>&1 &
pids+=($!)
wait_port 8081 upstream "$DATA/upstream.log"

cat > "$DATA/gateway.toml" <<TOML
[listener]
listen = "127.0.0.1:8443"
cert = "$SERVER_CA"
key = "$DATA/enroll-api/tls/dev-key.pem"
trust_bundle = "$DATA/trust-bundle.pem"
trust_domain = "oneprotect.local"
[admin]
listen = "127.0.0.1:9090"
[assertion]
key_file = "$DATA/gateway-assertion.pem"
kid = "dev-gateway"
[revocation]
redis_url = "$REDIS_URL"
[[routes]]
prefix = "/api/v1/agent-enrollment/exchange"
upstreams = ["127.0.0.1:7080"]
require_identity = false
[[routes]]
prefix = "/api/v1/agents"
upstreams = ["127.0.0.1:7080"]
[[routes]]
prefix = "/"
upstreams = ["127.0.0.1:8081"]
TOML
echo "==> gateway (log: $DATA/gateway.log)"
$BIN/oneprotect-gateway --config "$DATA/gateway.toml" >"$DATA/gateway.log" 2>&1 &
pids+=($!)
wait_port 8443 gateway "$DATA/gateway.log"

cat <<MSG

OneProtect is up.
  enroll-api  https://127.0.0.1:7443   (admin API; server CA: $SERVER_CA)
  gateway     https://127.0.0.1:8443   (mTLS; /metrics on http://127.0.0.1:9090/metrics)
  tenant      $TENANT_ID
  admin key   in $DATA/bootstrap.env (ADMIN_KEY)

Try, in another shell:
  . $DATA/bootstrap.env
  TOKEN=\$(curl -s --cacert $SERVER_CA -H "authorization: Bearer \$ADMIN_KEY" \\
      -H content-type:application/json -d '{"ttl_seconds":600}' \\
      https://127.0.0.1:7443/api/v1/agent-enrollment/tokens | sed -E 's/.*"token":"([^"]+)".*/\1/')
  $BIN/oneprotect-agent --state-dir $DATA/agent enroll --server https://127.0.0.1:8443 \\
      --token "\$TOKEN" --ca-bundle $SERVER_CA
  $BIN/oneprotect-agent --state-dir $DATA/agent status
  $BIN/oneprotect-agent --state-dir $DATA/agent call GET /hello -i

Ctrl-C stops everything.
MSG
wait

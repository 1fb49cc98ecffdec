#!/usr/bin/env bash
# Instructions per keep-alive mTLS request through the gateway and through
# nginx, counted by valgrind's callgrind: instruction counts repeat on a
# shared, noisy machine where seconds do not. Kernel work (syscalls) is not
# counted.
#
# Two bench runs of different length under callgrind; the difference of the
# two totals divided by the difference of the requests served cancels
# start-up, configuration loading and the handshakes.
#
#   cargo build --release -p oneprotect-gateway -p oneprotect-bench -p oneprotect-enroll-api
#   scripts/profile-keepalive.sh            # PROTO=h2 for HTTP/2
#
# Needs valgrind (and nginx for its column). Writes the callgrind files to
# $OUT/{short,long}; read them with callgrind_annotate.
set -euo pipefail
cd "$(dirname "$0")/.."
BENCH=${BENCH:-target/release/oneprotect-bench}
OUT=${OUT:-bench/out/profile}
PROTO=${PROTO:-h1}
SHORT=${SHORT:-4}
LONG=${LONG:-12}
# More `oneprotect-bench all` options, e.g. BENCH_ARGS="--gateway-read-buffer 0".
BENCH_ARGS=${BENCH_ARGS:-}
command -v valgrind >/dev/null || { echo "valgrind is not installed (apt-get install valgrind)" >&2; exit 1; }
[ -x "$BENCH" ] || { echo "$BENCH not built (cargo build --release -p oneprotect-bench -p oneprotect-gateway)" >&2; exit 1; }
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)

run() { # run <label> <seconds>
  local d="$OUT/$1"
  rm -rf "$d"
  mkdir -p "$d"
  echo "callgrind run '$1' ($2 s per target, $PROTO)..." >&2
  ONEPROTECT_BENCH_GATEWAY_WRAPPER="valgrind --tool=callgrind --callgrind-out-file=$d/gateway.%p" \
  ONEPROTECT_BENCH_NGINX_WRAPPER="valgrind --tool=callgrind --callgrind-out-file=$d/nginx.%p" \
    "$BENCH" all --only keepalive --proto "$PROTO" --duration "$2" --concurrency 4 --agents 8 \
      --revoke-via redis --out "$d/run" --cache "$OUT/cache" $BENCH_ARGS >"$d/bench.log" 2>&1
}
run short "$SHORT"
run long "$LONG"

python3 - "$OUT" <<'EOF'
import glob, json, os, sys
out = sys.argv[1]

def total(files):
    n = 0
    for f in files:
        for line in open(f):
            if line.startswith(("summary:", "totals:")):
                n += int(line.split()[1])
                break
    return n

def requests(label, target):
    r = json.load(open(os.path.join(out, label, "run", "results.json")))
    return sum(x["ok"] for x in r["runs"] if x["target"] == target and x["scenario"] == "keepalive")

rows = []
for target in ("gateway", "nginx"):
    files = {l: glob.glob(os.path.join(out, l, f"{target}.*")) for l in ("short", "long")}
    if not files["short"] or not files["long"]:
        continue
    ir = total(files["long"]) - total(files["short"])
    req = requests("long", target) - requests("short", target)
    if req > 0:
        rows.append((target, ir, req, ir / req))
print("| target | extra instructions | extra requests | instructions per request |")
print("|---|---:|---:|---:|")
for t, ir, req, per in rows:
    print(f"| {t} | {ir:,} | {req:,} | {per:,.0f} |")
if len(rows) == 2:
    print(f"\ngateway / nginx: {rows[0][3] / rows[1][3]:.2f}x instructions per request")
EOF

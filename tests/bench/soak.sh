#!/usr/bin/env bash
# Soak benchmark (run by hand, not by CI): TOTAL leads (default 100,000) through each backend at
# a steady RATE per second (default 500), delivered to a local Onpipeline simulator, recording
# the gateway's resident memory and queue depth every second. Writes a CSV per backend and a
# summary to tests/bench/SOAK.md. Needs redis-server.
set -euo pipefail
cd "$(dirname "$0")/../.."
TOTAL=${TOTAL:-100000}
RATE=${RATE:-500}
out=tests/bench
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT

command -v redis-server >/dev/null || { echo "redis-server is needed" >&2; exit 1; }
cargo build --release --locked --bin leadgate --example soak

wait_port() { for _ in $(seq 200); do (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.1; done; echo "nothing on port $1" >&2; return 1; }

target/release/leadgate sim --listen 127.0.0.1:18443 --token soak-token:leadsin --ca-out "$work/ca.pem" \
  > "$work/sim.log" 2>&1 &
wait_port 18443

run() { # NAME EXTRA_ENV...
  local name=$1; shift
  env LEADGATE_LISTEN=127.0.0.1:18090 LEADGATE_SOURCES=tests/bench/sources.toml \
    LEADGATE_DATA_DIR="$work/data-$name" LEADGATE_ONPIPELINE_URL=https://127.0.0.1:18443 \
    LEADGATE_ONPIPELINE_TOKEN=soak-token LEADGATE_CA_FILE="$work/ca.pem" \
    LEADGATE_ONPIPELINE_RATE=$((RATE * 2)) LEADGATE_ADMIN_TOKEN=soak-admin-token \
    LEADGATE_DELIVERY_CONCURRENCY=16 RUST_LOG=warn "$@" \
    target/release/leadgate serve > "$work/gateway-$name.log" 2>&1 &
  local gw=$!
  wait_port 18090
  target/release/examples/soak --url http://127.0.0.1:18090 --pid $gw --admin-token soak-admin-token \
    --rate "$RATE" --total "$TOTAL" > "$out/soak-$name.csv"
  kill $gw; wait $gw 2>/dev/null || true
  # What the simulator received: every lead once, none twice. Then forget them for the next run.
  curl -sk --cacert "$work/ca.pem" https://127.0.0.1:18443/_sim/leads | python3 -c '
import json, sys
names = [lead["payload"]["LastName"] for lead in json.load(sys.stdin)]
print(f"{len(names)},{len(set(names))}")' > "$work/received-$name"
  curl -sk -X DELETE https://127.0.0.1:18443/_sim/leads
}

run embedded
redis-server --port 18379 --bind 127.0.0.1 --dir "$work" --appendonly yes --appendfsync everysec \
  --save "" --daemonize no > "$work/redis.log" 2>&1 &
redis=$!
wait_port 18379
run redis LEADGATE_REDIS_URL=redis://127.0.0.1:18379/
kill $redis; wait $redis 2>/dev/null || true

summary() { # CSV → a table row: sent, failed, received, distinct, seconds, RSS at 10 %, 50 %, end, peak, peak queue
  IFS=, read -r received distinct < "$work/received-$1"
  awk -F, -v name="$1" -v received="$received" -v distinct="$distinct" 'NR>1 { n++; t[n]=$1; rss[n]=$4; if ($4>peak) peak=$4; q=$5+$6+$7; if (q>pq) pq=q; failed=$3; sent=$2 }
    END { printf "| %s | %d | %d | %d | %d | %d | %.1f | %.1f | %.1f | %.1f | %d |\n", name, sent, failed, received, distinct, t[n],
      rss[int(n*0.1)+1]/1024, rss[int(n*0.5)+1]/1024, rss[n]/1024, peak/1024, pq }' "$2"
}
{
  echo "# Soak results"
  echo
  echo "Measured $(date -u +%Y-%m-%d) by \`tests/bench/soak.sh\`: $TOTAL leads per backend at $RATE/s, delivered to the simulator (upstream limit $((RATE * 2))/s)."
  echo "Machine: $(nproc) cores, $(awk -F: '/model name/ {print $2; exit}' /proc/cpuinfo | xargs), $(uname -sr). Per-second samples: \`soak-embedded.csv\`, \`soak-redis.csv\`."
  echo
  echo "| backend | leads sent | failed | received by Onpipeline | distinct | seconds | RSS at 10 % (MiB) | RSS at 50 % | RSS at end | peak RSS | peak queue depth |"
  echo "|---|---|---|---|---|---|---|---|---|---|---|"
  summary embedded "$out/soak-embedded.csv"
  summary redis "$out/soak-redis.csv"
} > "$out/SOAK.md"
cat "$out/SOAK.md"

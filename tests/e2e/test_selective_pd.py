"""Selective PD on the real stack: a second pd-proxy with
`--direct-below-tokens 256` in front of the stack's prefiller and decoder
(second_proxy.py says how it runs) calibrates its prompt-length estimate
from the real prefiller's /tokenize, then routes by it.

- The gauge pd_proxy_prompt_bytes_per_token equals what the prefiller's own
  /tokenize count of pd_proxy::tokens::CALIBRATION_TEXT (read from
  src/tokens.rs) gives, and the "calibrated" log line's chat-template
  figures equal the differences of the three counts.
- A short prompt (its true count well below 256) goes straight to the
  decoder: routes_total{route="direct"} +1, the prefiller serves nothing.
- An ordinary English prompt of >= 280 true tokens whose bytes the starting
  estimate (4 bytes per token) would have put below 256 goes through the
  prefiller: routes_total{route="pd"} +1, the prefiller serves one request.

Nothing of the model is assumed: every true count comes from /tokenize.
After test_real_stack.py (file order): the prefiller posts this proxy's
telemetry to the stack's proxy, which counts it as unknown ids.
"""

import time

import pytest

from conftest import NOTES
from second_proxy import (
    THRESHOLD,
    SecondProxy,
    calibration_text,
    gauge_for,
    http,
    initial_estimate,
    metric,
    tokenize,
)

MAX_TOKENS = 4
# Clearly past THRESHOLD, so the calibrated estimate is too.
LONG_TOKENS = 280
SHORT = "What is a good name for a small brown dog? Please answer in a few words."
SENTENCES = [
    "On Saturday morning we walked down to the market before the streets got busy.",
    "The baker on the corner sells warm bread, and the queue is always out of the door.",
    "My sister bought apples, a bunch of carrots and a small jar of honey.",
    "It started to rain just after ten, so we waited under the awning of a cafe.",
    "The waiter brought us two cups of tea and a plate of biscuits.",
    "We talked about the summer holiday and where we might go this year.",
    "She wants to visit the coast, but I would rather spend a week in the hills.",
    "In the end we agreed to look at train tickets when we got home.",
    "The rain stopped at noon and the sun came out over the old stone bridge.",
    "Children were feeding the ducks, and an old man was reading his newspaper on a bench.",
    "We bought flowers for our grandmother, whose birthday is on Sunday.",
    "On the way back we stopped at the library to return three books.",
    "The librarian told us that the reading room will close for repairs next month.",
    "At home I made soup with the carrots, an onion and some leftover potatoes.",
    "In the afternoon my sister wrote letters while I repaired the garden gate.",
    "By the evening the sky was clear, and we could see the first stars above the roofs.",
]


def chat(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


@pytest.fixture(scope="module")
def selective(stack):
    proxy = SecondProxy(stack)
    try:
        waited = proxy.wait_calibrated()
        NOTES.append(
            f"selective pd-proxy on :{proxy.port} ({proxy.binary}): ready and calibrated "
            f"after {waited:.1f}s"
        )
        yield proxy
    finally:
        how = proxy.stop()
        NOTES.append(f"selective pd-proxy stopped: {how}; log {proxy.log_path}")


def send(stack, proxy: SecondProxy, api: str, text: str) -> dict[str, float]:
    """One request through the second proxy; the change of its route
    counters, of the prefiller's and the decoder's finished requests, and of
    its KV-ready timeouts."""
    def counts():
        return {
            **proxy.routes(),
            "prefiller": metric(stack.prefiller, "vllm:request_success_total", default=0),
            "decoder": metric(stack.decoder, "vllm:request_success_total", default=0),
            "kv_timeouts": metric(proxy.url, "pd_proxy_kv_ready_timeouts_total", default=0),
        }

    before = counts()
    body = {"model": stack.model, "max_tokens": MAX_TOKENS}
    if api == "chat":
        body["messages"] = chat(text)
        path = "/v1/chat/completions"
    else:
        body["prompt"] = text
        path = "/v1/completions"
    status, _, out = http("POST", f"{proxy.url}{path}", body)
    assert status == 200, f"{api}: {status} {out[:500]}\n{proxy.log_tail()}"
    # vLLM counts a request finished a moment after its answer.
    deadline = time.monotonic() + 5
    while True:
        delta = {k: v - before[k] for k, v in counts().items()}
        if delta["decoder"] >= 1 or time.monotonic() > deadline:
            return delta
        time.sleep(0.2)


def test_calibrated_from_the_prefillers_tokenize(stack, selective):
    text = calibration_text()
    n_text = tokenize(stack.prefiller, stack.model, prompt=text, add_special_tokens=False)
    n_one = tokenize(stack.prefiller, stack.model, messages=chat(text))
    n_two = tokenize(
        stack.prefiller, stack.model, messages=chat(text) + [{"role": "assistant", "content": text}]
    )
    per_message = n_two - n_one - n_text
    fixed = n_one - n_text - per_message
    expected = gauge_for(n_text, len(text.encode()))
    gauge = selective.gauge()
    logged = selective.calibration()
    assert logged is not None, f"no calibration line in the log:\n{selective.log_tail()}"
    NOTES.append(
        f"calibration: /tokenize {n_text} tokens for {len(text.encode())} bytes (alone), "
        f"{n_one} (one message), {n_two} (two); logged {logged}; gauge {gauge}"
    )
    assert abs(gauge - expected) < 1e-9, f"gauge {gauge}, expected {expected} ({n_text} tokens)"
    assert abs(float(logged["bytes_per_token"]) - expected) < 1e-9, logged
    assert int(logged["template_per_message"]) == per_message, (logged, n_text, n_one, n_two)
    assert int(logged["template_fixed"]) == fixed, (logged, n_text, n_one, n_two)


@pytest.mark.parametrize("api", ["chat", "completions"])
def test_short_prompt_goes_direct(stack, selective, api):
    n = tokenize(stack.prefiller, stack.model, **({"messages": chat(SHORT)} if api == "chat" else {"prompt": SHORT}))
    assert n < THRESHOLD // 2, f"the short prompt is {n} tokens"
    delta = send(stack, selective, api, SHORT)
    assert delta["direct"] == 1 and delta["pd"] == 0, f"{api}, {n} tokens: {delta}"
    assert delta["prefiller"] == 0, f"the prefiller served a direct request: {delta}"
    assert delta["decoder"] == 1, delta
    assert delta["kv_timeouts"] == 0, delta


@pytest.mark.parametrize("api", ["chat", "completions"])
def test_long_prompt_of_few_bytes_goes_pd(stack, selective, api):
    """The longest English text whose bytes the starting estimate (4 bytes
    per token, before calibration) puts below 256 tokens is truly at least
    LONG_TOKENS: calibrated, the proxy must send it through the prefiller."""
    messages = 1 if api == "chat" else 0
    sentences, text = [], ""
    for sentence in SENTENCES * 4:
        longer = " ".join(sentences + [sentence])
        if initial_estimate(len(longer.encode()), messages) >= THRESHOLD:
            break
        sentences.append(sentence)
        text = longer
    nbytes = len(text.encode())
    n = tokenize(stack.prefiller, stack.model, **({"messages": chat(text)} if api == "chat" else {"prompt": text}))
    assert n + MAX_TOKENS <= stack.max_model_len, f"{n} tokens leave no room in {stack.max_model_len}"
    if n < LONG_TOKENS:
        pytest.skip(
            f"this tokenizer packs {nbytes / n:.2f} bytes per token: the longest text the starting "
            f"estimate puts below {THRESHOLD} tokens ({nbytes} bytes) is only {n} tokens"
        )
    delta = send(stack, selective, api, text)
    NOTES.append(
        f"selective {api}: {n} true tokens in {nbytes} bytes (starting estimate "
        f"{initial_estimate(nbytes, messages)}) -> {delta}"
    )
    assert delta["pd"] == 1 and delta["direct"] == 0, (
        f"{api}: {n} true tokens, {nbytes} bytes, gauge {selective.gauge()}, "
        f"calibration {selective.calibration()}: {delta}"
    )
    assert delta["prefiller"] == 1, f"the prefiller did not serve the PD request: {delta}"
    assert delta["decoder"] == 1, delta
    # Its telemetry goes to the stack's proxy: this one waits out the 2 s.
    assert delta["kv_timeouts"] == 1, delta


def test_selective_proxy_is_clean(selective):
    assert selective.proc.poll() is None, f"exited {selective.proc.returncode}\n{selective.log_tail()}"
    for name in ("pd_proxy_upstream_errors_total", "pd_proxy_retries_total", "pd_proxy_loops_refused_total"):
        assert metric(selective.url, name, default=0) == 0, name
    assert metric(selective.url, "pd_proxy_pending_requests") == 0

#!/usr/bin/env python3
"""How often Selective PD routes a prompt to the wrong side of 256 tokens,
on the real stack. Not a test: a measurement, run by hand against a stack
started with `PD_PROFILE=cpu deploy/up.sh` (stack.env sourced, as .ci/e2e
does):

    python3 benches/token-estimate/gen_prompts.py /tmp/prompts.jsonl
    set -a; . "$PD_RUN_DIR/stack.env"; set +a
    $PD_CACHE_DIR/venv/bin/python tests/e2e/measure_routing.py /tmp/prompts.jsonl [N] [SEED] [CSV]

It starts the second pd-proxy of second_proxy.py (--direct-below-tokens
256, calibrated from the prefiller's /tokenize), takes N prompts (default
150, half chat, half completions) that fit the model's context, in random
order, and sends them one at a time (max_tokens 1). For each: the true count
(the prefiller's /tokenize, chat template included), the route the proxy
took (its pd_proxy_routes_total before and after), and the ratio it held
before the request. Prints the wrong-side counts by API, before and after
the first LEARN_AFTER PD requests (every PD answer's usage.prompt_tokens
moves the ratio), next to what the uncalibrated estimate would have done.
"""

import csv
import json
import random
import sys

from conftest import Stack
from second_proxy import THRESHOLD, SecondProxy, estimate, http, initial_estimate, tokenize

LEARN_AFTER = 30


def main() -> None:
    src = sys.argv[1]
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 150
    seed = int(sys.argv[3]) if len(sys.argv) > 3 else 1
    out = sys.argv[4] if len(sys.argv) > 4 else "/tmp/pd-routing.csv"
    stack = Stack()
    prompts = [json.loads(line) for line in open(src, encoding="utf-8")]
    rng = random.Random(seed)
    rng.shuffle(prompts)
    chosen = {"chat": [], "completions": []}
    for p in prompts:
        if len(chosen[p["kind"]]) >= n // 2:
            continue
        if p["kind"] == "chat":
            p["true"] = tokenize(stack.prefiller, stack.model, messages=p["messages"])
            p["bytes"] = sum(len(m["content"].encode()) for m in p["messages"])
            p["n_messages"] = len(p["messages"])
        else:
            p["true"] = tokenize(stack.prefiller, stack.model, prompt=p["prompt"])
            p["bytes"] = len(p["prompt"].encode())
            p["n_messages"] = 0
        if p["true"] + 2 <= stack.max_model_len:
            chosen[p["kind"]].append(p)
    batch = chosen["chat"] + chosen["completions"]
    rng.shuffle(batch)

    proxy = SecondProxy(stack)
    rows = []
    try:
        waited = proxy.wait_calibrated()
        cal = proxy.calibration() or {}
        print(f"calibrated after {waited:.1f}s: {cal}; gauge {proxy.gauge()}", flush=True)
        per_message = int(cal.get("template_per_message", 0))
        fixed = int(cal.get("template_fixed", 0))
        pd_so_far = 0
        for i, p in enumerate(batch, 1):
            ratio = proxy.gauge()
            before = proxy.routes()
            if p["kind"] == "chat":
                body = {"model": stack.model, "messages": p["messages"], "max_tokens": 1}
                path = "/v1/chat/completions"
            else:
                body = {"model": stack.model, "prompt": p["prompt"], "max_tokens": 1}
                path = "/v1/completions"
            status, _, text = http("POST", f"{proxy.url}{path}", body)
            after = proxy.routes()
            moved = [r for r in after if after[r] != before[r]]
            route = moved[0] if len(moved) == 1 else f"?{moved}"
            guess = estimate(p["bytes"], p["n_messages"], round(ratio * 1000), per_message, fixed)
            start = initial_estimate(p["bytes"], p["n_messages"])
            row = {
                "i": i, "id": p["id"], "kind": p["kind"], "messages": p["n_messages"],
                "bytes": p["bytes"], "true": p["true"], "ratio": ratio, "estimate": guess,
                "start_estimate": start, "route": route, "status": status,
                "pd_before": pd_so_far,
                "wrong": (p["true"] < THRESHOLD) != (route == "direct"),
                "start_wrong": (p["true"] < THRESHOLD) != (start < THRESHOLD),
            }
            rows.append(row)
            if route == "pd":
                pd_so_far += 1
            flag = " WRONG" if row["wrong"] else ""
            print(
                f"{i:>3} {p['kind']:<11} true {p['true']:>3} bytes {p['bytes']:>5} "
                f"ratio {ratio:.3f} est {guess:>3} -> {route} ({status}){flag}",
                flush=True,
            )
            if status != 200:
                print(f"    {text[:300]}")
    finally:
        print(f"second proxy: {proxy.stop()}; log {proxy.log_path}")

    with open(out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)

    print(f"\nwrong side of {THRESHOLD} (true count by /tokenize vs the route taken); rows in {out}")
    print(f"{'api':<12} {'phase':<22} {'prompts':>7} {'true<256':>8} {'near (128-512)':>14} "
          f"{'wrong':>5} {'wrong near':>10} {'wrong at 4 B/tok':>16}")
    phases = [
        (f"first {LEARN_AFTER} PD requests", lambda r: r["pd_before"] < LEARN_AFTER),
        (f"after {LEARN_AFTER} PD requests", lambda r: r["pd_before"] >= LEARN_AFTER),
        ("all", lambda r: True),
    ]
    for kind in ("chat", "completions"):
        for name, keep in phases:
            sel = [r for r in rows if r["kind"] == kind and keep(r)]
            near = [r for r in sel if 128 <= r["true"] <= 512]
            print(
                f"{kind:<12} {name:<22} {len(sel):>7} {sum(r['true'] < THRESHOLD for r in sel):>8} "
                f"{len(near):>14} {sum(r['wrong'] for r in sel):>5} {sum(r['wrong'] for r in near):>10} "
                f"{sum(r['start_wrong'] for r in sel):>16}"
            )
    for r in rows:
        if r["wrong"]:
            print(f"  wrong: #{r['i']} {r['kind']} {r['id']}: true {r['true']}, {r['bytes']} bytes, "
                  f"{r['messages']} messages, ratio {r['ratio']}, estimate {r['estimate']} -> {r['route']}")
    mismatched = [r for r in rows if (r["estimate"] < THRESHOLD) != (r["route"] == "direct")]
    print(f"routes that the estimate recomputed here does not explain: {len(mismatched)}")
    print(f"ratio at the end: {rows[-1]['ratio']} (before the last request)")


if __name__ == "__main__":
    main()

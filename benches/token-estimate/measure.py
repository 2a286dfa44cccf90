#!/usr/bin/env python3
"""Tokenize every prompt of prompts.jsonl with the prefiller's /tokenize; write tokens.csv.

Columns: id, kind, n_messages, roles, n_system, n_user, n_assistant,
content_bytes (UTF-8 bytes of all message contents / of the prompt), content_chars,
words, n_true (chat: template + add_generation_prompt; completions: the prompt),
content_tokens (sum of each content tokenized alone as a completions prompt).
"""
import csv, json, sys, urllib.request
from concurrent.futures import ThreadPoolExecutor

URL = sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8100"
MODEL = "tiny-qwen2"

def post(body):
    req = urllib.request.Request(URL + "/tokenize", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())["count"]

def row(p):
    if p["kind"] == "chat":
        msgs = p["messages"]
        n_true = post({"model": MODEL, "messages": msgs, "add_generation_prompt": True})
        contents = [m["content"] for m in msgs]
        roles = [m["role"] for m in msgs]
    else:
        n_true = post({"model": MODEL, "prompt": p["prompt"]})
        contents = [p["prompt"]]
        roles = []
    ct = sum(post({"model": MODEL, "prompt": c}) for c in contents) if p["kind"] == "chat" else n_true
    text = "".join(contents)
    return {
        "id": p["id"], "kind": p["kind"], "n_messages": len(roles),
        "roles": "|".join(roles), "n_system": roles.count("system"), "n_user": roles.count("user"),
        "n_assistant": roles.count("assistant"),
        "content_bytes": sum(len(c.encode("utf-8")) for c in contents),
        "content_chars": len(text), "words": sum(len(c.split()) for c in contents),
        "n_true": n_true, "content_tokens": ct,
    }

prompts = [json.loads(l) for l in open("/tmp/orca/prompts.jsonl")]
with ThreadPoolExecutor(4) as ex:
    rows = list(ex.map(row, prompts))
with open("/tmp/orca/tokens.csv", "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
print(f"wrote /tmp/orca/tokens.csv: {len(rows)} rows")

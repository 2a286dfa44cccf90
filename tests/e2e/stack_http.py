"""HTTP and Prometheus helpers shared by the e2e tests and scripts
(stdlib only, so measure_routing.py runs without pytest)."""

import json
import re
import urllib.error
import urllib.request


def http(method: str, url: str, body=None, timeout: float = 180.0):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, dict(r.headers), r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read().decode()


def metric(base: str, name: str, labels: dict[str, str] | None = None, default=None) -> float:
    """Sum of the samples of `name` (with all of `labels`) at base/metrics;
    `default` when there is none (else that fails the test)."""
    status, _, text = http("GET", f"{base}/metrics", timeout=10)
    assert status == 200, f"GET {base}/metrics: {status}"
    total, found = 0.0, False
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        m = re.match(r"^([^{\s]+)(\{[^}]*\})?\s+(\S+)", line)
        if not m or m.group(1) != name:
            continue
        lbl = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
        if all(lbl.get(k) == v for k, v in (labels or {}).items()):
            total += float(m.group(3))
            found = True
    if not found and default is not None:
        return default
    assert found, f"{name}{labels or ''} not in {base}/metrics"
    return total

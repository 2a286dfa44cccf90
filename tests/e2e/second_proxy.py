"""A second pd-proxy in front of the running stack's prefiller and decoder,
for the Selective PD e2e (test_selective_pd.py) and the routing-accuracy
measurement (measure_routing.py).

The stack's own pd-proxy runs without --direct-below-tokens (every request
takes the PD route, which test_real_stack.py checks), so Selective PD gets
a proxy of its own: the same binary (read from the run directory's
pd-proxy.cmd, which up.sh writes), on free ports, with its own telemetry
port. The prefiller keeps posting its "store finished" events to the
stack's proxy, so this one never hears of its PD requests' KV: each waits
out --kv-ready-timeout (2 s) and then decodes (--on-kv-timeout decode).
That costs time, not correctness: routing is what is measured here.
"""

import json
import math
import os
import re
import shlex
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from stack_http import http, metric

REPO = Path(__file__).resolve().parents[2]
TOKENS_RS = REPO / "src" / "tokens.rs"
THRESHOLD = 256
KV_READY_TIMEOUT = 2
CALIBRATED = "prompt-length estimate calibrated"


# ------------------------------------------------------------ HTTP, metrics


def tokenize(base: str, model: str, *, messages=None, prompt=None, add_special_tokens=None) -> int:
    """vLLM's count at base/tokenize: a chat with its template and the
    generation prompt (what the engine counts for /v1/chat/completions), or
    a completions prompt."""
    body = {"model": model}
    if messages is not None:
        body["messages"] = messages
        body["add_generation_prompt"] = True
    else:
        body["prompt"] = prompt
    if add_special_tokens is not None:
        body["add_special_tokens"] = add_special_tokens
    status, _, text = http("POST", f"{base}/tokenize", body, timeout=60)
    assert status == 200, f"POST {base}/tokenize: {status} {text}"
    return json.loads(text)["count"]


# --------------------------------------------------- what src/tokens.rs says


def _rust_str(literal: str) -> str:
    """The value of a Rust string literal's body (between the quotes)."""
    out, i = [], 0
    simple = {"n": "\n", "t": "\t", "r": "\r", "0": "\0", "\\": "\\", '"': '"', "'": "'"}
    while i < len(literal):
        c = literal[i]
        if c != "\\":
            out.append(c)
            i += 1
            continue
        nxt = literal[i + 1]
        if nxt == "\n":  # line continuation: the newline and leading whitespace go
            i += 2
            while i < len(literal) and literal[i] in " \t\n\r":
                i += 1
        elif nxt in simple:
            out.append(simple[nxt])
            i += 2
        elif nxt == "u":
            m = re.match(r"\\u\{([0-9a-fA-F_]+)\}", literal[i:])
            assert m, f"bad escape at {literal[i:i + 12]!r}"
            out.append(chr(int(m.group(1).replace("_", ""), 16)))
            i += m.end()
        elif nxt == "x":
            out.append(chr(int(literal[i + 2:i + 4], 16)))
            i += 4
        else:
            raise AssertionError(f"unknown escape \\{nxt} in src/tokens.rs")
    return "".join(out)


def calibration_text() -> str:
    """pd_proxy::tokens::CALIBRATION_TEXT, read from the source."""
    src = TOKENS_RS.read_text(encoding="utf-8")
    m = re.search(r'pub const CALIBRATION_TEXT: &str = "((?:[^"\\]|\\.)*)";', src, re.S)
    assert m, f"no CALIBRATION_TEXT in {TOKENS_RS}"
    return _rust_str(m.group(1))


def rust_const(name: str) -> int:
    """An integer constant of src/tokens.rs."""
    src = TOKENS_RS.read_text(encoding="utf-8")
    m = re.search(rf"const {name}: u\d+ = ([0-9_]+);", src)
    assert m, f"no const {name} in {TOKENS_RS}"
    return int(m.group(1).replace("_", ""))


def estimate(text_bytes: int, messages: int, milli_bytes: int, per_message: int, fixed: int) -> int:
    """The proxy's guess for one text prompt (TokenEstimate::tokens), to
    explain a route in a failure message; the route itself is read from the
    proxy's metrics."""
    text = -(-text_bytes * 1000 // milli_bytes)
    return text + (fixed + per_message * messages if messages else 0)


def initial_estimate(text_bytes: int, messages: int) -> int:
    """The guess before calibration: 4 bytes per token, Qwen's template."""
    return estimate(
        text_bytes,
        messages,
        rust_const("INITIAL_MILLI_BYTES"),
        rust_const("TEMPLATE_TOKENS_PER_MESSAGE"),
        rust_const("TEMPLATE_TOKENS_FIXED"),
    )


def gauge_for(text_count: int, text_bytes: int) -> float:
    """pd_proxy_prompt_bytes_per_token after calibrating on a text of
    `text_bytes` bytes and `text_count` tokens (thousandths, rounded down)."""
    return math.floor(text_bytes * 1000 / text_count) / 1000 if text_count else float("nan")


# --------------------------------------------------------------- the process


def proxy_binary() -> str:
    """The pd-proxy the stack runs: the first word of PD_RUN_DIR/pd-proxy.cmd
    (written by up.sh) after its NAME=VALUE settings (the telemetry token's),
    else PD_PROXY_BIN, else the checkout's release build."""
    run_dir = Path(os.environ.get("PD_RUN_DIR") or f"{os.environ.get('TMPDIR', '/tmp')}/pd-stack")
    cmd = run_dir / "pd-proxy.cmd"
    candidates = []
    if cmd.is_file():
        words = shlex.split(cmd.read_text())
        while words and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0]):
            words.pop(0)
        if words:
            candidates.append(words[0])
    if os.environ.get("PD_PROXY_BIN"):
        candidates.append(os.environ["PD_PROXY_BIN"])
    target = os.environ.get("CARGO_TARGET_DIR") or str(REPO / "target")
    candidates.append(str(Path(REPO, target) / "release" / "pd-proxy"))
    for c in candidates:
        if os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    raise AssertionError(f"no pd-proxy binary: tried {candidates}")


def free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class SecondProxy:
    """pd-proxy --direct-below-tokens 256 in front of the stack's vLLMs."""

    def __init__(self, stack, threshold: int = THRESHOLD):
        self.stack = stack
        self.host = stack.host
        self.port = free_port(self.host)
        self.telemetry_port = free_port(self.host)
        while self.telemetry_port == self.port:
            self.telemetry_port = free_port(self.host)
        self.binary = proxy_binary()
        run_dir = os.environ.get("PD_RUN_DIR")
        # In the run directory, .ci/e2e prints its tail if the run fails.
        log_dir = run_dir if run_dir and os.path.isdir(run_dir) else tempfile.mkdtemp(prefix="pd-selective-")
        self.log_path = Path(log_dir) / "pd-proxy-selective.log"
        self.args = [
            self.binary,
            "--host", self.host, "--port", str(self.port),
            "--telemetry-host", self.host, "--telemetry-port", str(self.telemetry_port),
            "--prefiller-host", stack.host, "--prefiller-port", str(stack.prefill_port),
            "--decoder-host", stack.host, "--decoder-port", str(stack.decode_port),
            "--direct-below-tokens", str(threshold),
            "--kv-ready-timeout", str(KV_READY_TIMEOUT), "--on-kv-timeout", "decode",
        ]
        # Flags only: the stack's PD_PROXY_PORT and friends (exported from
        # stack.env) must not configure this one.
        env = {k: v for k, v in os.environ.items() if not k.startswith("PD_PROXY_")}
        env.setdefault("RUST_LOG", "info")
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            self.args, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
            env=env, start_new_session=True,
        )

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_tail(self, n: int = 30) -> str:
        return "\n".join(self.log().splitlines()[-n:])

    def calibration(self) -> dict[str, str] | None:
        """The fields of the "calibrated" log line, once it is there."""
        for line in self.log().splitlines():
            if CALIBRATED in line:
                return dict(re.findall(r"(\w+)=(\S+)", line))
        return None

    def gauge(self) -> float:
        return metric(self.url, "pd_proxy_prompt_bytes_per_token")

    def routes(self) -> dict[str, float]:
        return {r: metric(self.url, "pd_proxy_routes_total", {"route": r}, 0) for r in ("direct", "pd")}

    def wait_calibrated(self, timeout: float = 90.0) -> float:
        """Until /ready is 200 and the estimate is calibrated (the log line is
        there, or the gauge left its starting 4); returns the seconds."""
        t0 = time.monotonic()
        initial = rust_const("INITIAL_MILLI_BYTES") / 1000
        state = "not started"
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"the second pd-proxy exited ({self.proc.returncode}); "
                    f"{' '.join(self.args)}\n{self.log_tail()}"
                )
            try:
                status, _, body = http("GET", f"{self.url}/ready", timeout=5)
                if status == 200:
                    gauge = self.gauge()
                    if self.calibration() is not None or gauge != initial:
                        return time.monotonic() - t0
                    state = f"ready, bytes-per-token gauge still {gauge}"
                else:
                    state = f"/ready {status}: {body[:200]}"
            except OSError as e:  # not listening yet
                state = f"/ready: {e}"
            time.sleep(0.25)
        raise AssertionError(f"second pd-proxy not calibrated after {timeout:.0f}s ({state})\n{self.log_tail()}")

    def stop(self, timeout: float = 10.0) -> str:
        """SIGTERM, a bounded wait, then SIGKILL; says which it took."""
        how = "already exited"
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
                how = f"exited {self.proc.returncode} on SIGTERM"
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=timeout)
                how = f"killed after {timeout:.0f}s without exiting on SIGTERM"
        self._log.close()
        return how

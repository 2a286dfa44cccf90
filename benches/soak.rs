//! A soak: pd-proxy under hours-in-minutes of mixed, partly hostile load
//! while its engines misbehave, to show that nothing accumulates. Leaks in
//! a proxy hide in the failure paths (a parked request whose telemetry
//! never came, a stream whose client left, a connection whose body
//! stalled), which a clean benchmark never takes; here every one of them
//! runs thousands of times and the proxy's memory, descriptors, parked
//! requests and connections must stay level.
//!
//! `cargo bench --bench soak -- --minutes 10` (the default; `--minutes 1`
//! for a smoke run). Other options: `--clients N` (48), `--fault-rate R`
//! (0.1, per request and engine), `--seed S`. The release `pd-sim` and
//! `pd-proxy` come from the same cargo invocation (`CARGO_BIN_EXE_pd-proxy`
//! and `pd_sim::binary()`, as in `benches/load/`); `PD_SOAK_PROXY` /
//! `PD_SOAK_SIM` name other binaries instead.
//!
//! The stack: two pd-sim processes (each a prefiller and a decoder, world
//! size 2, `--fault-rate` drawing every pd-sim fault) behind one pd-proxy
//! with a client key, a telemetry token and short bounds (KV wait, stream
//! silence, body upload and unread sends 2 s; upstream answers 5 s), so
//! that every fault resolves within seconds. The second pd-sim is
//! SIGKILLed at each quarter of the run and restarted 3 s later.
//!
//! The load: `--clients` tasks, each sending one request at a time with a
//! random pause (0-400 ms) between: streaming and non-streaming chat and
//! completions (HTTP/1.1 keep-alive, and HTTP/2 for some streams), clients
//! that leave mid-stream, bodies sent slowly then stalled, oversized
//! bodies (with a length, and chunked), malformed JSON, wrong or missing
//! keys, telemetry forged without the token or with a wrong one, model
//! lists. Every request must end, with an answer or an error, within 30 s
//! on the client's clock; one that does not is LOST.
//!
//! Every 10 s: the proxy's VmRSS and VmHWM, its open descriptors, and from
//! its `--metrics-port` the parked-request gauge and open connections per
//! listener. After the load stops, the bench waits (at most 60 s) for
//! parked requests and connections to reach 0.
//!
//! The verdict, printed last (exit status 1 when it fails):
//! - lost == 0, and no request without a valid key or token was served;
//! - RSS flat: samples of the first 20 % of the load are warm-up; of the
//!   rest, the last third's maximum is within 10 % + 4 MiB of the first
//!   third's maximum (allocator caches settle; a leak of even a few bytes
//!   per failed request grows by far more over thousands of them);
//! - descriptors flat: the same thirds, within 25 % + 16 (connections come
//!   and go with the load; a leak per failure would add thousands);
//! - parked requests never above the number of clients (each has at most
//!   one request in flight, so anything above is a leaked entry) and the
//!   same thirds within clients / 2; open API connections never above
//!   2 × clients + 8;
//! - after the load: parked requests 0 and no API or telemetry connection
//!   left open;
//! - the proxy still running, with no panic in its log.

mod common;

use common::{free_port, Proc};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const API_KEY: &str = "soak-client-key-5f0c2a9e";
const TOKEN: &str = "soak-telemetry-token-7d1b44e0";
/// A request that has neither answered nor failed by then is LOST.
const CLIENT_BOUND: Duration = Duration::from_secs(30);
const SAMPLE_EVERY: Duration = Duration::from_secs(10);
/// The proxy's `--max-body-bytes`; oversized requests send more.
const MAX_BODY: usize = 64 * 1024;
/// Longest wait, after the load, for parked requests and connections to
/// reach 0.
const SETTLE: Duration = Duration::from_secs(60);

fn bin(env: &str, built: &'static str) -> String {
    std::env::var(env)
        .ok()
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| built.to_owned())
}

struct Opts {
    minutes: f64,
    clients: usize,
    fault_rate: f64,
    seed: u64,
}

impl Opts {
    /// `cargo bench` adds `--bench`; anything unknown is ignored for that
    /// reason.
    fn parse() -> Opts {
        let args: Vec<String> = std::env::args().collect();
        let value = |flag: &str| {
            args.iter()
                .position(|a| a == flag)
                .and_then(|i| args.get(i + 1))
                .map(|v| {
                    v.parse::<f64>()
                        .unwrap_or_else(|_| panic!("{flag} {v}: not a number"))
                })
        };
        Opts {
            minutes: value("--minutes").unwrap_or(10.0),
            clients: value("--clients").map_or(48, |c| c as usize).max(1),
            fault_rate: value("--fault-rate").unwrap_or(0.1),
            seed: value("--seed").map_or_else(rand::random, |s| s as u64),
        }
    }
}

fn local(port: u16) -> SocketAddr {
    ([127, 0, 0, 1], port).into()
}

/// One pd-sim process: a prefiller and a decoder. Its ports stay fixed
/// across restarts, as a pod's address does in a StatefulSet.
struct SimSpec {
    prefiller: u16,
    decoder: u16,
    args: Vec<String>,
}

impl SimSpec {
    fn new(telemetry: u16, fault_rate: f64, seed: u64) -> SimSpec {
        let (prefiller, decoder) = (free_port(), free_port());
        let args = [
            "--prefiller-port",
            &prefiller.to_string(),
            "--decoder-port",
            &decoder.to_string(),
            "--telemetry-url",
            &format!("http://127.0.0.1:{telemetry}/api/v1/telemetry?token={TOKEN}"),
            "--world-size",
            "2",
            "--prefill-delay-ms",
            "5",
            "--telemetry-delay-ms",
            "2",
            "--rank-stagger-ms",
            "1",
            "--first-token-delay-ms",
            "10",
            "--token-delay-ms",
            "5",
            "--fault-rate",
            &fault_rate.to_string(),
            "--fault-slow-first-token-ms",
            "1000",
            "--fault-seed",
            &seed.to_string(),
        ]
        .map(String::from)
        .to_vec();
        SimSpec {
            prefiller,
            decoder,
            args,
        }
    }

    fn spawn(&self) -> Proc {
        let bin = bin("PD_SOAK_SIM", pd_sim::binary());
        Proc(
            Command::new(&bin)
                .args(&self.args)
                .env("RUST_LOG", "error")
                .stdout(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| panic!("starting {bin}: {e}")),
        )
    }

    /// Starts it and waits for both ports; retried, since a port just
    /// released by a killed process may take a moment to bind again.
    async fn start(&self) -> Proc {
        for _ in 0..10 {
            let mut proc = self.spawn();
            let deadline = Instant::now() + Duration::from_secs(10);
            while proc.alive() && Instant::now() < deadline {
                if get(local(self.prefiller), "/health", None).await.is_some()
                    && get(local(self.decoder), "/health", None).await.is_some()
                {
                    return proc;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        panic!(
            "pd-sim on ports {} and {} never came up",
            self.prefiller, self.decoder
        );
    }

    /// Its fault counters (`pdsim_faults_total`), from the decoder port.
    async fn faults(&self) -> BTreeMap<String, f64> {
        let text = get(local(self.decoder), "/metrics", None)
            .await
            .unwrap_or_default();
        text.lines()
            .filter_map(|l| l.strip_prefix("pdsim_faults_total{fault=\""))
            .filter_map(|l| {
                let (name, rest) = l.split_once("\"}")?;
                Some((name.to_owned(), rest.trim().parse().ok()?))
            })
            .collect()
    }
}

async fn get(addr: SocketAddr, path: &str, key: Option<&str>) -> Option<String> {
    let tcp = TcpStream::connect(addr).await.ok()?;
    let (mut sender, conn) = http1::handshake(TokioIo::new(tcp)).await.ok()?;
    tokio::spawn(conn);
    let mut req = http::Request::get(format!("http://{addr}{path}"));
    if let Some(key) = key {
        req = req.header("authorization", format!("Bearer {key}"));
    }
    let resp = sender
        .send_request(req.body(Full::new(Bytes::new())).unwrap())
        .await
        .ok()?;
    if resp.status() != 200 {
        return None;
    }
    let body = resp.into_body().collect().await.ok()?.to_bytes();
    String::from_utf8(body.to_vec()).ok()
}

/// The value of `name{labels}` in a Prometheus text page; `label` is one
/// `key="value"` that must appear among the labels, or empty for a series
/// without labels.
fn metric(text: &str, name: &str, label: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        let rest = l.strip_prefix(name)?;
        let (labels, value) = match rest.strip_prefix('{') {
            Some(r) => r.split_once('}')?,
            None => ("", rest),
        };
        if !value.starts_with(' ') || (label.is_empty() != labels.is_empty()) {
            return None;
        }
        if !label.is_empty() && !labels.split(',').any(|l| l == label) {
            return None;
        }
        value.trim().parse().ok()
    })
}

/// What one request came to, from the client's side.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Outcome {
    /// 200 and a whole answer: a stream ending in `[DONE]` without an
    /// error event, or JSON with `choices`.
    Ok,
    /// 200 whose stream carried the proxy's error event before `[DONE]`
    /// (the decoder broke or went silent).
    SseError,
    /// A non-200 answer.
    Status(u16),
    /// The answer began but its body broke off.
    Broken,
    /// No answer: the connection was refused, reset or closed first.
    Closed,
    /// The client left mid-stream on purpose.
    Dropped,
    /// Nothing within [`CLIENT_BOUND`].
    Lost,
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Outcome::Ok => f.write_str("ok"),
            Outcome::SseError => f.write_str("200+sse-error"),
            Outcome::Status(s) => write!(f, "{s}"),
            Outcome::Broken => f.write_str("broken"),
            Outcome::Closed => f.write_str("closed"),
            Outcome::Dropped => f.write_str("dropped"),
            Outcome::Lost => f.write_str("LOST"),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Scenario {
    ChatStream,
    ChatJson,
    CompletionStream,
    CompletionJson,
    ChatStreamH2,
    LeaveMidStream,
    SlowBody,
    Oversized,
    OversizedChunked,
    Malformed,
    WrongKey,
    NoKey,
    ForgedTelemetry,
    Models,
}

impl Scenario {
    /// Relative frequencies: mostly ordinary traffic, every hostile kind
    /// often enough to run hundreds of times in ten minutes.
    const MIX: [(Scenario, u32); 14] = [
        (Scenario::ChatStream, 26),
        (Scenario::ChatJson, 12),
        (Scenario::CompletionStream, 12),
        (Scenario::CompletionJson, 10),
        (Scenario::ChatStreamH2, 6),
        (Scenario::LeaveMidStream, 6),
        (Scenario::SlowBody, 3),
        (Scenario::Oversized, 2),
        (Scenario::OversizedChunked, 2),
        (Scenario::Malformed, 4),
        (Scenario::WrongKey, 3),
        (Scenario::NoKey, 2),
        (Scenario::ForgedTelemetry, 4),
        (Scenario::Models, 2),
    ];

    fn pick(rng: &mut StdRng) -> Scenario {
        let total: u32 = Self::MIX.iter().map(|(_, w)| w).sum();
        let mut at = rng.random_range(0..total);
        for (s, w) in Self::MIX {
            if at < w {
                return s;
            }
            at -= w;
        }
        unreachable!()
    }

    fn name(self) -> &'static str {
        match self {
            Scenario::ChatStream => "chat stream",
            Scenario::ChatJson => "chat json",
            Scenario::CompletionStream => "completions stream",
            Scenario::CompletionJson => "completions json",
            Scenario::ChatStreamH2 => "chat stream h2",
            Scenario::LeaveMidStream => "leaves mid-stream",
            Scenario::SlowBody => "slow body, stalls",
            Scenario::Oversized => "oversized body",
            Scenario::OversizedChunked => "oversized chunked",
            Scenario::Malformed => "malformed JSON",
            Scenario::WrongKey => "wrong key",
            Scenario::NoKey => "no key",
            Scenario::ForgedTelemetry => "forged telemetry",
            Scenario::Models => "GET /v1/models",
        }
    }

    /// What a correct proxy answers; anything else is flagged in the table.
    fn expected(self, o: &Outcome) -> bool {
        use Outcome as O;
        let upstream_failure = matches!(o, O::SseError | O::Status(502..=504));
        match self {
            Scenario::ChatStream
            | Scenario::ChatJson
            | Scenario::CompletionStream
            | Scenario::CompletionJson
            | Scenario::ChatStreamH2
            | Scenario::Models => *o == O::Ok || upstream_failure,
            Scenario::LeaveMidStream => *o == O::Dropped || *o == O::Ok || upstream_failure,
            Scenario::SlowBody => matches!(o, O::Status(408)),
            Scenario::Oversized | Scenario::OversizedChunked => {
                matches!(o, O::Status(413) | O::Closed)
            }
            Scenario::Malformed => matches!(o, O::Status(400)),
            Scenario::WrongKey | Scenario::NoKey => matches!(o, O::Status(401)),
            Scenario::ForgedTelemetry => matches!(o, O::Status(403)),
        }
    }

    /// A 2xx here means a request without valid credentials was served.
    fn needs_credentials(self) -> bool {
        matches!(
            self,
            Scenario::WrongKey | Scenario::NoKey | Scenario::ForgedTelemetry
        )
    }
}

#[derive(Default)]
struct Tally {
    by: Mutex<BTreeMap<(Scenario, Outcome), u64>>,
    total: AtomicU64,
    lost: AtomicU64,
}

impl Tally {
    fn add(&self, s: Scenario, o: Outcome) {
        self.total.fetch_add(1, Ordering::Relaxed);
        if o == Outcome::Lost {
            self.lost.fetch_add(1, Ordering::Relaxed);
        }
        *self.by.lock().unwrap().entry((s, o)).or_default() += 1;
    }
}

struct Ctx {
    api: SocketAddr,
    telemetry: SocketAddr,
    stop: AtomicBool,
    tally: Tally,
}

const PROMPT: &str = "Explain how KV cache reuse helps long-context serving.";

fn chat(tokens: u32, stream: bool) -> Bytes {
    Bytes::from(format!(
        r#"{{"model":"sim-model","messages":[{{"role":"user","content":"{PROMPT}"}}],"max_tokens":{tokens},"stream":{stream}}}"#
    ))
}

fn completion(tokens: u32, stream: bool) -> Bytes {
    Bytes::from(format!(
        r#"{{"model":"sim-model","prompt":"{PROMPT}","max_tokens":{tokens},"stream":{stream}}}"#
    ))
}

fn post(
    addr: SocketAddr,
    path: &str,
    body: Bytes,
    key: Option<&str>,
) -> http::Request<Full<Bytes>> {
    let mut req = http::Request::post(format!("http://{addr}{path}"))
        .header("content-type", "application/json");
    if let Some(key) = key {
        req = req.header("authorization", format!("Bearer {key}"));
    }
    req.body(Full::new(body)).unwrap()
}

type H1 = http1::SendRequest<Full<Bytes>>;

async fn connect_h1(addr: SocketAddr) -> Option<(H1, tokio::task::JoinHandle<()>)> {
    let tcp = TcpStream::connect(addr).await.ok()?;
    tcp.set_nodelay(true).ok()?;
    let (sender, conn) = http1::handshake(TokioIo::new(tcp)).await.ok()?;
    let task = tokio::spawn(async move {
        let _ = conn.await;
    });
    Some((sender, task))
}

/// A whole SSE body: `[DONE]` at the end, and whether the proxy's error
/// event came before it.
fn judge_sse(body: &[u8]) -> Outcome {
    if !body.ends_with(b"data: [DONE]\n\n") {
        return Outcome::Broken;
    }
    let error = b"data: {\"error\":";
    if body.windows(error.len()).any(|w| w == error) {
        Outcome::SseError
    } else {
        Outcome::Ok
    }
}

/// Reads an answer to the end. `stream`: judge it as SSE.
async fn read(resp: http::Response<Incoming>, stream: bool) -> Outcome {
    let status = resp.status().as_u16();
    let body = match resp.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            return if status == 200 {
                Outcome::Broken
            } else {
                Outcome::Status(status)
            }
        }
    };
    if status != 200 {
        return Outcome::Status(status);
    }
    if stream {
        return judge_sse(&body);
    }
    match serde_json::from_slice::<serde_json::Value>(&body) {
        Ok(v) if v.get("choices").is_some() || v.get("data").is_some() => Outcome::Ok,
        _ => Outcome::Broken,
    }
}

/// One client's keep-alive connection, opened again when the proxy closed
/// it.
struct KeepAlive {
    addr: SocketAddr,
    conn: Option<(H1, tokio::task::JoinHandle<()>)>,
}

impl KeepAlive {
    async fn send(&mut self, req: http::Request<Full<Bytes>>, stream: bool) -> Outcome {
        if let Some((sender, _)) = &mut self.conn {
            if sender.ready().await.is_err() {
                self.conn = None;
            }
        }
        if self.conn.is_none() {
            self.conn = connect_h1(self.addr).await;
        }
        let Some((sender, _)) = &mut self.conn else {
            return Outcome::Closed;
        };
        match sender.send_request(req).await {
            Ok(resp) => read(resp, stream).await,
            Err(_) => {
                self.conn = None;
                Outcome::Closed
            }
        }
    }

    fn close(&mut self) {
        if let Some((_, task)) = self.conn.take() {
            task.abort();
        }
    }
}

async fn once_h1(addr: SocketAddr, req: http::Request<Full<Bytes>>, stream: bool) -> Outcome {
    let Some((mut sender, task)) = connect_h1(addr).await else {
        return Outcome::Closed;
    };
    let outcome = match sender.send_request(req).await {
        Ok(resp) => read(resp, stream).await,
        Err(_) => Outcome::Closed,
    };
    task.abort();
    outcome
}

async fn h2_stream(addr: SocketAddr) -> Outcome {
    let Ok(tcp) = TcpStream::connect(addr).await else {
        return Outcome::Closed;
    };
    let Ok((mut sender, conn)) = http2::handshake(TokioExecutor::new(), TokioIo::new(tcp)).await
    else {
        return Outcome::Closed;
    };
    let task = tokio::spawn(async move {
        let _ = conn.await;
    });
    let req = post(addr, "/v1/chat/completions", chat(16, true), Some(API_KEY));
    let outcome = match sender.send_request(req).await {
        Ok(resp) => read(resp, true).await,
        Err(_) => Outcome::Closed,
    };
    task.abort();
    outcome
}

/// A 64-token stream left after its first two data frames: the socket is
/// closed under the proxy while it relays.
async fn leave_mid_stream(addr: SocketAddr) -> Outcome {
    let Some((mut sender, task)) = connect_h1(addr).await else {
        return Outcome::Closed;
    };
    let req = post(addr, "/v1/chat/completions", chat(64, true), Some(API_KEY));
    let outcome = match sender.send_request(req).await {
        Ok(resp) if resp.status() == 200 => {
            let mut body = resp.into_body();
            let mut frames = 0;
            let mut seen = Vec::new();
            loop {
                match body.frame().await {
                    Some(Ok(frame)) => {
                        if let Some(d) = frame.data_ref() {
                            seen.extend_from_slice(d);
                            frames += 1;
                        }
                        if frames >= 2 {
                            break Outcome::Dropped;
                        }
                    }
                    Some(Err(_)) => break Outcome::Broken,
                    None => break judge_sse(&seen),
                }
            }
        }
        Ok(resp) => read(resp, true).await,
        Err(_) => Outcome::Closed,
    };
    task.abort();
    outcome
}

/// Writes `head`, then `body` in `pieces` with `pause` between, then (if
/// `stall`) sends nothing more; returns the status line's code, or
/// `Closed` when the connection ended without one.
async fn raw(
    addr: SocketAddr,
    head: String,
    pieces: Vec<Bytes>,
    pause: Duration,
    stall: bool,
) -> Outcome {
    let Ok(mut tcp) = TcpStream::connect(addr).await else {
        return Outcome::Closed;
    };
    let _ = tcp.set_nodelay(true);
    let (mut rd, mut wr) = tcp.split();
    let reader = async {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            match rd.read(&mut chunk).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
            if let Some(end) = buf.windows(2).position(|w| w == b"\r\n") {
                let line = String::from_utf8_lossy(&buf[..end]).into_owned();
                return line.split(' ').nth(1).and_then(|c| c.parse::<u16>().ok());
            }
        }
    };
    let writer = async {
        if wr.write_all(head.as_bytes()).await.is_err() {
            return;
        }
        for piece in pieces {
            if wr.write_all(&piece).await.is_err() {
                return;
            }
            tokio::time::sleep(pause).await;
        }
        if stall {
            std::future::pending::<()>().await;
        }
    };
    tokio::pin!(reader);
    // The answer may come before the body is all written (408, 413), so
    // both run together and the answer wins; a write error is no answer.
    let status = tokio::select! {
        s = &mut reader => s,
        () = writer => reader.await,
    };
    status.map_or(Outcome::Closed, Outcome::Status)
}

async fn slow_body(addr: SocketAddr) -> Outcome {
    let body = chat(16, false);
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: {addr}\r\nauthorization: Bearer {API_KEY}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    // A fifth of the body, a byte at a time, then nothing.
    let pieces = (0..body.len() / 5).map(|i| body.slice(i..i + 1)).collect();
    raw(addr, head, pieces, Duration::from_millis(20), true).await
}

fn oversized_json() -> Bytes {
    let filler = "x".repeat(MAX_BODY + 16 * 1024);
    Bytes::from(format!(
        r#"{{"model":"sim-model","prompt":"{filler}","max_tokens":4}}"#
    ))
}

async fn oversized_chunked(addr: SocketAddr) -> Outcome {
    let head = format!(
        "POST /v1/completions HTTP/1.1\r\nhost: {addr}\r\nauthorization: Bearer {API_KEY}\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n"
    );
    let body = oversized_json();
    let mut pieces: Vec<Bytes> = body
        .chunks(8192)
        .map(|c| {
            let mut p = format!("{:x}\r\n", c.len()).into_bytes();
            p.extend_from_slice(c);
            p.extend_from_slice(b"\r\n");
            Bytes::from(p)
        })
        .collect();
    pieces.push(Bytes::from_static(b"0\r\n\r\n"));
    raw(addr, head, pieces, Duration::ZERO, false).await
}

async fn forged_telemetry(addr: SocketAddr, rng: &mut StdRng) -> Outcome {
    let id = format!(
        "chatcmpl-{:016x}-{:08x}",
        rng.random::<u64>(),
        rng.random::<u32>()
    );
    let body = Bytes::from(format!(
        r#"{{"event": "request_store_finished", "request_ids_set": ["{id}"], "model_name": "sim-model", "world_size": 1, "kv_rank": 0}}"#
    ));
    let path = if rng.random_bool(0.5) {
        "/api/v1/telemetry".to_owned()
    } else {
        // As long as the real one, so only its value gives it away.
        format!("/api/v1/telemetry?token={}", "f".repeat(TOKEN.len()))
    };
    once_h1(addr, post(addr, &path, body, None), false).await
}

async fn run_one(ctx: &Ctx, s: Scenario, keep: &mut KeepAlive, rng: &mut StdRng) -> Outcome {
    let api = ctx.api;
    let key = Some(API_KEY);
    match s {
        Scenario::ChatStream => {
            keep.send(post(api, "/v1/chat/completions", chat(16, true), key), true)
                .await
        }
        Scenario::ChatJson => {
            keep.send(
                post(api, "/v1/chat/completions", chat(16, false), key),
                false,
            )
            .await
        }
        Scenario::CompletionStream => {
            keep.send(
                post(api, "/v1/completions", completion(16, true), key),
                true,
            )
            .await
        }
        Scenario::CompletionJson => {
            keep.send(
                post(api, "/v1/completions", completion(16, false), key),
                false,
            )
            .await
        }
        Scenario::ChatStreamH2 => h2_stream(api).await,
        Scenario::LeaveMidStream => leave_mid_stream(api).await,
        Scenario::SlowBody => slow_body(api).await,
        Scenario::Oversized => {
            once_h1(
                api,
                post(api, "/v1/completions", oversized_json(), key),
                false,
            )
            .await
        }
        Scenario::OversizedChunked => oversized_chunked(api).await,
        Scenario::Malformed => {
            let body = Bytes::from_static(br#"{"model":"sim-model","messages":[{"role":"#);
            keep.send(post(api, "/v1/chat/completions", body, key), false)
                .await
        }
        Scenario::WrongKey => {
            let wrong = format!("{}x", &API_KEY[..API_KEY.len() - 1]);
            keep.send(
                post(api, "/v1/chat/completions", chat(4, false), Some(&wrong)),
                false,
            )
            .await
        }
        Scenario::NoKey => {
            keep.send(
                post(api, "/v1/completions", completion(4, true), None),
                true,
            )
            .await
        }
        Scenario::ForgedTelemetry => forged_telemetry(ctx.telemetry, rng).await,
        Scenario::Models => {
            let req = http::Request::get(format!("http://{api}/v1/models"))
                .header("authorization", format!("Bearer {API_KEY}"))
                .body(Full::new(Bytes::new()))
                .unwrap();
            keep.send(req, false).await
        }
    }
}

async fn client(ctx: Arc<Ctx>, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut keep = KeepAlive {
        addr: ctx.api,
        conn: None,
    };
    while !ctx.stop.load(Ordering::Relaxed) {
        let s = Scenario::pick(&mut rng);
        let outcome =
            match tokio::time::timeout(CLIENT_BOUND, run_one(&ctx, s, &mut keep, &mut rng)).await {
                Ok(o) => o,
                Err(_) => {
                    keep.close();
                    Outcome::Lost
                }
            };
        ctx.tally.add(s, outcome);
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..400))).await;
    }
    keep.close();
}

#[derive(Clone, Debug)]
struct Sample {
    /// Seconds since the load started (negative: before it).
    at: f64,
    label: &'static str,
    rss_mib: f64,
    hwm_mib: f64,
    fds: usize,
    pending: f64,
    api_conns: f64,
    telemetry_conns: f64,
    requests: u64,
    lost: u64,
}

fn status_kib(pid: u32, field: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(field))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(f64::NAN)
}

fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

async fn sample(pid: u32, metrics: SocketAddr, ctx: &Ctx, at: f64, label: &'static str) -> Sample {
    let text = get(metrics, "/metrics", None).await.unwrap_or_default();
    let m = |name: &str, label: &str| metric(&text, name, label).unwrap_or(f64::NAN);
    Sample {
        at,
        label,
        rss_mib: status_kib(pid, "VmRSS:") / 1024.0,
        hwm_mib: status_kib(pid, "VmHWM:") / 1024.0,
        fds: fds(pid),
        pending: m("pd_proxy_pending_requests", ""),
        api_conns: m("pd_proxy_open_connections", "port=\"api\""),
        telemetry_conns: m("pd_proxy_open_connections", "port=\"telemetry\""),
        requests: ctx.tally.total.load(Ordering::Relaxed),
        lost: ctx.tally.lost.load(Ordering::Relaxed),
    }
}

/// Maxima of the first and last thirds of `v` (already past warm-up).
fn thirds(v: &[f64]) -> (f64, f64) {
    let third = v.len().div_ceil(3).max(1);
    let max = |s: &[f64]| s.iter().copied().fold(f64::NAN, f64::max);
    (
        max(&v[..third.min(v.len())]),
        max(&v[v.len().saturating_sub(third)..]),
    )
}

struct Verdict {
    lines: Vec<String>,
    ok: bool,
}

impl Verdict {
    fn check(&mut self, ok: bool, what: String) {
        self.ok &= ok;
        self.lines
            .push(format!("{} {what}", if ok { "PASS" } else { "FAIL" }));
    }
}

fn main() {
    let opts = Opts::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let ok = rt.block_on(soak(opts));
    std::process::exit(if ok { 0 } else { 1 });
}

async fn soak(opts: Opts) -> bool {
    let duration = Duration::from_secs_f64(opts.minutes * 60.0);
    let (api, telemetry, metrics_port) = (free_port(), free_port(), free_port());
    let sims = [
        SimSpec::new(telemetry, opts.fault_rate, opts.seed),
        SimSpec::new(telemetry, opts.fault_rate, opts.seed ^ 0x5eed),
    ];
    let log_path: PathBuf =
        std::env::temp_dir().join(format!("pd-soak-proxy-{}.log", std::process::id()));
    let log = std::fs::File::create(&log_path).expect("creating the proxy log");
    let ports = |f: fn(&SimSpec) -> u16| {
        sims.iter()
            .map(|s| f(s).to_string())
            .collect::<Vec<_>>()
            .join(",")
    };
    let proxy_bin = bin("PD_SOAK_PROXY", env!("CARGO_BIN_EXE_pd-proxy"));
    let proxy_args: Vec<String> = [
        "--host",
        "127.0.0.1",
        "--port",
        &api.to_string(),
        "--telemetry-port",
        &telemetry.to_string(),
        "--metrics-port",
        &metrics_port.to_string(),
        "--prefiller-host",
        "127.0.0.1",
        "--prefiller-port",
        &ports(|s| s.prefiller),
        "--decoder-host",
        "127.0.0.1",
        "--decoder-port",
        &ports(|s| s.decoder),
        "--kv-ready-timeout",
        "2",
        "--upstream-timeout",
        "5",
        "--stream-idle-timeout",
        "2",
        "--send-timeout",
        "2",
        "--body-timeout",
        "2",
        "--idle-timeout",
        "5",
        "--max-body-bytes",
        &MAX_BODY.to_string(),
        "--max-pending",
        "1024",
        "--health-interval",
        "0.5",
        "--drain-timeout",
        "5",
    ]
    .map(String::from)
    .to_vec();
    println!("# pd-proxy soak");
    println!();
    println!(
        "- {} min, {} clients, pd-sim --fault-rate {} (every fault kind), seed {}",
        opts.minutes, opts.clients, opts.fault_rate, opts.seed
    );
    println!("- proxy: {proxy_bin} {}", proxy_args.join(" "));
    println!("- proxy log (RUST_LOG=warn): {}", log_path.display());
    let mut sim_procs = Vec::new();
    for s in &sims {
        sim_procs.push(s.start().await);
    }
    let mut proxy = Proc(
        Command::new(&proxy_bin)
            .args(&proxy_args)
            .env("PD_PROXY_API_KEY", API_KEY)
            .env("PD_PROXY_TELEMETRY_TOKEN", TOKEN)
            .env_remove("OPENAI_API_KEY")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {proxy_bin}: {e}")),
    );
    let pid = proxy.pid();
    let metrics = local(metrics_port);
    let deadline = Instant::now() + Duration::from_secs(30);
    while get(metrics, "/metrics", None).await.is_none() {
        assert!(proxy.alive(), "pd-proxy exited; see {}", log_path.display());
        assert!(Instant::now() < deadline, "pd-proxy never came up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Let the first health checks pass before the load.
    tokio::time::sleep(Duration::from_secs(2)).await;

    let ctx = Arc::new(Ctx {
        api: local(api),
        telemetry: local(telemetry),
        stop: AtomicBool::new(false),
        tally: Tally::default(),
    });
    let mut samples = vec![sample(pid, metrics, &ctx, 0.0, "idle").await];
    let started = Instant::now();
    let clients: Vec<_> = (0..opts.clients)
        .map(|i| {
            tokio::spawn(client(
                Arc::clone(&ctx),
                opts.seed.wrapping_add(i as u64 * 7919),
            ))
        })
        .collect();

    // The second pd-sim dies at each quarter of the run and comes back
    // 3 s later; its fault counters are read before each death.
    let [first_sim, second_sim] = sims;
    let second_sim = Arc::new(second_sim);
    let second_proc = sim_procs.pop().expect("two pd-sims were started");
    let spec = Arc::clone(&second_sim);
    let killer = tokio::spawn(async move {
        let second_sim = spec;
        let mut proc = second_proc;
        let mut faults: BTreeMap<String, f64> = BTreeMap::new();
        for quarter in 1..4 {
            tokio::time::sleep_until((started + duration.mul_f64(quarter as f64 / 4.0)).into())
                .await;
            for (k, v) in second_sim.faults().await {
                *faults.entry(k).or_default() += v;
            }
            drop(proc);
            tokio::time::sleep(Duration::from_secs(3)).await;
            proc = second_sim.start().await;
        }
        (proc, faults)
    });
    let mut next_sample = SAMPLE_EVERY;
    let mut proxy_died = false;
    while started.elapsed() < duration {
        if started.elapsed() >= next_sample {
            let s = sample(pid, metrics, &ctx, started.elapsed().as_secs_f64(), "load").await;
            println!(
                "  t={:>5.0}s rss={:.1} MiB fds={} pending={} api_conns={} requests={} lost={}",
                s.at, s.rss_mib, s.fds, s.pending, s.api_conns, s.requests, s.lost
            );
            samples.push(s);
            next_sample += SAMPLE_EVERY;
        }
        if !proxy.alive() {
            proxy_died = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let load_secs = started.elapsed().as_secs_f64();

    // Stop the load: every client finishes its request in flight (each
    // bounded by CLIENT_BOUND) and closes its connections.
    ctx.stop.store(true, Ordering::Relaxed);
    for c in clients {
        let _ = c.await;
    }
    let stopped = started.elapsed().as_secs_f64();
    // Its last restart was at three quarters of the run, unless the proxy
    // died before.
    if proxy_died {
        killer.abort();
    }
    let (second_proc, mut faults, restarts) = match killer.await {
        Ok((proc, faults)) => (Some(proc), faults, 3),
        Err(_) => (None, BTreeMap::new(), 0),
    };
    let settle_deadline = Instant::now() + SETTLE;
    let mut settled;
    loop {
        let s = sample(pid, metrics, &ctx, started.elapsed().as_secs_f64(), "end").await;
        settled = s.pending == 0.0 && s.api_conns == 0.0 && s.telemetry_conns == 0.0;
        if settled || Instant::now() >= settle_deadline || proxy_died {
            samples.push(s);
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let end = samples.last().cloned().expect("a sample was taken");
    let final_text = get(metrics, "/metrics", None).await.unwrap_or_default();
    for s in [&first_sim, &*second_sim] {
        for (k, v) in s.faults().await {
            *faults.entry(k).or_default() += v;
        }
    }
    proxy_died |= !proxy.alive();

    // The report.
    println!();
    println!("## Samples (proxy process)");
    println!();
    println!("| t (s) | phase | RSS MiB | HWM MiB | fds | pending | api conns | telemetry conns | requests | req/s | lost |");
    println!("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let mut prev: Option<&Sample> = None;
    for s in &samples {
        let rate = prev.map_or(String::from("-"), |p| {
            let dt = s.at - p.at;
            if dt > 0.0 {
                format!("{:.0}", (s.requests - p.requests) as f64 / dt)
            } else {
                "-".into()
            }
        });
        println!(
            "| {:.0} | {} | {:.1} | {:.1} | {} | {} | {} | {} | {} | {} | {} |",
            s.at,
            s.label,
            s.rss_mib,
            s.hwm_mib,
            s.fds,
            s.pending,
            s.api_conns,
            s.telemetry_conns,
            s.requests,
            rate,
            s.lost
        );
        prev = Some(s);
    }
    println!();
    println!(
        "Load {load_secs:.0} s, clients stopped at {stopped:.0} s; pd-sim #2 killed and restarted {restarts} times."
    );

    println!();
    println!("## Requests by scenario and outcome (! = not what a correct proxy answers)");
    println!();
    let by = ctx.tally.by.lock().unwrap().clone();
    let mut totals: BTreeMap<Outcome, u64> = BTreeMap::new();
    let mut unexpected = 0;
    let mut bypass = 0;
    let mut rows: BTreeMap<Scenario, String> = BTreeMap::new();
    let mut counts: BTreeMap<Scenario, u64> = BTreeMap::new();
    for ((s, o), n) in &by {
        *totals.entry(o.clone()).or_default() += n;
        *counts.entry(*s).or_default() += n;
        let flag = if s.expected(o) { "" } else { "!" };
        if !s.expected(o) {
            unexpected += n;
        }
        if s.needs_credentials() && matches!(o, Outcome::Ok | Outcome::SseError) {
            bypass += n;
        }
        let row = rows.entry(*s).or_default();
        let _ = write!(row, "{}{o} {n}", if row.is_empty() { "" } else { ", " });
        row.push_str(flag);
    }
    println!("| scenario | requests | outcomes |");
    println!("|---|---:|---|");
    for (s, row) in &rows {
        println!("| {} | {} | {row} |", s.name(), counts[s]);
    }
    let total: u64 = totals.values().sum();
    let summary: Vec<String> = totals.iter().map(|(o, n)| format!("{o} {n}")).collect();
    println!("| **all** | {total} | {} |", summary.join(", "));

    println!();
    println!("## Faults injected by pd-sim, proxy counters at the end");
    println!();
    let faults: Vec<String> = faults.iter().map(|(k, v)| format!("{k} {v}")).collect();
    println!("- pd-sim faults: {}", faults.join(", "));
    for name in [
        "pd_proxy_kv_ready_timeouts_total",
        "pd_proxy_timeouts_total",
        "pd_proxy_upstream_errors_total",
        "pd_proxy_retries_total",
        "pd_proxy_client_disconnects_total",
        "pd_proxy_auth_failures_total",
        "pd_proxy_telemetry_refused_total",
        "pd_proxy_telemetry_unknown_ids_total",
        "pd_proxy_connections_refused_total",
        "pd_proxy_pending_full_total",
        "pd_proxy_endpoint_ejections_total",
        "pd_proxy_panic_picks_total",
    ] {
        let lines: Vec<&str> = final_text
            .lines()
            .filter(|l| l.starts_with(name) && !l.ends_with(" 0"))
            .map(|l| l.strip_prefix(name).unwrap_or(l))
            .collect();
        if !lines.is_empty() {
            println!("- {name}: {}", lines.join(", "));
        }
    }
    let log_text = std::fs::read_to_string(&log_path).unwrap_or_default();
    let panics = log_text.matches("panicked").count();
    println!(
        "- proxy log: {} lines, {} of them warnings, {panics} panics",
        log_text.lines().count(),
        log_text.matches(" WARN ").count()
    );

    // The verdict.
    let load: Vec<&Sample> = samples.iter().filter(|s| s.label == "load").collect();
    let warm = duration.as_secs_f64() * 0.2;
    let judged: Vec<&Sample> = load.iter().copied().filter(|s| s.at >= warm).collect();
    let mut v = Verdict {
        lines: Vec::new(),
        ok: true,
    };
    let lost = ctx.tally.lost.load(Ordering::Relaxed);
    v.check(lost == 0, format!("lost: {lost} of {total} requests"));
    v.check(
        bypass == 0,
        format!("requests served without a valid key or telemetry token: {bypass}"),
    );
    v.check(
        !proxy_died && panics == 0,
        format!(
            "proxy alive to the end ({}), panics in its log: {panics}",
            if proxy_died { "it exited" } else { "yes" }
        ),
    );
    if judged.len() >= 2 {
        let col = |f: fn(&Sample) -> f64| judged.iter().map(|s| f(s)).collect::<Vec<_>>();
        let (e, l) = thirds(&col(|s| s.rss_mib));
        v.check(
            l <= e * 1.10 + 4.0,
            format!("RSS flat: last third max {l:.1} MiB <= first third max {e:.1} MiB x 1.10 + 4"),
        );
        let (e, l) = thirds(&col(|s| s.fds as f64));
        v.check(
            l <= e * 1.25 + 16.0,
            format!("fds flat: last third max {l} <= first third max {e} x 1.25 + 16"),
        );
        let (e, l) = thirds(&col(|s| s.pending));
        let half = opts.clients as f64 / 2.0;
        v.check(
            l <= e + half,
            format!("pending flat: last third max {l} <= first third max {e} + {half}"),
        );
    } else {
        v.check(
            false,
            format!(
                "too few samples past warm-up ({}) to judge flatness: run longer",
                judged.len()
            ),
        );
    }
    let max_pending = load.iter().map(|s| s.pending).fold(0.0, f64::max);
    v.check(
        max_pending <= opts.clients as f64,
        format!(
            "pending never above the {} clients: max {max_pending}",
            opts.clients
        ),
    );
    let max_conns = load.iter().map(|s| s.api_conns).fold(0.0, f64::max);
    let conn_cap = 2.0 * opts.clients as f64 + 8.0;
    v.check(
        max_conns <= conn_cap,
        format!("API connections never above {conn_cap}: max {max_conns}"),
    );
    v.check(
        settled,
        format!(
            "after the load: pending {} (0), API connections {} (0), telemetry connections {} (0), {:.0} s after the clients stopped",
            end.pending,
            end.api_conns,
            end.telemetry_conns,
            end.at - stopped
        ),
    );
    println!();
    println!("## Verdict");
    println!();
    for line in &v.lines {
        println!("- {line}");
    }
    if unexpected > 0 {
        println!("- NOTE {unexpected} answers not what a correct proxy gives (marked ! above); not part of the verdict");
    }
    println!();
    println!("{}", if v.ok { "SOAK PASSED" } else { "SOAK FAILED" });
    if v.ok {
        let _ = std::fs::remove_file(&log_path);
    }
    drop(proxy);
    drop(second_proc);
    v.ok
}

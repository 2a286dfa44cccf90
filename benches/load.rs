//! Closed-loop load against pd-proxy over pd-sim, and against pd-sim's
//! decoder directly in the same run, so the proxy's share of the direct
//! throughput is measured on the same machine at the same moment.
//!
//! `cargo bench --bench load` — starts the release `pd-sim` and `pd-proxy`
//! binaries on free loopback ports, prints a table.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

const SIM: &str = env!("CARGO_BIN_EXE_pd-sim");
const PROXY: &str = env!("CARGO_BIN_EXE_pd-proxy");

/// One closed-loop run's outcome.
#[derive(Default)]
struct Stats {
    ok: u64,
    errors: u64,
    ttfb: Vec<Duration>,
    e2e: Vec<Duration>,
    elapsed: Duration,
}

impl Stats {
    fn rps(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64()
    }
    fn pct(v: &mut [Duration], p: f64) -> f64 {
        if v.is_empty() {
            return f64::NAN;
        }
        v.sort_unstable();
        let i = ((v.len() as f64 - 1.0) * p).round() as usize;
        v[i].as_secs_f64() * 1e3
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Proc(Child);
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(bin: &str, args: &[String]) -> Proc {
    Proc(
        Command::new(bin)
            .args(args)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {bin}: {e}")),
    )
}

/// Polls `GET /health` until 200 (bounded).
async fn wait_ready(addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(tcp) = TcpStream::connect(addr).await {
            if let Ok((mut send, conn)) = http1::handshake(TokioIo::new(tcp)).await {
                tokio::spawn(conn);
                let req = http::Request::get(format!("http://{addr}/health"))
                    .body(Full::new(Bytes::new()))
                    .unwrap();
                if let Ok(resp) = send.send_request(req).await {
                    if resp.status() == 200 {
                        return;
                    }
                }
            }
        }
        assert!(Instant::now() < deadline, "{addr} never became ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `concurrency` clients, each on its own keep-alive connection, sending
/// streaming chat requests back to back for `duration`; every answer must
/// be a 200 ending in `data: [DONE]`.
async fn closed_loop(
    addr: SocketAddr,
    concurrency: usize,
    duration: Duration,
    body: Bytes,
) -> Stats {
    let started = Instant::now();
    let deadline = started + duration;
    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            let body = body.clone();
            tokio::spawn(async move {
                let mut stats = Stats::default();
                let mut sender = None;
                while Instant::now() < deadline {
                    if sender.is_none() {
                        let Ok(tcp) = TcpStream::connect(addr).await else {
                            stats.errors += 1;
                            continue;
                        };
                        tcp.set_nodelay(true).unwrap();
                        let Ok((s, conn)) = http1::handshake(TokioIo::new(tcp)).await else {
                            stats.errors += 1;
                            continue;
                        };
                        tokio::spawn(conn);
                        sender = Some(s);
                    }
                    let s = sender.as_mut().unwrap();
                    let req = http::Request::post(format!("http://{addr}/v1/chat/completions"))
                        .header("content-type", "application/json")
                        .body(Full::new(body.clone()))
                        .unwrap();
                    let t0 = Instant::now();
                    match one_request(s, req, t0).await {
                        Some(ttfb) => {
                            stats.ok += 1;
                            stats.ttfb.push(ttfb);
                            stats.e2e.push(t0.elapsed());
                        }
                        None => {
                            stats.errors += 1;
                            sender = None;
                        }
                    }
                }
                stats
            })
        })
        .collect();
    let mut total = Stats::default();
    for w in workers {
        let s = w.await.unwrap();
        total.ok += s.ok;
        total.errors += s.errors;
        total.ttfb.extend(s.ttfb);
        total.e2e.extend(s.e2e);
    }
    total.elapsed = started.elapsed();
    total
}

async fn one_request(
    sender: &mut http1::SendRequest<Full<Bytes>>,
    req: http::Request<Full<Bytes>>,
    t0: Instant,
) -> Option<Duration> {
    // The previous response's end and the connection's return to idle are
    // not simultaneous; sending before `ready` fails spuriously.
    sender.ready().await.ok()?;
    let resp = match sender.send_request(req).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("request failed: {e:?}");
            return None;
        }
    };
    if resp.status() != 200 {
        eprintln!("status {}", resp.status());
        return None;
    }
    let mut body = resp.into_body();
    let mut ttfb = None;
    let mut tail: Vec<u8> = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.ok()?;
        if let Some(data) = frame.data_ref() {
            ttfb.get_or_insert_with(|| t0.elapsed());
            tail.extend_from_slice(data);
            if tail.len() > 64 {
                tail.drain(..tail.len() - 64);
            }
        }
    }
    tail.ends_with(b"data: [DONE]\n\n").then_some(ttfb?)
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let duration = Duration::from_secs(if quick { 2 } else { 5 });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let (pp, dp, api, tel) = (free_port(), free_port(), free_port(), free_port());
        let _sim = spawn(
            SIM,
            &[
                "--prefiller-port".into(), pp.to_string(),
                "--decoder-port".into(), dp.to_string(),
                "--telemetry-url".into(), format!("http://127.0.0.1:{tel}/api/v1/telemetry"),
            ],
        );
        let _proxy = spawn(
            PROXY,
            &[
                "--host".into(), "127.0.0.1".into(),
                "--port".into(), api.to_string(),
                "--prefiller-host".into(), "127.0.0.1".into(),
                "--prefiller-port".into(), pp.to_string(),
                "--decoder-host".into(), "127.0.0.1".into(),
                "--decoder-port".into(), dp.to_string(),
                "--telemetry-port".into(), tel.to_string(),
            ],
        );
        let proxy: SocketAddr = ([127, 0, 0, 1], api).into();
        let decoder: SocketAddr = ([127, 0, 0, 1], dp).into();
        wait_ready(decoder).await;
        wait_ready(([127, 0, 0, 1], pp).into()).await;
        wait_ready(proxy).await;
        let body = Bytes::from_static(
            br#"{"model":"sim-model","messages":[{"role":"user","content":"Explain KV cache reuse."}],"max_tokens":16,"stream":true}"#,
        );
        println!("scenario A: zero-latency pd-sim, 16-token chat streams, {duration:?} per run");
        println!("{:>6} {:>8} {:>10} {:>8} {:>9} {:>9} {:>9} {:>9} {:>7}", "conc", "target", "req/s", "errors", "ttfb p50", "ttfb p99", "e2e p50", "e2e p99", "share");
        for concurrency in [1usize, 64] {
            let mut direct = closed_loop(decoder, concurrency, duration, body.clone()).await;
            let mut proxied = closed_loop(proxy, concurrency, duration, body.clone()).await;
            let share = proxied.rps() / direct.rps();
            for (name, s) in [("direct", &mut direct), ("pd-proxy", &mut proxied)] {
                let rps = s.rps();
                println!(
                    "{concurrency:>6} {name:>8} {rps:>10.0} {:>8} {:>8.2}ms {:>8.2}ms {:>8.2}ms {:>8.2}ms {:>7}",
                    s.errors,
                    Stats::pct(&mut s.ttfb, 0.5),
                    Stats::pct(&mut s.ttfb, 0.99),
                    Stats::pct(&mut s.e2e, 0.5),
                    Stats::pct(&mut s.e2e, 0.99),
                    if name == "pd-proxy" { format!("{share:.3}") } else { String::new() },
                );
            }
        }
    });
}

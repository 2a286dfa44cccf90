//! What traces cost: 64 clients in a closed loop (16-token streams from
//! pd-sim at zero latency) against pd-proxy without `--otlp-endpoint` and
//! with it, pointed at an OTLP receiver in this process that takes every
//! batch at once. Runs alternate (off, on, off, on, ...) on fresh
//! processes; prints req/s and the proxy's CPU per request for each run and
//! the median per mode.
//!
//! `cargo bench --bench tracing_overhead [-- --secs N --rounds N]`.

mod common;

use common::{connect, free_port, get_text, wait_ready, Proc, CHAT_16};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;

const PROXY: &str = env!("CARGO_BIN_EXE_pd-proxy");
const CLIENTS: usize = 64;

/// One streamed request; true when it was a 200 ending in `[DONE]`.
async fn one_request(sender: &mut http1::SendRequest<Full<Bytes>>, addr: SocketAddr) -> bool {
    if sender.ready().await.is_err() {
        return false;
    }
    let req = http::Request::post(format!("http://{addr}/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(CHAT_16)))
        .unwrap();
    let Ok(resp) = sender.send_request(req).await else {
        return false;
    };
    if resp.status() != 200 {
        return false;
    }
    match resp.into_body().collect().await {
        Ok(body) => body.to_bytes().ends_with(b"data: [DONE]\n\n"),
        Err(_) => false,
    }
}

/// The OTLP receiver: reads each batch whole and answers 200 with an
/// empty (valid) ExportTraceServiceResponse.
async fn receiver(batches: Arc<AtomicU64>, bytes: Arc<AtomicU64>) -> SocketAddr {
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: Bytes| {
            batches.fetch_add(1, Ordering::Relaxed);
            bytes.fetch_add(body.len() as u64, Ordering::Relaxed);
            async { ([("content-type", "application/x-protobuf")], Vec::new()) }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

struct Run {
    rps: f64,
    cpu_us: f64,
    errors: u64,
    dropped: f64,
}

async fn run(otlp: Option<SocketAddr>, secs: u64) -> Run {
    let (pp, dp, api, tel) = (free_port(), free_port(), free_port(), free_port());
    let _sim = Proc::spawn(
        pd_sim::binary(),
        &[
            "--prefiller-port".into(),
            pp.to_string(),
            "--decoder-port".into(),
            dp.to_string(),
            "--telemetry-url".into(),
            format!("http://127.0.0.1:{tel}/api/v1/telemetry"),
        ],
    );
    let mut args: Vec<String> = [
        "--host",
        "127.0.0.1",
        "--port",
        &api.to_string(),
        "--prefiller-host",
        "127.0.0.1",
        "--prefiller-port",
        &pp.to_string(),
        "--decoder-host",
        "127.0.0.1",
        "--decoder-port",
        &dp.to_string(),
        "--telemetry-port",
        &tel.to_string(),
    ]
    .map(String::from)
    .to_vec();
    if let Some(addr) = otlp {
        args.extend(["--otlp-endpoint".into(), format!("http://{addr}")]);
    }
    let proxy = Proc::spawn(PROXY, &args);
    let addr: SocketAddr = ([127, 0, 0, 1], api).into();
    for a in [
        ([127, 0, 0, 1], pp).into(),
        ([127, 0, 0, 1], dp).into(),
        addr,
    ] {
        wait_ready(a).await;
    }
    let ok = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let measuring = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let warmup = Duration::from_secs(1);
    let end = Instant::now() + warmup + Duration::from_secs(secs);
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let (ok, errors, measuring) = (ok.clone(), errors.clone(), measuring.clone());
            tokio::spawn(async move {
                let mut sender = connect(addr).await.expect("connects");
                while Instant::now() < end {
                    let good = one_request(&mut sender, addr).await;
                    if !good {
                        sender = connect(addr).await.expect("connects");
                    }
                    if measuring.load(Ordering::Relaxed) {
                        if good { &ok } else { &errors }.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    tokio::time::sleep(warmup).await;
    let cpu0 = proxy.cpu();
    let t0 = Instant::now();
    measuring.store(true, Ordering::Relaxed);
    tokio::time::sleep_until((end).into()).await;
    measuring.store(false, Ordering::Relaxed);
    let elapsed = t0.elapsed().as_secs_f64();
    let cpu = (proxy.cpu() - cpu0).as_secs_f64();
    for c in clients {
        let _ = c.await;
    }
    let metrics = get_text(addr, "/metrics").await.unwrap_or_default();
    let dropped = metrics
        .lines()
        .find_map(|l| l.strip_prefix("pd_proxy_trace_spans_dropped_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0);
    let ok = ok.load(Ordering::Relaxed);
    Run {
        rps: ok as f64 / elapsed,
        cpu_us: cpu * 1e6 / ok.max(1) as f64,
        errors: errors.load(Ordering::Relaxed),
        dropped,
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let secs = arg("--secs", 10);
    let rounds = arg("--rounds", 3);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let batches = Arc::new(AtomicU64::new(0));
        let bytes = Arc::new(AtomicU64::new(0));
        let otlp = receiver(batches.clone(), bytes.clone()).await;
        println!(
            "{CLIENTS} clients, 16-token streams, zero-latency pd-sim; {secs} s per run, {} CPUs",
            std::thread::available_parallelism().map_or(0, |n| n.get())
        );
        println!("| run | tracing | req/s | proxy CPU µs/req | errors | spans dropped |");
        println!("|---|---|---|---|---|---|");
        let (mut off, mut on) = (Vec::new(), Vec::new());
        for round in 1..=rounds {
            for traced in [false, true] {
                let r = run(traced.then_some(otlp), secs).await;
                println!(
                    "| {round} | {} | {:.0} | {:.1} | {} | {} |",
                    if traced { "on" } else { "off" },
                    r.rps,
                    r.cpu_us,
                    r.errors,
                    r.dropped
                );
                if traced { &mut on } else { &mut off }.push(r);
            }
        }
        let med = |runs: &[Run], f: fn(&Run) -> f64| median(runs.iter().map(f).collect());
        let (off_rps, on_rps) = (med(&off, |r| r.rps), med(&on, |r| r.rps));
        let (off_cpu, on_cpu) = (med(&off, |r| r.cpu_us), med(&on, |r| r.cpu_us));
        println!(
            "median: off {off_rps:.0} req/s, {off_cpu:.1} µs/req; on {on_rps:.0} req/s, {on_cpu:.1} µs/req: \
             throughput {:+.1}%, CPU per request {:+.1}% ({:+.1} µs)",
            100.0 * (on_rps / off_rps - 1.0),
            100.0 * (on_cpu / off_cpu - 1.0),
            on_cpu - off_cpu
        );
        println!(
            "receiver: {} batches, {:.1} MiB of spans",
            batches.load(Ordering::Relaxed),
            bytes.load(Ordering::Relaxed) as f64 / (1 << 20) as f64
        );
    });
}

//! The memory scenario: pd-proxy's RSS idle, with many requests parked,
//! and after they are released.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

use crate::client::one_request;
use crate::common::{connect, get_text, CHAT_16};
use crate::pinning::proxy_cpus;
use crate::stack::{baseline, Stack, PROXY};
use crate::{verdict, Report};

/// How the memory scenario's clients reach the proxy.
#[derive(Clone, Copy, PartialEq)]
enum Proto {
    /// One HTTP/1.1 connection per request, as SDK clients do.
    Http1,
    /// HTTP/2 (h2c), 100 requests per connection, as a gateway in front
    /// would multiplex them.
    Http2,
}

/// Sends one streaming request over an HTTP/2 connection.
async fn one_request_h2(mut sender: http2::SendRequest<Full<Bytes>>, addr: SocketAddr) -> bool {
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
    match resp.into_body().collect().await {
        Ok(body) => resp_ok(&body.to_bytes()),
        Err(_) => false,
    }
}

fn resp_ok(body: &[u8]) -> bool {
    body.ends_with(b"data: [DONE]\n\n")
}

/// The scenario: this build, then the baseline when `PD_PROXY_BASELINE`
/// names one, over HTTP/1.1 and over HTTP/2; the targets judge this
/// build only.
pub async fn scenario_memory(report: &mut Report, parked: usize) -> Vec<String> {
    let baseline_bin = baseline();
    memory_header(report, parked, baseline_bin.as_deref());
    let mut checks = Vec::new();
    for proto in [Proto::Http1, Proto::Http2] {
        checks.extend(memory(report, parked, proto, PROXY, "").await);
        if let Some(bin) = &baseline_bin {
            memory(report, parked, proto, bin, "baseline, ").await;
        }
    }
    report.line("");
    checks
}

/// `parked` requests parked at once (pd-sim holds telemetry back) in
/// pd-proxy `bin`, then released; its row is labelled with `prefix`.
async fn memory(
    report: &mut Report,
    parked: usize,
    proto: Proto,
    bin: &str,
    prefix: &str,
) -> Vec<String> {
    let hold_ms = 20_000u64;
    let stack = Stack::start_with(
        bin,
        &[
            "--telemetry-delay-ms",
            &hold_ms.to_string(),
            "--default-tokens",
            "4",
        ],
        // Room for every parked request, and for the bench's scrapes of
        // /metrics beside them: the defaults (8,192 parked, and as many
        // connections as the open-file limit carries at three descriptors
        // each) are below the bench's 10,000.
        &[
            "--kv-ready-timeout",
            "120",
            "--max-pending",
            &parked.to_string(),
            "--max-connections",
            &(parked + 64).to_string(),
        ],
        proxy_cpus(None),
    )
    .await;
    // Idle = after start-up and a scrape, as a running proxy sits.
    let _ = get_text(stack.proxy_addr, "/metrics").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let idle = stack.proxy.status_kib("VmRSS") as f64 / 1024.0;

    let started = Instant::now();
    let tasks = send_all(stack.proxy_addr, parked, proto).await;
    let deadline = Instant::now() + Duration::from_millis(hold_ms);
    let mut at_peak = f64::NAN;
    while Instant::now() < deadline {
        if stack.pending().await >= parked as f64 {
            at_peak = stack.proxy.status_kib("VmRSS") as f64 / 1024.0;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let parked_seen = stack.pending().await;
    let (mut done, mut failed) = (0, 0);
    for t in tasks {
        if t.await.unwrap_or(false) {
            done += 1;
        } else {
            failed += 1;
        }
    }
    // Let the connections close and the allocator give back what it
    // keeps cached (jemalloc decays dirty pages over seconds).
    tokio::time::sleep(Duration::from_secs(5)).await;
    let after = stack.proxy.status_kib("VmRSS") as f64 / 1024.0;
    let pending_after = stack.pending().await;
    let (label, name) = match proto {
        Proto::Http1 => ("HTTP/1.1, one connection per request", "h1"),
        Proto::Http2 => ("HTTP/2, 100 requests per connection", "h2"),
    };
    report.line(format!("| {prefix}{label} | {idle:.1} | {at_peak:.1} | {after:.1} | {parked_seen:.0} | {done} | {failed} | {pending_after:.0} | {:.1} |",
        started.elapsed().as_secs_f64()
    ));
    vec![
        verdict(idle <= 15.0, format!("{name}: RSS idle {idle:.1} MiB ≤ 15")),
        verdict(
            at_peak <= 64.0,
            format!("{name}: RSS with {parked} parked {at_peak:.1} MiB ≤ 64"),
        ),
        verdict(
            after <= 2.0 * idle + 8.0,
            format!("{name}: RSS 5 s after release {after:.1} MiB ≤ 2 × idle {idle:.1} + 8"),
        ),
        verdict(
            failed == 0 && pending_after == 0.0,
            format!(
                "{name}: parked requests all completed ({failed} failed), gauge back to {pending_after}"
            ),
        ),
    ]
}

/// Starts `parked` requests to `addr`, one task each, which tells whether
/// its answer was whole.
async fn send_all(addr: SocketAddr, parked: usize, proto: Proto) -> Vec<JoinHandle<bool>> {
    let mut tasks = Vec::with_capacity(parked);
    // Paced so the proxy's prefill connections stay few: parking is what is
    // measured, not a connection storm.
    let mut tick = tokio::time::interval(Duration::from_micros(250));
    let mut h2: Option<http2::SendRequest<Full<Bytes>>> = None;
    for i in 0..parked {
        tick.tick().await;
        tasks.push(match proto {
            Proto::Http1 => tokio::spawn(async move {
                match connect(addr).await {
                    Some(mut s) => {
                        one_request(&mut s, addr, Bytes::from_static(CHAT_16), Instant::now())
                            .await
                            .is_some()
                    }
                    None => false,
                }
            }),
            Proto::Http2 => {
                if i % 100 == 0 {
                    let tcp = TcpStream::connect(addr).await.unwrap();
                    tcp.set_nodelay(true).unwrap();
                    let (s, conn) = http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
                        .await
                        .unwrap();
                    tokio::spawn(conn);
                    h2 = Some(s);
                }
                tokio::spawn(one_request_h2(h2.clone().unwrap(), addr))
            }
        });
    }
    tasks
}

fn memory_header(report: &mut Report, parked: usize, baseline: Option<&str>) {
    report.line(format!(
        "### Memory: pd-proxy RSS, {parked} requests parked (pd-sim holds telemetry back)"
    ));
    report.line("");
    if let Some(b) = baseline {
        report.line(format!("Baseline = `PD_PROXY_BASELINE={b}`, after pd-proxy over each protocol, with the same flags and a pd-sim of its own; the targets judge pd-proxy only."));
        report.line("");
    }
    report.line("| clients | idle MiB | parked MiB | 5 s after release MiB | parked seen | completed | failed | pending after | s |");
    report.line("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
}

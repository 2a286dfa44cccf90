//! The load generator: closed loops of streaming requests, and the
//! latency figures the scenarios report.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::HeaderValue;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;

use crate::common::connect;

/// One closed-loop run's outcome.
#[derive(Default)]
pub struct Stats {
    pub ok: u64,
    pub errors: u64,
    pub ttfb: Vec<Duration>,
    pub e2e: Vec<Duration>,
    pub elapsed: Duration,
}

impl Stats {
    /// Counts every answer; the latencies leave out each client's first
    /// request, which also paid for connecting (all clients at once, and
    /// through the proxy its upstream connections too).
    pub fn of<'a>(samples: impl Iterator<Item = &'a Sample>) -> Stats {
        let mut stats = Stats::default();
        for s in samples {
            if !s.ok {
                stats.errors += 1;
                continue;
            }
            stats.ok += 1;
            if !s.first {
                stats.ttfb.push(s.ttfb);
                stats.e2e.push(s.e2e);
            }
        }
        stats
    }

    pub fn rps(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64()
    }
}

/// Percentile `p` (0..=1) in milliseconds; sorts `v`.
pub fn pct(v: &mut [Duration], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_unstable();
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i].as_secs_f64() * 1e3
}

/// The cells `TTFB p50 | TTFB p99 | e2e p50 | e2e p99`, in ms.
pub fn latency_cells(s: &mut Stats) -> String {
    let (t50, t99) = (pct(&mut s.ttfb, 0.5), pct(&mut s.ttfb, 0.99));
    let (e50, e99) = (pct(&mut s.e2e, 0.5), pct(&mut s.e2e, 0.99));
    format!("{t50:.2} | {t99:.2} | {e50:.2} | {e99:.2}")
}

/// Sends one streaming request; `Some((ttfb, x-request-id))` when the
/// answer was a 200 that ended in `data: [DONE]`.
pub async fn one_request(
    sender: &mut http1::SendRequest<Full<Bytes>>,
    addr: SocketAddr,
    body: Bytes,
    t0: Instant,
) -> Option<(Duration, Option<HeaderValue>)> {
    // The previous response's end and the connection's return to idle are
    // not simultaneous; sending before `ready` fails spuriously.
    sender.ready().await.ok()?;
    let req = http::Request::post(format!("http://{addr}/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(Full::new(body))
        .unwrap();
    let resp = sender.send_request(req).await.ok()?;
    if resp.status() != 200 {
        return None;
    }
    let id = resp.headers().get("x-request-id").cloned();
    let mut body = resp.into_body();
    let mut ttfb = None;
    let mut tail: Vec<u8> = Vec::with_capacity(128);
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
    tail.ends_with(b"data: [DONE]\n\n").then_some((ttfb?, id))
}

/// `concurrency` clients, each on its own keep-alive connection, sending
/// requests back to back for `duration`.
pub async fn closed_loop(
    addr: SocketAddr,
    concurrency: usize,
    duration: Duration,
    body: &'static [u8],
) -> Stats {
    let started = Instant::now();
    let samples = timed_loop(vec![addr], concurrency, duration, body, started).await;
    let mut total = Stats::of(samples.iter());
    total.elapsed = started.elapsed();
    total
}

/// One request of a timed closed loop.
pub struct Sample {
    /// When the answer ended (or failed), from the loop's origin.
    pub end: Duration,
    pub ok: bool,
    pub ttfb: Duration,
    pub e2e: Duration,
    /// The client's first request, which also connected: counted, but
    /// left out of the latency percentiles as in [`closed_loop`].
    pub first: bool,
    /// The answer's `x-request-id`.
    pub id: Option<HeaderValue>,
}

/// [`closed_loop`] that keeps every request's outcome and end time, so a
/// run can be cut into windows afterwards. Client `i` sends to
/// `addrs[i % addrs.len()]`.
pub async fn timed_loop(
    addrs: Vec<SocketAddr>,
    concurrency: usize,
    duration: Duration,
    body: &'static [u8],
    origin: Instant,
) -> Vec<Sample> {
    let deadline = Instant::now() + duration;
    let workers: Vec<_> = (0..concurrency)
        .map(|i| {
            let addr = addrs[i % addrs.len()];
            tokio::spawn(async move {
                let mut samples = Vec::new();
                let mut sender = None;
                let mut first = true;
                while Instant::now() < deadline {
                    if sender.is_none() {
                        let t0 = Instant::now();
                        sender = connect(addr).await;
                        if sender.is_none() {
                            samples.push(Sample {
                                end: origin.elapsed(),
                                ok: false,
                                ttfb: Duration::ZERO,
                                e2e: t0.elapsed(),
                                first,
                                id: None,
                            });
                            tokio::time::sleep(Duration::from_millis(10)).await;
                            continue;
                        }
                    }
                    let t0 = Instant::now();
                    let s = sender.as_mut().unwrap();
                    let result = one_request(s, addr, Bytes::from_static(body), t0).await;
                    if result.is_none() {
                        sender = None;
                    }
                    let e2e = t0.elapsed();
                    let ok = result.is_some();
                    let (ttfb, id) = result.unwrap_or_default();
                    samples.push(Sample {
                        end: origin.elapsed(),
                        ok,
                        ttfb,
                        e2e,
                        first: std::mem::replace(&mut first, false),
                        id,
                    });
                }
                samples
            })
        })
        .collect();
    let mut all = Vec::new();
    for w in workers {
        all.extend(w.await.unwrap());
    }
    all
}

//! pd-proxy under load, against pd-sim's decoder called directly in the
//! same run, so every figure has its baseline from the same machine at the
//! same moment.
//!
//! `cargo bench --bench load` starts the release `pd-sim` and `pd-proxy`
//! binaries on free loopback ports and runs:
//! - A: zero-latency upstream, 16-token streams, closed loop at several
//!   concurrencies: req/s, time to first byte and end-to-end p50/p99, the
//!   e2e p50 the proxy adds to the direct one, the proxy's share of the
//!   direct throughput, and CPU per request of pd-proxy and of pd-sim; then
//!   per proxy size one row of how it scales (one client's latency, req/s
//!   at 64, 256 and 1024 clients, CPU per request from 64 to 1024), the
//!   form of the "Performance II" issue's table;
//! - B: realistic upstream timings at 1024 clients: the proxy's overhead
//!   over the simulated time;
//! - F: a fleet of 3 prefillers and 2 decoders, one prefiller SIGKILLed
//!   under load: errors, req/s and latency before the kill, in the second
//!   after it (ejection) and after that, and the proxy's retry and
//!   ejection counters;
//! - W: the 64-client share measured with `wrk`, an independent load
//!   generator, when it is on PATH (skipped with a reason otherwise);
//! - R: three pd-proxy replicas sharing a cluster key behind HAProxy (round
//!   robin over their telemetry ports) against one replica, in turn: req/s,
//!   CPU per request, the share of events forwarded and the KV wait a
//!   forwarded event adds (skipped with a reason without
//!   `/usr/sbin/haproxy`);
//! - memory: proxy RSS idle, with 10,000 requests parked, 5 s after they
//!   are released.
//!
//! On more than 2 cores each process gets cores of its own, so that the
//! proxy's throughput and CPU per request follow the cores it is given, not
//! what the scheduler lends it beside pd-sim and the load generator: pd-sim
//! a quarter of them (at least 2), this process (the load generator, one
//! runtime worker per core) a quarter, pd-proxy the rest, each child under
//! `taskset -c` (pd-sim and pd-proxy size their runtimes to their CPUs). A
//! runs pd-proxy on 1 core and on 4 (on fewer than 12 cores: 1 and the
//! rest), restarting it for each size, so one command gives the scaling
//! table on a big host. On 2 cores nothing is pinned: three processes
//! cannot each have one, and the header says so.
//!
//! Prints a table and rewrites `benches/RESULTS.md`, keeping whatever
//! follows [`KEPT_MARKER`] there (results measured outside the bench).
//! `-- --quick` runs shorter, for a smoke test; `-- --only a` runs one
//! part and leaves `RESULTS.md` alone; `-- --proxy-cores 1,4` picks A's
//! pd-proxy sizes where processes are pinned.

mod common;

use common::{command_on, connect, free_port, get_text, wait_ready, Proc, CHAT_16};
use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::{Read as _, Write as _};
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::HeaderValue;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;

const PROXY: &str = env!("CARGO_BIN_EXE_pd-proxy");

const CHAT_64: &[u8] = br#"{"model":"sim-model","messages":[{"role":"user","content":"Explain how KV cache reuse helps long-context serving."}],"max_tokens":64,"stream":true}"#;

/// In `benches/RESULTS.md`, this line and what follows it are kept when
/// the bench rewrites the file: results measured outside the bench.
const KEPT_MARKER: &str =
    "<!-- measured outside `cargo bench`: cargo bench keeps this line and what follows it -->";

/// Scenario B's simulated timings (ms): prefill, telemetry after the
/// prefill response, decoder first token, then per token; 64 tokens.
const B_PREFILL: u64 = 50;
const B_TELEMETRY: u64 = 5;
const B_FIRST_TOKEN: u64 = 10;
const B_PER_TOKEN: u64 = 5;
const B_TOKENS: u64 = 64;

fn b_simulated() -> Duration {
    Duration::from_millis(B_PREFILL + B_TELEMETRY + B_FIRST_TOKEN + B_PER_TOKEN * (B_TOKENS - 1))
}

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
    /// Counts every answer; the latencies leave out each client's first
    /// request, which also paid for connecting (all clients at once, and
    /// through the proxy its upstream connections too).
    fn of<'a>(samples: impl Iterator<Item = &'a Sample>) -> Stats {
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

    fn rps(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64()
    }
}

/// Percentile `p` (0..=1) in milliseconds; sorts `v`.
fn pct(v: &mut [Duration], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_unstable();
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i].as_secs_f64() * 1e3
}

/// The cells `TTFB p50 | TTFB p99 | e2e p50 | e2e p99`, in ms.
fn latency_cells(s: &mut Stats) -> String {
    let (t50, t99) = (pct(&mut s.ttfb, 0.5), pct(&mut s.ttfb, 0.99));
    let (e50, e99) = (pct(&mut s.e2e, 0.5), pct(&mut s.e2e, 0.99));
    format!("{t50:.2} | {t99:.2} | {e50:.2} | {e99:.2}")
}

/// The whole machine's CPU ticks from /proc/stat: (busy, total). Steal
/// (time the hypervisor gave to other guests) counts as busy: it is as
/// unavailable to the three processes here as their own work.
fn machine_ticks() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap();
    let cpu: Vec<u64> = stat
        .lines()
        .next()
        .unwrap()
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().unwrap())
        .collect();
    // user nice system idle iowait irq softirq steal ...
    let idle = cpu[3] + cpu[4];
    let total: u64 = cpu.iter().take(8).sum();
    (total - idle, total)
}

/// Share of the machine's CPU that was busy since `before`, in percent.
fn machine_busy_since(before: (u64, u64)) -> f64 {
    let now = machine_ticks();
    100.0 * (now.0 - before.0) as f64 / (now.1 - before.1).max(1) as f64
}

/// Where each process runs on a machine of more than 2 cores, as positions
/// in the list of CPUs the bench may use (a container's CPUs need not
/// start at 0). pd-sim and the load generator get cores of their own, so
/// that the proxy's throughput and CPU per request are its own and not
/// those of whoever else the scheduler put beside it; pd-proxy's cores come
/// last, taken from the front of what is left, so its sizes in A grow over
/// the same cores.
#[derive(Clone, Debug, PartialEq)]
struct Layout {
    sim: Range<usize>,
    load: Range<usize>,
    /// pd-proxy's cores at the size asked for (fewer where `rest` is).
    proxy: Range<usize>,
    /// Every core left after pd-sim and the load generator: pd-proxy's
    /// outside scenario A.
    rest: Range<usize>,
}

/// `None` on 2 cores or fewer: three processes cannot each have a core,
/// and pinning them would only take the scheduler's freedom away.
fn layout(cores: usize, proxy_cores: usize) -> Option<Layout> {
    if cores <= 2 {
        return None;
    }
    // A quarter each, at least 2 for pd-sim (its prefiller and decoder) and
    // 1 for the load generator, and always 1 left for pd-proxy.
    let sim = (cores / 4).max(2).min(cores - 2);
    let load = (cores / 4).max(1).min(cores - sim - 1);
    let rest = sim + load..cores;
    let proxy = rest.start..rest.start + proxy_cores.clamp(1, rest.len());
    Some(Layout {
        sim: 0..sim,
        load: sim..sim + load,
        proxy,
        rest,
    })
}

/// The layout put in place: the CPU ids behind its positions.
struct Pinning {
    /// Machine cores, counted before anything was pinned.
    cores: usize,
    ids: Vec<usize>,
    /// [`layout`] with pd-proxy on every core left.
    layout: Layout,
}

impl Pinning {
    /// The CPU ids at `positions`, as a `taskset -c` list (`8-11`, `3,5`).
    fn cpus(&self, positions: &Range<usize>) -> String {
        cpu_list(&self.ids[positions.clone()])
    }

    /// pd-proxy's CPUs at `size` cores (all it may have when `None`).
    fn proxy(&self, size: Option<usize>) -> String {
        match size {
            Some(n) => self.cpus(&layout(self.cores, n).unwrap().proxy),
            None => self.cpus(&self.layout.rest),
        }
    }
}

/// Set once in `main`, before the load generator's runtime starts: `None`
/// when nothing is pinned.
static PINNING: OnceLock<Option<Pinning>> = OnceLock::new();

fn pinning() -> Option<&'static Pinning> {
    PINNING.get().and_then(Option::as_ref)
}

/// pd-sim's CPUs; `None` where nothing is pinned.
fn sim_cpus() -> Option<String> {
    pinning().map(|p| p.cpus(&p.layout.sim))
}

/// pd-proxy's CPUs (and HAProxy's, in R: it is on the proxies' path) at
/// `size` cores, or all those left when `None`; `None` where nothing is
/// pinned.
fn proxy_cpus(size: Option<usize>) -> Option<String> {
    pinning().map(|p| p.proxy(size))
}

/// `0-3,8,10-11` from sorted ids.
fn cpu_list(ids: &[usize]) -> String {
    let mut out = String::new();
    let mut i = 0;
    while i < ids.len() {
        let mut j = i;
        while j + 1 < ids.len() && ids[j + 1] == ids[j] + 1 {
            j += 1;
        }
        if !out.is_empty() {
            out.push(',');
        }
        let _ = match j - i {
            0 => write!(out, "{}", ids[i]),
            _ => write!(out, "{}-{}", ids[i], ids[j]),
        };
        i = j + 1;
    }
    out
}

/// The CPU ids this process may run on (`Cpus_allowed_list`, `0-3,8`).
fn allowed_cpus() -> Vec<usize> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let Some(list) = status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
    else {
        return Vec::new();
    };
    let mut ids = Vec::new();
    for part in list.trim().split(',').filter(|p| !p.is_empty()) {
        let (a, b) = part.split_once('-').unwrap_or((part, part));
        if let (Ok(a), Ok(b)) = (a.parse::<usize>(), b.parse::<usize>()) {
            ids.extend(a..=b);
        }
    }
    ids
}

/// Pins this process (the load generator) to its cores and settles where
/// the others go; must run before any thread is started, since threads
/// inherit the mask they start with. `Err` says why nothing is pinned.
/// Through taskset rather than sched_setaffinity: the crate forbids
/// `unsafe`, and the bench with it.
fn pin(cores: usize) -> Result<Pinning, String> {
    let Some(layout) = layout(cores, usize::MAX) else {
        return Err(format!("{cores} cores"));
    };
    let ids = allowed_cpus();
    if ids.len() < cores {
        return Err(format!(
            "{} CPUs in this process's affinity list for {cores} cores",
            ids.len()
        ));
    }
    let pinning = Pinning {
        cores,
        ids: ids[..cores].to_vec(),
        layout,
    };
    let load = pinning.cpus(&pinning.layout.load);
    let pid = std::process::id().to_string();
    match Command::new("taskset")
        .args(["-a", "-p", "-c", &load, &pid])
        .stdout(Stdio::null())
        .output()
    {
        Ok(out) if out.status.success() => Ok(pinning),
        Ok(out) => Err(format!(
            "`taskset -a -p -c {load} {pid}` failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Err(e) => Err(format!("taskset (util-linux) did not run: {e}")),
    }
}

/// pd-sim and pd-proxy, started with extra flags.
struct Stack {
    sim: Proc,
    proxy: Proc,
    proxy_addr: SocketAddr,
    decoder_addr: SocketAddr,
    /// pd-proxy's binary and flags, to start it again on other cores.
    proxy_cmd: (String, Vec<String>),
}

/// pd-sim's flags: its two ports, telemetry to the proxy's port `tel`.
fn sim_args(pp: u16, dp: u16, tel: u16, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = [
        "--prefiller-port",
        &pp.to_string(),
        "--decoder-port",
        &dp.to_string(),
        "--telemetry-url",
        &format!("http://127.0.0.1:{tel}/api/v1/telemetry"),
    ]
    .map(String::from)
    .to_vec();
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// pd-proxy's flags on loopback: API port, telemetry port, upstream ports
/// (comma lists).
fn proxy_args(
    api: u16,
    tel: u16,
    prefill_ports: &str,
    decode_ports: &str,
    extra: &[&str],
) -> Vec<String> {
    let mut args: Vec<String> = [
        "--host",
        "127.0.0.1",
        "--port",
        &api.to_string(),
        "--prefiller-host",
        "127.0.0.1",
        "--prefiller-port",
        prefill_ports,
        "--decoder-host",
        "127.0.0.1",
        "--decoder-port",
        decode_ports,
        "--telemetry-port",
        &tel.to_string(),
    ]
    .map(String::from)
    .to_vec();
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

impl Stack {
    async fn start(sim_flags: &[&str], proxy_flags: &[&str]) -> Stack {
        Stack::start_with(PROXY, sim_flags, proxy_flags, proxy_cpus(None)).await
    }

    /// With `proxy` as the pd-proxy binary, on the CPUs `cpus`.
    async fn start_with(
        proxy: &str,
        sim_flags: &[&str],
        proxy_flags: &[&str],
        cpus: Option<String>,
    ) -> Stack {
        let (pp, dp, api, tel) = (free_port(), free_port(), free_port(), free_port());
        let sim = Proc::spawn_on(
            sim_cpus().as_deref(),
            pd_sim::binary(),
            &sim_args(pp, dp, tel, sim_flags),
        );
        let (pp_s, dp_s) = (pp.to_string(), dp.to_string());
        let args = proxy_args(api, tel, &pp_s, &dp_s, proxy_flags);
        let proxy_proc = Proc::spawn_on(cpus.as_deref(), proxy, &args);
        let stack = Stack {
            sim,
            proxy: proxy_proc,
            proxy_addr: ([127, 0, 0, 1], api).into(),
            decoder_addr: ([127, 0, 0, 1], dp).into(),
            proxy_cmd: (proxy.to_owned(), args),
        };
        for addr in [
            stack.decoder_addr,
            ([127, 0, 0, 1], pp).into(),
            stack.proxy_addr,
        ] {
            wait_ready(addr).await;
        }
        stack
    }

    /// Stops pd-proxy and starts it again on the CPUs `cpus`, with the same
    /// flags and ports: pd-sim posts its telemetry to the port it was
    /// started with, and a fresh pd-sim would leave the direct baseline
    /// measured against another process.
    async fn restart_proxy(&mut self, cpus: Option<&str>) {
        // Gone before the new one binds its ports.
        let _ = self.proxy.0.kill();
        let _ = self.proxy.0.wait();
        let (bin, args) = &self.proxy_cmd;
        self.proxy = Proc::spawn_on(cpus, bin, args);
        wait_ready(self.proxy_addr).await;
    }

    async fn pending(&self) -> f64 {
        let text = get_text(self.proxy_addr, "/metrics")
            .await
            .unwrap_or_default();
        text.lines()
            .find_map(|l| l.strip_prefix("pd_proxy_pending_requests "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(f64::NAN)
    }
}

/// Sends one streaming request; `Some((ttfb, x-request-id))` when the
/// answer was a 200 that ended in `data: [DONE]`.
async fn one_request(
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
async fn closed_loop(
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

struct Report {
    text: String,
}

impl Report {
    fn line(&mut self, s: impl AsRef<str>) {
        println!("{}", s.as_ref());
        self.text.push_str(s.as_ref());
        self.text.push('\n');
    }
}

/// pd-proxy's size in A: the cores it is pinned to, or `None` where
/// nothing is pinned.
type Size = Option<usize>;

fn size_label(size: Size) -> String {
    match size {
        None => "pd-proxy".to_owned(),
        Some(1) => "pd-proxy, 1 core".to_owned(),
        Some(n) => format!("pd-proxy, {n} cores"),
    }
}

/// A's pd-proxy sizes: 1 core and 4 where there is room for both beside
/// pd-sim and the load generator (the issue's table), 1 and all that is
/// left on 3 to 11 cores, or `asked` (clamped to what is left).
fn a_sizes(pinning: Option<&Pinning>, asked: Option<&[usize]>) -> Vec<Size> {
    let Some(p) = pinning else {
        return vec![None];
    };
    let rest = p.layout.rest.len();
    let asked = asked.map_or_else(
        || {
            if p.cores >= 12 {
                vec![1, 4]
            } else {
                vec![1, rest]
            }
        },
        <[usize]>::to_vec,
    );
    let mut sizes = Vec::new();
    for n in asked {
        let size = Some(n.clamp(1, rest));
        if !sizes.contains(&size) {
            sizes.push(size);
        }
    }
    sizes
}

/// One closed-loop run of A: one target at one concurrency.
struct ARun {
    clients: usize,
    stats: Stats,
    /// `TTFB p50 | TTFB p99 | e2e p50 | e2e p99`.
    cells: String,
    e2e_p50: f64,
    /// pd-proxy's CPU µs per answered request; NaN in the direct runs.
    proxy_us: f64,
    sim_us: f64,
}

async fn a_run(
    stack: &Stack,
    addr: SocketAddr,
    clients: usize,
    duration: Duration,
    proxied: bool,
) -> ARun {
    let (proxy0, sim0) = (stack.proxy.cpu(), stack.sim.cpu());
    let mut stats = closed_loop(addr, clients, duration, CHAT_16).await;
    let per_req = |d: Duration| d.as_secs_f64() * 1e6 / stats.ok.max(1) as f64;
    let proxy_us = if proxied {
        per_req(stack.proxy.cpu() - proxy0)
    } else {
        f64::NAN
    };
    let sim_us = per_req(stack.sim.cpu() - sim0);
    ARun {
        clients,
        cells: latency_cells(&mut stats),
        e2e_p50: pct(&mut stats.e2e, 0.5),
        stats,
        proxy_us,
        sim_us,
    }
}

fn at(runs: &[ARun], clients: usize) -> Option<&ARun> {
    runs.iter().find(|r| r.clients == clients)
}

/// Every size of pd-proxy at every concurrency against one pd-sim,
/// pd-proxy restarted between sizes; the direct runs do not depend on
/// pd-proxy, so they run once, each beside the first size's run at the
/// same concurrency. `cores`: the machine's, for the one target that only
/// a big host can meet.
async fn scenario_a(
    report: &mut Report,
    duration: Duration,
    concurrencies: &[usize],
    sizes: &[Size],
    cores: usize,
) -> Vec<String> {
    let mut stack = Stack::start_with(PROXY, &[], &[], proxy_cpus(sizes[0])).await;
    let mut direct = Vec::new();
    let mut proxied: Vec<Vec<ARun>> = Vec::new();
    for (i, &size) in sizes.iter().enumerate() {
        if i > 0 {
            stack.restart_proxy(proxy_cpus(size).as_deref()).await;
        }
        // Warm the proxy's upstream pool and both binaries' allocators.
        closed_loop(stack.proxy_addr, 8, Duration::from_millis(500), CHAT_16).await;
        let mut runs = Vec::new();
        for &c in concurrencies {
            if i == 0 {
                eprintln!("A: {c} clients, direct");
                direct.push(a_run(&stack, stack.decoder_addr, c, duration, false).await);
            }
            eprintln!("A: {c} clients, {}", size_label(size));
            runs.push(a_run(&stack, stack.proxy_addr, c, duration, true).await);
        }
        proxied.push(runs);
    }

    report.line("### A: zero-latency upstream, 16-token chat streams");
    report.line("");
    if let Some(p) = pinning() {
        let on: Vec<String> = sizes
            .iter()
            .map(|&s| format!("{} on CPUs {}", size_label(s), p.proxy(s)))
            .collect();
        report.line(format!(
            "pd-proxy, restarted for each size: {}; pd-sim on CPUs {}, the same process throughout.",
            on.join("; "),
            p.cpus(&p.layout.sim)
        ));
        report.line("");
    }
    report.line("| clients | target | req/s | errors | TTFB p50 ms | TTFB p99 ms | e2e p50 ms | e2e p99 ms | added e2e p50 ms | share | proxy CPU µs/req | pd-sim CPU µs/req |");
    report.line("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (j, d) in direct.iter().enumerate() {
        let c = d.clients;
        report.line(format!(
            "| {c} | direct | {:.0} | {} | {} | | | | {:.0} |",
            d.stats.rps(),
            d.stats.errors,
            d.cells,
            d.sim_us
        ));
        for (&size, runs) in sizes.iter().zip(&proxied) {
            let p = &runs[j];
            report.line(format!(
                "| {c} | {} | {:.0} | {} | {} | {:.3} | {:.3} | {:.0} | {:.0} |",
                size_label(size),
                p.stats.rps(),
                p.stats.errors,
                p.cells,
                p.e2e_p50 - d.e2e_p50,
                p.stats.rps() / d.stats.rps(),
                p.proxy_us,
                p.sim_us
            ));
        }
    }
    report.line("");
    report.line("Added e2e p50 = pd-proxy's e2e p50 − direct's at the same clients; share = pd-proxy's req/s ÷ direct's. CPU per request = the process's user + system time over the run ÷ answered requests; pd-sim serves only the decoder's stream in the direct runs, and through pd-proxy also the prefill and its telemetry POST.");
    report.line("");
    let cell = |run: Option<&ARun>, f: &dyn Fn(&ARun) -> String| run.map_or("—".to_owned(), f);
    let rps = |r: &ARun| format!("{:.0}", r.stats.rps());
    report.line(
        "| | c1 e2e p50 ms | c64 req/s | c256 req/s | c1024 req/s | proxy CPU µs/req c64 → c1024 |",
    );
    report.line("|---|---:|---:|---:|---:|---:|");
    let mut scaling = |name: String, runs: &[ARun], cpu: String| {
        report.line(format!(
            "| {name} | {} | {} | {} | {} | {cpu} |",
            cell(at(runs, 1), &|r| format!("{:.3}", r.e2e_p50)),
            cell(at(runs, 64), &rps),
            cell(at(runs, 256), &rps),
            cell(at(runs, 1024), &rps),
        ));
    };
    scaling("decoder direct".into(), &direct, String::new());
    for (&size, runs) in sizes.iter().zip(&proxied) {
        let cpu = match (at(runs, 64), at(runs, 1024)) {
            (Some(a), Some(b)) => format!("{:.0} → {:.0}", a.proxy_us, b.proxy_us),
            (Some(a), None) => format!("{:.0} → —", a.proxy_us),
            _ => "—".to_owned(),
        };
        scaling(size_label(size), runs, cpu);
    }
    report.line("");

    let mut checks = Vec::new();
    // The throughput targets are the 4-core proxy's: one core is saturated
    // at 64 clients already.
    let rps_judged = sizes
        .iter()
        .position(|&s| s == Some(4))
        .unwrap_or(sizes.len() - 1);
    for (k, (&size, runs)) in sizes.iter().zip(&proxied).enumerate() {
        let name = format!("A {}", size_label(size));
        if let (Some(d), Some(p)) = (at(&direct, 1), at(runs, 1)) {
            let (d50, p50) = (d.e2e_p50, p.e2e_p50);
            checks.push(verdict(
                p50 <= 3.0 * d50 + 0.3,
                format!("{name}: c1 e2e p50 {p50:.3} ms ≤ 3 × direct {d50:.3} ms + 0.3 ms"),
            ));
            let added = p50 - d50;
            let what = format!(
                "{name}: c1 added e2e p50 {added:.3} ms (pd-proxy {p50:.3} − direct {d50:.3}) ≤ 0.15 ms"
            );
            // The load generator and pd-sim on cores of their own, as on
            // the issue's 16-core host; sharing fewer, one client's
            // latency is mostly the scheduler's.
            checks.push(if cores >= 16 {
                verdict(added <= 0.15, what)
            } else {
                format!("- (not judged: {cores} cores) {what}")
            });
        }
        // Pinned, the direct run has pd-sim's and the load generator's
        // cores to itself, and a 1-core proxy's share says little.
        if let (true, Some(d), Some(p)) = (k == rps_judged, at(&direct, 64), at(runs, 64)) {
            let share = p.stats.rps() / d.stats.rps();
            checks.push(verdict(
                share >= 0.20,
                format!("{name}: share at c64 {share:.3} ≥ 0.20"),
            ));
        }
        if let (Some(a), Some(b)) = (at(runs, 64), at(runs, 1024)) {
            let ratio = b.proxy_us / a.proxy_us;
            checks.push(verdict(
                ratio <= 1.2,
                format!(
                    "{name}: CPU per request c1024 / c64 = {:.0} / {:.0} µs = {ratio:.2} ≤ 1.2",
                    b.proxy_us, a.proxy_us
                ),
            ));
            if k == rps_judged {
                let ratio = b.stats.rps() / a.stats.rps();
                checks.push(verdict(
                    ratio >= 0.85,
                    format!(
                        "{name}{}: req/s c1024 / c64 = {:.0} / {:.0} = {ratio:.2} ≥ 0.85",
                        if sizes.len() == 1 {
                            " (the only size)"
                        } else {
                            ""
                        },
                        b.stats.rps(),
                        a.stats.rps()
                    ),
                ));
            }
        }
        if let (Some(d), Some(p)) = (at(&direct, 1024), at(runs, 1024)) {
            checks.push(verdict(
                p.stats.errors == 0 && d.stats.errors == 0,
                format!(
                    "{name}: errors at c1024: proxy {}, direct {} (want 0)",
                    p.stats.errors, d.stats.errors
                ),
            ));
        }
    }
    let missing: Vec<String> = [64, 1024]
        .iter()
        .filter(|c| !concurrencies.contains(c))
        .map(|c| format!("c{c}"))
        .collect();
    if !missing.is_empty() {
        checks.push(format!(
            "- (not judged: no {} in this run) A CPU per request and req/s at c1024 against c64",
            missing.join(" or ")
        ));
    }
    checks
}

async fn scenario_b(report: &mut Report, duration: Duration, clients: usize) -> Vec<String> {
    let (prefill, telemetry, first, per) = (
        B_PREFILL.to_string(),
        B_TELEMETRY.to_string(),
        B_FIRST_TOKEN.to_string(),
        B_PER_TOKEN.to_string(),
    );
    let stack = Stack::start(
        &[
            "--prefill-delay-ms",
            &prefill,
            "--telemetry-delay-ms",
            &telemetry,
            "--first-token-delay-ms",
            &first,
            "--token-delay-ms",
            &per,
        ],
        &[],
    )
    .await;
    let simulated = b_simulated();
    report.line(format!(
        "### B: realistic upstream ({B_PREFILL} ms prefill, telemetry {B_TELEMETRY} ms later, {B_FIRST_TOKEN} ms to first token, {B_PER_TOKEN} ms/token, {B_TOKENS} tokens = {} ms simulated), {clients} clients",
        simulated.as_millis()
    ));
    report.line("");
    let before = machine_ticks();
    let mut direct = closed_loop(stack.decoder_addr, clients, duration, CHAT_64).await;
    let direct_busy = machine_busy_since(before);
    let before = machine_ticks();
    let mut proxied = closed_loop(stack.proxy_addr, clients, duration, CHAT_64).await;
    let proxied_busy = machine_busy_since(before);
    // The decoder alone takes its share of the simulated time; the rest is
    // prefill + telemetry.
    let decode_sim = Duration::from_millis(B_FIRST_TOKEN + B_PER_TOKEN * (B_TOKENS - 1));
    report.line(
        "| target | req/s | errors | e2e p50 ms | e2e p99 ms | overhead p50 ms | overhead p99 ms | machine CPU busy % |",
    );
    report.line("|---|---:|---:|---:|---:|---:|---:|---:|");
    let mut row = |name: &str, s: &mut Stats, simulated: Duration, busy: f64| {
        let ms = simulated.as_secs_f64() * 1e3;
        let (p50, p99) = (pct(&mut s.e2e, 0.5), pct(&mut s.e2e, 0.99));
        report.line(format!(
            "| {name} | {:.0} | {} | {p50:.1} | {p99:.1} | {:.1} | {:.1} | {busy:.0} |",
            s.rps(),
            s.errors,
            p50 - ms,
            p99 - ms
        ));
        p99 - ms
    };
    row(
        "direct (decoder only)",
        &mut direct,
        decode_sim,
        direct_busy,
    );
    let p99 = row("pd-proxy", &mut proxied, simulated, proxied_busy);
    report.line("");
    report.line("Overhead = end-to-end minus the simulated time (the direct row: minus the decoder's share); it includes pd-sim's own timer and scheduling lag on the shared cores. Machine CPU busy: all cores, from /proc/stat, steal included; near 100 the overhead is queueing for CPU.");
    report.line("");
    vec![
        verdict(p99 <= 10.0, format!("B overhead p99 {p99:.1} ms ≤ 10 ms")),
        verdict(
            proxied.errors == 0,
            format!("B errors {} (want 0)", proxied.errors),
        ),
    ]
}

/// Scenario F's prefill time (ms): long enough that every prefiller has
/// requests in flight when one is killed.
const F_PREFILL: u64 = 20;
/// Scenario F's `--health-interval` (s).
const F_HEALTH_INTERVAL: &str = "0.5";

/// One request of a timed closed loop.
struct Sample {
    /// When the answer ended (or failed), from the loop's origin.
    end: Duration,
    ok: bool,
    ttfb: Duration,
    e2e: Duration,
    /// The client's first request, which also connected: counted, but
    /// left out of the latency percentiles as in [`closed_loop`].
    first: bool,
    /// The answer's `x-request-id`.
    id: Option<HeaderValue>,
}

/// [`closed_loop`] that keeps every request's outcome and end time, so a
/// run can be cut into windows afterwards. Client `i` sends to
/// `addrs[i % addrs.len()]`.
async fn timed_loop(
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

/// The value of the first series of `name` whose labels hold every one of
/// `labels` (`key="value"` strings); NaN when there is none.
fn metric(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.strip_prefix(name))
        .filter(|rest| rest.starts_with(['{', ' ']))
        .filter_map(|rest| rest.rsplit_once(' '))
        .find(|(series, _)| labels.iter().all(|want| series.contains(want)))
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(f64::NAN)
}

/// 3 pd-sim processes, the proxy in front of the 3 prefillers and of the
/// decoders of the first 2; the third process (only its prefiller is in
/// use) is SIGKILLed after `before`, and the load goes on for `after`.
async fn scenario_f(
    report: &mut Report,
    before: Duration,
    after: Duration,
    clients: usize,
) -> Vec<String> {
    let tel = free_port();
    let mut sims = Vec::new();
    for _ in 0..3 {
        let (pp, dp) = (free_port(), free_port());
        let args = sim_args(pp, dp, tel, &["--prefill-delay-ms", &F_PREFILL.to_string()]);
        sims.push((
            Proc::spawn_on(sim_cpus().as_deref(), pd_sim::binary(), &args),
            pp,
            dp,
        ));
    }
    let ports =
        |ps: &mut dyn Iterator<Item = u16>| ps.map(|p| p.to_string()).collect::<Vec<_>>().join(",");
    let prefill_ports = ports(&mut sims.iter().map(|s| s.1));
    let decode_ports = ports(&mut sims.iter().take(2).map(|s| s.2));
    let api = free_port();
    let args = proxy_args(
        api,
        tel,
        &prefill_ports,
        &decode_ports,
        &["--health-interval", F_HEALTH_INTERVAL],
    );
    let _proxy = Proc::spawn_on(proxy_cpus(None).as_deref(), PROXY, &args);
    let proxy: SocketAddr = ([127, 0, 0, 1], api).into();
    for (_, pp, dp) in &sims {
        wait_ready(([127, 0, 0, 1], *pp).into()).await;
        wait_ready(([127, 0, 0, 1], *dp).into()).await;
    }
    wait_ready(proxy).await;
    // Every endpoint through its first health check before the load.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = get_text(proxy, "/metrics").await.unwrap_or_default();
        let healthy: f64 = text
            .lines()
            .filter_map(|l| l.strip_prefix("pd_proxy_endpoint_healthy{"))
            .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
            .sum();
        if healthy >= 5.0 {
            break;
        }
        assert!(Instant::now() < deadline, "the fleet never became healthy");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    closed_loop(proxy, 8, Duration::from_millis(300), CHAT_16).await;

    let victim = format!("endpoint=\"127.0.0.1:{}\"", sims[2].1);
    let victim_labels = ["role=\"prefiller\"", victim.as_str()];
    let requests_to_victim =
        |text: &str| metric(text, "pd_proxy_endpoint_requests_total", &victim_labels);
    let origin = Instant::now();
    let load = tokio::spawn(timed_loop(
        vec![proxy],
        clients,
        before + after,
        CHAT_16,
        origin,
    ));
    tokio::time::sleep_until((origin + before).into()).await;
    let at_kill = get_text(proxy, "/metrics").await.unwrap_or_default();
    let (victim_proc, _, _) = &mut sims[2];
    victim_proc.0.kill().expect("SIGKILL pd-sim");
    let killed = origin.elapsed();
    let _ = victim_proc.0.wait();
    tokio::time::sleep_until((origin + killed + Duration::from_secs(1)).into()).await;
    let at_1s = get_text(proxy, "/metrics").await.unwrap_or_default();
    let samples = load.await.unwrap();
    let at_end = get_text(proxy, "/metrics").await.unwrap_or_default();

    report.line(format!(
        "### F: fleet, 3 prefillers ({F_PREFILL} ms prefill) + 2 decoders, one prefiller SIGKILLed under load; {clients} clients, 16-token chat streams, pd-proxy `--health-interval {F_HEALTH_INTERVAL}`, other flags default (least-loaded, `--prefill-retries 2`)"
    ));
    report.line("");
    report.line("| window (by answer end) | s | req/s | answers | errors | TTFB p50 ms | TTFB p99 ms | e2e p50 ms | e2e p99 ms | requests sent to the killed prefiller |");
    report.line("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let one_s = killed + Duration::from_secs(1);
    let last = samples
        .iter()
        .map(|s| s.end)
        .max()
        .unwrap_or(one_s)
        .max(one_s);
    let sent = [
        requests_to_victim(&at_kill),
        requests_to_victim(&at_1s) - requests_to_victim(&at_kill),
        requests_to_victim(&at_end) - requests_to_victim(&at_1s),
    ];
    let windows = [
        ("before the kill", Duration::ZERO, killed),
        ("first second after it", killed, one_s),
        ("rest after it", one_s, last + Duration::from_nanos(1)),
    ];
    let mut errors = [0u64; 3];
    for (i, (name, from, to)) in windows.into_iter().enumerate() {
        let window = samples.iter().filter(|s| s.end >= from && s.end < to);
        let mut stats = Stats::of(window);
        errors[i] = stats.errors;
        let (ok, answers) = (stats.ok, stats.ok + stats.errors);
        let secs = (to - from).as_secs_f64();
        report.line(format!(
            "| {name} | {secs:.2} | {:.0} | {} | {} | {} | {:.0} |",
            ok as f64 / secs,
            answers,
            errors[i],
            latency_cells(&mut stats),
            sent[i],
        ));
    }
    report.line("");
    let retries = metric(&at_end, "pd_proxy_retries_total", &["leg=\"prefill\""]);
    let ejections = metric(&at_end, "pd_proxy_endpoint_ejections_total", &victim_labels);
    let victim_requests = requests_to_victim(&at_end);
    let kv_timeouts = metric(&at_end, "pd_proxy_kv_ready_timeouts_total", &[]);
    let prefill_errors = metric(
        &at_end,
        "pd_proxy_upstream_errors_total",
        &["leg=\"prefill\""],
    );
    report.line(format!(
        "Killed at {:.2} s. From pd-proxy's /metrics after the run: `pd_proxy_retries_total{{leg=\"prefill\"}}` {retries}, `pd_proxy_upstream_errors_total{{leg=\"prefill\"}}` {prefill_errors}, `pd_proxy_kv_ready_timeouts_total` {kv_timeouts}; killed prefiller (127.0.0.1:{}): `pd_proxy_endpoint_ejections_total` {ejections}, `pd_proxy_endpoint_requests_total` {victim_requests}. Requests sent to the killed prefiller: its `pd_proxy_endpoint_requests_total` (counted when sent) scraped just before the kill, at kill + 1 s and at the end, so a request sent between the first scrape and the kill lands in the second window. Errors: answers that were not a 200 ending in `data: [DONE]`, or failed connections. Latency percentiles leave out each client's first request.",
        killed.as_secs_f64(),
        sims[2].1,
    ));
    report.line("");
    vec![
        verdict(
            errors[2] == 0,
            format!("F errors after the ejection second {} (want 0)", errors[2]),
        ),
        verdict(
            ejections >= 1.0,
            format!("F killed prefiller ejected ({ejections} ejections)"),
        ),
    ]
}

/// `path` of an executable named `bin` on PATH.
fn on_path(bin: &str) -> Option<std::path::PathBuf> {
    let paths = std::env::var_os("PATH")?;
    std::env::split_paths(&paths)
        .map(|dir| dir.join(bin))
        .find(|p| p.is_file())
}

/// One wrk run's outcome.
struct WrkRun {
    rps: f64,
    requests: u64,
    /// "Non-2xx or 3xx responses" (wrk prints the line only when some).
    non_2xx: u64,
    /// connect + read + write + timeout.
    socket_errors: u64,
}

/// `wrk -t2 -c64 -d{secs}s -s {script} {url}`.
fn wrk(url: &str, secs: u64, script: &std::path::Path) -> Result<WrkRun, String> {
    let out = Command::new("wrk")
        .args(["-t2", "-c64", &format!("-d{secs}s"), "-s"])
        .arg(script)
        .arg(url)
        .output()
        .map_err(|e| format!("running wrk: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(format!("wrk failed: {text}"));
    }
    let number = |prefix: &str| {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(prefix))
            .and_then(|v| v.trim().parse::<f64>().ok())
    };
    let rps = number("Requests/sec:").ok_or_else(|| format!("no req/s in wrk's output: {text}"))?;
    let requests = text
        .lines()
        .find_map(|l| l.trim().split_once(" requests in "))
        .and_then(|(n, _)| n.parse().ok())
        .unwrap_or(0);
    let socket_errors = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Socket errors:"))
        .map_or(0, |l| {
            l.split(',')
                .filter_map(|f| f.split_whitespace().last()?.parse::<u64>().ok())
                .sum()
        });
    Ok(WrkRun {
        rps,
        requests,
        non_2xx: number("Non-2xx or 3xx responses:").map_or(0, |n| n as u64),
        socket_errors,
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// The 64-client share measured with wrk, a load generator apart from
/// this process: pd-sim's decoder directly, then pd-proxy (defaults:
/// least-loaded, health checks on) in front of its own pd-sim, and, when
/// `PD_PROXY_BASELINE` names another pd-proxy binary, that one in front of
/// a third pd-sim; in turn, `runs` times.
async fn scenario_w(report: &mut Report, secs: u64, runs: usize) -> Vec<String> {
    report.line("### W: 64 connections measured with wrk (a separate load generator), 16-token chat streams");
    report.line("");
    if on_path("wrk").is_none() {
        let why = "skipped: `wrk` is not on PATH (e.g. `apt-get install wrk`)";
        report.line(why);
        report.line("");
        eprintln!("W {why}");
        return Vec::new();
    }
    let script = std::env::temp_dir().join(format!("pd-proxy-load-{}.lua", std::process::id()));
    let body = std::str::from_utf8(CHAT_16).unwrap();
    std::fs::write(
        &script,
        format!(
            "wrk.method = \"POST\"\nwrk.headers[\"Content-Type\"] = \"application/json\"\nwrk.body = [[{body}]]\n"
        ),
    )
    .expect("writing the wrk script");
    let stack = Stack::start(&[], &[]).await;
    let baseline_bin = std::env::var("PD_PROXY_BASELINE")
        .ok()
        .filter(|p| !p.is_empty());
    let baseline = match &baseline_bin {
        Some(bin) => Some(Stack::start_with(bin, &[], &[], proxy_cpus(None)).await),
        None => None,
    };
    // Warm the proxies' upstream pools.
    closed_loop(stack.proxy_addr, 8, Duration::from_millis(300), CHAT_16).await;
    if let Some(b) = &baseline {
        closed_loop(b.proxy_addr, 8, Duration::from_millis(300), CHAT_16).await;
    }
    let mut targets: Vec<(&str, SocketAddr, Option<&Proc>, &Proc)> = vec![
        ("direct", stack.decoder_addr, None, &stack.sim),
        ("pd-proxy", stack.proxy_addr, Some(&stack.proxy), &stack.sim),
    ];
    if let Some(b) = &baseline {
        targets.push(("baseline", b.proxy_addr, Some(&b.proxy), &b.sim));
    }
    report.line(format!(
        "Each run: `wrk -t2 -c64 -d{secs}s -s post.lua http://ADDR/v1/chat/completions`, post.lua POSTing the 16-token streaming chat body; targets in turn, rounds: {runs}. pd-proxy with its defaults (`--balance least-loaded`, health checks every 2 s){}. Share = proxy req/s ÷ direct req/s of the same round.",
        match &baseline_bin {
            Some(b) => format!("; baseline = `PD_PROXY_BASELINE={b}`"),
            None => String::new(),
        }
    ));
    report.line("");
    report.line("| round | target | req/s | share | non-2xx | socket errors | proxy CPU µs/req | pd-sim CPU µs/req |");
    report.line("|---:|---|---:|---:|---:|---:|---:|---:|");
    let mut rps: Vec<Vec<f64>> = vec![Vec::new(); targets.len()];
    let mut bad = 0;
    for round in 1..=runs {
        let mut direct = f64::NAN;
        for (i, (name, addr, proc, sim)) in targets.iter().enumerate() {
            let url = format!("http://{addr}/v1/chat/completions");
            let cpu0 = proc.map(|p| p.cpu());
            let sim0 = sim.cpu();
            let script = script.clone();
            let run = tokio::task::spawn_blocking(move || wrk(&url, secs, &script))
                .await
                .unwrap();
            let run = match run {
                Ok(run) => run,
                Err(e) => {
                    report.line(format!("| {round} | {name} | {e} | | | | | |"));
                    bad += 1;
                    continue;
                }
            };
            bad += run.non_2xx + run.socket_errors;
            let cpu = match (proc, cpu0) {
                (Some(p), Some(c0)) => format!(
                    "{:.0}",
                    (p.cpu() - c0).as_secs_f64() * 1e6 / run.requests.max(1) as f64
                ),
                _ => String::new(),
            };
            let sim_us = (sim.cpu() - sim0).as_secs_f64() * 1e6 / run.requests.max(1) as f64;
            if i == 0 {
                direct = run.rps;
            }
            report.line(format!(
                "| {round} | {name} | {:.0} | {} | {} | {} | {cpu} | {sim_us:.0} |",
                run.rps,
                if i == 0 {
                    String::new()
                } else {
                    format!("{:.3}", run.rps / direct)
                },
                run.non_2xx,
                run.socket_errors,
            ));
            rps[i].push(run.rps);
        }
    }
    let _ = std::fs::remove_file(&script);
    report.line("");
    let medians: Vec<f64> = rps.into_iter().map(median).collect();
    let mut summary = format!("Medians: direct {:.0} req/s", medians[0]);
    for (i, (name, ..)) in targets.iter().enumerate().skip(1) {
        let _ = write!(
            summary,
            "; {name} {:.0} req/s, share {:.3}",
            medians[i],
            medians[i] / medians[0]
        );
    }
    report.line(format!("{summary}."));
    report.line("");
    let share = medians[1] / medians[0];
    vec![
        verdict(
            share >= 0.40,
            format!("W share at c64 measured with wrk {share:.3} ≥ 0.40 (median of {runs})"),
        ),
        verdict(
            bad == 0,
            format!("W wrk non-2xx + socket errors + failed runs {bad} (want 0)"),
        ),
    ]
}

/// HAProxy in front of the replicas' telemetry ports: HTTP mode, round
/// robin per event, every event on a fresh connection to its replica (as
/// LMCache opens one per event and an L4 Service passes it on), and one
/// log line per event: the telemetry port it went to, then the event's
/// body, so that each request can be told forwarded or direct afterwards.
struct Haproxy {
    proc: Proc,
    dir: PathBuf,
    servers: usize,
}

impl Haproxy {
    /// Listens on 127.0.0.1:`port`, servers `r0`, `r1`, ... at
    /// `telemetry_ports`.
    async fn start(port: u16, telemetry_ports: &[u16]) -> Result<Haproxy, String> {
        let dir = std::env::temp_dir().join(format!("pd-proxy-load-r-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let servers: String = telemetry_ports
            .iter()
            .enumerate()
            .map(|(i, p)| format!("    server r{i} 127.0.0.1:{p}\n"))
            .collect();
        let config = [
            "global",
            "    maxconn 8192",
            "    log stdout format raw local0",
            &format!(
                "    stats socket {} mode 600 level admin",
                dir.join("admin.sock").display()
            ),
            "defaults",
            "    mode http",
            "    log global",
            "    option dontlognull",
            "    option http-server-close",
            "    option http-buffer-request",
            "    timeout connect 2s",
            "    timeout client 30s",
            "    timeout server 30s",
            "frontend telemetry",
            &format!("    bind 127.0.0.1:{port}"),
            "    http-request set-var(txn.body) req.body",
            "    log-format \"%sp %[var(txn.body)]\"",
            "    default_backend replicas",
            "backend replicas",
            "    balance roundrobin",
            &servers,
        ]
        .join("\n");
        let cfg = dir.join("haproxy.cfg");
        let file = |name: &str| {
            std::fs::File::create(dir.join(name)).map_err(|e| format!("creating {name}: {e}"))
        };
        std::fs::write(&cfg, config).map_err(|e| format!("writing haproxy.cfg: {e}"))?;
        let proc = Proc::start(
            command_on(proxy_cpus(None).as_deref(), HAPROXY)
                .arg("-db")
                .arg("-f")
                .arg(&cfg)
                .stdout(file("events.log")?)
                .stderr(file("stderr.log")?),
        );
        let mut haproxy = Haproxy {
            proc,
            dir,
            servers: telemetry_ports.len(),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while haproxy.admin("show info").is_err() {
            if let Ok(Some(status)) = haproxy.proc.0.try_wait() {
                let stderr = std::fs::read_to_string(haproxy.dir.join("stderr.log"));
                return Err(format!(
                    "haproxy exited ({status}): {}",
                    stderr.unwrap_or_default()
                ));
            }
            if Instant::now() > deadline {
                return Err("its admin socket never answered".into());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(haproxy)
    }

    /// One command on the admin socket; its reply.
    fn admin(&self, command: &str) -> std::io::Result<String> {
        let mut unix = std::os::unix::net::UnixStream::connect(self.dir.join("admin.sock"))?;
        unix.set_read_timeout(Some(Duration::from_secs(5)))?;
        writeln!(unix, "{command}")?;
        let mut reply = String::new();
        unix.read_to_string(&mut reply).map(|_| reply)
    }

    /// `true`: `r0` is the only server (the others in maintenance);
    /// `false`: all of them.
    fn only_first(&self, only: bool) {
        let state = if only { "maint" } else { "ready" };
        for r in 1..self.servers {
            let command = format!("set server replicas/r{r} state {state}");
            match self.admin(&command) {
                Ok(reply) if reply.trim().is_empty() => {}
                other => panic!("HAProxy `{command}`: {other:?}"),
            }
        }
    }

    /// Its log so far: one line per event, `PORT BODY`.
    fn events(&self) -> String {
        std::fs::read_to_string(self.dir.join("events.log")).unwrap_or_default()
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A Prometheus histogram from /metrics: cumulative counts by upper
/// bound, sum and count.
#[derive(Clone, Default)]
struct Hist {
    buckets: Vec<(f64, f64)>,
    sum: f64,
    count: f64,
}

impl Hist {
    fn scrape(text: &str, name: &str) -> Hist {
        let prefix = format!("{name}_bucket{{le=\"");
        let buckets = text
            .lines()
            .filter_map(|l| {
                let (le, n) = l.strip_prefix(&prefix)?.split_once("\"} ")?;
                Some((le.parse().ok()?, n.trim().parse().ok()?))
            })
            .collect();
        Hist {
            buckets,
            sum: metric(text, &format!("{name}_sum"), &[]),
            count: metric(text, &format!("{name}_count"), &[]),
        }
    }

    /// `self + sign × other`, bucket by bucket.
    fn plus(&self, other: &Hist, sign: f64) -> Hist {
        let buckets = if self.buckets.is_empty() {
            other
                .buckets
                .iter()
                .map(|&(le, n)| (le, sign * n))
                .collect()
        } else {
            let pairs = self.buckets.iter().zip(&other.buckets);
            pairs
                .map(|(&(le, a), &(_, b))| (le, a + sign * b))
                .collect()
        };
        Hist {
            buckets,
            sum: self.sum + sign * other.sum,
            count: self.count + sign * other.count,
        }
    }

    fn mean_ms(&self) -> f64 {
        1e3 * self.sum / self.count
    }

    /// Quantile `q` in ms, interpolated linearly inside the bucket that
    /// holds it (the lowest from 0), as Prometheus's `histogram_quantile`.
    fn quantile_ms(&self, q: f64) -> f64 {
        let rank = q * self.buckets.last().map_or(0.0, |b| b.1);
        let (mut lower, mut below) = (0.0, 0.0);
        for &(le, n) in &self.buckets {
            if n >= rank && n > 0.0 {
                if le.is_infinite() {
                    return lower * 1e3;
                }
                return 1e3 * (lower + (le - lower) * (rank - below) / (n - below));
            }
            (lower, below) = (le, n);
        }
        f64::NAN
    }
}

/// Scenario R's counters, each summed over the replicas: (name, label).
const R_COUNTERS: [(&str, &str); 8] = [
    (
        "pd_proxy_telemetry_events_total",
        "event=\"request_store_finished\"",
    ),
    (FORWARDED_IDS, "outcome=\"delivered\""),
    (FORWARDED_IDS, "outcome=\"unknown_at_owner\""),
    (FORWARDED_IDS, "outcome=\"unreachable\""),
    (FORWARDED_IDS, "outcome=\"queue_full\""),
    (FORWARDED_IDS, "outcome=\"misrouted\""),
    ("pd_proxy_telemetry_invalid_ids_total", ""),
    ("pd_proxy_kv_ready_timeouts_total", ""),
];
const FORWARDED_IDS: &str = "pd_proxy_telemetry_forwarded_ids_total";

/// The replicas' /metrics, summed.
#[derive(Clone, Default)]
struct FleetScrape {
    /// As [`R_COUNTERS`].
    counters: [f64; R_COUNTERS.len()],
    kv_wait: Hist,
    forward: Hist,
}

impl FleetScrape {
    async fn take(apis: &[SocketAddr]) -> FleetScrape {
        let mut all = FleetScrape::default();
        for &api in apis {
            let text = get_text(api, "/metrics").await.unwrap_or_default();
            let one = FleetScrape {
                counters: R_COUNTERS.map(|(name, label)| metric(&text, name, &[label])),
                kv_wait: Hist::scrape(&text, "pd_proxy_kv_ready_wait_seconds"),
                forward: Hist::scrape(&text, "pd_proxy_telemetry_forward_seconds"),
            };
            all = all.plus(&one, 1.0);
        }
        all
    }

    /// `self + sign × other`.
    fn plus(&self, other: &FleetScrape, sign: f64) -> FleetScrape {
        FleetScrape {
            counters: std::array::from_fn(|i| self.counters[i] + sign * other.counters[i]),
            kv_wait: self.kv_wait.plus(&other.kv_wait, sign),
            forward: self.forward.plus(&other.forward, sign),
        }
    }

    fn delivered(&self) -> f64 {
        self.counters[1]
    }

    /// Events from HAProxy: all received, less the forwards their owner
    /// answered (it counts each as an event too).
    fn events_in(&self) -> f64 {
        self.counters[0] - self.counters[1] - self.counters[2]
    }

    /// Forwarded ids not delivered, invalid ids, KV-ready timeouts.
    fn lost(&self) -> [f64; 3] {
        let c = &self.counters;
        [c[2] + c[3] + c[4] + c[5], c[6], c[7]]
    }
}

/// From HAProxy's log (see [`Haproxy`]): for each owner-routed id, whether
/// its event went to a replica other than its owner, whose telemetry port
/// the id carries (hex digits 32..36, after the 16-byte address).
fn forwarded_by_id(log: &str) -> HashMap<String, bool> {
    log.lines()
        .filter_map(|line| {
            let (port, body) = line.split_once(' ')?;
            let at = body.find("chatcmpl-")? + "chatcmpl-".len();
            let id = body.get(at..at + pd_proxy::owner::ROUTED_LEN)?;
            let owner = u16::from_str_radix(id.get(32..36)?, 16).ok()?;
            Some((id.to_owned(), port.parse::<u16>().ok()? != owner))
        })
        .collect()
}

/// Time to first byte of a run's measured requests (answered, not a
/// client's first), by their event's path: (direct, forwarded, how many
/// HAProxy's log does not name).
fn ttfb_by_path(
    samples: &[Sample],
    forwarded: &HashMap<String, bool>,
) -> (Vec<Duration>, Vec<Duration>, usize) {
    let (mut direct, mut via, mut unknown) = (Vec::new(), Vec::new(), 0);
    for s in samples.iter().filter(|s| s.ok && !s.first) {
        let id = s.id.as_ref().and_then(|id| id.to_str().ok());
        match id.and_then(|id| forwarded.get(id)) {
            Some(true) => via.push(s.ttfb),
            Some(false) => direct.push(s.ttfb),
            None => unknown += 1,
        }
    }
    (direct, via, unknown)
}

/// `v` to `decimals`, or a dash for nothing measured.
fn num(v: f64, decimals: usize) -> String {
    if v.is_nan() {
        "–".into()
    } else {
        format!("{v:.decimals$}")
    }
}

/// Debian's HAProxy, for scenario R.
const HAPROXY: &str = "/usr/sbin/haproxy";
/// Scenario R's pd-proxy replicas, and their cluster key (in their
/// environment, never on argv).
const R_REPLICAS: usize = 3;
const R_KEY: &str = "pd-proxy load bench cluster key!";

/// One configuration's run in scenario R.
struct RRun {
    round: usize,
    /// 0: one replica, 1: three.
    config: usize,
    samples: Vec<Sample>,
    elapsed: Duration,
    /// CPU over the run: the replicas together, pd-sim, HAProxy.
    cpu: [Duration; 3],
    /// The replicas' counters over the run.
    fleet: FleetScrape,
}

/// Three replicas sharing a cluster key behind HAProxy against one, over
/// one pd-sim, `clients` closed-loop clients; the configurations in turn,
/// `rounds` times, `duration` each.
async fn scenario_r(
    report: &mut Report,
    duration: Duration,
    rounds: usize,
    clients: usize,
) -> Vec<String> {
    report.line(format!(
        "### R: {R_REPLICAS} pd-proxy replicas behind HAProxy against one, {clients} clients, 16-token chat streams"
    ));
    report.line("");
    if !Path::new(HAPROXY).exists() {
        let why = "R skipped: haproxy not installed (`/usr/sbin/haproxy` is absent; `apt-get install haproxy`)";
        report.line(why);
        report.line("");
        eprintln!("{why}");
        return Vec::new();
    }
    let (pp, dp, lb) = (free_port(), free_port(), free_port());
    let sim = Proc::spawn_on(
        sim_cpus().as_deref(),
        pd_sim::binary(),
        &sim_args(pp, dp, lb, &[]),
    );
    let (pp_s, dp_s) = (pp.to_string(), dp.to_string());
    let (mut replicas, mut apis, mut telemetry) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..R_REPLICAS {
        let (api, tel) = (free_port(), free_port());
        replicas.push(Proc::start(
            command_on(proxy_cpus(None).as_deref(), PROXY)
                .args(proxy_args(api, tel, &pp_s, &dp_s, &[]))
                .env("PD_PROXY_CLUSTER_KEY", R_KEY)
                .stdout(Stdio::null()),
        ));
        apis.push(SocketAddr::from(([127, 0, 0, 1], api)));
        telemetry.push(tel);
    }
    for port in [pp, dp] {
        wait_ready(([127, 0, 0, 1], port).into()).await;
    }
    for &api in &apis {
        wait_ready(api).await;
    }
    let haproxy = match Haproxy::start(lb, &telemetry).await {
        Ok(h) => h,
        Err(e) => {
            let why = format!("R HAProxy did not start: {e}");
            report.line(&why);
            report.line("");
            return vec![verdict(false, why)];
        }
    };
    // (1): replica 0 is HAProxy's only server and takes every client;
    // (2): all three servers, client i to replica i mod 3.
    let configs: [(&str, bool, &[SocketAddr]); 2] = [
        ("(1) one replica", true, &apis[..1]),
        ("(2) three replicas", false, &apis[..]),
    ];
    for &(_, only_first, addrs) in configs.iter().rev() {
        haproxy.only_first(only_first);
        let warm = Duration::from_millis(500);
        timed_loop(addrs.to_vec(), 8, warm, CHAT_16, Instant::now()).await;
    }
    let cpu = || {
        let fleet: Duration = replicas.iter().map(Proc::cpu).sum();
        [fleet, sim.cpu(), haproxy.proc.cpu()]
    };
    let mut runs = Vec::new();
    for round in 1..=rounds {
        for (config, &(_, only_first, addrs)) in configs.iter().enumerate() {
            haproxy.only_first(only_first);
            let before = FleetScrape::take(&apis).await;
            let cpu0 = cpu();
            let started = Instant::now();
            let samples = timed_loop(addrs.to_vec(), clients, duration, CHAT_16, started).await;
            let elapsed = started.elapsed();
            let cpu1 = cpu();
            // A forward is counted once its owner's reply is back, just
            // after the request it released.
            tokio::time::sleep(Duration::from_millis(100)).await;
            let after = FleetScrape::take(&apis).await;
            runs.push(RRun {
                round,
                config,
                samples,
                elapsed,
                cpu: std::array::from_fn(|i| cpu1[i] - cpu0[i]),
                fleet: after.plus(&before, -1.0),
            });
        }
    }
    let forwarded = forwarded_by_id(&haproxy.events());
    let info = haproxy.admin("show info").unwrap_or_default();
    let dropped_logs = info
        .lines()
        .find_map(|l| l.strip_prefix("DroppedLogs: "))
        .unwrap_or("?")
        .to_owned();

    report.line(format!(
        "One pd-sim (a prefiller and a decoder, no delays) posts each event on a fresh connection to HAProxy ({HAPROXY}, `mode http`, `balance roundrobin`, `option http-server-close`: a fresh connection to the replica per event too; it logs each event's body and the port it went to). {R_REPLICAS} pd-proxy processes share `PD_PROXY_CLUSTER_KEY` (owner-routed ids), other flags default, `RUST_LOG=warn`, all running throughout. (1): HAProxy's servers other than replica 0 set to `maint` on its admin socket, so replica 0 is its only backend, and all clients go to replica 0 (the idle replicas' CPU is in the sum); (2): all {R_REPLICAS} servers, client i to replica i mod {R_REPLICAS}. Closed loop, {clients} clients, {:.1} s per run, order (1), (2), {rounds} round(s), after 0.5 s of warm-up of each. CPU: utime + stime from /proc over the run ÷ requests answered; proxy = the replicas summed.",
        duration.as_secs_f64()
    ));
    report.line("");
    report.line("| round | configuration | req/s | errors | TTFB p50 ms | TTFB p99 ms | e2e p50 ms | e2e p99 ms | proxy CPU µs/req (replicas summed) | pd-sim CPU µs/req | HAProxy CPU µs/req |");
    report.line("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let mut errors = 0;
    for run in &runs {
        let mut stats = Stats::of(run.samples.iter());
        stats.elapsed = run.elapsed;
        errors += stats.errors;
        let cpu = run
            .cpu
            .map(|d| d.as_secs_f64() * 1e6 / stats.ok.max(1) as f64);
        let latency = latency_cells(&mut stats);
        report.line(format!(
            "| {} | {} | {:.0} | {} | {latency} | {:.0} | {:.0} | {:.0} |",
            run.round,
            configs[run.config].0,
            stats.rps(),
            stats.errors,
            cpu[0],
            cpu[1],
            cpu[2],
        ));
    }
    report.line("");

    report.line("From the replicas' /metrics, summed over the three, difference across each run. Events from HAProxy = Σ `pd_proxy_telemetry_events_total` − the forwards their owner answered (an owner counts a forwarded event as an event too). Forwarded = `pd_proxy_telemetry_forwarded_ids_total{outcome=\"delivered\"}` (one id per event here). Lost = forwarded ids not delivered (`unknown_at_owner` + `unreachable` + `queue_full` + `misrouted`) / `pd_proxy_telemetry_invalid_ids_total` / `pd_proxy_kv_ready_timeouts_total`. KV wait = `pd_proxy_kv_ready_wait_seconds` (prefill response → the event, at the owner); forward = `pd_proxy_telemetry_forward_seconds` (a forwarded event's arrival at the replica HAProxy chose → its owner's reply back there). Means are sum ÷ count, exact; the p50/p99 marked ≈ are interpolated inside the histogram bucket that holds them, as Prometheus's `histogram_quantile` does, and the buckets are 0–1, 1–2.5, 2.5–5 ms…: too coarse for a 0.3 ms question, which the next table answers.");
    report.line("");
    report.line("| round | configuration | events from HAProxy | forwarded | share forwarded | lost | KV wait mean ms | KV wait p50 ms ≈ | KV wait p99 ms ≈ | forward mean ms | forward p50 ms ≈ | forward p99 ms ≈ |");
    report.line("|---:|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|");
    let mut pooled = [FleetScrape::default(), FleetScrape::default()];
    for run in &runs {
        let f = &run.fleet;
        pooled[run.config] = pooled[run.config].plus(f, 1.0);
        let lost = f.lost();
        report.line(format!(
            "| {} | {} | {:.0} | {:.0} | {:.3} | {:.0} / {:.0} / {:.0} | {} | {} | {} | {} | {} | {} |",
            run.round,
            configs[run.config].0,
            f.events_in(),
            f.delivered(),
            f.delivered() / f.events_in(),
            lost[0],
            lost[1],
            lost[2],
            num(f.kv_wait.mean_ms(), 3),
            num(f.kv_wait.quantile_ms(0.5), 2),
            num(f.kv_wait.quantile_ms(0.99), 2),
            num(f.forward.mean_ms(), 3),
            num(f.forward.quantile_ms(0.5), 2),
            num(f.forward.quantile_ms(0.99), 2),
        ));
    }
    report.line("");
    let [one, three] = &pooled;
    let share = three.delivered() / three.events_in();
    report.line(format!(
        "All rounds: KV wait mean (2) − (1) = {:.3} − {:.3} = {:.3} ms; (2)'s share forwarded × forward mean = {share:.3} × {:.3} = {:.3} ms.",
        three.kv_wait.mean_ms(),
        one.kv_wait.mean_ms(),
        three.kv_wait.mean_ms() - one.kv_wait.mean_ms(),
        three.forward.mean_ms(),
        share * three.forward.mean_ms(),
    ));
    report.line("");

    report.line(format!("Per request, from the client's side: HAProxy's log names the replica each event went to, the id names its owner, and the client saw the id (`x-request-id`) and its time to first byte. In (2) HAProxy's round robin, not the request, decides whether an event is forwarded, so both groups share the run, the load, the replicas and the machine; TTFB = prefill + KV wait + the decoder's first byte, and the groups differ only in the event's path. Added = TTFB of the forwarded group − TTFB of the direct group, at p50 and at p99. Requests = answered ones less each client's first; not in HAProxy's log = events whose log line HAProxy dropped (it drops one when two of its threads log at once; its `DroppedLogs` after the scenario: {dropped_logs})."));
    report.line("");
    report.line("| round | configuration | direct requests | direct TTFB p50 ms | direct TTFB p99 ms | forwarded requests | forwarded TTFB p50 ms | forwarded TTFB p99 ms | added p50 ms | added p99 ms | not in HAProxy's log |");
    report.line("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let mut all = (Vec::new(), Vec::new(), 0);
    let mut row = |round: String,
                   config: usize,
                   direct: &mut Vec<Duration>,
                   via: &mut Vec<Duration>,
                   unknown: usize| {
        let (d50, d99) = (pct(direct, 0.5), pct(direct, 0.99));
        let (v50, v99) = (pct(via, 0.5), pct(via, 0.99));
        report.line(format!(
            "| {round} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {unknown} |",
            configs[config].0,
            direct.len(),
            num(d50, 2),
            num(d99, 2),
            via.len(),
            num(v50, 2),
            num(v99, 2),
            num(v50 - d50, 3),
            num(v99 - d99, 3),
        ));
        v50 - d50
    };
    for run in &runs {
        let (mut direct, mut via, unknown) = ttfb_by_path(&run.samples, &forwarded);
        row(
            run.round.to_string(),
            run.config,
            &mut direct,
            &mut via,
            unknown,
        );
        if run.config == 1 {
            all.0.extend(direct);
            all.1.extend(via);
            all.2 += unknown;
        }
    }
    let added = row("all".into(), 1, &mut all.0, &mut all.1, all.2);
    report.line("");
    let lost: f64 = runs
        .iter()
        .map(|r| r.fleet.lost().iter().sum::<f64>())
        .sum();
    vec![
        verdict(
            added <= 0.3,
            format!(
                "R a forwarded event adds {added:.3} ms ≤ 0.3 ms at p50 to the KV wait of a direct one: TTFB p50 of (2)'s requests whose event HAProxy handed to another replica ({}) − of those whose event reached their own ({}), all rounds",
                all.1.len(),
                all.0.len()
            ),
        ),
        verdict(
            errors == 0 && lost == 0.0,
            format!("R errors {errors}, forwards lost + invalid ids + KV timeouts {lost} (want 0)"),
        ),
        verdict(
            (0.5..=0.8).contains(&share),
            format!("R share of (2)'s events forwarded {share:.3}, about 2/3 with round robin over 3"),
        ),
    ]
}

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

/// `parked` requests parked at once (pd-sim holds telemetry back), then
/// released.
async fn memory(report: &mut Report, parked: usize, proto: Proto) -> Vec<String> {
    let hold_ms = 20_000u64;
    let stack = Stack::start(
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
    )
    .await;
    // Idle = after start-up and a scrape, as a running proxy sits.
    let _ = get_text(stack.proxy_addr, "/metrics").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let idle = stack.proxy.status_kib("VmRSS") as f64 / 1024.0;

    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(parked);
    // Paced so the proxy's prefill connections stay few: parking is what is
    // measured, not a connection storm.
    let mut tick = tokio::time::interval(Duration::from_micros(250));
    let addr = stack.proxy_addr;
    let mut h2: Option<http2::SendRequest<Full<Bytes>>> = None;
    for i in 0..parked {
        tick.tick().await;
        let (done, failed) = (done.clone(), failed.clone());
        let ok = match proto {
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
        };
        tasks.push(tokio::spawn(async move {
            if ok.await.unwrap_or(false) {
                done.fetch_add(1, Ordering::Relaxed)
            } else {
                failed.fetch_add(1, Ordering::Relaxed)
            };
        }));
    }
    drop(h2);
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
    for t in tasks {
        let _ = t.await;
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
    report.line(format!("| {label} | {idle:.1} | {at_peak:.1} | {after:.1} | {parked_seen:.0} | {} | {} | {pending_after:.0} | {:.1} |",
        done.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed),
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
            failed.load(Ordering::Relaxed) == 0 && pending_after == 0.0,
            format!(
                "{name}: parked requests all completed ({} failed), gauge back to {pending_after}",
                failed.load(Ordering::Relaxed)
            ),
        ),
    ]
}

fn memory_header(report: &mut Report, parked: usize) {
    report.line(format!(
        "### Memory: pd-proxy RSS, {parked} requests parked (pd-sim holds telemetry back)"
    ));
    report.line("");
    report.line("| clients | idle MiB | parked MiB | 5 s after release MiB | parked seen | completed | failed | pending after | s |");
    report.line("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
}

fn verdict(ok: bool, what: String) -> String {
    format!("- {} {what}", if ok { "PASS" } else { "MISS" })
}

/// `cores`: the machine's, read before anything was pinned.
fn machine(cores: usize) -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines().find_map(|l| {
                l.strip_prefix("model name")
                    .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
            })
        })
        .unwrap_or_else(|| "unknown".into());
    format!("{cores} cores ({cpu})")
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    // `--proxy-cores 1,4`: A's pd-proxy sizes where processes are pinned.
    let proxy_cores_arg = std::env::args().skip_while(|a| a != "--proxy-cores").nth(1);
    let proxy_cores: Option<Vec<usize>> = proxy_cores_arg.as_ref().map(|v| {
        v.split(',')
            .map(|n| n.trim().parse().ok().filter(|&n: &usize| n > 0))
            .collect::<Option<_>>()
            .unwrap_or_else(|| panic!("--proxy-cores wants core counts such as 1,4, not {v:?}"))
    });
    // Before pinning, which would make this the load generator's cores.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    // Before the runtime: its threads inherit this thread's CPUs.
    let pinned = pin(cores);
    let workers = pinned.as_ref().map_or(cores, |p| p.layout.load.len());
    let not_pinned = pinned.as_ref().err().cloned();
    PINNING.get_or_init(|| pinned.ok());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .unwrap();
    let sizes = a_sizes(pinning(), proxy_cores.as_deref());
    let date = Command::new("date")
        .arg("-u")
        .arg("+%Y-%m-%d %H:%M UTC")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    let mut report = Report {
        text: String::new(),
    };
    report.line("# pd-proxy benchmark results");
    report.line("");
    report.line(format!("- date: {date}"));
    report.line(format!("- machine: {}", machine(cores)));
    let baseline = std::env::var("PD_PROXY_BASELINE")
        .ok()
        .filter(|p| !p.is_empty())
        .map_or(String::new(), |p| format!("PD_PROXY_BASELINE={p} "));
    let mut flags = String::new();
    if quick {
        flags.push_str(" --quick");
    }
    if let Some(v) = &proxy_cores_arg {
        flags.push_str(&format!(" --proxy-cores {v}"));
    }
    // `--only a|b|fleet|wrk|replicas|memory` runs one part (and leaves RESULTS.md alone).
    let only = std::env::args().skip_while(|a| a != "--only").nth(1);
    if let Some(part) = &only {
        flags.push_str(&format!(" --only {part}"));
    }
    report.line(format!(
        "- command: `{baseline}cargo bench --bench load{}{flags}`",
        if flags.is_empty() { "" } else { " --" }
    ));
    match pinning() {
        Some(p) => {
            let a: Vec<String> = sizes
                .iter()
                .map(|&s| format!("{} ({})", p.proxy(s), size_label(s)))
                .collect();
            report.line(format!(
                "- pinned (`taskset -c`): pd-sim on CPUs {}; the load generator (this process, {workers} tokio workers) on {}; pd-proxy on {} in A, restarted for each size, and on {} elsewhere (HAProxy in R beside it; wrk in W on the load generator's). pd-sim and pd-proxy size their runtimes to the CPUs they are given",
                p.cpus(&p.layout.sim),
                p.cpus(&p.layout.load),
                a.join(" and "),
                p.cpus(&p.layout.rest),
            ));
        }
        None => report.line(format!(
            "- not pinned ({}): the load generator, pd-sim and pd-proxy share the machine's cores{}",
            not_pinned.unwrap_or_default(),
            if proxy_cores.is_some() {
                "; `--proxy-cores` ignored"
            } else {
                ""
            }
        )),
    }
    report.line("- closed loop, one keep-alive connection per client, every answer checked to end in `data: [DONE]`");
    report.line("- each client's first request (it connects, all clients at once) is checked and counted in req/s but left out of the latency percentiles");
    report.line("- pd-sim and pd-proxy run with `RUST_LOG=warn`; pd-proxy's default `info` adds one log line per request (~10 µs of CPU per request at 64 clients)");
    report.line("");
    let run = |part: &str| only.as_deref().is_none_or(|o| o == part);
    let checks = rt.block_on(async {
        let mut checks = Vec::new();
        let scale = if quick { 0.2 } else { 1.0 };
        let secs = |s: f64| Duration::from_secs_f64(s * scale);
        if run("a") {
            let concurrencies: &[usize] = if quick { &[1, 64] } else { &[1, 64, 256, 1024] };
            checks.extend(scenario_a(&mut report, secs(5.0), concurrencies, &sizes, cores).await);
        }
        if run("b") {
            // 256 clients show the proxy's overhead where the machine keeps
            // up; 1024 is the target load.
            let clients: &[usize] = if quick { &[256] } else { &[256, 1024] };
            for &c in clients {
                let c_checks = scenario_b(&mut report, secs(10.0), c).await;
                if c == 1024 || quick {
                    checks.extend(c_checks);
                }
            }
        }
        if run("fleet") {
            let clients = 64;
            checks.extend(
                scenario_f(
                    &mut report,
                    secs(4.0),
                    secs(8.0).max(Duration::from_secs(2)),
                    clients,
                )
                .await,
            );
        }
        if run("wrk") {
            // About 20 s in all: the share's spread between rounds is
            // larger than what longer runs would gain.
            let (secs, runs) = if quick { (1, 1) } else { (3, 3) };
            checks.extend(scenario_w(&mut report, secs, runs).await);
        }
        if run("replicas") {
            // About 20 s in all: 4 runs and the start-up.
            let rounds = if quick { 1 } else { 2 };
            checks.extend(scenario_r(&mut report, secs(4.0), rounds, 64).await);
        }
        if run("memory") {
            let parked = if quick { 2_000 } else { 10_000 };
            memory_header(&mut report, parked);
            checks.extend(memory(&mut report, parked, Proto::Http1).await);
            checks.extend(memory(&mut report, parked, Proto::Http2).await);
            report.line("");
        }
        checks
    });
    report.line("### Targets");
    report.line("");
    for c in &checks {
        report.line(c);
    }
    let mut out = report.text;
    let _ = writeln!(out);
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/RESULTS.md");
    if !quick && only.is_none() {
        let previous = std::fs::read_to_string(path).unwrap_or_default();
        if let Some(at) = previous.find(KEPT_MARKER) {
            out.push_str(&previous[at..]);
        }
        std::fs::write(path, out).expect("writing benches/RESULTS.md");
        println!("\nwrote {path}");
    }
}

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
//!
//! `PD_PROXY_BASELINE=/path/to/other/pd-proxy` measures that binary too, in
//! the same run and against the same pd-sim build, for a before/after
//! comparison: in A it takes pd-proxy's place at each size (the same
//! pd-sim process), in W and in the memory scenario it gets rows of its
//! own; the targets judge this build only.
//!
//! One module a scenario (`a`, `b`, `fleet`, `wrk`, `replicas`,
//! `memory`); what they share: `stack` (the processes), `client` (the
//! load loops and their statistics), `pinning`.

#[path = "../common/mod.rs"]
mod common;

mod a;
mod b;
mod client;
mod fleet;
mod memory;
mod pinning;
mod replicas;
mod stack;
mod wrk;

use std::fmt::Write as _;
use std::process::Command;
use std::time::Duration;

use a::{a_sizes, scenario_a, size_label};
use b::scenario_b;
use fleet::scenario_f;
use memory::scenario_memory;
use pinning::{pin, pinning, PINNING};
use replicas::scenario_r;
use stack::baseline;
use wrk::scenario_w;

/// In `benches/RESULTS.md`, this line and what follows it are kept when
/// the bench rewrites the file: results measured outside the bench.
const KEPT_MARKER: &str =
    "<!-- measured outside `cargo bench`: cargo bench keeps this line and what follows it -->";

/// What the bench prints, kept to be written to `RESULTS.md`.
pub struct Report {
    text: String,
}

impl Report {
    pub fn line(&mut self, s: impl AsRef<str>) {
        println!("{}", s.as_ref());
        self.text.push_str(s.as_ref());
        self.text.push('\n');
    }
}

pub fn verdict(ok: bool, what: String) -> String {
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
    // pd-sim built (or found fresh) now, on every core and before anything
    // is measured.
    pd_sim::binary();
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
    let baseline = baseline().map_or(String::new(), |p| format!("PD_PROXY_BASELINE={p} "));
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
            checks.extend(scenario_memory(&mut report, parked).await);
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

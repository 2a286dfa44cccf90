//! Scenario A: zero-latency upstream, 16-token chat streams, closed loops
//! at several concurrencies through pd-proxy at each of its sizes, against
//! pd-sim's decoder called directly; then how it scales.

use std::net::SocketAddr;
use std::time::Duration;

use crate::client::{closed_loop, latency_cells, pct, Stats};
use crate::common::CHAT_16;
use crate::pinning::{pinning, proxy_cpus, Pinning};
use crate::stack::{baseline, Stack, PROXY};
use crate::{verdict, Report};

/// pd-proxy's size in A: the cores it is pinned to, or `None` where
/// nothing is pinned.
pub type Size = Option<usize>;

pub fn size_label(size: Size) -> String {
    label("pd-proxy", size)
}

/// `name` at `size`: `pd-proxy`, `pd-proxy, 1 core`, `baseline, 4 cores`.
fn label(name: &str, size: Size) -> String {
    match size {
        None => name.to_owned(),
        Some(1) => format!("{name}, 1 core"),
        Some(n) => format!("{name}, {n} cores"),
    }
}

/// A's pd-proxy sizes: 1 core and 4 where there is room for both beside
/// pd-sim and the load generator (the table), 1 and all that is
/// left on 3 to 11 cores, or `asked` (clamped to what is left).
pub fn a_sizes(pinning: Option<&Pinning>, asked: Option<&[usize]>) -> Vec<Size> {
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

/// One pd-proxy binary at one size: its runs at every concurrency.
struct Lineup {
    size: Size,
    /// `PD_PROXY_BASELINE`'s binary rather than this build's.
    baseline: bool,
    runs: Vec<ARun>,
}

impl Lineup {
    fn label(&self) -> String {
        let name = if self.baseline {
            "baseline"
        } else {
            "pd-proxy"
        };
        label(name, self.size)
    }
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

/// Every size of pd-proxy at every concurrency against one pd-sim, then
/// the tables and the targets, which judge this build only. `cores`: the
/// machine's, for the one target that only a big host can meet.
pub async fn scenario_a(
    report: &mut Report,
    duration: Duration,
    concurrencies: &[usize],
    sizes: &[Size],
    cores: usize,
) -> Vec<String> {
    let (direct, lineups) = measure(duration, concurrencies, sizes).await;
    tables(report, sizes, &direct, &lineups);
    let ours: Vec<&Lineup> = lineups.iter().filter(|l| !l.baseline).collect();
    checks(&direct, &ours, concurrencies, cores)
}

/// pd-proxy restarted between sizes, and at each size the baseline (when
/// `PD_PROXY_BASELINE` names one) started in its place after it, on the
/// same CPUs, ports and pd-sim. The direct runs do not depend on pd-proxy,
/// so they run once, each beside the first size's run at the same
/// concurrency.
async fn measure(
    duration: Duration,
    concurrencies: &[usize],
    sizes: &[Size],
) -> (Vec<ARun>, Vec<Lineup>) {
    let mut stack = Stack::start_with(PROXY, &[], &[], proxy_cpus(sizes[0])).await;
    let baseline_bin = baseline();
    let mut bins = vec![(PROXY, false)];
    bins.extend(baseline_bin.as_deref().map(|b| (b, true)));
    let mut direct = Vec::new();
    let mut lineups: Vec<Lineup> = Vec::new();
    for &size in sizes {
        for &(bin, baseline) in &bins {
            let first = lineups.is_empty();
            if !first {
                stack.restart_proxy(bin, proxy_cpus(size).as_deref()).await;
            }
            // Warm the proxy's upstream pool and both binaries' allocators.
            closed_loop(stack.proxy_addr, 8, Duration::from_millis(500), CHAT_16).await;
            let mut lineup = Lineup {
                size,
                baseline,
                runs: Vec::new(),
            };
            for &c in concurrencies {
                if first {
                    eprintln!("A: {c} clients, direct");
                    direct.push(a_run(&stack, stack.decoder_addr, c, duration, false).await);
                }
                eprintln!("A: {c} clients, {}", lineup.label());
                let run = a_run(&stack, stack.proxy_addr, c, duration, true).await;
                lineup.runs.push(run);
            }
            lineups.push(lineup);
        }
    }
    (direct, lineups)
}

fn tables(report: &mut Report, sizes: &[Size], direct: &[ARun], lineups: &[Lineup]) {
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
    if let Some(b) = baseline() {
        report.line(format!("Baseline = `PD_PROXY_BASELINE={b}`, started in pd-proxy's place after pd-proxy's runs at each size (the same flags, ports, CPUs and pd-sim); the targets judge pd-proxy only."));
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
        for lineup in lineups {
            let p = &lineup.runs[j];
            report.line(format!(
                "| {c} | {} | {:.0} | {} | {} | {:.3} | {:.3} | {:.0} | {:.0} |",
                lineup.label(),
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
    scaling("decoder direct".into(), direct, String::new());
    for lineup in lineups {
        let runs = &lineup.runs;
        let cpu = match (at(runs, 64), at(runs, 1024)) {
            (Some(a), Some(b)) => format!("{:.0} → {:.0}", a.proxy_us, b.proxy_us),
            (Some(a), None) => format!("{:.0} → —", a.proxy_us),
            _ => "—".to_owned(),
        };
        scaling(lineup.label(), runs, cpu);
    }
    report.line("");
}

/// A's targets, on this build's lineups (one a size, in order).
fn checks(direct: &[ARun], ours: &[&Lineup], concurrencies: &[usize], cores: usize) -> Vec<String> {
    let mut checks = Vec::new();
    // The throughput targets are the 4-core proxy's: one core is saturated
    // at 64 clients already.
    let rps_judged = ours
        .iter()
        .position(|l| l.size == Some(4))
        .unwrap_or(ours.len() - 1);
    for (k, lineup) in ours.iter().enumerate() {
        let runs = &lineup.runs;
        let name = format!("A {}", lineup.label());
        if let (Some(d), Some(p)) = (at(direct, 1), at(runs, 1)) {
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
            // the 16-core host; sharing fewer, one client's
            // latency is mostly the scheduler's.
            checks.push(if cores >= 16 {
                verdict(added <= 0.15, what)
            } else {
                format!("- (not judged: {cores} cores) {what}")
            });
        }
        // Pinned, the direct run has pd-sim's and the load generator's
        // cores to itself, and a 1-core proxy's share says little.
        if let (true, Some(d), Some(p)) = (k == rps_judged, at(direct, 64), at(runs, 64)) {
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
                        if ours.len() == 1 {
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
        if let (Some(d), Some(p)) = (at(direct, 1024), at(runs, 1024)) {
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

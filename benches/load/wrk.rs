//! Scenario W: the 64-client share measured with wrk, a load generator
//! apart from this process.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use crate::client::closed_loop;
use crate::common::{Proc, CHAT_16};
use crate::pinning::proxy_cpus;
use crate::stack::{baseline, Stack};
use crate::{verdict, Report};

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
pub async fn scenario_w(report: &mut Report, secs: u64, runs: usize) -> Vec<String> {
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
    let baseline_bin = baseline();
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

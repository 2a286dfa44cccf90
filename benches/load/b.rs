//! Scenario B: realistic upstream timings; the proxy's overhead over the
//! simulated time.

use std::time::Duration;

use crate::client::{closed_loop, pct, Stats};
use crate::stack::Stack;
use crate::{verdict, Report};

const CHAT_64: &[u8] = br#"{"model":"sim-model","messages":[{"role":"user","content":"Explain how KV cache reuse helps long-context serving."}],"max_tokens":64,"stream":true}"#;

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

pub async fn scenario_b(report: &mut Report, duration: Duration, clients: usize) -> Vec<String> {
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

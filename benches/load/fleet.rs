//! Scenario F: a fleet of 3 prefillers and 2 decoders, one prefiller
//! SIGKILLed under load.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::client::{closed_loop, latency_cells, timed_loop, Stats};
use crate::common::{free_port, get_text, wait_ready, Proc, CHAT_16};
use crate::pinning::{proxy_cpus, sim_cpus};
use crate::stack::{metric, proxy_args, sim_args, PROXY};
use crate::{verdict, Report};

/// Scenario F's prefill time (ms): long enough that every prefiller has
/// requests in flight when one is killed.
const F_PREFILL: u64 = 20;
/// Scenario F's `--health-interval` (s).
const F_HEALTH_INTERVAL: &str = "0.5";

/// 3 pd-sim processes, the proxy in front of the 3 prefillers and of the
/// decoders of the first 2; the third process (only its prefiller is in
/// use) is SIGKILLed after `before`, and the load goes on for `after`.
pub async fn scenario_f(
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

//! Scenario R: pd-proxy replicas sharing a cluster key behind HAProxy
//! against one replica.

use std::collections::HashMap;
use std::io::{Read as _, Write as _};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::client::{latency_cells, pct, timed_loop, Sample, Stats};
use crate::common::{command_on, free_port, get_text, wait_ready, Proc, CHAT_16};
use crate::pinning::{proxy_cpus, sim_cpus};
use crate::stack::{metric, proxy_args, sim_args, PROXY};
use crate::{verdict, Report};

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
pub async fn scenario_r(
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

//! A fleet behind the proxy: several pd-sim prefillers and decoders on
//! real sockets, some killed, slowed, renamed or brought back while
//! clients keep sending.

mod common;

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use pd_proxy::fleet::Resolve;
use pd_proxy::App;
use pd_sim::{Running, Sim, SimConfig};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

/// A resolver whose answers the test sets: nothing reaches real DNS.
#[derive(Default)]
struct FakeDns(Mutex<HashMap<String, Vec<IpAddr>>>);

impl FakeDns {
    fn set(&self, host: &str, ips: &[&str]) {
        self.0.lock().unwrap().insert(
            host.to_owned(),
            ips.iter().map(|ip| ip.parse().unwrap()).collect(),
        );
    }
}

impl Resolve for FakeDns {
    fn resolve<'a>(
        &'a self,
        host: &'a str,
    ) -> Pin<Box<dyn std::future::Future<Output = io::Result<Vec<IpAddr>>> + Send + 'a>> {
        let answer = self.0.lock().unwrap().get(host).cloned();
        Box::pin(async move {
            answer.ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no such host"))
        })
    }
}

/// One simulated server: its observations, where it listens, and its
/// serving task while alive.
struct Server {
    sim: Arc<Sim>,
    addr: SocketAddr,
    running: Option<Running>,
    prefiller: bool,
}

impl Server {
    async fn start(config: SimConfig, addr: &str, prefiller: bool) -> Server {
        let sim = Sim::new(config);
        let listener = TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let running = Some(if prefiller {
            sim.spawn_prefiller(listener)
        } else {
            sim.spawn_decoder(listener)
        });
        Server {
            sim,
            addr,
            running,
            prefiller,
        }
    }

    async fn kill(&mut self) {
        self.running.take().expect("alive").kill().await;
    }

    /// Serves again on the same address, as a restarted pod does.
    fn revive(&mut self) {
        let listener = pd_proxy::listen(self.addr).unwrap();
        self.running = Some(if self.prefiller {
            self.sim.spawn_prefiller(listener)
        } else {
            self.sim.spawn_decoder(listener)
        });
    }

    fn prefills(&self) -> usize {
        self.sim.prefill_requests().len()
    }
}

struct Proxy {
    url: String,
    app: Arc<App>,
    client: reqwest::Client,
    _stop: oneshot::Sender<()>,
}

impl Proxy {
    /// The proxy with `flags`, names resolved by `dns`.
    async fn start(
        flags: Vec<String>,
        dns: Arc<FakeDns>,
        public: TcpListener,
        telemetry: TcpListener,
    ) -> Proxy {
        let app = build_app_with_resolver(config(flags), &public, &telemetry, dns);
        let url = format!("http://{}", public.local_addr().unwrap());
        let (stop, _) = serve_app(Arc::clone(&app), public, telemetry);
        Proxy {
            url,
            app,
            client: reqwest::Client::new(),
            _stop: stop,
        }
    }

    async fn chat(&self, body: &Value) -> reqwest::Response {
        self.client
            .post(format!("{}/v1/chat/completions", self.url))
            .json(body)
            .send()
            .await
            .unwrap()
    }

    async fn metrics(&self) -> String {
        get_text(&self.client, &format!("{}/metrics", self.url)).await
    }

    async fn ready(&self) -> u16 {
        self.client
            .get(format!("{}/ready", self.url))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    }

    async fn endpoint_metric(&self, name: &str, role: &str, addr: SocketAddr) -> f64 {
        let key = format!("{name}{{role=\"{role}\",endpoint=\"{addr}\"}}");
        metric_value(&self.metrics().await, &key)
    }

    fn endpoints(&self, role: pd_proxy::fleet::Role) -> Vec<SocketAddr> {
        self.app
            .fleet
            .role(role)
            .snapshot()
            .iter()
            .map(|e| e.addr)
            .collect()
    }
}

fn ports(servers: &[Server]) -> String {
    servers
        .iter()
        .map(|s| s.addr.port().to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// Prefillers and decoders on 127.0.0.1 with their own configs, the
/// prefillers posting telemetry to the proxy, and the proxy in front
/// with `extra` flags.
async fn fleet(
    prefillers: Vec<SimConfig>,
    decoders: Vec<SimConfig>,
    extra: &[&str],
) -> (Proxy, Vec<Server>, Vec<Server>) {
    let public = bind().await;
    let telemetry = bind().await;
    let telemetry_url = format!(
        "http://{}/api/v1/telemetry",
        telemetry.local_addr().unwrap()
    );
    let mut ps = Vec::new();
    for mut config in prefillers {
        config.telemetry_url = Some(telemetry_url.clone());
        ps.push(Server::start(config, "127.0.0.1:0", true).await);
    }
    let mut ds = Vec::new();
    for config in decoders {
        ds.push(Server::start(config, "127.0.0.1:0", false).await);
    }
    let mut flags: Vec<String> = [
        "--prefiller-host",
        "127.0.0.1",
        "--prefiller-port",
        &ports(&ps),
        "--decoder-host",
        "127.0.0.1",
        "--decoder-port",
        &ports(&ds),
    ]
    .map(String::from)
    .to_vec();
    flags.extend(extra.iter().map(|s| s.to_string()));
    let proxy = Proxy::start(flags, Arc::default(), public, telemetry).await;
    (proxy, ps, ds)
}

async fn wait_ready(proxy: &Proxy) {
    wait_until("/ready answers 200", || async {
        proxy.ready().await == 200
    })
    .await;
}

/// Statuses of every request that `clients` concurrent loops sent until
/// `stop` was set.
fn load(
    proxy: &Arc<Proxy>,
    clients: usize,
    stop: &Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<Vec<u16>>> {
    (0..clients)
        .map(|_| {
            let (proxy, stop) = (Arc::clone(proxy), Arc::clone(stop));
            tokio::spawn(async move {
                let mut statuses = Vec::new();
                // Bounded whatever happens: at most 2,000 requests a client.
                for _ in 0..2_000 {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    statuses.push(proxy.chat(&chat_body(false)).await.status().as_u16());
                }
                statuses
            })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prefiller_killed_under_load_costs_no_client_an_error() {
    let slow = SimConfig {
        prefill_delay: Duration::from_millis(100),
        ..Default::default()
    };
    let (proxy, mut ps, _ds) = fleet(
        vec![slow.clone(), slow.clone(), slow],
        vec![SimConfig::default(), SimConfig::default()],
        &["--health-interval", "0.2"],
    )
    .await;
    wait_ready(&proxy).await;
    let proxy = Arc::new(proxy);
    let stop = Arc::new(AtomicBool::new(false));
    let clients = load(&proxy, 12, &stop);
    // Every prefiller has requests in flight: the load is on.
    wait_until("prefills on every prefiller", || async {
        ps.iter().all(|p| p.prefills() >= 3)
    })
    .await;
    let victim = ps[0].addr;
    ps[0].kill().await;
    let in_flight_at_kill = ps[0].sim.prefills_cancelled();
    wait_until("the dead prefiller is ejected", || async {
        proxy
            .endpoint_metric("pd_proxy_endpoint_healthy", "prefiller", victim)
            .await
            == 0.0
    })
    .await;
    // Past the active checks' 3 failures: out of rotation for good.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let sent_to_victim = proxy
        .endpoint_metric("pd_proxy_endpoint_requests_total", "prefiller", victim)
        .await;
    let served_before = ps[1].prefills() + ps[2].prefills();
    wait_until("the others keep serving", || async {
        ps[1].prefills() + ps[2].prefills() >= served_before + 30
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    let mut statuses = Vec::new();
    for c in clients {
        statuses.extend(c.await.unwrap());
    }

    assert!(statuses.len() > 60, "{} requests", statuses.len());
    let errors: Vec<_> = statuses.iter().filter(|s| **s != 200).collect();
    assert!(errors.is_empty(), "client errors: {errors:?}");
    assert!(in_flight_at_kill >= 1, "the kill caught prefills in flight");
    let m = proxy.metrics().await;
    let retries = metric_value(&m, "pd_proxy_retries_total{leg=\"prefill\"}");
    let from_victim = metric_value(
        &m,
        &format!("pd_proxy_endpoint_retries_total{{role=\"prefiller\",endpoint=\"{victim}\"}}"),
    );
    assert!(
        retries >= in_flight_at_kill as f64,
        "every prefill in flight at the kill was retried: {retries} retries, {in_flight_at_kill} in flight"
    );
    assert_eq!(retries, from_victim, "every retry left the dead prefiller");
    assert_eq!(
        proxy
            .endpoint_metric("pd_proxy_endpoint_requests_total", "prefiller", victim)
            .await,
        sent_to_victim,
        "an ejected prefiller gets no requests"
    );
    assert!(
        metric_value(
            &m,
            &format!(
                "pd_proxy_endpoint_ejections_total{{role=\"prefiller\",endpoint=\"{victim}\"}}"
            )
        ) >= 1.0
    );
    assert_eq!(
        metric_value(&m, "pd_proxy_upstream_errors_total{leg=\"decode\"}"),
        0.0
    );
    assert!(proxy.app.pending.is_empty());
}

/// Shares of the prefills taken by a prefiller 5x slower than its two
/// peers, under 12 concurrent clients. The delays dwarf the proxy's own
/// latency, so a loaded machine does not blur the 5x.
async fn slow_prefiller_share(balance: &str) -> f64 {
    let fast = SimConfig {
        prefill_delay: Duration::from_millis(40),
        ..Default::default()
    };
    let slow = SimConfig {
        prefill_delay: Duration::from_millis(200),
        ..Default::default()
    };
    let (proxy, ps, _ds) = fleet(
        vec![fast.clone(), fast, slow],
        vec![SimConfig::default(), SimConfig::default()],
        &["--balance", balance],
    )
    .await;
    wait_ready(&proxy).await;
    let proxy = Arc::new(proxy);
    let clients: Vec<_> = (0..12)
        .map(|_| {
            let proxy = Arc::clone(&proxy);
            tokio::spawn(async move {
                for _ in 0..25 {
                    assert_eq!(proxy.chat(&chat_body(false)).await.status(), 200);
                }
            })
        })
        .collect();
    for c in clients {
        c.await.unwrap();
    }
    let counts: Vec<usize> = ps.iter().map(Server::prefills).collect();
    eprintln!("{balance}: prefills per prefiller (fast, fast, slow) {counts:?}");
    assert_eq!(counts.iter().sum::<usize>(), 300, "{counts:?}");
    counts[2] as f64 / 300.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_prefiller_gets_less_than_a_fifth_with_least_loaded() {
    let share = slow_prefiller_share("least-loaded").await;
    assert!(share < 0.2, "slow prefiller's share {share:.3}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_prefiller_gets_a_third_with_round_robin() {
    let share = slow_prefiller_share("round-robin").await;
    assert!(
        (0.30..=0.37).contains(&share),
        "slow prefiller's share {share:.3}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_whose_answer_changes_adds_and_removes_endpoints() {
    let public = bind().await;
    let telemetry = bind().await;
    let telemetry_url = format!(
        "http://{}/api/v1/telemetry",
        telemetry.local_addr().unwrap()
    );
    let prefiller = |delay_ms| SimConfig {
        telemetry_url: Some(telemetry_url.clone()),
        prefill_delay: Duration::from_millis(delay_ms),
        ..Default::default()
    };
    // Two pods of one headless Service: same port, their own addresses.
    let a = Server::start(prefiller(400), "127.0.0.2:0", true).await;
    let port = a.addr.port();
    let b = Server::start(prefiller(0), &format!("127.0.0.3:{port}"), true).await;
    let d = Server::start(SimConfig::default(), "127.0.0.1:0", false).await;
    let dns = Arc::new(FakeDns::default());
    dns.set("prefill.pods", &["127.0.0.2"]);
    dns.set("decode.pods", &["127.0.0.1"]);
    let flags = [
        "--prefiller-host",
        "prefill.pods",
        "--prefiller-port",
        &port.to_string(),
        "--decoder-host",
        "decode.pods",
        "--decoder-port",
        &d.addr.port().to_string(),
        "--discovery-interval",
        "0.1",
        "--health-interval",
        "0.1",
        "--balance",
        "round-robin",
    ]
    .map(String::from)
    .to_vec();
    let proxy = Arc::new(Proxy::start(flags, Arc::clone(&dns), public, telemetry).await);
    wait_ready(&proxy).await;
    assert_eq!(proxy.endpoints(pd_proxy::fleet::Role::Prefiller), [a.addr]);
    assert_eq!(proxy.chat(&chat_body(false)).await.status(), 200);
    assert_eq!((a.prefills(), b.prefills()), (1, 0));

    // The Service gains a pod: it joins after its first passing check.
    dns.set("prefill.pods", &["127.0.0.2", "127.0.0.3"]);
    wait_until("the new pod is healthy", || async {
        proxy
            .endpoint_metric("pd_proxy_endpoint_healthy", "prefiller", b.addr)
            .await
            == 1.0
    })
    .await;
    for _ in 0..4 {
        assert_eq!(proxy.chat(&chat_body(false)).await.status(), 200);
    }
    assert_eq!((a.prefills(), b.prefills()), (3, 2), "both pods take turns");

    // A request is in flight at pod a (its prefill takes 400 ms) when a
    // leaves the answer: a takes no new requests, and that one finishes.
    let in_flight = {
        let proxy = Arc::clone(&proxy);
        tokio::spawn(async move {
            let mut statuses = Vec::new();
            for _ in 0..2 {
                statuses.push(proxy.chat(&chat_body(false)).await.status().as_u16());
            }
            statuses
        })
    };
    wait_until("a prefill in flight at pod a", || async {
        a.prefills() == 4
    })
    .await;
    dns.set("prefill.pods", &["127.0.0.3"]);
    wait_until("pod a is gone from the set", || async {
        proxy.endpoints(pd_proxy::fleet::Role::Prefiller) == [b.addr]
    })
    .await;
    assert_eq!(in_flight.await.unwrap(), [200, 200]);
    for _ in 0..3 {
        assert_eq!(proxy.chat(&chat_body(false)).await.status(), 200);
    }
    assert_eq!(a.prefills(), 4, "a removed pod gets no new request");
    assert_eq!(b.prefills(), 2 + 1 + 3);
    let m = proxy.metrics().await;
    assert!(
        !m.contains(&a.addr.to_string()),
        "a removed endpoint leaves /metrics"
    );

    // A failing resolution keeps the last answer for a while (six rounds),
    // then drops it: a name that keeps failing is gone.
    dns.0.lock().unwrap().remove("prefill.pods");
    wait_until("a resolution error is counted", || async {
        metric_value(&proxy.metrics().await, "pd_proxy_discovery_errors_total") > 0.0
    })
    .await;
    assert_eq!(proxy.endpoints(pd_proxy::fleet::Role::Prefiller), [b.addr]);
    wait_until("the stale answer is dropped", || async {
        proxy.endpoints(pd_proxy::fleet::Role::Prefiller).is_empty()
    })
    .await;
    assert!(metric_value(&proxy.metrics().await, "pd_proxy_discovery_errors_total") >= 6.0);
    let resp = proxy.chat(&chat_body(false)).await;
    assert_eq!(resp.status(), 503, "no prefiller is known");
    assert_openai_error(&resp.json().await.unwrap(), 503);
    assert!(proxy.app.pending.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_every_prefiller_down_requests_fail_fast_and_come_back_with_one() {
    // No retries: each request tries one prefiller, so it must be the one
    // that came back.
    let (proxy, mut ps, _ds) = fleet(
        vec![
            SimConfig::default(),
            SimConfig::default(),
            SimConfig::default(),
        ],
        vec![SimConfig::default()],
        &["--health-interval", "0.5", "--prefill-retries", "0"],
    )
    .await;
    wait_ready(&proxy).await;
    assert_eq!(proxy.chat(&chat_body(false)).await.status(), 200);
    for p in &mut ps {
        p.kill().await;
    }
    for _ in 0..5 {
        let started = Instant::now();
        let resp = proxy.chat(&chat_body(false)).await;
        assert_eq!(resp.status(), 502);
        assert_openai_error(&resp.json().await.unwrap(), 502);
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );
    }
    wait_until("/ready turns 503", || async { proxy.ready().await == 503 }).await;
    let body: Value = proxy
        .client
        .get(format!("{}/ready", proxy.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let message = assert_openai_error(&body, 503);
    assert!(message.contains("0 of 3 prefillers"), "{message}");
    let m = proxy.metrics().await;
    assert!(metric_value(&m, "pd_proxy_panic_picks_total{role=\"prefiller\"}") >= 1.0);
    // Past three failed checks each: the fleet is down, not flapping.
    tokio::time::sleep(Duration::from_millis(1600)).await;

    // One comes back. Within one health interval its check passes, and
    // from then on it is the one tried, before a second pass restores it.
    ps[1].revive();
    let revived = Instant::now();
    // The time at which a run of 10 successes in a row began.
    let mut streak: Option<Duration> = None;
    let mut in_a_row = 0;
    while in_a_row < 10 {
        assert!(
            revived.elapsed() < Duration::from_secs(5),
            "no run of successes"
        );
        if proxy.chat(&chat_body(false)).await.status() == 200 {
            streak.get_or_insert(revived.elapsed());
            in_a_row += 1;
        } else {
            streak = None;
            in_a_row = 0;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    let back_after = streak.unwrap();
    assert!(
        back_after < Duration::from_millis(500 + 250),
        "traffic came back {back_after:?} after the prefiller, health interval 500 ms"
    );
    wait_ready(&proxy).await;
    assert!(proxy.app.pending.is_empty());
}

#[tokio::test]
async fn a_request_from_a_proxy_is_a_508_and_nothing_is_sent() {
    let s = start(SimConfig::default(), &[]).await;
    let resp = s
        .client
        .post(format!("{}/v1/chat/completions", s.url))
        .header("x-pd-proxy-hop", "1")
        .json(&chat_body(false))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 508);
    let message = assert_openai_error(&resp.json().await.unwrap(), 508);
    assert!(message.contains("loop"), "{message}");
    assert!(s.prefiller.prefill_requests().is_empty());
    assert!(s.decoder.decode_requests().is_empty());
    let resp = s
        .client
        .get(format!("{}/v1/models", s.url))
        .header("x-pd-proxy-hop", "1")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 508);
    assert_eq!(s.metric("pd_proxy_loops_refused_total").await, 2.0);
    // Every request the proxy sends carries the header.
    assert_eq!(
        s.post("/v1/chat/completions", chat_body(false))
            .await
            .status(),
        200
    );
    assert_eq!(
        s.prefiller.prefill_requests()[0].headers["x-pd-proxy-hop"],
        "1"
    );
    assert_eq!(
        s.decoder.decode_requests()[0].headers["x-pd-proxy-hop"],
        "1"
    );
}

#[tokio::test]
async fn two_proxies_pointing_at_each_other_stop_at_the_second() {
    // B sits in front of real sims; A uses B's API port as its prefiller.
    let b = start(SimConfig::default(), &[]).await;
    let b_port = b.url.rsplit(':').next().unwrap().to_owned();
    let a = start_with(SimConfig::default(), &[], |_, d| {
        Some(upstream_flags(
            "127.0.0.1",
            b_port.parse().unwrap(),
            "127.0.0.1",
            d,
        ))
    })
    .await;
    let resp = a.post("/v1/chat/completions", chat_body(false)).await;
    assert_eq!(resp.status(), 502, "A's prefill was refused by B");
    assert_eq!(b.metric("pd_proxy_loops_refused_total").await, 1.0);
    assert!(
        b.prefiller.prefill_requests().is_empty(),
        "B forwarded nothing"
    );
}

#[tokio::test]
async fn short_prompts_go_straight_to_the_decoder() {
    let s = start(SimConfig::default(), &["--direct-below-tokens", "256"]).await;
    let resp = s.post("/v1/chat/completions", chat_body(true)).await;
    assert_eq!(resp.status(), 200);
    let text = resp.text().await.unwrap();
    assert_eq!(sse_data(&text).last().unwrap(), "[DONE]");
    assert!(
        s.prefiller.prefill_requests().is_empty(),
        "no prefill for a short prompt"
    );
    assert_eq!(s.decoder.decode_requests().len(), 1);

    // About 2,000 bytes of English: ~450 tokens, over the threshold.
    let long = "The quick brown fox jumps over the lazy dog while the cache warms. ".repeat(30);
    let mut body = chat_body(false);
    body["messages"] = json!([{"role": "user", "content": long}]);
    assert_eq!(s.post("/v1/chat/completions", body).await.status(), 200);
    assert_eq!(
        s.prefiller.prefill_requests().len(),
        1,
        "a long prompt is disaggregated"
    );

    // Completions: a token list is counted exactly.
    let tokens: Vec<u32> = (0..300).collect();
    let body = json!({"model": "sim-model", "prompt": tokens, "max_tokens": 4});
    assert_eq!(s.post("/v1/completions", body).await.status(), 200);
    assert_eq!(s.prefiller.prefill_requests().len(), 2);
    let body = json!({"model": "sim-model", "prompt": [1, 2, 3], "max_tokens": 4});
    assert_eq!(s.post("/v1/completions", body).await.status(), 200);
    assert_eq!(s.prefiller.prefill_requests().len(), 2);

    let m = s.metrics().await;
    assert_eq!(
        metric_value(&m, "pd_proxy_routes_total{route=\"direct\"}"),
        2.0
    );
    assert_eq!(metric_value(&m, "pd_proxy_routes_total{route=\"pd\"}"), 2.0);
    s.assert_drained().await;
}

#[tokio::test]
async fn by_default_every_request_is_disaggregated() {
    let s = start(SimConfig::default(), &[]).await;
    let body = json!({"model": "sim-model", "prompt": "hi", "max_tokens": 2});
    assert_eq!(s.post("/v1/completions", body).await.status(), 200);
    assert_eq!(s.prefiller.prefill_requests().len(), 1);
    assert_eq!(s.metric("pd_proxy_routes_total{route=\"pd\"}").await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decoder_that_refuses_connections_is_skipped() {
    let (proxy, _ps, mut ds) = fleet(
        vec![SimConfig::default()],
        vec![SimConfig::default(), SimConfig::default()],
        &["--balance", "round-robin"],
    )
    .await;
    wait_ready(&proxy).await;
    let dead = ds[0].addr;
    ds[0].kill().await;
    for _ in 0..4 {
        assert_eq!(proxy.chat(&chat_body(true)).await.status(), 200);
    }
    assert_eq!(ds[1].sim.decode_requests().len(), 4);
    let m = proxy.metrics().await;
    assert_eq!(
        metric_value(&m, "pd_proxy_retries_total{leg=\"decode\"}"),
        1.0,
        "ejected after one refusal"
    );
    assert_eq!(
        metric_value(
            &m,
            &format!("pd_proxy_endpoint_healthy{{role=\"decoder\",endpoint=\"{dead}\"}}")
        ),
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prefiller_reporting_a_deep_queue_gets_fewer_prefills() {
    // vLLM 0.32 answers a non-streaming request that asks with
    // `endpoint-load-metrics-format: JSON` with its own queue length.
    let busy = SimConfig {
        reported_waiting: Some(20),
        ..Default::default()
    };
    let (proxy, ps, _ds) = fleet(
        vec![SimConfig::default(), busy],
        vec![SimConfig::default()],
        &[],
    )
    .await;
    wait_ready(&proxy).await;
    for _ in 0..40 {
        assert_eq!(proxy.chat(&chat_body(false)).await.status(), 200);
    }
    let asked = ps[1].sim.prefill_requests()[0].headers["endpoint-load-metrics-format"].clone();
    assert_eq!(asked, "JSON");
    // Its first prefill reports the queue; after that it loses every
    // comparison while the report is fresh.
    assert!(
        ps[1].prefills() <= 3,
        "busy prefiller took {} of 40",
        ps[1].prefills()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefillers_and_decoders_rotate_independently() {
    // One prefiller, two decoders: with a shared index the Python proxy
    // pairs them in lockstep; here each role rotates alone.
    let (proxy, ps, ds) = fleet(
        vec![SimConfig::default()],
        vec![SimConfig::default(), SimConfig::default()],
        &["--balance", "round-robin"],
    )
    .await;
    wait_ready(&proxy).await;
    for _ in 0..4 {
        assert_eq!(proxy.chat(&chat_body(false)).await.status(), 200);
    }
    assert_eq!(ps[0].prefills(), 4);
    assert_eq!(
        (
            ds[0].sim.decode_requests().len(),
            ds[1].sim.decode_requests().len()
        ),
        (2, 2)
    );
}

/// The ratio the calibration text gives under pd-sim's counting (a word
/// is a token), as the proxy computes it.
fn sim_calibrated_ratio() -> f64 {
    let text = pd_proxy::tokens::CALIBRATION_TEXT;
    let words = text.split_whitespace().count();
    (text.len() * 1000 / words) as f64 / 1000.0
}

async fn wait_calibrated(s: &Stack) {
    let want = sim_calibrated_ratio();
    wait_until("the estimate is calibrated", || async {
        s.metric("pd_proxy_prompt_bytes_per_token").await == want
    })
    .await;
}

#[tokio::test]
async fn the_length_estimate_is_calibrated_from_a_prefillers_tokenize() {
    let s = start(SimConfig::default(), &["--direct-below-tokens", "100"]).await;
    wait_calibrated(&s).await;
    // 90 words, 540 bytes: 135 tokens at the starting 4 bytes a token, 90
    // at the calibrated ratio; no prefill has taught anything yet.
    let mut body = chat_body(false);
    body["messages"] = json!([{"role": "user", "content": "cache ".repeat(90)}]);
    assert_eq!(s.post("/v1/chat/completions", body).await.status(), 200);
    assert!(s.prefiller.prefill_requests().is_empty());
    assert_eq!(
        s.metric("pd_proxy_routes_total{route=\"direct\"}").await,
        1.0
    );
}

#[tokio::test]
async fn the_length_estimate_learns_the_engines_token_counts() {
    // pd-sim counts a word as a token: "tokenization " is 13 bytes a
    // token, where the estimate starts at 4.
    let s = start(SimConfig::default(), &["--direct-below-tokens", "100"]).await;
    let chat = |words: usize| {
        let mut body = chat_body(false);
        body["messages"] = json!([{"role": "user", "content": "tokenization ".repeat(words)}]);
        body
    };
    wait_calibrated(&s).await;
    // 60 words, 780 bytes: ~130 tokens at the calibrated ~6 bytes each,
    // so disaggregated.
    assert_eq!(s.post("/v1/chat/completions", chat(60)).await.status(), 200);
    assert_eq!(s.prefiller.prefill_requests().len(), 1);
    for _ in 0..64 {
        assert_eq!(
            s.post("/v1/chat/completions", chat(300)).await.status(),
            200
        );
    }
    let ratio = s.metric("pd_proxy_prompt_bytes_per_token").await;
    assert!(
        (12.5..14.0).contains(&ratio),
        "learned {ratio} bytes per token"
    );
    // Now 60 words are ~68 tokens: below the threshold, straight to a
    // decoder.
    assert_eq!(s.post("/v1/chat/completions", chat(60)).await.status(), 200);
    assert_eq!(s.prefiller.prefill_requests().len(), 65);
    assert_eq!(
        s.metric("pd_proxy_routes_total{route=\"direct\"}").await,
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_prefiller_gets_less_than_a_fifth_even_from_one_client() {
    // One client: every pick sees nothing in flight anywhere, so the
    // in-flight counts tie and the recent latency decides.
    let delay = |ms| SimConfig {
        prefill_delay: Duration::from_millis(ms),
        ..Default::default()
    };
    let (proxy, ps, _ds) = fleet(
        vec![delay(10), delay(10), delay(50)],
        vec![SimConfig::default()],
        &[],
    )
    .await;
    wait_ready(&proxy).await;
    for _ in 0..60 {
        assert_eq!(proxy.chat(&chat_body(false)).await.status(), 200);
    }
    let counts: Vec<usize> = ps.iter().map(Server::prefills).collect();
    eprintln!("one client: prefills per prefiller (fast, fast, slow) {counts:?}");
    assert!(counts[2] < 12, "{counts:?}");
}

/// Posts a chat request naming prefillers in llm-d's header.
async fn chat_naming(proxy: &Proxy, named: &str) -> reqwest::Response {
    proxy
        .client
        .post(format!("{}/v1/chat/completions", proxy.url))
        .header("x-prefiller-host-port", named)
        .json(&chat_body(false))
        .send()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateways_header_picks_the_prefiller() {
    let public = bind().await;
    let telemetry = bind().await;
    let telemetry_url = format!(
        "http://{}/api/v1/telemetry",
        telemetry.local_addr().unwrap()
    );
    let prefiller = || SimConfig {
        telemetry_url: Some(telemetry_url.clone()),
        ..Default::default()
    };
    let p0 = Server::start(prefiller(), "127.0.0.1:0", true).await;
    let mut p1 = Server::start(prefiller(), "127.0.0.1:0", true).await;
    // Outside the fleet, inside the allow-list.
    let outside = Server::start(prefiller(), "127.0.0.2:0", true).await;
    let d = Server::start(SimConfig::default(), "127.0.0.1:0", false).await;
    let flags = [
        "--prefiller-host",
        "127.0.0.1",
        "--prefiller-port",
        &format!("{},{}", p0.addr.port(), p1.addr.port()),
        "--decoder-host",
        "127.0.0.1",
        "--decoder-port",
        &d.addr.port().to_string(),
        "--allowed-prefillers",
        "127.0.0.2/32",
    ]
    .map(String::from)
    .to_vec();
    let proxy = Proxy::start(flags, Arc::default(), public, telemetry).await;
    wait_ready(&proxy).await;

    for _ in 0..3 {
        assert_eq!(
            chat_naming(&proxy, &p1.addr.to_string()).await.status(),
            200
        );
    }
    assert_eq!(
        (p0.prefills(), p1.prefills()),
        (0, 3),
        "the named prefiller, every time"
    );
    let sent = &p1.sim.prefill_requests()[0].headers;
    assert!(
        sent.get("x-prefiller-host-port").is_none(),
        "the header stays here"
    );

    assert_eq!(
        chat_naming(&proxy, &outside.addr.to_string())
            .await
            .status(),
        200
    );
    assert_eq!(
        outside.prefills(),
        1,
        "an allowed address outside the fleet"
    );

    // A list: the less loaded; a dead one in it is skipped.
    p1.kill().await;
    let list = format!("{}, {}", p1.addr, p0.addr);
    for _ in 0..3 {
        assert_eq!(chat_naming(&proxy, &list).await.status(), 200);
    }
    assert_eq!(p0.prefills(), 3);
    assert!(proxy.app.pending.is_empty());
}

#[tokio::test]
async fn a_prefiller_header_outside_the_fleet_and_allow_list_is_a_400() {
    let s = start(
        SimConfig::default(),
        &["--allowed-prefillers", "10.0.0.0/8"],
    )
    .await;
    let own = s.url.trim_start_matches("http://").to_owned();
    let many = (1..=17)
        .map(|i| format!("10.0.0.{i}:8100"))
        .collect::<Vec<_>>()
        .join(",");
    let (own_ip, own_port) = own.rsplit_once(':').unwrap();
    let mapped_own = format!("[::ffff:{own_ip}]:{own_port}");
    for bad in [
        "127.0.0.9:8100",
        "192.168.1.1:8100",
        "prefill.pods:8100",
        "10.0.0.1",
        "10.0.0.1:0",
        "[::1]",
        "",
        " , ",
        many.as_str(),
        own.as_str(),
        mapped_own.as_str(),
        "[fe80::1%2]:8100",
    ] {
        let resp = s
            .client
            .post(format!("{}/v1/chat/completions", s.url))
            .header("x-prefiller-host-port", bad)
            .json(&chat_body(false))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 400, "{bad:?}");
        let body: Value = resp.json().await.unwrap();
        assert_openai_error(&body, 400);
        assert_eq!(body["error"]["param"], "x-prefiller-host-port", "{bad:?}");
    }
    assert!(
        s.prefiller.prefill_requests().is_empty(),
        "nothing was sent"
    );
    assert!(s.decoder.decode_requests().is_empty());
}

//! Who may use the proxy, over real sockets: clients need one of
//! `--api-key`'s keys (and never see it go upstream), LMCache needs the
//! `--telemetry-token` in its URL, and whatever a telemetry sender sends
//! is bounded: its size, its time, its effect on a request's rank count
//! and on the metrics' label sets.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use pd_proxy::App;
use pd_sim::{Sim, SimConfig};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;

const TOKEN: &str = "telemetry-token-0123456789abcdef";
const KEY_1: &str = "sk-client-key-one";
const KEY_2: &str = "sk-client-key-two";
const UPSTREAM_KEY: &str = "sk-upstream-key";

/// One proxy over a prefiller sim and a decoder sim. The prefiller's
/// LMCache posts to the proxy's telemetry URL with `sim_token` as
/// `?token=` (none: the plain URL).
struct Secure {
    url: String,
    /// Without a query.
    telemetry_url: String,
    prefiller: Arc<Sim>,
    decoder: Arc<Sim>,
    app: Arc<App>,
    client: reqwest::Client,
    _stop: oneshot::Sender<()>,
}

async fn start(sim: SimConfig, sim_token: Option<&str>, extra: &[&str]) -> Secure {
    let public = bind().await;
    let telemetry = bind().await;
    let telemetry_url = format!(
        "http://{}/api/v1/telemetry",
        telemetry.local_addr().unwrap()
    );
    let prefiller = Sim::new(SimConfig {
        telemetry_url: Some(with_token(&telemetry_url, sim_token)),
        ..sim.clone()
    });
    let decoder = Sim::new(sim);
    let (p, d) = (bind().await, bind().await);
    let (pp, dp) = (
        p.local_addr().unwrap().port(),
        d.local_addr().unwrap().port(),
    );
    tokio::spawn(Arc::clone(&prefiller).serve_prefiller(p));
    tokio::spawn(Arc::clone(&decoder).serve_decoder(d));
    let mut flags = upstream_flags("127.0.0.1", pp, "127.0.0.1", dp);
    flags.extend(extra.iter().map(|s| s.to_string()));
    let app = build_app(config(flags), &public, &telemetry);
    let url = format!("http://{}", public.local_addr().unwrap());
    let (stop, _server) = serve_app(Arc::clone(&app), public, telemetry);
    Secure {
        url,
        telemetry_url,
        prefiller,
        decoder,
        app,
        client: reqwest::Client::new(),
        _stop: stop,
    }
}

fn with_token(url: &str, token: Option<&str>) -> String {
    match token {
        Some(t) => format!("{url}?token={t}"),
        None => url.to_owned(),
    }
}

impl Secure {
    async fn chat(&self, key: Option<&str>) -> reqwest::Response {
        let mut req = self
            .client
            .post(format!("{}/v1/chat/completions", self.url))
            .json(&chat_body(false));
        if let Some(key) = key {
            req = req.bearer_auth(key);
        }
        req.send().await.unwrap()
    }

    async fn get(&self, path: &str, key: Option<&str>) -> reqwest::Response {
        let mut req = self.client.get(format!("{}{path}", self.url));
        if let Some(key) = key {
            req = req.bearer_auth(key);
        }
        req.send().await.unwrap()
    }

    /// `/metrics`, with a key when the proxy has keys.
    async fn metrics(&self, key: Option<&str>) -> String {
        let resp = self.get("/metrics", key).await;
        assert_eq!(resp.status(), 200);
        resp.text().await.unwrap()
    }

    async fn post_event(&self, token: Option<&str>, event: &Value) -> reqwest::Response {
        self.client
            .post(with_token(&self.telemetry_url, token))
            .json(event)
            .send()
            .await
            .unwrap()
    }
}

async fn assert_401(resp: reqwest::Response) {
    assert_eq!(resp.status(), 401);
    assert_eq!(resp.headers()["www-authenticate"], "Bearer");
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "invalid_api_key", "{body}");
    for key in ["message", "type", "param"] {
        assert!(body["error"].get(key).is_some(), "{body}");
    }
}

fn store_finished(ids: &Value, world_size: u32, kv_rank: u32) -> Value {
    json!({"event": "request_store_finished", "request_ids_set": ids,
           "model_name": "sim-model", "world_size": world_size, "kv_rank": kv_rank})
}

fn refused(metrics: &str, reason: &str) -> f64 {
    metric_value(
        metrics,
        &format!("pd_proxy_telemetry_refused_total{{reason=\"{reason}\"}}"),
    )
}

#[tokio::test]
async fn requests_without_a_valid_key_are_401_and_go_nowhere() {
    let keys = format!("{KEY_1},{KEY_2}");
    let s = start(SimConfig::default(), None, &["--api-key", &keys]).await;
    assert_401(s.chat(None).await).await;
    assert_401(s.chat(Some("sk-not-a-key")).await).await;
    assert_401(s.chat(Some(&KEY_1[..KEY_1.len() - 1])).await).await;
    let basic = s
        .client
        .post(format!("{}/v1/completions", s.url))
        .header("authorization", format!("Basic {KEY_1}"))
        .json(&json!({"model": "sim-model", "prompt": "hi", "max_tokens": 2}))
        .send()
        .await
        .unwrap();
    assert_401(basic).await;
    assert_401(s.get("/v1/models", None).await).await;
    // Unknown paths need a key too (401 before 404).
    assert_401(s.get("/v2/anything", None).await).await;
    assert_eq!(s.get("/v2/anything", Some(KEY_1)).await.status(), 404);
    assert!(
        s.prefiller.prefill_requests().is_empty(),
        "nothing went upstream"
    );
    assert!(
        s.decoder.decode_requests().is_empty(),
        "nothing went upstream"
    );
    let m = s.metrics(Some(KEY_2)).await;
    assert_eq!(
        metric_value(&m, "pd_proxy_auth_failures_total{reason=\"missing\"}"),
        3.0,
        "{m}"
    );
    assert_eq!(
        metric_value(&m, "pd_proxy_auth_failures_total{reason=\"invalid\"}"),
        3.0
    );
}

#[tokio::test]
async fn every_configured_key_works_and_none_goes_upstream() {
    let keys = format!("{KEY_1},{KEY_2}");
    let s = start(
        SimConfig::default(),
        None,
        &["--api-key", &keys, "--upstream-api-key", UPSTREAM_KEY],
    )
    .await;
    for key in [KEY_1, KEY_2] {
        let resp = s.chat(Some(key)).await;
        assert_eq!(resp.status(), 200);
        resp.json::<Value>().await.unwrap();
    }
    let lower = s
        .client
        .post(format!("{}/v1/chat/completions", s.url))
        .header("authorization", format!("bearer {KEY_1}"))
        .json(&chat_body(false))
        .send()
        .await
        .unwrap();
    assert_eq!(lower.status(), 200, "the scheme is case-insensitive");
    let upstream: Vec<_> = s
        .prefiller
        .prefill_requests()
        .into_iter()
        .chain(s.decoder.decode_requests())
        .collect();
    assert_eq!(upstream.len(), 6);
    let expected = format!("Bearer {UPSTREAM_KEY}");
    for req in &upstream {
        let auth: Vec<_> = req.headers.get_all("authorization").iter().collect();
        assert_eq!(auth, [expected.as_str()], "the upstream key, only");
    }
}

#[tokio::test]
async fn without_an_upstream_key_the_client_key_stays_here() {
    let s = start(SimConfig::default(), None, &["--api-key", KEY_1]).await;
    assert_eq!(s.chat(Some(KEY_1)).await.status(), 200);
    let upstream: Vec<_> = s
        .prefiller
        .prefill_requests()
        .into_iter()
        .chain(s.decoder.decode_requests())
        .collect();
    assert_eq!(upstream.len(), 2);
    for req in &upstream {
        assert!(
            req.headers.get("authorization").is_none(),
            "the client's key was forwarded: {:?}",
            req.headers
        );
    }
}

#[tokio::test]
async fn probes_need_no_key_and_metrics_does() {
    let s = start(SimConfig::default(), None, &["--api-key", KEY_1]).await;
    assert_eq!(s.get("/health", None).await.status(), 200);
    wait_until("/ready answers 200 without a key", || async {
        s.get("/ready", None).await.status() == 200
    })
    .await;
    assert_401(s.get("/metrics", None).await).await;
    assert_401(s.get("/metrics", Some("wrong")).await).await;
    let m = s.metrics(Some(KEY_1)).await;
    assert!(m.contains("pd_proxy_auth_failures_total"), "{m}");
}

#[tokio::test]
async fn an_open_api_stays_open() {
    let s = start(SimConfig::default(), None, &[]).await;
    assert_eq!(s.chat(None).await.status(), 200);
    assert_eq!(s.chat(Some("anything")).await.status(), 200);
    assert_eq!(s.get("/metrics", None).await.status(), 200);
}

#[tokio::test]
async fn telemetry_without_the_token_is_403_and_releases_nothing() {
    for sim_token in [None, Some("telemetry-token-but-not-the-one")] {
        let s = start(
            SimConfig::default(),
            sim_token,
            &[
                "--telemetry-token",
                TOKEN,
                "--kv-ready-timeout",
                "1",
                "--on-kv-timeout",
                "fail",
            ],
        )
        .await;
        let resp = s.chat(None).await;
        assert_eq!(
            resp.status(),
            504,
            "the KV was never reported: {sim_token:?}"
        );
        let posts = s.prefiller.telemetry_posts();
        assert!(!posts.is_empty());
        assert!(posts.iter().all(|p| p.status == 403), "{posts:?}");
        let m = s.metrics(None).await;
        assert_eq!(refused(&m, "token"), posts.len() as f64);
        assert_eq!(metric_value(&m, "pd_proxy_kv_ready_timeouts_total"), 1.0);
        // Direct posts: no token, a wrong one, the right one twice, the
        // right one under another name.
        let event = store_finished(&json!(["chatcmpl-x"]), 1, 0);
        for query in [
            "",
            "?token=nope",
            &format!("?token={TOKEN}&token={TOKEN}"),
            &format!("?tokens={TOKEN}"),
            &format!("?token={}", &TOKEN[1..]),
        ] {
            let resp = s
                .client
                .post(format!("{}{query}", s.telemetry_url))
                .json(&event)
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), 403, "{query}");
            assert_openai_error(&resp.json().await.unwrap(), 403);
        }
        assert_drained(&s).await;
    }
}

#[tokio::test]
async fn telemetry_with_the_token_releases() {
    let s = start(
        SimConfig {
            world_size: 2,
            ..SimConfig::default()
        },
        Some(TOKEN),
        &[
            "--telemetry-token",
            TOKEN,
            "--kv-ready-timeout",
            "10",
            "--on-kv-timeout",
            "fail",
        ],
    )
    .await;
    let started = Instant::now();
    assert_eq!(s.chat(None).await.status(), 200);
    assert!(started.elapsed() < Duration::from_secs(5));
    let posts = s.prefiller.telemetry_posts();
    assert_eq!(posts.len(), 2);
    assert!(posts.iter().all(|p| p.status == 200), "{posts:?}");
    let m = s.metrics(None).await;
    assert_eq!(metric_value(&m, "pd_proxy_kv_ready_timeouts_total"), 0.0);
    assert_eq!(refused(&m, "token"), 0.0);
    assert_drained(&s).await;
}

/// A sender that claims more ranks than the request's first event would
/// hold it until its KV timeout; the claim is refused and counted, and
/// the real ranks release the request.
#[tokio::test]
async fn a_raised_world_size_is_refused_and_the_real_ranks_release() {
    let s = start(
        SimConfig {
            world_size: 2,
            // Room, between the real ranks, for the forged event.
            rank_stagger: Duration::from_millis(1500),
            ..SimConfig::default()
        },
        Some(TOKEN),
        &[
            "--telemetry-token",
            TOKEN,
            "--kv-ready-timeout",
            "20",
            "--on-kv-timeout",
            "fail",
        ],
    )
    .await;
    let request = {
        let client = s.client.clone();
        let url = format!("{}/v1/chat/completions", s.url);
        tokio::spawn(async move {
            let started = Instant::now();
            let status = client
                .post(url)
                .json(&chat_body(false))
                .send()
                .await
                .unwrap()
                .status();
            (status, started.elapsed())
        })
    };
    wait_until("rank 0 posted", || async {
        !s.prefiller.telemetry_posts().is_empty()
    })
    .await;
    let first = s.prefiller.telemetry_posts()[0].payload.clone();
    assert_eq!(first["kv_rank"], 0);
    let forged = store_finished(&first["request_ids_set"], 128, 127);
    let resp = s.post_event(Some(TOKEN), &forged).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.json::<Value>().await.unwrap(),
        json!({"status": "ok", "notified": 0, "total": 1})
    );
    let m = s.metrics(None).await;
    assert_eq!(refused(&m, "world_size"), 1.0, "{m}");
    let (status, took) = request.await.unwrap();
    assert_eq!(status, 200, "rank 1 released it");
    assert!(took < Duration::from_secs(10), "took {took:?}");
    let m = s.metrics(None).await;
    assert_eq!(metric_value(&m, "pd_proxy_kv_ready_timeouts_total"), 0.0);
    assert_drained(&s).await;
}

#[tokio::test]
async fn event_names_make_at_most_two_series() {
    let s = start(SimConfig::default(), None, &["--telemetry-token", TOKEN]).await;
    for i in 0..1000 {
        let event = json!({"event": format!("event_{i}"), "request_ids_set": ["x"]});
        assert_eq!(s.post_event(Some(TOKEN), &event).await.status(), 200);
    }
    let m = s.metrics(None).await;
    let series: Vec<&str> = m
        .lines()
        .filter(|l| l.starts_with("pd_proxy_telemetry_events_total{"))
        .collect();
    assert!(series.len() <= 2, "{series:?}");
    assert_eq!(
        metric_value(&m, "pd_proxy_telemetry_events_total{event=\"other\"}"),
        1000.0
    );
}

/// Sends `head` (request line and headers, without the blank line), then
/// `body` in pieces `gap` apart until the reply starts, and returns the
/// reply's status, head and body.
async fn raw_post(
    addr: &str,
    head: &str,
    body: &[u8],
    gap: Duration,
) -> (u16, String, Value, Duration) {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    let started = Instant::now();
    tcp.write_all(format!("{head}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let (mut rd, mut wr) = tcp.into_split();
    let body = body.to_vec();
    let writer = tokio::spawn(async move {
        for byte in body {
            if wr.write_all(&[byte]).await.is_err() {
                return;
            }
            tokio::time::sleep(gap).await;
        }
    });
    let mut reply = Vec::new();
    let mut buf = [0u8; 4096];
    let answered = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => reply.extend_from_slice(&buf[..n]),
            }
            if let Some(head_end) = find(&reply, b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&reply[..head_end]).to_lowercase();
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .map(|v| v.trim().parse().unwrap())
                    .unwrap_or(0);
                if reply.len() >= head_end + 4 + len {
                    break;
                }
            }
        }
    })
    .await;
    let took = started.elapsed();
    writer.abort();
    assert!(answered.is_ok(), "no reply within 15 s");
    let head_end = find(&reply, b"\r\n\r\n").expect("a whole reply head");
    let head = String::from_utf8_lossy(&reply[..head_end]).to_lowercase();
    let status = head[9..12].parse().unwrap();
    let body = serde_json::from_slice(&reply[head_end + 4..]).unwrap();
    (status, head, body, took)
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn telemetry_addr(s: &Secure) -> String {
    s.telemetry_url
        .trim_start_matches("http://")
        .trim_end_matches("/api/v1/telemetry")
        .to_owned()
}

#[tokio::test]
async fn an_oversized_telemetry_body_is_413_and_the_token_comes_first() {
    let s = start(SimConfig::default(), None, &["--telemetry-token", TOKEN]).await;
    let addr = telemetry_addr(&s);
    let head = |token: &str| {
        format!(
            "POST /api/v1/telemetry?token={token} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}",
            2 << 20
        )
    };
    // The declared length is enough: not a byte of the body is sent.
    let (status, head_413, body, _) = raw_post(&addr, &head(TOKEN), b"", Duration::ZERO).await;
    assert_eq!(status, 413);
    assert!(head_413.contains("connection: close"), "{head_413}");
    assert_openai_error(&body, 413);
    // Without the token the size is never looked at.
    let (status, _, body, _) = raw_post(&addr, &head("wrong"), b"", Duration::ZERO).await;
    assert_eq!(status, 403);
    assert_openai_error(&body, 403);
    let m = s.metrics(None).await;
    assert_eq!(refused(&m, "too_large"), 1.0);
    assert_eq!(refused(&m, "token"), 1.0);
}

#[tokio::test]
async fn a_dripping_telemetry_body_is_408_within_the_bound() {
    let s = start(
        SimConfig::default(),
        None,
        &["--telemetry-token", TOKEN, "--body-timeout", "1"],
    )
    .await;
    let addr = telemetry_addr(&s);
    let event = store_finished(&json!(["chatcmpl-x"]), 1, 0).to_string();
    let head = format!(
        "POST /api/v1/telemetry?token={TOKEN} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}",
        event.len()
    );
    // A byte every 100 ms: never silent for long, never done in time.
    let (status, head, body, took) =
        raw_post(&addr, &head, event.as_bytes(), Duration::from_millis(100)).await;
    assert_eq!(status, 408, "{head}");
    assert_openai_error(&body, 408);
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(3),
        "answered after {took:?}"
    );
    let m = s.metrics(None).await;
    assert_eq!(refused(&m, "timeout"), 1.0);
}

#[tokio::test]
async fn a_malformed_telemetry_body_is_400() {
    let s = start(SimConfig::default(), None, &["--telemetry-token", TOKEN]).await;
    for body in ["not json", "{\"event\":\"request_store_finished\"}"] {
        let resp = s
            .client
            .post(format!("{}?token={TOKEN}", s.telemetry_url))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 400, "{body}");
        assert_openai_error(&resp.json().await.unwrap(), 400);
    }
    let m = s.metrics(None).await;
    assert_eq!(refused(&m, "malformed"), 2.0);
}

/// Replicas share the token, so an event forwarded to its owner carries
/// it and is taken there.
#[tokio::test]
async fn forwarded_events_carry_the_token() {
    const CLUSTER_KEY: &str = "a test cluster key, 32 bytes ok!";
    let (p, d) = (bind().await, bind().await);
    let (pp, dp) = (
        p.local_addr().unwrap().port(),
        d.local_addr().unwrap().port(),
    );
    let mut replicas = Vec::new();
    for _ in 0..2 {
        let public = bind().await;
        let telemetry = bind().await;
        let mut flags = upstream_flags("127.0.0.1", pp, "127.0.0.1", dp);
        flags.extend(
            [
                "--cluster-key",
                CLUSTER_KEY,
                "--telemetry-token",
                TOKEN,
                "--kv-ready-timeout",
                "10",
                "--on-kv-timeout",
                "fail",
            ]
            .map(String::from),
        );
        let app = build_app(config(flags), &public, &telemetry);
        let url = format!("http://{}", public.local_addr().unwrap());
        let telemetry_url = format!(
            "http://{}/api/v1/telemetry",
            telemetry.local_addr().unwrap()
        );
        let (stop, _server) = serve_app(app, public, telemetry);
        let health = format!("{url}/health");
        wait_until("the replica serves", || async {
            reqwest::get(&health).await.is_ok()
        })
        .await;
        replicas.push((url, telemetry_url, stop));
    }
    // LMCache posts everything to replica 1; the request parks on 0.
    let prefiller = Sim::new(SimConfig {
        telemetry_url: Some(format!("{}?token={TOKEN}", replicas[1].1)),
        ..SimConfig::default()
    });
    let decoder = Sim::new(SimConfig::default());
    tokio::spawn(Arc::clone(&prefiller).serve_prefiller(p));
    tokio::spawn(decoder.serve_decoder(d));
    let resp = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", replicas[0].0))
        .json(&chat_body(false))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    // Counted once the owner's reply is back at the forwarder.
    let metrics_1 = format!("{}/metrics", replicas[1].0);
    wait_until("the forward is delivered", || async {
        forwarded(
            &get_text(&reqwest::Client::new(), &metrics_1).await,
            "delivered",
        ) == 1.0
    })
    .await;
    let owner = get_text(
        &reqwest::Client::new(),
        &format!("{}/metrics", replicas[0].0),
    )
    .await;
    assert_eq!(refused(&owner, "token"), 0.0);
    assert_eq!(
        metric_value(&owner, "pd_proxy_kv_ready_timeouts_total"),
        0.0
    );
}

async fn assert_drained(s: &Secure) {
    wait_until("no parked request", || async { s.app.pending.is_empty() }).await;
}

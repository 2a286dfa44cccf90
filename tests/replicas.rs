//! Several pd-proxy replicas behind one telemetry URL: owner-routed ids,
//! events forwarded to the replica that parked the request, and whatever
//! a telemetry sender makes up dropped and counted.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use pd_proxy::App;
use pd_sim::{Sim, SimConfig};
use serde_json::{json, Value};
use tokio::sync::oneshot;

const KEY: &str = "a test cluster key, 32 bytes ok!";

struct Replica {
    url: String,
    telemetry_url: String,
    app: Arc<App>,
    stop: Option<oneshot::Sender<()>>,
    server: tokio::task::JoinHandle<std::io::Result<pd_proxy::server::Drained>>,
}

impl Replica {
    async fn start(prefill_port: u16, decode_port: u16, extra: &[&str]) -> Replica {
        let public = bind().await;
        let telemetry = bind().await;
        let mut flags = upstream_flags("127.0.0.1", prefill_port, "127.0.0.1", decode_port);
        flags.extend(extra.iter().map(|s| s.to_string()));
        let app = build_app(config(flags), &public, &telemetry);
        let url = format!("http://{}", public.local_addr().unwrap());
        let telemetry_url = format!(
            "http://{}/api/v1/telemetry",
            telemetry.local_addr().unwrap()
        );
        let (stop, server) = serve_app(Arc::clone(&app), public, telemetry);
        // Serving: its ids are decided.
        let health = format!("{url}/health");
        wait_until("the replica serves", || async {
            reqwest::get(&health).await.is_ok()
        })
        .await;
        Replica {
            url,
            telemetry_url,
            app,
            stop: Some(stop),
            server,
        }
    }

    async fn metrics(&self) -> String {
        reqwest::get(format!("{}/metrics", self.url))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        let _ = tokio::time::timeout(Duration::from_secs(10), self.server).await;
    }
}

/// Three replicas with one key over one prefiller and one decoder, the
/// prefiller's LMCache posting every event to replica 0 (as a load
/// balancer in front of their telemetry ports might).
async fn three(sim: SimConfig, extra: &[&str]) -> (Vec<Replica>, Arc<Sim>, Arc<Sim>) {
    let p = bind().await;
    let d = bind().await;
    let (pp, dp) = (
        p.local_addr().unwrap().port(),
        d.local_addr().unwrap().port(),
    );
    let mut flags = vec!["--cluster-key", KEY, "--kv-ready-timeout", "10"];
    flags.extend_from_slice(extra);
    let mut replicas = Vec::new();
    for _ in 0..3 {
        replicas.push(Replica::start(pp, dp, &flags).await);
    }
    let prefiller = Sim::new(SimConfig {
        telemetry_url: Some(replicas[0].telemetry_url.clone()),
        ..sim.clone()
    });
    let decoder = Sim::new(sim);
    tokio::spawn(Arc::clone(&prefiller).serve_prefiller(p));
    tokio::spawn(Arc::clone(&decoder).serve_decoder(d));
    (replicas, prefiller, decoder)
}

async fn chat(url: &str) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("{url}/v1/chat/completions"))
        .json(&chat_body(false))
        .send()
        .await
        .unwrap()
}

async fn post_event(telemetry_url: &str, ids: Vec<String>) -> Value {
    let event = json!({"event": "request_store_finished", "request_ids_set": ids,
                       "model_name": "sim-model", "world_size": 1, "kv_rank": 0});
    reqwest::Client::new()
        .post(telemetry_url)
        .json(&event)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_for_another_replicas_requests_are_forwarded_to_it() {
    let (replicas, prefiller, _decoder) = three(SimConfig::default(), &[]).await;
    let mut ids = Vec::new();
    for round in 0..4 {
        for r in &replicas {
            let resp = chat(&r.url).await;
            assert_eq!(resp.status(), 200, "round {round}");
            let id = resp.headers()["x-request-id"].to_str().unwrap().to_owned();
            assert_eq!(id.len(), pd_proxy::owner::ROUTED_LEN);
            assert!(!id.contains('-'));
            ids.push(id);
        }
    }
    // The engines saw the routed id.
    assert_eq!(
        prefiller.prefill_requests()[0].headers["x-request-id"],
        ids[0].as_str()
    );
    for r in &replicas {
        let m = r.metrics().await;
        assert_eq!(
            metric_value(&m, "pd_proxy_kv_ready_timeouts_total"),
            0.0,
            "every request released by its event"
        );
        assert!(r.app.pending.is_empty());
    }
    // Counted once the owner's reply is back, which may be after the
    // client's answer.
    wait_until("replica 0 forwarded the others' 8 events", || async {
        forwarded(&replicas[0].metrics().await, "delivered") == 8.0
    })
    .await;
    let m0 = replicas[0].metrics().await;
    assert!(
        m0.contains("pd_proxy_telemetry_forward_seconds_count 8"),
        "{m0}"
    );
    assert_eq!(forwarded(&replicas[1].metrics().await, "delivered"), 0.0);

    // The same events again: the owners no longer know those ids.
    let replay: Vec<String> = ids[1..3]
        .iter()
        .map(|id| format!("chatcmpl-{id}-9a895ec2"))
        .collect();
    let reply = post_event(&replicas[0].telemetry_url, replay).await;
    assert_eq!(reply, json!({"status": "ok", "notified": 0, "total": 2}));
    wait_until("the replay is answered unknown by the owners", || async {
        forwarded(&replicas[0].metrics().await, "unknown_at_owner") == 2.0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ids_a_sender_makes_up_are_dropped_and_counted() {
    let (replicas, _p, _d) = three(SimConfig::default(), &[]).await;
    let resp = chat(&replicas[1].url).await;
    let id = resp.headers()["x-request-id"].to_str().unwrap().to_owned();
    let r0 = &replicas[0];
    // That request's own event went through replica 0: delivered once.
    wait_until("the request's own event is delivered", || async {
        forwarded(&r0.metrics().await, "delivered") == 1.0
    })
    .await;

    // Every 7th digit changed in turn (owner.rs's unit test changes every
    // one): the MAC fails, nothing is forwarded.
    let mut forged = Vec::new();
    for i in (0..id.len()).step_by(7) {
        let mut bytes = id.clone().into_bytes();
        bytes[i] = if bytes[i] == b'0' { b'1' } else { b'0' };
        forged.push(format!("chatcmpl-{}", String::from_utf8(bytes).unwrap()));
    }
    let n = forged.len() as f64;
    // Made with another key (another cluster's replica).
    let other = Replica::start(1, 2, &["--cluster-key", "some other key, also 32 bytes!!"]).await;
    let foreign = other.app.ids().wire(pd_proxy::pending::RequestId::random());
    forged.push(format!("chatcmpl-{foreign}"));
    // A plain id: not this cluster's form.
    forged.push(format!(
        "chatcmpl-{}",
        pd_proxy::pending::RequestId::random()
    ));
    let reply = post_event(&r0.telemetry_url, forged).await;
    assert_eq!(reply["notified"], 0);
    let m = r0.metrics().await;
    assert_eq!(
        metric_value(&m, "pd_proxy_telemetry_invalid_ids_total"),
        n + 2.0
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    let m = r0.metrics().await;
    assert_eq!(forwarded(&m, "delivered"), 1.0, "nothing more was sent");
    for outcome in ["unknown_at_owner", "unreachable", "queue_full"] {
        assert_eq!(
            forwarded(&m, outcome),
            0.0,
            "{outcome}: nothing was sent anywhere"
        );
    }

    // An event that arrives already forwarded, for a third replica, is
    // not sent on again.
    let third = replicas[2]
        .app
        .ids()
        .wire(pd_proxy::pending::RequestId::random());
    let resp = reqwest::Client::new()
        .post(&replicas[1].telemetry_url)
        .header("x-pd-proxy-forwarded", "1")
        .json(&json!({"event": "request_store_finished", "request_ids_set": [format!("chatcmpl-{third}")], "world_size": 1, "kv_rank": 0}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(forwarded(&replicas[1].metrics().await, "misrouted"), 1.0);
    other.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_owner_that_is_gone_costs_a_count_not_a_wait() {
    let (mut replicas, _p, _d) = three(SimConfig::default(), &[]).await;
    let gone = replicas.pop().unwrap();
    let id = gone.app.ids().wire(pd_proxy::pending::RequestId::random());
    gone.stop().await;
    let started = std::time::Instant::now();
    let reply = post_event(&replicas[0].telemetry_url, vec![format!("chatcmpl-{id}")]).await;
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "the reply does not wait for the forward"
    );
    assert_eq!(reply["total"], 1);
    wait_until("the dead owner is counted", || async {
        forwarded(&replicas[0].metrics().await, "unreachable") == 1.0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_foreign_ids_stays_bounded() {
    let (replicas, _p, _d) = three(SimConfig::default(), &[]).await;
    // 20,000 valid ids of replica 1 that it never parked, 500 an event.
    let r1 = &replicas[1];
    let mut sent = 0;
    for _ in 0..40 {
        let ids: Vec<String> = (0..500)
            .map(|_| {
                format!(
                    "chatcmpl-{}",
                    r1.app.ids().wire(pd_proxy::pending::RequestId::random())
                )
            })
            .collect();
        sent += ids.len();
        post_event(&replicas[0].telemetry_url, ids).await;
    }
    wait_until("every forwarded id accounted for", || async {
        let m = replicas[0].metrics().await;
        ["delivered", "unknown_at_owner", "unreachable", "queue_full"]
            .iter()
            .map(|o| forwarded(&m, o))
            .sum::<f64>()
            == sent as f64
    })
    .await;
    let m1 = r1.metrics().await;
    assert_eq!(metric_value(&m1, "pd_proxy_pending_requests"), 0.0);
    assert!(r1.app.pending.is_empty());
}

#[tokio::test]
async fn without_a_key_ids_are_plain() {
    let s = start(SimConfig::default(), &[]).await;
    let resp = s.post("/v1/chat/completions", chat_body(false)).await;
    assert_eq!(resp.headers()["x-request-id"].len(), 32);
}

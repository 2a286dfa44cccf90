//! Tests of pd-sim itself, over real sockets: if the simulator drifts from
//! vLLM's wire behaviour, every proxy test built on it proves nothing.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::HeaderMap;
use axum::routing::post;
use axum::Router;
use bytes::Bytes;
use pd_sim::{Sim, SimConfig, TelemetryPost};
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;

// Lines taken verbatim from shared/captures-vllm-0.32 (real vLLM 0.32), so
// the layout check does not depend on where shared/ is checked out.
const CAP_CHAT_FIRST: &str = r#"{"id":"chatcmpl-beff0447bf3900f0","object":"chat.completion.chunk","created":1795618024,"model":"tiny","choices":[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}],"prompt_token_ids":null,"prompt_text":null}"#;
const CAP_CHAT_TOKEN: &str = r#"{"id":"chatcmpl-beff0447bf3900f0","object":"chat.completion.chunk","created":1795618024,"model":"tiny","choices":[{"index":0,"delta":{"content":"aten"},"logprobs":null,"finish_reason":null,"token_ids":null}]}"#;
const CAP_CHAT_LAST: &str = r#"{"id":"chatcmpl-beff0447bf3900f0","object":"chat.completion.chunk","created":1795618024,"model":"tiny","choices":[{"index":0,"delta":{"content":" proxy"},"logprobs":null,"finish_reason":"length","stop_reason":null,"token_ids":null}],"system_fingerprint":"vllm-0.32.0-c4bec4c3"}"#;
const CAP_CMPL_TOKEN: &str = r#"{"id":"cmpl-884a8677983e25c0","object":"text_completion","created":1795618029,"model":"tiny","choices":[{"index":0,"text":" test","logprobs":null,"finish_reason":null,"stop_reason":null,"prompt_token_ids":null,"token_ids":null}]}"#;
const CAP_CMPL_LAST: &str = r#"{"id":"cmpl-884a8677983e25c0","object":"text_completion","created":1795618029,"model":"tiny","choices":[{"index":0,"text":"","logprobs":null,"finish_reason":"length","stop_reason":null,"prompt_token_ids":null,"token_ids":null}]}"#;
const CAP_CMPL_USAGE: &str = r#"{"id":"cmpl-884a8677983e25c0","object":"text_completion","created":1795618029,"model":"tiny","choices":[],"usage":{"prompt_tokens":3,"total_tokens":11,"completion_tokens":8},"system_fingerprint":"vllm-0.32.0-c4bec4c3"}"#;
const CAP_CHAT_FULL: &str = r#"{"id":"chatcmpl-abc123def4567890","object":"chat.completion","created":1795618029,"model":"tiny","choices":[{"index":0,"message":{"role":"assistant","content":" h","refusal":null,"annotations":null,"audio":null,"function_call":null,"reasoning":null},"logprobs":null,"finish_reason":"length","stop_reason":null,"token_ids":null,"routed_experts":null}],"service_tier":null,"system_fingerprint":"vllm-0.32.0-c4bec4c3","usage":{"prompt_tokens":12,"total_tokens":13,"completion_tokens":1,"prompt_tokens_details":null,"completion_tokens_details":null},"prompt_logprobs":null,"prompt_token_ids":null,"prompt_text":null,"kv_transfer_params":null,"ec_transfer_params":null,"metrics":null}"#;
const CAP_CMPL_FULL: &str = r#"{"id":"cmpl-abc123def4567890","object":"text_completion","created":1795618029,"model":"tiny","choices":[{"index":0,"text":"Or","logprobs":null,"finish_reason":"length","stop_reason":null,"token_ids":null,"prompt_logprobs":null,"prompt_token_ids":null,"routed_experts":null}],"service_tier":null,"system_fingerprint":"vllm-0.32.0-c4bec4c3","usage":{"prompt_tokens":2,"total_tokens":3,"completion_tokens":1,"prompt_tokens_details":null,"completion_tokens_details":null},"kv_transfer_params":null,"ec_transfer_params":null,"metrics":null}"#;

const SSE: &str = "text/event-stream; charset=utf-8";

/// Object keys in document order. `serde_json::Value` sorts keys, so the
/// order a relaying proxy would see needs its own scan.
fn keys(json: &str) -> Vec<&str> {
    let b = json.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] != b'"' {
            i += 1;
            continue;
        }
        let start = i + 1;
        i += 1;
        while i < b.len() && b[i] != b'"' {
            i += if b[i] == b'\\' { 2 } else { 1 };
        }
        let s = &json[start..i.min(b.len())];
        i += 1;
        let mut j = i;
        while j < b.len() && b[j].is_ascii_whitespace() {
            j += 1;
        }
        if j < b.len() && b[j] == b':' {
            out.push(s);
        }
    }
    out
}

/// The JSON payloads of an SSE body, and whether it ended with `[DONE]`.
fn events(body: &str) -> (Vec<&str>, bool) {
    let mut out = Vec::new();
    let mut done = false;
    for raw in body.split_terminator("\n\n") {
        let data = raw.strip_prefix("data: ").expect("every event is `data: `");
        assert!(!done, "nothing may follow [DONE]");
        if data == "[DONE]" {
            done = true;
        } else {
            out.push(data);
        }
    }
    assert!(
        body.is_empty() || body.ends_with("\n\n"),
        "events end with a blank line"
    );
    (out, done)
}

fn parse(s: &str) -> Value {
    serde_json::from_str(s).expect("valid JSON")
}

struct Servers {
    sim: Arc<Sim>,
    prefill: String,
    decode: String,
}

async fn start(config: SimConfig) -> Servers {
    let sim = Sim::new(config);
    let pl = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dl = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let prefill = format!("http://{}", pl.local_addr().unwrap());
    let decode = format!("http://{}", dl.local_addr().unwrap());
    tokio::spawn(sim.clone().serve_prefiller(pl));
    tokio::spawn(sim.clone().serve_decoder(dl));
    Servers {
        sim,
        prefill,
        decode,
    }
}

/// A stand-in for the proxy's telemetry port that keeps what it was sent.
#[derive(Clone, Default)]
struct Receiver {
    got: Arc<Mutex<Vec<(Instant, HeaderMap, Bytes)>>>,
}

impl Receiver {
    async fn start() -> (String, Receiver) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/api/v1/telemetry", listener.local_addr().unwrap());
        let receiver = Receiver::default();
        let got = receiver.got.clone();
        let app = Router::new().route(
            "/api/v1/telemetry",
            post(move |headers: HeaderMap, body: Bytes| {
                let got = got.clone();
                async move {
                    got.lock().unwrap().push((Instant::now(), headers, body));
                    axum::Json(json!({"status": "ok", "notified": 0, "total": 0}))
                }
            }),
        );
        tokio::spawn(async move { axum::serve(listener, app).await });
        (url, receiver)
    }

    fn payloads(&self) -> Vec<Value> {
        let got = self.got.lock().unwrap();
        got.iter()
            .map(|(_, _, body)| serde_json::from_slice(body).expect("telemetry is JSON"))
            .collect()
    }
}

/// Polls `cond` until it holds; telemetry is asynchronous by design, so
/// tests wait for an outcome with a deadline instead of sleeping blindly.
async fn eventually(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn telemetry_config(url: String) -> SimConfig {
    SimConfig {
        telemetry_url: Some(url),
        ..SimConfig::default()
    }
}

fn ranks(posts: &[TelemetryPost]) -> Vec<u64> {
    let mut ranks: Vec<u64> = posts
        .iter()
        .map(|p| p.payload["kv_rank"].as_u64().unwrap())
        .collect();
    ranks.sort_unstable();
    ranks
}

fn is_hex8(s: &str) -> bool {
    s.len() == 8 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

async fn post_json(url: String, body: Value) -> reqwest::Response {
    reqwest::Client::new()
        .post(url)
        .json(&body)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn chat_stream_has_capture_layout_and_ends_with_done() {
    let s = start(SimConfig::default()).await;
    let resp = post_json(
        format!("{}/v1/chat/completions", s.decode),
        json!({"model": "sim-model", "messages": [{"role": "user", "content": "hi there"}],
               "max_tokens": 3, "stream": true}),
    )
    .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], SSE);
    let body = resp.text().await.unwrap();
    let (evs, done) = events(&body);
    assert!(done, "stream must end with [DONE]: {body}");
    assert_eq!(evs.len(), 4, "role chunk + 3 tokens: {body}");
    assert_eq!(keys(evs[0]), keys(CAP_CHAT_FIRST));
    assert_eq!(keys(evs[1]), keys(CAP_CHAT_TOKEN));
    assert_eq!(keys(evs[2]), keys(CAP_CHAT_TOKEN));
    assert_eq!(keys(evs[3]), keys(CAP_CHAT_LAST));
    let content: String = evs[1..]
        .iter()
        .map(|e| {
            parse(e)["choices"][0]["delta"]["content"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(content, " tok0 tok1 tok2");
    assert_eq!(parse(evs[3])["choices"][0]["finish_reason"], "length");
    let id = parse(evs[0])["id"].clone();
    assert!(evs.iter().all(|e| parse(e)["id"] == id));
    assert_eq!(s.sim.decode_streams_completed(), 1);
    assert_eq!(s.sim.decode_streams_cancelled(), 0);
}

#[tokio::test]
async fn completions_stream_with_usage_has_capture_layout() {
    let s = start(SimConfig::default()).await;
    let resp = post_json(
        format!("{}/v1/completions", s.decode),
        json!({"model": "sim-model", "prompt": "one two three", "max_tokens": 2,
               "stream": true, "stream_options": {"include_usage": true}}),
    )
    .await;
    assert_eq!(resp.headers()["content-type"], SSE);
    let body = resp.text().await.unwrap();
    let (evs, done) = events(&body);
    assert!(done);
    assert_eq!(evs.len(), 3, "2 tokens + usage: {body}");
    assert_eq!(keys(evs[0]), keys(CAP_CMPL_TOKEN));
    assert_eq!(keys(evs[1]), keys(CAP_CMPL_LAST));
    assert_eq!(keys(evs[2]), keys(CAP_CMPL_USAGE));
    let usage = parse(evs[2]);
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(
        usage["usage"],
        json!({"prompt_tokens": 3, "total_tokens": 5, "completion_tokens": 2})
    );
}

#[tokio::test]
async fn non_stream_replies_have_capture_layout() {
    let s = start(SimConfig::default()).await;
    let resp = post_json(
        format!("{}/v1/chat/completions", s.decode),
        json!({"messages": [{"role": "user", "content": "a b c d"}], "max_tokens": 2}),
    )
    .await;
    assert_eq!(resp.headers()["content-type"], "application/json");
    assert!(resp.headers().contains_key("content-length"));
    let text = resp.text().await.unwrap();
    assert_eq!(keys(&text), keys(CAP_CHAT_FULL));
    let v = parse(&text);
    assert_eq!(v["choices"][0]["message"]["content"], " tok0 tok1");
    assert_eq!(v["usage"]["prompt_tokens"], 4);
    assert_eq!(v["usage"]["total_tokens"], 6);

    let text = post_json(
        format!("{}/v1/completions", s.decode),
        json!({"model": "sim-model", "prompt": "x y"}),
    )
    .await
    .text()
    .await
    .unwrap();
    assert_eq!(keys(&text), keys(CAP_CMPL_FULL));
    let v = parse(&text);
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["usage"]["completion_tokens"], 16, "default_tokens");
    assert_eq!(s.sim.decode_streams_completed(), 2);
}

#[tokio::test]
async fn x_request_id_sets_response_id_and_suffixed_engine_id() {
    let (url, receiver) = Receiver::start().await;
    let s = start(telemetry_config(url)).await;
    let resp = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", s.prefill))
        .header("x-request-id", "abc")
        .json(&json!({"model": "sim-model", "messages": [], "max_tokens": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(parse(&resp.text().await.unwrap())["id"], "chatcmpl-abc");
    eventually("telemetry", || s.sim.telemetry_posts().len() == 1).await;
    let post = &s.sim.telemetry_posts()[0];
    assert_eq!(post.status, 200);
    let id = post.payload["request_ids_set"][0].as_str().unwrap();
    let suffix = id.strip_prefix("chatcmpl-abc-").expect(id);
    assert!(is_hex8(suffix), "{id}");
    assert_eq!(
        post.payload,
        json!({"event": "request_store_finished", "request_ids_set": [id],
               "model_name": "sim-model", "world_size": 1, "kv_rank": 0})
    );
    let got = receiver.got.lock().unwrap();
    let (_, headers, body) = &got[0];
    assert_eq!(headers["content-type"], "application/json");
    assert_eq!(headers["connection"], "close");
    assert!(body.starts_with(b"{\"event\": \"request_store_finished\""));
    drop(got);
    let recorded = s.sim.prefill_requests();
    assert_eq!(recorded.len(), 1);
    assert_eq!(recorded[0].headers["x-request-id"], "abc");
    assert!(s.sim.decode_requests().is_empty());
}

#[tokio::test]
async fn body_request_id_is_used_without_header_and_random_otherwise() {
    let s = start(SimConfig::default()).await;
    let url = format!("{}/v1/completions", s.decode);
    let v = parse(
        &post_json(
            url.clone(),
            json!({"prompt": "p", "request_id": "from-body"}),
        )
        .await
        .text()
        .await
        .unwrap(),
    );
    assert_eq!(v["id"], "cmpl-from-body");
    let v = parse(
        &post_json(url, json!({"prompt": "p"}))
            .await
            .text()
            .await
            .unwrap(),
    );
    let base = v["id"].as_str().unwrap().strip_prefix("cmpl-").unwrap();
    assert_eq!(base.len(), 16);
    assert!(base.bytes().all(|b| b.is_ascii_hexdigit()), "{base}");
}

#[tokio::test]
async fn completions_prompt_list_gives_a_choice_and_engine_id_per_prompt() {
    let (url, _receiver) = Receiver::start().await;
    let s = start(telemetry_config(url)).await;
    let resp = reqwest::Client::new()
        .post(format!("{}/v1/completions", s.prefill))
        .header("x-request-id", "B")
        .json(&json!({"prompt": ["a", "b c", "d e f"], "max_tokens": 1}))
        .send()
        .await
        .unwrap();
    let v = parse(&resp.text().await.unwrap());
    assert_eq!(v["id"], "cmpl-B");
    let indexes: Vec<u64> = v["choices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["index"].as_u64().unwrap())
        .collect();
    assert_eq!(indexes, [0, 1, 2]);
    assert_eq!(v["usage"]["prompt_tokens"], 6);
    assert_eq!(v["usage"]["completion_tokens"], 3);
    eventually("telemetry", || s.sim.telemetry_posts().len() == 1).await;
    let ids = s.sim.telemetry_posts()[0].payload["request_ids_set"].clone();
    let ids: Vec<&str> = ids
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i.as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 3);
    for (i, id) in ids.iter().enumerate() {
        let suffix = id.strip_prefix(&format!("cmpl-B-{i}-")).expect(id);
        assert!(is_hex8(suffix), "{id}");
    }

    // Token-id prompts: a flat list is one prompt, a list of lists is many.
    let url = format!("{}/v1/completions", s.decode);
    let v = parse(
        &post_json(
            url.clone(),
            json!({"prompt": [1, 2, 3, 4], "max_tokens": 1}),
        )
        .await
        .text()
        .await
        .unwrap(),
    );
    assert_eq!(v["choices"].as_array().unwrap().len(), 1);
    assert_eq!(v["usage"]["prompt_tokens"], 4);
    let v = parse(
        &post_json(url, json!({"prompt": [[1, 2], [3]], "max_tokens": 1}))
            .await
            .text()
            .await
            .unwrap(),
    );
    assert_eq!(v["choices"].as_array().unwrap().len(), 2);
    assert_eq!(v["usage"]["prompt_tokens"], 3);
}

#[tokio::test]
async fn multi_prompt_stream_interleaves_prompts_per_token() {
    let s = start(SimConfig::default()).await;
    let body = post_json(
        format!("{}/v1/completions", s.decode),
        json!({"prompt": ["a", "b"], "max_tokens": 2, "stream": true}),
    )
    .await
    .text()
    .await
    .unwrap();
    let (evs, done) = events(&body);
    assert!(done);
    let seen: Vec<(u64, String, Value)> = evs
        .iter()
        .map(|e| {
            let c = &parse(e)["choices"][0];
            (
                c["index"].as_u64().unwrap(),
                c["text"].as_str().unwrap().to_owned(),
                c["finish_reason"].clone(),
            )
        })
        .collect();
    assert_eq!(
        seen,
        vec![
            (0, " tok0".to_owned(), Value::Null),
            (1, " tok0".to_owned(), Value::Null),
            (0, " tok1".to_owned(), json!("length")),
            (1, " tok1".to_owned(), json!("length")),
        ]
    );
}

#[tokio::test]
async fn world_size_two_posts_once_per_rank_with_stagger() {
    let (url, receiver) = Receiver::start().await;
    let s = start(SimConfig {
        world_size: 2,
        rank_stagger: Duration::from_millis(100),
        ..telemetry_config(url)
    })
    .await;
    let started = Instant::now();
    let resp = post_json(
        format!("{}/v1/chat/completions", s.prefill),
        json!({"messages": [{"role": "user", "content": "x"}], "max_tokens": 1}),
    )
    .await;
    assert_eq!(resp.status(), 200);
    eventually("both ranks", || s.sim.telemetry_posts().len() == 2).await;
    let posts = s.sim.telemetry_posts();
    assert_eq!(ranks(&posts), [0, 1]);
    assert!(posts
        .iter()
        .all(|p| p.payload["world_size"] == 2 && p.status == 200));
    assert_eq!(
        posts[0].payload["request_ids_set"],
        posts[1].payload["request_ids_set"]
    );
    let rank1 = posts.iter().find(|p| p.payload["kv_rank"] == 1).unwrap();
    assert!(
        rank1.at >= started + Duration::from_millis(100),
        "rank 1 is staggered"
    );
    assert_eq!(receiver.payloads().len(), 2);
}

#[tokio::test]
async fn dropped_ranks_are_never_posted_and_duplicates_post_twice() {
    let (url, receiver) = Receiver::start().await;
    let s = start(SimConfig {
        world_size: 3,
        drop_ranks: vec![1],
        duplicate_telemetry: true,
        ..telemetry_config(url)
    })
    .await;
    post_json(
        format!("{}/v1/completions", s.prefill),
        json!({"prompt": "x", "max_tokens": 1}),
    )
    .await;
    eventually("4 posts", || s.sim.telemetry_posts().len() == 4).await;
    assert_eq!(ranks(&s.sim.telemetry_posts()), [0, 0, 2, 2]);
    let mut received: Vec<u64> = receiver
        .payloads()
        .iter()
        .map(|p| p["kv_rank"].as_u64().unwrap())
        .collect();
    received.sort_unstable();
    assert_eq!(received, [0, 0, 2, 2]);
}

#[tokio::test]
async fn telemetry_before_response_is_acknowledged_before_the_reply() {
    let (url, _receiver) = Receiver::start().await;
    let s = start(SimConfig {
        world_size: 2,
        telemetry_before_response: true,
        ..telemetry_config(url)
    })
    .await;
    let resp = post_json(
        format!("{}/v1/completions", s.prefill),
        json!({"prompt": "x", "max_tokens": 1}),
    )
    .await;
    let replied = Instant::now();
    assert_eq!(resp.status(), 200);
    let posts = s.sim.telemetry_posts();
    assert_eq!(posts.len(), 2, "all ranks posted before the reply");
    assert!(posts.iter().all(|p| p.at < replied && p.status == 200));
}

#[tokio::test]
async fn telemetry_delay_holds_the_post_back() {
    let (url, _receiver) = Receiver::start().await;
    let delay = Duration::from_millis(800);
    let s = start(SimConfig {
        telemetry_delay: delay,
        ..telemetry_config(url)
    })
    .await;
    let started = Instant::now();
    let resp = post_json(
        format!("{}/v1/completions", s.prefill),
        json!({"prompt": "x", "max_tokens": 1}),
    )
    .await;
    resp.bytes().await.unwrap();
    if started.elapsed() < delay {
        assert!(
            s.sim.telemetry_posts().is_empty(),
            "posted before the delay"
        );
    }
    eventually("telemetry", || s.sim.telemetry_posts().len() == 1).await;
    assert!(s.sim.telemetry_posts()[0].at >= started + delay);
}

#[tokio::test]
async fn no_random_suffix_gives_bare_engine_ids() {
    let (url, _receiver) = Receiver::start().await;
    let s = start(SimConfig {
        random_suffix: false,
        ..telemetry_config(url)
    })
    .await;
    reqwest::Client::new()
        .post(format!("{}/v1/completions", s.prefill))
        .header("x-request-id", "abc")
        .json(&json!({"prompt": ["x", "y"], "max_tokens": 1}))
        .send()
        .await
        .unwrap();
    eventually("telemetry", || s.sim.telemetry_posts().len() == 1).await;
    assert_eq!(
        s.sim.telemetry_posts()[0].payload["request_ids_set"],
        json!(["cmpl-abc-0", "cmpl-abc-1"])
    );
}

#[tokio::test]
async fn unreachable_telemetry_endpoint_is_recorded_with_status_0() {
    let dead = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = dead.local_addr().unwrap();
    drop(dead);
    let s = start(telemetry_config(format!("http://{addr}/api/v1/telemetry"))).await;
    let resp = post_json(
        format!("{}/v1/completions", s.prefill),
        json!({"prompt": "x"}),
    )
    .await;
    assert_eq!(resp.status(), 200, "a lost event does not fail the prefill");
    eventually("failed post", || s.sim.telemetry_posts().len() == 1).await;
    assert_eq!(s.sim.telemetry_posts()[0].status, 0);
}

#[tokio::test]
async fn unknown_model_is_404_like_vllm_and_posts_no_telemetry() {
    let (url, _receiver) = Receiver::start().await;
    let s = start(telemetry_config(url)).await;
    let resp = post_json(
        format!("{}/v1/chat/completions", s.prefill),
        json!({"model": "nope", "messages": []}),
    )
    .await;
    assert_eq!(resp.status(), 404);
    assert_eq!(resp.headers()["content-type"], "application/json");
    let v = parse(&resp.text().await.unwrap());
    let err = &v["error"];
    assert!(
        err["message"]
            .as_str()
            .unwrap()
            .starts_with("The model `nope` does not exist."),
        "{v}"
    );
    assert_eq!(err["type"], "NotFoundError");
    assert_eq!(err["param"], "model");
    assert_eq!(err["code"], 404);

    // A valid request afterwards: its event is the only one.
    reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", s.prefill))
        .header("x-request-id", "good")
        .json(&json!({"messages": []}))
        .send()
        .await
        .unwrap();
    eventually("telemetry", || !s.sim.telemetry_posts().is_empty()).await;
    let posts = s.sim.telemetry_posts();
    assert_eq!(posts.len(), 1);
    assert!(posts[0].payload["request_ids_set"][0]
        .as_str()
        .unwrap()
        .starts_with("chatcmpl-good"));
    assert_eq!(
        s.sim.prefill_requests().len(),
        2,
        "invalid requests are recorded too"
    );
}

#[tokio::test]
async fn invalid_requests_are_400_with_vllm_error_bodies_and_no_telemetry() {
    let (url, _receiver) = Receiver::start().await;
    let s = start(telemetry_config(url)).await;
    let chat = format!("{}/v1/chat/completions", s.prefill);
    let cmpl = format!("{}/v1/completions", s.prefill);
    let msgs = json!([{"role": "user", "content": "hi"}]);
    let cases: Vec<(&str, &str, String, Option<&str>)> = vec![
        (
            "max_tokens 0",
            &chat,
            json!({"messages": msgs, "max_tokens": 0}).to_string(),
            Some("max_tokens"),
        ),
        (
            "max_tokens -1",
            &cmpl,
            json!({"prompt": "x", "max_tokens": -1}).to_string(),
            Some("max_tokens"),
        ),
        (
            "max_completion_tokens 0",
            &chat,
            json!({"messages": msgs, "max_completion_tokens": 0}).to_string(),
            Some("max_tokens"),
        ),
        (
            "min > max",
            &chat,
            json!({"messages": msgs, "max_tokens": 2, "min_tokens": 5}).to_string(),
            Some("min_tokens"),
        ),
        (
            "stream_options without stream",
            &chat,
            json!({"messages": msgs, "stream_options": {"include_usage": true}}).to_string(),
            None,
        ),
        (
            "stream_options with stream false",
            &cmpl,
            json!({"prompt": "x", "stream": false, "stream_options": {}}).to_string(),
            None,
        ),
        ("malformed JSON", &chat, "{\"messages\": [".to_owned(), None),
        ("not an object", &cmpl, "[1, 2]".to_owned(), None),
        (
            "chat without messages",
            &chat,
            json!({"model": "sim-model"}).to_string(),
            None,
        ),
        (
            "messages not a list",
            &chat,
            json!({"messages": "hi"}).to_string(),
            None,
        ),
        (
            "completions without prompt",
            &cmpl,
            json!({"max_tokens": 1}).to_string(),
            None,
        ),
        (
            "empty prompt list",
            &cmpl,
            json!({"prompt": []}).to_string(),
            None,
        ),
        (
            "mixed prompt list",
            &cmpl,
            json!({"prompt": ["a", 1]}).to_string(),
            None,
        ),
        (
            "stream not a bool",
            &cmpl,
            json!({"prompt": "x", "stream": "yes"}).to_string(),
            None,
        ),
        (
            "max_tokens not an int",
            &cmpl,
            json!({"prompt": "x", "max_tokens": "ten"}).to_string(),
            None,
        ),
    ];
    let client = reqwest::Client::new();
    for (name, url, body, param) in &cases {
        let resp = client
            .post(*url)
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 400, "{name}");
        assert_eq!(resp.headers()["content-type"], "application/json", "{name}");
        let v: Value = serde_json::from_str(&resp.text().await.unwrap()).expect(name);
        let err = &v["error"];
        assert_eq!(err["code"], 400, "{name}: {v}");
        assert!(
            err["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{name}"
        );
        assert!(err["type"].is_string(), "{name}");
        if let Some(param) = param {
            assert_eq!(err["param"], *param, "{name}: {v}");
            assert_eq!(err["type"], "BadRequestError", "{name}");
        }
    }
    let v = parse(
        &client
            .post(cmpl.as_str())
            .json(&json!({"prompt": "x", "max_tokens": -1}))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
    );
    assert_eq!(
        v["error"]["message"],
        "max_tokens must be at least 1, got -1. (parameter=max_tokens, value=-1)",
        "vLLM's exact message (err400.json)"
    );

    client
        .post(cmpl.as_str())
        .header("x-request-id", "valid")
        .json(&json!({"prompt": "x"}))
        .send()
        .await
        .unwrap();
    eventually("telemetry", || !s.sim.telemetry_posts().is_empty()).await;
    let posts = s.sim.telemetry_posts();
    assert_eq!(posts.len(), 1, "only the valid request posts telemetry");
    assert!(posts[0].payload["request_ids_set"][0]
        .as_str()
        .unwrap()
        .starts_with("cmpl-valid-0"));
}

#[tokio::test]
async fn default_and_min_tokens_decide_the_length() {
    let s = start(SimConfig {
        default_tokens: 4,
        ..SimConfig::default()
    })
    .await;
    let url = format!("{}/v1/completions", s.decode);
    let v = parse(
        &post_json(url.clone(), json!({"prompt": "x"}))
            .await
            .text()
            .await
            .unwrap(),
    );
    assert_eq!(v["usage"]["completion_tokens"], 4);
    let v = parse(
        &post_json(url.clone(), json!({"prompt": "x", "min_tokens": 6}))
            .await
            .text()
            .await
            .unwrap(),
    );
    assert_eq!(
        v["usage"]["completion_tokens"], 6,
        "min_tokens over the default"
    );
    let v = parse(
        &post_json(
            url,
            json!({"prompt": "x", "max_tokens": 9, "min_tokens": 9}),
        )
        .await
        .text()
        .await
        .unwrap(),
    );
    assert_eq!(v["usage"]["completion_tokens"], 9);
}

#[tokio::test]
async fn injected_errors_answer_with_status_and_openai_body() {
    let (url, _receiver) = Receiver::start().await;
    let s = start(SimConfig {
        prefill_error: Some(503),
        decoder_error: Some(500),
        ..telemetry_config(url)
    })
    .await;
    let resp = post_json(
        format!("{}/v1/completions", s.prefill),
        json!({"prompt": "x"}),
    )
    .await;
    assert_eq!(resp.status(), 503);
    let v = parse(&resp.text().await.unwrap());
    assert_eq!(v["error"]["code"], 503);
    assert_eq!(v["error"]["type"], "ServiceUnavailableError");

    let resp = post_json(
        format!("{}/v1/chat/completions", s.decode),
        json!({"messages": [], "stream": true}),
    )
    .await;
    assert_eq!(resp.status(), 500);
    assert_eq!(
        resp.headers()["content-type"],
        "application/json",
        "errors are JSON, not SSE"
    );
    assert_eq!(parse(&resp.text().await.unwrap())["error"]["code"], 500);
    assert_eq!(s.sim.prefill_requests().len(), 1);
    assert_eq!(s.sim.decode_requests().len(), 1);
    assert_eq!(s.sim.decode_streams_completed(), 0);
    assert_eq!(s.sim.telemetry_posts().len(), 0);
}

#[tokio::test]
async fn die_after_tokens_breaks_the_stream() {
    let s = start(SimConfig {
        die_after_tokens: Some(2),
        ..SimConfig::default()
    })
    .await;
    let mut resp = post_json(
        format!("{}/v1/chat/completions", s.decode),
        json!({"messages": [], "max_tokens": 10, "stream": true}),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let mut data = Vec::new();
    let failed = loop {
        match resp.chunk().await {
            Ok(Some(chunk)) => data.extend_from_slice(&chunk),
            Ok(None) => break false,
            Err(_) => break true,
        }
    };
    assert!(failed, "the client must see a body error, got a clean end");
    let text = String::from_utf8(data).unwrap();
    assert!(!text.contains("[DONE]"));
    let (evs, _) = events(&text);
    assert_eq!(evs.len(), 3, "role chunk + 2 tokens: {text}");
    assert_eq!(s.sim.decode_streams_completed(), 0);
    assert_eq!(
        s.sim.decode_streams_cancelled(),
        0,
        "an engine death is not a client cancel"
    );
}

#[tokio::test]
async fn client_dropping_a_stream_counts_as_cancelled() {
    let s = start(SimConfig {
        token_delay: Duration::from_millis(10),
        ..SimConfig::default()
    })
    .await;
    let mut resp = post_json(
        format!("{}/v1/chat/completions", s.decode),
        json!({"messages": [], "max_tokens": 10000, "stream": true}),
    )
    .await;
    let first = resp.chunk().await.unwrap().expect("a first event");
    assert!(first.starts_with(b"data: "));
    drop(resp);
    eventually("cancel", || s.sim.decode_streams_cancelled() == 1).await;
    assert_eq!(s.sim.decode_streams_completed(), 0);
}

/// Sends a completions request on a raw connection, so the test decides
/// exactly when the client goes away.
async fn raw_request(base: &str, body: &str) -> tokio::net::TcpStream {
    let addr = base.strip_prefix("http://").unwrap();
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "POST /v1/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    conn.write_all(request.as_bytes()).await.unwrap();
    conn
}

#[tokio::test]
async fn client_leaving_before_a_non_stream_decode_answers_counts_cancelled() {
    let s = start(SimConfig {
        first_token_delay: Duration::from_secs(30),
        ..SimConfig::default()
    })
    .await;
    let conn = raw_request(&s.decode, r#"{"prompt":"x"}"#).await;
    eventually("request arrival", || s.sim.decode_requests().len() == 1).await;
    assert_eq!(s.sim.decode_streams_cancelled(), 0);
    drop(conn);
    eventually("decode cancel", || s.sim.decode_streams_cancelled() == 1).await;
    assert_eq!(s.sim.decode_streams_completed(), 0);
}

#[tokio::test]
async fn each_sse_event_is_its_own_body_frame() {
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    let sim = Sim::new(SimConfig::default());
    let request = axum::http::Request::post("/v1/chat/completions")
        .header("content-type", "application/json")
        .body(axum::body::Body::from(
            json!({"messages": [], "max_tokens": 3, "stream": true,
                   "stream_options": {"include_usage": true}})
            .to_string(),
        ))
        .unwrap();
    let response = sim.decoder_router().oneshot(request).await.unwrap();
    let mut body = response.into_body();
    let mut frames = Vec::new();
    while let Some(frame) = body.frame().await {
        frames.push(frame.unwrap().into_data().unwrap());
    }
    // role + 3 tokens + usage + [DONE], one per frame.
    assert_eq!(frames.len(), 6);
    for frame in &frames {
        let text = std::str::from_utf8(frame).unwrap();
        assert!(
            text.starts_with("data: ") && text.ends_with("\n\n"),
            "{text:?}"
        );
        assert_eq!(
            text.matches("\n\n").count(),
            1,
            "one event per frame: {text:?}"
        );
    }
    assert_eq!(&frames[5][..], b"data: [DONE]\n\n");
    assert_eq!(sim.decode_streams_completed(), 1);
}

#[tokio::test]
async fn client_leaving_during_prefill_counts_prefills_cancelled() {
    let (url, receiver) = Receiver::start().await;
    let s = start(SimConfig {
        prefill_delay: Duration::from_secs(30),
        ..telemetry_config(url)
    })
    .await;
    let conn = raw_request(&s.prefill, r#"{"prompt":"x","max_tokens":1}"#).await;
    eventually("request arrival", || s.sim.prefill_requests().len() == 1).await;
    assert_eq!(s.sim.prefills_cancelled(), 0);
    drop(conn);
    eventually("prefill cancel", || s.sim.prefills_cancelled() == 1).await;
    assert!(
        receiver.payloads().is_empty(),
        "an abandoned prefill stores nothing"
    );
}

#[tokio::test]
async fn health_models_metrics_and_unknown_routes() {
    let s = start(SimConfig {
        model: "m1".to_owned(),
        ..SimConfig::default()
    })
    .await;
    let client = reqwest::Client::new();
    for base in [&s.prefill, &s.decode] {
        let resp = client.get(format!("{base}/health")).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        assert!(resp.bytes().await.unwrap().is_empty());

        let v = parse(
            &client
                .get(format!("{base}/v1/models"))
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap(),
        );
        assert_eq!(v["object"], "list");
        assert_eq!(v["data"][0]["id"], "m1");
        assert_eq!(v["data"][0]["object"], "model");

        let text = client
            .get(format!("{base}/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(
            text.contains("# TYPE pdsim_requests_total counter"),
            "{text}"
        );

        let resp = client.get(format!("{base}/nope")).send().await.unwrap();
        assert_eq!(resp.status(), 404);
        assert_eq!(resp.text().await.unwrap(), r#"{"detail":"Not Found"}"#);
        let resp = client
            .get(format!("{base}/v1/completions"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 405);
    }
}

#[tokio::test]
async fn record_off_keeps_no_logs_but_still_serves() {
    let (url, _receiver) = Receiver::start().await;
    let s = start(SimConfig {
        record: false,
        ..telemetry_config(url)
    })
    .await;
    let resp = post_json(
        format!("{}/v1/completions", s.prefill),
        json!({"prompt": "x"}),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let resp = post_json(
        format!("{}/v1/completions", s.decode),
        json!({"prompt": "x"}),
    )
    .await;
    assert_eq!(resp.status(), 200);
    resp.bytes().await.unwrap();
    assert!(s.sim.prefill_requests().is_empty());
    assert!(s.sim.decode_requests().is_empty());
    assert_eq!(s.sim.decode_streams_completed(), 1, "counters are kept");
}

//! The proxy's request path end to end: real sockets, pd-sim upstreams.

mod common;

use std::time::{Duration, Instant};

use common::*;
use futures_util::StreamExt;
use pd_sim::SimConfig;
use serde_json::{json, Value};

#[tokio::test]
async fn chat_stream_is_relayed_and_the_prefill_copy_is_rewritten() {
    let s = start(SimConfig::default(), &[]).await;
    let mut body = chat_body(true);
    body["stream_options"] = json!({"include_usage": true});
    body["max_completion_tokens"] = json!(8);
    body["min_tokens"] = json!(4);
    body["n"] = json!(1);
    let resp = s
        .client
        .post(format!("{}/v1/chat/completions", s.url))
        .header("x-request-id", "client-chose-this")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()["content-type"],
        "text/event-stream; charset=utf-8"
    );
    let id = resp.headers()["x-request-id"].to_str().unwrap().to_owned();
    assert_eq!(id.len(), 32);
    assert!(!id.contains('-'));
    let text = resp.text().await.unwrap();
    let events = sse_data(&text);
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert!(
        chunks.last().unwrap()["usage"].is_object(),
        "usage chunk relayed"
    );

    let prefills = s.prefiller.prefill_requests();
    assert_eq!(prefills.len(), 1);
    let ids: Vec<_> = prefills[0].headers.get_all("x-request-id").iter().collect();
    assert_eq!(ids, [id.as_str()], "X-Request-Id replaced, not added");
    let copy: Value = serde_json::from_slice(&prefills[0].body).unwrap();
    assert_eq!(copy["max_tokens"], 1);
    assert_eq!(copy["max_completion_tokens"], 1);
    assert_eq!(copy["min_tokens"], 1);
    assert_eq!(copy["stream"], false);
    assert_eq!(copy["n"], 1);
    assert!(copy.get("stream_options").is_none());
    assert_eq!(copy["messages"], body["messages"]);

    let decodes = s.decoder.decode_requests();
    assert_eq!(decodes.len(), 1);
    assert_eq!(
        decodes[0].body,
        serde_json::to_vec(&body).unwrap(),
        "decoder gets the client's bytes unchanged"
    );
    assert_eq!(decodes[0].headers["x-request-id"], id.as_str());
    assert!(
        chunks.iter().all(|c| c["id"] == format!("chatcmpl-{id}")),
        "the response id carries the proxy's id"
    );
    assert_eq!(s.decoder.decode_streams_completed(), 1);
    s.assert_drained().await;
}

#[tokio::test]
async fn chat_without_stream_returns_the_decoders_json() {
    let s = start(SimConfig::default(), &[]).await;
    let resp = s.post("/v1/chat/completions", chat_body(false)).await;
    assert_eq!(resp.status(), 200);
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/json"));
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["choices"][0]["message"]["role"], "assistant");
    assert_eq!(body["usage"]["completion_tokens"], 8);
    s.assert_drained().await;
}

#[tokio::test]
async fn sse_frames_reach_the_client_as_the_decoder_sends_them() {
    let s = start(
        SimConfig {
            token_delay: Duration::from_millis(300),
            ..Default::default()
        },
        &[],
    )
    .await;
    let mut body = chat_body(true);
    body["max_tokens"] = json!(3);
    let resp = s.post("/v1/chat/completions", body).await;
    let mut stream = resp.bytes_stream();
    let started = Instant::now();
    let first = stream.next().await.unwrap().unwrap();
    // The first event arrives long before the decoder has finished: no
    // buffering of the stream in the proxy.
    assert!(
        started.elapsed() < Duration::from_millis(250),
        "{:?}",
        started.elapsed()
    );
    assert!(first.starts_with(b"data: "));
    let mut rest = Vec::new();
    while let Some(chunk) = stream.next().await {
        rest.extend_from_slice(&chunk.unwrap());
    }
    assert!(rest.ends_with(b"data: [DONE]\n\n"));
}

#[tokio::test]
async fn telemetry_that_beats_the_prefill_response_still_releases() {
    let s = start(
        SimConfig {
            telemetry_before_response: true,
            ..Default::default()
        },
        &["--kv-ready-timeout", "5", "--on-kv-timeout", "fail"],
    )
    .await;
    let resp = s.post("/v1/chat/completions", chat_body(false)).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(s.metric("pd_proxy_kv_ready_timeouts_total").await, 0.0);
    let posts = s.prefiller.telemetry_posts();
    assert_eq!(posts.len(), 1);
    assert_eq!(posts[0].status, 200);
    s.assert_drained().await;
}

#[tokio::test]
async fn decode_waits_for_the_last_tp_rank() {
    let stagger = Duration::from_millis(150);
    let s = start(
        SimConfig {
            world_size: 4,
            rank_stagger: stagger,
            ..Default::default()
        },
        &["--kv-ready-timeout", "10", "--on-kv-timeout", "fail"],
    )
    .await;
    let resp = s.post("/v1/chat/completions", chat_body(false)).await;
    assert_eq!(resp.status(), 200);
    let prefill_at = s.prefiller.prefill_requests()[0].at;
    let decode_at = s.decoder.decode_requests()[0].at;
    // Rank 3 posts 3 × stagger after rank 0.
    assert!(
        decode_at.duration_since(prefill_at) >= stagger * 3,
        "decode started {:?} after prefill",
        decode_at.duration_since(prefill_at)
    );
    let posts = s.prefiller.telemetry_posts();
    let mut ranks: Vec<u64> = posts
        .iter()
        .map(|p| p.payload["kv_rank"].as_u64().unwrap())
        .collect();
    ranks.sort();
    assert_eq!(ranks, [0, 1, 2, 3]);
    assert_eq!(s.metric("pd_proxy_kv_ready_timeouts_total").await, 0.0);
}

#[tokio::test]
async fn a_missing_rank_is_not_released_by_the_others() {
    let s = start(
        SimConfig {
            world_size: 2,
            drop_ranks: vec![1],
            duplicate_telemetry: true,
            ..Default::default()
        },
        &["--kv-ready-timeout", "0.5", "--on-kv-timeout", "fail"],
    )
    .await;
    let resp = s.post("/v1/chat/completions", chat_body(true)).await;
    assert_eq!(resp.status(), 504);
    let body: Value = resp.json().await.unwrap();
    let message = assert_openai_error(&body, 504);
    assert!(message.contains("--kv-ready-timeout"), "{message}");
    assert!(s.decoder.decode_requests().is_empty());
    assert_eq!(s.metric("pd_proxy_kv_ready_timeouts_total").await, 1.0);
    s.assert_drained().await;
}

#[tokio::test]
async fn lost_telemetry_with_the_decode_policy_still_answers() {
    let s = start(
        SimConfig {
            drop_ranks: vec![0],
            ..Default::default()
        },
        &["--kv-ready-timeout", "0.3"],
    )
    .await;
    let started = Instant::now();
    let resp = s.post("/v1/chat/completions", chat_body(true)).await;
    assert_eq!(resp.status(), 200);
    let text = resp.text().await.unwrap();
    assert!(text.ends_with("data: [DONE]\n\n"));
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_eq!(s.decoder.decode_requests().len(), 1);
    assert_eq!(s.metric("pd_proxy_kv_ready_timeouts_total").await, 1.0);
    s.assert_drained().await;
}

#[tokio::test]
async fn completions_batch_waits_for_every_prompt() {
    let s = start(
        SimConfig {
            world_size: 2,
            ..Default::default()
        },
        &["--kv-ready-timeout", "5", "--on-kv-timeout", "fail"],
    )
    .await;
    let resp = s
        .post(
            "/v1/completions",
            json!({"model":"sim-model","prompt":["one","two","three"],"max_tokens":4,"stream":true}),
        )
        .await;
    assert_eq!(resp.status(), 200);
    let text = resp.text().await.unwrap();
    let events = sse_data(&text);
    assert_eq!(events.last().unwrap(), "[DONE]");
    let mut indexes: Vec<u64> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str::<Value>(e).unwrap())
        .filter_map(|c| c["choices"][0]["index"].as_u64())
        .collect();
    indexes.sort();
    indexes.dedup();
    assert_eq!(indexes, [0, 1, 2]);
    let ids: Vec<String> = s
        .prefiller
        .telemetry_posts()
        .iter()
        .flat_map(|p| p.payload["request_ids_set"].as_array().unwrap().clone())
        .map(|v| v.as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ids.len(), 6, "3 prompts × 2 ranks: {ids:?}");
    assert!(ids.iter().all(|i| i.starts_with("cmpl-")));
    assert_eq!(s.metric("pd_proxy_telemetry_unknown_ids_total").await, 0.0);
    s.assert_drained().await;
}

#[tokio::test]
async fn a_batch_with_one_prompt_missing_times_out() {
    // The sim loses its own telemetry; the test posts for 2 of the 3
    // prompts by hand, which must not release the batch.
    let s = start(
        SimConfig {
            drop_ranks: vec![0],
            ..Default::default()
        },
        &["--kv-ready-timeout", "2", "--on-kv-timeout", "fail"],
    )
    .await;
    let client = s.client.clone();
    let url = format!("{}/v1/completions", s.url);
    let request = tokio::spawn(async move {
        client
            .post(url)
            .json(&json!({"model":"sim-model","prompt":["a","b","c"],"max_tokens":2}))
            .send()
            .await
            .unwrap()
    });
    wait_until("the prefill", || async {
        !s.prefiller.prefill_requests().is_empty()
    })
    .await;
    let id = s.prefiller.prefill_requests()[0].headers["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    let post = |ids: Vec<String>| {
        let client = s.client.clone();
        let url = s.telemetry_url.clone();
        async move {
            client
                .post(url)
                .json(&json!({"event":"request_store_finished","request_ids_set":ids,"model_name":"sim-model","world_size":1,"kv_rank":0}))
                .send()
                .await
                .unwrap()
                .json::<Value>()
                .await
                .unwrap()
        }
    };
    let reply = post(vec![
        format!("cmpl-{id}-0-deadbeef"),
        format!("cmpl-{id}-2-0badf00d"),
    ])
    .await;
    assert_eq!(reply, json!({"status":"ok","notified":2,"total":2}));
    let resp = request.await.unwrap();
    assert_eq!(resp.status(), 504, "prompt 1 never reported");
    assert!(s.decoder.decode_requests().is_empty());
    s.assert_drained().await;
}

#[tokio::test]
async fn prefiller_4xx_reaches_the_client_unchanged_and_nothing_is_decoded() {
    let s = start(SimConfig::default(), &[]).await;
    let mut body = chat_body(true);
    body["model"] = json!("nope");
    let resp = s.post("/v1/chat/completions", body).await;
    assert_eq!(resp.status(), 404);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["type"], "NotFoundError");
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("`nope`"));
    assert!(s.decoder.decode_requests().is_empty());
    s.assert_drained().await;
}

#[tokio::test]
async fn prefiller_5xx_is_a_502() {
    let s = start(
        SimConfig {
            prefill_error: Some(500),
            ..Default::default()
        },
        &[],
    )
    .await;
    let resp = s.post("/v1/chat/completions", chat_body(true)).await;
    assert_eq!(resp.status(), 502);
    let message = assert_openai_error(&resp.json().await.unwrap(), 502);
    assert!(message.contains("prefill"), "{message}");
    assert!(s.decoder.decode_requests().is_empty());
    let m = s.metrics().await;
    assert_eq!(
        metric_value(&m, "pd_proxy_upstream_errors_total{leg=\"prefill\"}"),
        1.0
    );
    s.assert_drained().await;
}

#[tokio::test]
async fn unreachable_prefiller_is_a_502() {
    let dead = dead_port().await;
    let s = start_with(SimConfig::default(), &[], |_, d| {
        Some(upstream_flags("127.0.0.1", dead, "127.0.0.1", d))
    })
    .await;
    let resp = s.post("/v1/chat/completions", chat_body(false)).await;
    assert_eq!(resp.status(), 502);
    assert_openai_error(&resp.json().await.unwrap(), 502);
    s.assert_drained().await;
}

#[tokio::test]
async fn unreachable_decoder_is_a_502() {
    let dead = dead_port().await;
    let s = start_with(SimConfig::default(), &[], |p, _| {
        Some(upstream_flags("127.0.0.1", p, "127.0.0.1", dead))
    })
    .await;
    let resp = s.post("/v1/chat/completions", chat_body(true)).await;
    assert_eq!(resp.status(), 502);
    let message = assert_openai_error(&resp.json().await.unwrap(), 502);
    assert!(message.contains("decode"), "{message}");
    let m = s.metrics().await;
    assert_eq!(
        metric_value(&m, "pd_proxy_upstream_errors_total{leg=\"decode\"}"),
        1.0
    );
}

#[tokio::test]
async fn decoder_5xx_is_a_502_not_an_empty_200() {
    let s = start(
        SimConfig {
            decoder_error: Some(500),
            ..Default::default()
        },
        &[],
    )
    .await;
    let resp = s.post("/v1/chat/completions", chat_body(true)).await;
    assert_eq!(resp.status(), 502);
    assert_openai_error(&resp.json().await.unwrap(), 502);
}

#[tokio::test]
async fn decoder_dying_mid_stream_ends_the_sse_with_an_error_event() {
    let s = start(
        SimConfig {
            die_after_tokens: Some(3),
            ..Default::default()
        },
        &[],
    )
    .await;
    let resp = s.post("/v1/chat/completions", chat_body(true)).await;
    assert_eq!(resp.status(), 200);
    let text = resp.text().await.unwrap();
    let events = sse_data(&text);
    assert_eq!(events.last().unwrap(), "[DONE]");
    let error: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert_openai_error(&error, 502);
    assert!(
        events.len() >= 4,
        "tokens before the break were relayed: {events:?}"
    );
    let m = s.metrics().await;
    assert_eq!(
        metric_value(&m, "pd_proxy_upstream_errors_total{leg=\"decode\"}"),
        1.0
    );
}

#[tokio::test]
async fn client_leaving_while_parked_frees_the_entry_and_skips_the_decode() {
    let s = start(
        SimConfig {
            drop_ranks: vec![0],
            ..Default::default()
        },
        &["--kv-ready-timeout", "60"],
    )
    .await;
    let client = s.client.clone();
    let url = format!("{}/v1/chat/completions", s.url);
    let request = tokio::spawn(async move { client.post(url).json(&chat_body(true)).send().await });
    wait_until("the request to park", || async {
        s.metric("pd_proxy_pending_requests").await == 1.0
            && !s.prefiller.prefill_requests().is_empty()
    })
    .await;
    request.abort();
    let _ = request.await;
    s.assert_drained().await;
    wait_until("the disconnect to be counted", || async {
        s.metric("pd_proxy_client_disconnects_total").await == 1.0
    })
    .await;
    assert!(s.decoder.decode_requests().is_empty());
}

#[tokio::test]
async fn client_leaving_during_prefill_aborts_the_prefill() {
    let s = start(
        SimConfig {
            prefill_delay: Duration::from_secs(30),
            ..Default::default()
        },
        &[],
    )
    .await;
    let client = s.client.clone();
    let url = format!("{}/v1/chat/completions", s.url);
    let request = tokio::spawn(async move { client.post(url).json(&chat_body(true)).send().await });
    wait_until("the prefill to start", || async {
        !s.prefiller.prefill_requests().is_empty()
    })
    .await;
    request.abort();
    let _ = request.await;
    wait_until("the prefiller to see its request dropped", || async {
        s.prefiller.prefills_cancelled() == 1
    })
    .await;
    s.assert_drained().await;
}

#[tokio::test]
async fn client_leaving_mid_stream_closes_the_decoder_stream() {
    let s = start(
        SimConfig {
            token_delay: Duration::from_millis(20),
            ..Default::default()
        },
        &[],
    )
    .await;
    let mut body = chat_body(true);
    body["max_tokens"] = json!(500);
    let resp = s.post("/v1/chat/completions", body).await;
    let mut stream = resp.bytes_stream();
    let first = stream.next().await.unwrap().unwrap();
    assert!(first.starts_with(b"data: "));
    drop(stream);
    wait_until("the decoder to see the close", || async {
        s.decoder.decode_streams_cancelled() == 1
    })
    .await;
    assert_eq!(s.decoder.decode_streams_completed(), 0);
    s.assert_drained().await;
    wait_until("the disconnect to be counted", || async {
        s.metric("pd_proxy_client_disconnects_total").await == 1.0
    })
    .await;
}

#[tokio::test]
async fn bad_json_is_a_400_and_nothing_goes_upstream() {
    let s = start(SimConfig::default(), &[]).await;
    for raw in ["{\"model\": ", "[1,2,3]", "{\"stream\": \"yes\"}"] {
        let resp = s
            .client
            .post(format!("{}/v1/chat/completions", s.url))
            .header("content-type", "application/json")
            .body(raw)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 400, "{raw}");
        assert_openai_error(&resp.json().await.unwrap(), 400);
    }
    assert!(s.prefiller.prefill_requests().is_empty());
    assert!(s.decoder.decode_requests().is_empty());
    s.assert_drained().await;
}

/// Posts one request to a stack whose upstream stalls as `sim` says, under
/// `--upstream-timeout 0.3`, and checks the answer is an OpenAI-shaped 504
/// with nothing left parked. Returns the stack for the caller's own checks.
async fn stalled_upstream_is_a_504(sim: SimConfig, stream: bool) -> Stack {
    let s = start(sim, &["--upstream-timeout", "0.3"]).await;
    let resp = s.post("/v1/chat/completions", chat_body(stream)).await;
    assert_eq!(resp.status(), 504);
    assert_openai_error(&resp.json().await.unwrap(), 504);
    s.assert_drained().await;
    s
}

/// The decoder answers 200 and then sends nothing: the client gets a 504
/// in OpenAI's shape, not a 200 whose stream never starts.
#[tokio::test]
async fn decoder_stream_that_never_starts_is_a_504() {
    let s = stalled_upstream_is_a_504(
        SimConfig {
            first_token_delay: Duration::from_secs(30),
            ..Default::default()
        },
        true,
    )
    .await;
    assert_eq!(s.decoder.decode_requests().len(), 1);
}

#[tokio::test]
async fn upstream_that_never_answers_is_bounded() {
    stalled_upstream_is_a_504(
        SimConfig {
            prefill_delay: Duration::from_secs(30),
            ..Default::default()
        },
        false,
    )
    .await;
}

#[tokio::test]
async fn upstream_auth_is_the_configured_key_else_the_clients() {
    let s = start(SimConfig::default(), &["--upstream-api-key", "secret"]).await;
    let resp = s
        .client
        .post(format!("{}/v1/chat/completions", s.url))
        .bearer_auth("client-token")
        .json(&chat_body(false))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        s.prefiller.prefill_requests()[0].headers["authorization"],
        "Bearer secret"
    );
    assert_eq!(
        s.decoder.decode_requests()[0].headers["authorization"],
        "Bearer secret"
    );

    let s = start(SimConfig::default(), &[]).await;
    let resp = s
        .client
        .post(format!("{}/v1/chat/completions", s.url))
        .bearer_auth("client-token")
        .json(&chat_body(false))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        s.prefiller.prefill_requests()[0].headers["authorization"],
        "Bearer client-token"
    );
    assert_eq!(
        s.decoder.decode_requests()[0].headers["authorization"],
        "Bearer client-token"
    );
}

/// Clients close as soon as they have the whole answer (urllib after the
/// Content-Length, the OpenAI SDK after `[DONE]`); that is a completed
/// request, not a disconnect.
#[tokio::test]
async fn complete_answers_count_as_200_even_when_the_client_closes_at_once() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let s = start(SimConfig::default(), &[]).await;
    let addr = s.url.trim_start_matches("http://").to_owned();
    for (stream, end) in [(false, &b"}"[..]), (true, &b"data: [DONE]\n\n"[..])] {
        let body = serde_json::to_vec(&chat_body(stream)).unwrap();
        let mut tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let head = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        tcp.write_all(head.as_bytes()).await.unwrap();
        tcp.write_all(&body).await.unwrap();
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        // Read up to the answer's last meaningful byte, then hang up.
        loop {
            let n = tcp.read(&mut buf).await.unwrap();
            assert!(
                n > 0,
                "connection closed early: {}",
                String::from_utf8_lossy(&seen)
            );
            seen.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&seen);
            let Some((_, payload)) = text.split_once("\r\n\r\n") else {
                continue;
            };
            if stream && payload.contains("data: [DONE]\n\n") {
                break;
            }
            if !stream
                && payload
                    .trim_end()
                    .ends_with(std::str::from_utf8(end).unwrap())
            {
                break;
            }
        }
        drop(tcp);
    }
    wait_until("both requests counted", || async {
        let m = s.metrics().await;
        metric_value(
            &m,
            "pd_proxy_requests_total{endpoint=\"chat\",status=\"200\"}",
        ) == 2.0
    })
    .await;
    let m = s.metrics().await;
    assert_eq!(
        metric_value(
            &m,
            "pd_proxy_requests_total{endpoint=\"chat\",status=\"499\"}"
        ),
        0.0
    );
    assert_eq!(metric_value(&m, "pd_proxy_client_disconnects_total"), 0.0);
    s.assert_drained().await;
}

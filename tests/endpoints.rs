//! The telemetry endpoint and the proxy's own endpoints.

mod common;

use common::*;
use pd_sim::SimConfig;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test]
async fn telemetry_reply_matches_the_python_proxy_and_counts_unknown_ids() {
    let s = start(SimConfig::default(), &[]).await;
    // A line LMCache really posted (shared/captures-vllm-0.32), for a
    // request this proxy never sent.
    let captured = json!({"event": "request_store_finished", "request_ids_set": ["chatcmpl-chat-long-1-82599254", "cmpl-lmc-test-1-0-a6fff269"], "model_name": "tiny", "world_size": 1, "kv_rank": 0});
    let resp = s
        .client
        .post(&s.telemetry_url)
        .json(&captured)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let reply: Value = resp.json().await.unwrap();
    assert_eq!(reply, json!({"status":"ok","notified":0,"total":2}));
    let m = s.metrics().await;
    assert_eq!(
        metric_value(&m, "pd_proxy_telemetry_unknown_ids_total"),
        2.0
    );
    assert_eq!(
        metric_value(
            &m,
            "pd_proxy_telemetry_events_total{event=\"request_store_finished\"}"
        ),
        1.0
    );
}

#[tokio::test]
async fn malformed_telemetry_is_a_400() {
    let s = start(SimConfig::default(), &[]).await;
    for body in [
        "not json",
        "{\"event\":\"request_store_finished\"}",
        "{\"event\":\"request_store_finished\",\"request_ids_set\":\"x\"}",
        "{\"event\":\"request_store_finished\",\"request_ids_set\":[],\"world_size\":2,\"kv_rank\":2}",
        "{\"event\":\"request_store_finished\",\"request_ids_set\":[],\"world_size\":0,\"kv_rank\":0}",
    ] {
        let resp = s
            .client
            .post(&s.telemetry_url)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 400, "{body}");
        assert_openai_error(&resp.json().await.unwrap(), 400);
    }
}

/// LMCache posts with Python's urllib: a new connection per event,
/// `Connection: close`. Many in a row must all be answered.
#[tokio::test]
async fn telemetry_takes_a_new_connection_per_event() {
    let s = start(SimConfig::default(), &[]).await;
    let addr = s
        .telemetry_url
        .trim_start_matches("http://")
        .split('/')
        .next()
        .unwrap()
        .to_owned();
    let body = r#"{"event": "request_store_finished", "request_ids_set": ["chatcmpl-x"], "model_name": "m", "world_size": 1, "kv_rank": 0}"#;
    for _ in 0..200 {
        let mut tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let request = format!(
            "POST /api/v1/telemetry HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\nUser-Agent: Python-urllib/3.11\r\n\r\n{body}",
            body.len()
        );
        tcp.write_all(request.as_bytes()).await.unwrap();
        let mut reply = String::new();
        tcp.read_to_string(&mut reply).await.unwrap();
        assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
        assert!(
            reply.ends_with(r#"{"notified":0,"status":"ok","total":1}"#)
                || reply.contains("\"notified\":0"),
            "{reply}"
        );
    }
    assert_eq!(
        s.metric("pd_proxy_telemetry_unknown_ids_total").await,
        200.0
    );
}

#[tokio::test]
async fn other_telemetry_events_are_counted_not_acted_on() {
    let s = start(SimConfig::default(), &[]).await;
    let resp = s
        .client
        .post(&s.telemetry_url)
        .json(&json!({"event":"request_retrieve_finished","request_ids_set":["a"],"world_size":1,"kv_rank":0}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.json::<Value>().await.unwrap(),
        json!({"status":"ok","notified":0,"total":1})
    );
    let m = s.metrics().await;
    assert_eq!(
        metric_value(&m, "pd_proxy_telemetry_events_total{event=\"other\"}"),
        1.0
    );
}

#[tokio::test]
async fn health_and_metrics() {
    let s = start(SimConfig::default(), &[]).await;
    let resp = s.get("/health").await;
    assert_eq!(resp.status(), 200);
    assert_eq!(
        s.post("/v1/chat/completions", chat_body(true))
            .await
            .status(),
        200
    );
    let resp = s.get("/metrics").await;
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    let text = resp.text().await.unwrap();
    for name in [
        "pd_proxy_requests_total{endpoint=\"chat\",status=\"200\"} 1",
        "pd_proxy_pending_requests 0",
        "pd_proxy_prefill_duration_seconds_bucket",
        "pd_proxy_kv_ready_wait_seconds_bucket",
        "pd_proxy_decode_first_byte_seconds_bucket",
        "pd_proxy_request_duration_seconds_bucket",
        "pd_proxy_telemetry_events_total{event=\"request_store_finished\"} 1",
        "pd_proxy_upstream_errors_total{leg=\"prefill\"} 0",
        "pd_proxy_kv_ready_timeouts_total 0",
    ] {
        assert!(text.contains(name), "missing {name} in\n{text}");
    }
}

#[tokio::test]
async fn models_come_from_a_prefiller_else_a_decoder() {
    let s = start(SimConfig::default(), &[]).await;
    let body: Value = s.get("/v1/models").await.json().await.unwrap();
    assert_eq!(body["object"], "list");
    assert_eq!(body["data"][0]["id"], "sim-model");

    let dead = dead_port().await;
    let s = start_with(SimConfig::default(), &[], |_, d| {
        Some(upstream_flags("127.0.0.1", dead, "127.0.0.1", d))
    })
    .await;
    let resp = s.get("/v1/models").await;
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.json::<Value>().await.unwrap()["data"][0]["id"],
        "sim-model"
    );

    let dead2 = dead_port().await;
    let s = start_with(SimConfig::default(), &[], |_, _| {
        Some(upstream_flags("127.0.0.1", dead, "127.0.0.1", dead2))
    })
    .await;
    let resp = s.get("/v1/models").await;
    assert_eq!(resp.status(), 502);
    assert_openai_error(&resp.json().await.unwrap(), 502);
}

#[tokio::test]
async fn unknown_routes_and_methods_answer_in_openai_shape() {
    let s = start(SimConfig::default(), &[]).await;
    let resp = s.get("/v1/nope").await;
    assert_eq!(resp.status(), 404);
    assert_openai_error(&resp.json().await.unwrap(), 404);
    let resp = s.get("/v1/chat/completions").await;
    assert_eq!(resp.status(), 405);
    assert_openai_error(&resp.json().await.unwrap(), 405);
    let resp = s.client.get(&s.telemetry_url).send().await.unwrap();
    assert_eq!(resp.status(), 405);
}

#[tokio::test]
async fn oversized_bodies_are_refused_before_upstream() {
    let s = start(SimConfig::default(), &["--max-body-bytes", "65536"]).await;
    let huge = vec![b' '; 65536 + 1];
    let resp = s
        .client
        .post(format!("{}/v1/chat/completions", s.url))
        .header("content-type", "application/json")
        .body(huge)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 413);
    assert_openai_error(&resp.json().await.unwrap(), 413);
    assert!(s.prefiller.prefill_requests().is_empty());
}

#[tokio::test]
async fn shutdown_drains_in_flight_streams_then_returns() {
    use futures_util::StreamExt;

    let mut s = start(
        SimConfig {
            token_delay: std::time::Duration::from_millis(20),
            ..Default::default()
        },
        &[],
    )
    .await;
    let mut body = chat_body(true);
    body["max_tokens"] = json!(20);
    let mut stream = s.post("/v1/chat/completions", body).await.bytes_stream();
    let first = stream.next().await.unwrap().unwrap();
    assert!(first.starts_with(b"data: "));
    let shutdown = s.shutdown();
    let drain = async {
        let mut rest = Vec::new();
        while let Some(chunk) = stream.next().await {
            rest.extend_from_slice(&chunk.unwrap());
        }
        rest
    };
    let (served, rest) = tokio::join!(shutdown, drain);
    served.unwrap();
    assert!(
        rest.ends_with(b"data: [DONE]\n\n"),
        "the in-flight stream finished"
    );
    assert!(
        reqwest::get(format!("{}/health", s.url)).await.is_err(),
        "no longer accepting"
    );
}

/// One streamed chat over h2c (prior knowledge) on `io`, as a gateway in
/// front of the proxy would send it; returns the SSE body.
async fn h2c_chat<I>(io: I, url: &str) -> String
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    use http_body_util::{BodyExt, Full};

    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(io),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let req = http::Request::post(format!("{url}/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(Full::new(bytes::Bytes::from(chat_body(true).to_string())))
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.version(), http::Version::HTTP_2);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8(body.to_vec()).unwrap()
}

fn api_addr(s: &Stack) -> String {
    s.url.trim_start_matches("http://").to_owned()
}

#[tokio::test]
async fn h2c_clients_are_served_on_the_api_port() {
    let s = start(SimConfig::default(), &[]).await;
    let tcp = tokio::net::TcpStream::connect(api_addr(&s)).await.unwrap();
    let body = h2c_chat(tcp, &s.url).await;
    let events = sse_data(&body);
    assert_eq!(events.last().unwrap(), "[DONE]");
    let tokens = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str::<Value>(e).unwrap())
        .filter(|c| {
            c["choices"][0]["delta"]["content"]
                .as_str()
                .is_some_and(|t| !t.is_empty())
        })
        .count();
    assert_eq!(tokens, 8, "every token of max_tokens 8: {body}");
    assert_eq!(s.prefiller.prefill_requests().len(), 1, "prefilled first");
    s.assert_drained().await;
}

/// Hands its first write to the socket 5 bytes only, so the h2c preface
/// usually reaches the proxy in two segments and its first look at the
/// connection cannot tell the protocol yet.
struct SplitFirstWrite {
    tcp: tokio::net::TcpStream,
    split: bool,
}

impl tokio::io::AsyncRead for SplitFirstWrite {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.tcp).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for SplitFirstWrite {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let n = if std::mem::take(&mut self.split) {
            buf.len().min(5)
        } else {
            buf.len()
        };
        std::pin::Pin::new(&mut self.tcp).poll_write(cx, &buf[..n])
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}

#[tokio::test]
async fn an_h2c_preface_split_across_segments_is_still_served() {
    let s = start(SimConfig::default(), &[]).await;
    let tcp = tokio::net::TcpStream::connect(api_addr(&s)).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    let body = h2c_chat(SplitFirstWrite { tcp, split: true }, &s.url).await;
    assert!(body.ends_with("data: [DONE]\n\n"), "{body}");
    s.assert_drained().await;
}

#[tokio::test]
async fn shutdown_does_not_wait_for_a_connection_that_never_spoke() {
    let mut s = start(SimConfig::default(), &[]).await;
    let mut silent = tokio::net::TcpStream::connect(api_addr(&s)).await.unwrap();
    // Connections are accepted in order: once a later one is answered, the
    // silent one is open on the proxy's side too.
    assert_eq!(s.get("/health").await.status(), 200);
    // The drain allows 30 s; `shutdown` fails the test after 10.
    s.shutdown().await.unwrap();
    let mut byte = [0u8; 1];
    let read = tokio::time::timeout(std::time::Duration::from_secs(5), silent.read(&mut byte))
        .await
        .expect("the silent connection is closed, not left open");
    assert!(
        matches!(read, Ok(0)) || read.is_err(),
        "closed without an answer: {read:?}"
    );
}

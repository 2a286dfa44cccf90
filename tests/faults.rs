//! Faults and abuse that must neither take the proxy down nor hang a
//! client: bodies that never end, decoders that stall, clients that stop
//! reading, floods past the caps, requests hyper cannot parse, shutdowns.
//! Every case runs over real sockets with small bounds, so a bound that
//! did not hold fails the test by its own (larger) timeout.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{assert_openai_error, bind, chat_body, metric_value, sse_data, start, start_with};
use pd_sim::SimConfig;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A bound no healthy test gets near; a hang fails here.
const HANG: Duration = Duration::from_secs(10);

/// Writes `request` on a fresh connection and reads until the proxy
/// closes it (or `HANG` passes).
async fn raw(addr: &str, request: &[u8]) -> String {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(request).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(HANG, tcp.read_to_end(&mut out))
        .await
        .expect("the proxy answers and closes");
    String::from_utf8_lossy(&out).into_owned()
}

fn host(url: &str) -> &str {
    url.trim_start_matches("http://")
}

/// The status and JSON body of a raw HTTP/1.1 answer.
fn parse_answer(answer: &str) -> (u16, Value) {
    let status = answer
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line: {answer:?}"));
    let (_, body) = answer.split_once("\r\n\r\n").unwrap();
    let json = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body:?}"));
    (status, json)
}

/// What a scripted decoder does with a completions request, given its
/// socket once the request has been read.
type Script = Arc<dyn Fn(TcpStream) -> tokio::task::JoinHandle<()> + Send + Sync>;

/// A decoder that answers `GET`s (health checks) with 200 and every
/// `POST` by running `script` on the socket.
async fn scripted_decoder(script: Script) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((mut tcp, _)) = listener.accept().await else {
                return;
            };
            let script = Arc::clone(&script);
            tokio::spawn(async move {
                loop {
                    let Some(head) = read_head(&mut tcp).await else {
                        return;
                    };
                    if head.starts_with("GET") {
                        let ok = "HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
                        if tcp.write_all(ok.as_bytes()).await.is_err() {
                            return;
                        }
                        continue;
                    }
                    let length = head
                        .lines()
                        .find_map(|l| {
                            let (k, v) = l.split_once(':')?;
                            k.eq_ignore_ascii_case("content-length")
                                .then(|| v.trim().parse::<usize>().ok())?
                        })
                        .unwrap_or(0);
                    let mut body = vec![0; length];
                    if tcp.read_exact(&mut body).await.is_err() {
                        return;
                    }
                    script(tcp);
                    return;
                }
            });
        }
    });
    port
}

/// Reads one request head, byte by byte (tests only).
async fn read_head(tcp: &mut TcpStream) -> Option<String> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if tcp.read(&mut byte).await.ok()? == 0 {
            return None;
        }
        head.push(byte[0]);
    }
    Some(String::from_utf8_lossy(&head).into_owned())
}

const SSE_HEAD: &[u8] =
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n";

fn chunk(data: &[u8]) -> Vec<u8> {
    let mut out = format!("{:x}\r\n", data.len()).into_bytes();
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
    out
}

/// The SSE head and one token event.
fn first_event() -> Vec<u8> {
    let mut out = SSE_HEAD.to_vec();
    out.extend(chunk(
        b"data: {\"choices\":[{\"delta\":{\"content\":\"Hi\"}}]}\n\n",
    ));
    out
}

/// A decoder that sends `bytes`, then nothing, for ever, with the
/// connection open.
fn stalls_after(bytes: Vec<u8>) -> Script {
    Arc::new(move |mut tcp: TcpStream| {
        let bytes = bytes.clone();
        tokio::spawn(async move {
            let _ = tcp.write_all(&bytes).await;
            tokio::time::sleep(Duration::from_secs(3600)).await;
            drop(tcp);
        })
    })
}

/// A stack whose decoder is `script`; the prefiller is pd-sim.
async fn with_decoder(script: Script, extra: &[&str]) -> common::Stack {
    let decoder = scripted_decoder(script).await;
    start_with(SimConfig::default(), extra, move |pp, _| {
        Some(common::upstream_flags(
            "127.0.0.1",
            pp,
            "127.0.0.1",
            decoder,
        ))
    })
    .await
}

#[tokio::test]
async fn a_body_that_never_ends_is_a_408() {
    let s = start(SimConfig::default(), &["--body-timeout", "0.3"]).await;
    let addr = host(&s.url).to_owned();
    for request in [
        // Declares more than it sends.
        &b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"model\":"[..],
        // Chunked, and the last chunk never comes.
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n5\r\n{\"mod\r\n",
    ] {
        let started = Instant::now();
        let mut tcp = TcpStream::connect(&addr).await.unwrap();
        tcp.write_all(request).await.unwrap();
        let mut buf = vec![0; 4096];
        let n = tokio::time::timeout(HANG, tcp.read(&mut buf))
            .await
            .expect("answered while the body is still open")
            .unwrap();
        let (status, body) = parse_answer(&String::from_utf8_lossy(&buf[..n]));
        assert_eq!(status, 408);
        assert_openai_error(&body, 408);
        assert!(started.elapsed() < Duration::from_secs(3));
    }
    assert!(s.prefiller.prefill_requests().is_empty());
    let m = s.metrics().await;
    assert_eq!(
        metric_value(&m, "pd_proxy_timeouts_total{kind=\"body\"}"),
        2.0
    );
}

#[tokio::test]
async fn a_declared_length_past_the_limit_is_refused_unread() {
    let s = start(SimConfig::default(), &["--max-body-bytes", "8192"]).await;
    // Nothing of the body is sent: the answer must come from the header.
    let answer = raw(
        host(&s.url),
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 1000000000\r\nconnection: close\r\n\r\n",
    )
    .await;
    let (status, body) = parse_answer(&answer);
    assert_eq!(status, 413);
    assert_openai_error(&body, 413);
    // Chunked past the limit.
    let big = json!({"model": "sim-model", "prompt": "x".repeat(20_000)});
    let stream = futures_util::stream::iter(
        serde_json::to_vec(&big)
            .unwrap()
            .chunks(1000)
            .map(|c| Ok::<_, std::io::Error>(c.to_vec()))
            .collect::<Vec<_>>(),
    );
    let resp = s
        .client
        .post(format!("{}/v1/completions", s.url))
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 413);
    assert_openai_error(&resp.json().await.unwrap(), 413);
    assert!(s.prefiller.prefill_requests().is_empty());
}

#[tokio::test]
async fn a_decoder_that_stalls_mid_stream_ends_with_an_error_event() {
    let script = stalls_after(first_event());
    let s = with_decoder(script, &["--stream-idle-timeout", "0.3"]).await;
    let started = Instant::now();
    let resp = s.post("/v1/chat/completions", chat_body(true)).await;
    assert_eq!(resp.status(), 200);
    let text = tokio::time::timeout(HANG, resp.text())
        .await
        .expect("the stream ends")
        .unwrap();
    let events = sse_data(&text);
    assert!(events[0].contains("Hi"), "{text}");
    let error: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert_openai_error(&error, 504);
    assert_eq!(events.last().unwrap(), "[DONE]");
    assert!(started.elapsed() < Duration::from_secs(3));
    let m = s.metrics().await;
    assert_eq!(
        metric_value(&m, "pd_proxy_timeouts_total{kind=\"stream_idle\"}"),
        1.0
    );
}

#[tokio::test]
async fn a_client_that_stops_reading_loses_its_decoder_leg() {
    // A decoder that streams as fast as it can until its socket fails.
    let closed = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicUsize::new(0));
    let (c, n) = (Arc::clone(&closed), Arc::clone(&sent));
    let script: Script = Arc::new(move |mut tcp: TcpStream| {
        let (closed, sent) = (Arc::clone(&c), Arc::clone(&n));
        tokio::spawn(async move {
            if tcp.write_all(SSE_HEAD).await.is_err() {
                return;
            }
            let event = chunk(&[b"data: ".as_slice(), &[b'x'; 16 << 10], b"\n\n"].concat());
            loop {
                let write = tokio::time::timeout(Duration::from_secs(20), tcp.write_all(&event));
                match write.await {
                    Ok(Ok(())) => {
                        sent.fetch_add(event.len(), Ordering::Relaxed);
                    }
                    // Closed by the proxy: the leg was dropped.
                    Ok(Err(_)) => break,
                    // Still open after 20 s: the test fails below.
                    Err(_) => return,
                }
            }
            closed.store(true, Ordering::SeqCst);
        })
    });
    let s = with_decoder(script, &["--send-timeout", "0.5"]).await;
    let body = serde_json::to_vec(&chat_body(true)).unwrap();
    let mut tcp = TcpStream::connect(host(&s.url)).await.unwrap();
    tcp.write_all(
        format!(
            "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    tcp.write_all(&body).await.unwrap();
    // The client never reads. Within the send timeout plus the time to
    // fill the socket buffers, the proxy must close the decoder's leg.
    let deadline = Instant::now() + HANG;
    while !closed.load(Ordering::SeqCst) {
        assert!(
            Instant::now() < deadline,
            "the decoder leg was still open after {HANG:?} ({} bytes sent)",
            sent.load(Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let m = s.metrics().await;
    assert_eq!(
        metric_value(&m, "pd_proxy_timeouts_total{kind=\"send\"}"),
        1.0
    );
    drop(tcp);
}

#[tokio::test]
async fn a_non_streaming_answer_that_breaks_is_a_502_not_a_short_200() {
    let script: Script = Arc::new(|mut tcp: TcpStream| {
        tokio::spawn(async move {
            let head =
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n";
            let _ = tcp.write_all(head.as_bytes()).await;
            let _ = tcp.write_all(b"{\"id\":\"chatcmpl-1\",\"choi").await;
            // Closed 970 bytes short.
        })
    });
    let s = with_decoder(script, &[]).await;
    let resp = s.post("/v1/chat/completions", chat_body(false)).await;
    assert_eq!(resp.status(), 502);
    assert_openai_error(&resp.json().await.unwrap(), 502);
}

#[tokio::test]
async fn past_max_pending_a_request_is_a_503_with_retry_after() {
    // Telemetry never arrives: the first request stays parked.
    let sim = SimConfig {
        drop_ranks: vec![0],
        ..SimConfig::default()
    };
    let s = start(sim, &["--max-pending", "1", "--kv-ready-timeout", "30"]).await;
    let first = {
        let (client, url) = (s.client.clone(), s.url.clone());
        tokio::spawn(async move {
            client
                .post(format!("{url}/v1/chat/completions"))
                .json(&chat_body(false))
                .send()
                .await
        })
    };
    common::wait_until("one parked", || async { s.app.pending.len() == 1 }).await;
    let resp = s.post("/v1/chat/completions", chat_body(false)).await;
    assert_eq!(resp.status(), 503);
    assert_eq!(resp.headers()["retry-after"], "1");
    assert_openai_error(&resp.json().await.unwrap(), 503);
    assert_eq!(
        s.prefiller.prefill_requests().len(),
        1,
        "the second was never sent"
    );
    let m = s.metrics().await;
    assert_eq!(metric_value(&m, "pd_proxy_pending_full_total"), 1.0);
    first.abort();
    s.assert_drained().await;
}

#[tokio::test]
async fn past_the_connection_cap_new_clients_are_told_and_telemetry_still_flows() {
    let s = start(SimConfig::default(), &["--max-connections", "2"]).await;
    let addr = host(&s.url).to_owned();
    // Two connections that say nothing hold both slots.
    let held = [
        TcpStream::connect(&addr).await.unwrap(),
        TcpStream::connect(&addr).await.unwrap(),
    ];
    common::wait_until("both slots taken", || async {
        metric_value(
            &s.app.metrics.render(),
            "pd_proxy_open_connections{port=\"api\"}",
        ) >= 2.0
    })
    .await;
    let answer = raw(&addr, b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n").await;
    let (status, body) = parse_answer(&answer);
    assert_eq!(status, 503);
    assert_openai_error(&body, 503);
    // The telemetry port has its own allowance.
    let resp = s
        .client
        .post(&s.telemetry_url)
        .json(&json!({"event": "request_store_finished", "request_ids_set": [], "world_size": 1, "kv_rank": 0}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    drop(held);
    common::wait_until("a slot is free again", || async {
        metric_value(
            &s.app.metrics.render(),
            "pd_proxy_open_connections{port=\"api\"}",
        ) < 2.0
    })
    .await;
}

#[tokio::test]
async fn requests_hyper_cannot_parse_get_openai_errors_on_both_ports() {
    let s = start(SimConfig::default(), &[]).await;
    let many_headers: String = (0..150).map(|i| format!("x-h{i}: v\r\n")).collect();
    let cases: [(Vec<u8>, u16); 3] = [
        (b"GARBAGE\x01 / HTTP/1.1\r\n\r\n".to_vec(), 400),
        (
            format!("GET /health HTTP/1.1\r\nhost: x\r\n{many_headers}\r\n").into_bytes(),
            431,
        ),
        (
            b"GET /health HTTP/1.1\r\nhost: x\r\nbad header\r\n\r\n".to_vec(),
            400,
        ),
    ];
    let telemetry = host(&s.telemetry_url).split('/').next().unwrap().to_owned();
    for addr in [host(&s.url).to_owned(), telemetry] {
        for (request, want) in &cases {
            let answer = raw(&addr, request).await;
            let (status, body) = parse_answer(&answer);
            assert_eq!(status, *want, "{addr}: {answer}");
            assert_openai_error(&body, *want);
            assert!(answer
                .to_ascii_lowercase()
                .contains("content-type: application/json"));
        }
    }
}

#[tokio::test]
async fn an_idle_http2_connection_is_closed() {
    let s = start(SimConfig::default(), &["--idle-timeout", "0.3"]).await;
    let tcp = TcpStream::connect(host(&s.url)).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .unwrap();
    let conn = tokio::spawn(conn);
    let req = http::Request::get(format!("{}/health", s.url))
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    drop(resp);
    let started = Instant::now();
    tokio::time::timeout(HANG, conn)
        .await
        .expect("the proxy closes an idle HTTP/2 connection")
        .unwrap()
        .unwrap();
    assert!(started.elapsed() >= Duration::from_millis(250));
}

#[tokio::test]
async fn models_asks_every_upstream_at_once_within_the_upstream_timeout() {
    // Upstreams that accept and never answer.
    let mut flags = Vec::new();
    let mut silent = Vec::new();
    for _ in 0..3 {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        flags.push(l.local_addr().unwrap().port().to_string());
        silent.push(tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((tcp, _)) = l.accept().await {
                held.push(tcp);
            }
        }));
    }
    let ports = flags.join(",");
    let s = start_with(
        SimConfig::default(),
        &["--upstream-timeout", "0.5"],
        |_, _| {
            Some(
                [
                    "--prefiller-host",
                    "127.0.0.1",
                    "--prefiller-port",
                    &ports,
                    "--decoder-host",
                    "127.0.0.1",
                    "--decoder-port",
                    &ports,
                ]
                .map(String::from)
                .to_vec(),
            )
        },
    )
    .await;
    let started = Instant::now();
    let resp = s.get("/v1/models").await;
    assert_eq!(resp.status(), 504);
    assert_openai_error(&resp.json().await.unwrap(), 504);
    let took = started.elapsed();
    assert!(took < Duration::from_millis(1500), "took {took:?}");
}

#[tokio::test]
async fn shutdown_keeps_telemetry_open_for_parked_requests() {
    // Each rank's event comes 300 ms after the prefill answer: the signal
    // lands while the request is parked.
    let sim = SimConfig {
        telemetry_delay: Duration::from_millis(300),
        ..SimConfig::default()
    };
    let mut s = start(sim, &["--drain-timeout", "5"]).await;
    let request = {
        let (client, url) = (s.client.clone(), s.url.clone());
        tokio::spawn(async move {
            client
                .post(format!("{url}/v1/chat/completions"))
                .json(&chat_body(false))
                .send()
                .await
                .unwrap()
        })
    };
    common::wait_until("parked", || async { s.app.pending.len() == 1 }).await;
    let drained = s.shutdown().await.unwrap();
    let resp = request.await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(drained.cut, 0, "nothing was cut");
    // Released by its event, not by the KV timeout.
    assert_eq!(
        metric_value(&s.app.metrics.render(), "pd_proxy_kv_ready_timeouts_total"),
        0.0
    );
}

#[tokio::test]
async fn a_stream_past_the_drain_deadline_ends_with_an_error_event() {
    let script: Script = Arc::new(|mut tcp: TcpStream| {
        tokio::spawn(async move {
            let _ = tcp.write_all(&first_event()).await;
            // A slow generation: a token every 100 ms, never ending.
            loop {
                tokio::time::sleep(Duration::from_millis(100)).await;
                let event = chunk(b"data: {\"choices\":[{\"delta\":{\"content\":\".\"}}]}\n\n");
                if tcp.write_all(&event).await.is_err() {
                    return;
                }
            }
        })
    });
    let mut s = with_decoder(script, &["--drain-timeout", "0.3"]).await;
    let resp = s.post("/v1/chat/completions", chat_body(true)).await;
    assert_eq!(resp.status(), 200);
    let body = tokio::spawn(async move { resp.text().await });
    let drained = s.shutdown().await.unwrap();
    assert_eq!(drained.cut, 1);
    let text = tokio::time::timeout(HANG, body)
        .await
        .expect("the cut stream ends")
        .unwrap()
        .unwrap();
    let events = sse_data(&text);
    let error: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert_openai_error(&error, 503);
    assert_eq!(events.last().unwrap(), "[DONE]");
}

#[tokio::test]
async fn a_second_signal_ends_the_drain_at_once() {
    let script = stalls_after(first_event());
    let decoder = scripted_decoder(script).await;
    let public = bind().await;
    let telemetry = bind().await;
    let url = format!("http://{}", public.local_addr().unwrap());
    let sim = pd_sim::Sim::new(SimConfig {
        telemetry_url: Some(format!(
            "http://{}/api/v1/telemetry",
            telemetry.local_addr().unwrap()
        )),
        ..SimConfig::default()
    });
    let p = bind().await;
    let pp = p.local_addr().unwrap().port();
    tokio::spawn(Arc::clone(&sim).serve_prefiller(p));
    let mut flags = common::upstream_flags("127.0.0.1", pp, "127.0.0.1", decoder);
    flags.extend(["--drain-timeout", "600"].map(String::from));
    let app = common::build_app(common::config(flags), &public, &telemetry);
    let (signals_tx, signals_rx) = tokio::sync::mpsc::channel::<()>(2);
    let server = tokio::spawn(pd_proxy::serve(
        pd_proxy::Listeners {
            public,
            telemetry,
            metrics: None,
        },
        Arc::clone(&app),
        tokio_stream::wrappers::ReceiverStream::new(signals_rx),
    ));
    let client = reqwest::Client::new();
    let resp = client
        .post(format!("{url}/v1/chat/completions"))
        .json(&chat_body(true))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    signals_tx.send(()).await.unwrap();
    common::wait_until("draining", || async {
        TcpStream::connect(url.trim_start_matches("http://"))
            .await
            .is_err()
    })
    .await;
    let started = Instant::now();
    signals_tx.send(()).await.unwrap();
    let drained = tokio::time::timeout(HANG, server)
        .await
        .expect("the second signal ends it")
        .unwrap()
        .unwrap();
    assert_eq!(drained.cut, 1);
    assert!(started.elapsed() < Duration::from_secs(3));
}

#[tokio::test]
async fn the_metrics_port_serves_without_a_key() {
    let metrics = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = metrics.local_addr().unwrap();
    let public = bind().await;
    let telemetry = bind().await;
    let app = common::build_app(
        common::config(["--api-key", "sk-test-key-1"].map(String::from).to_vec()),
        &public,
        &telemetry,
    );
    let _server = tokio::spawn(pd_proxy::serve(
        pd_proxy::Listeners {
            public,
            telemetry,
            metrics: Some(metrics),
        },
        app,
        futures_util::stream::pending(),
    ));
    let text = common::get_text(&reqwest::Client::new(), &format!("http://{addr}/metrics")).await;
    assert!(text.contains("pd_proxy_pending_requests"), "{text}");
}

#[tokio::test]
async fn bodies_held_at_once_stay_within_their_budget() {
    // The budget is six bodies at the limit: 6 x 8 KiB.
    let s = start(SimConfig::default(), &["--max-body-bytes", "8192"]).await;
    let addr = host(&s.url).to_owned();
    let head = "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 8192\r\n\r\n{";
    let mut open = Vec::new();
    for _ in 0..6 {
        let mut tcp = TcpStream::connect(&addr).await.unwrap();
        tcp.write_all(head.as_bytes()).await.unwrap();
        open.push(tcp);
    }
    common::wait_until("six bodies in the budget", || async {
        s.app.body_budget.available_permits() == 0
    })
    .await;
    let answer = raw(&addr, head.as_bytes()).await;
    let (status, body) = parse_answer(&answer);
    assert_eq!(status, 503, "{answer}");
    assert_openai_error(&body, 503);
    assert!(answer.to_ascii_lowercase().contains("retry-after: 1"));
    drop(open);
    common::wait_until("the budget is given back", || async {
        s.app.body_budget.available_permits() == 48
    })
    .await;
    let resp = s.post("/v1/chat/completions", chat_body(false)).await;
    assert_eq!(resp.status(), 200);
}

#[tokio::test]
async fn a_stream_that_never_starts_is_a_504_after_the_upstream_timeout() {
    // Headers, then nothing: the engine queued the request and never ran it.
    let script = stalls_after(SSE_HEAD.to_vec());
    // A stream idle bound shorter than the upstream timeout does not apply
    // before the first byte.
    let s = with_decoder(
        script,
        &["--stream-idle-timeout", "0.1", "--upstream-timeout", "0.6"],
    )
    .await;
    let started = Instant::now();
    let resp = s.post("/v1/chat/completions", chat_body(true)).await;
    assert_eq!(resp.status(), 504);
    assert_openai_error(&resp.json().await.unwrap(), 504);
    assert!(started.elapsed() >= Duration::from_millis(500));
}

#[tokio::test]
async fn an_upstreams_bodiless_400_reaches_the_client_with_a_json_body() {
    // The prefiller refuses with a bare 400: the client gets that status
    // with an OpenAI-shaped body saying so, not hyper's parse-error text.
    let script: Script = Arc::new(|mut tcp: TcpStream| {
        tokio::spawn(async move {
            let _ = tcp
                .write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")
                .await;
        })
    });
    let prefiller = scripted_decoder(script).await;
    let s = start_with(SimConfig::default(), &[], move |_, dp| {
        Some(common::upstream_flags(
            "127.0.0.1",
            prefiller,
            "127.0.0.1",
            dp,
        ))
    })
    .await;
    let resp = s.post("/v1/chat/completions", chat_body(false)).await;
    assert_eq!(resp.status(), 400);
    let message = assert_openai_error(&resp.json().await.unwrap(), 400);
    assert!(message.contains("upstream answered 400"), "{message}");
    assert!(
        s.decoder.decode_requests().is_empty(),
        "refused, never decoded"
    );
}

//! Traces over real sockets: W3C `traceparent` continued to both upstream
//! legs (as pd-sim saw them), spans at an OTLP/HTTP receiver built from
//! the OpenTelemetry protobufs, and a collector that never answers.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::routing::post;
use common::{chat_body, start, wait_until};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::trace::v1::Span;
use pd_sim::SimConfig;
use prost::Message;

const CLIENT_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN: &str = "00f067aa0ba902b7";

fn client_traceparent() -> String {
    format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-01")
}

/// (trace id, parent span id) of a `traceparent` value.
fn parts(value: &str) -> (String, String) {
    let fields: Vec<&str> = value.split('-').collect();
    assert_eq!(fields.len(), 4, "{value}");
    assert_eq!(fields[0], "00", "{value}");
    (fields[1].to_owned(), fields[2].to_owned())
}

fn traceparents(recorded: &[pd_sim::Recorded]) -> Vec<String> {
    recorded
        .iter()
        .map(|r| {
            r.headers
                .get("traceparent")
                .expect("the leg carries a traceparent")
                .to_str()
                .unwrap()
                .to_owned()
        })
        .collect()
}

/// An OTLP/HTTP traces receiver on 127.0.0.1:0 that keeps every span.
struct Receiver {
    url: String,
    spans: Arc<Mutex<Vec<Span>>>,
}

async fn receiver() -> Receiver {
    let spans: Arc<Mutex<Vec<Span>>> = Arc::default();
    let kept = Arc::clone(&spans);
    let app = axum::Router::new().route(
        "/v1/traces",
        post(move |body: Bytes| {
            let kept = Arc::clone(&kept);
            async move {
                let request = ExportTraceServiceRequest::decode(body).expect("an OTLP protobuf");
                let mut kept = kept.lock().unwrap();
                for resource in request.resource_spans {
                    for scope in resource.scope_spans {
                        kept.extend(scope.spans);
                    }
                }
                ([("content-type", "application/x-protobuf")], Vec::new())
            }
        }),
    );
    let listener = common::bind().await;
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    Receiver { url, spans }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test]
async fn without_an_endpoint_the_clients_traceparent_goes_to_both_legs_unchanged() {
    let stack = start(SimConfig::default(), &[]).await;
    let response = stack
        .client
        .post(format!("{}/v1/chat/completions", stack.url))
        .header("traceparent", client_traceparent())
        .json(&chat_body(false))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let legs = [
        traceparents(&stack.prefiller.prefill_requests()),
        traceparents(&stack.decoder.decode_requests()),
    ]
    .concat();
    assert_eq!(legs, [client_traceparent(), client_traceparent()]);

    // No traceparent, or a malformed one: none goes upstream.
    for header in [
        None,
        Some("00-00000000000000000000000000000000-00f067aa0ba902b7-01"),
    ] {
        let mut request = stack
            .client
            .post(format!("{}/v1/chat/completions", stack.url))
            .json(&chat_body(false));
        if let Some(value) = header {
            request = request.header("traceparent", value);
        }
        assert_eq!(request.send().await.unwrap().status(), 200);
        let prefill = stack.prefiller.prefill_requests().pop().unwrap();
        let decode = stack.decoder.decode_requests().pop().unwrap();
        assert!(!prefill.headers.contains_key("traceparent"));
        assert!(!decode.headers.contains_key("traceparent"));
    }
}

#[tokio::test]
async fn a_traced_request_continues_the_clients_trace_with_a_span_per_phase() {
    let receiver = receiver().await;
    let stack = start(SimConfig::default(), &["--otlp-endpoint", &receiver.url]).await;
    assert_eq!(
        stack.metric("pd_proxy_trace_spans_dropped_total").await,
        0.0
    );
    let response = stack
        .client
        .post(format!("{}/v1/chat/completions", stack.url))
        .header("traceparent", client_traceparent())
        .json(&chat_body(true))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let request_id = response.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    let body = response.text().await.unwrap();
    assert!(body.ends_with("data: [DONE]\n\n"), "{body}");

    // Both legs continue the client's trace, each under its own span.
    let prefill_leg = traceparents(&stack.prefiller.prefill_requests());
    let decode_leg = traceparents(&stack.decoder.decode_requests());
    let (prefill_trace, prefill_parent) = parts(&prefill_leg[0]);
    let (decode_trace, decode_parent) = parts(&decode_leg[0]);
    assert_eq!(prefill_trace, CLIENT_TRACE);
    assert_eq!(decode_trace, CLIENT_TRACE);
    assert_ne!(prefill_parent, decode_parent);
    assert_ne!(prefill_parent, CLIENT_SPAN);
    assert_ne!(decode_parent, CLIENT_SPAN);

    // The spans reach the collector (batched: within about a second).
    wait_until("five spans at the receiver", || async {
        receiver.spans.lock().unwrap().len() >= 5
    })
    .await;
    let spans = receiver.spans.lock().unwrap().clone();
    assert_eq!(spans.len(), 5, "{spans:#?}");
    let by_name: HashMap<&str, &Span> = spans.iter().map(|s| (s.name.as_str(), s)).collect();
    let root = by_name["request"];
    for span in &spans {
        assert_eq!(hex(&span.trace_id), CLIENT_TRACE, "{}", span.name);
        let ms = (span.end_time_unix_nano - span.start_time_unix_nano) as f64 / 1e6;
        println!("{:<8} {ms:>8.3} ms  {}", span.name, hex(&span.span_id));
    }
    assert_eq!(hex(&root.parent_span_id), CLIENT_SPAN);
    for name in ["prefill", "kv_wait", "decode", "relay"] {
        let span = by_name[name];
        assert_eq!(span.parent_span_id, root.span_id, "{name}'s parent");
        assert!(
            span.start_time_unix_nano >= root.start_time_unix_nano,
            "{name}"
        );
        assert!(span.end_time_unix_nano <= root.end_time_unix_nano, "{name}");
    }
    assert_eq!(hex(&by_name["prefill"].span_id), prefill_parent);
    assert_eq!(hex(&by_name["decode"].span_id), decode_parent);
    // In order: prefill, then the KV wait, then decode to the first byte,
    // then the relay to the last.
    let order = ["prefill", "kv_wait", "decode", "relay"].map(|n| by_name[n]);
    for pair in order.windows(2) {
        assert!(
            pair[0].end_time_unix_nano <= pair[1].start_time_unix_nano + 1_000_000,
            "{} ends before {} starts",
            pair[0].name,
            pair[1].name
        );
    }

    let attr = |span: &Span, key: &str| {
        span.attributes
            .iter()
            .find(|kv| kv.key == key)
            .and_then(|kv| kv.value.as_ref())
            .and_then(|v| v.value.clone())
            .unwrap_or_else(|| panic!("{} has no {key}", span.name))
    };
    use opentelemetry_proto::tonic::common::v1::any_value::Value;
    let prefiller = stack.app.fleet.prefillers.snapshot()[0].authority.clone();
    let decoder = stack.app.fleet.decoders.snapshot()[0].authority.clone();
    assert_eq!(attr(root, "pd.request_id"), Value::StringValue(request_id));
    assert_eq!(attr(root, "pd.api"), Value::StringValue("chat".into()));
    assert_eq!(attr(root, "pd.route"), Value::StringValue("pd".into()));
    assert_eq!(
        attr(root, "pd.outcome"),
        Value::StringValue("completed".into())
    );
    assert_eq!(attr(root, "pd.stream"), Value::BoolValue(true));
    assert_eq!(
        attr(root, "http.response.status_code"),
        Value::IntValue(200)
    );
    assert_eq!(
        attr(root, "pd.prefiller"),
        Value::StringValue(prefiller.clone())
    );
    assert_eq!(
        attr(root, "pd.decoder"),
        Value::StringValue(decoder.clone())
    );
    assert_eq!(attr(root, "pd.prefill_retries"), Value::IntValue(0));
    let prefill = by_name["prefill"];
    assert_eq!(attr(prefill, "pd.endpoint"), Value::StringValue(prefiller));
    assert_eq!(attr(prefill, "pd.retries"), Value::IntValue(0));
    assert_eq!(
        attr(by_name["decode"], "pd.endpoint"),
        Value::StringValue(decoder)
    );
    assert_eq!(
        attr(by_name["kv_wait"], "pd.kv_ready"),
        Value::BoolValue(true)
    );
    // pd-sim's one rank reported, and nothing was refused.
    for (key, want) in [
        ("pd.world_size", 1),
        ("pd.ranks_reported", 1),
        ("pd.events_refused", 0),
    ] {
        assert_eq!(
            attr(by_name["kv_wait"], key),
            Value::IntValue(want),
            "{key}"
        );
    }

    // A request without a traceparent starts a trace of its own, and a
    // non-streaming answer has its relay too.
    receiver.spans.lock().unwrap().clear();
    assert_eq!(
        stack
            .post("/v1/chat/completions", chat_body(false))
            .await
            .status(),
        200
    );
    wait_until("five more spans", || async {
        receiver.spans.lock().unwrap().len() >= 5
    })
    .await;
    let spans = receiver.spans.lock().unwrap().clone();
    let mut names: Vec<&str> = spans.iter().map(|s| s.name.as_str()).collect();
    names.sort_unstable();
    assert_eq!(names, ["decode", "kv_wait", "prefill", "relay", "request"]);
    let root = spans.iter().find(|s| s.name == "request").unwrap();
    assert!(root.parent_span_id.is_empty(), "a root span");
    assert_ne!(hex(&root.trace_id), CLIENT_TRACE);
    let (trace, _) = parts(&traceparents(&stack.decoder.decode_requests())[1]);
    assert_eq!(trace, hex(&root.trace_id));

    // A trace the client did not sample is not recorded, and its legs
    // carry the flag on.
    receiver.spans.lock().unwrap().clear();
    let unsampled = "0af7651916cd43dd8448eb211c80319c";
    let response = stack
        .client
        .post(format!("{}/v1/chat/completions", stack.url))
        .header("traceparent", format!("00-{unsampled}-b7ad6b7169203331-00"))
        .json(&chat_body(false))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    for leg in [
        traceparents(&stack.prefiller.prefill_requests())[2].clone(),
        traceparents(&stack.decoder.decode_requests())[2].clone(),
    ] {
        assert!(leg.starts_with(&format!("00-{unsampled}-")), "{leg}");
        assert!(leg.ends_with("-00"), "{leg}");
    }
    assert_eq!(
        stack
            .post("/v1/chat/completions", chat_body(false))
            .await
            .status(),
        200
    );
    wait_until("the next request's spans", || async {
        receiver.spans.lock().unwrap().len() >= 5
    })
    .await;
    let tracing = stack.app.tracing.as_ref().unwrap();
    assert!(tracing.flush(Duration::from_secs(5)).await, "flushed");
    let spans = receiver.spans.lock().unwrap().clone();
    assert_eq!(spans.len(), 5, "only the sampled request's spans");
    assert!(spans.iter().all(|s| hex(&s.trace_id) != unsampled));
    assert_eq!(
        stack.metric("pd_proxy_trace_spans_dropped_total").await,
        0.0
    );
}

#[tokio::test]
async fn a_collector_that_never_answers_costs_requests_nothing() {
    // Accepts connections, reads nothing, answers nothing.
    let silent = common::bind().await;
    let url = format!("http://{}", silent.local_addr().unwrap());
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = silent.accept().await {
            held.push(socket);
        }
    });
    let stack = start(
        SimConfig::default(),
        &["--otlp-endpoint", &url, "--otlp-timeout", "0.5"],
    )
    .await;
    let requests = (0..50).map(|i| {
        let client = stack.client.clone();
        let url = format!("{}/v1/chat/completions", stack.url);
        async move {
            let response = client
                .post(url)
                .header("traceparent", client_traceparent())
                .json(&chat_body(i % 2 == 0))
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 200);
            response.text().await.unwrap();
        }
    });
    tokio::time::timeout(
        Duration::from_secs(2),
        futures_util::future::join_all(requests),
    )
    .await
    .expect("50 requests finish promptly with the collector silent");
    // Their spans are dropped once their batch times out, and counted.
    wait_until("the dropped spans counted", || async {
        stack.metric("pd_proxy_trace_spans_dropped_total").await >= 250.0
    })
    .await;
    // A flush at exit is bounded too: one more request's spans wait for a
    // collector that does not answer, and the flush gives up at its limit.
    assert_eq!(
        stack
            .post("/v1/chat/completions", chat_body(false))
            .await
            .status(),
        200
    );
    let tracing = stack.app.tracing.as_ref().unwrap();
    let flushed = tokio::time::timeout(
        Duration::from_secs(5),
        tracing.flush(Duration::from_millis(100)),
    )
    .await
    .expect("the flush is bounded");
    assert!(!flushed, "nothing was exported");
}

#[test]
fn a_bad_endpoint_is_refused_at_start() {
    use clap::Parser as _;
    let refused = |url: &str| {
        pd_proxy::Args::try_parse_from(["pd-proxy", "--otlp-endpoint", url])
            .unwrap()
            .resolve(None)
            .unwrap_err()
    };
    assert!(refused("https://collector:4318").contains("http://"));
    assert!(refused("collector:4318").contains("--otlp-endpoint"));
}

//! The Grafana dashboard in deploy/grafana asks only for what the proxy
//! exports: every metric its queries name, and every label they group or
//! label by, is checked against a live proxy's `/metrics` after traffic.

mod common;

use std::collections::{BTreeMap, BTreeSet};

use common::{chat_body, start};
use pd_sim::SimConfig;
use serde_json::Value;

/// Series names, each with the label names seen on it, from an exposition.
fn exported(text: &str) -> BTreeMap<String, BTreeSet<String>> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let end = line.find(['{', ' ']).unwrap_or(line.len());
        let labels = out.entry(line[..end].to_owned()).or_default();
        if let Some(inner) = line[end..].strip_prefix('{') {
            let inner = &inner[..inner.rfind('}').unwrap_or(inner.len())];
            for pair in inner.split("\",") {
                if let Some((name, _)) = pair.split_once('=') {
                    labels.insert(name.trim().to_owned());
                }
            }
        }
    }
    out
}

/// The `pd_proxy_*` names a PromQL expression reads.
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find("pd_proxy_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        names.push(tail[..end].to_owned());
        rest = &tail[end..];
    }
    names
}

/// The labels of every `by (...)` in an expression.
fn grouped_by(expr: &str) -> Vec<String> {
    expr.split("by (")
        .skip(1)
        .flat_map(|part| {
            part[..part.find(')').unwrap_or(0)]
                .split(',')
                .map(|l| l.trim().to_owned())
                .collect::<Vec<_>>()
        })
        .filter(|l| !l.is_empty())
        .collect()
}

/// Every `targets[].expr` and `legendFormat` of every panel.
fn targets(dashboard: &Value) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        let title = panel["title"].as_str().unwrap_or_default().to_owned();
        for target in panel["targets"].as_array().expect("targets") {
            out.push((
                title.clone(),
                target["expr"].as_str().expect("expr").to_owned(),
                target["legendFormat"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
            ));
        }
    }
    out
}

#[tokio::test]
async fn every_dashboard_query_reads_what_the_proxy_exports() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/grafana/pd-proxy.json");
    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    assert_eq!(dashboard["title"], "pd-proxy");

    let s = start(SimConfig::default(), &[]).await;
    common::wait_until("the fleet is ready", || async {
        s.get("/ready").await.status() == 200
    })
    .await;
    for stream in [false, true] {
        let resp = s.post("/v1/chat/completions", chat_body(stream)).await;
        assert_eq!(resp.status(), 200);
        resp.text().await.unwrap();
    }
    let series = exported(&s.metrics().await);

    let queries = targets(&dashboard);
    assert!(queries.len() >= 20, "{} queries", queries.len());
    let mut seen = BTreeSet::new();
    for (title, expr, legend) in &queries {
        let names = metric_names(expr);
        assert!(
            !names.is_empty(),
            "{title}: {expr} reads no pd-proxy metric"
        );
        for name in &names {
            let labels = series
                .get(name)
                .unwrap_or_else(|| panic!("{title}: {name} is not exported ({expr})"));
            for label in grouped_by(expr) {
                assert!(
                    labels.contains(&label),
                    "{title}: {name} has no label {label:?} ({expr}); it has {labels:?}"
                );
            }
            // A legend may name only labels the query keeps.
            for part in legend.split("{{").skip(1) {
                let label = part.split("}}").next().unwrap().trim();
                assert!(
                    grouped_by(expr).iter().any(|l| l == label) || labels.contains(label),
                    "{title}: legend {{{{{label}}}}} is not a label of {name}"
                );
            }
            seen.insert(name.clone());
        }
    }
    // The list: rate by status, phase latencies, pending, KV
    // timeouts, telemetry, upstream errors, per-endpoint health and load.
    for must in [
        "pd_proxy_requests_total",
        "pd_proxy_prefill_duration_seconds_bucket",
        "pd_proxy_kv_ready_wait_seconds_bucket",
        "pd_proxy_decode_first_byte_seconds_bucket",
        "pd_proxy_request_duration_seconds_bucket",
        "pd_proxy_pending_requests",
        "pd_proxy_kv_ready_timeouts_total",
        "pd_proxy_telemetry_events_total",
        "pd_proxy_upstream_errors_total",
        "pd_proxy_endpoint_healthy",
        "pd_proxy_endpoint_in_flight",
    ] {
        assert!(seen.contains(must), "the dashboard does not show {must}");
    }
}

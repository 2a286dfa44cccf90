//! Every metric the proxy exports, named in one place.
//!
//! Each [`App`](crate::server::App) owns its own Prometheus recorder instead
//! of installing a global one: several proxies in one process (tests, or an
//! embedding program) then keep separate counts, and the hot path uses
//! handles registered once instead of a name lookup per update.

use std::sync::Arc;
use std::time::Duration;

use metrics::{Counter, Gauge, Histogram, Key, Label, Level, Metadata, Recorder, Unit};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle, PrometheusRecorder};

use crate::error::Leg;
use crate::openai::Api;

pub const REQUESTS: &str = "pd_proxy_requests_total";
pub const PENDING: &str = "pd_proxy_pending_requests";
pub const PREFILL_SECONDS: &str = "pd_proxy_prefill_duration_seconds";
pub const KV_WAIT_SECONDS: &str = "pd_proxy_kv_ready_wait_seconds";
pub const DECODE_TTFB_SECONDS: &str = "pd_proxy_decode_first_byte_seconds";
pub const E2E_SECONDS: &str = "pd_proxy_request_duration_seconds";
pub const TELEMETRY_EVENTS: &str = "pd_proxy_telemetry_events_total";
pub const TELEMETRY_UNKNOWN_IDS: &str = "pd_proxy_telemetry_unknown_ids_total";
pub const KV_TIMEOUTS: &str = "pd_proxy_kv_ready_timeouts_total";
pub const UPSTREAM_ERRORS: &str = "pd_proxy_upstream_errors_total";
pub const CLIENT_DISCONNECTS: &str = "pd_proxy_client_disconnects_total";

/// Latency buckets from 1 ms to 5 min: prefills of long prompts take
/// seconds, the proxy's own work well under a millisecond.
const BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    120.0, 300.0,
];

static METADATA: Metadata<'static> =
    Metadata::new(module_path!(), Level::INFO, Some(module_path!()));

pub struct Metrics {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
    pub pending: Gauge,
    pub prefill_seconds: Histogram,
    pub kv_wait_seconds: Histogram,
    pub decode_ttfb_seconds: Histogram,
    pub e2e_seconds: Histogram,
    pub telemetry_unknown_ids: Counter,
    pub kv_timeouts: Counter,
    pub client_disconnects: Counter,
    upstream_errors: [Counter; 3],
}

impl Metrics {
    pub fn new() -> Arc<Self> {
        let recorder = PrometheusBuilder::new()
            .set_buckets(BUCKETS)
            .expect("bucket list is not empty")
            .build_recorder();
        let handle = recorder.handle();
        let describe = |name: &'static str, unit: Option<Unit>, help: &'static str| {
            recorder.describe_counter(name.into(), unit, help.into());
        };
        describe(
            REQUESTS,
            None,
            "Requests answered, by endpoint and HTTP status.",
        );
        describe(
            PENDING,
            None,
            "Requests parked waiting for their KV to be stored.",
        );
        describe(
            PREFILL_SECONDS,
            Some(Unit::Seconds),
            "Prefill request duration.",
        );
        describe(
            KV_WAIT_SECONDS,
            Some(Unit::Seconds),
            "Wait from the prefill response to the last rank's store-finished event.",
        );
        describe(
            DECODE_TTFB_SECONDS,
            Some(Unit::Seconds),
            "Decoder time to first response byte.",
        );
        describe(
            E2E_SECONDS,
            Some(Unit::Seconds),
            "End-to-end request duration, to the last byte relayed.",
        );
        describe(
            TELEMETRY_EVENTS,
            None,
            "LMCache telemetry events received, by event.",
        );
        describe(
            TELEMETRY_UNKNOWN_IDS,
            None,
            "Telemetry request ids that matched no parked request.",
        );
        describe(KV_TIMEOUTS, None, "Requests whose KV-ready wait timed out.");
        describe(UPSTREAM_ERRORS, None, "Upstream failures, by leg.");
        describe(
            CLIENT_DISCONNECTS,
            None,
            "Requests whose client left before the answer ended.",
        );
        let counter =
            |name: &'static str| recorder.register_counter(&Key::from_static_name(name), &METADATA);
        let histogram = |name: &'static str| {
            recorder.register_histogram(&Key::from_static_name(name), &METADATA)
        };
        let leg = |leg: Leg| {
            recorder.register_counter(
                &Key::from_static_parts(UPSTREAM_ERRORS, leg_labels(leg)),
                &METADATA,
            )
        };
        Arc::new(Metrics {
            pending: recorder.register_gauge(&Key::from_static_name(PENDING), &METADATA),
            prefill_seconds: histogram(PREFILL_SECONDS),
            kv_wait_seconds: histogram(KV_WAIT_SECONDS),
            decode_ttfb_seconds: histogram(DECODE_TTFB_SECONDS),
            e2e_seconds: histogram(E2E_SECONDS),
            telemetry_unknown_ids: counter(TELEMETRY_UNKNOWN_IDS),
            kv_timeouts: counter(KV_TIMEOUTS),
            client_disconnects: counter(CLIENT_DISCONNECTS),
            upstream_errors: [leg(Leg::Prefill), leg(Leg::Decode), leg(Leg::Models)],
            recorder,
            handle,
        })
    }

    pub fn upstream_error(&self, leg: Leg) {
        let i = match leg {
            Leg::Prefill => 0,
            Leg::Decode => 1,
            Leg::Models => 2,
        };
        self.upstream_errors[i].increment(1);
    }

    pub fn request(&self, api: Api, status: u16) {
        let labels = vec![
            Label::from_static_parts("endpoint", api.as_str()),
            Label::new("status", status.to_string()),
        ];
        self.recorder
            .register_counter(&Key::from_parts(REQUESTS, labels), &METADATA)
            .increment(1);
    }

    pub fn telemetry_event(&self, event: &str) {
        // LMCache sends one event name today; cap the label's cardinality in
        // case a sender goes wild.
        let event = if event.len() <= 64
            && event
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_')
        {
            event.to_owned()
        } else {
            "other".to_owned()
        };
        self.recorder
            .register_counter(
                &Key::from_parts(TELEMETRY_EVENTS, vec![Label::new("event", event)]),
                &METADATA,
            )
            .increment(1);
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        self.handle.render()
    }

    /// Folds histogram samples into buckets; must run periodically or the
    /// sample buffers grow with traffic.
    pub fn upkeep(&self) {
        self.handle.run_upkeep();
    }

    pub const UPKEEP_EVERY: Duration = Duration::from_secs(5);
}

static PREFILL_LABELS: [Label; 1] = [Label::from_static_parts("leg", "prefill")];
static DECODE_LABELS: [Label; 1] = [Label::from_static_parts("leg", "decode")];
static MODELS_LABELS: [Label; 1] = [Label::from_static_parts("leg", "models")];

fn leg_labels(leg: Leg) -> &'static [Label] {
    match leg {
        Leg::Prefill => &PREFILL_LABELS,
        Leg::Decode => &DECODE_LABELS,
        Leg::Models => &MODELS_LABELS,
    }
}

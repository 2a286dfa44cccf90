//! Every metric the proxy exports, named in one module: the request
//! path's here, the limits' in [`guards`], who was let in in [`access`],
//! the fleet's per-endpoint series in [`endpoints`].
//!
//! Each [`App`](crate::app::App) owns its own Prometheus recorder instead
//! of installing a global one: several proxies in one process (tests, or an
//! embedding program) then keep separate counts, and the hot path uses
//! handles registered once instead of a name lookup per update.

use std::sync::Arc;
use std::time::Duration;

use metrics::{Counter, Gauge, Histogram, Key, Label, Level, Metadata, Recorder, Unit};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle, PrometheusRecorder};

use crate::error::Leg;

mod access;
mod endpoints;
mod guards;

use access::Access;
pub use access::{AuthFailure, TelemetryRefusal, AUTH_FAILURES, TELEMETRY_REFUSED};
pub use endpoints::{EndpointSample, EndpointSeries};
pub use guards::{
    Guards, Port, TimeoutKind, BODY_BUDGET_FULL, CONNECTIONS_REFUSED, DRAIN_CUT, OPEN_CONNECTIONS,
    PENDING_FULL, TIMEOUTS,
};

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
pub const RETRIES: &str = "pd_proxy_retries_total";
pub const ROUTES: &str = "pd_proxy_routes_total";
pub const PANIC_PICKS: &str = "pd_proxy_panic_picks_total";
pub const LOOPS: &str = "pd_proxy_loops_refused_total";
pub const BYTES_PER_TOKEN: &str = "pd_proxy_prompt_bytes_per_token";
pub const FORWARDED_IDS: &str = "pd_proxy_telemetry_forwarded_ids_total";
pub const FORWARD_SECONDS: &str = "pd_proxy_telemetry_forward_seconds";
pub const INVALID_IDS: &str = "pd_proxy_telemetry_invalid_ids_total";
pub const TRACE_SPANS_DROPPED: &str = "pd_proxy_trace_spans_dropped_total";

/// What became of telemetry ids that belong to another replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ForwardOutcome {
    /// The owner took them for a parked request.
    Delivered,
    /// The owner answered but no longer parks them (released, timed out,
    /// client gone).
    UnknownAtOwner,
    /// The owner did not answer in time, or refused.
    Unreachable,
    /// The forward queue was full.
    QueueFull,
    /// They arrived already forwarded, for a third replica: never sent on
    /// again.
    Misrouted,
}

impl ForwardOutcome {
    const ALL: [ForwardOutcome; 5] = [
        ForwardOutcome::Delivered,
        ForwardOutcome::UnknownAtOwner,
        ForwardOutcome::Unreachable,
        ForwardOutcome::QueueFull,
        ForwardOutcome::Misrouted,
    ];

    fn labels(self) -> &'static [Label] {
        match self {
            ForwardOutcome::Delivered => &DELIVERED_LABELS,
            ForwardOutcome::UnknownAtOwner => &UNKNOWN_AT_OWNER_LABELS,
            ForwardOutcome::Unreachable => &UNREACHABLE_LABELS,
            ForwardOutcome::QueueFull => &QUEUE_FULL_LABELS,
            ForwardOutcome::Misrouted => &MISROUTED_LABELS,
        }
    }
}
// The fleet's per-endpoint series, see [`Metrics::render_with`].
pub const ENDPOINT_HEALTHY: &str = "pd_proxy_endpoint_healthy";
pub const ENDPOINT_IN_FLIGHT: &str = "pd_proxy_endpoint_in_flight";
pub const ENDPOINT_REQUESTS: &str = "pd_proxy_endpoint_requests_total";
pub const ENDPOINT_EJECTIONS: &str = "pd_proxy_endpoint_ejections_total";
pub const ENDPOINT_RETRIES: &str = "pd_proxy_endpoint_retries_total";
pub const DISCOVERY_ERRORS: &str = "pd_proxy_discovery_errors_total";

/// A metric label's value, named by the type it labels (a fleet role, an
/// API): each room implements it for its own types, so this module
/// imports none of them and every arrow points down to it.
pub trait LabelValue: Copy {
    fn label_value(self) -> &'static str;
}

/// How a request was served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// Prefill, KV wait, decode.
    Pd,
    /// Straight to a decoder: the prompt is shorter than
    /// `--direct-below-tokens`.
    Direct,
}

/// Latency buckets from 1 ms to 5 min: prefills of long prompts take
/// seconds, the proxy's own work well under a millisecond.
const BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    120.0, 300.0,
];

/// Each series' help text and unit, given to the recorder once.
const DESCRIPTIONS: [(&str, Option<Unit>, &str); 21] = [
    (
        REQUESTS,
        None,
        "Requests answered, by endpoint and HTTP status.",
    ),
    (
        PENDING,
        None,
        "Requests parked waiting for their KV to be stored.",
    ),
    (
        PREFILL_SECONDS,
        Some(Unit::Seconds),
        "Prefill request duration.",
    ),
    (
        KV_WAIT_SECONDS,
        Some(Unit::Seconds),
        "Wait from the prefill response to the last rank's store-finished event.",
    ),
    (
        DECODE_TTFB_SECONDS,
        Some(Unit::Seconds),
        "Decoder time to first response byte.",
    ),
    (
        E2E_SECONDS,
        Some(Unit::Seconds),
        "End-to-end request duration, to the last byte relayed.",
    ),
    (
        TELEMETRY_EVENTS,
        None,
        "LMCache telemetry events received, by event: request_store_finished, or other for any other name.",
    ),
    (
        TELEMETRY_UNKNOWN_IDS,
        None,
        "Telemetry request ids that matched no parked request.",
    ),
    (
        KV_TIMEOUTS,
        None,
        "Requests whose KV-ready wait timed out.",
    ),
    (
        UPSTREAM_ERRORS,
        None,
        "Upstream failures, by leg.",
    ),
    (
        CLIENT_DISCONNECTS,
        None,
        "Requests whose client left before the answer ended.",
    ),
    (
        RETRIES,
        None,
        "Upstream calls tried again on another endpoint, by leg.",
    ),
    (
        ROUTES,
        None,
        "Requests by route: pd (prefill, then decode) or direct (decoder only).",
    ),
    (
        PANIC_PICKS,
        None,
        "Endpoint choices made with no healthy endpoint of the role, among all of them.",
    ),
    (
        BYTES_PER_TOKEN,
        None,
        "Prompt bytes per token in the length estimate of --direct-below-tokens, learned from the prefillers' usage counts.",
    ),
    (
        FORWARDED_IDS,
        None,
        "Telemetry ids of another replica's requests, by outcome: delivered, unknown_at_owner, unreachable, queue_full, misrouted.",
    ),
    (
        FORWARD_SECONDS,
        Some(Unit::Seconds),
        "From a forwarded event's arrival to its owner's answer: the KV wait forwarding adds.",
    ),
    (
        INVALID_IDS,
        None,
        "Telemetry ids that no replica of this cluster made (bad format or MAC).",
    ),
    (
        TRACE_SPANS_DROPPED,
        None,
        "Trace spans dropped: the export queue was full, or the OTLP collector refused or did not take their batch in time.",
    ),
    (
        LOOPS,
        None,
        "Requests refused with 508 because they came from a pd-proxy.",
    ),
    (
        DISCOVERY_ERRORS,
        None,
        "DNS resolutions of upstream hosts that failed or timed out.",
    ),
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
    retries: [Counter; 2],
    routes: [Counter; 2],
    pub loops: Counter,
    pub bytes_per_token: Gauge,
    forwarded: [Counter; 5],
    pub forward_seconds: Histogram,
    pub invalid_ids: Counter,
    /// Spans that never reached the OTLP collector (`--otlp-endpoint`).
    pub trace_spans_dropped: Counter,
    /// Who was let in: client keys and the telemetry token.
    access: Access,
    /// The limits that keep a flood, a slow peer or a shutdown in bounds.
    pub guards: Guards,
}

impl Metrics {
    pub fn new() -> Arc<Self> {
        let recorder = PrometheusBuilder::new()
            .set_buckets(BUCKETS)
            .expect("bucket list is not empty")
            .build_recorder();
        let handle = recorder.handle();
        for (name, unit, help) in DESCRIPTIONS {
            recorder.describe_counter(name.into(), unit, help.into());
        }
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
        let labelled = |name: &'static str, labels: &'static [Label]| {
            recorder.register_counter(&Key::from_static_parts(name, labels), &METADATA)
        };
        Arc::new(Metrics {
            retries: [
                labelled(RETRIES, &PREFILL_LABELS),
                labelled(RETRIES, &DECODE_LABELS),
            ],
            routes: [
                labelled(ROUTES, &PD_LABELS),
                labelled(ROUTES, &DIRECT_LABELS),
            ],
            loops: counter(LOOPS),
            forwarded: ForwardOutcome::ALL.map(|o| labelled(FORWARDED_IDS, o.labels())),
            forward_seconds: histogram(FORWARD_SECONDS),
            invalid_ids: counter(INVALID_IDS),
            trace_spans_dropped: counter(TRACE_SPANS_DROPPED),
            access: Access::register(&recorder),
            guards: Guards::register(&recorder),
            bytes_per_token: recorder
                .register_gauge(&Key::from_static_name(BYTES_PER_TOKEN), &METADATA),
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

    /// `leg` is the prefill or the decode.
    pub fn retry(&self, leg: Leg) {
        self.retries[usize::from(leg == Leg::Decode)].increment(1);
    }

    pub fn forwarded(&self, outcome: ForwardOutcome, ids: u64) {
        if ids > 0 {
            let i = ForwardOutcome::ALL
                .iter()
                .position(|o| *o == outcome)
                .expect("every outcome is listed");
            self.forwarded[i].increment(ids);
        }
    }

    pub fn route(&self, route: Route) {
        self.routes[usize::from(route == Route::Direct)].increment(1);
    }

    pub fn panic_pick(&self, role: impl LabelValue) {
        self.panic_picks(role).increment(1);
    }

    /// The panic picks of `role`. The fleet asks for each of its roles
    /// when made, so that each series shows from zero: this module does
    /// not know the roles.
    pub fn panic_picks(&self, role: impl LabelValue) -> Counter {
        let labels = vec![Label::from_static_parts("role", role.label_value())];
        self.recorder
            .register_counter(&Key::from_parts(PANIC_PICKS, labels), &METADATA)
    }

    /// Failed or timed-out resolutions of upstream names, counted by the
    /// fleet.
    pub fn discovery_errors(&self) -> Counter {
        self.recorder
            .register_counter(&Key::from_static_name(DISCOVERY_ERRORS), &METADATA)
    }

    pub fn request(&self, api: impl LabelValue, status: u16) {
        let labels = vec![
            Label::from_static_parts("endpoint", api.label_value()),
            Label::new("status", status.to_string()),
        ];
        self.recorder
            .register_counter(&Key::from_parts(REQUESTS, labels), &METADATA)
            .increment(1);
    }

    /// Prometheus text exposition of the proxy's own series.
    pub fn render(&self) -> String {
        self.handle.render()
    }

    /// The metrics page: the proxy's own series, then the fleet's
    /// per-endpoint ones, which `fleet` writes for the endpoints it has
    /// at this moment.
    pub fn render_with(&self, fleet: impl FnOnce(&EndpointSeries)) -> String {
        let endpoints = EndpointSeries::new();
        fleet(&endpoints);
        let mut text = self.render();
        text.push_str(&endpoints.render());
        text
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
static DELIVERED_LABELS: [Label; 1] = [Label::from_static_parts("outcome", "delivered")];
static UNKNOWN_AT_OWNER_LABELS: [Label; 1] =
    [Label::from_static_parts("outcome", "unknown_at_owner")];
static UNREACHABLE_LABELS: [Label; 1] = [Label::from_static_parts("outcome", "unreachable")];
static QUEUE_FULL_LABELS: [Label; 1] = [Label::from_static_parts("outcome", "queue_full")];
static MISROUTED_LABELS: [Label; 1] = [Label::from_static_parts("outcome", "misrouted")];
static PD_LABELS: [Label; 1] = [Label::from_static_parts("route", "pd")];
static DIRECT_LABELS: [Label; 1] = [Label::from_static_parts("route", "direct")];

fn leg_labels(leg: Leg) -> &'static [Label] {
    match leg {
        Leg::Prefill => &PREFILL_LABELS,
        Leg::Decode => &DECODE_LABELS,
        Leg::Models => &MODELS_LABELS,
    }
}

//! Every metric the proxy exports, named in one place.
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
use crate::fleet::Role;
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
// Rendered by the fleet from its live endpoints, see
// `Fleet::render_metrics`.
pub const ENDPOINT_HEALTHY: &str = "pd_proxy_endpoint_healthy";
pub const ENDPOINT_IN_FLIGHT: &str = "pd_proxy_endpoint_in_flight";
pub const ENDPOINT_REQUESTS: &str = "pd_proxy_endpoint_requests_total";
pub const ENDPOINT_EJECTIONS: &str = "pd_proxy_endpoint_ejections_total";
pub const ENDPOINT_RETRIES: &str = "pd_proxy_endpoint_retries_total";
pub const DISCOVERY_ERRORS: &str = "pd_proxy_discovery_errors_total";

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
    panic_picks: [Counter; 2],
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
            "LMCache telemetry events received, by event: request_store_finished, or other for any other name.",
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
        describe(
            RETRIES,
            None,
            "Upstream calls tried again on another endpoint, by leg.",
        );
        describe(
            ROUTES,
            None,
            "Requests by route: pd (prefill, then decode) or direct (decoder only).",
        );
        describe(
            PANIC_PICKS,
            None,
            "Endpoint choices made with no healthy endpoint of the role, among all of them.",
        );
        describe(
            BYTES_PER_TOKEN,
            None,
            "Prompt bytes per token in the length estimate of --direct-below-tokens, learned from the prefillers' usage counts.",
        );
        describe(
            FORWARDED_IDS,
            None,
            "Telemetry ids of another replica's requests, by outcome: delivered, unknown_at_owner, unreachable, queue_full, misrouted.",
        );
        describe(
            FORWARD_SECONDS,
            Some(Unit::Seconds),
            "From a forwarded event's arrival to its owner's answer: the KV wait forwarding adds.",
        );
        describe(
            INVALID_IDS,
            None,
            "Telemetry ids that no replica of this cluster made (bad format or MAC).",
        );
        describe(
            TRACE_SPANS_DROPPED,
            None,
            "Trace spans dropped: the export queue was full, or the OTLP collector refused or did not take their batch in time.",
        );
        describe(
            LOOPS,
            None,
            "Requests refused with 508 because they came from a pd-proxy.",
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
            panic_picks: [
                labelled(PANIC_PICKS, &PREFILLER_LABELS),
                labelled(PANIC_PICKS, &DECODER_LABELS),
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

    pub fn panic_pick(&self, role: Role) {
        self.panic_picks[usize::from(role == Role::Decoder)].increment(1);
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
static DELIVERED_LABELS: [Label; 1] = [Label::from_static_parts("outcome", "delivered")];
static UNKNOWN_AT_OWNER_LABELS: [Label; 1] =
    [Label::from_static_parts("outcome", "unknown_at_owner")];
static UNREACHABLE_LABELS: [Label; 1] = [Label::from_static_parts("outcome", "unreachable")];
static QUEUE_FULL_LABELS: [Label; 1] = [Label::from_static_parts("outcome", "queue_full")];
static MISROUTED_LABELS: [Label; 1] = [Label::from_static_parts("outcome", "misrouted")];
static PD_LABELS: [Label; 1] = [Label::from_static_parts("route", "pd")];
static DIRECT_LABELS: [Label; 1] = [Label::from_static_parts("route", "direct")];
static PREFILLER_LABELS: [Label; 1] = [Label::from_static_parts("role", "prefiller")];
static DECODER_LABELS: [Label; 1] = [Label::from_static_parts("role", "decoder")];

fn leg_labels(leg: Leg) -> &'static [Label] {
    match leg {
        Leg::Prefill => &PREFILL_LABELS,
        Leg::Decode => &DECODE_LABELS,
        Leg::Models => &MODELS_LABELS,
    }
}

pub const OPEN_CONNECTIONS: &str = "pd_proxy_open_connections";
pub const CONNECTIONS_REFUSED: &str = "pd_proxy_connections_refused_total";
pub const PENDING_FULL: &str = "pd_proxy_pending_full_total";
pub const BODY_BUDGET_FULL: &str = "pd_proxy_body_budget_full_total";
pub const TIMEOUTS: &str = "pd_proxy_timeouts_total";
pub const DRAIN_CUT: &str = "pd_proxy_drain_cut_total";

/// A listener of the proxy, as a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Port {
    Api,
    Telemetry,
    /// `--metrics-port`.
    Metrics,
}

impl Port {
    fn index(self) -> usize {
        match self {
            Port::Api => 0,
            Port::Telemetry => 1,
            Port::Metrics => 2,
        }
    }
}

/// Which bound ran out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeoutKind {
    /// A request or telemetry body took longer than `--body-timeout`.
    Body,
    /// A decoder stream went silent for `--stream-idle-timeout`.
    StreamIdle,
    /// A client left sent bytes unread for `--send-timeout`.
    Send,
}

/// Counters of the limits; each label set is fixed here.
pub struct Guards {
    connections: [Gauge; 3],
    connections_refused: [Counter; 3],
    pub pending_full: Counter,
    pub body_budget_full: Counter,
    timeouts: [Counter; 3],
    pub drain_cut: Counter,
    /// When a connection was last refused at each port's cap, in ms after
    /// `epoch` (0: never), so a KV timeout can say it may be why.
    last_refused: [std::sync::atomic::AtomicU64; 3],
    epoch: std::time::Instant,
}

impl Guards {
    fn register(recorder: &PrometheusRecorder) -> Self {
        recorder.describe_gauge(
            OPEN_CONNECTIONS.into(),
            None,
            "Open client connections, by listener (api, telemetry).".into(),
        );
        recorder.describe_counter(
            CONNECTIONS_REFUSED.into(),
            None,
            "Connections closed at once because their listener was at its cap (--max-connections; the telemetry port's own allowance).".into(),
        );
        recorder.describe_counter(
            PENDING_FULL.into(),
            None,
            "Requests answered 503 because --max-pending requests were already parked.".into(),
        );
        recorder.describe_counter(
            BODY_BUDGET_FULL.into(),
            None,
            "Requests answered 503 because the request bodies held at once reached their budget (6 x --max-body-bytes).".into(),
        );
        recorder.describe_counter(
            TIMEOUTS.into(),
            None,
            "Bounds that ran out: body (--body-timeout), stream_idle (--stream-idle-timeout), send (--send-timeout).".into(),
        );
        recorder.describe_counter(
            DRAIN_CUT.into(),
            None,
            "Requests still running when the shutdown drain ended, cut with an error.".into(),
        );
        let ports: [&'static [Label]; 3] = [
            &API_PORT_LABELS,
            &TELEMETRY_PORT_LABELS,
            &METRICS_PORT_LABELS,
        ];
        let timeout = |labels: &'static [Label]| {
            recorder.register_counter(&Key::from_static_parts(TIMEOUTS, labels), &METADATA)
        };
        Guards {
            connections: ports.map(|labels| {
                recorder
                    .register_gauge(&Key::from_static_parts(OPEN_CONNECTIONS, labels), &METADATA)
            }),
            connections_refused: ports.map(|labels| {
                recorder.register_counter(
                    &Key::from_static_parts(CONNECTIONS_REFUSED, labels),
                    &METADATA,
                )
            }),
            pending_full: recorder
                .register_counter(&Key::from_static_name(PENDING_FULL), &METADATA),
            body_budget_full: recorder
                .register_counter(&Key::from_static_name(BODY_BUDGET_FULL), &METADATA),
            timeouts: [
                timeout(&BODY_TIMEOUT_LABELS),
                timeout(&STREAM_IDLE_TIMEOUT_LABELS),
                timeout(&SEND_TIMEOUT_LABELS),
            ],
            drain_cut: recorder.register_counter(&Key::from_static_name(DRAIN_CUT), &METADATA),
            last_refused: Default::default(),
            epoch: std::time::Instant::now(),
        }
    }

    pub fn connections(&self, port: Port) -> &Gauge {
        &self.connections[port.index()]
    }

    pub fn connection_refused(&self, port: Port) {
        self.connections_refused[port.index()].increment(1);
        let ms = self.epoch.elapsed().as_millis() as u64 + 1;
        self.last_refused[port.index()].store(ms, std::sync::atomic::Ordering::Relaxed);
    }

    /// A connection was refused at `port`'s cap within the last minute.
    pub fn refused_lately(&self, port: Port) -> bool {
        let at = self.last_refused[port.index()].load(std::sync::atomic::Ordering::Relaxed);
        at > 0 && self.epoch.elapsed().as_millis() as u64 + 1 - at < 60_000
    }

    pub fn timeout(&self, kind: TimeoutKind) {
        let i = match kind {
            TimeoutKind::Body => 0,
            TimeoutKind::StreamIdle => 1,
            TimeoutKind::Send => 2,
        };
        self.timeouts[i].increment(1);
    }
}

static API_PORT_LABELS: [Label; 1] = [Label::from_static_parts("port", "api")];
static TELEMETRY_PORT_LABELS: [Label; 1] = [Label::from_static_parts("port", "telemetry")];
static METRICS_PORT_LABELS: [Label; 1] = [Label::from_static_parts("port", "metrics")];
static BODY_TIMEOUT_LABELS: [Label; 1] = [Label::from_static_parts("kind", "body")];
static STREAM_IDLE_TIMEOUT_LABELS: [Label; 1] = [Label::from_static_parts("kind", "stream_idle")];
static SEND_TIMEOUT_LABELS: [Label; 1] = [Label::from_static_parts("kind", "send")];

pub const TELEMETRY_REFUSED: &str = "pd_proxy_telemetry_refused_total";
pub const AUTH_FAILURES: &str = "pd_proxy_auth_failures_total";

/// Why a telemetry post (or, for `WorldSize`, its ids) was not counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TelemetryRefusal {
    /// No `?token=`, a wrong one, or more than one (403).
    Token,
    /// It claimed a larger `world_size` than the first event for its
    /// request: counting it would hold the request back for ranks that do
    /// not exist.
    WorldSize,
    /// A body past the telemetry limit (413).
    TooLarge,
    /// A body that did not arrive in time (408).
    Timeout,
    /// Not an LMCache event (400).
    Malformed,
}

impl TelemetryRefusal {
    const ALL: [TelemetryRefusal; 5] = [
        TelemetryRefusal::Token,
        TelemetryRefusal::WorldSize,
        TelemetryRefusal::TooLarge,
        TelemetryRefusal::Timeout,
        TelemetryRefusal::Malformed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            TelemetryRefusal::Token => "token",
            TelemetryRefusal::WorldSize => "world_size",
            TelemetryRefusal::TooLarge => "too_large",
            TelemetryRefusal::Timeout => "timeout",
            TelemetryRefusal::Malformed => "malformed",
        }
    }
}

/// Why a client was answered 401.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthFailure {
    /// No `Authorization` header.
    Missing,
    /// Not `Bearer KEY`, or a key that is not configured.
    Invalid,
}

/// The event names LMCache sends (0.5.6 sends only this one); any other
/// name is counted as `other`, so a sender cannot mint series.
const KNOWN_EVENTS: [&str; 1] = ["request_store_finished"];

/// Counters of who was let in; every label set is fixed here.
struct Access {
    /// One per [`KNOWN_EVENTS`] entry, then `other`.
    telemetry_events: [Counter; 2],
    telemetry_refused: [Counter; 5],
    auth_failures: [Counter; 2],
}

impl Access {
    fn register(recorder: &PrometheusRecorder) -> Self {
        recorder.describe_counter(
            TELEMETRY_REFUSED.into(),
            None,
            "Telemetry posts refused, by reason: token (403), too_large (413), timeout (408), malformed (400), world_size (posts with ids whose world_size exceeded their request's first; not counted towards readiness).".into(),
        );
        recorder.describe_counter(
            AUTH_FAILURES.into(),
            None,
            "API requests answered 401, by reason: missing (no Authorization header) or invalid (not Bearer, or an unknown key).".into(),
        );
        let labelled = |name: &'static str, labels: &'static [Label]| {
            recorder.register_counter(&Key::from_static_parts(name, labels), &METADATA)
        };
        Access {
            telemetry_events: [
                labelled(TELEMETRY_EVENTS, &STORE_FINISHED_LABELS),
                labelled(TELEMETRY_EVENTS, &OTHER_EVENT_LABELS),
            ],
            telemetry_refused: [
                labelled(TELEMETRY_REFUSED, &REFUSED_TOKEN_LABELS),
                labelled(TELEMETRY_REFUSED, &REFUSED_WORLD_SIZE_LABELS),
                labelled(TELEMETRY_REFUSED, &REFUSED_TOO_LARGE_LABELS),
                labelled(TELEMETRY_REFUSED, &REFUSED_TIMEOUT_LABELS),
                labelled(TELEMETRY_REFUSED, &REFUSED_MALFORMED_LABELS),
            ],
            auth_failures: [
                labelled(AUTH_FAILURES, &AUTH_MISSING_LABELS),
                labelled(AUTH_FAILURES, &AUTH_INVALID_LABELS),
            ],
        }
    }
}

impl Metrics {
    pub fn telemetry_event(&self, event: &str) {
        let i = KNOWN_EVENTS
            .iter()
            .position(|known| *known == event)
            .unwrap_or(KNOWN_EVENTS.len());
        self.access.telemetry_events[i].increment(1);
    }

    pub fn telemetry_refused(&self, reason: TelemetryRefusal) {
        let i = TelemetryRefusal::ALL
            .iter()
            .position(|r| *r == reason)
            .expect("every reason is listed");
        self.access.telemetry_refused[i].increment(1);
    }

    pub fn auth_failure(&self, failure: AuthFailure) {
        self.access.auth_failures[usize::from(failure == AuthFailure::Invalid)].increment(1);
    }
}

static STORE_FINISHED_LABELS: [Label; 1] = [Label::from_static_parts("event", KNOWN_EVENTS[0])];
static OTHER_EVENT_LABELS: [Label; 1] = [Label::from_static_parts("event", "other")];
static REFUSED_TOKEN_LABELS: [Label; 1] = [Label::from_static_parts("reason", "token")];
static REFUSED_WORLD_SIZE_LABELS: [Label; 1] = [Label::from_static_parts("reason", "world_size")];
static REFUSED_TOO_LARGE_LABELS: [Label; 1] = [Label::from_static_parts("reason", "too_large")];
static REFUSED_TIMEOUT_LABELS: [Label; 1] = [Label::from_static_parts("reason", "timeout")];
static REFUSED_MALFORMED_LABELS: [Label; 1] = [Label::from_static_parts("reason", "malformed")];
static AUTH_MISSING_LABELS: [Label; 1] = [Label::from_static_parts("reason", "missing")];
static AUTH_INVALID_LABELS: [Label; 1] = [Label::from_static_parts("reason", "invalid")];

//! The counters of who was let in: client keys, the telemetry token, and
//! the telemetry posts refused.

use metrics::{Counter, Key, Label, Recorder};
use metrics_exporter_prometheus::PrometheusRecorder;

use super::{Metrics, METADATA, TELEMETRY_EVENTS};

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
pub(super) struct Access {
    /// One per [`KNOWN_EVENTS`] entry, then `other`.
    telemetry_events: [Counter; 2],
    telemetry_refused: [Counter; 5],
    auth_failures: [Counter; 2],
}

impl Access {
    pub(super) fn register(recorder: &PrometheusRecorder) -> Self {
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

//! The counters of the limits that keep a flood, a slow peer or a
//! shutdown in bounds.

use metrics::{Counter, Gauge, Key, Label, Recorder};
use metrics_exporter_prometheus::PrometheusRecorder;

use super::METADATA;

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
    pub(super) fn register(recorder: &PrometheusRecorder) -> Self {
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

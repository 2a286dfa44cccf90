//! One request's context: made once by the handler, written by every phase
//! through `&mut`, moved into the relayed body at the end. It holds plain
//! data and calls back into no phase, so every phase can point down at it.
//! Dropping it writes the request's one log line, its span and its
//! end-to-end metrics, whichever way the request ended: answered, failed,
//! or dropped by hyper when the client left.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::HeaderValue;

use crate::app::App;
use crate::fleet::Endpoint;
use crate::metrics::Route;
use crate::openai::Api;
use crate::pending::RequestId;
use crate::trace::{Finish, Trace};

pub struct RequestCtx {
    /// The relayed body reaches metrics and the drain's cut through it.
    pub app: Arc<App>,
    pub api: Api,
    /// Parks the request.
    pub id: RequestId,
    /// The id as it goes upstream in `X-Request-Id` and back to the
    /// client (with a cluster key, signed: made once).
    pub wire: HeaderValue,
    /// The `Authorization` every upstream call carries. A copy: header
    /// values share hyper's read buffer, which a parked request must not
    /// pin.
    pub auth: Option<HeaderValue>,
    /// The prefillers the request's gateway named, if it did.
    pub prefillers: Option<Vec<Arc<Endpoint>>>,
    pub span: tracing::Span,
    /// The request's spans (`--otlp-endpoint`), or the client's
    /// `traceparent` to pass on.
    pub trace: Trace,
    /// What the log line says.
    pub record: Record,
}

/// Phase timings and how the request went, as its log line tells them.
pub struct Record {
    pub started: Instant,
    pub stream: bool,
    pub route: Route,
    pub status: Option<u16>,
    pub prefill: Option<Duration>,
    pub kv_wait: Option<Duration>,
    pub kv_timed_out: bool,
    pub decode_ttfb: Option<Duration>,
    pub outcome: Outcome,
    /// Which upstream turned the request down, and what it said.
    pub upstream_said: Option<String>,
}

/// How a request ended, for its log line and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Still running: if the context is dropped like this, the client left.
    Running,
    Completed,
    /// An upstream refused it (4xx), passed through.
    Refused,
    Failed,
    /// The decoder's stream broke, or went silent, after the headers
    /// were sent.
    DecoderBroke,
    /// Still running when the shutdown drain ended.
    Cut,
}

impl Outcome {
    /// As a span attribute; still running at the end: the client left.
    fn name(self) -> &'static str {
        match self {
            Outcome::Running => "client_gone",
            Outcome::Completed => "completed",
            Outcome::Refused => "refused",
            Outcome::Failed => "failed",
            Outcome::DecoderBroke => "decoder_broke",
            Outcome::Cut => "cut",
        }
    }
}

impl RequestCtx {
    /// Counts the request in for the shutdown drain until it is dropped.
    pub fn new(app: Arc<App>, api: Api, id: RequestId, wire: HeaderValue) -> Self {
        app.requests.fetch_add(1, Ordering::AcqRel);
        let span = tracing::info_span!(
            "request",
            id = wire.to_str().unwrap_or_default(),
            api = api.as_str()
        );
        RequestCtx {
            app,
            api,
            id,
            wire,
            auth: None,
            prefillers: None,
            span,
            trace: Trace::Off,
            record: Record {
                started: Instant::now(),
                stream: false,
                route: Route::Pd,
                status: None,
                prefill: None,
                kv_wait: None,
                kv_timed_out: false,
                decode_ttfb: None,
                outcome: Outcome::Running,
                upstream_said: None,
            },
        }
    }

    /// The request failed with `status` before any answer was relayed.
    pub fn failed(&mut self, status: u16) {
        self.record.status = Some(status);
        self.record.outcome = Outcome::Failed;
    }

    /// Every byte of the answer was handed to hyper. An outcome already
    /// decided (a broken stream, a cut) stands.
    pub fn completed(&mut self) {
        if self.record.outcome == Outcome::Running {
            self.record.outcome = Outcome::Completed;
        }
    }

    /// The decoder's first byte, `elapsed` after the decode leg started.
    pub fn first_byte(&mut self, elapsed: Duration) {
        self.record.decode_ttfb = Some(elapsed);
        self.app.metrics.decode_ttfb_seconds.record(elapsed);
        self.trace.first_byte();
    }
}

fn ms(d: Option<Duration>) -> f64 {
    d.map_or(-1.0, |d| (d.as_secs_f64() * 1e6).round() / 1e3)
}

impl Drop for RequestCtx {
    fn drop(&mut self) {
        let app = &self.app;
        let r = &self.record;
        app.requests.fetch_sub(1, Ordering::AcqRel);
        let total = r.started.elapsed();
        let client_gone = r.outcome == Outcome::Running;
        // 499: nginx's "client closed request", the usual name for it.
        let status = if client_gone {
            499
        } else {
            r.status.unwrap_or(500)
        };
        app.metrics.e2e_seconds.record(total);
        app.metrics.request(self.api, status);
        if client_gone {
            app.metrics.client_disconnects.increment(1);
        }
        let route = if r.route == Route::Pd { "pd" } else { "direct" };
        self.trace.finish(&Finish {
            status,
            outcome: r.outcome.name(),
            failed: !matches!(r.outcome, Outcome::Completed | Outcome::Refused),
            route,
            stream: r.stream,
            kv_timed_out: r.kv_timed_out,
        });
        tracing::info!(
            parent: &self.span,
            status,
            stream = r.stream,
            route,
            outcome = ?r.outcome,
            prefill_ms = ms(r.prefill),
            kv_wait_ms = ms(r.kv_wait),
            kv_timed_out = r.kv_timed_out,
            decode_ttfb_ms = ms(r.decode_ttfb),
            total_ms = ms(Some(total)),
            upstream_said = r.upstream_said.as_deref(),
            "request finished"
        );
    }
}

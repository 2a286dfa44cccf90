//! The one upstream loop both legs run: pick an endpoint, send, classify
//! the answer, and try another endpoint while the caller's rule allows.
//! The whole leg, retries included, runs within one `--upstream-timeout`.
//! Nothing that may have reached an engine is retried unless the engine
//! said it did not take it (503): the prefill leg may move on a connect
//! error, a reset or a 503; the decode leg, whose engine may already be
//! generating, only on a connect error.

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::{HeaderName, HeaderValue, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;

use super::answer::{uri, Whole};
use super::ctx::RequestCtx;
use crate::app::App;
use crate::error::{Leg, ProxyError, UpstreamError};
use crate::fleet::{Endpoint, InFlight, Role};
use crate::trace::{Phase, TRACEPARENT};
use crate::upstream;

pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// One leg's rules, given by its phase.
pub struct Plan<'a> {
    pub leg: Leg,
    pub role: Role,
    /// The endpoints a gateway named; `None`: the role's whole set.
    pub named: Option<&'a [Arc<Endpoint>]>,
    /// Endpoints tried after the first, at most.
    pub retries: usize,
    /// Which failures another endpoint may take over.
    pub retry: fn(&UpstreamError) -> bool,
    /// The whole leg, retries included, ends by then ([`deadline`]).
    pub deadline: tokio::time::Instant,
}

/// A leg's deadline, `--upstream-timeout` from now.
pub fn deadline(app: &App) -> tokio::time::Instant {
    tokio::time::Instant::now() + app.config.fleet.upstream_timeout
}

/// An upstream call that ran past `--upstream-timeout` on `leg`, counted.
pub fn timed_out(app: &App, leg: Leg) -> ProxyError {
    app.metrics.upstream_error(leg);
    ProxyError::UpstreamTimeout {
        leg,
        secs: app.config.fleet.upstream_timeout.as_secs_f64(),
    }
}

/// An answer that was not the endpoint's failure.
pub struct Answered<T> {
    pub value: T,
    /// Counts the request at its endpoint; the phase reports success.
    pub in_flight: InFlight,
    /// When the answering attempt was sent, for the endpoint's latency.
    pub sent_at: Instant,
    /// The leg's span, for the phase to end or hold.
    pub span: Phase,
}

/// What a leg's answer says of itself.
pub trait Status {
    fn status(&self) -> StatusCode;
}

impl Status for Whole {
    fn status(&self) -> StatusCode {
        self.status
    }
}

impl Status for http::Response<Incoming> {
    fn status(&self) -> StatusCode {
        http::Response::status(self)
    }
}

/// Runs the leg: `send` makes one attempt at the endpoint it is given,
/// with the leg's `traceparent`, and says how it went.
pub async fn call<T, F, Fut>(
    ctx: &RequestCtx,
    plan: Plan<'_>,
    mut send: F,
) -> Result<Answered<T>, ProxyError>
where
    T: Status,
    F: FnMut(&Arc<Endpoint>, Option<&HeaderValue>) -> Fut,
    Fut: Future<Output = Result<T, UpstreamError>>,
{
    let app = &ctx.app;
    let (mut span, traceparent) = ctx.trace.leg(plan.leg.as_str());
    let mut tried: Vec<Arc<Endpoint>> = Vec::new();
    let mut last_error = None;
    loop {
        let endpoint = pick(app, &plan, &tried, last_error.take())?;
        tried.push(Arc::clone(&endpoint));
        let retries = tried.len() - 1;
        let in_flight = endpoint.start();
        let sent_at = Instant::now();
        let attempt = send(&endpoint, traceparent.as_ref());
        let Ok(result) = tokio::time::timeout_at(plan.deadline, attempt).await else {
            return Err(timed_out(app, plan.leg));
        };
        let done = |span: &mut Phase, status: StatusCode| {
            let role = plan.role.as_str();
            ctx.trace
                .leg_done(span, role, &endpoint.authority, retries, status.as_u16());
        };
        let err = match result {
            Ok(value) => {
                done(&mut span, value.status());
                return Ok(Answered {
                    value,
                    in_flight,
                    sent_at,
                    span,
                });
            }
            Err(err) => err,
        };
        if err.endpoint_failed() {
            in_flight.failed(&err.why());
        }
        app.metrics.upstream_error(plan.leg);
        if !(plan.retry)(&err) || retries >= plan.retries {
            if let Some(status) = err.status() {
                done(&mut span, status);
            }
            return Err(err.into());
        }
        last_error = Some(err);
    }
}

/// Picks an endpoint of the plan's role not yet tried; counts a retry when
/// this is not the first try, and a panic pick when no endpoint was
/// healthy. With none left, the last failure is the leg's answer.
fn pick(
    app: &App,
    plan: &Plan<'_>,
    tried: &[Arc<Endpoint>],
    last_error: Option<UpstreamError>,
) -> Result<Arc<Endpoint>, ProxyError> {
    let set = app.fleet.role(plan.role);
    let picked = match plan.named {
        Some(named) => set.pick_from(named, tried),
        None => set.pick(tried),
    };
    let Some(pick) = picked else {
        if let Some(err) = last_error {
            return Err(err.into());
        }
        app.metrics.upstream_error(plan.leg);
        return Err(ProxyError::NoUpstream(plan.role.as_str()));
    };
    if pick.panic {
        app.metrics.panic_pick(plan.role);
    }
    if let Some(previous) = tried.last() {
        previous.count_retry();
        app.metrics.retry(plan.leg);
        tracing::warn!(
            leg = plan.leg.as_str(),
            from = %previous.authority,
            to = %pick.endpoint.authority,
            "retrying on another endpoint"
        );
    }
    Ok(pick.endpoint)
}

/// Sends one attempt; a failure of the HTTP client is classified as the
/// endpoint's.
pub fn send<'a>(
    ctx: &'a RequestCtx,
    leg: Leg,
    endpoint: &Arc<Endpoint>,
    req: http::Request<Full<Bytes>>,
) -> impl Future<Output = Result<http::Response<Incoming>, UpstreamError>> + 'a {
    let endpoint = Arc::clone(endpoint);
    let call = ctx.app.client.request(req);
    async move {
        call.await
            .map_err(|e| UpstreamError::from_client(leg, &endpoint.authority, e))
    }
}

/// The request a leg sends to `endpoint`: the body as the phase made it,
/// the request's id in `X-Request-Id` (replaced, not added), its
/// credentials and the leg's `traceparent`.
pub fn request(
    ctx: &RequestCtx,
    endpoint: &Endpoint,
    body: Bytes,
    traceparent: Option<&HeaderValue>,
) -> http::Request<Full<Bytes>> {
    let mut req = upstream::post_json(
        uri(endpoint, ctx.api),
        body,
        ctx.auth.as_ref(),
        Some((X_REQUEST_ID.as_str(), ctx.wire.clone())),
    );
    if let Some(traceparent) = traceparent {
        req.headers_mut()
            .insert(TRACEPARENT.clone(), traceparent.clone());
    }
    req
}

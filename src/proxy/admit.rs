//! What is decided from the request's headers before its body is read, and
//! whether the proxy takes it in: loops, credentials, the gateway's choice
//! of prefiller, and a place among the parked requests.

use axum::response::{IntoResponse, Response};
use http::{header, HeaderMap, HeaderName, HeaderValue};
use tokio::sync::oneshot;

use super::ctx::RequestCtx;
use crate::app::App;
use crate::error::ProxyError;
use crate::pending::ParkedGuard;
use crate::upstream;

/// llm-d's header: the gateway's choice of prefiller(s) for this request.
static PREFILLER_HEADER: HeaderName = HeaderName::from_static("x-prefiller-host-port");

/// A request that a pd-proxy already forwarded is not forwarded again:
/// an upstream list that points back at a proxy would otherwise recurse
/// until file descriptors run out.
pub fn refuse_loop(app: &App, headers: &HeaderMap) -> Option<Response> {
    if !headers.contains_key(&upstream::HOP_HEADER) {
        return None;
    }
    app.metrics.loops.increment(1);
    tracing::warn!("refused a request that came from a pd-proxy (x-pd-proxy-hop): an upstream points back at a proxy");
    Some(ProxyError::LoopDetected.into_response())
}

/// The `Authorization` sent upstream: a configured key wins; without one,
/// the client's own credentials, copied out of the request's headers —
/// unless the proxy checks client keys (`--api-key`): then the client's
/// key is the proxy's credential and never leaves it.
pub fn upstream_auth(app: &App, headers: &HeaderMap) -> Option<HeaderValue> {
    if let Some(key) = &app.config.fleet.upstream_auth {
        return Some(key.clone());
    }
    if !app.config.security.api_keys.is_empty() {
        return None;
    }
    let value = headers.get(header::AUTHORIZATION)?;
    let mut copy = HeaderValue::from_bytes(value.as_bytes()).ok()?;
    copy.set_sensitive(true);
    Some(copy)
}

/// The `x-prefiller-host-port` values, joined as one comma list; an
/// unreadable value is kept as is, to be refused with the rest.
pub fn named_prefillers(headers: &HeaderMap) -> Option<String> {
    let mut values = headers.get_all(&PREFILLER_HEADER).iter().peekable();
    values.peek()?;
    let joined: Vec<String> = values
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .collect();
    Some(joined.join(","))
}

/// Checks a gateway's choice of prefillers against the known fleet before
/// anything is read or sent.
pub fn gateway_choice(ctx: &mut RequestCtx, named: Option<String>) -> Result<(), ProxyError> {
    ctx.prefillers = named
        .map(|value| ctx.app.fleet.header_prefillers(&value))
        .transpose()
        .map_err(|message| ProxyError::bad_request(message, Some("x-prefiller-host-port")))?;
    Ok(())
}

/// Parks the request for its KV-ready event, within `--max-pending`.
pub fn park(
    ctx: &RequestCtx,
    prompts: usize,
) -> Result<(ParkedGuard, oneshot::Receiver<()>), ProxyError> {
    let app = &ctx.app;
    app.pending.park(ctx.id, prompts).ok_or_else(|| {
        app.metrics.guards.pending_full.increment(1);
        ProxyError::Overloaded {
            message: format!(
                "{} requests are already waiting for their KV cache (--max-pending); try again shortly",
                app.config.limits.max_pending
            ),
            retry_after: 1,
        }
    })
}

//! The client's body: read whole within its limits and the shared budget,
//! then parsed for what routing needs.

use std::sync::Arc;

use axum::body::Body;
use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;
use tokio::time::timeout;

use super::ctx::RequestCtx;
use crate::app::App;
use crate::error::ProxyError;
use crate::metrics::{Route, TimeoutKind};
use crate::openai::{Api, ClientRequest};
use crate::tokens::PromptSize;

/// Bodies up to this size are parsed on the async worker that read them;
/// larger ones on the blocking pool, so that a 30 MiB prompt does not
/// hold up every other connection of that worker (and the telemetry
/// port) while it is parsed.
const PARSE_INLINE_MAX: usize = 256 << 10;

/// Reads the whole body into one buffer, within `--max-body-bytes` and
/// `--body-timeout`. A declared length past the limit is refused before a
/// byte is read; otherwise the buffer is sized from it once, so a large
/// body costs its size once, not a list of chunks plus their copy.
///
/// Every byte read is first taken from the app's body budget: bodies held
/// at once, across all requests, stay within it, so many large requests
/// together get 503s rather than the pod killed for memory.
pub async fn read(
    app: &App,
    body: Body,
    content_length: Option<u64>,
) -> Result<(Bytes, BodyBudget), ProxyError> {
    let limit = app.config.limits.max_body_bytes;
    if content_length.is_some_and(|n| n > limit as u64) {
        return Err(ProxyError::PayloadTooLarge { limit });
    }
    let mut budget = BodyBudget::default();
    let declared = content_length.map_or(0, |n| n as usize);
    budget.take(app, declared)?;
    let mut buf = BytesMut::with_capacity(declared);
    let mut body = body;
    let read = async {
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| {
                ProxyError::bad_request(format!("could not read the request body: {e}"), None)
            })?;
            if let Ok(data) = frame.into_data() {
                let len = buf.len() + data.len();
                if len > limit {
                    return Err(ProxyError::PayloadTooLarge { limit });
                }
                budget.take(app, len)?;
                buf.extend_from_slice(&data);
            }
        }
        Ok(())
    };
    match timeout(app.config.limits.body_timeout, read).await {
        Ok(Ok(())) => Ok((buf.freeze(), budget)),
        Ok(Err(e)) => Err(e),
        Err(_) => {
            app.metrics.guards.timeout(TimeoutKind::Body);
            Err(ProxyError::RequestTimeout(format!(
                "the request body did not arrive within {:.1}s (--body-timeout)",
                app.config.limits.body_timeout.as_secs_f64()
            )))
        }
    }
}

/// A request's share of the body budget, in KiB, given back when dropped.
#[derive(Default)]
pub struct BodyBudget {
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl BodyBudget {
    /// Grows the share to cover `bytes`; a 503 when the budget is spent.
    fn take(&mut self, app: &App, bytes: usize) -> Result<(), ProxyError> {
        let want = bytes.div_ceil(1024);
        let held = self.permit.as_ref().map_or(0, |p| p.num_permits());
        if want <= held {
            return Ok(());
        }
        let more = u32::try_from(want - held).unwrap_or(u32::MAX);
        let Ok(permit) = Arc::clone(&app.body_budget).try_acquire_many_owned(more) else {
            app.metrics.guards.body_budget_full.increment(1);
            return Err(ProxyError::Overloaded {
                message: "the proxy holds as many request bodies in memory as it allows; try again shortly".into(),
                retry_after: 1,
            });
        };
        match &mut self.permit {
            Some(held) => held.merge(permit),
            None => self.permit = Some(permit),
        }
        Ok(())
    }
}

/// What routing needs of a parsed body. The parsed body itself does not
/// outlive parsing: it would sit in memory for the whole KV wait.
pub struct Parsed {
    /// The prefiller's copy; `None` when the request goes direct.
    pub prefill_body: Option<Bytes>,
    pub prompts: usize,
    pub size: PromptSize,
}

/// Parses the body, decides the route (`--direct-below-tokens`) and
/// records both in the context.
pub async fn parse(ctx: &mut RequestCtx, raw: &Bytes) -> Result<Parsed, ProxyError> {
    let api = ctx.api;
    let (parsed, route, stream) = if raw.len() <= PARSE_INLINE_MAX {
        parse_now(&ctx.app, api, raw)?
    } else {
        let (app, raw) = (Arc::clone(&ctx.app), raw.clone());
        tokio::task::spawn_blocking(move || parse_now(&app, api, &raw))
            .await
            .map_err(|e| {
                ProxyError::bad_request(format!("the request could not be parsed: {e}"), None)
            })??
    };
    ctx.record.stream = stream;
    ctx.record.route = route;
    ctx.app.metrics.route(route);
    Ok(parsed)
}

fn parse_now(app: &App, api: Api, raw: &[u8]) -> Result<(Parsed, Route, bool), ProxyError> {
    let request = ClientRequest::parse(api, raw)?;
    let threshold = app.config.fleet.direct_below_tokens;
    let route = if threshold > 0 && app.tokens.tokens(&request.size) < u64::from(threshold) {
        Route::Direct
    } else {
        Route::Pd
    };
    let parsed = Parsed {
        prefill_body: (route == Route::Pd).then(|| request.prefill_body()),
        prompts: request.prompts,
        size: request.size,
    };
    Ok((parsed, route, request.stream))
}

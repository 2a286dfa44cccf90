//! The prefill leg: the one-token copy goes to a prefiller, whose answer is
//! read whole. The prefiller's own 4xx goes back to the client as it came:
//! vLLM's validation message is the best answer there is, and decoding a
//! request the engine refused is pointless.

use std::sync::Arc;
use std::time::Instant;

use axum::response::Response;
use bytes::Bytes;
use http::HeaderValue;

use super::answer::{passthrough, read_whole, status_error, upstream_said};
use super::ctx::{Outcome, RequestCtx};
use super::leg::{self, Plan};
use crate::error::{Leg, ProxyError, UpstreamError};
use crate::fleet::Role;
use crate::tokens::PromptSize;
use crate::upstream;

/// Sends the copy, with retries on another prefiller as [`leg`] allows up
/// to `--prefill-retries`. `Ok(Some(..))` is the prefiller's refusal, to
/// pass on; `Ok(None)`: the prompt is computed and its KV on its way.
pub async fn run(
    ctx: &mut RequestCtx,
    body: Bytes,
    size: PromptSize,
) -> Result<Option<Response>, ProxyError> {
    let started = Instant::now();
    let plan = Plan {
        leg: Leg::Prefill,
        role: Role::Prefiller,
        named: ctx.prefillers.as_deref(),
        retries: ctx.app.config.fleet.prefill_retries as usize,
        retry: UpstreamError::retryable,
        deadline: leg::deadline(&ctx.app),
    };
    let result = leg::call(ctx, plan, |prefiller, traceparent| {
        let mut req = leg::request(ctx, prefiller, body.clone(), traceparent);
        req.headers_mut().insert(
            upstream::LOAD_FORMAT_HEADER.clone(),
            HeaderValue::from_static("JSON"),
        );
        let sent = leg::send(ctx, Leg::Prefill, prefiller, req);
        let prefiller = Arc::clone(prefiller);
        async move {
            let authority = &prefiller.authority;
            let response = sent.await?;
            if let Some(waiting) = response
                .headers()
                .get(&upstream::LOAD_HEADER)
                .and_then(upstream::orca_waiting)
            {
                prefiller.report_orca_waiting(waiting);
            }
            let whole = read_whole(Leg::Prefill, authority, response).await?;
            if whole.status.is_server_error() {
                return Err(status_error(
                    Leg::Prefill,
                    authority,
                    whole.status,
                    &whole.body,
                ));
            }
            Ok(whole)
        }
    })
    .await;
    // The leg's time counts whenever a prefiller answered, an error
    // status included.
    let answered = match &result {
        Ok(_) => true,
        Err(ProxyError::Upstream(err)) => err.status().is_some(),
        Err(_) => false,
    };
    if answered {
        let elapsed = started.elapsed();
        ctx.app.metrics.prefill_seconds.record(elapsed);
        ctx.record.prefill = Some(elapsed);
    }
    let answer = result?;
    let prefiller = Arc::clone(answer.in_flight.endpoint());
    let whole = answer.value;
    answer.in_flight.succeeded();
    if whole.status.is_success() {
        prefiller.observe_latency(answer.sent_at.elapsed());
        // The engine's exact count teaches the length estimate; only
        // worth a parse when the estimate is in use.
        if ctx.app.config.fleet.direct_below_tokens > 0 {
            if let Some(tokens) = crate::tokens::prompt_tokens(&whole.body) {
                ctx.app.tokens.learn(&size, tokens);
            }
        }
        return Ok(None);
    }
    ctx.record.status = Some(whole.status.as_u16());
    ctx.record.outcome = Outcome::Refused;
    ctx.record.upstream_said = Some(upstream_said(
        "prefiller",
        &prefiller.authority,
        &whole.body,
    ));
    Ok(Some(passthrough(whole)))
}

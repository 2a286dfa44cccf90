//! The disaggregated request, as a list of phases over one context:
//!
//! admit → read and parse the body → park → prefill → await KV-ready →
//! decode → relay
//!
//! [`run`] is that list; each phase is a function in its own file, and
//! [`ctx::RequestCtx`] is what they share. Every leg runs inside the
//! request's own future. When the client goes away, hyper drops that
//! future (or the response body), which drops the upstream calls (closing
//! their connections, so vLLM aborts the work) and the parked entry's
//! guard. No task is spawned per request, so nothing outlives its client.

mod admit;
mod answer;
mod body;
mod ctx;
mod decode;
mod kv;
mod leg;
mod models;
mod prefill;
mod relay;

use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use http::{header, HeaderMap, HeaderValue};
use tracing::Instrument;

use self::ctx::RequestCtx;
use self::leg::X_REQUEST_ID;
use self::relay::Reply;
use crate::app::App;
use crate::error::ProxyError;
use crate::openai::Api;
use crate::pending::RequestId;
use crate::shutdown::Stage;
use crate::trace::{Trace, TraceParent};

pub use self::models::models;

pub async fn chat(State(app): State<Arc<App>>, headers: HeaderMap, body: Body) -> Response {
    handle(app, Api::Chat, headers, body).await
}

pub async fn completions(State(app): State<Arc<App>>, headers: HeaderMap, body: Body) -> Response {
    handle(app, Api::Completions, headers, body).await
}

/// Makes the request's context, runs the phases, and answers: a failure in
/// OpenAI's shape, or a stream whose body takes the context over.
async fn handle(app: Arc<App>, api: Api, headers: HeaderMap, body: Body) -> Response {
    if let Some(refusal) = admit::refuse_loop(&app, &headers) {
        return refusal;
    }
    let id = RequestId::random();
    // The id as the engines and the client see it (with a cluster key, the
    // owner-routed form), so one string finds the request in every log.
    let wire = HeaderValue::try_from(app.ids().wire(id)).expect("hex is a valid header value");
    let mut ctx = RequestCtx::new(Arc::clone(&app), api, id, wire);
    // Header values share hyper's connection read buffer; a request parked
    // for seconds must not pin that buffer, so only copies of what is used
    // later are kept.
    ctx.auth = admit::upstream_auth(&app, &headers);
    let named = admit::named_prefillers(&headers);
    ctx.trace = Trace::start(
        app.tracing.as_ref(),
        TraceParent::from_headers(&headers),
        ctx.wire.to_str().unwrap_or_default(),
        api.as_str(),
    );
    let content_length = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    drop(headers);
    let span = ctx.span.clone();
    let work = run(&mut ctx, named, body, content_length).instrument(span);
    let result = tokio::select! {
        result = work => result,
        () = app.shutdown.reached(Stage::Cut) => Err(ProxyError::Overloaded {
            message: "the proxy is shutting down and its drain time is up; send the request again".into(),
            retry_after: 1,
        }),
    };
    let wire = ctx.wire.clone();
    let mut response = match result {
        Ok(Reply::Whole(response)) => response,
        Ok(Reply::Stream(stream)) => stream.into_response(ctx),
        Err(err) => {
            ctx.failed(err.status().as_u16());
            err.into_response()
        }
    };
    response.headers_mut().insert(X_REQUEST_ID.clone(), wire);
    response
}

/// The phases, in order.
async fn run(
    ctx: &mut RequestCtx,
    named: Option<String>,
    body: Body,
    content_length: Option<u64>,
) -> Result<Reply, ProxyError> {
    admit::gateway_choice(ctx, named)?;
    // Held until the request's bodies are sent: the budget counts them.
    let (raw, _budget) = body::read(&ctx.app, body, content_length).await?;
    let parsed = body::parse(ctx, &raw).await?;
    if let Some(prefill_body) = parsed.prefill_body {
        let (guard, kv_ready) = admit::park(ctx, parsed.prompts)?;
        // The legs are boxed. Inline, their futures (hyper's client calls:
        // ~2 KB for the prefill, ~1 KB each for the decode and the relay)
        // would size the whole request future, and every parked request
        // would hold them through the KV wait.
        if let Some(refusal) = Box::pin(prefill::run(ctx, prefill_body, parsed.size)).await? {
            return Ok(Reply::Whole(refusal));
        }
        kv::await_ready(ctx, guard, kv_ready).await?;
    }
    let answer = Box::pin(decode::run(ctx, raw)).await?;
    Box::pin(relay::start(ctx, answer)).await
}

#[cfg(test)]
mod tests {
    use std::future::Future;

    use super::*;

    /// The size of the future an async fn returns, without calling it.
    fn future_size<A, B, C, D, F: Future>(_: impl Fn(A, B, C, D) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// Pinned where memory matters. A parked request holds its handler's
    /// future through the KV wait (10,000 of them in the memory bench);
    /// a slow SSE client holds the relayed body for the whole stream. A
    /// change here is deliberate: box what grew, or say why it must.
    #[test]
    fn a_parked_request_and_a_relayed_stream_stay_small() {
        assert_eq!(std::mem::size_of::<RequestCtx>(), 304);
        assert_eq!(future_size(handle), 1200);
        assert_eq!(std::mem::size_of::<relay::Relayed>(), 672);
    }
}

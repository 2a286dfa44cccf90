//! `/v1/models`: the first good answer among a few upstreams asked at once.

use std::sync::Arc;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use http::HeaderMap;
use tokio::time::timeout;

use super::admit::{refuse_loop, upstream_auth};
use super::answer::{passthrough, read_whole, status_error};
use super::leg::timed_out;
use crate::app::App;
use crate::error::{Leg, ProxyError, UpstreamError, UpstreamKind};
use crate::fleet::Endpoint;

/// Endpoints asked at once for `/v1/models`: enough that a few dead ones
/// do not matter, few enough that one call is not a fan-out to the fleet.
const MODELS_ASKED: usize = 4;

/// Upstream answers relayed to `/v1/models`: the first 200 among up to
/// [`MODELS_ASKED`] endpoints asked at once (healthy ones first,
/// prefillers before decoders), all within one `--upstream-timeout`, so a
/// fleet of dead servers costs one timeout, not one each.
pub async fn models(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    if let Some(refusal) = refuse_loop(&app, &headers) {
        return refusal;
    }
    let auth = upstream_auth(&app, &headers);
    let auth = auth.as_ref();
    let (prefillers, decoders) = (
        app.fleet.prefillers.snapshot(),
        app.fleet.decoders.snapshot(),
    );
    let all: Vec<&Arc<Endpoint>> = prefillers.iter().chain(decoders.iter()).collect();
    let (healthy, rest): (Vec<_>, Vec<_>) = all.into_iter().partition(|e| e.healthy());
    let app = &app;
    let mut asks: futures_util::stream::FuturesUnordered<_> = healthy
        .into_iter()
        .chain(rest)
        .take(MODELS_ASKED)
        .map(|endpoint| async move {
            let authority = &endpoint.authority;
            let response = app
                .client
                .request(crate::upstream::get(&endpoint.models_uri, auth))
                .await
                .map_err(|e| UpstreamError::from_client(Leg::Models, authority, e))?;
            let whole = read_whole(Leg::Models, authority, response).await?;
            if !whole.status.is_success() {
                return Err(status_error(
                    Leg::Models,
                    authority,
                    whole.status,
                    &whole.body,
                ));
            }
            Ok(whole)
        })
        .collect();
    let mut last_error = UpstreamError {
        leg: Leg::Models,
        endpoint: None,
        kind: UpstreamKind::NoEndpoint,
        source: None,
    };
    let first_ok = async {
        while let Some(answer) = futures_util::StreamExt::next(&mut asks).await {
            last_error = match answer {
                Ok(whole) => return Some(passthrough(whole)),
                Err(e) => e,
            };
            app.metrics.upstream_error(Leg::Models);
            tracing::warn!(error = %last_error, "/v1/models upstream failed");
        }
        None
    };
    match timeout(app.config.fleet.upstream_timeout, first_ok).await {
        Ok(Some(response)) => response,
        Ok(None) => ProxyError::from(last_error).into_response(),
        Err(_) => timed_out(app, Leg::Models).into_response(),
    }
}

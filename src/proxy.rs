//! The disaggregated request, top to bottom, one function per phase:
//!
//! accept → pick prefiller and decoder → park → prefill → await KV-ready →
//! decode → relay.
//!
//! Every leg runs inside the request's own future. When the client goes
//! away, hyper drops that future (or the response body), which drops the
//! upstream calls (closing their connections, so vLLM aborts the work) and
//! the [`ParkedGuard`] (freeing the parked entry). No task is spawned per
//! request, so nothing outlives its client.

use std::error::Error as _;
use std::future::Future as _;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use bytes::{Bytes, BytesMut};
use http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode, Uri};
use http_body::{Body as _, Frame, SizeHint};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use tokio::sync::oneshot;
use tokio::time::timeout;
use tracing::Instrument;

use crate::app::App;
use crate::config::KvTimeoutPolicy;
use crate::error::{error_json, Leg, ProxyError};
use crate::fleet::{Endpoint, InFlight, Role};
use crate::metrics::{Route, TimeoutKind};
use crate::openai::{Api, ClientRequest};
use crate::pending::{ParkedGuard, RequestId};
use crate::shutdown::Stage;
use crate::tokens::PromptSize;
use crate::trace::{Finish, Trace, TraceParent, TRACEPARENT};
use crate::upstream;

/// Bodies up to this size are parsed on the async worker that read them;
/// larger ones on the blocking pool, so that a 30 MiB prompt does not
/// hold up every other connection of that worker (and the telemetry
/// port) while it is parsed.
const PARSE_INLINE_MAX: usize = 256 << 10;

/// Largest upstream body the proxy reads whole (prefill answers, errors,
/// model lists); streamed decoder bodies are not read whole.
const MAX_UPSTREAM_BODY_BYTES: usize = 64 << 20;

static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

pub async fn chat(State(app): State<Arc<App>>, headers: HeaderMap, body: Body) -> Response {
    handle(app, Api::Chat, headers, body).await
}

pub async fn completions(State(app): State<Arc<App>>, headers: HeaderMap, body: Body) -> Response {
    handle(app, Api::Completions, headers, body).await
}

async fn handle(app: Arc<App>, api: Api, headers: HeaderMap, body: Body) -> Response {
    if let Some(refusal) = refuse_loop(&app, &headers) {
        return refusal;
    }
    // Header values share hyper's connection read buffer; a request parked
    // for seconds must not pin that buffer, so only a copy of the one
    // header used later is kept.
    let auth = upstream_auth(&app, &headers);
    let named = named_prefillers(&headers);
    let parent = TraceParent::from_headers(&headers);
    let content_length = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    drop(headers);
    let id = RequestId::random();
    // The id as the engines and the client see it (with a cluster key, the
    // owner-routed form), so one string finds the request in every log.
    let wire = id_header(&app, id);
    let span = tracing::info_span!(
        "request",
        id = wire.to_str().unwrap_or_default(),
        api = api.as_str()
    );
    let mut log = RequestLog::new(Arc::clone(&app), api, span.clone());
    log.trace = Trace::start(
        app.tracing.as_ref(),
        parent,
        wire.to_str().unwrap_or_default(),
        api.as_str(),
    );
    let ask = Ask {
        api,
        id,
        wire: &wire,
        auth: auth.as_ref(),
        prefillers: None,
    };
    let work = run(&app, ask, named, body, content_length, &mut log).instrument(span);
    let result = tokio::select! {
        result = work => result,
        () = app.shutdown.reached(Stage::Cut) => Err(ProxyError::Overloaded {
            message: "the proxy is shutting down and its drain time is up; send the request again".into(),
            retry_after: 1,
        }),
    };
    let mut response = match result {
        Ok(response) => response,
        Err(err) => {
            log.status = Some(err.status().as_u16());
            log.outcome = Outcome::Failed;
            err.into_response()
        }
    };
    response.headers_mut().insert(X_REQUEST_ID.clone(), wire);
    response
}

/// The `Authorization` sent upstream: a configured key wins; without one,
/// the client's own credentials, copied out of the request's headers —
/// unless the proxy checks client keys (`--api-key`): then the client's
/// key is the proxy's credential and never leaves it.
fn upstream_auth(app: &App, headers: &HeaderMap) -> Option<HeaderValue> {
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

/// A request that a pd-proxy already forwarded is not forwarded again:
/// an upstream list that points back at a proxy would otherwise recurse
/// until file descriptors run out.
fn refuse_loop(app: &App, headers: &HeaderMap) -> Option<Response> {
    if !headers.contains_key(&upstream::HOP_HEADER) {
        return None;
    }
    app.metrics.loops.increment(1);
    tracing::warn!("refused a request that came from a pd-proxy (x-pd-proxy-hop): an upstream points back at a proxy");
    Some(ProxyError::LoopDetected.into_response())
}

/// What every upstream call of one request carries.
#[derive(Clone, Copy)]
struct Ask<'a> {
    api: Api,
    /// Parks the request.
    id: RequestId,
    /// The id as it goes upstream in `X-Request-Id` and back to the
    /// client (with a cluster key, signed: made once).
    wire: &'a HeaderValue,
    auth: Option<&'a HeaderValue>,
    /// The prefillers the request's gateway named, if it did.
    prefillers: Option<&'a [Arc<Endpoint>]>,
}

/// llm-d's header: the gateway's choice of prefiller(s) for this request.
static PREFILLER_HEADER: HeaderName = HeaderName::from_static("x-prefiller-host-port");

/// The `x-prefiller-host-port` values, joined as one comma list; an
/// unreadable value is kept as is, to be refused with the rest.
fn named_prefillers(headers: &HeaderMap) -> Option<String> {
    let mut values = headers.get_all(&PREFILLER_HEADER).iter().peekable();
    values.peek()?;
    let joined: Vec<String> = values
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .collect();
    Some(joined.join(","))
}

/// The id as vLLM sees it: with a cluster key it names this replica, so
/// that LMCache's event for it finds its way back here.
fn id_header(app: &App, id: RequestId) -> HeaderValue {
    HeaderValue::try_from(app.ids().wire(id)).expect("hex is a valid header value")
}

async fn run(
    app: &Arc<App>,
    mut ask: Ask<'_>,
    named: Option<String>,
    body: Body,
    content_length: Option<u64>,
    log: &mut RequestLog,
) -> Result<Response, ProxyError> {
    // A gateway's choice is checked before anything is read or sent.
    let named = named
        .map(|value| app.fleet.header_prefillers(&value))
        .transpose()
        .map_err(|message| ProxyError::bad_request(message, Some("x-prefiller-host-port")))?;
    ask.prefillers = named.as_deref();
    let api = ask.api;
    // Held until the request's bodies are sent: the budget counts them.
    let (raw, _budget) = read_body(app, body, content_length).await?;
    let Parsed {
        prefill_body,
        prompts,
        size,
        route,
        stream,
    } = if raw.len() <= PARSE_INLINE_MAX {
        parse(app, api, &raw)?
    } else {
        let (app, raw) = (Arc::clone(app), raw.clone());
        tokio::task::spawn_blocking(move || parse(&app, api, &raw))
            .await
            .map_err(|e| {
                ProxyError::bad_request(format!("the request could not be parsed: {e}"), None)
            })??
    };
    log.stream = stream;
    log.route = route;
    app.metrics.route(route);
    if let Some(prefill_body) = prefill_body {
        let Some((guard, kv_ready)) = app.pending.park(ask.id, prompts) else {
            app.metrics.guards.pending_full.increment(1);
            return Err(ProxyError::Overloaded {
                message: format!(
                    "{} requests are already waiting for their KV cache (--max-pending); try again shortly",
                    app.config.limits.max_pending
                ),
                retry_after: 1,
            });
        };
        // The steps around the KV wait are boxed. Inline, their futures
        // (hyper's client calls: 2.2 KB for the prefill, 1.1 KB for the
        // decode, 1 KB for the relay) would size the whole request future,
        // and a parked request would hold 6.1 KB through the wait instead
        // of 1 KB.
        if let Some(refusal) = Box::pin(prefill(app, ask, prefill_body, size, log)).await? {
            return Ok(refusal);
        }
        await_kv(app, ask.id, guard, kv_ready, log).await?;
    }
    let answer = Box::pin(decode(app, ask, raw, log)).await?;
    Box::pin(relay(app, answer, log)).await
}

/// What routing needs of a parsed body. The parsed body itself does not
/// outlive parsing: it would sit in memory for the whole KV wait.
struct Parsed {
    /// The prefiller's copy; `None` when the request goes direct.
    prefill_body: Option<Bytes>,
    prompts: usize,
    size: PromptSize,
    route: Route,
    stream: bool,
}

fn parse(app: &App, api: Api, raw: &[u8]) -> Result<Parsed, ProxyError> {
    let request = ClientRequest::parse(api, raw)?;
    let threshold = app.config.fleet.direct_below_tokens;
    let route = if threshold > 0 && app.tokens.tokens(&request.size) < u64::from(threshold) {
        Route::Direct
    } else {
        Route::Pd
    };
    Ok(Parsed {
        prefill_body: (route == Route::Pd).then(|| request.prefill_body()),
        prompts: request.prompts,
        size: request.size,
        route,
        stream: request.stream,
    })
}

/// Reads the whole body into one buffer, within `--max-body-bytes` and
/// `--body-timeout`. A declared length past the limit is refused before a
/// byte is read; otherwise the buffer is sized from it once, so a large
/// body costs its size once, not a list of chunks plus their copy.
///
/// Every byte read is first taken from the app's body budget: bodies held
/// at once, across all requests, stay within it, so many large requests
/// together get 503s rather than the pod killed for memory.
async fn read_body(
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
struct BodyBudget {
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

fn uri(endpoint: &Endpoint, api: Api) -> &Uri {
    match api {
        Api::Chat => &endpoint.chat_uri,
        Api::Completions => &endpoint.completions_uri,
    }
}

/// How an upstream call failed, which decides whether another endpoint
/// may take the request over.
enum CallError {
    /// No connection could be made: the server never saw the request.
    Connect(String),
    /// The connection was refused, reset or closed before any of the
    /// answer came back.
    Reset(String),
    /// Anything else, such as an answer that broke off: the server may
    /// have done the work.
    Other(String),
}

impl CallError {
    fn from_client(err: hyper_util::client::legacy::Error) -> Self {
        let detail = match err.source() {
            Some(source) => format!("{err}: {source}"),
            None => err.to_string(),
        };
        if err.is_connect() {
            return CallError::Connect(detail);
        }
        let mut cause: Option<&(dyn std::error::Error + 'static)> = err.source();
        while let Some(e) = cause {
            if let Some(h) = e.downcast_ref::<hyper::Error>() {
                if h.is_incomplete_message() || h.is_canceled() {
                    return CallError::Reset(detail);
                }
            }
            if let Some(io) = e.downcast_ref::<std::io::Error>() {
                if matches!(
                    io.kind(),
                    std::io::ErrorKind::ConnectionReset
                        | std::io::ErrorKind::ConnectionAborted
                        | std::io::ErrorKind::ConnectionRefused
                        | std::io::ErrorKind::BrokenPipe
                ) {
                    return CallError::Reset(detail);
                }
            }
            cause = e.source();
        }
        CallError::Other(detail)
    }

    fn detail(&self) -> &str {
        match self {
            CallError::Connect(d) | CallError::Reset(d) | CallError::Other(d) => d,
        }
    }
}

/// Picks an endpoint of `role` not yet tried; counts a retry when this is
/// not the first try, and a panic pick when no endpoint was healthy.
fn pick(
    app: &App,
    role: Role,
    leg: Leg,
    named: Option<&[Arc<Endpoint>]>,
    tried: &[Arc<Endpoint>],
    last_error: Option<ProxyError>,
) -> Result<Arc<Endpoint>, ProxyError> {
    let set = app.fleet.role(role);
    let picked = match named {
        Some(named) => set.pick_from(named, tried),
        None => set.pick(tried),
    };
    let Some(pick) = picked else {
        if let Some(err) = last_error {
            return Err(err);
        }
        app.metrics.upstream_error(leg);
        return Err(ProxyError::NoUpstream(role.as_str()));
    };
    if pick.panic {
        app.metrics.panic_pick(role);
    }
    if let Some(previous) = tried.last() {
        previous.count_retry();
        app.metrics.retry(leg);
        tracing::warn!(
            leg = leg.as_str(),
            from = %previous.authority,
            to = %pick.endpoint.authority,
            "retrying on another endpoint"
        );
    }
    Ok(pick.endpoint)
}

/// Sends the one-token copy and reads its answer whole. `Ok(Some(..))` is
/// the prefiller's own 4xx, passed to the client as it came: vLLM's
/// validation message is the best answer there is, and decoding a request
/// the engine refused is pointless.
///
/// A prefill that never reached an engine (connection refused, reset or
/// closed before any answer) or that an engine turned away with 503 moves
/// to another prefiller, up to `--prefill-retries` times, all within one
/// `--upstream-timeout`. Nothing else is tried twice: a timed-out prefill
/// may still be computing.
async fn prefill(
    app: &App,
    ask: Ask<'_>,
    body: Bytes,
    size: PromptSize,
    log: &mut RequestLog,
) -> Result<Option<Response>, ProxyError> {
    let started = Instant::now();
    let (mut span, traceparent) = log.trace.leg("prefill");
    let deadline = tokio::time::Instant::now() + app.config.fleet.upstream_timeout;
    let mut tried: Vec<Arc<Endpoint>> = Vec::new();
    let mut last_error = None;
    let (prefiller, status, headers, answer) = loop {
        let prefiller = pick(
            app,
            Role::Prefiller,
            Leg::Prefill,
            ask.prefillers,
            &tried,
            last_error.take(),
        )?;
        tried.push(Arc::clone(&prefiller));
        let retries_left = tried.len() <= app.config.fleet.prefill_retries as usize;
        let mut req = upstream::post_json(
            uri(&prefiller, ask.api),
            body.clone(),
            ask.auth,
            Some((X_REQUEST_ID.as_str(), ask.wire.clone())),
        );
        req.headers_mut().insert(
            upstream::LOAD_FORMAT_HEADER.clone(),
            HeaderValue::from_static("JSON"),
        );
        if let Some(traceparent) = &traceparent {
            req.headers_mut()
                .insert(TRACEPARENT.clone(), traceparent.clone());
        }
        let in_flight = prefiller.start();
        let tried_at = Instant::now();
        let call = async {
            let response = app
                .client
                .request(req)
                .await
                .map_err(CallError::from_client)?;
            if let Some(waiting) = response
                .headers()
                .get(&upstream::LOAD_HEADER)
                .and_then(upstream::orca_waiting)
            {
                prefiller.report_orca_waiting(waiting);
            }
            read_whole(response).await.map_err(CallError::Other)
        };
        let result = tokio::time::timeout_at(deadline, call).await;
        let failure = match result {
            Err(_) => {
                app.metrics.upstream_error(Leg::Prefill);
                return Err(ProxyError::UpstreamTimeout {
                    leg: Leg::Prefill,
                    secs: app.config.fleet.upstream_timeout.as_secs_f64(),
                });
            }
            Ok(Ok((status, headers, answer))) => {
                if status.is_server_error() {
                    in_flight.failed(&format!("answered {status}"));
                } else {
                    in_flight.succeeded();
                    if status.is_success() {
                        prefiller.observe_latency(tried_at.elapsed());
                    }
                }
                if status != StatusCode::SERVICE_UNAVAILABLE || !retries_left {
                    break (prefiller, status, headers, answer);
                }
                format!("answered {status}: {}", snippet(&answer))
            }
            Ok(Err(err)) => {
                if matches!(err, CallError::Connect(_) | CallError::Reset(_)) {
                    in_flight.failed(err.detail());
                }
                if matches!(err, CallError::Other(_)) || !retries_left {
                    app.metrics.upstream_error(Leg::Prefill);
                    return Err(ProxyError::Upstream {
                        leg: Leg::Prefill,
                        detail: format!("{}: {}", prefiller.authority, err.detail()),
                    });
                }
                err.detail().to_owned()
            }
        };
        app.metrics.upstream_error(Leg::Prefill);
        last_error = Some(ProxyError::Upstream {
            leg: Leg::Prefill,
            detail: format!("{}: {failure}", prefiller.authority),
        });
    };
    let elapsed = started.elapsed();
    app.metrics.prefill_seconds.record(elapsed);
    log.prefill = Some(elapsed);
    log.trace.leg_done(
        &mut span,
        "prefiller",
        &prefiller.authority,
        tried.len() - 1,
        status.as_u16(),
    );
    if status.is_success() {
        // The engine's exact count teaches the length estimate; only
        // worth a parse when the estimate is in use.
        if app.config.fleet.direct_below_tokens > 0 {
            if let Some(tokens) = crate::tokens::prompt_tokens(&answer) {
                app.tokens.learn(&size, tokens);
            }
        }
        return Ok(None);
    }
    if status.is_client_error() {
        log.status = Some(status.as_u16());
        log.outcome = Outcome::Refused;
        log.upstream_said = Some(upstream_said("prefiller", &prefiller.authority, &answer));
        return Ok(Some(passthrough(status, headers, answer)));
    }
    app.metrics.upstream_error(Leg::Prefill);
    Err(ProxyError::Upstream {
        leg: Leg::Prefill,
        detail: format!(
            "{} answered {status}: {}",
            prefiller.authority,
            snippet(&answer)
        ),
    })
}

/// Waits until every rank reported every prompt's KV stored, then gives up
/// the parked entry. Timing out follows `--on-kv-timeout`.
async fn await_kv(
    app: &App,
    id: RequestId,
    guard: ParkedGuard,
    kv_ready: oneshot::Receiver<()>,
    log: &mut RequestLog,
) -> Result<(), ProxyError> {
    let started = Instant::now();
    let mut span = log.trace.phase("kv_wait");
    let ready = timeout(app.config.telemetry.kv_ready_timeout, kv_ready).await;
    // Asked before the guard gives the entry up.
    let report = app.pending.report(id);
    drop(guard);
    let waited = started.elapsed();
    log.kv_wait = Some(waited);
    app.metrics.kv_wait_seconds.record(waited);
    span.set("pd.kv_ready", matches!(ready, Ok(Ok(()))));
    span.set("pd.world_size", i64::from(report.world_size));
    span.set("pd.ranks_reported", i64::from(report.ranks));
    span.set("pd.events_refused", i64::from(report.refused));
    // The sender lives in the entry our guard owned, so it cannot have been
    // dropped before the guard: Ok(Err(_)) does not happen.
    if matches!(ready, Ok(Ok(()))) {
        return Ok(());
    }
    app.metrics.kv_timeouts.increment(1);
    let secs = app.config.telemetry.kv_ready_timeout.as_secs_f64();
    let reason = kv_missing_reason(app, report.refused);
    match app.config.telemetry.on_kv_timeout {
        KvTimeoutPolicy::Decode => {
            tracing::warn!(
                secs,
                reason,
                "KV-ready timed out; decoding without it (the decoder recomputes the prompt)"
            );
            log.kv_timed_out = true;
            Ok(())
        }
        KvTimeoutPolicy::Fail => {
            tracing::warn!(secs, reason, "KV-ready timed out; failing the request");
            Err(ProxyError::KvTimeout { secs })
        }
    }
}

/// Why a request's KV was not reported in time, as far as the proxy can
/// tell: a refused event or a full telemetry port is a fault to fix, not
/// a slow store, and must not pass for one.
fn kv_missing_reason(app: &App, refused_events: u16) -> &'static str {
    if refused_events > 0 {
        return "events for it were refused (a world_size larger than its first event's): see pd_proxy_telemetry_refused_total";
    }
    if app
        .metrics
        .guards
        .refused_lately(crate::metrics::Port::Telemetry)
    {
        return "the telemetry port refused connections at its cap: see pd_proxy_connections_refused_total";
    }
    "no store-finished event from every rank arrived in time (late, lost, or refused for a bad token)"
}

/// Decoders tried after the first when a connection cannot be made. The
/// KV is in the shared store, so any decoder can serve the request; but
/// once a decoder has the request, it may be generating, and it is never
/// sent again.
const DECODE_CONNECT_RETRIES: usize = 2;

/// Sends the client's body, byte for byte, and waits for the answer's
/// headers. A 5xx there is the decoder's failure, not the client's. The
/// decoder gets the same `X-Request-Id` as the prefiller, so one id names
/// the request in the proxy's, both engines' logs and the response's `id`.
async fn decode(
    app: &App,
    ask: Ask<'_>,
    raw: Bytes,
    log: &mut RequestLog,
) -> Result<DecoderAnswer, ProxyError> {
    let started = Instant::now();
    let (mut span, traceparent) = log.trace.leg("decode");
    let deadline = tokio::time::Instant::now() + app.config.fleet.upstream_timeout;
    let mut tried: Vec<Arc<Endpoint>> = Vec::new();
    let mut last_error = None;
    let (response, in_flight, tried_at) = loop {
        let decoder = pick(
            app,
            Role::Decoder,
            Leg::Decode,
            None,
            &tried,
            last_error.take(),
        )?;
        tried.push(Arc::clone(&decoder));
        let mut req = upstream::post_json(
            uri(&decoder, ask.api),
            raw.clone(),
            ask.auth,
            Some((X_REQUEST_ID.as_str(), ask.wire.clone())),
        );
        if let Some(traceparent) = &traceparent {
            req.headers_mut()
                .insert(TRACEPARENT.clone(), traceparent.clone());
        }
        let in_flight = decoder.start();
        let tried_at = Instant::now();
        match tokio::time::timeout_at(deadline, app.client.request(req)).await {
            Ok(Ok(response)) => break (response, in_flight, tried_at),
            Err(_) => {
                app.metrics.upstream_error(Leg::Decode);
                return Err(ProxyError::UpstreamTimeout {
                    leg: Leg::Decode,
                    secs: app.config.fleet.upstream_timeout.as_secs_f64(),
                });
            }
            Ok(Err(err)) => {
                let err = CallError::from_client(err);
                if matches!(err, CallError::Connect(_) | CallError::Reset(_)) {
                    in_flight.failed(err.detail());
                }
                app.metrics.upstream_error(Leg::Decode);
                let failure = ProxyError::Upstream {
                    leg: Leg::Decode,
                    detail: format!("{}: {}", decoder.authority, err.detail()),
                };
                if !matches!(err, CallError::Connect(_)) || tried.len() > DECODE_CONNECT_RETRIES {
                    return Err(failure);
                }
                last_error = Some(failure);
            }
        }
    };
    let decoder = Arc::clone(in_flight.endpoint());
    log.trace.leg_done(
        &mut span,
        "decoder",
        &decoder.authority,
        tried.len() - 1,
        response.status().as_u16(),
    );
    if response.status().is_server_error() {
        app.metrics.upstream_error(Leg::Decode);
        let status = response.status();
        in_flight.failed(&format!("answered {status}"));
        let body = tokio::time::timeout_at(deadline, read_whole(response))
            .await
            .ok()
            .and_then(Result::ok)
            .map(|(_, _, body)| body)
            .unwrap_or_default();
        return Err(ProxyError::Upstream {
            leg: Leg::Decode,
            detail: format!(
                "{} answered {status}: {}",
                decoder.authority,
                snippet(&body)
            ),
        });
    }
    in_flight.succeeded();
    decoder.observe_latency(tried_at.elapsed());
    log.trace.hold_decode(span);
    Ok(DecoderAnswer {
        response,
        started,
        in_flight,
    })
}

struct DecoderAnswer {
    response: http::Response<Incoming>,
    started: Instant,
    /// Counts the request at its decoder until the relayed body is done.
    in_flight: InFlight,
}

/// Streams the decoder's answer to the client as its frames arrive. The
/// answer's headers wait for its first bytes (bounded by
/// `--upstream-timeout`, like the headers themselves), so both leave in one
/// write and a decoder that never starts its stream is a 504, not a hung
/// 200.
async fn relay(
    app: &App,
    answer: DecoderAnswer,
    log: &mut RequestLog,
) -> Result<Response, ProxyError> {
    let DecoderAnswer {
        response,
        started,
        in_flight,
    } = answer;
    let decoder = Arc::clone(in_flight.endpoint());
    let status = response.status();
    let headers = upstream::relayed_headers(&response);
    let sse = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    log.status = Some(status.as_u16());
    if !sse {
        // Read whole before the client hears anything, so a decoder that
        // breaks mid-body is a 502, not a truncated 200.
        let (status, headers, body) =
            bounded(app, Leg::Decode, &decoder, read_whole(response)).await?;
        let elapsed = started.elapsed();
        log.decode_ttfb = Some(elapsed);
        app.metrics.decode_ttfb_seconds.record(elapsed);
        log.trace.first_byte();
        if status.is_client_error() || status.is_server_error() {
            log.upstream_said = Some(upstream_said("decoder", &decoder.authority, &body));
        }
        log.outcome = if status.is_client_error() {
            Outcome::Refused
        } else {
            Outcome::Completed
        };
        drop(in_flight);
        return Ok(passthrough(status, headers, body));
    }
    let owned_log = std::mem::replace(log, RequestLog::detached());
    let mut body = RelayBody::new(response.into_body(), owned_log, started, sse, in_flight);
    let first = async {
        std::future::poll_fn(|cx| body.gather(cx)).await;
        Ok(())
    };
    if let Err(err) = bounded(app, Leg::Decode, &decoder, first).await {
        // The request's log comes back to the caller, which records the
        // failure.
        *log = std::mem::replace(&mut body.log, RequestLog::detached());
        return Err(err);
    }
    let mut out = Response::new(Body::new(body));
    *out.status_mut() = status;
    *out.headers_mut() = headers;
    Ok(out)
}

/// Runs an upstream call under `--upstream-timeout`, turning failures into
/// the error for `leg` and counting them.
async fn bounded<T>(
    app: &App,
    leg: Leg,
    endpoint: &Endpoint,
    call: impl std::future::Future<Output = Result<T, String>>,
) -> Result<T, ProxyError> {
    match timeout(app.config.fleet.upstream_timeout, call).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(detail)) => {
            app.metrics.upstream_error(leg);
            Err(ProxyError::Upstream {
                leg,
                detail: format!("{}: {detail}", endpoint.authority),
            })
        }
        Err(_) => {
            app.metrics.upstream_error(leg);
            Err(ProxyError::UpstreamTimeout {
                leg,
                secs: app.config.fleet.upstream_timeout.as_secs_f64(),
            })
        }
    }
}

async fn read_whole(
    response: http::Response<Incoming>,
) -> Result<(StatusCode, HeaderMap, Bytes), String> {
    let headers = upstream::relayed_headers(&response);
    let (parts, body) = response.into_parts();
    let body = Limited::new(body, MAX_UPSTREAM_BODY_BYTES)
        .collect()
        .await
        .map_err(|e| format!("reading the body: {e}"))?
        .to_bytes();
    Ok((parts.status, headers, body))
}

/// An upstream's answer as it came. An error without a body gets one in
/// OpenAI's shape saying so: a client's SDK has nothing to show for an
/// empty 400, and every error the client sees has one shape.
fn passthrough(status: StatusCode, mut headers: HeaderMap, body: Bytes) -> Response {
    let body = if body.is_empty() && (status.is_client_error() || status.is_server_error()) {
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        error_json(
            &format!("the upstream answered {status} with no body"),
            if status.is_client_error() {
                "BadRequestError"
            } else {
                "BadGatewayError"
            },
            None,
            status.as_u16(),
        )
    } else {
        body
    };
    let mut out = Response::new(Body::from(body));
    *out.status_mut() = status;
    *out.headers_mut() = headers;
    out
}

/// Longest upstream message a log line carries: enough for vLLM's
/// "This model's maximum context length is ..." with its numbers.
const SAID_CHARS: usize = 240;

/// What an upstream said when it turned a request down, for the request's
/// log line: without it an operator sees `status=400` and must reproduce
/// the request to learn why. The message of an OpenAI- or vLLM-shaped
/// error (`{"error":{"message"}}`, `{"message"}`), else the body's start;
/// cut to [`SAID_CHARS`] characters.
fn upstream_said(role: &str, authority: &str, body: &[u8]) -> String {
    #[derive(serde::Deserialize)]
    struct Shape<'a> {
        #[serde(borrow)]
        error: Option<Inner<'a>>,
        #[serde(borrow)]
        message: Option<std::borrow::Cow<'a, str>>,
    }
    #[derive(serde::Deserialize)]
    struct Inner<'a> {
        #[serde(borrow)]
        message: Option<std::borrow::Cow<'a, str>>,
    }
    let parsed = serde_json::from_slice::<Shape>(body).ok();
    let message = parsed
        .and_then(|s| s.error.and_then(|e| e.message).or(s.message))
        .map(|m| m.into_owned())
        .unwrap_or_else(|| {
            String::from_utf8_lossy(&body[..body.len().min(4 * SAID_CHARS)]).into_owned()
        });
    let message = message.trim();
    let mut cut: String = message.chars().take(SAID_CHARS).collect();
    if cut.len() < message.len() {
        cut.push('…');
    }
    if cut.is_empty() {
        cut.push_str("(no body)");
    }
    format!("{role} {authority}: {cut}")
}

/// The start of an upstream body, for a log line.
fn snippet(body: &[u8]) -> String {
    let end = body.len().min(300);
    String::from_utf8_lossy(&body[..end]).into_owned()
}

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
            let answer = async {
                let response = app
                    .client
                    .request(upstream::get(&endpoint.models_uri, auth))
                    .await
                    .map_err(|e| e.to_string())?;
                read_whole(response).await
            }
            .await;
            (endpoint, answer)
        })
        .collect();
    let mut last_error = String::from("no upstream is known yet");
    let first_ok = async {
        while let Some((endpoint, answer)) = futures_util::StreamExt::next(&mut asks).await {
            match answer {
                Ok((status, headers, body)) if status.is_success() => {
                    return Some(passthrough(status, headers, body))
                }
                Ok((status, _, body)) => {
                    last_error = format!(
                        "{} answered {status}: {}",
                        endpoint.authority,
                        snippet(&body)
                    )
                }
                Err(e) => last_error = format!("{}: {e}", endpoint.authority),
            }
            app.metrics.upstream_error(Leg::Models);
            tracing::warn!(error = %last_error, "/v1/models upstream failed");
        }
        None
    };
    match timeout(app.config.fleet.upstream_timeout, first_ok).await {
        Ok(Some(response)) => response,
        Ok(None) => ProxyError::Upstream {
            leg: Leg::Models,
            detail: last_error,
        }
        .into_response(),
        Err(_) => {
            app.metrics.upstream_error(Leg::Models);
            ProxyError::UpstreamTimeout {
                leg: Leg::Models,
                secs: app.config.fleet.upstream_timeout.as_secs_f64(),
            }
            .into_response()
        }
    }
}

/// Endpoints asked at once for `/v1/models`: enough that a few dead ones
/// do not matter, few enough that one call is not a fan-out to the fleet.
const MODELS_ASKED: usize = 4;

/// How a request ended, for its log line and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// Still running: if the log is dropped like this, the client left.
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

/// Phase timings of one request. Dropping it writes the request's one info
/// line and its end-to-end metrics, whichever way the request ended —
/// including the client leaving, when hyper drops the future or the body
/// that owns it.
struct RequestLog {
    app: Option<Arc<App>>,
    api: Api,
    span: tracing::Span,
    started: Instant,
    stream: bool,
    route: Route,
    status: Option<u16>,
    prefill: Option<Duration>,
    kv_wait: Option<Duration>,
    kv_timed_out: bool,
    decode_ttfb: Option<Duration>,
    outcome: Outcome,
    /// Which upstream turned the request down, and what it said.
    upstream_said: Option<String>,
    /// The request's spans (`--otlp-endpoint`), or the client's
    /// `traceparent` to pass on.
    trace: Trace,
}

impl RequestLog {
    fn new(app: Arc<App>, api: Api, span: tracing::Span) -> Self {
        app.requests.fetch_add(1, Ordering::AcqRel);
        RequestLog {
            app: Some(app),
            api,
            span,
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
            trace: Trace::Off,
        }
    }

    /// A placeholder left behind when the real log moves into the relayed
    /// body; it records nothing.
    fn detached() -> Self {
        RequestLog {
            app: None,
            api: Api::Chat,
            span: tracing::Span::none(),
            started: Instant::now(),
            stream: false,
            route: Route::Pd,
            status: None,
            prefill: None,
            kv_wait: None,
            kv_timed_out: false,
            decode_ttfb: None,
            outcome: Outcome::Completed,
            upstream_said: None,
            trace: Trace::Off,
        }
    }
}

fn ms(d: Option<Duration>) -> f64 {
    d.map_or(-1.0, |d| (d.as_secs_f64() * 1e6).round() / 1e3)
}

impl Drop for RequestLog {
    fn drop(&mut self) {
        let Some(app) = self.app.take() else {
            return;
        };
        app.requests.fetch_sub(1, Ordering::AcqRel);
        let total = self.started.elapsed();
        let client_gone = self.outcome == Outcome::Running;
        // 499: nginx's "client closed request", the usual name for it.
        let status = if client_gone {
            499
        } else {
            self.status.unwrap_or(500)
        };
        app.metrics.e2e_seconds.record(total);
        app.metrics.request(self.api, status);
        if client_gone {
            app.metrics.client_disconnects.increment(1);
        }
        self.trace.finish(&Finish {
            status,
            outcome: self.outcome.name(),
            failed: !matches!(self.outcome, Outcome::Completed | Outcome::Refused),
            route: if self.route == Route::Pd {
                "pd"
            } else {
                "direct"
            },
            stream: self.stream,
            kv_timed_out: self.kv_timed_out,
        });
        tracing::info!(
            parent: &self.span,
            status,
            stream = self.stream,
            route = if self.route == Route::Pd { "pd" } else { "direct" },
            outcome = ?self.outcome,
            prefill_ms = ms(self.prefill),
            kv_wait_ms = ms(self.kv_wait),
            kv_timed_out = self.kv_timed_out,
            decode_ttfb_ms = ms(self.decode_ttfb),
            total_ms = ms(Some(total)),
            upstream_said = self.upstream_said.as_deref(),
            "request finished"
        );
    }
}

/// The decoder's body on its way to the client: bytes pass through
/// unchanged (no parsing, no re-framing of SSE events). It owns the
/// request's log, so the end of the body is the end of the request. A
/// decoder that dies mid-stream leaves an SSE client a proper ending: an
/// error event, then `[DONE]`.
///
/// Frames that are already on their way are joined into one chunk, so
/// hyper writes them with one `writev`: hyper's client delivers one frame
/// per wake-up, and hyper's server flushes whenever the body is pending, so
/// relaying naively costs a syscall per SSE event on the client socket and
/// a wake-up of the client for each. Copying a few hundred bytes per event
/// is far cheaper than either. After the stream's first frame, and while
/// frames come in a burst, the body yields up to [`IDLE_YIELDS`] times to
/// let the upstream connection deliver the next, and hands the batch over
/// when the yields bring nothing. A burst is a frame that came while
/// yielding, or less than [`BURST_GAP`] after the one before. The first
/// rule is what holds under load: with a thousand streams on the runtime,
/// a scheduler turn alone can take longer than the gap, and a rule of time
/// only turned every event into a `writev` of its own (12 a request at
/// 1,024 clients against 5 at 64). Tokens that come at generation pace go
/// out at once: batching costs them nothing, and never a timer.
struct RelayBody {
    inner: Incoming,
    log: RequestLog,
    /// The decoder counts this request in flight until the body is gone.
    _in_flight: InFlight,
    decode_started: Instant,
    sse: bool,
    seen_data: bool,
    /// Whether the bytes relayed so far end on an event boundary, so the
    /// error event is not glued onto a half-sent one.
    ends_cleanly: bool,
    /// Data received and not yet handed to hyper.
    batch: Batch,
    /// Upstream trailers, handed over after the data before them.
    trailers: Option<HeaderMap>,
    /// Yields since the last frame arrived, while gathering a batch.
    idle_yields: u8,
    /// When the last frame arrived, to tell a burst from generation pace.
    last_frame: Option<Instant>,
    /// The last frame was the stream's first, came while the body was
    /// yielding for it, or came less than [`BURST_GAP`] after the one
    /// before: more is likely on its way.
    bursting: bool,
    /// `inner` has ended (or failed); what is left is the batch.
    upstream_done: bool,
    /// A non-SSE upstream failure, reported after the batch.
    error: Option<hyper::Error>,
    finished: bool,
    /// The last bytes relayed: a client may close as soon as it reads
    /// `data: [DONE]`, before the decoder's final chunk, and that answer
    /// was complete.
    tail: [u8; DONE.len()],
    /// `--stream-idle-timeout`, armed the first time the stream waits on
    /// the decoder and moved on by every frame.
    idle: Option<Pin<Box<tokio::time::Sleep>>>,
    /// The shutdown drain's cut, listened for while the stream waits.
    cut: Option<Pin<Box<tokio_util::sync::WaitForCancellationFutureOwned>>>,
}

/// Why a stream ended before its decoder finished it.
enum Cut {
    Idle(Duration),
    Drain,
}

/// Data gathered for one hand-over. A lone frame is passed on as it came
/// (a large JSON answer is not copied); only a second frame starts a copy.
#[derive(Default)]
enum Batch {
    #[default]
    Empty,
    One(Bytes),
    Many(BytesMut),
}

impl Batch {
    fn len(&self) -> usize {
        match self {
            Batch::Empty => 0,
            Batch::One(b) => b.len(),
            Batch::Many(b) => b.len(),
        }
    }

    fn is_empty(&self) -> bool {
        matches!(self, Batch::Empty)
    }

    fn push(&mut self, data: Bytes) {
        if data.is_empty() {
            return;
        }
        *self = match std::mem::take(self) {
            Batch::Empty => Batch::One(data),
            Batch::One(first) => {
                let mut joined = BytesMut::with_capacity((first.len() + data.len()) * 2);
                joined.extend_from_slice(&first);
                joined.extend_from_slice(&data);
                Batch::Many(joined)
            }
            Batch::Many(mut joined) => {
                joined.extend_from_slice(&data);
                Batch::Many(joined)
            }
        };
    }

    fn take(&mut self) -> Option<Bytes> {
        match std::mem::take(self) {
            Batch::Empty => None,
            Batch::One(b) => Some(b),
            Batch::Many(b) => Some(b.freeze()),
        }
    }
}

const DONE: &[u8; 14] = b"data: [DONE]\n\n";

/// A batch stops growing at this size: it bounds the copy and the memory a
/// fast decoder can pile up before the client reads.
const MAX_BATCH_BYTES: usize = 64 << 10;

/// Yields without a new frame before a batch is handed over. Measured:
/// hyper's client connection task needs two scheduler turns to pass on a
/// frame it has already read; one is not enough.
const IDLE_YIELDS: u8 = 2;

/// Frames closer together than this are a burst worth batching; decoders
/// generate tokens milliseconds apart.
const BURST_GAP: Duration = Duration::from_micros(500);

impl RelayBody {
    fn new(
        inner: Incoming,
        log: RequestLog,
        decode_started: Instant,
        sse: bool,
        in_flight: InFlight,
    ) -> Self {
        RelayBody {
            log,
            _in_flight: in_flight,
            decode_started,
            sse,
            seen_data: false,
            ends_cleanly: true,
            batch: Batch::Empty,
            trailers: None,
            idle_yields: 0,
            last_frame: None,
            bursting: false,
            upstream_done: false,
            error: None,
            finished: false,
            inner,
            tail: [0; DONE.len()],
            idle: None,
            cut: None,
        }
    }

    fn error_tail(&self, message: &str, kind: &str, code: u16) -> Bytes {
        let event = error_json(message, kind, None, code);
        let mut out = Vec::with_capacity(event.len() + 32);
        if !self.ends_cleanly {
            out.extend_from_slice(b"\n\n");
        }
        out.extend_from_slice(b"data: ");
        out.extend_from_slice(&event);
        out.extend_from_slice(b"\n\ndata: [DONE]\n\n");
        Bytes::from(out)
    }

    fn observe(&mut self, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        if !self.seen_data {
            self.seen_data = true;
            let ttfb = self.decode_started.elapsed();
            self.log.decode_ttfb = Some(ttfb);
            self.log.trace.first_byte();
            if let Some(app) = &self.log.app {
                app.metrics.decode_ttfb_seconds.record(ttfb);
            }
        }
        self.ends_cleanly = data.ends_with(b"\n\n");
        let keep = data.len().min(DONE.len());
        self.tail.copy_within(keep.., 0);
        let at = DONE.len() - keep;
        self.tail[at..].copy_from_slice(&data[data.len() - keep..]);
    }

    /// Nothing gathered is waiting to be handed to hyper.
    fn nothing_gathered(&self) -> bool {
        self.batch.is_empty() && self.trailers.is_none()
    }

    /// Everything the decoder sent has been handed to hyper.
    fn drained(&self) -> bool {
        self.nothing_gathered()
            && self.error.is_none()
            && (self.upstream_done || self.inner.is_end_stream())
    }

    fn mark_completed(&mut self) {
        if self.log.outcome == Outcome::Running {
            self.log.outcome = Outcome::Completed;
        }
    }

    fn upstream_failed(&mut self, err: hyper::Error) {
        self.upstream_done = true;
        self.log.outcome = Outcome::DecoderBroke;
        if let Some(app) = &self.log.app {
            app.metrics.upstream_error(Leg::Decode);
        }
        tracing::warn!(parent: &self.log.span, error = %err, "decoder stream broke");
        if self.sse {
            let tail = self.error_tail(
                &format!("the decoder stream broke: {err}"),
                "BadGatewayError",
                502,
            );
            self.batch.push(tail);
        } else {
            self.error = Some(err);
        }
    }

    /// `Ready` when the stream must end without the decoder: it has been
    /// silent too long, or the shutdown drain's time is up.
    fn poll_cut(&mut self, cx: &mut Context<'_>) -> Poll<Cut> {
        let Some(app) = self.log.app.as_ref() else {
            return Poll::Pending;
        };
        // Until the first frame the wait is the first byte's, bounded by
        // `--upstream-timeout` in `relay`: a request queued in the engine
        // may take long to start, and that is not a stall.
        if let Some(since) = self.last_frame {
            let limit = app.config.limits.stream_idle_timeout;
            let deadline = tokio::time::Instant::from_std(since + limit);
            let idle = match &mut self.idle {
                Some(sleep) => {
                    if sleep.deadline() != deadline {
                        sleep.as_mut().reset(deadline);
                    }
                    sleep
                }
                None => self
                    .idle
                    .insert(Box::pin(tokio::time::sleep_until(deadline))),
            };
            if idle.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Cut::Idle(limit));
            }
        }
        let cut = self
            .cut
            .get_or_insert_with(|| Box::pin(app.shutdown.reached_owned(Stage::Cut)));
        if cut.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Cut::Drain);
        }
        Poll::Pending
    }

    /// Ends the stream here: the decoder's connection is closed when this
    /// body is dropped, so vLLM stops generating; an SSE client gets an
    /// error event and `[DONE]`.
    fn end_early(&mut self, cut: Cut) {
        self.upstream_done = true;
        let (message, kind, code) = match cut {
            Cut::Idle(limit) => {
                if let Some(app) = &self.log.app {
                    app.metrics.guards.timeout(TimeoutKind::StreamIdle);
                    app.metrics.upstream_error(Leg::Decode);
                }
                self.log.outcome = Outcome::DecoderBroke;
                tracing::warn!(parent: &self.log.span, secs = limit.as_secs_f64(), "decoder stream went silent past --stream-idle-timeout; ending it");
                (
                    format!(
                        "the decoder sent nothing for {:.1}s (--stream-idle-timeout)",
                        limit.as_secs_f64()
                    ),
                    "GatewayTimeoutError",
                    504,
                )
            }
            Cut::Drain => {
                self.log.outcome = Outcome::Cut;
                tracing::warn!(parent: &self.log.span, "the shutdown drain ended; cutting the stream");
                (
                    "the proxy is shutting down and its drain time is up; the answer is incomplete"
                        .to_owned(),
                    "ServiceUnavailableError",
                    503,
                )
            }
        };
        if self.sse {
            let tail = self.error_tail(&message, kind, code);
            self.batch.push(tail);
        }
    }

    /// Gathers frames until upstream has nothing more right now. `Pending`
    /// while there is nothing to hand over, or while yielding for more.
    fn gather(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        while !self.upstream_done && self.trailers.is_none() && self.batch.len() < MAX_BATCH_BYTES {
            match Pin::new(&mut self.inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    let now = Instant::now();
                    self.bursting = self.idle_yields > 0
                        || self
                            .last_frame
                            .is_none_or(|last| now.duration_since(last) < BURST_GAP);
                    self.last_frame = Some(now);
                    self.idle_yields = 0;
                    match frame.into_data() {
                        Ok(data) => {
                            self.observe(&data);
                            self.batch.push(data);
                        }
                        Err(frame) => self.trailers = frame.into_trailers().ok(),
                    }
                }
                Poll::Ready(Some(Err(err))) => self.upstream_failed(err),
                Poll::Ready(None) => self.upstream_done = true,
                Poll::Pending if self.nothing_gathered() => match self.poll_cut(cx) {
                    Poll::Ready(cut) => self.end_early(cut),
                    Poll::Pending => return Poll::Pending,
                },
                Poll::Pending if self.bursting && self.idle_yields < IDLE_YIELDS => {
                    self.idle_yields += 1;
                    cx.waker().wake_by_ref();
                    return Poll::Pending;
                }
                Poll::Pending => break,
            }
        }
        self.idle_yields = 0;
        Poll::Ready(())
    }
}

impl Drop for RelayBody {
    fn drop(&mut self) {
        if self.sse && &self.tail == DONE {
            self.mark_completed();
        }
    }
}

impl http_body::Body for RelayBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        if this.finished {
            return Poll::Ready(None);
        }
        // Still gathering after a yield, or nothing left to hand over.
        if this.idle_yields > 0 || this.nothing_gathered() {
            std::task::ready!(this.gather(cx));
        }
        let frame = match this.batch.take() {
            Some(data) => Some(Frame::data(data)),
            None => this.trailers.take().map(Frame::trailers),
        };
        if let Some(frame) = frame {
            // With a Content-Length, hyper stops polling after the last
            // byte, so completion is decided here, not at `None`.
            if this.drained() {
                this.mark_completed();
            }
            return Poll::Ready(Some(Ok(frame)));
        }
        this.finished = true;
        if let Some(err) = this.error.take() {
            return Poll::Ready(Some(Err(err)));
        }
        this.mark_completed();
        Poll::Ready(None)
    }

    fn is_end_stream(&self) -> bool {
        self.finished || self.drained()
    }

    /// A non-streaming answer keeps its Content-Length: what the decoder
    /// has yet to send plus what is gathered and not handed over (the
    /// first bytes are gathered before hyper asks). An SSE stream may grow
    /// an error event, so it promises nothing.
    fn size_hint(&self) -> SizeHint {
        if self.sse {
            return SizeHint::default();
        }
        let gathered = self.batch.len() as u64;
        let upstream = self.inner.size_hint();
        let mut hint = SizeHint::new();
        hint.set_lower(upstream.lower() + gathered);
        if let Some(upper) = upstream.upper() {
            hint.set_upper(upper + gathered);
        }
        hint
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lone_frame_is_handed_over_without_a_copy() {
        let frame = Bytes::from_static(b"data: {\"a\":1}\n\n");
        let mut batch = Batch::default();
        batch.push(Bytes::new());
        assert!(batch.is_empty(), "empty frames are not batched");
        batch.push(frame.clone());
        let out = batch.take().unwrap();
        assert_eq!(out.as_ptr(), frame.as_ptr());
        assert!(batch.is_empty() && batch.take().is_none());
    }

    #[test]
    fn frames_in_flight_are_joined_in_order() {
        let frames: [&[u8]; 3] = [b"data: 1\n\n", b"data: 2\n", b"\ndata: [DONE]\n\n"];
        let mut batch = Batch::default();
        for f in frames {
            batch.push(Bytes::from_static(f));
        }
        assert_eq!(batch.len(), frames.concat().len());
        assert_eq!(batch.take().unwrap(), frames.concat());
        assert!(batch.is_empty());
    }
}

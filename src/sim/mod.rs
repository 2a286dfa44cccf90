//! pd-sim: a vLLM prefiller + decoder stand-in for testing and benchmarking
//! pd-proxy without GPUs.
//!
//! It reproduces the wire behaviour a P/D proxy depends on (vLLM 0.32 as
//! captured in shared/captures-vllm-0.32): request-id rules including the
//! engine's random suffix, validation errors and their bodies, SSE chunk
//! layout, and — on the prefiller — LMCache's per-rank
//! `request_store_finished` telemetry, sent after the response like the real
//! asynchronous KV store. Knobs inject the failures a proxy must survive
//! (late, lost, duplicated telemetry; upstream errors; engines dying
//! mid-stream), and counters show what the proxy did to upstream work
//! (streams completed or abandoned, prefills cancelled).
//!
//! One [`Sim`] serves both roles, so a test holds one handle to everything
//! that reached "the engines".

mod body;
mod fault;
mod render;
mod request;
mod telemetry;

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header::CONTENT_TYPE, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use axum::Router;
use bytes::Bytes;
use futures_util::StreamExt;
use tokio::net::TcpListener;

use body::{
    sleep_if, DecodeGuard, EventGen, Hooks, OnceBody, PrefillGuard, TelemetryTrigger, Timing,
};
use fault::Dice;
pub use fault::{Fault, Faults};
use request::{ApiError, Kind, Plan};

/// How the simulated engines behave. Defaults give a well-behaved
/// single-rank deployment that answers instantly.
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// The only model name accepted; others get vLLM's 404.
    pub model: String,
    /// Where the prefiller's LMCache posts `request_store_finished`, e.g.
    /// `http://127.0.0.1:5768/api/v1/telemetry`; `None` posts nothing.
    pub telemetry_url: Option<String>,
    /// Tensor-parallel ranks: each posts its own event, and the KV is only
    /// complete once all have.
    pub world_size: u32,
    /// Prefill compute time, before the prefill response.
    pub prefill_delay: Duration,
    /// Store latency: after the prefill response, before rank 0's POST.
    pub telemetry_delay: Duration,
    /// Rank k posts k * this after rank 0.
    pub rank_stagger: Duration,
    /// Post (and await replies for) all ranks before answering the prefill:
    /// the race where telemetry beats the response.
    pub telemetry_before_response: bool,
    /// Ranks whose events are lost.
    pub drop_ranks: Vec<u32>,
    /// Post every event twice.
    pub duplicate_telemetry: bool,
    /// The prefiller answers every request with this status and an OpenAI
    /// error body.
    pub prefill_error: Option<u16>,
    /// The decoder answers every request with this status and an OpenAI
    /// error body.
    pub decoder_error: Option<u16>,
    /// Decoder: before the first SSE event (streams) or, added to the token
    /// delays, before the JSON response.
    pub first_token_delay: Duration,
    /// Decoder: between tokens.
    pub token_delay: Duration,
    /// Tokens generated when neither `max_tokens` nor
    /// `max_completion_tokens` is given.
    pub default_tokens: u32,
    /// Decoder streams: after this many token events the connection is cut
    /// without terminating the chunked body, as when an engine dies.
    pub die_after_tokens: Option<u32>,
    /// Append `-xxxxxxxx` to engine-internal ids, as vLLM >= 0.14 does.
    pub random_suffix: bool,
    /// The queue length reported in vLLM's ORCA header
    /// (`endpoint-load-metrics: JSON {"named_metrics":
    /// {"num_requests_waiting": N, ...}}`) on non-streaming answers to
    /// requests that ask with `endpoint-load-metrics-format: JSON`, as
    /// vLLM 0.32 does; `None` sends no header.
    pub reported_waiting: Option<u32>,
    /// Keep request and telemetry logs. Benchmarks turn it off so memory
    /// stays flat; counters are kept either way.
    pub record: bool,
    /// Failures drawn per request, on top of the fixed knobs above; off
    /// unless `faults.rate` is above 0.
    pub faults: Faults,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            model: "sim-model".to_owned(),
            telemetry_url: None,
            world_size: 1,
            prefill_delay: Duration::ZERO,
            telemetry_delay: Duration::ZERO,
            rank_stagger: Duration::ZERO,
            telemetry_before_response: false,
            drop_ranks: Vec::new(),
            duplicate_telemetry: false,
            prefill_error: None,
            decoder_error: None,
            first_token_delay: Duration::ZERO,
            token_delay: Duration::ZERO,
            default_tokens: 16,
            die_after_tokens: None,
            random_suffix: true,
            reported_waiting: None,
            record: true,
            faults: Faults::default(),
        }
    }
}

/// A request as it reached a completions endpoint, for asserting what the
/// proxy sent upstream.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub at: Instant,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

/// One telemetry POST attempt. `status` is 0 when no HTTP reply came back
/// (connect failure, timeout): LMCache does not retry, so neither do we.
#[derive(Clone, Debug)]
pub struct TelemetryPost {
    /// When the reply came back (or the attempt failed).
    pub at: Instant,
    pub payload: serde_json::Value,
    pub status: u16,
}

#[derive(Default)]
struct Counters {
    prefill_requests: AtomicU64,
    decode_requests: AtomicU64,
    decode_completed: AtomicU64,
    decode_cancelled: AtomicU64,
    prefills_cancelled: AtomicU64,
    telemetry_ok: AtomicU64,
    telemetry_failed: AtomicU64,
    /// Per [`Fault`], in [`Fault::ALL`]'s order.
    faults: [AtomicU64; Fault::ALL.len()],
}

/// The simulated prefiller and decoder, with everything they observed.
pub struct Sim {
    pub config: SimConfig,
    /// `system_fingerprint`, fixed per instance like a real server's.
    fingerprint: String,
    telemetry: Option<Result<telemetry::Target, String>>,
    prefill_log: Mutex<Vec<Recorded>>,
    decode_log: Mutex<Vec<Recorded>>,
    telemetry_log: Mutex<Vec<TelemetryPost>>,
    counters: Counters,
    dice: Dice,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    Prefiller,
    Decoder,
}

#[derive(Clone)]
struct Ctx {
    sim: Arc<Sim>,
    role: Role,
}

fn snapshot<T: Clone>(log: &Mutex<Vec<T>>) -> Vec<T> {
    log.lock().unwrap_or_else(PoisonError::into_inner).clone()
}

impl Sim {
    pub fn new(config: SimConfig) -> Arc<Sim> {
        let telemetry = config.telemetry_url.as_deref().map(|url| {
            let target = telemetry::Target::parse(url);
            if let Err(e) = &target {
                tracing::warn!("pd-sim: {e}; telemetry posts will fail");
            }
            target
        });
        let dice = Dice::new(&config.faults);
        Arc::new(Sim {
            config,
            dice,
            fingerprint: format!("vllm-0.32.0-{:08x}", rand::random::<u32>()),
            telemetry,
            prefill_log: Mutex::default(),
            decode_log: Mutex::default(),
            telemetry_log: Mutex::default(),
            counters: Counters::default(),
        })
    }

    /// Routes of a vLLM OpenAI server whose completions post LMCache
    /// telemetry after answering.
    pub fn prefiller_router(self: &Arc<Self>) -> Router {
        self.router(Role::Prefiller)
    }

    /// Routes of a vLLM OpenAI server that generates with the configured
    /// pacing and failures.
    pub fn decoder_router(self: &Arc<Self>) -> Router {
        self.router(Role::Decoder)
    }

    /// Serves the prefiller on an already bound listener (bind first so
    /// callers know the port and never wait for readiness).
    pub async fn serve_prefiller(self: Arc<Self>, listener: TcpListener) -> io::Result<()> {
        let router = self.prefiller_router();
        serve(listener, router).await
    }

    /// Serves the decoder on an already bound listener.
    pub async fn serve_decoder(self: Arc<Self>, listener: TcpListener) -> io::Result<()> {
        let router = self.decoder_router();
        serve(listener, router).await
    }

    /// Serves the prefiller until [`Running::kill`], which closes the
    /// listener and every open connection at once, as when a pod dies.
    pub fn spawn_prefiller(self: &Arc<Self>, listener: TcpListener) -> Running {
        Running::spawn(listener, self.prefiller_router())
    }

    /// Serves the decoder until [`Running::kill`].
    pub fn spawn_decoder(self: &Arc<Self>, listener: TcpListener) -> Running {
        Running::spawn(listener, self.decoder_router())
    }

    /// Every request that reached a prefiller completions endpoint, in
    /// arrival order (empty when `record` is off).
    pub fn prefill_requests(&self) -> Vec<Recorded> {
        snapshot(&self.prefill_log)
    }

    /// Every request that reached a decoder completions endpoint.
    pub fn decode_requests(&self) -> Vec<Recorded> {
        snapshot(&self.decode_log)
    }

    /// Every telemetry POST attempt, in the order their replies came back.
    pub fn telemetry_posts(&self) -> Vec<TelemetryPost> {
        snapshot(&self.telemetry_log)
    }

    /// Decoder response bodies dropped before their last byte was handed
    /// over: the client (proxy) went away and the engine's work was
    /// abandoned, as a proxy should on client disconnect.
    pub fn decode_streams_cancelled(&self) -> u64 {
        self.counters.decode_cancelled.load(Ordering::Relaxed)
    }

    /// Decoder response bodies (streamed or not) handed over to the end.
    pub fn decode_streams_completed(&self) -> u64 {
        self.counters.decode_completed.load(Ordering::Relaxed)
    }

    /// Prefill handlers dropped before answering (client went away during
    /// `prefill_delay` or while telemetry was posted before the response).
    pub fn prefills_cancelled(&self) -> u64 {
        self.counters.prefills_cancelled.load(Ordering::Relaxed)
    }

    /// How many times `fault` was injected.
    pub fn faults_injected(&self, fault: Fault) -> u64 {
        self.counters.faults[fault.index()].load(Ordering::Relaxed)
    }

    /// Draws this request's fault and counts it.
    fn draw_fault(&self, role: Role) -> Option<Fault> {
        let fault = self.dice.draw(role == Role::Prefiller)?;
        self.counters.faults[fault.index()].fetch_add(1, Ordering::Relaxed);
        Some(fault)
    }

    fn router(self: &Arc<Self>, role: Role) -> Router {
        Router::new()
            .route("/v1/chat/completions", post(chat))
            .route("/v1/completions", post(completions))
            .route("/v1/models", get(models))
            .route("/tokenize", post(tokenize))
            .route("/health", get(health))
            .route("/metrics", get(metrics))
            .fallback(not_found)
            .method_not_allowed_fallback(method_not_allowed)
            // vLLM takes prompts of any size; a proxy benchmark must not
            // trip over axum's 2 MB default.
            .layer(DefaultBodyLimit::disable())
            .with_state(Ctx {
                sim: Arc::clone(self),
                role,
            })
    }

    fn record(&self, role: Role, headers: HeaderMap, body: Bytes) {
        let (counter, log) = match role {
            Role::Prefiller => (&self.counters.prefill_requests, &self.prefill_log),
            Role::Decoder => (&self.counters.decode_requests, &self.decode_log),
        };
        counter.fetch_add(1, Ordering::Relaxed);
        if self.config.record {
            let entry = Recorded {
                at: Instant::now(),
                headers,
                body,
            };
            log.lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(entry);
        }
    }

    async fn handle(
        self: Arc<Self>,
        role: Role,
        kind: Kind,
        headers: HeaderMap,
        body: Bytes,
    ) -> Response {
        let header_id = request::header_request_id(&headers);
        let orca = headers
            .get("endpoint-load-metrics-format")
            .is_some_and(|f| f.as_bytes().eq_ignore_ascii_case(b"json"));
        self.record(role, headers, body.clone());
        let fault = self.draw_fault(role);
        let drawn_error = match fault {
            Some(Fault::Prefill503) => Some(503),
            Some(Fault::Prefill500 | Fault::Decoder500) => Some(500),
            _ => None,
        };
        let injected = match role {
            Role::Prefiller => self.config.prefill_error,
            Role::Decoder => self.config.decoder_error,
        };
        if let Some(code) = injected.or(drawn_error) {
            return ApiError::injected(code).into_response();
        }
        let plan = match request::parse(
            kind,
            header_id,
            &body,
            &self.config.model,
            self.config.default_tokens,
        ) {
            Ok(plan) => plan,
            Err(e) => return e.into_response(),
        };
        let stream = plan.stream;
        let waiting = self.config.reported_waiting;
        let mut response = match role {
            Role::Prefiller => self.prefill(plan, fault).await,
            Role::Decoder => self.decode(plan, fault).await,
        };
        if let (true, false, Some(waiting)) = (orca, stream, waiting) {
            let report = format!(
                "JSON {{\"named_metrics\": {{\"num_requests_waiting\": {waiting}.0, \"kv_cache_usage_perc\": 0.0}}}}"
            );
            if let Ok(value) = http::HeaderValue::try_from(report) {
                response
                    .headers_mut()
                    .insert("endpoint-load-metrics", value);
            }
        }
        response
    }

    async fn prefill(self: Arc<Self>, plan: Plan, fault: Option<Fault>) -> Response {
        let guard = PrefillGuard::new(Arc::clone(&self));
        sleep_if(self.config.prefill_delay).await;
        let posting = Posting {
            lost_rank: (fault == Some(Fault::LostRank))
                .then(|| self.dice.below(self.config.world_size)),
            duplicate: self.config.duplicate_telemetry || fault == Some(Fault::DuplicateTelemetry),
        };
        let mut hooks = Hooks::default();
        if self.telemetry.is_some() {
            let ids = plan.internal_ids(self.config.random_suffix);
            if self.config.telemetry_before_response {
                let ids: Arc<[String]> = ids.into();
                let posts = self.rank_schedule(posting).map(|(rank, delay)| {
                    Arc::clone(&self).post_rank(Arc::clone(&ids), rank, delay, posting)
                });
                futures_util::future::join_all(posts).await;
            } else {
                hooks.telemetry = Some(TelemetryTrigger::new(Arc::clone(&self), ids, posting));
            }
        }
        guard.disarm();
        self.respond(plan, Timing::default(), hooks)
    }

    async fn decode(self: Arc<Self>, plan: Plan, fault: Option<Fault>) -> Response {
        let hooks = Hooks {
            decode: Some(DecodeGuard::new(Arc::clone(&self))),
            telemetry: None,
        };
        let mut timing = Timing {
            first_token: self.config.first_token_delay,
            between_tokens: self.config.token_delay,
            die_after: self.config.die_after_tokens,
            stall_after: None,
        };
        // Where a broken body stops: somewhere among its token events.
        let events = plan
            .max_tokens
            .saturating_mul(u32::try_from(plan.prompt_tokens.len()).unwrap_or(u32::MAX));
        match fault {
            Some(Fault::SlowFirstToken) => {
                timing.first_token += self.config.faults.slow_first_token;
            }
            Some(Fault::DecoderDies) => {
                let at = self.dice.below(events);
                timing.die_after = Some(timing.die_after.map_or(at, |n| n.min(at)));
            }
            Some(Fault::DecoderStalls) => timing.stall_after = Some(self.dice.below(events)),
            _ => {}
        }
        if !plan.stream {
            // A non-streaming vLLM answers only when generation is over.
            let rest = timing
                .between_tokens
                .saturating_mul(plan.max_tokens.saturating_sub(1));
            sleep_if(timing.first_token.saturating_add(rest)).await;
            if matches!(fault, Some(Fault::DecoderDies | Fault::DecoderStalls)) {
                return self.respond_broken(&plan, hooks, fault == Some(Fault::DecoderStalls));
            }
        }
        self.respond(plan, timing, hooks)
    }

    /// A JSON answer whose headers promise the whole body but whose bytes
    /// stop half way: then the connection breaks (`stall` false) or goes
    /// silent for good.
    fn respond_broken(&self, plan: &Plan, mut hooks: Hooks, stall: bool) -> Response {
        hooks.aborted();
        drop(hooks);
        let json = render::full(plan, &self.config.model, &self.fingerprint);
        let length = json.len();
        let half = json.slice(..length / 2);
        let head = futures_util::stream::once(std::future::ready(Ok::<_, io::Error>(half)));
        let body = if stall {
            Body::from_stream(head.chain(futures_util::stream::pending()))
        } else {
            let err = io::Error::other("pd-sim: decoder died mid-answer");
            Body::from_stream(head.chain(futures_util::stream::once(std::future::ready(Err(err)))))
        };
        (
            StatusCode::OK,
            [
                (CONTENT_TYPE, "application/json".to_owned()),
                (http::header::CONTENT_LENGTH, length.to_string()),
            ],
            body,
        )
            .into_response()
    }

    fn respond(self: Arc<Self>, plan: Plan, timing: Timing, hooks: Hooks) -> Response {
        if plan.stream {
            let body = EventGen::new(self, plan, timing, hooks).into_body();
            (
                StatusCode::OK,
                [(CONTENT_TYPE, "text/event-stream; charset=utf-8")],
                body,
            )
                .into_response()
        } else {
            let json = render::full(&plan, &self.config.model, &self.fingerprint);
            (
                StatusCode::OK,
                [(CONTENT_TYPE, "application/json")],
                Body::new(OnceBody::new(json, hooks)),
            )
                .into_response()
        }
    }

    /// `(rank, delay after the response)` for every rank whose event is not
    /// lost.
    fn rank_schedule(&self, posting: Posting) -> impl Iterator<Item = (u32, Duration)> + '_ {
        (0..self.config.world_size)
            .filter(move |rank| {
                !self.config.drop_ranks.contains(rank) && posting.lost_rank != Some(*rank)
            })
            .map(|rank| {
                let stagger = self.config.rank_stagger.saturating_mul(rank);
                (rank, self.config.telemetry_delay.saturating_add(stagger))
            })
    }

    /// Sends a finished prefill's events in the background, one task per
    /// rank, as LMCache's workers do independently.
    fn spawn_telemetry(
        self: &Arc<Self>,
        handle: &tokio::runtime::Handle,
        ids: Vec<String>,
        posting: Posting,
    ) {
        let ids: Arc<[String]> = ids.into();
        for (rank, delay) in self.rank_schedule(posting) {
            handle.spawn(Arc::clone(self).post_rank(Arc::clone(&ids), rank, delay, posting));
        }
    }

    async fn post_rank(
        self: Arc<Self>,
        ids: Arc<[String]>,
        rank: u32,
        delay: Duration,
        posting: Posting,
    ) {
        sleep_if(delay).await;
        let body = telemetry::payload(&ids, &self.config.model, self.config.world_size, rank);
        let copies = if posting.duplicate { 2 } else { 1 };
        for _ in 0..copies {
            self.post_once(body.clone()).await;
        }
    }

    async fn post_once(&self, body: Bytes) {
        let result = match &self.telemetry {
            None => return,
            Some(Err(e)) => Err(e.clone()),
            Some(Ok(target)) => target.post(body.clone()).await,
        };
        let status = match result {
            Ok(status) => {
                self.counters.telemetry_ok.fetch_add(1, Ordering::Relaxed);
                status
            }
            Err(e) => {
                self.counters
                    .telemetry_failed
                    .fetch_add(1, Ordering::Relaxed);
                tracing::warn!("pd-sim: telemetry POST failed: {e}");
                0
            }
        };
        if self.config.record {
            let post = TelemetryPost {
                at: Instant::now(),
                payload: serde_json::from_slice(&body).unwrap_or_default(),
                status,
            };
            self.telemetry_log
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(post);
        }
    }

    fn metrics_text(&self, role: Role) -> String {
        let c = &self.counters;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let model = self.config.model.replace('\\', "\\\\").replace('"', "\\\"");
        let requests = match role {
            Role::Prefiller => load(&c.prefill_requests),
            Role::Decoder => load(&c.decode_requests),
        };
        let role = match role {
            Role::Prefiller => "prefiller",
            Role::Decoder => "decoder",
        };
        format!(
            "# HELP vllm:num_requests_waiting Number of requests waiting to be processed.\n\
             # TYPE vllm:num_requests_waiting gauge\n\
             vllm:num_requests_waiting{{model_name=\"{model}\"}} 0.0\n\
             # HELP pdsim_requests_total Completions requests received.\n\
             # TYPE pdsim_requests_total counter\n\
             pdsim_requests_total{{role=\"{role}\"}} {requests}\n\
             # HELP pdsim_decode_streams_total Decoder response bodies by outcome.\n\
             # TYPE pdsim_decode_streams_total counter\n\
             pdsim_decode_streams_total{{outcome=\"completed\"}} {}\n\
             pdsim_decode_streams_total{{outcome=\"cancelled\"}} {}\n\
             # HELP pdsim_prefills_cancelled_total Prefills dropped before answering.\n\
             # TYPE pdsim_prefills_cancelled_total counter\n\
             pdsim_prefills_cancelled_total {}\n\
             # HELP pdsim_telemetry_posts_total Telemetry POST attempts by result.\n\
             # TYPE pdsim_telemetry_posts_total counter\n\
             pdsim_telemetry_posts_total{{result=\"ok\"}} {}\n\
             pdsim_telemetry_posts_total{{result=\"failed\"}} {}\n\
             # HELP pdsim_faults_total Faults injected by --fault-rate, by kind.\n\
             # TYPE pdsim_faults_total counter\n{}",
            load(&c.decode_completed),
            load(&c.decode_cancelled),
            load(&c.prefills_cancelled),
            load(&c.telemetry_ok),
            load(&c.telemetry_failed),
            Fault::ALL
                .iter()
                .map(|f| format!(
                    "pdsim_faults_total{{fault=\"{f}\"}} {}\n",
                    load(&c.faults[f.index()])
                ))
                .collect::<String>(),
        )
    }
}

/// Which telemetry events a prefill sends: the fixed knobs with this
/// request's fault applied.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Posting {
    /// A rank whose event is lost, besides `drop_ranks`.
    lost_rank: Option<u32>,
    /// Each event posted twice.
    duplicate: bool,
}

/// A simulated server that can die: [`Running::kill`] drops the listener
/// and every connection, requests in flight included, so that clients see
/// refused and reset connections rather than a polite shutdown.
pub struct Running {
    addr: std::net::SocketAddr,
    kill: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    fn spawn(listener: TcpListener, router: Router) -> Running {
        let addr = listener
            .local_addr()
            .expect("a bound listener has an address");
        let (kill, mut killed) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            loop {
                let tcp = tokio::select! {
                    accepted = listener.accept() => match accepted {
                        Ok((tcp, _)) => tcp,
                        Err(_) => continue,
                    },
                    _ = killed.wait_for(|k| *k) => break,
                };
                let _ = tcp.set_nodelay(true);
                let service = hyper_util::service::TowerToHyperService::new(router.clone());
                connections.spawn(async move {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tcp), service)
                        .await;
                });
                // Reap the finished ones so the set stays small.
                while connections.try_join_next().is_some() {}
            }
            drop(listener);
            connections.shutdown().await;
        });
        Running { addr, kill, task }
    }

    pub fn addr(&self) -> std::net::SocketAddr {
        self.addr
    }

    /// Closes the listener and every connection; returns once they are
    /// closed, so the port refuses connections from then on.
    pub async fn kill(self) {
        let _ = self.kill.send(true);
        let _ = self.task.await;
    }
}

async fn serve(listener: TcpListener, router: Router) -> io::Result<()> {
    // SSE events are small writes; Nagle would batch them and hide the
    // per-token pacing a proxy is supposed to relay.
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, router).await
}

async fn chat(State(ctx): State<Ctx>, headers: HeaderMap, body: Bytes) -> Response {
    ctx.sim.handle(ctx.role, Kind::Chat, headers, body).await
}

async fn completions(State(ctx): State<Ctx>, headers: HeaderMap, body: Bytes) -> Response {
    ctx.sim
        .handle(ctx.role, Kind::Completions, headers, body)
        .await
}

async fn models(State(ctx): State<Ctx>) -> Response {
    let body = render::models(&ctx.sim.config.model, request::unix_now());
    ([(CONTENT_TYPE, "application/json")], body).into_response()
}

/// vLLM's `/tokenize`: `{"count": n, ...}` with pd-sim's counting (a
/// word is a token, chat templates add nothing), the same as its `usage`.
async fn tokenize(body: Bytes) -> Response {
    match request::tokenize_count(&body) {
        Some(count) => (
            [(CONTENT_TYPE, "application/json")],
            format!(r#"{{"count":{count},"max_model_len":32768,"tokens":[]}}"#),
        )
            .into_response(),
        None => ApiError::bad_request("prompt", "expected a prompt or messages".to_owned())
            .into_response(),
    }
}

async fn health() -> StatusCode {
    StatusCode::OK
}

async fn metrics(State(ctx): State<Ctx>) -> Response {
    (
        [(CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        ctx.sim.metrics_text(ctx.role),
    )
        .into_response()
}

/// FastAPI's shape for unknown paths, which is what vLLM answers.
async fn not_found() -> Response {
    (
        StatusCode::NOT_FOUND,
        [(CONTENT_TYPE, "application/json")],
        r#"{"detail":"Not Found"}"#,
    )
        .into_response()
}

async fn method_not_allowed() -> Response {
    (
        StatusCode::METHOD_NOT_ALLOWED,
        [(CONTENT_TYPE, "application/json")],
        r#"{"detail":"Method Not Allowed"}"#,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    fn faulty(kinds: &[Fault]) -> Arc<Sim> {
        Sim::new(SimConfig {
            faults: Faults {
                rate: 1.0,
                kinds: kinds.to_vec(),
                seed: Some(1),
                ..Faults::default()
            },
            ..SimConfig::default()
        })
    }

    async fn post(router: Router, body: &'static str) -> Response {
        let request = http::Request::post("/v1/completions")
            .header(CONTENT_TYPE, "application/json")
            .body(Body::from(body))
            .unwrap();
        router.oneshot(request).await.unwrap()
    }

    const STREAM: &str = r#"{"model":"sim-model","prompt":"a b c","max_tokens":8,"stream":true}"#;
    const JSON: &str = r#"{"model":"sim-model","prompt":"a b c","max_tokens":8}"#;

    #[tokio::test]
    async fn drawn_errors_answer_as_the_fixed_knobs_do() {
        let sim = faulty(&[Fault::Prefill503, Fault::Decoder500]);
        assert_eq!(post(sim.prefiller_router(), JSON).await.status(), 503);
        assert_eq!(post(sim.decoder_router(), JSON).await.status(), 500);
        assert_eq!(sim.faults_injected(Fault::Prefill503), 1);
        assert_eq!(sim.faults_injected(Fault::Decoder500), 1);
        let text = sim.metrics_text(Role::Decoder);
        assert!(
            text.contains("pdsim_faults_total{fault=\"decoder-500\"} 1\n"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn a_stalled_stream_stops_short_and_never_ends() {
        let sim = faulty(&[Fault::DecoderStalls]);
        let mut body = post(sim.decoder_router(), STREAM).await.into_body();
        let mut got = Vec::new();
        let wait = Duration::from_millis(200);
        while let Ok(Some(frame)) = tokio::time::timeout(wait, body.frame()).await {
            got.extend_from_slice(frame.unwrap().data_ref().unwrap());
        }
        let text = String::from_utf8(got).unwrap();
        assert!(!text.contains("[DONE]"), "{text}");
        assert!(text.matches("data: ").count() < 8, "{text}");
        drop(body);
        assert_eq!(
            sim.decode_streams_cancelled(),
            0,
            "a stall is no client cancel"
        );
    }

    #[tokio::test]
    async fn a_dying_json_answer_breaks_half_way() {
        let sim = faulty(&[Fault::DecoderDies]);
        let response = post(sim.decoder_router(), JSON).await;
        assert_eq!(response.status(), 200);
        assert!(response.into_body().collect().await.is_err());
    }
}

//! The two listeners — the OpenAI API and LMCache's telemetry — and the
//! state they share. Tests build the same routers over listeners bound on
//! port 0.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use crate::shutdown::Reached;
use axum::extract::State;
use axum::http::Method;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use http::{header, HeaderValue, StatusCode};
use hyper::server::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::task::JoinSet;
use tokio_stream::{Stream, StreamExt};

use crate::app::{App, Bound};
use crate::conn::{self, Activity, GuardedIo, Slots, Tracked};
use crate::error::ProxyError;
use crate::metrics::{Metrics, Port as MetricPort};
use crate::shutdown::Stage;
use crate::{proxy, telemetry};

/// The client-facing router: OpenAI endpoints, health and metrics.
/// With `--api-key`, every path but `/health` and `/ready` needs a key,
/// unknown ones included (401 before 404: no key, no map of the routes).
pub fn public_router(app: Arc<App>) -> Router {
    let keys = crate::auth::ApiKeys::new(&app.config.security.api_keys, Arc::clone(&app.metrics));
    let router = Router::new()
        .route("/v1/chat/completions", post(proxy::chat))
        .route("/v1/completions", post(proxy::completions))
        .route("/v1/models", get(proxy::models))
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(app);
    match keys {
        Some(keys) => router.layer(axum::middleware::from_fn_with_state(
            keys,
            crate::auth::require_api_key,
        )),
        None => router,
    }
}

/// The router LMCache posts to.
pub fn telemetry_router(app: Arc<App>) -> Router {
    Router::new()
        .route("/api/v1/telemetry", post(telemetry::handle))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(telemetry::Intake::new(app))
}

/// `--metrics-port`: the metrics alone, without a key, for a scraper.
pub fn metrics_router(app: Arc<App>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/health", get(health))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(app)
}

/// 200 while the process serves: a liveness probe. Upstream health is
/// vLLM's own `/health`.
async fn health() -> StatusCode {
    StatusCode::OK
}

/// 200 while at least one prefiller and one decoder are healthy: a
/// readinessProbe takes a proxy that could only fail out of its Service.
async fn ready(State(app): State<Arc<App>>) -> Response {
    let [(p_ok, p_all), (d_ok, d_all)] = app.fleet.readiness();
    if p_ok > 0 && d_ok > 0 {
        let body = serde_json::json!({
            "status": "ready",
            "prefillers": {"healthy": p_ok, "total": p_all},
            "decoders": {"healthy": d_ok, "total": d_all},
        });
        return axum::Json(body).into_response();
    }
    ProxyError::NotReady(format!(
        "not ready: {p_ok} of {p_all} prefillers and {d_ok} of {d_all} decoders are healthy"
    ))
    .into_response()
}

async fn metrics(State(app): State<Arc<App>>) -> Response {
    let text = app
        .metrics
        .render_with(|series| app.fleet.write_metrics(series));
    let mut response = text.into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    response
}

async fn not_found(uri: http::Uri) -> ProxyError {
    ProxyError::NotFound(format!("no route for {}", uri.path()))
}

async fn method_not_allowed(method: Method) -> ProxyError {
    ProxyError::MethodNotAllowed(method.to_string())
}

/// A listener with the accept queue as long as the kernel allows
/// (`net.core.somaxconn`). tokio's `TcpListener::bind` asks for 128:
/// LMCache opens a connection per telemetry event, so a batch of 256
/// prefills finishing together overflowed it, and each dropped SYN came
/// back after the kernel's 1 s retransmit — a request released a second
/// late (the load bench's p99 at 256 clients: 1,030 ms).
pub fn listen(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    #[cfg(unix)]
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Linux clamps it to `net.core.somaxconn` (4096 by default since 5.4).
const LISTEN_BACKLOG: u32 = 65_535;

/// Listens on `host:port`. A name such as `localhost` may resolve to
/// several addresses; IPv4 is tried first because LMCache's default
/// telemetry URL and most clients say `127.0.0.1`/`localhost` and reach it
/// over IPv4.
pub async fn bind(host: &str, port: u16) -> Result<TcpListener, String> {
    let mut addrs: Vec<_> = tokio::net::lookup_host((host, port))
        .await
        .map_err(|e| format!("cannot resolve {host}: {e}"))?
        .collect();
    addrs.sort_by_key(|a| !a.is_ipv4());
    let mut last = format!("{host} resolved to no address");
    for addr in addrs {
        match listen(addr) {
            Ok(listener) => return Ok(listener),
            Err(e) => last = format!("cannot listen on {addr}: {e}"),
        }
    }
    Err(last)
}

/// The listeners `serve` runs on; bound by the caller so tests can use port 0.
pub struct Listeners {
    pub public: TcpListener,
    pub telemetry: TcpListener,
    /// `--metrics-port`: `/metrics` without a key.
    pub metrics: Option<TcpListener>,
}

impl Listeners {
    /// Where they are bound: what [`App::build`] needs, so that the app
    /// is complete before anything is served.
    pub fn bound(&self) -> io::Result<Bound> {
        Bound::new(&self.public, &self.telemetry)
    }
}

/// How a shutdown went.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Drained {
    /// Requests still running when the drain ended (its deadline, or a
    /// second signal), which were cut.
    pub cut: usize,
}

/// Open telemetry connections allowed, apart from the API's: LMCache
/// opens one per event and closes it, so a few hundred cover every rank
/// of every prefiller posting at once; a flood of clients on the API port
/// cannot take them.
pub const TELEMETRY_CONNECTIONS: usize = 1024;

/// Open connections on `--metrics-port`: scrapers, a handful.
const METRICS_CONNECTIONS: usize = 64;

/// File descriptors kept for everything that is not a client
/// connection: the telemetry allowance, health checks, forwards, logs.
const FD_RESERVE: u64 = TELEMETRY_CONNECTIONS as u64 + 512;

/// After the drain's deadline, cut requests get this long to write their
/// error before their connections are dropped.
const CUT_GRACE: Duration = Duration::from_secs(1);

/// The API connections the open-file limit can carry: each may hold
/// itself, a prefill and a decode connection.
pub fn connection_cap(wanted: usize, fd_limit: u64) -> usize {
    let carried = fd_limit.saturating_sub(FD_RESERVE) / 3;
    wanted
        .min(usize::try_from(carried).unwrap_or(usize::MAX))
        .max(1)
}

/// Serves every port until the first item of `signals`; then stops
/// accepting API connections, lets the running requests finish (the
/// telemetry port serves on while any is parked) for `--drain-timeout`,
/// and cuts what is left with an error its client sees. A second item of
/// `signals` cuts at once. The stages are `app.shutdown`'s; `app` is
/// served once.
pub async fn serve(
    listeners: Listeners,
    app: Arc<App>,
    signals: impl Stream<Item = ()> + Send + Unpin + 'static,
) -> io::Result<Drained> {
    let mut signals = signals;
    let _kill_on_drop = app.shutdown.kill_on_drop();
    let mut background = spawn_background(&app);
    let api_slots = Slots::new(
        app.config.limits.max_connections,
        MetricPort::Api,
        Arc::clone(&app.metrics),
    );
    let mut ports = spawn_ports(listeners, &app, Arc::clone(&api_slots));
    // A port that fails ends the proxy; otherwise the first signal does.
    let failed = tokio::select! {
        Some(result) = ports.join_next() => Some(port_result(result)),
        () = signal(&mut signals) => None,
    };
    if let Some(Err(e)) = failed {
        app.shutdown.begin(Stage::Kill);
        return Err(e);
    }
    let drained = drain(&app, &api_slots, &mut signals).await;
    app.shutdown.begin(Stage::StopTelemetry);
    app.shutdown.begin(Stage::Kill);
    while let Some(result) = ports.join_next().await {
        port_result(result)?;
    }
    background.abort_all();
    Ok(drained)
}

/// The proxy's own work beside the requests (forwarding, discovery and
/// health checks, calibration, metrics upkeep), in one set: it ends with
/// `serve`, which owns it.
fn spawn_background(app: &Arc<App>) -> JoinSet<()> {
    let mut tasks = JoinSet::new();
    let forwarding = Arc::clone(app);
    tasks.spawn(async move { forwarding.forwarder.run().await });
    tasks.spawn(Arc::clone(&app.fleet).run());
    if app.config.fleet.direct_below_tokens > 0 {
        tasks.spawn(Arc::clone(app).calibrate_tokens());
    }
    let metrics = Arc::clone(&app.metrics);
    tasks.spawn(async move {
        let mut tick = tokio::time::interval(Metrics::UPKEEP_EVERY);
        loop {
            tick.tick().await;
            metrics.upkeep();
        }
    });
    tasks
}

/// One accept loop per listener; the API and metrics ports stop at
/// [`Stage::StopApi`], the telemetry port at [`Stage::StopTelemetry`].
fn spawn_ports(
    listeners: Listeners,
    app: &Arc<App>,
    api_slots: Arc<Slots>,
) -> JoinSet<io::Result<()>> {
    let metrics = Arc::clone(&app.metrics);
    let telemetry_slots = Slots::new(
        TELEMETRY_CONNECTIONS,
        MetricPort::Telemetry,
        Arc::clone(&metrics),
    );
    let mut ports = JoinSet::new();
    ports.spawn(serve_port(
        listeners.public,
        public_router(Arc::clone(app)),
        Port::new(Wire::Undecided, app, api_slots, Stage::StopApi),
    ));
    ports.spawn(serve_port(
        listeners.telemetry,
        telemetry_router(Arc::clone(app)),
        Port::new(Wire::Http1, app, telemetry_slots, Stage::StopTelemetry),
    ));
    if let Some(listener) = listeners.metrics {
        let slots = Slots::new(METRICS_CONNECTIONS, MetricPort::Metrics, metrics);
        ports.spawn(serve_port(
            listener,
            metrics_router(Arc::clone(app)),
            Port::new(Wire::Http1, app, slots, Stage::StopApi),
        ));
    }
    ports
}

/// Stops the API port and waits for its connections to close, for
/// `--drain-timeout` or until a signal; then cuts the requests still
/// running and gives their error answers a moment to be written.
async fn drain(
    app: &App,
    api_slots: &Slots,
    signals: &mut (impl Stream<Item = ()> + Unpin),
) -> Drained {
    let drain_timeout = app.config.server.drain_timeout;
    tracing::info!(
        drain_secs = drain_timeout.as_secs_f64(),
        "shutting down: no new API connections; draining requests (the telemetry port stays open while any is parked)"
    );
    app.shutdown.begin(Stage::StopApi);
    let forced = tokio::select! {
        () = api_slots.all_closed() => None,
        () = tokio::time::sleep(drain_timeout) => Some(false),
        () = signal(signals) => Some(true),
    };
    let mut drained = Drained::default();
    if let Some(forced) = forced {
        let cut = app.requests.load(Ordering::Acquire);
        drained.cut = cut;
        app.metrics.guards.drain_cut.increment(cut as u64);
        if forced {
            tracing::warn!(cut, "second signal: cutting the running requests now");
        } else {
            tracing::warn!(cut, "drain timeout passed: cutting the running requests");
        }
        app.shutdown.begin(Stage::Cut);
        if !forced {
            // Their error answers are written, unless a signal says now.
            let written = async {
                let _ = tokio::time::timeout(CUT_GRACE, api_slots.all_closed()).await;
            };
            tokio::select! {
                () = written => {},
                () = signal(signals) => {},
            }
        }
    }
    drained
}

/// The next signal; a stream that has ended sends none.
async fn signal(signals: &mut (impl Stream<Item = ()> + Unpin)) {
    if signals.next().await.is_none() {
        std::future::pending::<()>().await;
    }
}

fn port_result(result: Result<io::Result<()>, tokio::task::JoinError>) -> io::Result<()> {
    result.map_err(io::Error::other)?
}

/// How one listener serves its connections.
struct Port {
    /// `Http1` for the telemetry and metrics ports (plain HTTP/1.1, no
    /// protocol detection); `Undecided` for the API port, which speaks
    /// HTTP/1.1 to SDKs and curl and h2c (prior knowledge) to gateways.
    wire: Wire,
    slots: Arc<Slots>,
    builders: Arc<Builders>,
    metrics: Arc<Metrics>,
    send_timeout: Duration,
    idle_timeout: Duration,
    /// Whose shutdown stops this port.
    app: Arc<App>,
    /// The stage at which it stops accepting and asks its connections to
    /// finish.
    stop: Stage,
}

impl Port {
    fn new(wire: Wire, app: &Arc<App>, slots: Arc<Slots>, stop: Stage) -> Self {
        let idle = app.config.limits.idle_timeout;
        Port {
            wire,
            slots,
            builders: Arc::new(Builders::new(idle)),
            metrics: Arc::clone(&app.metrics),
            send_timeout: app.config.limits.send_timeout,
            idle_timeout: idle,
            app: Arc::clone(app),
            stop,
        }
    }

    /// Ready once this port is to stop.
    fn stopped(&self) -> Reached<'_> {
        self.app.shutdown.reached(self.stop)
    }

    /// Ready once its connections are to be dropped.
    fn killed(&self) -> Reached<'_> {
        self.app.shutdown.reached(Stage::Kill)
    }
}

/// An HTTP/2 connection is pinged this often, and closed when a ping goes
/// this long unanswered: a peer that vanished without a FIN (a pod gone,
/// a NAT entry dropped) does not hold its slot for ever.
const H2_KEEPALIVE: Duration = Duration::from_secs(20);

/// What an h2c client sends first.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The HTTP connection builders, made once per port.
struct Builders {
    http1: http1::Builder,
    http2: http2::Builder<TokioExecutor>,
    auto: auto::Builder<TokioExecutor>,
}

impl Builders {
    fn new(idle: Duration) -> Self {
        let mut http1 = http1::Builder::new();
        // A timer makes hyper bound the wait for request headers, which
        // is also how long an idle keep-alive connection stays open.
        http1.timer(TokioTimer::new()).header_read_timeout(idle);
        let mut http2 = http2::Builder::new(TokioExecutor::new());
        http2
            .timer(TokioTimer::new())
            .keep_alive_interval(H2_KEEPALIVE)
            .keep_alive_timeout(H2_KEEPALIVE);
        let mut auto = auto::Builder::new(TokioExecutor::new());
        auto.http1()
            .timer(TokioTimer::new())
            .header_read_timeout(idle);
        auto.http2()
            .timer(TokioTimer::new())
            .keep_alive_interval(H2_KEEPALIVE)
            .keep_alive_timeout(H2_KEEPALIVE);
        Builders { http1, http2, auto }
    }
}

/// Accepts on `listener` until the port's stop stage; the open
/// connections are then asked to finish (idle keep-alive ones close at
/// once) until [`Stage::Kill`], which drops them.
async fn serve_port(listener: TcpListener, router: Router, port: Port) -> io::Result<()> {
    let port = Arc::new(port);
    loop {
        let tcp = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    accept_failed(e).await;
                    continue;
                }
            },
            () = port.stopped() => break,
        };
        let _ = tcp.set_nodelay(true);
        let Some(slot) = port.slots.take() else {
            // At the cap: said in one write, then closed, so the client
            // learns why instead of waiting in the accept queue.
            let _ = tcp.try_write(&conn::refusal(port.slots.port));
            continue;
        };
        let (port, router) = (Arc::clone(&port), router.clone());
        tokio::spawn(async move {
            serve_connection(tcp, router, &port).await;
            drop(slot);
        });
    }
    Ok(())
}

/// One connection, start to end.
async fn serve_connection(tcp: TcpStream, router: Router, port: &Port) {
    let wire = match port.wire {
        Wire::Undecided => tokio::select! {
            wire = tokio::time::timeout(FIRST_BYTES_TIMEOUT.min(port.idle_timeout), sniff(&tcp)) => match wire {
                Ok(Some(wire)) => wire,
                // Silent, closed or reset before a byte: nothing to answer.
                Ok(None) | Err(_) => return,
            },
            // Nothing was read yet, so nothing is lost by closing.
            () = port.stopped() => return,
            () = port.killed() => return,
        },
        wire => wire,
    };
    let activity = Arc::new(Activity::default());
    let service = Tracked {
        router,
        activity: Arc::clone(&activity),
    };
    let io = TokioIo::new(GuardedIo::new(
        tcp,
        port.send_timeout,
        wire != Wire::H2c,
        Arc::clone(&port.metrics),
    ));
    let builders = &port.builders;
    // Each connection's task holds this future, sized for its largest
    // branch: HTTP/2's connection state (~3.9 KB) is boxed so that each of
    // the many HTTP/1.1 connections (~2.2 KB) does not carry its size.
    match wire {
        Wire::Http1 => {
            let conn = builders.http1.serve_connection(io, service);
            drive(conn, &activity, None, port, |c| c.graceful_shutdown()).await;
        }
        Wire::H2c => {
            let conn = builders.http2.serve_connection(io, service);
            let idle = Some(port.idle_timeout);
            Box::pin(drive(conn, &activity, idle, port, |c| {
                c.graceful_shutdown()
            }))
            .await;
        }
        Wire::Undecided => {
            let conn = builders.auto.serve_connection(io, service);
            let idle = Some(port.idle_timeout);
            Box::pin(drive(conn, &activity, idle, port, |c| {
                c.graceful_shutdown()
            }))
            .await;
        }
    }
}

/// Runs a connection until it ends; asks it to finish when its port
/// stops or, with `idle`, once no request has run on it for that long;
/// drops it at [`Stage::Kill`].
async fn drive<C, E>(
    conn: C,
    activity: &Activity,
    idle: Option<Duration>,
    port: &Port,
    graceful: impl Fn(Pin<&mut C>),
) where
    C: Future<Output = Result<(), E>>,
{
    tokio::pin!(conn);
    let idle_close = async {
        match idle {
            Some(idle) => activity.idle_for(idle).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(idle_close);
    tokio::select! {
        _ = conn.as_mut() => return,
        () = port.killed() => return,
        () = port.stopped() => {},
        () = &mut idle_close => {},
    }
    graceful(conn.as_mut());
    tokio::select! {
        _ = conn.as_mut() => {},
        () = port.killed() => {},
    }
}

/// How long a new API connection may stay silent before its first bytes;
/// after them hyper's header read timeout takes over.
const FIRST_BYTES_TIMEOUT: Duration = Duration::from_secs(30);

/// What a connection's first bytes say it speaks.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Wire {
    Http1,
    H2c,
    /// A strict prefix of the h2c preface: too short to tell.
    Undecided,
}

/// Tells HTTP/1.1 from h2c by peeking, so that hyper reads the socket
/// itself. hyper-util's auto builder instead reads the first 24 bytes and
/// replays them; hyper's HTTP/1 read buffer, finding its first read that
/// short, then grows from 8 to 16 KiB for the rest of the request: 8 KiB
/// more for every open connection (heaptrack). With this loop in place of
/// axum's, 10,000 parked HTTP/1.1 requests went from 282 to 116 MiB of
/// RSS. A first segment shorter than the preface that matches it so far
/// is left to the auto builder, which waits for more. `None`: the
/// connection closed (or failed) before sending anything.
async fn sniff(tcp: &TcpStream) -> Option<Wire> {
    let mut first = [0u8; H2_PREFACE.len()];
    let n = tcp.peek(&mut first).await.ok()?;
    classify(&first[..n])
}

fn classify(first: &[u8]) -> Option<Wire> {
    let n = first.len().min(H2_PREFACE.len());
    if n == 0 {
        None
    } else if first[..n] != H2_PREFACE[..n] {
        Some(Wire::Http1)
    } else if n == H2_PREFACE.len() {
        Some(Wire::H2c)
    } else {
        Some(Wire::Undecided)
    }
}

/// An accept error is about one connection (it was reset) or about the
/// process (out of file descriptors): neither stops the server, but the
/// second would spin, so it pauses briefly as axum's own loop does.
async fn accept_failed(e: io::Error) {
    if matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset
    ) {
        return;
    }
    tracing::warn!(error = %e, "accept failed");
    tokio::time::sleep(Duration::from_millis(100)).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_bytes_tell_the_protocol() {
        assert_eq!(classify(b""), None);
        assert_eq!(
            classify(b"POST /v1/chat/completions HTTP/1.1\r\n"),
            Some(Wire::Http1)
        );
        assert_eq!(classify(b"G"), Some(Wire::Http1));
        // "PRI" as an HTTP/1 method: one byte off the preface is enough.
        assert_eq!(classify(b"PRI * HTTP/1.1\r\n\r\n"), Some(Wire::Http1));
        assert_eq!(classify(H2_PREFACE), Some(Wire::H2c));
        assert_eq!(classify(&H2_PREFACE[..5]), Some(Wire::Undecided));
    }

    #[tokio::test]
    async fn a_burst_of_connections_waits_in_the_accept_queue() {
        // Nothing accepts: every connect below completes only if the
        // kernel queued it. With tokio's default backlog of 128 the rest
        // would wait for SYN retransmits that find the queue still full.
        let listener = listen("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let connects: Vec<_> = (0..300)
            .map(|_| tokio::spawn(TcpStream::connect(addr)))
            .collect();
        let all = async {
            let mut streams = Vec::new();
            for c in connects {
                streams.push(c.await.unwrap().unwrap());
            }
            streams
        };
        let streams = tokio::time::timeout(Duration::from_secs(10), all)
            .await
            .expect("300 connections queue without an accept");
        assert_eq!(streams.len(), 300);
    }

    #[tokio::test]
    async fn peeking_leaves_the_bytes_for_hyper() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};

        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (mut server, _) = listener.accept().await.unwrap();
        client.write_all(&H2_PREFACE[..5]).await.unwrap();
        assert_eq!(sniff(&server).await, Some(Wire::Undecided));
        client.write_all(&H2_PREFACE[5..]).await.unwrap();
        assert_eq!(sniff(&server).await, Some(Wire::H2c));
        drop(client);
        let mut all = Vec::new();
        server.read_to_end(&mut all).await.unwrap();
        assert_eq!(all, H2_PREFACE, "nothing was consumed");
        assert_eq!(sniff(&server).await, None, "closed before a byte");
    }
}

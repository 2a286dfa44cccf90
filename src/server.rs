//! The two listeners — the OpenAI API and LMCache's telemetry — and the
//! state they share. Tests build the same routers over listeners bound on
//! port 0.

use std::future::{Future, IntoFuture};
use std::io;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::Method;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use axum::Router;
use http::{header, HeaderValue, StatusCode};
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::config::Config;
use crate::error::ProxyError;
use crate::metrics::Metrics;
use crate::pending::Pending;
use crate::upstream::{self, HttpClient, Pool};
use crate::{proxy, telemetry};

/// After a shutdown signal, in-flight streams get this long to finish
/// before the listeners are dropped anyway.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// What every handler shares.
pub struct App {
    pub config: Config,
    pub pending: Arc<Pending>,
    pub metrics: Arc<Metrics>,
    pub client: HttpClient,
    pub prefillers: Pool,
    pub decoders: Pool,
}

impl App {
    pub fn new(config: Config) -> Arc<Self> {
        let metrics = Metrics::new();
        Arc::new(App {
            pending: Pending::new(metrics.pending.clone()),
            client: upstream::client(),
            prefillers: Pool::new(config.prefillers.clone()),
            decoders: Pool::new(config.decoders.clone()),
            metrics,
            config,
        })
    }
}

/// The client-facing router: OpenAI endpoints, health and metrics.
pub fn public_router(app: Arc<App>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(proxy::chat))
        .route("/v1/completions", post(proxy::completions))
        .route("/v1/models", get(proxy::models))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(app)
}

/// The router LMCache posts to.
pub fn telemetry_router(app: Arc<App>) -> Router {
    Router::new()
        .route("/api/v1/telemetry", post(telemetry::handle))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(app)
}

/// 200 while the process serves: a liveness probe. Upstream health is
/// vLLM's own `/health`.
async fn health() -> StatusCode {
    StatusCode::OK
}

async fn metrics(State(app): State<Arc<App>>) -> Response {
    let mut response = app.metrics.render().into_response();
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

/// The listeners `serve` runs on; bound by the caller so tests can use port 0.
pub struct Listeners {
    pub public: TcpListener,
    pub telemetry: TcpListener,
}

/// Serves both ports until `shutdown` completes, then stops accepting and
/// gives in-flight requests [`DRAIN_TIMEOUT`] to end.
pub async fn serve(
    listeners: Listeners,
    app: Arc<App>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    let upkeep = {
        let metrics = Arc::clone(&app.metrics);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Metrics::UPKEEP_EVERY);
            loop {
                tick.tick().await;
                metrics.upkeep();
            }
        })
    };
    let nodelay = |tcp: &mut tokio::net::TcpStream| {
        let _ = tcp.set_nodelay(true);
    };
    let public = axum::serve(
        listeners.public.tap_io(nodelay),
        public_router(Arc::clone(&app)),
    )
    .with_graceful_shutdown(stopped(stop_rx.clone()));
    let telemetry = serve_telemetry(
        listeners.telemetry,
        telemetry_router(app),
        stopped(stop_rx.clone()),
    );
    let servers = async { tokio::try_join!(public.into_future(), telemetry) };
    let drain_deadline = async {
        shutdown.await;
        tracing::info!("shutting down: no new connections, draining in-flight requests");
        let _ = stop_tx.send(true);
        tokio::time::sleep(DRAIN_TIMEOUT).await;
    };
    let result = tokio::select! {
        r = servers => r.map(|_| ()),
        _ = drain_deadline => {
            tracing::warn!("drain timeout passed; dropping the remaining connections");
            Ok(())
        }
    };
    upkeep.abort();
    result
}

/// Serves LMCache's telemetry posts. Every event comes on a fresh
/// connection (Python urllib, `Connection: close`), so the per-connection
/// cost is the per-event cost: plain HTTP/1.1, without axum's HTTP/2
/// detection (an extra read per connection) or TCP_NODELAY (the one reply
/// is written whole, then the connection closes).
async fn serve_telemetry(
    listener: TcpListener,
    router: Router,
    stop: impl Future<Output = ()>,
) -> io::Result<()> {
    let graceful = GracefulShutdown::new();
    let mut http = http1::Builder::new();
    // A timer makes hyper bound the wait for request headers.
    http.timer(TokioTimer::new());
    tokio::pin!(stop);
    loop {
        let tcp = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    accept_failed(e).await;
                    continue;
                }
            },
            () = &mut stop => break,
        };
        let service = TowerToHyperService::new(router.clone());
        let connection = graceful.watch(http.serve_connection(TokioIo::new(tcp), service));
        tokio::spawn(async move {
            let _ = connection.await;
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
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
    tracing::warn!(error = %e, "telemetry accept failed");
    tokio::time::sleep(Duration::from_millis(100)).await;
}

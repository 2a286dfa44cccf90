//! The two listeners — the OpenAI API and LMCache's telemetry — and the
//! state they share. Tests build the same routers over listeners bound on
//! port 0.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::Method;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use http::{header, HeaderValue, StatusCode};
use hyper::server::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::watch;

use crate::app::App;
use crate::error::ProxyError;
use crate::metrics::Metrics;
use crate::{proxy, telemetry};

/// After a shutdown signal, in-flight streams get this long to finish
/// before the listeners are dropped anyway.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// The client-facing router: OpenAI endpoints, health and metrics.
pub fn public_router(app: Arc<App>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(proxy::chat))
        .route("/v1/completions", post(proxy::completions))
        .route("/v1/models", get(proxy::models))
        .route("/health", get(health))
        .route("/ready", get(ready))
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
    let mut text = app.metrics.render();
    app.fleet.render_metrics(&mut text);
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
}

/// Serves both ports until `shutdown` completes, then stops accepting and
/// gives in-flight requests [`DRAIN_TIMEOUT`] to end.
pub async fn serve(
    listeners: Listeners,
    app: Arc<App>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let (stop_tx, stop_rx) = watch::channel(false);
    let own: Vec<SocketAddr> = [&listeners.public, &listeners.telemetry]
        .iter()
        .filter_map(|l| l.local_addr().ok())
        .collect();
    app.fleet.set_own_addrs(&own);
    let telemetry_addr = listeners.telemetry.local_addr()?;
    app.set_routing(telemetry_addr, std::env::var("POD_IP").ok().as_deref())
        .map_err(io::Error::other)?;
    let forward = app.take_forward_task().map(tokio::spawn);
    let fleet = tokio::spawn(Arc::clone(&app.fleet).run());
    let calibration = (app.config.direct_below_tokens > 0)
        .then(|| tokio::spawn(Arc::clone(&app).calibrate_tokens()));
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
    let public = serve_port(
        listeners.public,
        public_router(Arc::clone(&app)),
        Port::Api,
        stop_rx.clone(),
    );
    let telemetry = serve_port(
        listeners.telemetry,
        telemetry_router(app),
        Port::Telemetry,
        stop_rx,
    );
    let servers = async { tokio::try_join!(public, telemetry) };
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
    fleet.abort();
    if let Some(forward) = forward {
        forward.abort();
    }
    if let Some(calibration) = calibration {
        calibration.abort();
    }
    result
}

/// What a port speaks.
#[derive(Clone, Copy, PartialEq)]
enum Port {
    /// The OpenAI API: HTTP/1.1 from SDKs and curl, h2c (prior knowledge)
    /// from gateways; TCP_NODELAY, since SSE events go out one by one.
    Api,
    /// LMCache's telemetry: every event comes on a fresh connection
    /// (Python urllib, `Connection: close`), so the per-connection cost is
    /// the per-event cost. Plain HTTP/1.1, no protocol detection.
    /// TCP_NODELAY all the same: other replicas forward events over
    /// keep-alive connections, where a reply held back by Nagle behind a
    /// delayed ACK would stall the next forward.
    Telemetry,
}

/// How long a new API connection may stay silent before its first bytes;
/// after them hyper's own 30 s bound on request headers takes over.
const FIRST_BYTES_TIMEOUT: Duration = Duration::from_secs(30);

async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|stop| *stop).await;
}

/// What an h2c client sends first.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The HTTP connection builders, made once per port.
struct Builders {
    http1: http1::Builder,
    http2: http2::Builder<TokioExecutor>,
    auto: auto::Builder<TokioExecutor>,
}

/// Accepts on `listener` until `stop` turns true, then lets the open
/// connections finish (hyper closes idle keep-alive ones at once).
async fn serve_port(
    listener: TcpListener,
    router: Router,
    port: Port,
    mut stop: watch::Receiver<bool>,
) -> io::Result<()> {
    let graceful = GracefulShutdown::new();
    let mut http1 = http1::Builder::new();
    // A timer makes hyper bound the wait for request headers.
    http1.timer(TokioTimer::new());
    let mut auto = auto::Builder::new(TokioExecutor::new());
    auto.http1().timer(TokioTimer::new());
    let builders = Arc::new(Builders {
        http1,
        http2: http2::Builder::new(TokioExecutor::new()),
        auto,
    });
    loop {
        let tcp = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    accept_failed(e).await;
                    continue;
                }
            },
            () = stopped(&mut stop) => break,
        };
        let service = TowerToHyperService::new(router.clone());
        let _ = tcp.set_nodelay(true);
        if port == Port::Telemetry {
            let connection =
                graceful.watch(builders.http1.serve_connection(TokioIo::new(tcp), service));
            tokio::spawn(connection);
            continue;
        }
        let (builders, watcher, mut stop) =
            (Arc::clone(&builders), graceful.watcher(), stop.clone());
        tokio::spawn(async move {
            let wire = tokio::select! {
                wire = tokio::time::timeout(FIRST_BYTES_TIMEOUT, sniff(&tcp)) => match wire {
                    Ok(Some(wire)) => wire,
                    // Silent, closed or reset before a byte: nothing to answer.
                    Ok(None) | Err(_) => return,
                },
                // Nothing was read yet, so nothing is lost by closing.
                () = stopped(&mut stop) => return,
            };
            let io = TokioIo::new(tcp);
            match wire {
                Wire::Http1 => {
                    let _ = watcher
                        .watch(builders.http1.serve_connection(io, service))
                        .await;
                }
                Wire::H2c => {
                    let _ = watcher
                        .watch(builders.http2.serve_connection(io, service))
                        .await;
                }
                Wire::Undecided => {
                    let _ = watcher
                        .watch(builders.auto.serve_connection(io, service))
                        .await;
                }
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

/// What a connection's first bytes say it speaks.
#[derive(Debug, PartialEq)]
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

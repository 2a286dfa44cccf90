//! The two engines' HTTP servers: vLLM's routes, serving on a bound
//! listener, and a server that can be killed like a pod.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header::CONTENT_TYPE, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use axum::Router;
use bytes::Bytes;
use tokio::net::{TcpListener, TcpSocket};

use crate::request::{self, ApiError, Kind};
use crate::{render, Role, Sim};

#[derive(Clone)]
struct Ctx {
    sim: Arc<Sim>,
    role: Role,
}

impl Sim {
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

/// Listens on `host:port` the way pd-proxy does, so the standalone pd-sim
/// takes the same `--host` values: a name such as `localhost` tries its
/// IPv4 addresses first (LMCache's default telemetry URL and most clients
/// say `127.0.0.1`), and the accept queue is as deep as the kernel allows,
/// since a load bench opens hundreds of connections at once.
pub async fn bind(host: &str, port: u16) -> Result<TcpListener, String> {
    let resolved = tokio::net::lookup_host((host, port))
        .await
        .map_err(|e| format!("cannot resolve {host}: {e}"))?;
    let (v4, v6): (Vec<SocketAddr>, Vec<SocketAddr>) = resolved.partition(SocketAddr::is_ipv4);
    let mut failure = format!("{host} resolved to no address");
    for addr in v4.into_iter().chain(v6) {
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()
        } else {
            TcpSocket::new_v6()
        };
        // Linux clamps the backlog to `net.core.somaxconn`.
        let listening = socket.and_then(|socket| {
            #[cfg(unix)]
            socket.set_reuseaddr(true)?;
            socket.bind(addr)?;
            socket.listen(65_535)
        });
        failure = match listening {
            Ok(listener) => return Ok(listener),
            Err(e) => format!("cannot listen on {addr}: {e}"),
        };
    }
    Err(failure)
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

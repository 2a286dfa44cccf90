//! The vLLM servers behind the proxy and the one HTTP client that reaches
//! them: pooled keep-alive connections with TCP_NODELAY, so the hot path
//! pays no handshake and no Nagle delay.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method, Request, Response, Uri};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::config::Endpoint;

/// A dead upstream must fail fast so the client hears about it quickly.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

pub fn client() -> HttpClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(CONNECT_TIMEOUT));
    connector.set_keepalive(Some(Duration::from_secs(60)));
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(60))
        .pool_timer(TokioTimer::new())
        .build(connector)
}

/// One role's servers, picked round robin. Prefillers and decoders each
/// have their own pool and counter, so the pairing of a prefiller with a
/// decoder does not depend on their counts (the Python proxy shares one
/// index).
pub struct Pool {
    endpoints: Box<[Endpoint]>,
    next: AtomicUsize,
}

impl Pool {
    pub fn new(endpoints: Vec<Endpoint>) -> Self {
        assert!(
            !endpoints.is_empty(),
            "config validation guarantees one endpoint"
        );
        Pool {
            endpoints: endpoints.into_boxed_slice(),
            next: AtomicUsize::new(0),
        }
    }

    pub fn pick(&self) -> &Endpoint {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.endpoints.len();
        &self.endpoints[i]
    }

    pub fn all(&self) -> &[Endpoint] {
        &self.endpoints
    }
}

/// Builds a JSON POST. `auth` is the configured key or else the client's
/// own `Authorization`.
pub fn post_json(
    uri: &Uri,
    body: Bytes,
    auth: Option<&HeaderValue>,
    extra: Option<(&'static str, HeaderValue)>,
) -> Request<Full<Bytes>> {
    let mut req = Request::new(Full::new(body));
    *req.method_mut() = Method::POST;
    *req.uri_mut() = uri.clone();
    let headers = req.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if let Some(auth) = auth {
        headers.insert(header::AUTHORIZATION, auth.clone());
    }
    if let Some((name, value)) = extra {
        headers.insert(name, value);
    }
    req
}

pub fn get(uri: &Uri, auth: Option<&HeaderValue>) -> Request<Full<Bytes>> {
    let mut req = Request::new(Full::new(Bytes::new()));
    *req.uri_mut() = uri.clone();
    if let Some(auth) = auth {
        req.headers_mut()
            .insert(header::AUTHORIZATION, auth.clone());
    }
    req
}

/// The headers of an upstream answer worth passing to the client. Hop by
/// hop and framing headers are the proxy's own business.
pub fn relayed_headers(from: &Response<Incoming>) -> HeaderMap {
    let mut out = HeaderMap::new();
    for name in [header::CONTENT_TYPE, header::CACHE_CONTROL] {
        if let Some(v) = from.headers().get(&name) {
            out.insert(name, v.clone());
        }
    }
    out
}

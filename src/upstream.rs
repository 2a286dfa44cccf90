//! The vLLM servers behind the proxy and the one HTTP client that reaches
//! them: pooled keep-alive connections with TCP_NODELAY, so the hot path
//! pays no handshake and no Nagle delay.

use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderMap, HeaderName, HeaderValue, Method, Request, Response, Uri};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

/// A dead upstream must fail fast so the client hears about it quickly.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long an upstream connection may sit idle in the pool. The pool hands
/// out the most recently used connection first, so at a steady load the
/// ones in use are never idle this long and none is reopened; what a burst
/// opened beyond the steady need is closed within two of these (the pool
/// checks once a period), and its buffers with it. At 60 s, 10,000
/// released requests left ~8,000 idle connections and ~150 MiB held for
/// over a minute.
const POOL_IDLE: Duration = Duration::from_secs(2);

pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

pub fn client() -> HttpClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(CONNECT_TIMEOUT));
    connector.set_keepalive(Some(Duration::from_secs(60)));
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(POOL_IDLE)
        .pool_timer(TokioTimer::new())
        .build(connector)
}

/// Marks every request the proxy sends. A request that arrives carrying
/// it came from a proxy (this one, or one configured to forward here): it
/// is answered 508 instead of being forwarded around a loop.
pub static HOP_HEADER: HeaderName = HeaderName::from_static("x-pd-proxy-hop");

/// Asks vLLM to report its own load on a non-streaming answer (ORCA).
pub static LOAD_FORMAT_HEADER: HeaderName = HeaderName::from_static("endpoint-load-metrics-format");
pub static LOAD_HEADER: HeaderName = HeaderName::from_static("endpoint-load-metrics");

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
    headers.insert(HOP_HEADER.clone(), HeaderValue::from_static("1"));
    req
}

pub fn get(uri: &Uri, auth: Option<&HeaderValue>) -> Request<Full<Bytes>> {
    let mut req = Request::new(Full::new(Bytes::new()));
    *req.uri_mut() = uri.clone();
    if let Some(auth) = auth {
        req.headers_mut()
            .insert(header::AUTHORIZATION, auth.clone());
    }
    req.headers_mut()
        .insert(HOP_HEADER.clone(), HeaderValue::from_static("1"));
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

/// vLLM's queue length from its ORCA header, `JSON {"named_metrics":
/// {"num_requests_waiting": 3.0, ...}}` (vLLM's `orca_metrics.py`).
/// Anything else — another format, a huge or malformed value — is
/// ignored: a load report only weighs a choice, it never decides one.
pub fn orca_waiting(value: &HeaderValue) -> Option<u32> {
    let text = value.to_str().ok()?.strip_prefix("JSON")?.trim_start();
    if text.len() > 4096 {
        return None;
    }
    let report: serde_json::Value = serde_json::from_str(text).ok()?;
    let waiting = report
        .get("named_metrics")?
        .get("num_requests_waiting")?
        .as_f64()?;
    (waiting.is_finite() && waiting >= 0.0).then(|| waiting.min(1e6) as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn orca_reports() {
        let v = |s: &'static str| orca_waiting(&HeaderValue::from_static(s));
        assert_eq!(
            v(
                r#"JSON {"named_metrics": {"kv_cache_usage_perc": 0.0, "num_requests_waiting": 3.0}}"#
            ),
            Some(3)
        );
        assert_eq!(v("TEXT named_metrics.num_requests_waiting=3.0"), None);
        assert_eq!(
            v(r#"JSON {"named_metrics": {"num_requests_waiting": -1}}"#),
            None
        );
        assert_eq!(
            v(r#"JSON {"named_metrics": {"num_requests_waiting": 1e300}}"#),
            Some(1_000_000)
        );
        assert_eq!(v("JSON {"), None);
    }
}

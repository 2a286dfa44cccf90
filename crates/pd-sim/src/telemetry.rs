//! The prefiller's LMCache telemetry sender, reproducing what matters to the
//! receiving proxy: one POST per TP rank, each on a fresh connection with
//! `Connection: close` (Python urllib), a 5 s timeout and no retry.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{CONNECTION, CONTENT_LENGTH, CONTENT_TYPE, HOST, USER_AGENT};
use hyper::Request;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// LMCache's sender gives up after this long and never retries.
const POST_TIMEOUT: Duration = Duration::from_secs(5);

/// Where telemetry goes, parsed once so a bad URL is reported at startup and
/// the per-request path does no parsing.
#[derive(Clone, Debug)]
pub(crate) struct Target {
    host: String,
    port: u16,
    authority: String,
    path: String,
}

impl Target {
    pub fn parse(url: &str) -> Result<Self, String> {
        let uri: http::Uri = url
            .parse()
            .map_err(|e| format!("invalid telemetry url {url:?}: {e}"))?;
        if uri.scheme_str() != Some("http") {
            return Err(format!("telemetry url {url:?} must start with http://"));
        }
        let authority = uri
            .authority()
            .ok_or_else(|| format!("telemetry url {url:?} has no host"))?;
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        Ok(Target {
            host,
            port: authority.port_u16().unwrap_or(80),
            authority: authority.as_str().to_owned(),
            path: uri
                .path_and_query()
                .map_or_else(|| "/".to_owned(), |p| p.as_str().to_owned()),
        })
    }

    /// One POST on its own connection. Returns the reply's status.
    pub async fn post(&self, body: Bytes) -> Result<u16, String> {
        match tokio::time::timeout(POST_TIMEOUT, self.post_inner(body)).await {
            Ok(result) => result,
            Err(_) => Err("telemetry POST timed out".to_owned()),
        }
    }

    async fn post_inner(&self, body: Bytes) -> Result<u16, String> {
        let stream = TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|e| format!("connect {}: {e}", self.authority))?;
        let _ = stream.set_nodelay(true);
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        // The connection ends by itself after the reply (Connection: close),
        // or is dropped with this task's timeout.
        let conn = tokio::spawn(conn);
        let request = Request::post(self.path.as_str())
            .header(HOST, self.authority.as_str())
            .header(USER_AGENT, "Python-urllib/3.11")
            .header(CONTENT_TYPE, "application/json")
            .header(CONTENT_LENGTH, body.len())
            .header(CONNECTION, "close")
            .body(Full::new(body))
            .map_err(|e| format!("request: {e}"))?;
        let result = async {
            let response = sender
                .send_request(request)
                .await
                .map_err(|e| format!("send: {e}"))?;
            let status = response.status().as_u16();
            response
                .into_body()
                .collect()
                .await
                .map_err(|e| format!("reply body: {e}"))?;
            Ok(status)
        }
        .await;
        if result.is_err() {
            conn.abort();
        }
        result
    }
}

/// The exact bytes LMCache sends: Python's `json.dumps` with its default
/// `", "` / `": "` separators and key order.
pub(crate) fn payload(ids: &[String], model: &str, world_size: u32, rank: u32) -> Bytes {
    let quote = |s: &str| serde_json::to_string(s).unwrap_or_else(|_| "\"\"".to_owned());
    let ids = ids
        .iter()
        .map(|id| quote(id))
        .collect::<Vec<_>>()
        .join(", ");
    Bytes::from(format!(
        "{{\"event\": \"request_store_finished\", \"request_ids_set\": [{ids}], \
         \"model_name\": {}, \"world_size\": {world_size}, \"kv_rank\": {rank}}}",
        quote(model)
    ))
}

//! What one client, one connection and the whole proxy may hold or take:
//! bodies, waits, silences, parked requests, open connections. The
//! section the server's ports, the request path and `Pending` read.

use std::time::Duration;

use super::seconds;

#[derive(Debug, Clone, clap::Args)]
pub struct LimitsArgs {
    /// Largest request body accepted (413 past it). The default keeps a
    /// few requests at the limit within the sidecar's 512 MiB: one costs
    /// about twice its body (the body and its prefill copy).
    #[arg(
        long,
        env = "PD_PROXY_MAX_BODY_BYTES",
        default_value_t = 32 << 20,
        value_name = "BYTES"
    )]
    pub max_body_bytes: usize,
    /// Longest time a client may take to send a request body (408 past it).
    #[arg(
        long,
        env = "PD_PROXY_BODY_TIMEOUT",
        default_value_t = 30.0,
        value_name = "SECONDS"
    )]
    pub body_timeout: f64,
    /// Longest silence inside a decoder's stream once it has started; the
    /// client then gets an SSE error event and `[DONE]`.
    #[arg(
        long,
        env = "PD_PROXY_STREAM_IDLE_TIMEOUT",
        default_value_t = 60.0,
        value_name = "SECONDS"
    )]
    pub stream_idle_timeout: f64,
    /// Longest time a client may leave sent bytes unread (its receive
    /// window full) before its connection, and the decoder's, are closed.
    #[arg(
        long,
        env = "PD_PROXY_SEND_TIMEOUT",
        default_value_t = 30.0,
        value_name = "SECONDS"
    )]
    pub send_timeout: f64,
    /// An API connection with no request in progress is closed after this
    /// long (HTTP/1.1 keep-alive and HTTP/2 alike).
    #[arg(
        long,
        env = "PD_PROXY_IDLE_TIMEOUT",
        default_value_t = 60.0,
        value_name = "SECONDS"
    )]
    pub idle_timeout: f64,
    /// Most requests parked at once waiting for their KV; past it, 503
    /// with Retry-After.
    #[arg(long, env = "PD_PROXY_MAX_PENDING", default_value_t = 8192)]
    pub max_pending: usize,
    /// Most open connections on the API port; past it new ones get 503.
    /// The telemetry port has its own, separate allowance. The default is
    /// lowered to what the open-file limit carries; a value given stands.
    #[arg(long, env = "PD_PROXY_MAX_CONNECTIONS", default_value_t = 8192)]
    pub max_connections: usize,
}

/// The limits, validated.
#[derive(Debug, Clone)]
pub struct LimitsConfig {
    pub max_body_bytes: usize,
    pub body_timeout: Duration,
    pub stream_idle_timeout: Duration,
    pub send_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_pending: usize,
    /// Open API connections; the binary lowers it to what the open-file
    /// limit carries unless it was given.
    pub max_connections: usize,
}

impl LimitsArgs {
    pub(super) fn resolve(self) -> Result<LimitsConfig, String> {
        if self.max_body_bytes < MIN_BODY_BYTES {
            return Err(format!(
                "--max-body-bytes {} is below {MIN_BODY_BYTES}",
                self.max_body_bytes
            ));
        }
        if self.max_pending == 0 || self.max_connections == 0 {
            return Err("--max-pending and --max-connections must be at least 1".into());
        }
        Ok(LimitsConfig {
            max_body_bytes: self.max_body_bytes,
            body_timeout: seconds("--body-timeout", self.body_timeout)?,
            stream_idle_timeout: seconds("--stream-idle-timeout", self.stream_idle_timeout)?,
            send_timeout: seconds("--send-timeout", self.send_timeout)?,
            idle_timeout: seconds("--idle-timeout", self.idle_timeout)?,
            max_pending: self.max_pending,
            max_connections: self.max_connections,
        })
    }
}

/// A body limit below this would refuse ordinary chat requests.
const MIN_BODY_BYTES: usize = 4096;

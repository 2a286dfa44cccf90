//! Where the proxy listens and how it stops: the section `serve` and the
//! binary read.

use std::time::Duration;

use super::seconds;

#[derive(Debug, Clone, clap::Args)]
pub struct ServerArgs {
    /// Address to serve the OpenAI API on.
    #[arg(long, env = "PD_PROXY_HOST", default_value = "localhost")]
    pub host: String,
    #[arg(long, env = "PD_PROXY_PORT", default_value_t = 8000)]
    pub port: u16,
    /// Port of the LMCache telemetry endpoint (POST /api/v1/telemetry).
    #[arg(long, env = "PD_PROXY_TELEMETRY_PORT", default_value_t = 5768)]
    pub telemetry_port: u16,
    /// Address of the telemetry endpoint [default: --host].
    #[arg(long, env = "PD_PROXY_TELEMETRY_HOST")]
    pub telemetry_host: Option<String>,
    /// Serve `/metrics` on this port as well, without a key, for a
    /// scraper that holds none; on the API port it then still needs one.
    #[arg(long, env = "PD_PROXY_METRICS_PORT")]
    pub metrics_port: Option<u16>,
    /// After SIGTERM: how long in-flight requests may take to finish
    /// before they are cut. A second signal ends at once.
    #[arg(
        long,
        env = "PD_PROXY_DRAIN_TIMEOUT",
        default_value_t = 30.0,
        value_name = "SECONDS"
    )]
    pub drain_timeout: f64,
}

/// What `serve` needs besides the listeners themselves.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// `--metrics-port`: the binary binds it; `None`, no such listener.
    pub metrics_port: Option<u16>,
    /// How long a shutdown waits for running requests before cutting them.
    pub drain_timeout: Duration,
}

/// Where to listen; kept apart from [`super::Config`] because tests bind
/// their own listeners on port 0.
#[derive(Debug, Clone)]
pub struct ListenAddrs {
    pub host: String,
    pub port: u16,
    pub telemetry_host: String,
    pub telemetry_port: u16,
}

impl ServerArgs {
    /// The ports must differ: two listeners on one port would fail to bind,
    /// and saying which flags collide beats "address in use".
    pub(super) fn resolve(self) -> Result<(ServerConfig, ListenAddrs), String> {
        if self.port != 0 && self.port == self.telemetry_port {
            return Err(format!(
                "--telemetry-port {} is also the API port (--port): give the telemetry endpoint a port of its own",
                self.port
            ));
        }
        if let Some(port) = self.metrics_port {
            if port != 0 && (port == self.port || port == self.telemetry_port) {
                return Err(format!(
                    "--metrics-port {port} is also the API or telemetry port"
                ));
            }
        }
        let server = ServerConfig {
            metrics_port: self.metrics_port,
            drain_timeout: seconds("--drain-timeout", self.drain_timeout)?,
        };
        let listen = ListenAddrs {
            telemetry_host: self.telemetry_host.unwrap_or_else(|| self.host.clone()),
            host: self.host,
            port: self.port,
            telemetry_port: self.telemetry_port,
        };
        Ok((server, listen))
    }
}

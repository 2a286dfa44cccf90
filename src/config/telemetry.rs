//! LMCache's side of a request: how long to wait for its "stored" events,
//! what to do when they never come, and where other replicas send the
//! events of this one's requests. The section the KV wait and the ids
//! read.

use std::net::SocketAddr;
use std::time::Duration;

use clap::ValueEnum;

use super::seconds;

/// What to do when the prefiller's KV never reports as stored in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum KvTimeoutPolicy {
    /// Decode anyway: the decoder recomputes the prefix it cannot find, so
    /// the client gets its answer, only slower.
    Decode,
    /// Answer 504: for deployments where a silent recompute would hide a
    /// broken KV path.
    Fail,
}

#[derive(Debug, Clone, clap::Args)]
pub struct TelemetryArgs {
    /// Longest wait, after the prefill response, for every rank's
    /// "store finished" event.
    #[arg(
        long,
        env = "PD_PROXY_KV_READY_TIMEOUT",
        default_value_t = 30.0,
        value_name = "SECONDS"
    )]
    pub kv_ready_timeout: f64,
    /// After a KV-ready timeout: decode anyway, or answer 504.
    #[arg(long, env = "PD_PROXY_ON_KV_TIMEOUT", value_enum, default_value_t = KvTimeoutPolicy::Decode)]
    pub on_kv_timeout: KvTimeoutPolicy,
    /// Where this replica's telemetry listener is reachable from the
    /// prefillers, written into its ids [default: the telemetry bind
    /// address when concrete, else $POD_IP and the telemetry port].
    #[arg(long, env = "PD_PROXY_ADVERTISE_TELEMETRY", value_name = "IP:PORT")]
    pub advertise_telemetry: Option<String>,
}

/// The KV wait and the address owner-routed ids name, validated.
#[derive(Debug, Clone)]
pub struct TelemetryConfig {
    pub kv_ready_timeout: Duration,
    pub on_kv_timeout: KvTimeoutPolicy,
    /// `--advertise-telemetry`: where other replicas reach this one's
    /// telemetry listener; `None`, decided from the bound address.
    pub advertise_telemetry: Option<SocketAddr>,
}

impl TelemetryArgs {
    pub(super) fn resolve(self) -> Result<TelemetryConfig, String> {
        let kv_ready_timeout = seconds("--kv-ready-timeout", self.kv_ready_timeout)?;
        let advertise_telemetry = self
            .advertise_telemetry
            .map(|a| {
                a.trim()
                    .parse::<SocketAddr>()
                    .ok()
                    .filter(|a| a.port() != 0 && !a.ip().is_unspecified())
                    .ok_or_else(|| {
                        format!("--advertise-telemetry {a:?} is not an IP address and port that others can reach")
                    })
            })
            .transpose()?;
        Ok(TelemetryConfig {
            kv_ready_timeout,
            on_kv_timeout: self.on_kv_timeout,
            advertise_telemetry,
        })
    }
}

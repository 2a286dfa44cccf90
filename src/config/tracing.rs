//! Logs and spans: how log lines are written and where traces go. The
//! section the binary's logger and `App`'s span exporter read.

use std::time::Duration;

use clap::ValueEnum;

use super::seconds;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// One line of text per event, for people.
    Text,
    /// One JSON object per event (`timestamp`, `level`, `target`, the
    /// event's fields, and the request span's `id` and `api` under
    /// `span`), for log shippers.
    Json,
}

#[derive(Debug, Clone, clap::Args)]
pub struct TracingArgs {
    /// Log lines as text or as JSON objects.
    #[arg(long, env = "PD_PROXY_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Send traces to this OpenTelemetry collector by OTLP over
    /// HTTP/protobuf: its base URL (`http://collector:4318`; `/v1/traces`
    /// is added) or a URL ending in `/v1/traces`. One span per request,
    /// a child per phase; off without it.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT", value_name = "URL")]
    pub otlp_endpoint: Option<String>,
    /// Longest wait for the collector to take one batch of spans; past it
    /// the batch is dropped (and counted).
    #[arg(
        long,
        env = "PD_PROXY_OTLP_TIMEOUT",
        default_value_t = 5.0,
        value_name = "SECONDS"
    )]
    pub otlp_timeout: f64,
}

/// Logs and traces, validated.
#[derive(Debug, Clone)]
pub struct TracingConfig {
    pub log_format: LogFormat,
    /// `--otlp-endpoint` as the full OTLP traces URL; `None`: no traces.
    pub otlp_endpoint: Option<http::Uri>,
    pub otlp_timeout: Duration,
}

impl TracingArgs {
    pub(super) fn resolve(self) -> Result<TracingConfig, String> {
        Ok(TracingConfig {
            log_format: self.log_format,
            otlp_endpoint: self
                .otlp_endpoint
                .as_deref()
                .filter(|url| !url.trim().is_empty())
                .map(crate::trace::traces_url)
                .transpose()?,
            otlp_timeout: seconds("--otlp-timeout", self.otlp_timeout)?,
        })
    }
}

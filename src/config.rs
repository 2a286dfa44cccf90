//! Command line and environment. The flags of LMCache's
//! `disagg_proxy_server.py` keep their names, defaults and host/port pairing
//! rules so pd-proxy drops into existing launch scripts; every flag can also
//! come from `PD_PROXY_<FLAG>` for container deployments.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use clap::{Parser, ValueEnum};
use http::HeaderValue;
use ipnet::IpNet;

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

/// How a role's endpoint is chosen for each request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Balance {
    /// The less loaded of two endpoints drawn at random (power of two
    /// choices), by the proxy's own count of requests in flight: a slow or
    /// stuck server gets fewer requests, and no global scan or lock is
    /// needed per pick.
    LeastLoaded,
    /// Each endpoint in turn, whatever its load.
    RoundRobin,
}

#[derive(Debug, Clone, Parser)]
#[command(
    name = "pd-proxy",
    version,
    about = "Disaggregated prefill/decode proxy for vLLM + LMCache",
    long_about = None
)]
pub struct Args {
    /// Address to serve the OpenAI API on.
    #[arg(long, env = "PD_PROXY_HOST", default_value = "localhost")]
    pub host: String,
    #[arg(long, env = "PD_PROXY_PORT", default_value_t = 8000)]
    pub port: u16,
    /// Prefiller host(s), comma separated. A DNS name stands for every
    /// address it resolves to (a Kubernetes headless Service: one per pod)
    /// and is resolved again every --discovery-interval.
    #[arg(
        long,
        env = "PD_PROXY_PREFILLER_HOST",
        value_delimiter = ',',
        default_value = "localhost"
    )]
    pub prefiller_host: Vec<String>,
    /// Prefiller port(s), comma separated.
    #[arg(
        long,
        env = "PD_PROXY_PREFILLER_PORT",
        value_delimiter = ',',
        default_value = "8100"
    )]
    pub prefiller_port: Vec<u16>,
    /// With one host and one port: that many prefillers on consecutive ports.
    #[arg(long, env = "PD_PROXY_NUM_PREFILLERS", default_value_t = 1)]
    pub num_prefillers: usize,
    /// Decoder host(s), comma separated; names as for --prefiller-host.
    #[arg(
        long,
        env = "PD_PROXY_DECODER_HOST",
        value_delimiter = ',',
        default_value = "localhost"
    )]
    pub decoder_host: Vec<String>,
    /// Decoder port(s), comma separated.
    #[arg(
        long,
        env = "PD_PROXY_DECODER_PORT",
        value_delimiter = ',',
        default_value = "8200"
    )]
    pub decoder_port: Vec<u16>,
    /// With one host and one port: that many decoders on consecutive ports.
    #[arg(long, env = "PD_PROXY_NUM_DECODERS", default_value_t = 1)]
    pub num_decoders: usize,
    /// Port of the LMCache telemetry endpoint (POST /api/v1/telemetry).
    #[arg(long, env = "PD_PROXY_TELEMETRY_PORT", default_value_t = 5768)]
    pub telemetry_port: u16,
    /// Address of the telemetry endpoint [default: --host].
    #[arg(long, env = "PD_PROXY_TELEMETRY_HOST")]
    pub telemetry_host: Option<String>,
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
    /// Longest wait for an upstream's response headers (the whole prefill
    /// response; the decoder's first byte). Streams themselves are unbounded.
    #[arg(
        long,
        env = "PD_PROXY_UPSTREAM_TIMEOUT",
        default_value_t = 300.0,
        value_name = "SECONDS"
    )]
    pub upstream_timeout: f64,
    /// Bearer token sent to prefillers and decoders [default: $OPENAI_API_KEY;
    /// without either, the client's own Authorization header is forwarded].
    #[arg(long, env = "PD_PROXY_UPSTREAM_API_KEY", hide_env_values = true)]
    pub upstream_api_key: Option<String>,
    /// How often DNS names among the upstream hosts are resolved again.
    #[arg(
        long,
        env = "PD_PROXY_DISCOVERY_INTERVAL",
        default_value_t = 5.0,
        value_name = "SECONDS"
    )]
    pub discovery_interval: f64,
    /// How often every upstream's `GET /health` is checked: 3 failures in a
    /// row take it out of rotation, 2 passes bring it back.
    #[arg(
        long,
        env = "PD_PROXY_HEALTH_INTERVAL",
        default_value_t = 2.0,
        value_name = "SECONDS"
    )]
    pub health_interval: f64,
    /// Longest wait for one health check's answer; no answer is a failure.
    #[arg(
        long,
        env = "PD_PROXY_HEALTH_TIMEOUT",
        default_value_t = 1.0,
        value_name = "SECONDS"
    )]
    pub health_timeout: f64,
    /// How a prefiller and a decoder are chosen for each request.
    #[arg(long, env = "PD_PROXY_BALANCE", value_enum, default_value_t = Balance::LeastLoaded)]
    pub balance: Balance,
    /// Further prefillers tried when one refused or reset the connection
    /// before answering, or answered 503.
    #[arg(long, env = "PD_PROXY_PREFILL_RETRIES", default_value_t = 2)]
    pub prefill_retries: u32,
    /// Prompts estimated shorter than this many tokens go straight to a
    /// decoder, without the prefill leg: LMCache stores whole 256-token
    /// chunks, so a shorter prompt has nothing to reuse. 0: always
    /// disaggregate.
    #[arg(
        long,
        env = "PD_PROXY_DIRECT_BELOW_TOKENS",
        default_value_t = 0,
        value_name = "TOKENS"
    )]
    pub direct_below_tokens: u32,
    /// Prefillers a request may name in `x-prefiller-host-port` (llm-d's
    /// gateway header) besides those of `--prefiller-host`: IP networks,
    /// comma separated (`10.0.0.0/8,fd00::/8`; a bare address is itself).
    #[arg(
        long,
        env = "PD_PROXY_ALLOWED_PREFILLERS",
        value_delimiter = ',',
        value_name = "CIDR"
    )]
    pub allowed_prefillers: Vec<String>,
    /// Secret shared by every replica of a fleet behind one telemetry URL:
    /// ids then name their owner and carry a MAC, and events for another
    /// replica's ids are forwarded to it. Better given as
    /// PD_PROXY_CLUSTER_KEY or --cluster-key-file than here, where `ps`
    /// shows it. At least 16 bytes.
    #[arg(
        long,
        env = "PD_PROXY_CLUSTER_KEY",
        hide_env_values = true,
        value_name = "KEY"
    )]
    pub cluster_key: Option<String>,
    /// File holding the cluster key (a Kubernetes Secret mounted as a
    /// file); surrounding whitespace is ignored.
    #[arg(long, env = "PD_PROXY_CLUSTER_KEY_FILE", value_name = "PATH")]
    pub cluster_key_file: Option<std::path::PathBuf>,
    /// Where this replica's telemetry listener is reachable from the
    /// prefillers, written into its ids [default: the telemetry bind
    /// address when concrete, else $POD_IP and the telemetry port].
    #[arg(long, env = "PD_PROXY_ADVERTISE_TELEMETRY", value_name = "IP:PORT")]
    pub advertise_telemetry: Option<String>,
    /// Keys clients must send as `Authorization: Bearer KEY` on every API
    /// route, comma separated. Better given as PD_PROXY_API_KEY or
    /// --api-key-file than here, where `ps` shows them. Without any, the
    /// API is open.
    #[arg(
        long,
        env = "PD_PROXY_API_KEY",
        hide_env_values = true,
        value_delimiter = ',',
        value_name = "KEY"
    )]
    pub api_key: Vec<String>,
    /// File of client keys, one per line (a Kubernetes Secret mounted as a
    /// file); blank lines and lines starting with `#` are skipped.
    #[arg(long, env = "PD_PROXY_API_KEY_FILE", value_name = "PATH")]
    pub api_key_file: Option<std::path::PathBuf>,
    /// Serve `/metrics` on this port as well, without a key, for a
    /// scraper that holds none; on the API port it then still needs one.
    #[arg(long, env = "PD_PROXY_METRICS_PORT")]
    pub metrics_port: Option<u16>,
    /// The token LMCache must send as `?token=` on the telemetry URL
    /// (`LMCACHE_REQUEST_TELEMETRY_ENDPOINT=http://proxy:5768/api/v1/telemetry?token=...`);
    /// other posts are refused with 403. Better given as
    /// PD_PROXY_TELEMETRY_TOKEN or --telemetry-token-file.
    #[arg(
        long,
        env = "PD_PROXY_TELEMETRY_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    pub telemetry_token: Option<String>,
    /// File holding the telemetry token; surrounding whitespace is ignored.
    #[arg(long, env = "PD_PROXY_TELEMETRY_TOKEN_FILE", value_name = "PATH")]
    pub telemetry_token_file: Option<std::path::PathBuf>,
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
    /// After SIGTERM: how long in-flight requests may take to finish
    /// before they are cut. A second signal ends at once.
    #[arg(
        long,
        env = "PD_PROXY_DRAIN_TIMEOUT",
        default_value_t = 30.0,
        value_name = "SECONDS"
    )]
    pub drain_timeout: f64,
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

/// One `--*-host` entry with its port, as configured: an IP address is one
/// endpoint, a name as many as it resolves to, then and at every
/// re-resolution.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The host as given, without IPv6 brackets.
    pub host: String,
    pub port: u16,
}

impl Target {
    fn new(host: &str, port: u16) -> Result<Self, String> {
        let host = host.trim();
        let bare = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        if bare.is_empty() {
            return Err("empty upstream host".into());
        }
        if port == 0 {
            return Err(format!("upstream {host} has port 0"));
        }
        // A host goes into URIs and DNS queries: only what a name or an
        // address can hold.
        let valid = bare.parse::<IpAddr>().is_ok()
            || (bare.len() <= 253
                && bare
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_'));
        if !valid {
            return Err(format!(
                "upstream host {host:?} is neither an IP address nor a DNS name"
            ));
        }
        Ok(Target {
            host: bare.to_owned(),
            port,
        })
    }

    /// The address, when the host is an IP literal rather than a name.
    pub fn ip(&self) -> Option<IpAddr> {
        self.host.parse().ok()
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// The validated configuration `serve` runs with.
#[derive(Debug, Clone)]
pub struct Config {
    pub prefillers: Vec<Target>,
    pub decoders: Vec<Target>,
    pub kv_ready_timeout: Duration,
    pub on_kv_timeout: KvTimeoutPolicy,
    pub upstream_timeout: Duration,
    /// Ready-made `Authorization` value, so the hot path only clones it.
    pub upstream_auth: Option<HeaderValue>,
    pub discovery_interval: Duration,
    pub health_interval: Duration,
    pub health_timeout: Duration,
    pub balance: Balance,
    pub prefill_retries: u32,
    pub direct_below_tokens: u32,
    pub allowed_prefillers: Vec<IpNet>,
    /// `--cluster-key` (or its file): owner-routed ids.
    pub cluster_key: Option<Vec<u8>>,
    pub advertise_telemetry: Option<SocketAddr>,
    /// Client keys (`--api-key`, its env and file); empty: the API is open.
    pub api_keys: Vec<String>,
    pub metrics_port: Option<u16>,
    /// `--telemetry-token`: the `?token=` every telemetry post must carry.
    pub telemetry_token: Option<String>,
    pub max_body_bytes: usize,
    pub body_timeout: Duration,
    pub stream_idle_timeout: Duration,
    pub send_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_pending: usize,
    pub max_connections: usize,
    pub drain_timeout: Duration,
    pub log_format: LogFormat,
    /// `--otlp-endpoint` as the full OTLP traces URL; `None`: no traces.
    pub otlp_endpoint: Option<http::Uri>,
    pub otlp_timeout: Duration,
}

/// Where to listen; kept apart from [`Config`] because tests bind their own
/// listeners on port 0.
#[derive(Debug, Clone)]
pub struct ListenAddrs {
    pub host: String,
    pub port: u16,
    pub telemetry_host: String,
    pub telemetry_port: u16,
}

impl Args {
    /// Validates the flags. `openai_api_key` is `$OPENAI_API_KEY`, passed in
    /// so tests do not depend on the environment.
    pub fn resolve(self, openai_api_key: Option<String>) -> Result<(Config, ListenAddrs), String> {
        let prefillers = endpoints(
            "prefiller",
            &self.prefiller_host,
            &self.prefiller_port,
            self.num_prefillers,
        )?;
        let decoders = endpoints(
            "decoder",
            &self.decoder_host,
            &self.decoder_port,
            self.num_decoders,
        )?;
        let kv_ready_timeout = seconds("--kv-ready-timeout", self.kv_ready_timeout)?;
        let upstream_timeout = seconds("--upstream-timeout", self.upstream_timeout)?;
        let key = self
            .upstream_api_key
            .or(openai_api_key)
            .map(|k| k.trim().to_owned())
            .filter(|k| !k.is_empty());
        let upstream_auth = key
            .map(|k| {
                let mut v = HeaderValue::try_from(format!("Bearer {k}"))
                    .map_err(|_| "--upstream-api-key holds characters not allowed in a header")?;
                v.set_sensitive(true);
                Ok::<_, String>(v)
            })
            .transpose()?;
        let telemetry_host = self.telemetry_host.unwrap_or_else(|| self.host.clone());
        if self.port != 0 && self.port == self.telemetry_port {
            return Err(format!(
                "--telemetry-port {} is also the API port (--port): give the telemetry endpoint a port of its own",
                self.port
            ));
        }
        if self.prefill_retries > MAX_PREFILL_RETRIES {
            return Err(format!(
                "--prefill-retries {} is more than {MAX_PREFILL_RETRIES}",
                self.prefill_retries
            ));
        }
        let discovery_interval = interval("--discovery-interval", self.discovery_interval)?;
        let health_interval = interval("--health-interval", self.health_interval)?;
        let health_timeout = interval("--health-timeout", self.health_timeout)?;
        let allowed_prefillers = self
            .allowed_prefillers
            .iter()
            .map(|s| s.trim())
            .filter(|s| !s.is_empty())
            .map(|s| {
                s.parse::<IpNet>()
                    .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
                    .map(|net| net.trunc())
                    .map_err(|_| {
                        format!(
                            "--allowed-prefillers: {s:?} is not an IP network (CIDR) or address"
                        )
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let cluster_key = secret("--cluster-key", self.cluster_key, self.cluster_key_file)?
            .map(String::into_bytes);
        if let Some(key) = &cluster_key {
            if key.len() < crate::owner::MIN_KEY_BYTES {
                return Err(format!(
                    "the cluster key has {} bytes; at least {}",
                    key.len(),
                    crate::owner::MIN_KEY_BYTES
                ));
            }
        }
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
        let mut api_keys: Vec<String> = self
            .api_key
            .iter()
            .map(|k| k.trim().to_owned())
            .filter(|k| !k.is_empty())
            .collect();
        if let Some(path) = &self.api_key_file {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("--api-key-file {}: {e}", path.display()))?;
            api_keys.extend(
                text.lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty() && !l.starts_with('#'))
                    .map(str::to_owned),
            );
            if api_keys.is_empty() {
                return Err(format!("--api-key-file {} holds no key", path.display()));
            }
        }
        if let Some(bad) = api_keys
            .iter()
            .find(|k| k.len() > MAX_SECRET_BYTES || !k.bytes().all(|b| b.is_ascii_graphic()))
        {
            return Err(format!(
                "an API key of {} bytes is not printable ASCII of at most {MAX_SECRET_BYTES} bytes",
                bad.len()
            ));
        }
        let telemetry_token = secret(
            "--telemetry-token",
            self.telemetry_token,
            self.telemetry_token_file,
        )?;
        if let Some(token) = &telemetry_token {
            // It travels in a URL's query: only characters that need no
            // escaping there, so LMCache's URL and ours agree byte for byte.
            let url_safe = token
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~'));
            if token.len() < MIN_TOKEN_BYTES || token.len() > MAX_SECRET_BYTES || !url_safe {
                return Err(format!(
                    "the telemetry token must be {MIN_TOKEN_BYTES} to {MAX_SECRET_BYTES} characters of A-Z a-z 0-9 - _ . ~ (it goes in a URL), got {} bytes",
                    token.len()
                ));
            }
        }
        if self.max_body_bytes < MIN_BODY_BYTES {
            return Err(format!(
                "--max-body-bytes {} is below {MIN_BODY_BYTES}",
                self.max_body_bytes
            ));
        }
        if self.max_pending == 0 || self.max_connections == 0 {
            return Err("--max-pending and --max-connections must be at least 1".into());
        }
        if let Some(port) = self.metrics_port {
            if port != 0 && (port == self.port || port == self.telemetry_port) {
                return Err(format!(
                    "--metrics-port {port} is also the API or telemetry port"
                ));
            }
        }
        Ok((
            Config {
                prefillers,
                decoders,
                kv_ready_timeout,
                on_kv_timeout: self.on_kv_timeout,
                upstream_timeout,
                upstream_auth,
                discovery_interval,
                health_interval,
                health_timeout,
                balance: self.balance,
                prefill_retries: self.prefill_retries,
                direct_below_tokens: self.direct_below_tokens,
                allowed_prefillers,
                cluster_key,
                advertise_telemetry,
                api_keys,
                metrics_port: self.metrics_port,
                telemetry_token,
                max_body_bytes: self.max_body_bytes,
                body_timeout: seconds("--body-timeout", self.body_timeout)?,
                stream_idle_timeout: seconds("--stream-idle-timeout", self.stream_idle_timeout)?,
                send_timeout: seconds("--send-timeout", self.send_timeout)?,
                idle_timeout: seconds("--idle-timeout", self.idle_timeout)?,
                max_pending: self.max_pending,
                max_connections: self.max_connections,
                drain_timeout: seconds("--drain-timeout", self.drain_timeout)?,
                log_format: self.log_format,
                otlp_endpoint: self
                    .otlp_endpoint
                    .as_deref()
                    .filter(|url| !url.trim().is_empty())
                    .map(crate::trace::traces_url)
                    .transpose()?,
                otlp_timeout: seconds("--otlp-timeout", self.otlp_timeout)?,
            },
            ListenAddrs {
                host: self.host,
                port: self.port,
                telemetry_host,
                telemetry_port: self.telemetry_port,
            },
        ))
    }
}

/// A secret given by `flag` or by `{flag}-file` (a mounted Secret), never
/// both; surrounding whitespace is ignored.
fn secret(
    flag: &str,
    value: Option<String>,
    file: Option<std::path::PathBuf>,
) -> Result<Option<String>, String> {
    match (value, file) {
        (Some(_), Some(_)) => Err(format!("give {flag} or {flag}-file, not both")),
        (Some(value), None) => Ok(Some(value.trim().to_owned())),
        (None, Some(path)) => std::fs::read_to_string(&path)
            .map(|text| Some(text.trim().to_owned()))
            .map_err(|e| format!("{flag}-file {}: {e}", path.display())),
        (None, None) => Ok(None),
    }
}

/// Secrets longer than this are a mistake (a whole file pasted in).
const MAX_SECRET_BYTES: usize = 512;

/// A telemetry token shorter than this could be guessed.
const MIN_TOKEN_BYTES: usize = 16;

/// A body limit below this would refuse ordinary chat requests.
const MIN_BODY_BYTES: usize = 4096;

/// Each retry is another prefiller's work for one request; a handful is
/// plenty, and a bound keeps a typo from multiplying the load.
const MAX_PREFILL_RETRIES: u32 = 16;

/// The shortest discovery or health interval: below it the proxy would
/// spend itself on checks (a typo like 1e-6 is not a schedule).
const MIN_INTERVAL: Duration = Duration::from_millis(10);

fn interval(flag: &str, value: f64) -> Result<Duration, String> {
    let d = seconds(flag, value)?;
    if d < MIN_INTERVAL {
        return Err(format!(
            "{flag} must be at least {} s, got {value}",
            MIN_INTERVAL.as_secs_f64()
        ));
    }
    Ok(d)
}

fn seconds(flag: &str, value: f64) -> Result<Duration, String> {
    if !(value.is_finite() && value > 0.0 && value < 1e9) {
        return Err(format!(
            "{flag} must be a positive number of seconds, got {value}"
        ));
    }
    Ok(Duration::from_secs_f64(value))
}

/// The Python proxy's `pair_hosts_and_ports`: one host + one port with
/// `count` > 1 means consecutive ports; one host + n ports or n hosts + one
/// port fan out; otherwise the lists pair up and must be equally long.
fn endpoints(
    role: &str,
    hosts: &[String],
    ports: &[u16],
    count: usize,
) -> Result<Vec<Target>, String> {
    let hosts: Vec<&str> = hosts.iter().map(|h| h.trim()).collect();
    if hosts.is_empty() || ports.is_empty() {
        return Err(format!("--{role}-host and --{role}-port must not be empty"));
    }
    let pairs: Vec<(&str, u16)> = match (hosts.len(), ports.len()) {
        (1, 1) => {
            let first = ports[0];
            (0..count.max(1))
                .map(|i| {
                    u16::try_from(i)
                        .ok()
                        .and_then(|i| first.checked_add(i))
                        .map(|p| (hosts[0], p))
                        .ok_or_else(|| format!("--num-{role}s {count} from port {first} runs past 65535"))
                })
                .collect::<Result<_, _>>()?
        }
        (1, _) => ports.iter().map(|&p| (hosts[0], p)).collect(),
        (_, 1) => hosts.iter().map(|&h| (h, ports[0])).collect(),
        (h, p) if h == p => hosts.iter().copied().zip(ports.iter().copied()).collect(),
        (h, p) => {
            return Err(format!(
                "--{role}-host has {h} entries and --{role}-port {p}: give one of each, one host and many ports, many hosts and one port, or lists of equal length"
            ))
        }
    };
    let mut targets: Vec<Target> = Vec::with_capacity(pairs.len());
    for (h, p) in pairs {
        let target = Target::new(h, p).map_err(|e| format!("{role}: {e}"))?;
        if !targets.contains(&target) {
            targets.push(target);
        }
    }
    Ok(targets)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<(Config, ListenAddrs), String> {
        let mut all = vec!["pd-proxy"];
        all.extend_from_slice(args);
        Args::try_parse_from(all)
            .map_err(|e| e.to_string())?
            .resolve(None)
    }

    fn authorities(targets: &[Target]) -> Vec<String> {
        targets.iter().map(Target::to_string).collect()
    }

    #[test]
    fn defaults_match_the_python_proxy() {
        let (c, l) = parse(&[]).unwrap();
        assert_eq!(authorities(&c.prefillers), ["localhost:8100"]);
        assert_eq!(authorities(&c.decoders), ["localhost:8200"]);
        assert_eq!(
            (l.host.as_str(), l.port, l.telemetry_port),
            ("localhost", 8000, 5768)
        );
        assert_eq!(l.telemetry_host, "localhost");
        assert_eq!(c.kv_ready_timeout, Duration::from_secs(30));
        assert_eq!(c.on_kv_timeout, KvTimeoutPolicy::Decode);
        assert!(c.upstream_auth.is_none());
        assert_eq!(c.discovery_interval, Duration::from_secs(5));
        assert_eq!(c.health_interval, Duration::from_secs(2));
        assert_eq!(c.balance, Balance::LeastLoaded);
        assert_eq!(c.prefill_retries, 2);
        assert_eq!(c.direct_below_tokens, 0);
    }

    #[test]
    fn pairing_rules() {
        let (c, _) = parse(&["--prefiller-port", "8100", "--num-prefillers", "3"]).unwrap();
        assert_eq!(
            authorities(&c.prefillers),
            ["localhost:8100", "localhost:8101", "localhost:8102"]
        );
        let (c, _) = parse(&["--decoder-host", "a,b", "--decoder-port", "9000"]).unwrap();
        assert_eq!(authorities(&c.decoders), ["a:9000", "b:9000"]);
        let (c, _) = parse(&["--decoder-host", "a", "--decoder-port", "1,2"]).unwrap();
        assert_eq!(authorities(&c.decoders), ["a:1", "a:2"]);
        let (c, _) = parse(&["--decoder-host", "a,b", "--decoder-port", "1,2"]).unwrap();
        assert_eq!(authorities(&c.decoders), ["a:1", "b:2"]);
        let (c, _) = parse(&["--decoder-host", "::1"]).unwrap();
        assert_eq!(authorities(&c.decoders), ["[::1]:8200"]);
        let (c, _) =
            parse(&["--decoder-host", "[::1],pods.svc", "--decoder-port", "9000"]).unwrap();
        assert_eq!(authorities(&c.decoders), ["[::1]:9000", "pods.svc:9000"]);
        assert_eq!(c.decoders[0].ip(), Some("::1".parse().unwrap()));
        assert_eq!(c.decoders[1].ip(), None);
        let (c, _) = parse(&["--decoder-host", "a,a", "--decoder-port", "1"]).unwrap();
        assert_eq!(authorities(&c.decoders), ["a:1"], "duplicates collapse");
    }

    #[test]
    fn bad_config_is_refused_with_a_reason() {
        let err = parse(&["--decoder-host", "a,b,c", "--decoder-port", "1,2"]).unwrap_err();
        assert!(err.contains("3 entries"), "{err}");
        let err = parse(&["--prefiller-port", "65535", "--num-prefillers", "2"]).unwrap_err();
        assert!(err.contains("past 65535"), "{err}");
        let err = parse(&["--kv-ready-timeout", "0"]).unwrap_err();
        assert!(err.contains("--kv-ready-timeout"), "{err}");
        let err = parse(&["--on-kv-timeout", "maybe"]).unwrap_err();
        assert!(err.contains("maybe"), "{err}");
        let err = parse(&["--prefiller-port", "0"]).unwrap_err();
        assert!(err.contains("port 0"), "{err}");
        let err = parse(&["--port", "9000", "--telemetry-port", "9000"]).unwrap_err();
        assert!(err.contains("--telemetry-port 9000"), "{err}");
        let err = parse(&["--decoder-host", "a/b"]).unwrap_err();
        assert!(err.contains("neither an IP"), "{err}");
        let err = parse(&["--health-interval", "0"]).unwrap_err();
        assert!(err.contains("--health-interval"), "{err}");
        let err = parse(&["--discovery-interval", "1e-10"]).unwrap_err();
        assert!(err.contains("at least"), "{err}");
        let err = parse(&["--balance", "random"]).unwrap_err();
        assert!(err.contains("random"), "{err}");
        let err = parse(&["--allowed-prefillers", "10.0.0.0/8,banana"]).unwrap_err();
        assert!(err.contains("banana"), "{err}");
        let err = parse(&["--cluster-key", "short"]).unwrap_err();
        assert!(err.contains("at least 16"), "{err}");
        let err = parse(&["--advertise-telemetry", "0.0.0.0:5768"]).unwrap_err();
        assert!(err.contains("--advertise-telemetry"), "{err}");
        let err = parse(&["--cluster-key-file", "/nonexistent/key"]).unwrap_err();
        assert!(err.contains("/nonexistent/key"), "{err}");
        let (c, _) = parse(&["--allowed-prefillers", "10.1.2.3/8, fd00::1"]).unwrap();
        assert_eq!(
            c.allowed_prefillers,
            [
                "10.0.0.0/8".parse::<IpNet>().unwrap(),
                "fd00::1/128".parse().unwrap()
            ]
        );
    }

    #[test]
    fn api_key_flag_wins_over_openai_env() {
        let args = Args::try_parse_from(["pd-proxy", "--upstream-api-key", "k1"]).unwrap();
        let (c, _) = args.resolve(Some("k2".into())).unwrap();
        assert_eq!(c.upstream_auth.unwrap(), "Bearer k1");
        let args = Args::try_parse_from(["pd-proxy"]).unwrap();
        let (c, _) = args.resolve(Some(" k2 ".into())).unwrap();
        assert_eq!(c.upstream_auth.unwrap(), "Bearer k2");
    }
}

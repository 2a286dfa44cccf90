//! The upstreams and how the fleet of them is kept: which prefillers and
//! decoders, how they are found, checked, chosen and retried. The section
//! `Fleet::new` and the request path's legs read.

use std::net::IpAddr;
use std::time::Duration;

use clap::ValueEnum;
use http::HeaderValue;
use ipnet::IpNet;

use super::seconds;

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

#[derive(Debug, Clone, clap::Args)]
pub struct FleetArgs {
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
}

/// The upstreams, validated.
#[derive(Debug, Clone)]
pub struct FleetConfig {
    pub prefillers: Vec<Target>,
    pub decoders: Vec<Target>,
    /// Longest wait for an upstream's response headers.
    pub upstream_timeout: Duration,
    /// Ready-made `Authorization` value, so the hot path only clones it.
    pub upstream_auth: Option<HeaderValue>,
    pub discovery_interval: Duration,
    pub health_interval: Duration,
    pub health_timeout: Duration,
    pub balance: Balance,
    pub prefill_retries: u32,
    /// Prompts estimated shorter go straight to a decoder; 0: never.
    pub direct_below_tokens: u32,
    /// `--allowed-prefillers`: what `x-prefiller-host-port` may name
    /// besides the configured prefillers.
    pub allowed_prefillers: Vec<IpNet>,
}

impl FleetArgs {
    /// `openai_api_key` is `$OPENAI_API_KEY`, the upstream key's fallback.
    pub(super) fn resolve(self, openai_api_key: Option<String>) -> Result<FleetConfig, String> {
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
        let upstream_timeout = seconds("--upstream-timeout", self.upstream_timeout)?;
        let upstream_auth = upstream_auth(self.upstream_api_key.or(openai_api_key))?;
        if self.prefill_retries > MAX_PREFILL_RETRIES {
            return Err(format!(
                "--prefill-retries {} is more than {MAX_PREFILL_RETRIES}",
                self.prefill_retries
            ));
        }
        Ok(FleetConfig {
            prefillers,
            decoders,
            upstream_timeout,
            upstream_auth,
            discovery_interval: interval("--discovery-interval", self.discovery_interval)?,
            health_interval: interval("--health-interval", self.health_interval)?,
            health_timeout: interval("--health-timeout", self.health_timeout)?,
            balance: self.balance,
            prefill_retries: self.prefill_retries,
            direct_below_tokens: self.direct_below_tokens,
            allowed_prefillers: allowed_prefillers(&self.allowed_prefillers)?,
        })
    }
}

/// The `Authorization` value sent upstream for `key`; a blank key is none.
fn upstream_auth(key: Option<String>) -> Result<Option<HeaderValue>, String> {
    key.map(|k| k.trim().to_owned())
        .filter(|k| !k.is_empty())
        .map(|k| {
            let mut v = HeaderValue::try_from(format!("Bearer {k}"))
                .map_err(|_| "--upstream-api-key holds characters not allowed in a header")?;
            v.set_sensitive(true);
            Ok::<_, String>(v)
        })
        .transpose()
}

/// `--allowed-prefillers` as networks; a bare address is a network of one.
fn allowed_prefillers(given: &[String]) -> Result<Vec<IpNet>, String> {
    given
        .iter()
        .map(|s| s.trim())
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<IpNet>()
                .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
                .map(|net| net.trunc())
                .map_err(|_| {
                    format!("--allowed-prefillers: {s:?} is not an IP network (CIDR) or address")
                })
        })
        .collect()
}

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

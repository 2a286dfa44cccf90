//! Command line and environment. The flags of LMCache's
//! `disagg_proxy_server.py` keep their names, defaults and host/port pairing
//! rules so pd-proxy drops into existing launch scripts; every flag can also
//! come from `PD_PROXY_<FLAG>` for container deployments.

use std::time::Duration;

use clap::{Parser, ValueEnum};
use http::{HeaderValue, Uri};

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
    /// Prefiller host(s), comma separated.
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
    /// Decoder host(s), comma separated.
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
}

/// One vLLM server, with the URIs the hot path needs built once.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// `host:port`, for logs.
    pub authority: String,
    pub chat_uri: Uri,
    pub completions_uri: Uri,
    pub models_uri: Uri,
}

impl Endpoint {
    fn new(host: &str, port: u16) -> Result<Self, String> {
        if host.is_empty() {
            return Err("empty upstream host".into());
        }
        if port == 0 {
            return Err(format!("upstream {host} has port 0"));
        }
        let authority = if host.contains(':') && !host.starts_with('[') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        let uri = |path: &str| {
            format!("http://{authority}{path}")
                .parse::<Uri>()
                .map_err(|e| format!("invalid upstream address {authority}: {e}"))
        };
        Ok(Endpoint {
            chat_uri: uri("/v1/chat/completions")?,
            completions_uri: uri("/v1/completions")?,
            models_uri: uri("/v1/models")?,
            authority,
        })
    }
}

/// The validated configuration `serve` runs with.
#[derive(Debug, Clone)]
pub struct Config {
    pub prefillers: Vec<Endpoint>,
    pub decoders: Vec<Endpoint>,
    pub kv_ready_timeout: Duration,
    pub on_kv_timeout: KvTimeoutPolicy,
    pub upstream_timeout: Duration,
    /// Ready-made `Authorization` value, so the hot path only clones it.
    pub upstream_auth: Option<HeaderValue>,
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
        Ok((
            Config {
                prefillers,
                decoders,
                kv_ready_timeout,
                on_kv_timeout: self.on_kv_timeout,
                upstream_timeout,
                upstream_auth,
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
) -> Result<Vec<Endpoint>, String> {
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
    pairs
        .into_iter()
        .map(|(h, p)| Endpoint::new(h, p).map_err(|e| format!("{role}: {e}")))
        .collect()
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

    fn authorities(eps: &[Endpoint]) -> Vec<&str> {
        eps.iter().map(|e| e.authority.as_str()).collect()
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

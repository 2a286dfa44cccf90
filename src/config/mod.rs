//! Command line and environment. The flags of LMCache's
//! `disagg_proxy_server.py` keep their names, defaults and host/port pairing
//! rules so pd-proxy drops into existing launch scripts; every flag can also
//! come from `PD_PROXY_<FLAG>` for container deployments.
//!
//! The flags come in sections, one file each, and each resolves into its
//! own part of [`Config`], handed to the component that owns it: `server`
//! (listeners, drain), `fleet` (upstreams: discovery, health, balance,
//! retries), `telemetry` (the KV wait, advertised address), `security`
//! (client keys, telemetry token, cluster key), `limits` (bodies, waits,
//! connections, parked requests) and `tracing` (logs, spans).

mod fleet;
mod limits;
mod security;
mod server;
mod telemetry;
mod tracing;

use std::time::Duration;

use clap::Parser;

pub use fleet::{Balance, FleetArgs, FleetConfig, Target};
pub use limits::{LimitsArgs, LimitsConfig};
pub use security::{SecurityArgs, SecurityConfig};
pub use server::{ListenAddrs, ServerArgs, ServerConfig};
pub use telemetry::{KvTimeoutPolicy, TelemetryArgs, TelemetryConfig};
pub use tracing::{LogFormat, TracingArgs, TracingConfig};

#[derive(Debug, Clone, Parser)]
#[command(
    name = "pd-proxy",
    version,
    about = "Disaggregated prefill/decode proxy for vLLM + LMCache",
    long_about = None,
    mut_args(in_help_order)
)]
pub struct Args {
    #[command(flatten)]
    pub server: ServerArgs,
    #[command(flatten)]
    pub fleet: FleetArgs,
    #[command(flatten)]
    pub telemetry: TelemetryArgs,
    #[command(flatten)]
    pub security: SecurityArgs,
    #[command(flatten)]
    pub limits: LimitsArgs,
    #[command(flatten)]
    pub tracing: TracingArgs,
}

/// The flags in the order `--help` has always listed them, whichever
/// section holds them now: launch scripts and docs were written against
/// that page.
const HELP_ORDER: [&str; 40] = [
    "host",
    "port",
    "prefiller_host",
    "prefiller_port",
    "num_prefillers",
    "decoder_host",
    "decoder_port",
    "num_decoders",
    "telemetry_port",
    "telemetry_host",
    "kv_ready_timeout",
    "on_kv_timeout",
    "upstream_timeout",
    "upstream_api_key",
    "discovery_interval",
    "health_interval",
    "health_timeout",
    "balance",
    "prefill_retries",
    "direct_below_tokens",
    "allowed_prefillers",
    "cluster_key",
    "cluster_key_file",
    "advertise_telemetry",
    "api_key",
    "api_key_file",
    "metrics_port",
    "telemetry_token",
    "telemetry_token_file",
    "max_body_bytes",
    "body_timeout",
    "stream_idle_timeout",
    "send_timeout",
    "idle_timeout",
    "max_pending",
    "max_connections",
    "drain_timeout",
    "log_format",
    "otlp_endpoint",
    "otlp_timeout",
];

/// Places a flag in `--help` by [`HELP_ORDER`]; one missing from it goes
/// after them all.
fn in_help_order(arg: clap::Arg) -> clap::Arg {
    let place = HELP_ORDER
        .iter()
        .position(|id| arg.get_id() == *id)
        .unwrap_or(HELP_ORDER.len());
    arg.display_order(place)
}

/// The validated configuration `serve` runs with, one section per owner.
#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerConfig,
    pub fleet: FleetConfig,
    pub telemetry: TelemetryConfig,
    pub security: SecurityConfig,
    pub limits: LimitsConfig,
    pub tracing: TracingConfig,
}

impl Args {
    /// Validates the flags, section by section. `openai_api_key` is
    /// `$OPENAI_API_KEY`, passed in so tests do not depend on the
    /// environment.
    pub fn resolve(self, openai_api_key: Option<String>) -> Result<(Config, ListenAddrs), String> {
        let fleet = self.fleet.resolve(openai_api_key)?;
        let telemetry = self.telemetry.resolve()?;
        let (server, listen) = self.server.resolve()?;
        let security = self.security.resolve()?;
        let limits = self.limits.resolve()?;
        let tracing = self.tracing.resolve()?;
        let config = Config {
            server,
            fleet,
            telemetry,
            security,
            limits,
            tracing,
        };
        Ok((config, listen))
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

#[cfg(test)]
mod tests {
    use super::*;
    use ipnet::IpNet;

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
        assert_eq!(authorities(&c.fleet.prefillers), ["localhost:8100"]);
        assert_eq!(authorities(&c.fleet.decoders), ["localhost:8200"]);
        assert_eq!(
            (l.host.as_str(), l.port, l.telemetry_port),
            ("localhost", 8000, 5768)
        );
        assert_eq!(l.telemetry_host, "localhost");
        assert_eq!(c.telemetry.kv_ready_timeout, Duration::from_secs(30));
        assert_eq!(c.telemetry.on_kv_timeout, KvTimeoutPolicy::Decode);
        assert!(c.fleet.upstream_auth.is_none());
        assert_eq!(c.fleet.discovery_interval, Duration::from_secs(5));
        assert_eq!(c.fleet.health_interval, Duration::from_secs(2));
        assert_eq!(c.fleet.balance, Balance::LeastLoaded);
        assert_eq!(c.fleet.prefill_retries, 2);
        assert_eq!(c.fleet.direct_below_tokens, 0);
    }

    #[test]
    fn pairing_rules() {
        let (c, _) = parse(&["--prefiller-port", "8100", "--num-prefillers", "3"]).unwrap();
        assert_eq!(
            authorities(&c.fleet.prefillers),
            ["localhost:8100", "localhost:8101", "localhost:8102"]
        );
        let (c, _) = parse(&["--decoder-host", "a,b", "--decoder-port", "9000"]).unwrap();
        assert_eq!(authorities(&c.fleet.decoders), ["a:9000", "b:9000"]);
        let (c, _) = parse(&["--decoder-host", "a", "--decoder-port", "1,2"]).unwrap();
        assert_eq!(authorities(&c.fleet.decoders), ["a:1", "a:2"]);
        let (c, _) = parse(&["--decoder-host", "a,b", "--decoder-port", "1,2"]).unwrap();
        assert_eq!(authorities(&c.fleet.decoders), ["a:1", "b:2"]);
        let (c, _) = parse(&["--decoder-host", "::1"]).unwrap();
        assert_eq!(authorities(&c.fleet.decoders), ["[::1]:8200"]);
        let (c, _) =
            parse(&["--decoder-host", "[::1],pods.svc", "--decoder-port", "9000"]).unwrap();
        assert_eq!(
            authorities(&c.fleet.decoders),
            ["[::1]:9000", "pods.svc:9000"]
        );
        assert_eq!(c.fleet.decoders[0].ip(), Some("::1".parse().unwrap()));
        assert_eq!(c.fleet.decoders[1].ip(), None);
        let (c, _) = parse(&["--decoder-host", "a,a", "--decoder-port", "1"]).unwrap();
        assert_eq!(
            authorities(&c.fleet.decoders),
            ["a:1"],
            "duplicates collapse"
        );
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
            c.fleet.allowed_prefillers,
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
        assert_eq!(c.fleet.upstream_auth.unwrap(), "Bearer k1");
        let args = Args::try_parse_from(["pd-proxy"]).unwrap();
        let (c, _) = args.resolve(Some(" k2 ".into())).unwrap();
        assert_eq!(c.fleet.upstream_auth.unwrap(), "Bearer k2");
    }

    #[test]
    fn help_lists_every_flag_in_its_old_place() {
        use clap::CommandFactory;
        let command = Args::command();
        let mut ids: Vec<&str> = command
            .get_arguments()
            .map(|a| a.get_id().as_str())
            .filter(|id| !matches!(*id, "help" | "version"))
            .collect();
        // A flag missing from HELP_ORDER sorts first and fails the match.
        ids.sort_by_key(|id| HELP_ORDER.iter().position(|o| o == id));
        assert_eq!(ids, HELP_ORDER);
    }
}

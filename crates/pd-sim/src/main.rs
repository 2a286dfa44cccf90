//! pd-sim: a vLLM prefiller and decoder in one process, for running pd-proxy
//! end to end (and benchmarking it) on a machine without GPUs.
//!
//! Prints the two bound addresses on stdout — and nothing else there — so a
//! script can start it on port 0 and read where it listens.

use std::io::Write;
use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use pd_sim::{Fault, Faults, Sim, SimConfig};
use tokio::net::TcpListener;

#[derive(Parser, Debug)]
#[command(
    name = "pd-sim",
    about = "vLLM prefiller + decoder simulator for pd-proxy"
)]
struct Args {
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    #[arg(long, default_value_t = 8100)]
    prefiller_port: u16,
    #[arg(long, default_value_t = 8200)]
    decoder_port: u16,
    /// Where the prefiller posts LMCache telemetry; empty disables it. From
    /// the environment it keeps a `?token=` off the command line, as
    /// LMCache's `LMCACHE_REQUEST_TELEMETRY_ENDPOINT` does.
    #[arg(
        long,
        env = "PD_SIM_TELEMETRY_URL",
        hide_env_values = true,
        default_value = "http://127.0.0.1:5768/api/v1/telemetry"
    )]
    telemetry_url: String,
    #[arg(long, default_value = "sim-model")]
    model: String,
    /// Tensor-parallel ranks; each posts its own telemetry event.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    world_size: u32,
    #[arg(long, default_value_t = 0)]
    prefill_delay_ms: u64,
    /// Delay between the prefill response and rank 0's telemetry.
    #[arg(long, default_value_t = 0)]
    telemetry_delay_ms: u64,
    /// Rank k posts k * this after rank 0.
    #[arg(long, default_value_t = 0)]
    rank_stagger_ms: u64,
    /// Post telemetry (and await replies) before answering the prefill.
    #[arg(long)]
    telemetry_before_response: bool,
    /// Ranks whose telemetry is lost, e.g. `1,3`.
    #[arg(long, value_delimiter = ',')]
    drop_ranks: Vec<u32>,
    #[arg(long)]
    duplicate_telemetry: bool,
    /// Answer every prefill with this HTTP status.
    #[arg(long)]
    prefill_error: Option<u16>,
    /// Answer every decode with this HTTP status.
    #[arg(long)]
    decoder_error: Option<u16>,
    #[arg(long, default_value_t = 0)]
    first_token_delay_ms: u64,
    #[arg(long, default_value_t = 0)]
    token_delay_ms: u64,
    /// Tokens generated when the request sets no max_tokens.
    #[arg(long, default_value_t = 16)]
    default_tokens: u32,
    /// Cut decoder streams after this many token events.
    #[arg(long)]
    die_after_tokens: Option<u32>,
    /// Engine-internal ids without vLLM's random `-xxxxxxxx` suffix.
    #[arg(long)]
    no_random_suffix: bool,
    /// Report this queue length in vLLM's ORCA header on non-streaming
    /// answers to requests that ask for it.
    #[arg(long)]
    reported_waiting: Option<u32>,
    /// Chance (0 to 1) that a completions request gets one of --faults,
    /// drawn per request and engine; 0 keeps every answer well-behaved.
    #[arg(long, default_value_t = 0.0, value_parser = rate)]
    fault_rate: f64,
    /// Faults --fault-rate draws from, comma separated [default: all]:
    /// prefill-503, prefill-500, lost-rank, duplicate-telemetry,
    /// decoder-500, decoder-dies, decoder-stalls, slow-first-token.
    #[arg(long, value_delimiter = ',')]
    faults: Vec<Fault>,
    /// How late a slow-first-token fault makes the first token.
    #[arg(long, default_value_t = 1000)]
    fault_slow_first_token_ms: u64,
    /// Seed for the fault draws, to replay a run.
    #[arg(long)]
    fault_seed: Option<u64>,
}

fn rate(s: &str) -> Result<f64, String> {
    let r: f64 = s.parse().map_err(|e| format!("{s:?}: {e}"))?;
    if (0.0..=1.0).contains(&r) {
        Ok(r)
    } else {
        Err(format!("{r} is not between 0 and 1"))
    }
}

impl Args {
    fn config(&self) -> Result<SimConfig, String> {
        let telemetry_url = match self.telemetry_url.trim() {
            "" => None,
            url if url.starts_with("http://") => Some(url.to_owned()),
            url => return Err(format!("--telemetry-url {url:?} must start with http://")),
        };
        Ok(SimConfig {
            model: self.model.clone(),
            telemetry_url,
            world_size: self.world_size,
            prefill_delay: Duration::from_millis(self.prefill_delay_ms),
            telemetry_delay: Duration::from_millis(self.telemetry_delay_ms),
            rank_stagger: Duration::from_millis(self.rank_stagger_ms),
            telemetry_before_response: self.telemetry_before_response,
            drop_ranks: self.drop_ranks.clone(),
            duplicate_telemetry: self.duplicate_telemetry,
            prefill_error: self.prefill_error,
            decoder_error: self.decoder_error,
            first_token_delay: Duration::from_millis(self.first_token_delay_ms),
            token_delay: Duration::from_millis(self.token_delay_ms),
            default_tokens: self.default_tokens,
            die_after_tokens: self.die_after_tokens,
            random_suffix: !self.no_random_suffix,
            reported_waiting: self.reported_waiting,
            // Nobody can read the logs of a standalone process; keeping them
            // would only grow memory during benchmarks.
            record: false,
            faults: Faults {
                rate: self.fault_rate,
                kinds: if self.faults.is_empty() {
                    Fault::ALL.to_vec()
                } else {
                    self.faults.clone()
                },
                slow_first_token: Duration::from_millis(self.fault_slow_first_token_ms),
                seed: self.fault_seed,
            },
        })
    }
}

async fn bind(host: &str, port: u16, role: &str) -> Result<(TcpListener, SocketAddr), String> {
    let listener = pd_sim::bind(host, port)
        .await
        .map_err(|e| format!("cannot bind {role} on {host}:{port}: {e}"))?;
    let addr = listener
        .local_addr()
        .map_err(|e| format!("{role} listener has no address: {e}"))?;
    Ok((listener, addr))
}

/// Resolves on ctrl-c or SIGTERM. Built (handlers installed) before the
/// addresses are printed, so a supervisor that signals as soon as it reads
/// them still gets a clean exit.
fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        // `signal` installs the handler now; `ctrl_c()` would only do so
        // when first polled.
        let mut int = signal(SignalKind::interrupt())?;
        let mut term = signal(SignalKind::terminate())?;
        Ok(async move {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
        })
    }
    #[cfg(not(unix))]
    {
        Ok(async {
            let _ = tokio::signal::ctrl_c().await;
        })
    }
}

async fn run(args: Args) -> Result<(), String> {
    let config = args.config()?;
    let (prefill_listener, prefill_addr) =
        bind(&args.host, args.prefiller_port, "prefiller").await?;
    let (decode_listener, decode_addr) = bind(&args.host, args.decoder_port, "decoder").await?;
    let sim = Sim::new(config);
    let shutdown = shutdown_signal().map_err(|e| format!("cannot install signal handlers: {e}"))?;

    let mut stdout = std::io::stdout().lock();
    writeln!(
        stdout,
        "pd-sim prefiller listening on http://{prefill_addr}"
    )
    .and_then(|()| writeln!(stdout, "pd-sim decoder listening on http://{decode_addr}"))
    .and_then(|()| stdout.flush())
    .map_err(|e| format!("cannot write to stdout: {e}"))?;
    drop(stdout);

    let prefiller = tokio::spawn(sim.clone().serve_prefiller(prefill_listener));
    let decoder = tokio::spawn(sim.serve_decoder(decode_listener));
    tokio::select! {
        () = shutdown => Ok(()),
        result = prefiller => Err(format!("prefiller server stopped: {result:?}")),
        result = decoder => Err(format!("decoder server stopped: {result:?}")),
    }
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("pd-sim: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pd-sim: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

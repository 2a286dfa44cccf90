//! The `pd-proxy` binary: configuration, logging, listeners; the rest is
//! the library's.

use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches};
use pd_proxy::{App, Args, ListenAddrs, Listeners};

/// jemalloc, configured in `.cargo/config.toml` to hand freed pages back
/// within a second. Measured against glibc: same RSS with 10,000 parked
/// requests, but glibc kept that peak after they were released (266 MiB
/// against 5 MiB idle); mimalloc used half again as much while parked.
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    let matches = Args::command().get_matches();
    let cap_given = matches
        .value_source("max_connections")
        .is_some_and(|source| source != clap::parser::ValueSource::DefaultValue);
    let on_command_line: Vec<&str> = ["cluster_key", "api_key", "telemetry_token"]
        .into_iter()
        .filter(|id| matches.value_source(id) == Some(clap::parser::ValueSource::CommandLine))
        .collect();
    let args = match Args::from_arg_matches(&matches) {
        Ok(args) => args,
        Err(e) => e.exit(),
    };
    let (config, addrs) = match args.resolve(std::env::var("OPENAI_API_KEY").ok()) {
        Ok(resolved) => resolved,
        Err(message) => {
            eprintln!("pd-proxy: error: {message}");
            return ExitCode::from(2);
        }
    };
    init_logging(config.tracing.log_format);
    for id in on_command_line {
        let flag = id.replace('_', "-");
        let env = format!("PD_PROXY_{}", id.to_ascii_uppercase());
        tracing::warn!(
            "--{flag} is on the command line, where `ps` shows it to every user of this host: prefer {env} or --{flag}-file"
        );
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime starts");
    // `run` is spawned rather than driven by `block_on` itself: the accept
    // loops inside it would otherwise live on this thread, which is not a
    // worker, and each telemetry connection (LMCache opens one per event)
    // would cost a futex wake-up here and another to hand the connection to
    // a worker (measured at one client: 16 context switches per request in
    // the proxy before, 9 after).
    match runtime.block_on(async { tokio::spawn(run(config, addrs, cap_given)).await }) {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(Failure::Config(message))) => {
            eprintln!("pd-proxy: error: {message}");
            ExitCode::from(2)
        }
        Ok(Err(Failure::Run(message))) => {
            eprintln!("pd-proxy: error: {message}");
            ExitCode::FAILURE
        }
        Err(panicked) => {
            eprintln!("pd-proxy: error: {panicked}");
            ExitCode::FAILURE
        }
    }
}

/// Logs go to stderr, filtered by `RUST_LOG` (default `info`): as text
/// lines for people, or one JSON object per line for log shippers, with
/// the request's span fields (its id, api) beside the event's own.
fn init_logging(format: pd_proxy::config::LogFormat) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::Layer;

    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let output = match format {
        pd_proxy::config::LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .boxed(),
        pd_proxy::config::LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .with_writer(std::io::stderr)
            .boxed(),
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(output)
        .init();
}

/// Why the proxy stopped: a configuration found wrong only once the
/// listeners are bound (exit code 2, like any bad flag), or a failure
/// while running.
enum Failure {
    Config(String),
    Run(String),
}

/// `cap_given`: `--max-connections` was set, not left at its default. A
/// default the open-file limit cannot carry is lowered to what it can; a
/// value the operator chose stands, with a warning.
async fn run(
    mut config: pd_proxy::Config,
    addrs: ListenAddrs,
    cap_given: bool,
) -> Result<(), Failure> {
    let fd_limit = pd_proxy::conn::raise_fd_limit();
    let wanted = config.limits.max_connections;
    let cap = pd_proxy::server::connection_cap(wanted, fd_limit);
    if cap < wanted {
        if cap_given {
            tracing::warn!(
                fd_limit,
                wanted,
                carried = cap,
                "the open-file limit may not carry --max-connections at three descriptors a connection"
            );
        } else {
            config.limits.max_connections = cap;
        }
    }
    let listeners = bind_all(&addrs, config.server.metrics_port).await?;
    let bound = listeners.bound().map_err(|e| Failure::Run(e.to_string()))?;
    pd_proxy::fleet::check_not_self(
        &config.fleet,
        &bound.own(),
        &pd_proxy::fleet::SystemResolver,
    )
    .await
    .map_err(Failure::Config)?;
    if config.security.telemetry_token.is_none() && !bound.telemetry.ip().is_loopback() {
        tracing::warn!(
            telemetry = %bound.telemetry,
            "the telemetry port is reachable from other hosts and takes events from anyone: set PD_PROXY_TELEMETRY_TOKEN (and ?token= in LMCACHE_REQUEST_TELEMETRY_ENDPOINT)"
        );
    }
    tracing::info!(
        api = %bound.public,
        telemetry = %bound.telemetry,
        metrics = ?listeners.metrics.as_ref().and_then(|l| l.local_addr().ok()),
        prefillers = ?config.fleet.prefillers.iter().map(ToString::to_string).collect::<Vec<_>>(),
        decoders = ?config.fleet.decoders.iter().map(ToString::to_string).collect::<Vec<_>>(),
        fd_limit,
        max_connections = config.limits.max_connections,
        "pd-proxy listening"
    );
    let app = App::build(config, &bound).map_err(Failure::Config)?;
    let traces = app.tracing.clone();
    let served = pd_proxy::serve(listeners, app, signals()).await;
    // The last spans go to the collector before the process ends, within
    // a bound: a collector that does not answer does not hold the exit.
    if let Some(traces) = traces {
        if !traces.flush(TRACE_FLUSH_LIMIT).await {
            tracing::warn!("the last spans could not be exported in time; they are lost");
        }
    }
    let drained = served.map_err(|e| Failure::Run(e.to_string()))?;
    if drained.cut > 0 {
        return Err(Failure::Run(format!(
            "shut down with {} request(s) cut before they finished",
            drained.cut
        )));
    }
    tracing::info!("shut down cleanly: every request finished");
    Ok(())
}

/// The API and telemetry listeners, and the metrics one with
/// `--metrics-port`, on the API's host.
async fn bind_all(addrs: &ListenAddrs, metrics_port: Option<u16>) -> Result<Listeners, Failure> {
    let public = pd_proxy::bind(&addrs.host, addrs.port)
        .await
        .map_err(Failure::Run)?;
    let telemetry = pd_proxy::bind(&addrs.telemetry_host, addrs.telemetry_port)
        .await
        .map_err(Failure::Run)?;
    let metrics = match metrics_port {
        Some(port) => Some(
            pd_proxy::bind(&addrs.host, port)
                .await
                .map_err(Failure::Run)?,
        ),
        None => None,
    };
    Ok(Listeners {
        public,
        telemetry,
        metrics,
    })
}

/// Longest wait at exit for the last spans to be exported.
const TRACE_FLUSH_LIMIT: std::time::Duration = std::time::Duration::from_secs(2);

/// One item per SIGTERM or Ctrl-C: the first starts the drain, the second
/// ends it at once.
fn signals() -> tokio_stream::wrappers::ReceiverStream<()> {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(async move {
        #[cfg(unix)]
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        loop {
            #[cfg(unix)]
            let term_once = async {
                match term.as_mut() {
                    Some(s) => {
                        s.recv().await;
                    }
                    None => std::future::pending().await,
                }
            };
            #[cfg(not(unix))]
            let term_once = std::future::pending::<()>();
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {},
                () = term_once => {},
            }
            if tx.send(()).await.is_err() {
                return;
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

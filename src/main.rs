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
    let key_on_command_line =
        matches.value_source("cluster_key") == Some(clap::parser::ValueSource::CommandLine);
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
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    if key_on_command_line {
        tracing::warn!(
            "the cluster key is on the command line, where `ps` shows it to every user of this host: prefer PD_PROXY_CLUSTER_KEY or --cluster-key-file"
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
    match runtime.block_on(async { tokio::spawn(run(config, addrs)).await }) {
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

/// Why the proxy stopped: a configuration found wrong only once the
/// listeners are bound (exit code 2, like any bad flag), or a failure
/// while running.
enum Failure {
    Config(String),
    Run(String),
}

async fn run(config: pd_proxy::Config, addrs: ListenAddrs) -> Result<(), Failure> {
    let public = pd_proxy::bind(&addrs.host, addrs.port)
        .await
        .map_err(Failure::Run)?;
    let telemetry = pd_proxy::bind(&addrs.telemetry_host, addrs.telemetry_port)
        .await
        .map_err(Failure::Run)?;
    let own = [public.local_addr(), telemetry.local_addr()]
        .into_iter()
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Failure::Run(e.to_string()))?;
    pd_proxy::fleet::check_not_self(&config, &own, &pd_proxy::fleet::SystemResolver)
        .await
        .map_err(Failure::Config)?;
    tracing::info!(
        api = %own[0],
        telemetry = %own[1],
        prefillers = ?config.prefillers.iter().map(ToString::to_string).collect::<Vec<_>>(),
        decoders = ?config.decoders.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "pd-proxy listening"
    );
    let app = App::new(config);
    app.set_routing(own[1], std::env::var("POD_IP").ok().as_deref())
        .map_err(Failure::Config)?;
    pd_proxy::serve(Listeners { public, telemetry }, app, shutdown_signal())
        .await
        .map_err(|e| Failure::Run(e.to_string()))
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

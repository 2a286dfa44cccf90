//! The processes under test: pd-sim and pd-proxy (this build's, or the
//! baseline's) on free loopback ports, and what the bench reads from them.

use std::net::SocketAddr;

use crate::common::{free_port, get_text, wait_ready, Proc};
use crate::pinning::{proxy_cpus, sim_cpus};

pub const PROXY: &str = env!("CARGO_BIN_EXE_pd-proxy");

/// `PD_PROXY_BASELINE`: another pd-proxy binary (an older build, say),
/// measured beside this one in A, W and the memory scenario, so that a
/// before/after comparison comes from one run on one machine.
pub fn baseline() -> Option<String> {
    std::env::var("PD_PROXY_BASELINE")
        .ok()
        .filter(|p| !p.is_empty())
}

/// pd-sim and pd-proxy, started with extra flags.
pub struct Stack {
    pub sim: Proc,
    pub proxy: Proc,
    pub proxy_addr: SocketAddr,
    pub decoder_addr: SocketAddr,
    /// pd-proxy's flags, to start it again on other cores or as another
    /// binary.
    proxy_args: Vec<String>,
}

/// pd-sim's flags: its two ports, telemetry to the proxy's port `tel`.
pub fn sim_args(pp: u16, dp: u16, tel: u16, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = [
        "--prefiller-port",
        &pp.to_string(),
        "--decoder-port",
        &dp.to_string(),
        "--telemetry-url",
        &format!("http://127.0.0.1:{tel}/api/v1/telemetry"),
    ]
    .map(String::from)
    .to_vec();
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// pd-proxy's flags on loopback: API port, telemetry port, upstream ports
/// (comma lists).
pub fn proxy_args(
    api: u16,
    tel: u16,
    prefill_ports: &str,
    decode_ports: &str,
    extra: &[&str],
) -> Vec<String> {
    let mut args: Vec<String> = [
        "--host",
        "127.0.0.1",
        "--port",
        &api.to_string(),
        "--prefiller-host",
        "127.0.0.1",
        "--prefiller-port",
        prefill_ports,
        "--decoder-host",
        "127.0.0.1",
        "--decoder-port",
        decode_ports,
        "--telemetry-port",
        &tel.to_string(),
    ]
    .map(String::from)
    .to_vec();
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

impl Stack {
    pub async fn start(sim_flags: &[&str], proxy_flags: &[&str]) -> Stack {
        Stack::start_with(PROXY, sim_flags, proxy_flags, proxy_cpus(None)).await
    }

    /// With `proxy` as the pd-proxy binary, on the CPUs `cpus`.
    pub async fn start_with(
        proxy: &str,
        sim_flags: &[&str],
        proxy_flags: &[&str],
        cpus: Option<String>,
    ) -> Stack {
        let (pp, dp, api, tel) = (free_port(), free_port(), free_port(), free_port());
        let sim = Proc::spawn_on(
            sim_cpus().as_deref(),
            pd_sim::binary(),
            &sim_args(pp, dp, tel, sim_flags),
        );
        let (pp_s, dp_s) = (pp.to_string(), dp.to_string());
        let args = proxy_args(api, tel, &pp_s, &dp_s, proxy_flags);
        let proxy_proc = Proc::spawn_on(cpus.as_deref(), proxy, &args);
        let stack = Stack {
            sim,
            proxy: proxy_proc,
            proxy_addr: ([127, 0, 0, 1], api).into(),
            decoder_addr: ([127, 0, 0, 1], dp).into(),
            proxy_args: args,
        };
        for addr in [
            stack.decoder_addr,
            ([127, 0, 0, 1], pp).into(),
            stack.proxy_addr,
        ] {
            wait_ready(addr).await;
        }
        stack
    }

    /// Stops pd-proxy and starts `bin` in its place on the CPUs `cpus`,
    /// with the same flags and ports: pd-sim posts its telemetry to the
    /// port it was started with, and a fresh pd-sim would leave the direct
    /// baseline measured against another process.
    pub async fn restart_proxy(&mut self, bin: &str, cpus: Option<&str>) {
        // Gone before the new one binds its ports.
        let _ = self.proxy.0.kill();
        let _ = self.proxy.0.wait();
        self.proxy = Proc::spawn_on(cpus, bin, &self.proxy_args);
        wait_ready(self.proxy_addr).await;
    }

    pub async fn pending(&self) -> f64 {
        let text = get_text(self.proxy_addr, "/metrics")
            .await
            .unwrap_or_default();
        text.lines()
            .find_map(|l| l.strip_prefix("pd_proxy_pending_requests "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(f64::NAN)
    }
}

/// The value of the first series of `name` whose labels hold every one of
/// `labels` (`key="value"` strings); NaN when there is none.
pub fn metric(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.strip_prefix(name))
        .filter(|rest| rest.starts_with(['{', ' ']))
        .filter_map(|rest| rest.rsplit_once(' '))
        .find(|(series, _)| labels.iter().all(|want| series.contains(want)))
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(f64::NAN)
}

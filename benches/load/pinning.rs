//! Where each process runs on a machine of more than 2 cores: pd-sim, the
//! load generator (this process) and pd-proxy on cores of their own.

use std::fmt::Write as _;
use std::ops::Range;
use std::process::{Command, Stdio};
use std::sync::OnceLock;

/// Where each process runs on a machine of more than 2 cores, as positions
/// in the list of CPUs the bench may use (a container's CPUs need not
/// start at 0). pd-sim and the load generator get cores of their own, so
/// that the proxy's throughput and CPU per request are its own and not
/// those of whoever else the scheduler put beside it; pd-proxy's cores come
/// last, taken from the front of what is left, so its sizes in A grow over
/// the same cores.
#[derive(Clone, Debug, PartialEq)]
pub struct Layout {
    pub sim: Range<usize>,
    pub load: Range<usize>,
    /// pd-proxy's cores at the size asked for (fewer where `rest` is).
    pub proxy: Range<usize>,
    /// Every core left after pd-sim and the load generator: pd-proxy's
    /// outside scenario A.
    pub rest: Range<usize>,
}

/// `None` on 2 cores or fewer: three processes cannot each have a core,
/// and pinning them would only take the scheduler's freedom away.
fn layout(cores: usize, proxy_cores: usize) -> Option<Layout> {
    if cores <= 2 {
        return None;
    }
    // A quarter each, at least 2 for pd-sim (its prefiller and decoder) and
    // 1 for the load generator, and always 1 left for pd-proxy.
    let sim = (cores / 4).max(2).min(cores - 2);
    let load = (cores / 4).max(1).min(cores - sim - 1);
    let rest = sim + load..cores;
    let proxy = rest.start..rest.start + proxy_cores.clamp(1, rest.len());
    Some(Layout {
        sim: 0..sim,
        load: sim..sim + load,
        proxy,
        rest,
    })
}

/// The layout put in place: the CPU ids behind its positions.
pub struct Pinning {
    /// Machine cores, counted before anything was pinned.
    pub cores: usize,
    ids: Vec<usize>,
    /// [`layout`] with pd-proxy on every core left.
    pub layout: Layout,
}

impl Pinning {
    /// The CPU ids at `positions`, as a `taskset -c` list (`8-11`, `3,5`).
    pub fn cpus(&self, positions: &Range<usize>) -> String {
        cpu_list(&self.ids[positions.clone()])
    }

    /// pd-proxy's CPUs at `size` cores (all it may have when `None`).
    pub fn proxy(&self, size: Option<usize>) -> String {
        match size {
            Some(n) => self.cpus(&layout(self.cores, n).unwrap().proxy),
            None => self.cpus(&self.layout.rest),
        }
    }
}

/// Set once in `main`, before the load generator's runtime starts: `None`
/// when nothing is pinned.
pub static PINNING: OnceLock<Option<Pinning>> = OnceLock::new();

pub fn pinning() -> Option<&'static Pinning> {
    PINNING.get().and_then(Option::as_ref)
}

/// pd-sim's CPUs; `None` where nothing is pinned.
pub fn sim_cpus() -> Option<String> {
    pinning().map(|p| p.cpus(&p.layout.sim))
}

/// pd-proxy's CPUs (and HAProxy's, in R: it is on the proxies' path) at
/// `size` cores, or all those left when `None`; `None` where nothing is
/// pinned.
pub fn proxy_cpus(size: Option<usize>) -> Option<String> {
    pinning().map(|p| p.proxy(size))
}

/// `0-3,8,10-11` from sorted ids.
fn cpu_list(ids: &[usize]) -> String {
    let mut out = String::new();
    let mut i = 0;
    while i < ids.len() {
        let mut j = i;
        while j + 1 < ids.len() && ids[j + 1] == ids[j] + 1 {
            j += 1;
        }
        if !out.is_empty() {
            out.push(',');
        }
        let _ = match j - i {
            0 => write!(out, "{}", ids[i]),
            _ => write!(out, "{}-{}", ids[i], ids[j]),
        };
        i = j + 1;
    }
    out
}

/// The CPU ids this process may run on (`Cpus_allowed_list`, `0-3,8`).
fn allowed_cpus() -> Vec<usize> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let Some(list) = status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
    else {
        return Vec::new();
    };
    let mut ids = Vec::new();
    for part in list.trim().split(',').filter(|p| !p.is_empty()) {
        let (a, b) = part.split_once('-').unwrap_or((part, part));
        if let (Ok(a), Ok(b)) = (a.parse::<usize>(), b.parse::<usize>()) {
            ids.extend(a..=b);
        }
    }
    ids
}

/// Pins this process (the load generator) to its cores and settles where
/// the others go; must run before any thread is started, since threads
/// inherit the mask they start with. `Err` says why nothing is pinned.
/// Through taskset rather than sched_setaffinity: the crate forbids
/// `unsafe`, and the bench with it.
pub fn pin(cores: usize) -> Result<Pinning, String> {
    let Some(layout) = layout(cores, usize::MAX) else {
        return Err(format!("{cores} cores"));
    };
    let ids = allowed_cpus();
    if ids.len() < cores {
        return Err(format!(
            "{} CPUs in this process's affinity list for {cores} cores",
            ids.len()
        ));
    }
    let pinning = Pinning {
        cores,
        ids: ids[..cores].to_vec(),
        layout,
    };
    let load = pinning.cpus(&pinning.layout.load);
    let pid = std::process::id().to_string();
    match Command::new("taskset")
        .args(["-a", "-p", "-c", &load, &pid])
        .stdout(Stdio::null())
        .output()
    {
        Ok(out) if out.status.success() => Ok(pinning),
        Ok(out) => Err(format!(
            "`taskset -a -p -c {load} {pid}` failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Err(e) => Err(format!("taskset (util-linux) did not run: {e}")),
    }
}

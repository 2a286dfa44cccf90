//! The process's open-file limit, raised at start.

/// Raises the open-file soft limit to the hard limit: each proxied
/// request holds up to three sockets, and the usual soft limit of 1,024
/// runs out at a few hundred clients — after which every accept fails and
/// telemetry is not heard, so every parked request waits out its KV
/// timeout. Returns the soft limit now in force.
pub fn raise_fd_limit() -> u64 {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => limit,
        Err(e) => {
            tracing::warn!(error = %e, "could not raise the open-file limit");
            rlimit::getrlimit(rlimit::Resource::NOFILE)
                .map(|(soft, _)| soft)
                .unwrap_or(1024)
        }
    }
}

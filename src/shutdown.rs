//! A shutdown as one value. `serve` begins its stages one after another;
//! each port, connection and request waits for the stage that concerns
//! it, reading the same value rather than a channel handed down to it.

use tokio_util::sync::{
    CancellationToken, DropGuard, WaitForCancellationFuture, WaitForCancellationFutureOwned,
};

/// A stage of a shutdown. `serve` begins them in this order; `Cut` only
/// when requests are still running as the drain ends, and a port that
/// fails goes straight to `Kill`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// The API and metrics ports accept no more connections, and the open
    /// ones are asked to finish (idle keep-alive ones close at once).
    StopApi,
    /// The drain's time is up: every request still running ends with an
    /// error its client can see (an SSE error event, a 503) rather than a
    /// connection closed mid-answer.
    Cut,
    /// The telemetry port stops likewise, once no request can still be
    /// waiting for an event.
    StopTelemetry,
    /// The open connections are dropped.
    Kill,
}

/// Where a shutdown has got to. The `App` holds it, so the request path
/// reaches the cut through the state it already has.
#[derive(Debug, Default)]
pub struct Shutdown {
    /// One token per [`Stage`], in its order.
    stages: [CancellationToken; 4],
}

impl Shutdown {
    fn token(&self, stage: Stage) -> &CancellationToken {
        &self.stages[stage as usize]
    }

    /// Begins `stage`; every wait for it ends. Beginning it again does
    /// nothing.
    pub fn begin(&self, stage: Stage) {
        self.token(stage).cancel();
    }

    /// Ready once `stage` has begun (at once if it already has).
    pub fn reached(&self, stage: Stage) -> WaitForCancellationFuture<'_> {
        self.token(stage).cancelled()
    }

    /// [`Shutdown::reached`] for a future that must own its wait, as a
    /// response body polled after its handler returned does.
    pub fn reached_owned(&self, stage: Stage) -> WaitForCancellationFutureOwned {
        self.token(stage).clone().cancelled_owned()
    }

    /// A handle on `stage` to wait on later: a relayed body keeps it and
    /// makes its wait only if the stream ever waits.
    pub fn handle(&self, stage: Stage) -> CancellationToken {
        self.token(stage).clone()
    }

    pub fn has_reached(&self, stage: Stage) -> bool {
        self.token(stage).is_cancelled()
    }

    /// Begins [`Stage::Kill`] when dropped: a `serve` that is itself
    /// dropped (its task aborted) drops its connections too, as one that
    /// returns does.
    pub fn kill_on_drop(&self) -> DropGuard {
        self.token(Stage::Kill).clone().drop_guard()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_stage_ends_only_its_own_waits() {
        let shutdown = Shutdown::default();
        shutdown.begin(Stage::StopApi);
        shutdown.reached(Stage::StopApi).await;
        assert!(!shutdown.has_reached(Stage::Cut));
        assert!(!shutdown.has_reached(Stage::Kill));
        let cut = shutdown.reached_owned(Stage::Cut);
        shutdown.begin(Stage::Cut);
        cut.await;
        drop(shutdown.kill_on_drop());
        assert!(shutdown.has_reached(Stage::Kill));
        assert!(!shutdown.has_reached(Stage::StopTelemetry));
    }
}

//! Response bodies that know how they ended. A proxy's correctness shows in
//! what happens to upstream bodies (relayed to the end, dropped when the
//! client leaves, broken by a dying engine), so the simulator's bodies carry
//! guards that count each outcome and fire the prefiller's telemetry when the
//! response has been handed to the connection.

use std::convert::Infallible;
use std::io;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Frame, SizeHint};

use crate::posting::Posting;
use crate::render;
use crate::request::{Kind, Plan};
use crate::Sim;

pub(crate) async fn sleep_if(d: Duration) {
    if !d.is_zero() {
        tokio::time::sleep(d).await;
    }
}

/// Counts a decoder response as completed once its last byte is handed to
/// hyper, or as cancelled if it is dropped before (the client went away).
pub(crate) struct DecodeGuard {
    sim: Arc<Sim>,
    outcome: Outcome,
}

#[derive(PartialEq, Eq)]
enum Outcome {
    Open,
    Completed,
    /// Cut on purpose (`die_after_tokens`): neither completed nor a client
    /// cancellation.
    Aborted,
}

impl DecodeGuard {
    pub fn new(sim: Arc<Sim>) -> Self {
        DecodeGuard {
            sim,
            outcome: Outcome::Open,
        }
    }

    fn complete(&mut self) {
        if self.outcome == Outcome::Open {
            self.outcome = Outcome::Completed;
            // Counted here rather than on drop so the count is visible before
            // the client can have read the last byte.
            self.sim
                .counters
                .decode_completed
                .fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl Drop for DecodeGuard {
    fn drop(&mut self) {
        if self.outcome == Outcome::Open {
            self.sim
                .counters
                .decode_cancelled
                .fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Counts a prefill whose handler future is dropped before it answers: what
/// a proxy that aborts upstream work on client disconnect causes.
pub(crate) struct PrefillGuard {
    sim: Arc<Sim>,
    armed: bool,
}

impl PrefillGuard {
    pub fn new(sim: Arc<Sim>) -> Self {
        PrefillGuard { sim, armed: true }
    }

    pub fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for PrefillGuard {
    fn drop(&mut self) {
        if self.armed {
            self.sim
                .counters
                .prefills_cancelled
                .fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Starts the prefiller's telemetry once the response is out. Fires on
/// drop too: by then the engine has finished the request, and LMCache
/// reports it whether or not the client read the answer.
pub(crate) struct TelemetryTrigger {
    sim: Arc<Sim>,
    ids: Option<Vec<String>>,
    posting: Posting,
}

impl TelemetryTrigger {
    pub fn new(sim: Arc<Sim>, ids: Vec<String>, posting: Posting) -> Self {
        TelemetryTrigger {
            sim,
            ids: Some(ids),
            posting,
        }
    }

    fn fire(&mut self) {
        if let Some(ids) = self.ids.take() {
            // Bodies are dropped on runtime threads, except when a runtime
            // shuts down: then there is nobody left to notify anyway.
            if let Ok(handle) = tokio::runtime::Handle::try_current() {
                self.sim.spawn_telemetry(&handle, ids, self.posting);
            }
        }
    }
}

impl Drop for TelemetryTrigger {
    fn drop(&mut self) {
        self.fire();
    }
}

/// What a body does when it hands out its last byte.
#[derive(Default)]
pub(crate) struct Hooks {
    pub decode: Option<DecodeGuard>,
    pub telemetry: Option<TelemetryTrigger>,
}

impl Hooks {
    fn finished(&mut self) {
        if let Some(guard) = &mut self.decode {
            guard.complete();
        }
        if let Some(trigger) = &mut self.telemetry {
            trigger.fire();
        }
    }

    pub(crate) fn aborted(&mut self) {
        if let Some(guard) = &mut self.decode {
            guard.outcome = Outcome::Aborted;
        }
    }
}

/// A whole JSON body with an exact length (so hyper sends Content-Length,
/// as uvicorn does) whose hooks run when the bytes are handed over.
pub(crate) struct OnceBody {
    data: Option<Bytes>,
    hooks: Hooks,
}

impl OnceBody {
    pub fn new(data: Bytes, hooks: Hooks) -> Self {
        OnceBody {
            data: Some(data),
            hooks,
        }
    }
}

impl http_body::Body for OnceBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        match this.data.take() {
            Some(data) => {
                this.hooks.finished();
                Poll::Ready(Some(Ok(Frame::data(data))))
            }
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.data.as_ref().map_or(0, |d| d.len() as u64))
    }
}

/// Decoder pacing; all zero on the prefiller.
#[derive(Clone, Copy, Default)]
pub(crate) struct Timing {
    pub first_token: Duration,
    pub between_tokens: Duration,
    pub die_after: Option<u32>,
    /// After this many token events the stream goes silent for good, as a
    /// hung engine's does; only the reader's giving up ends it.
    pub stall_after: Option<u32>,
}

enum Phase {
    Start,
    Token { step: u32, index: u32 },
    Usage,
    Done,
    End,
}

/// Produces a vLLM SSE stream lazily, one event per body frame, sleeping
/// between tokens inside the body so that headers go out first (as with
/// uvicorn's StreamingResponse) and so a client that leaves drops the
/// generator mid-way. Token k is due at a fixed time after the response
/// started, like an engine's steady decode cadence: timer lateness does not
/// add up over a long stream, so "simulated time" stays what it says.
pub(crate) struct EventGen {
    sim: Arc<Sim>,
    epoch: tokio::time::Instant,
    plan: Plan,
    timing: Timing,
    phase: Phase,
    token_events: u32,
    hooks: Hooks,
}

impl EventGen {
    pub fn new(sim: Arc<Sim>, plan: Plan, timing: Timing, hooks: Hooks) -> Self {
        EventGen {
            sim,
            epoch: tokio::time::Instant::now(),
            plan,
            timing,
            phase: Phase::Start,
            token_events: 0,
            hooks,
        }
    }

    pub fn into_body(self) -> axum::body::Body {
        axum::body::Body::from_stream(futures_util::stream::unfold(self, Self::next_event))
    }

    /// Waits until token `step` is due: first_token + step × between_tokens
    /// after the response started.
    async fn sleep_until_due(&self, step: u32) {
        let due = self.timing.first_token + self.timing.between_tokens * step;
        if !due.is_zero() {
            tokio::time::sleep_until(self.epoch + due).await;
        }
    }

    async fn next_event(mut self) -> Option<(io::Result<Bytes>, Self)> {
        loop {
            match self.phase {
                Phase::Start => {
                    self.sleep_until_due(0).await;
                    self.phase = Phase::Token { step: 0, index: 0 };
                    if self.plan.kind == Kind::Chat {
                        let event = render::chat_role_chunk(&self.plan, &self.sim.config.model);
                        return Some((Ok(event), self));
                    }
                }
                Phase::Token { step, index } => {
                    if step >= self.plan.max_tokens {
                        self.phase = Phase::Usage;
                        continue;
                    }
                    if self
                        .timing
                        .stall_after
                        .is_some_and(|n| self.token_events >= n)
                    {
                        // Not a completion, and not the client's doing
                        // either: the proxy is expected to give up.
                        self.hooks.aborted();
                        // Pending flushes what hyper has buffered, so the
                        // tokens before the stall do reach the reader.
                        std::future::pending::<()>().await;
                    }
                    if self
                        .timing
                        .die_after
                        .is_some_and(|n| self.token_events >= n)
                    {
                        self.hooks.aborted();
                        self.phase = Phase::End;
                        // Returning Pending once makes hyper flush what it
                        // has buffered; erroring at once would discard the
                        // tokens already "generated" along with the stream.
                        tokio::task::yield_now().await;
                        // An error makes hyper drop the connection without the
                        // chunked terminator: the client sees a broken body,
                        // as when an engine process dies.
                        let err = io::Error::other("pd-sim: die_after_tokens reached");
                        return Some((Err(err), self));
                    }
                    if index == 0 && step > 0 {
                        self.sleep_until_due(step).await;
                    }
                    let event = render::token_event(
                        &self.plan,
                        &self.sim.config.model,
                        &self.sim.fingerprint,
                        step,
                        index,
                    );
                    self.token_events += 1;
                    self.phase = if index + 1 < self.plan.prompt_tokens.len() as u32 {
                        Phase::Token {
                            step,
                            index: index + 1,
                        }
                    } else {
                        Phase::Token {
                            step: step + 1,
                            index: 0,
                        }
                    };
                    return Some((Ok(event), self));
                }
                Phase::Usage => {
                    self.phase = Phase::Done;
                    if self.plan.include_usage {
                        let event = render::usage_chunk(
                            &self.plan,
                            &self.sim.config.model,
                            &self.sim.fingerprint,
                        );
                        return Some((Ok(event), self));
                    }
                }
                Phase::Done => {
                    self.phase = Phase::End;
                    self.hooks.finished();
                    return Some((Ok(Bytes::from_static(render::DONE)), self));
                }
                Phase::End => return None,
            }
        }
    }
}

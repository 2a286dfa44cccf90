//! Requests parked between their prefill and their decode, waiting for
//! LMCache to report the prompt's KV as stored.
//!
//! Ownership is simple on purpose: the request's own future parks the entry
//! and holds a [`ParkedGuard`]; dropping the guard (done waiting, timed out,
//! client gone, error) is the only way an entry leaves the map. Telemetry only
//! updates entries and wakes their waiter, so nothing can be removed twice or
//! forgotten.

use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use dashmap::DashMap;
use metrics::Gauge;
use tokio::sync::oneshot;

/// A proxy-generated request id: 128 random bits, written as 32 lowercase
/// hex digits. Fixed length and no `-`, so the id can be cut back out of
/// vLLM's internal ids (`chatcmpl-<id>-<suffix>`, `cmpl-<id>-<i>-<suffix>`)
/// without a lookup.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct RequestId(u128);

/// Hex digits in a [`RequestId`].
pub const ID_LEN: usize = 32;

/// KV ranks are tracked in a bitmask; LMCache's `world_size` is the tensor
/// parallel degree, far below this.
pub const MAX_WORLD_SIZE: u32 = 128;

impl RequestId {
    pub fn random() -> Self {
        RequestId(rand::random())
    }

    pub fn to_bytes(self) -> [u8; 16] {
        self.0.to_be_bytes()
    }

    pub fn from_bytes(bytes: [u8; 16]) -> Self {
        RequestId(u128::from_be_bytes(bytes))
    }

    /// Parses exactly 32 lowercase hex digits, the form [`fmt::Display`]
    /// writes.
    pub fn parse(hex: &str) -> Option<Self> {
        if hex.len() != ID_LEN || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return None;
        }
        u128::from_str_radix(hex, 16).ok().map(RequestId)
    }
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

impl fmt::Debug for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Ids are uniformly random and only the proxy inserts them, so their low
/// bits are already a good hash; SipHash would be wasted work per event.
#[derive(Clone, Copy, Default)]
pub struct IdHasherBuilder;

#[derive(Default)]
pub struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut buf = [0u8; 8];
            buf[..chunk.len()].copy_from_slice(chunk);
            self.0 ^= u64::from_le_bytes(buf);
        }
    }
    fn write_u128(&mut self, v: u128) {
        self.0 ^= v as u64 ^ (v >> 64) as u64;
    }
}

impl BuildHasher for IdHasherBuilder {
    type Hasher = IdHasher;
    fn build_hasher(&self) -> IdHasher {
        IdHasher::default()
    }
}

/// What one telemetry event did to the map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recorded {
    /// No parked request has this id (already released, or not ours).
    Unknown,
    /// Counted; more ranks or prompts are still missing.
    Partial,
    /// This rank of this prompt was already counted.
    Duplicate,
    /// The last missing piece: the waiter has been woken.
    Ready,
    /// The id is ours but the prompt index is past the request's prompts, or
    /// the rank is not below the world size.
    Rejected,
    /// The event's `world_size` is larger than the first event's for this
    /// request: not counted. Believing it would hold the request until its
    /// KV timeout, waiting for ranks that do not exist; the real ranks
    /// still release it.
    WorldSizeRaised,
}

struct Parked {
    /// Per prompt, the bitmask of KV ranks that reported.
    ranks: Box<[u128]>,
    /// The TP degree of the first event; 0 until then. A later event may
    /// not raise it ([`Recorded::WorldSizeRaised`]); one that claims less
    /// is counted against this one, so no rank is skipped either way.
    world_size: u32,
    /// Events for this request refused for raising the world size: at a
    /// KV timeout they tell a refused event from a lost one.
    refused: u16,
    /// Prompts not yet complete for `world_size`.
    incomplete: usize,
    /// Taken when the request becomes ready.
    wake: Option<oneshot::Sender<()>>,
}

impl Parked {
    fn full(&self, prompt: usize) -> bool {
        self.ranks[prompt].count_ones() >= self.world_size
    }

    fn recount(&mut self) {
        self.incomplete = (0..self.ranks.len()).filter(|&p| !self.full(p)).count();
    }
}

pub struct Pending {
    map: DashMap<RequestId, Parked, IdHasherBuilder>,
    /// Entries in `map`, kept beside it: `DashMap::len` locks every shard,
    /// too much for a check made on every request.
    parked: AtomicUsize,
    /// `--max-pending`.
    cap: usize,
    gauge: Gauge,
}

impl Pending {
    /// `gauge` is `pd_proxy_pending_requests`: it moves with the map. At
    /// most `cap` requests are parked at once.
    pub fn new(gauge: Gauge, cap: usize) -> Arc<Self> {
        Arc::new(Pending {
            map: DashMap::with_hasher(IdHasherBuilder),
            parked: AtomicUsize::new(0),
            cap,
            gauge,
        })
    }

    /// Parks `id`, expecting KV for `prompts` prompts (a completions batch
    /// has one engine request per prompt). Must happen before the prefill is
    /// sent: LMCache's event can arrive before the prefill response.
    /// `None` when `cap` requests are parked already.
    pub fn park(
        self: &Arc<Self>,
        id: RequestId,
        prompts: usize,
    ) -> Option<(ParkedGuard, oneshot::Receiver<()>)> {
        self.parked
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.cap).then_some(n + 1)
            })
            .ok()?;
        let (tx, rx) = oneshot::channel();
        let parked = Parked {
            ranks: vec![0; prompts.max(1)].into_boxed_slice(),
            world_size: 0,
            refused: 0,
            incomplete: prompts.max(1),
            wake: Some(tx),
        };
        let previous = self.map.insert(id, parked);
        debug_assert!(previous.is_none(), "request ids are random 128-bit values");
        self.gauge.increment(1.0);
        Some((
            ParkedGuard {
                pending: Arc::clone(self),
                id,
            },
            rx,
        ))
    }

    /// Counts one rank's "store finished" for one prompt of `id`, waking the
    /// waiter once every prompt has heard from every rank.
    pub fn record(&self, id: RequestId, prompt: usize, world_size: u32, rank: u32) -> Recorded {
        // The shard lock is held only for this synchronous block.
        let Some(mut parked) = self.map.get_mut(&id) else {
            return Recorded::Unknown;
        };
        if prompt >= parked.ranks.len() || rank >= world_size || world_size > MAX_WORLD_SIZE {
            return Recorded::Rejected;
        }
        if parked.world_size != 0 && world_size > parked.world_size {
            parked.refused = parked.refused.saturating_add(1);
            return Recorded::WorldSizeRaised;
        }
        let bit = 1u128 << rank;
        if parked.ranks[prompt] & bit != 0 {
            return Recorded::Duplicate;
        }
        parked.ranks[prompt] |= bit;
        if parked.world_size == 0 {
            parked.world_size = world_size;
            parked.recount();
        } else if parked.full(prompt) {
            parked.incomplete -= 1;
        }
        if parked.incomplete > 0 {
            return Recorded::Partial;
        }
        if let Some(wake) = parked.wake.take() {
            // The waiter may have just given up; then nobody needs the wake.
            let _ = wake.send(());
            return Recorded::Ready;
        }
        Recorded::Duplicate
    }

    /// What telemetry told `id` so far; all zero once `id` is no longer
    /// parked. Read it before dropping the request's guard.
    pub fn report(&self, id: RequestId) -> KvReport {
        self.map
            .get(&id)
            .map_or(KvReport::default(), |parked| KvReport {
                world_size: parked.world_size,
                ranks: parked
                    .ranks
                    .iter()
                    .map(|r| r.count_ones())
                    .min()
                    .unwrap_or(0),
                refused: parked.refused,
            })
    }

    pub fn len(&self) -> usize {
        self.parked.load(Ordering::Acquire)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A parked request's telemetry, for its trace and its KV-timeout warning.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct KvReport {
    /// The world size of the first event (0: none came).
    pub world_size: u32,
    /// Ranks heard from, for the prompt that heard from fewest.
    pub ranks: u32,
    /// Events refused as [`Recorded::WorldSizeRaised`].
    pub refused: u16,
}

/// Owns one parked entry; removes it when dropped.
pub struct ParkedGuard {
    pending: Arc<Pending>,
    id: RequestId,
}

impl Drop for ParkedGuard {
    fn drop(&mut self) {
        if self.pending.map.remove(&self.id).is_some() {
            self.pending.parked.fetch_sub(1, Ordering::AcqRel);
            self.pending.gauge.decrement(1.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pending() -> Arc<Pending> {
        Pending::new(Gauge::noop(), usize::MAX)
    }

    #[test]
    fn id_round_trips_and_rejects_other_forms() {
        let id = RequestId::random();
        let text = id.to_string();
        assert_eq!(text.len(), ID_LEN);
        assert!(!text.contains('-'));
        assert_eq!(RequestId::parse(&text), Some(id));
        assert_eq!(RequestId::parse(&text[1..]), None);
        assert_eq!(
            RequestId::parse(
                &text
                    .to_uppercase()
                    .replace(|c: char| c.is_ascii_digit(), "A")
            ),
            None
        );
        assert_eq!(RequestId::parse("+0000000000000000000000000000000"), None);
    }

    #[test]
    fn ready_only_after_every_rank_of_every_prompt() {
        let p = pending();
        let id = RequestId::random();
        let (_guard, mut rx) = p.park(id, 2).unwrap();
        assert_eq!(p.record(id, 0, 2, 0), Recorded::Partial);
        assert_eq!(p.record(id, 0, 2, 0), Recorded::Duplicate);
        assert_eq!(p.record(id, 0, 2, 1), Recorded::Partial);
        assert_eq!(p.record(id, 1, 2, 1), Recorded::Partial);
        assert!(rx.try_recv().is_err());
        assert_eq!(p.record(id, 2, 2, 0), Recorded::Rejected);
        assert_eq!(p.record(id, 1, 2, 0), Recorded::Ready);
        assert!(rx.try_recv().is_ok());
        assert_eq!(p.record(id, 1, 2, 0), Recorded::Duplicate);
    }

    #[test]
    fn a_smaller_world_size_later_does_not_release_early() {
        let p = pending();
        let id = RequestId::random();
        let (_guard, mut rx) = p.park(id, 1).unwrap();
        // A rank that claims world_size 1 while the first said 2 must not
        // release the request early.
        assert_eq!(p.record(id, 0, 2, 1), Recorded::Partial);
        assert!(rx.try_recv().is_err());
        assert_eq!(p.record(id, 0, 1, 0), Recorded::Ready);
        assert!(rx.try_recv().is_ok());
        assert_eq!(
            p.report(id),
            KvReport {
                world_size: 2,
                ranks: 2,
                refused: 0
            }
        );
    }

    #[test]
    fn a_larger_world_size_later_is_refused_and_counted() {
        let p = pending();
        let id = RequestId::random();
        let (_guard, mut rx) = p.park(id, 2).unwrap();
        assert_eq!(p.record(id, 0, 2, 0), Recorded::Partial);
        // A sender claiming 128 ranks would hold the request to its
        // timeout: refused, and the real ranks still release it.
        assert_eq!(p.record(id, 1, 128, 5), Recorded::WorldSizeRaised);
        assert_eq!(p.record(id, 0, 3, 2), Recorded::WorldSizeRaised);
        assert_eq!(p.record(id, 5, 2, 0), Recorded::Rejected);
        // The prompt that heard from fewest ranks (prompt 1: none) counts.
        assert_eq!(
            p.report(id),
            KvReport {
                world_size: 2,
                ranks: 0,
                refused: 2
            }
        );
        assert_eq!(p.record(id, 0, 2, 1), Recorded::Partial);
        assert_eq!(p.record(id, 1, 2, 0), Recorded::Partial);
        assert!(rx.try_recv().is_err());
        assert_eq!(p.record(id, 1, 2, 1), Recorded::Ready);
        assert!(rx.try_recv().is_ok());
        assert_eq!(p.report(RequestId::random()), KvReport::default());
    }

    #[test]
    fn no_more_than_cap_are_parked() {
        let p = Pending::new(Gauge::noop(), 2);
        let (a, b) = (RequestId::random(), RequestId::random());
        let first = p.park(a, 1).unwrap();
        let _second = p.park(b, 1).unwrap();
        assert!(p.park(RequestId::random(), 1).is_none());
        assert_eq!(p.len(), 2);
        drop(first);
        assert_eq!(p.len(), 1);
        assert!(p.park(RequestId::random(), 1).is_some());
    }

    #[test]
    fn guard_is_the_only_remover() {
        let p = pending();
        let id = RequestId::random();
        let (guard, _rx) = p.park(id, 1).unwrap();
        assert_eq!(p.record(id, 0, 1, 0), Recorded::Ready);
        assert_eq!(p.len(), 1, "telemetry never removes");
        drop(guard);
        assert!(p.is_empty());
        assert_eq!(p.record(id, 0, 1, 0), Recorded::Unknown);
    }
}

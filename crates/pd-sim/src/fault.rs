//! Faults drawn per request. The always-on knobs (`prefill_error`,
//! `drop_ranks`, `die_after_tokens`, ...) show how the proxy handles one
//! failure; a soak needs engines that fail now and then among ordinary
//! answers, so that every failure path runs many times while the rest of
//! the traffic keeps the proxy busy, and leaks show as growth.

use std::fmt;
use std::str::FromStr;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// One way a request can go wrong at an engine.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Fault {
    /// The prefiller answers 503 (a proxy may try another prefiller).
    Prefill503,
    /// The prefiller answers 500.
    Prefill500,
    /// One rank's telemetry event, drawn at random, is lost: the request
    /// only goes on at the proxy's KV-ready timeout.
    LostRank,
    /// Every rank's event is posted twice.
    DuplicateTelemetry,
    /// The decoder answers 500.
    Decoder500,
    /// The decoder's body breaks part-way, as when the engine dies: a
    /// stream after a random number of tokens, a JSON answer half sent.
    DecoderDies,
    /// The decoder's body stops part-way and never ends (a hung engine);
    /// only the proxy's timeouts end it.
    DecoderStalls,
    /// The decoder's first token comes [`Faults::slow_first_token`] late.
    SlowFirstToken,
}

impl Fault {
    pub const ALL: [Fault; 8] = [
        Fault::Prefill503,
        Fault::Prefill500,
        Fault::LostRank,
        Fault::DuplicateTelemetry,
        Fault::Decoder500,
        Fault::DecoderDies,
        Fault::DecoderStalls,
        Fault::SlowFirstToken,
    ];

    /// The name on pd-sim's command line and in its metrics.
    pub fn name(self) -> &'static str {
        match self {
            Fault::Prefill503 => "prefill-503",
            Fault::Prefill500 => "prefill-500",
            Fault::LostRank => "lost-rank",
            Fault::DuplicateTelemetry => "duplicate-telemetry",
            Fault::Decoder500 => "decoder-500",
            Fault::DecoderDies => "decoder-dies",
            Fault::DecoderStalls => "decoder-stalls",
            Fault::SlowFirstToken => "slow-first-token",
        }
    }

    /// Whether the prefiller (else the decoder) is the engine that fails.
    pub fn on_prefiller(self) -> bool {
        matches!(
            self,
            Fault::Prefill503 | Fault::Prefill500 | Fault::LostRank | Fault::DuplicateTelemetry
        )
    }

    pub(crate) fn index(self) -> usize {
        Fault::ALL
            .iter()
            .position(|&f| f == self)
            .expect("ALL lists every fault")
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Fault {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        Fault::ALL
            .into_iter()
            .find(|f| f.name() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = Fault::ALL.iter().map(|f| f.name()).collect();
                format!("unknown fault {s:?}; one of {}", names.join(", "))
            })
    }
}

/// How often, and how, requests fail. Off by default.
#[derive(Clone, Debug)]
pub struct Faults {
    /// Chance (0 to 1) that a completions request reaching an engine gets
    /// one fault, drawn evenly from those of `kinds` that apply to that
    /// engine's role. A PD request crosses both engines, so it draws twice.
    pub rate: f64,
    pub kinds: Vec<Fault>,
    /// How late [`Fault::SlowFirstToken`] makes the first token.
    pub slow_first_token: Duration,
    /// Seed for the draws, to replay a run; `None` draws a fresh one.
    pub seed: Option<u64>,
}

impl Default for Faults {
    fn default() -> Self {
        Faults {
            rate: 0.0,
            kinds: Fault::ALL.to_vec(),
            slow_first_token: Duration::from_secs(1),
            seed: None,
        }
    }
}

/// The random source behind [`Faults`]: one per simulator, behind a lock
/// that is only taken when faults are on.
pub(crate) struct Dice {
    rate: f64,
    prefiller: Vec<Fault>,
    decoder: Vec<Fault>,
    rng: Mutex<StdRng>,
}

impl Dice {
    pub fn new(faults: &Faults) -> Self {
        let rate = if faults.rate.is_finite() {
            faults.rate.clamp(0.0, 1.0)
        } else {
            0.0
        };
        let (prefiller, decoder) = faults.kinds.iter().partition(|f| f.on_prefiller());
        Dice {
            rate,
            prefiller,
            decoder,
            rng: Mutex::new(StdRng::seed_from_u64(
                faults.seed.unwrap_or_else(rand::random),
            )),
        }
    }

    /// The fault for one request at an engine of this role, if any.
    pub fn draw(&self, on_prefiller: bool) -> Option<Fault> {
        let kinds = if on_prefiller {
            &self.prefiller
        } else {
            &self.decoder
        };
        if self.rate <= 0.0 || kinds.is_empty() {
            return None;
        }
        let mut rng = self.rng.lock().unwrap_or_else(PoisonError::into_inner);
        if !rng.random_bool(self.rate) {
            return None;
        }
        Some(kinds[rng.random_range(0..kinds.len())])
    }

    /// A number in `0..n` (0 when `n` is 0): where a body breaks or a rank
    /// is lost.
    pub fn below(&self, n: u32) -> u32 {
        if n == 0 {
            return 0;
        }
        self.rng
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .random_range(0..n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dice(rate: f64, kinds: &[Fault]) -> Dice {
        Dice::new(&Faults {
            rate,
            kinds: kinds.to_vec(),
            seed: Some(7),
            ..Faults::default()
        })
    }

    #[test]
    fn off_by_default_and_at_rate_zero() {
        let d = Dice::new(&Faults::default());
        assert!((0..1000).all(|_| d.draw(true).is_none() && d.draw(false).is_none()));
    }

    #[test]
    fn a_fault_only_reaches_its_own_role() {
        let d = dice(1.0, &[Fault::Prefill503, Fault::DecoderStalls]);
        assert!((0..100).all(|_| d.draw(true) == Some(Fault::Prefill503)));
        assert!((0..100).all(|_| d.draw(false) == Some(Fault::DecoderStalls)));
        let d = dice(1.0, &[Fault::LostRank]);
        assert_eq!(d.draw(false), None, "no decoder fault was asked for");
    }

    #[test]
    fn the_rate_is_roughly_kept_and_every_kind_comes_up() {
        let d = dice(0.25, &Fault::ALL);
        let mut seen = std::collections::HashSet::new();
        let hits = (0..20_000)
            .filter_map(|i| d.draw(i % 2 == 0))
            .inspect(|f| {
                seen.insert(*f);
            })
            .count();
        assert!((4_500..5_500).contains(&hits), "{hits} of 20000 at 0.25");
        assert_eq!(seen.len(), Fault::ALL.len());
    }

    #[test]
    fn names_round_trip() {
        for f in Fault::ALL {
            assert_eq!(f.name().parse::<Fault>(), Ok(f));
            assert_eq!(Fault::ALL[f.index()], f);
        }
        assert!("prefill-418".parse::<Fault>().is_err());
    }
}

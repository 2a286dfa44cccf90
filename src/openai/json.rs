//! The JSON machinery under the parsers: the top-level object walked as
//! raw member texts borrowed from the body, and the small visitors the
//! measures share.

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer as _, MapAccess, Visitor};
use serde_json::value::RawValue;

/// Visitor methods for the JSON types a visitor has no use for: they give
/// `$value`, skipping what they hold. Prompts of odd shapes are not
/// refused here; vLLM says what is wrong with them.
macro_rules! lenient {
    ($value:expr; $($kind:ident),*) => { $(lenient!(@ $kind $value);)* };
    (@bool $v:expr) => {
        fn visit_bool<E: serde::de::Error>(self, _: bool) -> Result<Self::Value, E> { Ok($v) }
    };
    (@i64 $v:expr) => {
        fn visit_i64<E: serde::de::Error>(self, _: i64) -> Result<Self::Value, E> { Ok($v) }
    };
    (@u64 $v:expr) => {
        fn visit_u64<E: serde::de::Error>(self, _: u64) -> Result<Self::Value, E> { Ok($v) }
    };
    (@f64 $v:expr) => {
        fn visit_f64<E: serde::de::Error>(self, _: f64) -> Result<Self::Value, E> { Ok($v) }
    };
    (@str $v:expr) => {
        fn visit_str<E: serde::de::Error>(self, _: &str) -> Result<Self::Value, E> { Ok($v) }
    };
    (@unit $v:expr) => {
        fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> { Ok($v) }
    };
    (@seq $v:expr) => {
        fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
            Ok($v)
        }
    };
    (@map $v:expr) => {
        fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            while map.next_entry::<serde::de::IgnoredAny, serde::de::IgnoredAny>()?.is_some() {}
            Ok($v)
        }
    };
}
pub(super) use lenient;

/// One member of the top-level object, as texts of the body.
pub(super) struct Entry<'a> {
    /// The key as written, quotes and escapes included.
    pub(super) key: &'a str,
    /// The key unescaped: `"max\u005ftokens"` is `max_tokens` to vLLM.
    pub(super) name: Cow<'a, str>,
    /// The value as written, without the whitespace around it.
    pub(super) value: &'a str,
}

/// Calls `each` for every member of the top-level object, in order,
/// duplicates included. `Ok(false)`: valid JSON, but not an object.
pub(super) fn walk<'a>(body: &'a str, each: impl FnMut(Entry<'a>)) -> serde_json::Result<bool> {
    let mut de = serde_json::Deserializer::from_str(body);
    let object = (&mut de).deserialize_any(Walk(each))?;
    de.end()?;
    Ok(object)
}

struct Walk<F>(F);

impl<'de, F: FnMut(Entry<'de>)> Visitor<'de> for Walk<F> {
    type Value = bool;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(mut self, mut map: A) -> Result<bool, A::Error> {
        while let Some(key) = map.next_key::<&'de RawValue>()? {
            let key = key.get();
            let name = match key.contains('\\') {
                false => Cow::Borrowed(&key[1..key.len() - 1]),
                true => Cow::Owned(serde_json::from_str(key).map_err(de::Error::custom)?),
            };
            let value = map.next_value::<&'de RawValue>()?.get();
            (self.0)(Entry { key, name, value });
        }
        Ok(true)
    }

    lenient!(false; bool, i64, u64, f64, str, unit, seq);
}

/// Runs `seed` over one value's text.
pub(super) fn measure<'a, S: DeserializeSeed<'a>>(
    text: &'a str,
    seed: S,
) -> serde_json::Result<S::Value> {
    seed.deserialize(&mut serde_json::Deserializer::from_str(text))
}

/// Whether a value is `null`.
pub(super) struct IsNull;

impl<'de> DeserializeSeed<'de> for IsNull {
    type Value = bool;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for IsNull {
    type Value = bool;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any value")
    }

    fn visit_unit<E: de::Error>(self) -> Result<bool, E> {
        Ok(true)
    }

    lenient!(false; bool, i64, u64, f64, str, seq, map);
}

/// Which of a few names a key is (`None`: another), without keeping it.
pub(super) struct KeySeed(pub(super) &'static [&'static str]);

impl<'de> DeserializeSeed<'de> for KeySeed {
    type Value = Option<usize>;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Option<usize>, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for KeySeed {
    type Value = Option<usize>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a key")
    }

    fn visit_str<E: de::Error>(self, key: &str) -> Result<Option<usize>, E> {
        Ok(self.0.iter().position(|name| *name == key))
    }
}

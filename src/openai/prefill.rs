//! The prefiller's copy of a request body, and the contract it keeps.

use bytes::Bytes;

use super::json::walk;
use super::{Api, ClientRequest};

impl ClientRequest<'_> {
    /// The prefiller's copy: compute the prompt's KV and one token, nothing
    /// more, in a form vLLM accepts whatever the client asked for.
    ///
    /// Every other key and value is copied as the client wrote it, in its
    /// order: a seed past u64 or a float's last digit must reach the
    /// prefiller as they reach the decoder.
    pub fn prefill_body(&self) -> Bytes {
        let mut out = Vec::with_capacity(self.body.len() + 48);
        out.push(b'{');
        let (mut max_tokens, mut stream, mut n) = (false, false, false);
        fn put(out: &mut Vec<u8>, key: &str, value: &str) {
            if out.len() > 1 {
                out.push(b',');
            }
            out.extend_from_slice(key.as_bytes());
            out.push(b':');
            out.extend_from_slice(value.as_bytes());
        }
        walk(self.body, |entry| {
            let value = match &*entry.name {
                "max_tokens" => {
                    max_tokens = true;
                    "1"
                }
                "max_completion_tokens" => "1",
                // vLLM rejects min_tokens > max_tokens with a 400.
                "min_tokens" | "min_completion_tokens" if exceeds_one(entry.value) => "1",
                "stream" => {
                    stream = true;
                    "false"
                }
                // vLLM rejects stream_options on a request that does not
                // stream.
                "stream_options" => return,
                "n" => {
                    n = true;
                    "1"
                }
                _ => entry.value,
            };
            put(&mut out, entry.key, value);
        })
        .expect("parse accepted this body");
        for (present, key, value) in [
            (max_tokens, "\"max_tokens\"", "1"),
            (stream, "\"stream\"", "false"),
            (n, "\"n\"", "1"),
        ] {
            if !present {
                put(&mut out, key, value);
            }
        }
        out.push(b'}');
        Bytes::from(out)
    }
}

/// A JSON number above 1, whatever its form (`5`, `5.0`, `1e30`).
fn exceeds_one(text: &str) -> bool {
    text.starts_with(|c: char| c == '-' || c.is_ascii_digit())
        && text.parse::<f64>().is_ok_and(|x| x > 1.0)
}

/// Keys the prefill copy may change or drop.
const REWRITTEN: [&str; 7] = [
    "max_tokens",
    "max_completion_tokens",
    "min_tokens",
    "min_completion_tokens",
    "stream",
    "stream_options",
    "n",
];

/// The prefill copy's contract, for the unit and property tests and the
/// fuzz target (which cannot reach `#[cfg(test)]` code): `Err` tells what
/// `copy` breaks of it for the body `raw`.
#[doc(hidden)]
pub fn check_prefill_copy(raw: &[u8], copy: &[u8]) -> Result<(), String> {
    type Members = Vec<(String, String, String)>;
    fn members(body: &[u8]) -> Result<Members, String> {
        let body = std::str::from_utf8(body).map_err(|e| e.to_string())?;
        let mut all = Vec::new();
        let object = walk(body, |e| {
            all.push((e.name.into_owned(), e.key.to_owned(), e.value.to_owned()))
        })
        .map_err(|e| e.to_string())?;
        object.then_some(all).ok_or_else(|| "not an object".into())
    }
    fn values<'m>(members: &'m Members, name: &str) -> Vec<&'m str> {
        members
            .iter()
            .filter(|m| m.0 == name)
            .map(|m| m.2.as_str())
            .collect()
    }
    fn others(members: &Members) -> Vec<(&str, &str)> {
        members
            .iter()
            .filter(|m| !REWRITTEN.contains(&m.0.as_str()))
            .map(|m| (m.1.as_str(), m.2.as_str()))
            .collect()
    }
    let original = members(raw)?;
    let copied = members(copy).map_err(|e| format!("the copy is not a JSON object: {e}"))?;
    if others(&original) != others(&copied) {
        return Err("other members differ".into());
    }
    for (name, value) in [("max_tokens", "1"), ("stream", "false"), ("n", "1")] {
        let got = values(&copied, name);
        let want = vec![value; values(&original, name).len().max(1)];
        if got != want {
            return Err(format!("{name}: {got:?}, want {want:?}"));
        }
    }
    let completion = values(&copied, "max_completion_tokens");
    if completion != vec!["1"; values(&original, "max_completion_tokens").len()] {
        return Err(format!("max_completion_tokens: {completion:?}"));
    }
    if !values(&copied, "stream_options").is_empty() {
        return Err("stream_options kept".into());
    }
    for name in ["min_tokens", "min_completion_tokens"] {
        let want: Vec<&str> = values(&original, name)
            .into_iter()
            .map(|v| if exceeds_one(v) { "1" } else { v })
            .collect();
        if values(&copied, name) != want {
            return Err(format!(
                "{name}: {:?}, want {want:?}",
                values(&copied, name)
            ));
        }
    }
    for api in [Api::Chat, Api::Completions] {
        if let Ok(asked) = ClientRequest::parse(api, raw) {
            let copy = ClientRequest::parse(api, copy)
                .map_err(|e| format!("the copy is refused for {api:?}: {e}"))?;
            if copy.stream || (copy.prompts, copy.size) != (asked.prompts, asked.size) {
                return Err(format!("the copy reads otherwise: {copy:?}, not {asked:?}"));
            }
        }
    }
    let full = |body| serde_json::from_slice::<serde_json::Value>(body);
    if full(raw).is_ok() {
        full(copy).map_err(|e| format!("serde_json refuses the copy: {e}"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::{json, Value};

    use super::super::tests::{copy_of, parse, parse_raw};
    use super::super::Api;

    #[test]
    fn prefill_copy_asks_for_one_token_without_streaming() {
        let req = parse(
            Api::Chat,
            json!({"model":"m","messages":[],"max_tokens":50,"max_completion_tokens":50,
                   "min_tokens":10,"min_completion_tokens":0,"stream":true,
                   "stream_options":{"include_usage":true},"n":3,"temperature":0.5}),
        );
        assert!(req.stream);
        let copy: Value = serde_json::from_slice(&req.copy).unwrap();
        assert_eq!(
            copy,
            json!({"model":"m","messages":[],"max_tokens":1,"max_completion_tokens":1,
                   "min_tokens":1,"min_completion_tokens":0,"stream":false,"n":1,"temperature":0.5})
        );
    }

    #[test]
    fn prefill_copy_does_not_invent_max_completion_tokens() {
        let req = parse(Api::Chat, json!({"messages":[]}));
        let copy: Value = serde_json::from_slice(&req.copy).unwrap();
        assert_eq!(copy["max_tokens"], 1);
        assert!(copy.get("max_completion_tokens").is_none());
        assert!(!req.stream);
    }

    #[test]
    fn prefill_copy_keeps_numbers_and_order_byte_for_byte() {
        assert_eq!(
            copy_of(
                r#"{"model":"m","seed":218446744073709551616,"temperature":0.30000000000000004,
                "logit_bias":{"z":1,"a":-0.0e-0},"top_p":1.0,"max_tokens":5}"#
            ),
            r#"{"model":"m","seed":218446744073709551616,"temperature":0.30000000000000004,"logit_bias":{"z":1,"a":-0.0e-0},"top_p":1.0,"max_tokens":1,"stream":false,"n":1}"#
        );
        // Whitespace inside values is theirs; between members it goes.
        assert_eq!(
            copy_of("{ \"b\" : [1, 2] ,\n \"a\":{ \"y\" : 1 , \"x\":\"\\u00e9\" } }"),
            r#"{"b":[1, 2],"a":{ "y" : 1 , "x":"\u00e9" },"max_tokens":1,"stream":false,"n":1}"#
        );
    }

    #[test]
    fn prefill_copy_rewrites_every_duplicate_and_escaped_key() {
        assert_eq!(
            copy_of(r#"{"max_tokens":5,"n":2,"max_tokens":7,"stream":true,"stream":false}"#),
            r#"{"max_tokens":1,"n":1,"max_tokens":1,"stream":false,"stream":false}"#
        );
        // vLLM reads `max\u005ftokens` as max_tokens, so it is one.
        let req = parse_raw(
            Api::Chat,
            br#"{"max\u005ftokens":50,"str\u0065am":true,"\u006e":4}"#,
        );
        assert!(req.stream);
        assert_eq!(
            String::from_utf8(req.copy).unwrap(),
            r#"{"max\u005ftokens":1,"str\u0065am":false,"\u006e":1}"#
        );
    }

    #[test]
    fn prefill_copy_drops_stream_options_wherever_they_are() {
        assert_eq!(
            copy_of(r#"{"stream_options":{"include_usage":true}}"#),
            r#"{"max_tokens":1,"stream":false,"n":1}"#
        );
        assert_eq!(
            copy_of(r#"{"a":1,"stream_options":null,"b":2,"stream_options":{}}"#),
            r#"{"a":1,"b":2,"max_tokens":1,"stream":false,"n":1}"#
        );
        assert_eq!(copy_of("{}"), r#"{"max_tokens":1,"stream":false,"n":1}"#);
    }

    #[test]
    fn prefill_copy_clamps_min_tokens_above_one_only() {
        assert_eq!(
            copy_of(
                r#"{"min_tokens":5.0,"min_tokens":1,"min_tokens":"9","min_tokens":-3,"min_completion_tokens":1e3,"min_completion_tokens":0.5}"#
            ),
            r#"{"min_tokens":1,"min_tokens":1,"min_tokens":"9","min_tokens":-3,"min_completion_tokens":1,"min_completion_tokens":0.5,"max_tokens":1,"stream":false,"n":1}"#
        );
    }
}

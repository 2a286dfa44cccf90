//! Property tests of the parser and the prefill copy: on generated and
//! damaged bodies the copy keeps its contract, and where serde_json's tree
//! reads a body the streaming visitors read it the same.

use proptest::prelude::*;
use serde_json::Value;

use super::{check_prefill_copy, Api, ClientRequest};
use crate::tokens::PromptSize;

/// The Value-based measures this module had before it stopped
/// building trees: what the streaming visitors must still compute.
fn reference(api: Api, body: &Value) -> Option<(bool, usize, PromptSize)> {
    fn prompt_count(prompt: Option<&Value>) -> usize {
        match prompt {
            Some(Value::Array(items)) if items.iter().all(|i| i.is_number()) => 1,
            Some(Value::Array(items)) => items.len().max(1),
            _ => 1,
        }
    }
    fn chat_size(messages: Option<&Value>) -> PromptSize {
        let mut size = PromptSize {
            single_text: true,
            ..Default::default()
        };
        let Some(Value::Array(messages)) = messages else {
            return size;
        };
        size.messages = messages.len() as u64;
        for message in messages {
            match message.get("content") {
                Some(Value::String(text)) => size.text_bytes += text.len() as u64,
                Some(Value::Array(parts)) => {
                    for part in parts {
                        match part.get("text") {
                            Some(Value::String(text)) => size.text_bytes += text.len() as u64,
                            _ => size.opaque = true,
                        }
                    }
                }
                _ => {}
            }
            if message.get("tool_calls").is_some_and(|v| !v.is_null()) {
                size.opaque = true;
            }
        }
        size
    }
    fn completion_size(prompt: Option<&Value>) -> PromptSize {
        let mut size = PromptSize::default();
        match prompt {
            Some(Value::String(text)) => {
                size.text_bytes = text.len() as u64;
                size.single_text = true;
            }
            Some(Value::Array(items)) if items.iter().all(Value::is_number) => {
                size.token_ids = items.len() as u64;
            }
            Some(Value::Array(items)) => {
                for item in items {
                    let one = completion_size(Some(item));
                    size.text_bytes = size.text_bytes.max(one.text_bytes);
                    size.token_ids = size.token_ids.max(one.token_ids);
                }
            }
            _ => {}
        }
        size
    }
    let body = body.as_object()?;
    let stream = match body.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return None,
    };
    let (prompts, mut size) = match api {
        Api::Chat => (1, chat_size(body.get("messages"))),
        Api::Completions => (
            prompt_count(body.get("prompt")),
            completion_size(body.get("prompt")),
        ),
    };
    size.opaque |= ["tools", "functions"]
        .iter()
        .any(|k| body.get(*k).is_some_and(|v| !v.is_null()));
    Some((stream, prompts, size))
}

fn ws() -> impl Strategy<Value = &'static str> {
    prop_oneof![6 => Just(""), 1 => Just(" "), 1 => Just("\r\n\t ")]
}

fn number() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<i64>().prop_map(|n| n.to_string()),
        "-?(0|[1-9][0-9]{0,40})",
        "-?(0|[1-9][0-9]{0,5})(\\.[0-9]{1,25})?([eE][+-]?[0-9]{1,3})?",
        Just("0.30000000000000004".to_string()),
    ]
}

fn string() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        4 => "[a-z_ é😀]{0,4}",
        1 => prop::sample::select(vec![
            "\\n", "\\\"", "\\\\", "\\/", "\\u00e9", "\\u005f", "\\ud83d\\ude00", "\\u0000",
        ])
        .prop_map(String::from),
    ];
    prop::collection::vec(piece, 0..5).prop_map(|p| format!("\"{}\"", p.concat()))
}

fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => prop::sample::select(vec![
            "max_tokens", "max_completion_tokens", "min_tokens", "min_completion_tokens",
            "stream_options", "n", "model", "seed", "temperature", "tools", "functions",
            "max\\u005ftokens", "\\u006e", "min_tok\\u0065ns", "text", "content",
        ])
        .prop_map(|k| format!("\"{k}\"")),
        1 => string(),
    ]
}

fn object(members: Vec<(&str, String, &str, &str, String)>) -> String {
    let members: Vec<String> = members
        .into_iter()
        .map(|(a, k, b, c, v)| format!("{a}{k}{b}:{c}{v}"))
        .collect();
    format!("{{{}}}", members.join(","))
}

fn array(items: Vec<(&str, String)>) -> String {
    let items: Vec<String> = items.into_iter().map(|(a, v)| format!("{a}{v}")).collect();
    format!("[{}]", items.join(","))
}

fn value() -> impl Strategy<Value = String> {
    let leaf = prop_oneof![
        Just("null".to_string()),
        Just("true".to_string()),
        Just("false".to_string()),
        number(),
        string(),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec((ws(), inner.clone()), 0..6).prop_map(array),
            prop::collection::vec((ws(), key(), ws(), ws(), inner), 0..6).prop_map(object),
        ]
    })
}

/// Completions prompts: texts, token lists, batches of them, and
/// stranger nests.
fn prompt() -> impl Strategy<Value = String> {
    let leaf = prop_oneof![number(), string(), Just("null".to_string())];
    leaf.prop_recursive(3, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec((ws(), inner), 0..6).prop_map(array),
            prop::collection::vec((Just(""), number()), 0..6).prop_map(array),
        ]
    })
}

fn messages() -> impl Strategy<Value = String> {
    let part = prop_oneof![
        string().prop_map(|t| format!(r#"{{"type":"text","text":{t}}}"#)),
        value().prop_map(|t| format!(r#"{{"text":{t},"type":"x"}}"#)),
        Just(r#"{"type":"image_url","image_url":{"url":"data:"}}"#.to_string()),
        value(),
    ];
    let content = prop_oneof![
        string(),
        prop::collection::vec((ws(), part), 0..4).prop_map(array),
        value(),
    ];
    let message = prop_oneof![
        (
            content.clone(),
            prop_oneof![Just("null".to_string()), value()]
        )
            .prop_map(|(c, t)| format!(r#"{{"role":"user","content":{c},"tool_calls":{t}}}"#)),
        content.prop_map(|c| format!(r#"{{"content":{c},"role":"assistant"}}"#)),
        value(),
    ];
    prop_oneof![
        6 => prop::collection::vec((ws(), message), 0..5).prop_map(array),
        1 => value(),
    ]
}

/// Request bodies: any members, and the ones the proxy reads with
/// values of the shapes it reads (and others).
fn body() -> impl Strategy<Value = String> {
    let member = prop_oneof![
        4 => (key(), value()),
        1 => prop::sample::select(vec!["true", "false", "null"])
            .prop_map(|v| ("\"stream\"".to_string(), v.to_string())),
        1 => prompt().prop_map(|v| ("\"prompt\"".to_string(), v)),
        1 => messages().prop_map(|v| ("\"messages\"".to_string(), v)),
    ];
    prop::collection::vec((ws(), member, ws(), ws()), 0..10).prop_map(|members| {
        object(
            members
                .into_iter()
                .map(|(a, (k, v), b, c)| (a, k, b, c, v))
                .collect(),
        )
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn prefill_copy_keeps_all_else(body in body()) {
        let raw = body.as_bytes();
        let value: Option<Value> = serde_json::from_slice(raw).ok();
        for api in [Api::Chat, Api::Completions] {
            let parsed = ClientRequest::parse(api, raw);
            if let Ok(request) = &parsed {
                let copy = request.prefill_body();
                prop_assert_eq!(check_prefill_copy(raw, &copy), Ok(()), "{}", body);
            }
            // Where serde_json's tree reads the body, the visitors
            // read it the same.
            if let Some(value) = &value {
                let want = reference(api, value);
                let got = parsed.ok().map(|r| (r.stream, r.prompts, r.size));
                prop_assert_eq!(got, want, "{}", body);
            }
        }
    }

    #[test]
    fn parse_survives_any_bytes(raw in prop::collection::vec(any::<u8>(), 0..256)) {
        for api in [Api::Chat, Api::Completions] {
            if let Ok(request) = ClientRequest::parse(api, &raw) {
                prop_assert_eq!(check_prefill_copy(&raw, &request.prefill_body()), Ok(()));
            }
        }
    }

    #[test]
    fn parse_survives_damaged_bodies(
        body in body(),
        cuts in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0..3u8), 1..4),
    ) {
        let mut raw = body.into_bytes();
        for (at, byte, how) in cuts {
            let at = at.index(raw.len() + 1);
            match how {
                0 => raw.insert(at, byte),
                1 if at < raw.len() => raw[at] = byte,
                _ => raw.truncate(at),
            }
        }
        for api in [Api::Chat, Api::Completions] {
            if let Ok(request) = ClientRequest::parse(api, &raw) {
                prop_assert_eq!(check_prefill_copy(&raw, &request.prefill_body()), Ok(()));
            }
        }
    }
}

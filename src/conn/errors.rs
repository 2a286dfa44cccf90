//! The answers hyper writes on its own to requests it cannot parse, in
//! the JSON shape of every other error the proxy gives.

use bytes::Bytes;

use crate::error::error_json;

/// hyper's bodiless answer to a request it could not parse, as the JSON
/// answer the proxy gives every other error; `None` for anything else.
pub(super) fn shape_hyper_error(buf: &[u8]) -> Option<Bytes> {
    let (status, message) = if buf.starts_with(b"HTTP/1.1 400 ") {
        (400, "the request could not be parsed as HTTP/1.1")
    } else if buf.starts_with(b"HTTP/1.1 431 ") {
        (431, "the request's headers are too large or too many")
    } else if buf.starts_with(b"HTTP/1.1 414 ") {
        (414, "the request's URI is too long")
    } else {
        return None;
    };
    // Only a whole head with nothing after it, saying it has no body.
    let head_end = buf.windows(4).position(|w| w == b"\r\n\r\n")?;
    if head_end + 4 != buf.len() {
        return None;
    }
    let head = std::str::from_utf8(&buf[..head_end])
        .ok()?
        .to_ascii_lowercase();
    if !head.lines().any(|l| l.trim() == "content-length: 0") {
        return None;
    }
    let (reason, kind) = match status {
        400 => ("Bad Request", "BadRequestError"),
        431 => (
            "Request Header Fields Too Large",
            "RequestHeaderFieldsTooLargeError",
        ),
        _ => ("URI Too Long", "URITooLongError"),
    };
    let body = error_json(message, kind, None, status);
    let mut out = format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(&body);
    Some(Bytes::from(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hypers_bodiless_errors_get_a_json_body() {
        let head = b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\ndate: Fri, 27 Nov 2026 11:00:00 GMT\r\n\r\n";
        let shaped = shape_hyper_error(head).expect("recognised");
        let text = std::str::from_utf8(&shaped).unwrap();
        assert!(text.starts_with("HTTP/1.1 431 "), "{text}");
        let (_, body) = text.split_once("\r\n\r\n").unwrap();
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["error"]["code"], 431);
        assert!(text.contains(&format!("content-length: {}\r\n", body.len())));
        // The proxy's own answers have bodies and are left alone.
        assert!(
            shape_hyper_error(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 12\r\n\r\n").is_none()
        );
        assert!(
            shape_hyper_error(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\nx").is_none()
        );
        assert!(shape_hyper_error(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n").is_none());
    }
}

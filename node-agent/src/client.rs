//! A minimal HTTP/1.1 client for `modelcache-agent request` (the chart's
//! `helm test`): plain `http://` only, one request per connection, so the
//! image needs no HTTP library and no TLS stack for an in-cluster call.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{0:?} is not an http://HOST:PORT URL")]
    Url(String),
    #[error("connecting to {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("talking to {addr}: {source}")]
    Io {
        addr: String,
        source: std::io::Error,
    },
    #[error("malformed HTTP reply from {0}")]
    Reply(String),
}

/// POSTs `body` as JSON to `base` + `path`; returns the status and the body.
pub fn post_json(
    base: &str,
    path: &str,
    body: &serde_json::Value,
    token: Option<&str>,
) -> Result<(u16, Vec<u8>), ClientError> {
    let addr = base
        .strip_prefix("http://")
        .map(|r| r.trim_end_matches('/'))
        .filter(|a| !a.is_empty() && !a.contains('/'))
        .ok_or_else(|| ClientError::Url(base.to_string()))?
        .to_string();
    let io = |source| ClientError::Io {
        addr: addr.clone(),
        source,
    };
    let mut s = TcpStream::connect(&addr).map_err(|source| ClientError::Connect {
        addr: addr.clone(),
        source,
    })?;
    // A generation on a cold model can take minutes.
    s.set_read_timeout(Some(Duration::from_secs(600)))
        .map_err(io)?;
    let payload = body.to_string();
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\n{auth}Content-Length: {}\r\n\r\n",
        payload.len()
    );
    s.write_all(head.as_bytes()).map_err(io)?;
    s.write_all(payload.as_bytes()).map_err(io)?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).map_err(io)?;
    parse_reply(&raw).ok_or(ClientError::Reply(addr))
}

/// Status and body of an HTTP/1.1 reply (Content-Length, chunked, or to EOF).
fn parse_reply(raw: &[u8]) -> Option<(u16, Vec<u8>)> {
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&raw[..end]).ok()?;
    let status: u16 = head.split(' ').nth(1)?.parse().ok()?;
    let body = &raw[end + 4..];
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    if !chunked {
        return Some((status, body.to_vec()));
    }
    let (mut out, mut rest) = (Vec::new(), body);
    loop {
        let line_end = rest.windows(2).position(|w| w == b"\r\n")?;
        let size_text = std::str::from_utf8(&rest[..line_end]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        rest = &rest[line_end + 2..];
        if size == 0 {
            return Some((status, out));
        }
        out.extend_from_slice(rest.get(..size)?);
        rest = rest.get(size + 2..)?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_plain_and_chunked_replies() {
        let plain = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}";
        assert_eq!(parse_reply(plain), Some((200, b"{}".to_vec())));
        let chunked = b"HTTP/1.1 429 Too Many Requests\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n";
        assert_eq!(parse_reply(chunked), Some((429, b"abcde".to_vec())));
        assert_eq!(parse_reply(b"garbage"), None);
    }

    #[test]
    fn only_plain_http_urls() {
        let body = serde_json::json!({});
        for bad in ["https://x:1", "x:1", "http://", "http://a/b"] {
            assert!(
                matches!(post_json(bad, "/", &body, None), Err(ClientError::Url(_))),
                "{bad}"
            );
        }
    }
}

//! One HTTP/1.1 request over a fresh connection (`Connection: close`), read
//! to the end, with `Transfer-Encoding: chunked` undone. Enough to talk to
//! the exporter; no keep-alive, no TLS, no redirects.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

/// A response as read off the wire.
#[derive(Debug, Clone, Default)]
pub struct Response {
    /// The status code.
    pub status: u16,
    /// Header names lower-cased; a repeated header keeps its last value.
    pub headers: HashMap<String, String>,
    /// The body, de-chunked but not decompressed.
    pub body: Vec<u8>,
}

impl Response {
    /// The body as text (lossy).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

fn invalid(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_owned())
}

/// Sends `method path` to `addr` with extra `headers` and reads the whole
/// response. `timeout` bounds every read and write.
pub fn request(
    addr: impl ToSocketAddrs,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    timeout: Duration,
) -> io::Result<Response> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("Content-Length: 0\r\n\r\n");
    s.write_all(req.as_bytes())?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    parse(raw)
}

/// A GET of `path`.
pub fn get(addr: impl ToSocketAddrs, path: &str, timeout: Duration) -> io::Result<Response> {
    request(addr, "GET", path, &[], timeout)
}

/// Splits a raw response into status, headers and (de-chunked) body.
pub fn parse(mut raw: Vec<u8>) -> io::Result<Response> {
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").ok_or_else(|| invalid("no end of the header"))?;
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| invalid("no status line"))?;
    let headers: HashMap<String, String> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let mut body = raw.split_off(split + 4);
    if headers.get("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        body = dechunk(&body)?;
    }
    Ok(Response { status, headers, body })
}

/// Joins the chunks of a `Transfer-Encoding: chunked` body.
pub fn dechunk(mut b: &[u8]) -> io::Result<Vec<u8>> {
    let mut out = Vec::with_capacity(b.len());
    loop {
        let nl = b.windows(2).position(|w| w == b"\r\n").ok_or_else(|| invalid("bad chunk"))?;
        let size_text = std::str::from_utf8(&b[..nl]).map_err(|_| invalid("bad chunk size"))?;
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|_| invalid("bad chunk size"))?;
        if size == 0 {
            return Ok(out);
        }
        let start = nl + 2;
        let end = start.checked_add(size).ok_or_else(|| invalid("bad chunk size"))?;
        out.extend_from_slice(b.get(start..end).ok_or_else(|| invalid("short chunk"))?);
        b = b.get(end + 2..).ok_or_else(|| invalid("short chunk"))?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_chunked_responses() {
        let raw =
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-A: b\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n"
                .to_vec();
        let r = parse(raw).unwrap();
        assert_eq!((r.status, r.body.as_slice(), r.headers["x-a"].as_str()), (200, &b"abcde"[..], "b"));
        assert!(parse(b"garbage".to_vec()).is_err());
        assert!(dechunk(b"zz\r\n").is_err());
    }
}

//! HTTP/1.1 on the wire, without I/O: a request head written out, a response head read in with
//! how its body is framed, and the body decoded from bytes as they arrive.
//!
//! For clients that send requests without a body (no `Upgrade`, no `CONNECT`) and read one
//! response per request. The response's framing follows RFC 9112 §6.3 as hyper's client does:
//! no body after `HEAD`, `204` or `304`; `Transfer-Encoding` ending in `chunked` is chunked (any
//! other transfer coding reads to the close); then `Content-Length` (every value must agree);
//! else the body ends when the server closes. Informational responses (`100`, `102`-`199`) are
//! skipped; a `101` is an error, since the request asked for no upgrade. Limits are hyper's:
//! [`MAX_HEAD`] bytes (or fewer, the caller's: [`parse_response_head_within`]) and
//! [`MAX_HEADERS`] fields per head. Bad bytes are an [`Error`], never a panic.

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Response, StatusCode, Version};

/// The longest response head accepted unless the caller says otherwise (hyper's default read
/// buffer limit).
pub const MAX_HEAD: usize = 8192 + 4096 * 100;
/// The most header fields accepted in a response head (hyper's default).
pub const MAX_HEADERS: usize = 100;
/// The longest chunk-size line accepted, extensions included.
pub const MAX_CHUNK_LINE: usize = 4096;
/// The longest trailer section accepted.
pub const MAX_TRAILERS: usize = 16 * 1024;

/// What was wrong with a response.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("malformed response head: {0}")]
    Head(httparse::Error),
    #[error("response head longer than {0} bytes")]
    HeadTooLong(usize),
    #[error("status code {0} out of range")]
    Status(u16),
    #[error("malformed or conflicting content-length")]
    ContentLength,
    #[error("transfer-encoding in an HTTP/1.0 response")]
    TransferEncodingOnHttp10,
    #[error("101 switching protocols to a request that asked for no upgrade")]
    UnaskedUpgrade,
    #[error("malformed chunked body: {0}")]
    Chunk(&'static str),
    #[error("malformed trailers")]
    Trailers,
    #[error("the connection closed before the end of the body")]
    Truncated,
}

/// Writes the head of a bodiless request: `METHOD target HTTP/1.1`, every field of `headers`
/// (names in their lowercase form, as hyper writes them), and the empty line. `target` is the
/// origin form (`/path?query`), already valid (`http::uri::PathAndQuery` is).
pub fn write_request_head(out: &mut Vec<u8>, method: &Method, target: &str, headers: &HeaderMap) {
    let fields: usize = headers
        .iter()
        .map(|(n, v)| n.as_str().len() + v.len() + 4)
        .sum();
    out.reserve(method.as_str().len() + target.len() + 13 + fields + 2);
    out.extend_from_slice(method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in headers {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// How a response's body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body (`HEAD`, `204`, `304`).
    Empty,
    /// Exactly this many bytes.
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
    /// Until the server closes the connection.
    UntilClose,
}

/// A response head, parsed.
#[derive(Debug)]
pub struct ResponseHead {
    /// Status, version and header fields; the body is framed by [`framing`](Self::framing).
    pub response: Response<()>,
    pub framing: Framing,
    /// Whether the connection may carry another request once this response has been read to its
    /// end: HTTP/1.1 without `Connection: close`, or HTTP/1.0 with `Connection: keep-alive`, and
    /// a body that does not end with the connection.
    pub keep_alive: bool,
}

/// Parses the response head at the start of `buf`, answering `method`, and removes it from `buf`
/// (with any informational responses before it). `Ok(None)`: the head is not complete yet; read
/// more and call again. At most [`MAX_HEAD`] bytes.
pub fn parse_response_head(
    buf: &mut BytesMut,
    method: &Method,
) -> Result<Option<ResponseHead>, Error> {
    parse_response_head_within(buf, method, MAX_HEAD)
}

/// [`parse_response_head`] with a head of at most `max_head` bytes (status line and fields, each
/// informational response counted alone): a longer one is [`Error::HeadTooLong`], as soon as
/// `buf` holds more than that without its end.
pub fn parse_response_head_within(
    buf: &mut BytesMut,
    method: &Method,
    max_head: usize,
) -> Result<Option<ResponseHead>, Error> {
    loop {
        let mut slots = [const { std::mem::MaybeUninit::uninit() }; MAX_HEADERS];
        let mut parsed = httparse::Response::new(&mut []);
        let len = match httparse::ParserConfig::default().parse_response_with_uninit_headers(
            &mut parsed,
            buf,
            &mut slots,
        ) {
            Ok(httparse::Status::Complete(len)) if len <= max_head => len,
            Ok(httparse::Status::Partial) if buf.len() <= max_head => return Ok(None),
            Ok(_) => return Err(Error::HeadTooLong(max_head)),
            Err(e) => return Err(Error::Head(e)),
        };
        let code = parsed.code.unwrap_or(0);
        let status = StatusCode::from_u16(code).map_err(|_| Error::Status(code))?;
        if status.is_informational() && status != StatusCode::SWITCHING_PROTOCOLS {
            buf.advance(len);
            if buf.is_empty() {
                return Ok(None);
            }
            continue;
        }
        if status == StatusCode::SWITCHING_PROTOCOLS {
            return Err(Error::UnaskedUpgrade);
        }
        let http11 = parsed.version == Some(1);
        // Kept only when it is not the usual one, as hyper's client does (its HTTP/1.1 server
        // writes it back).
        let reason = parsed
            .reason
            .filter(|r| Some(*r) != status.canonical_reason())
            .and_then(|r| hyper::ext::ReasonPhrase::try_from(r.as_bytes()).ok());
        // Names now, values as slices of the head once it is split off (no copy per value).
        let base = buf.as_ptr().addr();
        let mut fields = Vec::with_capacity(parsed.headers.len());
        for h in parsed.headers.iter() {
            let name = HeaderName::from_bytes(h.name.as_bytes())
                .map_err(|_| Error::Head(httparse::Error::HeaderName))?;
            let start = h.value.as_ptr().addr().wrapping_sub(base);
            fields.push((name, start, start + h.value.len()));
        }
        let head = buf.split_to(len).freeze();
        let mut headers = HeaderMap::with_capacity(fields.len());
        for (name, start, end) in fields {
            let value = head
                .get(start..end)
                .map(|_| head.slice(start..end))
                .and_then(|v| HeaderValue::from_maybe_shared(v).ok())
                .ok_or(Error::Head(httparse::Error::HeaderValue))?;
            headers.append(name, value);
        }
        let framing = framing(status, method, http11, &headers)?;
        // Both framings at once (RFC 9112 6.3): the body is framed by the transfer coding, the
        // length goes before the response is passed on (it would frame it again, wrongly, for
        // whoever reads it next), and the connection is not used again: the sender is broken or
        // lying about where its messages end.
        let smuggling = headers.contains_key(header::TRANSFER_ENCODING)
            && headers.remove(header::CONTENT_LENGTH).is_some();
        let keep_alive =
            keep_alive(http11, &headers) && framing != Framing::UntilClose && !smuggling;
        let mut response = Response::new(());
        *response.status_mut() = status;
        *response.version_mut() = if http11 {
            Version::HTTP_11
        } else {
            Version::HTTP_10
        };
        *response.headers_mut() = headers;
        if let Some(reason) = reason {
            response.extensions_mut().insert(reason);
        }
        return Ok(Some(ResponseHead {
            response,
            framing,
            keep_alive,
        }));
    }
}

fn framing(
    status: StatusCode,
    method: &Method,
    http11: bool,
    headers: &HeaderMap,
) -> Result<Framing, Error> {
    if status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
        || method == Method::HEAD
    {
        return Ok(Framing::Empty);
    }
    if let Some(last) = headers
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .next_back()
    {
        if !http11 {
            return Err(Error::TransferEncodingOnHttp10);
        }
        let chunked = last
            .as_bytes()
            .rsplit(|&b| b == b',')
            .next()
            .is_some_and(|coding| coding.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        return Ok(if chunked {
            Framing::Chunked
        } else {
            Framing::UntilClose
        });
    }
    let mut length = None;
    for value in headers.get_all(header::CONTENT_LENGTH) {
        for item in value.as_bytes().split(|&b| b == b',') {
            let n = parse_decimal(item.trim_ascii()).ok_or(Error::ContentLength)?;
            if length.is_some_and(|l| l != n) {
                return Err(Error::ContentLength);
            }
            length = Some(n);
        }
    }
    Ok(length.map_or(Framing::UntilClose, Framing::Length))
}

fn parse_decimal(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() || digits.len() > 19 {
        return None;
    }
    digits.iter().try_fold(0u64, |n, &d| {
        d.is_ascii_digit().then(|| n * 10 + u64::from(d - b'0'))
    })
}

fn keep_alive(http11: bool, headers: &HeaderMap) -> bool {
    let mut close = false;
    let mut keep = false;
    for value in headers.get_all(header::CONNECTION) {
        for token in value.as_bytes().split(|&b| b == b',') {
            let token = token.trim_ascii();
            close |= token.eq_ignore_ascii_case(b"close");
            keep |= token.eq_ignore_ascii_case(b"keep-alive");
        }
    }
    !close && (http11 || keep)
}

/// One step of a body being decoded.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    Data(Bytes),
    /// A chunked body's trailer fields (never empty), just before its end.
    Trailers(HeaderMap),
    /// The body is complete.
    End,
    /// More bytes are needed.
    NeedMore,
}

/// Decodes one response body from a buffer that the caller fills from the connection. Leaves in
/// the buffer whatever follows the body.
#[derive(Debug)]
pub struct BodyDecoder {
    state: State,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Length(u64),
    ChunkSize,
    ChunkData(u64),
    ChunkEnd,
    Trailers,
    UntilClose,
    Done,
}

impl BodyDecoder {
    pub fn new(framing: Framing) -> Self {
        let state = match framing {
            Framing::Empty | Framing::Length(0) => State::Done,
            Framing::Length(n) => State::Length(n),
            Framing::Chunked => State::ChunkSize,
            Framing::UntilClose => State::UntilClose,
        };
        Self { state }
    }

    /// Whether the body has been read to its end.
    pub fn is_end(&self) -> bool {
        self.state == State::Done
    }

    /// The bytes of body left, when the framing says.
    pub fn remaining(&self) -> Option<u64> {
        match self.state {
            State::Length(n) => Some(n),
            State::Done => Some(0),
            _ => None,
        }
    }

    /// The next step, from the bytes in `buf` (consumed as they are decoded).
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Decoded, Error> {
        loop {
            match self.state {
                State::Done => return Ok(Decoded::End),
                State::Length(n) | State::ChunkData(n) => {
                    if buf.is_empty() {
                        return Ok(Decoded::NeedMore);
                    }
                    let take = usize::try_from(n).unwrap_or(usize::MAX).min(buf.len());
                    let left = n - take as u64;
                    self.state = match self.state {
                        State::Length(_) if left == 0 => State::Done,
                        State::Length(_) => State::Length(left),
                        _ if left == 0 => State::ChunkEnd,
                        _ => State::ChunkData(left),
                    };
                    return Ok(Decoded::Data(buf.split_to(take).freeze()));
                }
                State::UntilClose => {
                    if buf.is_empty() {
                        return Ok(Decoded::NeedMore);
                    }
                    return Ok(Decoded::Data(buf.split().freeze()));
                }
                State::ChunkSize => {
                    let window = &buf[..buf.len().min(MAX_CHUNK_LINE)];
                    let Some(lf) = window.iter().position(|&b| b == b'\n') else {
                        if buf.len() >= MAX_CHUNK_LINE {
                            return Err(Error::Chunk("chunk-size line too long"));
                        }
                        return Ok(Decoded::NeedMore);
                    };
                    let size = chunk_size(&buf[..=lf])?;
                    buf.advance(lf + 1);
                    self.state = if size == 0 {
                        State::Trailers
                    } else {
                        State::ChunkData(size)
                    };
                }
                State::ChunkEnd => {
                    if buf.len() < 2 {
                        return Ok(Decoded::NeedMore);
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err(Error::Chunk("chunk data not followed by CRLF"));
                    }
                    buf.advance(2);
                    self.state = State::ChunkSize;
                }
                State::Trailers => {
                    if buf.len() < 2 {
                        return Ok(Decoded::NeedMore);
                    }
                    if &buf[..2] == b"\r\n" {
                        buf.advance(2);
                        self.state = State::Done;
                        return Ok(Decoded::End);
                    }
                    let window = &buf[..buf.len().min(MAX_TRAILERS)];
                    let Some(end) = window.windows(4).position(|w| w == b"\r\n\r\n") else {
                        if buf.len() >= MAX_TRAILERS {
                            return Err(Error::Trailers);
                        }
                        return Ok(Decoded::NeedMore);
                    };
                    let trailers = trailers(&buf[..end + 4])?;
                    buf.advance(end + 4);
                    self.state = State::Done;
                    if !trailers.is_empty() {
                        return Ok(Decoded::Trailers(trailers));
                    }
                }
            }
        }
    }

    /// The connection has closed: the end of a body read until the close, or a truncated body.
    /// Call once [`decode`](Self::decode) needs more.
    pub fn eof(&mut self) -> Result<Decoded, Error> {
        match self.state {
            State::Done | State::UntilClose => {
                self.state = State::Done;
                Ok(Decoded::End)
            }
            _ => Err(Error::Truncated),
        }
    }
}

/// The size on a chunk-size line (`1a;ext=v\r\n`): hex digits, optional whitespace, optional
/// extensions, CRLF.
fn chunk_size(line: &[u8]) -> Result<u64, Error> {
    let Some(line) = line.strip_suffix(b"\r\n") else {
        return Err(Error::Chunk("chunk-size line not ended by CRLF"));
    };
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 {
        return Err(Error::Chunk("no chunk size"));
    }
    if digits > 16 {
        return Err(Error::Chunk("chunk size too large"));
    }
    let mut size = 0u64;
    for &d in &line[..digits] {
        // A hex digit, checked above: to_digit cannot fail.
        let v = char::from(d).to_digit(16).unwrap_or(0);
        size = size
            .checked_mul(16)
            .map(|s| s + u64::from(v))
            .ok_or(Error::Chunk("chunk size too large"))?;
    }
    let rest = line[digits..].trim_ascii_start();
    if !(rest.is_empty() || rest[0] == b';') || rest.iter().any(|&b| b == b'\r' || b == 0) {
        return Err(Error::Chunk("bad chunk extension"));
    }
    Ok(size)
}

/// Trailer fields, without those that only framing or the connection may carry. `section` ends at
/// the first CRLF CRLF; the fields must end exactly there (a bare LF, which the parser takes as a
/// line end, would have them end earlier, and the bytes between taken as part of this message).
fn trailers(section: &[u8]) -> Result<HeaderMap, Error> {
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let fields = match httparse::parse_headers(section, &mut slots) {
        Ok(httparse::Status::Complete((used, fields))) if used == section.len() => fields,
        _ => return Err(Error::Trailers),
    };
    let mut map = HeaderMap::new();
    for f in fields.iter() {
        let name = HeaderName::from_bytes(f.name.as_bytes()).map_err(|_| Error::Trailers)?;
        let value = HeaderValue::from_bytes(f.value).map_err(|_| Error::Trailers)?;
        if !matches!(
            name,
            header::CONTENT_LENGTH
                | header::TRANSFER_ENCODING
                | header::CONNECTION
                | header::TE
                | header::TRAILER
                | header::UPGRADE
                | header::HOST
        ) && name != "keep-alive"
        {
            map.append(name, value);
        }
    }
    Ok(map)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(bytes: &str, method: &Method) -> Result<Option<ResponseHead>, Error> {
        parse_response_head(&mut BytesMut::from(bytes), method)
    }

    /// The whole body of `framing` from `wire`, fed `step` bytes at a time; what is left after it.
    fn body(
        framing: Framing,
        wire: &[u8],
        step: usize,
    ) -> Result<(Vec<u8>, HeaderMap, Vec<u8>), Error> {
        let mut decoder = BodyDecoder::new(framing);
        let mut buf = BytesMut::new();
        let (mut data, mut trailers) = (Vec::new(), HeaderMap::new());
        let mut fed = 0;
        loop {
            match decoder.decode(&mut buf)? {
                Decoded::Data(d) => data.extend_from_slice(&d),
                Decoded::Trailers(t) => trailers = t,
                Decoded::End => return Ok((data, trailers, buf.to_vec())),
                Decoded::NeedMore if fed == wire.len() => match decoder.eof()? {
                    Decoded::End => return Ok((data, trailers, Vec::new())),
                    other => panic!("eof gave {other:?}"),
                },
                Decoded::NeedMore => {
                    let next = (fed + step).min(wire.len());
                    buf.extend_from_slice(&wire[fed..next]);
                    fed = next;
                }
            }
        }
    }

    #[test]
    fn a_request_head_is_written_as_hyper_writes_it() {
        let mut headers = HeaderMap::new();
        headers.insert("host", HeaderValue::from_static("app"));
        headers.append("x-two", HeaderValue::from_static("a"));
        headers.append("x-two", HeaderValue::from_static("b"));
        let mut out = Vec::new();
        write_request_head(&mut out, &Method::GET, "/p?q=1", &headers);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "GET /p?q=1 HTTP/1.1\r\nhost: app\r\nx-two: a\r\nx-two: b\r\n\r\n"
        );
    }

    #[test]
    fn a_response_head_is_split_off_with_its_fields() {
        let mut buf = BytesMut::from(
            "HTTP/1.1 200 Fine\r\nContent-Length: 5\r\nX-A: 1\r\nx-a: 2\r\n\r\nhello",
        );
        let h = parse_response_head(&mut buf, &Method::GET)
            .unwrap()
            .unwrap();
        assert_eq!(h.response.status(), StatusCode::OK);
        assert_eq!(h.response.version(), Version::HTTP_11);
        let reason = h.response.extensions().get::<hyper::ext::ReasonPhrase>();
        assert_eq!(reason.unwrap().as_bytes(), b"Fine");
        let a: Vec<_> = h.response.headers().get_all("x-a").iter().collect();
        assert_eq!(a, ["1", "2"]);
        assert_eq!(h.framing, Framing::Length(5));
        assert!(h.keep_alive);
        assert_eq!(&buf[..], b"hello");
    }

    #[test]
    fn an_incomplete_head_asks_for_more_and_consumes_nothing() {
        let mut buf = BytesMut::from("HTTP/1.1 200 OK\r\ncontent-len");
        assert!(
            parse_response_head(&mut buf, &Method::GET)
                .unwrap()
                .is_none()
        );
        assert_eq!(buf.len(), 28);
    }

    #[test]
    fn informational_responses_are_skipped() {
        let mut buf = BytesMut::from(
            "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n",
        );
        let h = parse_response_head(&mut buf, &Method::GET)
            .unwrap()
            .unwrap();
        assert_eq!(h.response.status(), StatusCode::NO_CONTENT);
        assert!(h.response.headers().get("link").is_none());
        assert!(buf.is_empty());
        assert!(
            h.response.extensions().is_empty(),
            "the usual reason is not kept"
        );
        // Only the informational part in so far: consumed, and more is needed.
        let mut buf = BytesMut::from("HTTP/1.1 100 Continue\r\n\r\n");
        assert!(
            parse_response_head(&mut buf, &Method::GET)
                .unwrap()
                .is_none()
        );
        assert!(buf.is_empty());
    }

    #[test]
    fn framing_follows_rfc_9112() {
        struct Case {
            name: &'static str,
            method: Method,
            head: &'static str,
            want: Result<Framing, Error>,
            keep_alive: bool,
        }
        let cases = [
            Case {
                name: "content-length",
                method: Method::GET,
                head: "HTTP/1.1 200 OK\r\ncontent-length: 12\r\n\r\n",
                want: Ok(Framing::Length(12)),
                keep_alive: true,
            },
            Case {
                name: "equal content-lengths, one a list",
                method: Method::GET,
                head: "HTTP/1.1 200 OK\r\ncontent-length: 3, 3\r\ncontent-length: 3\r\n\r\n",
                want: Ok(Framing::Length(3)),
                keep_alive: true,
            },
            Case {
                name: "conflicting content-lengths",
                method: Method::GET,
                head: "HTTP/1.1 200 OK\r\ncontent-length: 3\r\ncontent-length: 4\r\n\r\n",
                want: Err(Error::ContentLength),
                keep_alive: false,
            },
            Case {
                name: "signed content-length",
                method: Method::GET,
                head: "HTTP/1.1 200 OK\r\ncontent-length: +3\r\n\r\n",
                want: Err(Error::ContentLength),
                keep_alive: false,
            },
            Case {
                name: "content-length past u64",
                method: Method::GET,
                head: "HTTP/1.1 200 OK\r\ncontent-length: 99999999999999999999\r\n\r\n",
                want: Err(Error::ContentLength),
                keep_alive: false,
            },
            Case {
                name: "chunked wins over content-length, and the connection ends after",
                method: Method::GET,
                head: "HTTP/1.1 200 OK\r\ncontent-length: 3\r\ntransfer-encoding: gzip, Chunked\r\n\r\n",
                want: Ok(Framing::Chunked),
                keep_alive: false,
            },
            Case {
                name: "a transfer coding not ending in chunked reads to the close",
                method: Method::GET,
                head: "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked, gzip\r\n\r\n",
                want: Ok(Framing::UntilClose),
                keep_alive: false,
            },
            Case {
                name: "transfer-encoding on HTTP/1.0",
                method: Method::GET,
                head: "HTTP/1.0 200 OK\r\ntransfer-encoding: chunked\r\n\r\n",
                want: Err(Error::TransferEncodingOnHttp10),
                keep_alive: false,
            },
            Case {
                name: "no length at all",
                method: Method::GET,
                head: "HTTP/1.1 200 OK\r\n\r\n",
                want: Ok(Framing::UntilClose),
                keep_alive: false,
            },
            Case {
                name: "HEAD has no body whatever the length says",
                method: Method::HEAD,
                head: "HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n",
                want: Ok(Framing::Empty),
                keep_alive: true,
            },
            Case {
                name: "304",
                method: Method::GET,
                head: "HTTP/1.1 304 Not Modified\r\ncontent-length: 100\r\n\r\n",
                want: Ok(Framing::Empty),
                keep_alive: true,
            },
            Case {
                name: "connection close",
                method: Method::GET,
                head: "HTTP/1.1 200 OK\r\ncontent-length: 1\r\nconnection: keep-alive\r\nConnection: Close\r\n\r\n",
                want: Ok(Framing::Length(1)),
                keep_alive: false,
            },
            Case {
                name: "HTTP/1.0 closes unless told otherwise",
                method: Method::GET,
                head: "HTTP/1.0 200 OK\r\ncontent-length: 1\r\n\r\n",
                want: Ok(Framing::Length(1)),
                keep_alive: false,
            },
            Case {
                name: "HTTP/1.0 with keep-alive",
                method: Method::GET,
                head: "HTTP/1.0 200 OK\r\ncontent-length: 1\r\nconnection: keep-alive\r\n\r\n",
                want: Ok(Framing::Length(1)),
                keep_alive: true,
            },
            Case {
                name: "101 unasked",
                method: Method::GET,
                head: "HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\n\r\n",
                want: Err(Error::UnaskedUpgrade),
                keep_alive: false,
            },
        ];
        for case in cases {
            let got = head(case.head, &case.method).map(|h| h.unwrap());
            assert_eq!(
                got.as_ref().map(|h| h.framing).map_err(Clone::clone),
                case.want,
                "{}",
                case.name
            );
            if let Ok(h) = got {
                assert_eq!(h.keep_alive, case.keep_alive, "{}", case.name);
            }
        }
    }

    #[test]
    fn a_content_length_beside_a_transfer_coding_is_not_passed_on() {
        for te in ["chunked", "gzip, chunked", "gzip"] {
            let raw = format!(
                "HTTP/1.1 200 OK\r\ncontent-length: 3\r\ntransfer-encoding: {te}\r\nx-a: 1\r\n\r\n"
            );
            let parsed = head(&raw, &Method::GET).unwrap().unwrap();
            let headers = parsed.response.headers();
            assert!(!headers.contains_key(header::CONTENT_LENGTH), "{te}");
            assert_eq!(headers[header::TRANSFER_ENCODING], te, "{te}");
            assert_eq!(headers["x-a"], "1", "{te}");
            assert!(!parsed.keep_alive, "{te}");
        }
        let parsed = head("HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\n", &Method::GET)
            .unwrap()
            .unwrap();
        assert_eq!(parsed.response.headers()[header::CONTENT_LENGTH], "3");
        assert!(parsed.keep_alive);
    }

    #[test]
    fn bad_heads_are_errors() {
        for bad in [
            "HTTP/1.1 200 OK\r\nbad header\r\n\r\n",
            "HTTP/1.1 2000 OK\r\n\r\n",
            "HTTP/1.1 099 Low\r\n\r\n",
            "HTTP/2 200 OK\r\n\r\n",
            "garbage\r\n\r\n",
            "HTTP/1.1 200 OK\r\nx: a\rb\r\n\r\n",
        ] {
            assert!(head(bad, &Method::GET).is_err(), "{bad:?}");
        }
        let many: String = (0..=MAX_HEADERS).map(|i| format!("x-{i}: v\r\n")).collect();
        let too_many = format!("HTTP/1.1 200 OK\r\n{many}\r\n");
        assert!(head(&too_many, &Method::GET).is_err());
        let long = format!("HTTP/1.1 200 OK\r\nx: {}", "a".repeat(MAX_HEAD));
        assert_eq!(
            head(&long, &Method::GET).unwrap_err(),
            Error::HeadTooLong(MAX_HEAD)
        );
    }

    /// A caller's lower limit holds for a complete head and for a partial one, not only
    /// [`MAX_HEAD`]: the outbound's pooled HTTP/1.1 path enforces `--max-header-bytes` with it.
    #[test]
    fn a_head_over_the_callers_limit_is_an_error() {
        let max = 16 * 1024;
        let at = |value: usize| format!("HTTP/1.1 200 OK\r\nx: {}\r\n\r\n", "a".repeat(value));
        // 20 bytes of status line and field name, 4 of line ends: exactly `max` bytes passes.
        let fits = at(max - 24);
        assert_eq!(fits.len(), max);
        let mut buf = BytesMut::from(fits.as_str());
        assert!(matches!(
            parse_response_head_within(&mut buf, &Method::GET, max),
            Ok(Some(_))
        ));
        for over in [at(max - 23), at(100 * 1024)] {
            let mut buf = BytesMut::from(over.as_str());
            assert_eq!(
                parse_response_head_within(&mut buf, &Method::GET, max).unwrap_err(),
                Error::HeadTooLong(max),
                "{} bytes",
                over.len()
            );
        }
        // Incomplete and past the limit already: an error without waiting for the rest.
        let mut partial = BytesMut::from(&at(100 * 1024).as_bytes()[..=max]);
        assert_eq!(
            parse_response_head_within(&mut partial, &Method::GET, max).unwrap_err(),
            Error::HeadTooLong(max)
        );
        // The same 100 KiB head within the default limit.
        assert!(head(&at(100 * 1024), &Method::GET).unwrap().is_some());
    }

    #[test]
    fn a_length_body_leaves_what_follows_it() {
        for step in [1, 3, 100] {
            let (data, _, rest) = body(Framing::Length(5), b"helloHTTP/1.1", step).unwrap();
            assert_eq!(data, b"hello");
            assert_eq!(&rest[..], &b"HTTP/1.1"[..rest.len()], "step {step}");
        }
        assert_eq!(body(Framing::Length(5), b"hel", 2), Err(Error::Truncated));
        assert_eq!(body(Framing::Empty, b"", 1).unwrap().0, b"");
    }

    #[test]
    fn a_chunked_body_with_extensions_and_trailers() {
        let wire = b"5;name=v\r\nhello\r\n6 \r\n world\r\n0\r\ngrpc-status: 0\r\nContent-Length: 9\r\n\r\nnext";
        for step in [1, 2, 7, 1000] {
            let (data, trailers, rest) = body(Framing::Chunked, wire, step).unwrap();
            assert_eq!(data, b"hello world", "step {step}");
            assert_eq!(trailers.get("grpc-status").unwrap(), "0");
            assert!(trailers.get("content-length").is_none());
            assert_eq!(&rest[..], &b"next"[..rest.len()]);
        }
        let (data, trailers, _) = body(Framing::Chunked, b"3\r\nabc\r\n0\r\n\r\n", 1).unwrap();
        assert_eq!(data, b"abc");
        assert!(trailers.is_empty());
    }

    #[test]
    fn bad_chunked_bodies_are_errors() {
        use Error::{Chunk, Trailers, Truncated};
        let many: String = (0..=MAX_HEADERS).map(|i| format!("x-{i}: v\r\n")).collect();
        let too_many = format!("0\r\n{many}\r\n");
        let too_long = format!("0\r\nx: {}\r\n\r\n", "v".repeat(MAX_TRAILERS));
        let long_line = format!("1;{}\r\n", "e".repeat(MAX_CHUNK_LINE));
        for (wire, want) in [
            (&b"x\r\nabc\r\n0\r\n\r\n"[..], Chunk("no chunk size")),
            (
                b"3\nabc\r\n0\r\n\r\n",
                Chunk("chunk-size line not ended by CRLF"),
            ),
            (
                b"3\r\nabcd\r\n0\r\n\r\n",
                Chunk("chunk data not followed by CRLF"),
            ),
            (b"11111111111111111\r\n", Chunk("chunk size too large")),
            (b"3 x\r\nabc\r\n0\r\n\r\n", Chunk("bad chunk extension")),
            (b"3;a\rb\r\nabc\r\n0\r\n\r\n", Chunk("bad chunk extension")),
            (b"0\r\nbad trailer\r\n\r\n", Trailers),
            // Fields ended by bare LFs before the CRLF CRLF: what lies between is not trailers.
            (
                b"0\r\nx: y\n\nHTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n",
                Trailers,
            ),
            (too_many.as_bytes(), Trailers),
            (too_long.as_bytes(), Trailers),
            (long_line.as_bytes(), Chunk("chunk-size line too long")),
            (b"3\r\nabc\r\n", Truncated),
        ] {
            // Fed in large steps too: each limit holds without waiting for the end of the input.
            for step in [1, 4096] {
                let got = body(Framing::Chunked, wire, step);
                assert_eq!(
                    got.err(),
                    Some(want.clone()),
                    "{:?}",
                    String::from_utf8_lossy(&wire[..wire.len().min(40)])
                );
            }
        }
        let huge = "ffffffffffffffff\r\n";
        let mut decoder = BodyDecoder::new(Framing::Chunked);
        let mut buf = BytesMut::from(huge);
        assert_eq!(decoder.decode(&mut buf), Ok(Decoded::NeedMore));
    }

    #[test]
    fn a_body_read_until_the_close_ends_at_the_close() {
        let (data, _, _) = body(Framing::UntilClose, b"all of it", 4).unwrap();
        assert_eq!(data, b"all of it");
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        // A small deterministic generator: every byte value, at every position, in every state.
        let mut x: u32 = 0x9e37_79b9;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x
        };
        let alphabet = b"HTP/1.0 2\r\n:;acefhnkdx-";
        for _ in 0..20_000 {
            let len = (next() % 64) as usize;
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    let r = next();
                    if r % 4 == 0 {
                        (r >> 8) as u8
                    } else {
                        alphabet[(r as usize >> 8) % alphabet.len()]
                    }
                })
                .collect();
            let mut buf = BytesMut::from(&b"HTTP/1.1 200 OK\r\n"[..]);
            buf.extend_from_slice(&bytes);
            let _ = parse_response_head(&mut buf, &Method::GET);
            for framing in [Framing::Chunked, Framing::Length(7), Framing::UntilClose] {
                let _ = body(framing, &bytes, 1 + (next() % 5) as usize);
            }
        }
    }
}

//! Lets gRPC clients built on gRPC C-core and grpc-java (py-spiffe, java-spiffe, grpcio) call the
//! Workload API over its unix socket.
//!
//! Those clients send the socket's path, percent-encoded, as the HTTP/2 `:authority`
//! (`run%2Fspiffe%2Fapi.sock`). The HTTP/2 server under tonic (the `h2` crate) accepts only an
//! RFC 3986 authority without `%` and resets every such stream with `PROTOCOL_ERROR`. Go clients
//! send `localhost` and are not affected.
//!
//! So every connection to the socket goes through [`pump`]: bytes from the server pass unchanged;
//! bytes from the client are read frame by frame, and each header block (a `HEADERS` frame and its
//! `CONTINUATION`s) is decoded with the client's HPACK state and sent on re-encoded as literals
//! that the server's decoder never indexes, with an `:authority` the server would refuse replaced by
//! `localhost`. The authority names nothing on a unix socket (the caller is whoever can open the
//! socket), so nothing is lost. Every other frame passes unchanged. A malformed frame sequence or
//! header block, or a header list that decodes to more than [`MAX_HEADER_LIST`], ends the
//! connection.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream, ReadBuf};

const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// The largest frame the server accepts (HTTP/2's default `SETTINGS_MAX_FRAME_SIZE`).
const MAX_FRAME: usize = 16_384;
/// The largest header block (all its frames) taken from a client.
const MAX_HEADER_BLOCK: usize = 64 * 1024;
/// The dynamic table size the server's (default) settings let the client's encoder use.
const TABLE_SIZE: usize = 4096;
/// The largest header list taken from a client, decoded: name and value bytes plus 32 per field,
/// as HTTP/2's `SETTINGS_MAX_HEADER_LIST_SIZE` counts. [`super::serve`] gives the server the same
/// limit (hyper's default), so nothing it would take is refused here. HPACK lets a 64 KiB block
/// decode to hundreds of megabytes (one-byte references to a 4 KB dynamic table entry): the
/// decoding stops copying at this limit and the connection is closed. The 32 per field also
/// bounds the number of fields (512).
pub(super) const MAX_HEADER_LIST: u32 = 16 * 1024;

/// The server's end of a connection: what tonic serves, with the connection's open calls.
pub(super) struct Piped(pub(super) DuplexStream, pub(super) super::idle::Activity);

impl tonic::transport::server::Connected for Piped {
    type ConnectInfo = super::idle::Activity;
    fn connect_info(&self) -> super::idle::Activity {
        self.1.clone()
    }
}

impl AsyncRead for Piped {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for Piped {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// Carries one client connection to the server end `server` until either side closes.
pub(super) async fn pump<C>(client: C, server: DuplexStream, on_call: &(dyn Fn() + Sync))
where
    C: AsyncRead + AsyncWrite + Send,
{
    let (client_read, mut client_write) = tokio::io::split(client);
    let (mut server_read, server_write) = tokio::io::split(server);
    let up = rewrite(client_read, server_write, on_call);
    let down = async {
        let _ = tokio::io::copy(&mut server_read, &mut client_write).await;
        let _ = client_write.shutdown().await;
    };
    tokio::pin!(up, down);
    tokio::select! {
        r = &mut up => match r {
            // The client finished sending: let the server finish answering.
            Ok(()) => down.await,
            Err(error) => tracing::debug!(%error, "workload API connection closed: bad HTTP/2 from the client"),
        },
        () = &mut down => {}
    }
}

/// Copies client bytes to the server, re-encoding header blocks (see the module doc).
/// `on_call` is told of every header block passed on (a call, or a call's trailers).
async fn rewrite<R, W>(mut from: R, mut to: W, on_call: &(dyn Fn() + Sync)) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut preface = [0u8; 24];
    from.read_exact(&mut preface).await?;
    to.write_all(&preface).await?;
    if &preface != PREFACE {
        // Not HTTP/2 with prior knowledge: the server answers that itself.
        tokio::io::copy(&mut from, &mut to).await?;
        return to.shutdown().await;
    }
    let mut decoder = loona_hpack::Decoder::new();
    decoder.set_max_allowed_table_size(TABLE_SIZE);
    // A header block being collected: its stream, END_STREAM, and its fragments so far.
    let mut block: Option<(u32, u8, Vec<u8>)> = None;
    loop {
        let mut head = [0u8; 9];
        match from.read_exact(&mut head).await {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                return to.shutdown().await;
            }
            Err(e) => return Err(e),
        }
        let len = usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]);
        let (kind, flags) = (head[3], head[4]);
        let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
        if len > MAX_FRAME {
            return Err(bad("a frame larger than the server's maximum"));
        }
        let mut payload = vec![0u8; len];
        from.read_exact(&mut payload).await?;
        match (kind, block.as_mut()) {
            (HEADERS, None) => {
                let fragment = header_fragment(flags, &payload)?;
                if flags & END_HEADERS != 0 {
                    let out = reencode(&mut decoder, fragment)?;
                    write_block(&mut to, stream, flags & END_STREAM, &out).await?;
                    on_call();
                } else {
                    block = Some((stream, flags & END_STREAM, fragment.to_vec()));
                }
            }
            (CONTINUATION, Some((id, _, fragments))) if *id == stream => {
                if fragments.len() + payload.len() > MAX_HEADER_BLOCK {
                    return Err(bad("a header block larger than 64 KiB"));
                }
                fragments.extend_from_slice(&payload);
                if flags & END_HEADERS != 0
                    && let Some((id, end_stream, fragments)) = block.take()
                {
                    let out = reencode(&mut decoder, &fragments)?;
                    write_block(&mut to, id, end_stream, &out).await?;
                    on_call();
                }
            }
            (_, Some(_)) | (CONTINUATION, None) => {
                return Err(bad("a header block interrupted, or a stray CONTINUATION"));
            }
            _ => {
                to.write_all(&head).await?;
                to.write_all(&payload).await?;
            }
        }
    }
}

fn bad(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_owned())
}

/// The header block fragment of a HEADERS frame's payload (padding and priority removed).
fn header_fragment(flags: u8, payload: &[u8]) -> io::Result<&[u8]> {
    let mut start = 0;
    let mut end = payload.len();
    if flags & PADDED != 0 {
        let pad = usize::from(
            *payload
                .first()
                .ok_or_else(|| bad("padding without length"))?,
        );
        start = 1;
        end = end
            .checked_sub(pad)
            .ok_or_else(|| bad("more padding than payload"))?;
    }
    if flags & PRIORITY != 0 {
        start += 5;
    }
    payload
        .get(start..end)
        .ok_or_else(|| bad("a HEADERS frame too short for its flags"))
}

/// Decodes a header block with the client's HPACK state and encodes it again as literals without
/// indexing, replacing an `:authority` the server would refuse. A header list larger than
/// [`MAX_HEADER_LIST`] is an error; the fields past the limit are never copied.
fn reencode(decoder: &mut loona_hpack::Decoder<'_>, block: &[u8]) -> io::Result<Vec<u8>> {
    let limit = MAX_HEADER_LIST as usize;
    // A field is written in no more than its size as counted (the 32 cover the representation
    // byte, two length prefixes and `localhost` in place of a refused authority), so `out` stays
    // within the limit too.
    let mut out = Vec::with_capacity(block.len().min(limit));
    let mut size = 0usize;
    decoder
        .decode_with_cb(block, |name, value| {
            // The decoder cannot be stopped from here: past the limit, it runs to the end of the
            // block (work bounded by the block's length) and nothing more is copied.
            size = size.saturating_add(name.len() + value.len() + 32);
            if size > limit {
                return;
            }
            let value: &[u8] = if &name[..] == b":authority"
                && http::uri::Authority::try_from(&value[..]).is_err()
            {
                b"localhost"
            } else {
                &value
            };
            // Literal Header Field without Indexing, new name (RFC 7541 6.2.2), no Huffman coding.
            out.push(0x00);
            literal(&mut out, &name);
            literal(&mut out, value);
        })
        .map_err(|e| bad(&format!("HPACK: {e:?}")))?;
    if size > limit {
        return Err(bad(&format!(
            "a header list larger than {limit} bytes (HTTP/2's count) once decoded"
        )));
    }
    Ok(out)
}

/// A string literal: its length as a 7-bit-prefix integer (H = 0), then its bytes.
fn literal(out: &mut Vec<u8>, s: &[u8]) {
    let mut n = s.len();
    if n < 127 {
        out.push(n as u8);
    } else {
        out.push(127);
        n -= 127;
        while n >= 128 {
            out.push((n % 128) as u8 | 0x80);
            n /= 128;
        }
        out.push(n as u8);
    }
    out.extend_from_slice(s);
}

/// Writes `block` as a HEADERS frame on `stream`, split into CONTINUATION frames when it is longer
/// than a frame may be.
async fn write_block<W: AsyncWrite + Unpin>(
    to: &mut W,
    stream: u32,
    end_stream: u8,
    block: &[u8],
) -> io::Result<()> {
    let mut chunks = block.chunks(MAX_FRAME).peekable();
    let mut kind = HEADERS;
    let mut flags = end_stream;
    if chunks.peek().is_none() {
        return frame(to, HEADERS, flags | END_HEADERS, stream, &[]).await;
    }
    while let Some(chunk) = chunks.next() {
        let last = chunks.peek().is_none();
        frame(
            to,
            kind,
            flags | if last { END_HEADERS } else { 0 },
            stream,
            chunk,
        )
        .await?;
        kind = CONTINUATION;
        flags = 0;
    }
    Ok(())
}

async fn frame<W: AsyncWrite + Unpin>(
    to: &mut W,
    kind: u8,
    flags: u8,
    stream: u32,
    payload: &[u8],
) -> io::Result<()> {
    let len = payload.len().to_be_bytes();
    let mut head = [0u8; 9];
    head[..3].copy_from_slice(&len[len.len() - 3..]);
    head[3] = kind;
    head[4] = flags;
    head[5..].copy_from_slice(&stream.to_be_bytes());
    to.write_all(&head).await?;
    to.write_all(payload).await
}

/// [`rewrite`] over a buffer, for the `workload_api_frames` fuzz target
/// (`fuzz/fuzz_targets/workload_api_frames.rs`) and nothing else: not an API.
#[doc(hidden)]
pub mod fuzzing {
    use std::future::Future;
    use std::io;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::{Context, Poll, Waker};

    /// [`super::MAX_FRAME`].
    pub const MAX_FRAME: usize = super::MAX_FRAME;
    /// [`super::MAX_HEADER_BLOCK`].
    pub const MAX_HEADER_BLOCK: usize = super::MAX_HEADER_BLOCK;
    /// [`super::MAX_HEADER_LIST`].
    pub const MAX_HEADER_LIST: u32 = super::MAX_HEADER_LIST;
    /// [`super::TABLE_SIZE`].
    pub const TABLE_SIZE: usize = super::TABLE_SIZE;

    /// [`super::rewrite`] of `client`, everything a client sent on one connection: its result,
    /// the bytes it passed on to the server, and how many times it called `on_call`. Driven
    /// without a runtime: a slice and a `Vec` are always ready, and outside a runtime tokio's
    /// cooperative budget never runs out, so the first poll finishes it.
    pub fn rewrite(client: &[u8]) -> (io::Result<()>, Vec<u8>, usize) {
        let calls = AtomicUsize::new(0);
        let on_call = || {
            calls.fetch_add(1, Ordering::Relaxed);
        };
        let mut server = Vec::new();
        let result = {
            let mut future = std::pin::pin!(super::rewrite(client, &mut server, &on_call));
            let mut cx = Context::from_waker(Waker::noop());
            let mut polls = 0u32;
            loop {
                if let Poll::Ready(result) = future.as_mut().poll(&mut cx) {
                    break result;
                }
                polls += 1;
                // Should tokio ever yield here (it wakes the task first), poll again; anything
                // else would wait for ever on bytes that are all there.
                assert!(polls < 1000, "the rewriter waits on in-memory I/O");
            }
        };
        (result, server, calls.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literals_use_the_seven_bit_prefix_integer() {
        let mut out = Vec::new();
        literal(&mut out, b"abc");
        assert_eq!(out, b"\x03abc");
        let long = vec![b'x'; 1337];
        let mut out = Vec::new();
        literal(&mut out, &long);
        // 1337 = 127 + 1210; 1210 = 0b1001_0111010 -> 0xba 0x09
        assert_eq!(&out[..3], &[127, 0xba, 0x09]);
        assert_eq!(out.len(), 3 + 1337);
    }

    #[test]
    fn an_authority_the_server_refuses_becomes_localhost_and_the_rest_is_kept() {
        // Encoded by the decoder's own peer: literal with incremental indexing for :authority
        // (index 1 in the static table), then the same header again from the dynamic table.
        let mut block = vec![0x41];
        literal(&mut block, b"run%2Fspiffe%2Fapi.sock");
        block.extend_from_slice(&[0x82, 0x84]); // :method GET, :path /
        let mut decoder = loona_hpack::Decoder::new();
        let out = reencode(&mut decoder, &block).unwrap();
        let back = loona_hpack::Decoder::new().decode(&out).unwrap();
        assert_eq!(
            back,
            vec![
                (b":authority".to_vec(), b"localhost".to_vec()),
                (b":method".to_vec(), b"GET".to_vec()),
                (b":path".to_vec(), b"/".to_vec()),
            ]
        );
        // The client's next block refers to its dynamic table entry (index 62): still decoded.
        let again = reencode(&mut decoder, &[0xbe]).unwrap();
        assert_eq!(
            loona_hpack::Decoder::new().decode(&again).unwrap(),
            vec![(b":authority".to_vec(), b"localhost".to_vec())]
        );
        // A valid authority is kept as it is.
        let mut block = vec![0x01];
        literal(&mut block, b"localhost:1234");
        let out = reencode(&mut loona_hpack::Decoder::new(), &block).unwrap();
        assert_eq!(
            loona_hpack::Decoder::new().decode(&out).unwrap(),
            vec![(b":authority".to_vec(), b"localhost:1234".to_vec())]
        );
    }

    #[test]
    fn malformed_header_frames_are_errors_not_panics() {
        assert!(header_fragment(PADDED, &[]).is_err());
        assert!(header_fragment(PADDED, &[5, 1, 2]).is_err());
        assert!(header_fragment(PRIORITY, &[1, 2]).is_err());
        assert_eq!(
            header_fragment(PADDED | PRIORITY, &[1, 0, 0, 0, 0, 9, 7, 0]).unwrap(),
            &[7]
        );
        let mut decoder = loona_hpack::Decoder::new();
        assert!(reencode(&mut decoder, &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff]).is_err());
    }

    /// A header block of [`MAX_HEADER_BLOCK`] bytes that adds one ~4 KB field to the dynamic
    /// table, then refers to it (a 1-byte index) again and again: ~240 MB once decoded.
    fn bomb() -> Vec<u8> {
        let mut block = vec![0x40]; // literal with incremental indexing, new name
        literal(&mut block, b"x");
        literal(&mut block, &[b'a'; 4000]);
        block.resize(MAX_HEADER_BLOCK, 0xbe); // index 62: the field just added
        block
    }

    /// One literal field without indexing whose size, as HTTP/2 counts it, is `size`.
    fn field_of_size(size: usize) -> Vec<u8> {
        let mut block = vec![0x00];
        literal(&mut block, b"x");
        literal(&mut block, &vec![b'v'; size - 32 - 1]);
        block
    }

    #[test]
    fn header_lists_larger_than_the_server_takes_are_errors() {
        struct Case {
            name: &'static str,
            block: Vec<u8>,
            ok: bool,
        }
        let limit = MAX_HEADER_LIST as usize;
        // `:method: GET` (index 2) counts 7 + 3 + 32 = 42 bytes.
        let gets = |n: usize| vec![0x82; n];
        for case in [
            Case {
                name: "a dynamic table entry referred to until the block is full",
                block: bomb(),
                ok: false,
            },
            Case {
                name: "a field exactly at the limit",
                block: field_of_size(limit),
                ok: true,
            },
            Case {
                name: "a field one byte over the limit",
                block: field_of_size(limit + 1),
                ok: false,
            },
            Case {
                name: "as many small fields as the limit holds",
                block: gets(limit / 42),
                ok: true,
            },
            Case {
                name: "one small field more",
                block: gets(limit / 42 + 1),
                ok: false,
            },
        ] {
            let mut decoder = loona_hpack::Decoder::new();
            decoder.set_max_allowed_table_size(TABLE_SIZE);
            match reencode(&mut decoder, &case.block) {
                Ok(out) => {
                    assert!(case.ok, "{}: accepted", case.name);
                    assert!(out.len() <= limit, "{}: {} bytes out", case.name, out.len());
                }
                Err(error) => {
                    assert!(!case.ok, "{}: {error}", case.name);
                    assert_eq!(error.kind(), io::ErrorKind::InvalidData, "{}", case.name);
                    assert!(error.to_string().contains("header list"), "{error}");
                }
            }
        }
    }

    #[tokio::test]
    async fn frames_other_than_headers_pass_unchanged_and_blocks_are_joined() {
        let mut input = PREFACE.to_vec();
        // SETTINGS (empty) passes as is.
        input.extend_from_slice(&[0, 0, 0, 0x4, 0, 0, 0, 0, 0]);
        // HEADERS without END_HEADERS, then a CONTINUATION that ends the block.
        let mut block = vec![0x41];
        literal(&mut block, b"a%2Fb");
        let (first, second) = block.split_at(2);
        input.extend_from_slice(&[0, 0, first.len() as u8, HEADERS, END_STREAM, 0, 0, 0, 1]);
        input.extend_from_slice(first);
        input.extend_from_slice(&[
            0,
            0,
            second.len() as u8,
            CONTINUATION,
            END_HEADERS,
            0,
            0,
            0,
            1,
        ]);
        input.extend_from_slice(second);
        let mut out = Vec::new();
        rewrite(&input[..], &mut out, &|| ()).await.unwrap();
        assert_eq!(&out[..24], PREFACE);
        assert_eq!(&out[24..33], &[0, 0, 0, 0x4, 0, 0, 0, 0, 0]);
        let head = &out[33..42];
        assert_eq!(head[3], HEADERS);
        assert_eq!(head[4], END_STREAM | END_HEADERS);
        assert_eq!(&head[5..], &[0, 0, 0, 1]);
        let headers = loona_hpack::Decoder::new().decode(&out[42..]).unwrap();
        assert_eq!(
            headers,
            vec![(b":authority".to_vec(), b"localhost".to_vec())]
        );

        // A CONTINUATION of another stream in the middle of a block ends the connection.
        let mut input = PREFACE.to_vec();
        input.extend_from_slice(&[0, 0, 1, HEADERS, 0, 0, 0, 0, 1, 0x82]);
        input.extend_from_slice(&[0, 0, 1, CONTINUATION, END_HEADERS, 0, 0, 0, 3, 0x84]);
        assert!(rewrite(&input[..], &mut Vec::new(), &|| ()).await.is_err());
    }
}

//! The Workload API socket's HTTP/2 rewriter (`sidecar/src/workload_api/authority.rs`): any bytes
//! as everything a local client sends on one connection to the unix socket, through `rewrite` into
//! a buffer that stands for the server (`meshid_sidecar::workload_api::fuzzing::rewrite`, which
//! drives it without a runtime: a slice and a `Vec` never make it wait). A model of its own walks
//! the same bytes frame by frame (header fragments cut out of the padding and priority as RFC 9113
//! 6.2 says, header blocks decoded with the client's HPACK state by a second `loona_hpack`
//! decoder) and what was written must be what it expects. Never panics. Fewer than 24 bytes is an
//! `UnexpectedEof` with nothing written; 24 bytes other than the HTTP/2 preface are passed on byte
//! for byte. After the preface, what is written is whole frames, none longer than `MAX_FRAME`
//! (a refused frame, or a payload cut short, writes nothing of itself: an error is never a partial
//! write); every frame but HEADERS and CONTINUATION is passed on byte for byte, in order; each
//! header block becomes a HEADERS frame on its stream (reserved bit clear), with END_STREAM as the
//! client's HEADERS had it and no PADDED or PRIORITY, split into CONTINUATIONs only where a frame
//! is full; the block is literals without indexing, with a new name and no Huffman coding (the
//! server's dynamic table is never touched), no longer than the header list's size as HTTP/2 counts
//! it, and decodes (by the server's decoder too) to the client's fields in order, unchanged but an
//! `:authority` the `http` crate refuses, which becomes `localhost`. The result is what the model
//! expects: `Ok` for an end at or inside a frame head; `UnexpectedEof` for a payload cut short;
//! `InvalidData` for a frame over `MAX_FRAME`, a HEADERS frame too short for its padding and
//! priority, a block interrupted or a stray CONTINUATION, a block over `MAX_HEADER_BLOCK`, one
//! that does not decode, or a header list over `MAX_HEADER_LIST`. `on_call` is told once per block
//! written.
#![no_main]

use std::io::ErrorKind;

use http::uri::Authority;
use libfuzzer_sys::fuzz_target;
use meshid_sidecar::workload_api::fuzzing::{
    MAX_FRAME, MAX_HEADER_BLOCK, MAX_HEADER_LIST, TABLE_SIZE, rewrite,
};

const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;

type Fields = Vec<(Vec<u8>, Vec<u8>)>;

/// One frame as written: its bytes (head and payload) and the head's fields.
struct Frame<'a> {
    bytes: &'a [u8],
    kind: u8,
    flags: u8,
    /// As written, reserved bit included.
    stream: u32,
    payload: &'a [u8],
}

/// A frame head's length, type, flags and stream (reserved bit included).
fn head(h: &[u8]) -> (usize, u8, u8, u32) {
    let len = usize::from(h[0]) << 16 | usize::from(h[1]) << 8 | usize::from(h[2]);
    (
        len,
        h[3],
        h[4],
        u32::from_be_bytes([h[5], h[6], h[7], h[8]]),
    )
}

/// What was written after the preface, as frames: each whole, none longer than `MAX_FRAME`.
fn written_frames(mut bytes: &[u8]) -> Vec<Frame<'_>> {
    let mut frames = Vec::new();
    while !bytes.is_empty() {
        assert!(bytes.len() >= 9, "a partial frame head written: {bytes:?}");
        let (len, kind, flags, stream) = head(bytes);
        assert!(len <= MAX_FRAME, "a {len}-byte frame written");
        assert!(bytes.len() >= 9 + len, "a partial frame written");
        let (frame, rest) = bytes.split_at(9 + len);
        frames.push(Frame {
            bytes: frame,
            kind,
            flags,
            stream,
            payload: &frame[9..],
        });
        bytes = rest;
    }
    frames
}

/// The header block fragment of a HEADERS frame's payload: the Pad Length octet (PADDED) and the
/// priority fields (PRIORITY) come first and the padding last; `None` when they take more room
/// than the payload has.
fn fragment_of(flags: u8, payload: &[u8]) -> Option<&[u8]> {
    let padded = flags & PADDED != 0;
    let pad = if padded {
        usize::from(*payload.first()?)
    } else {
        0
    };
    let skip = usize::from(padded) + if flags & PRIORITY != 0 { 5 } else { 0 };
    (skip + pad <= payload.len()).then(|| &payload[skip..payload.len() - pad])
}

/// The client's header list and its size as HTTP/2 counts it (name, value and 32 per field);
/// `None` for a block that does not decode or a list over `MAX_HEADER_LIST`. Past the limit,
/// nothing more is copied (a 64 KiB block can decode to hundreds of megabytes).
fn client_fields(decoder: &mut loona_hpack::Decoder<'_>, block: &[u8]) -> Option<(Fields, usize)> {
    let limit = MAX_HEADER_LIST as usize;
    let mut size = 0usize;
    let mut fields = Vec::new();
    decoder
        .decode_with_cb(block, |name, value| {
            size = size.saturating_add(name.len() + value.len() + 32);
            if size <= limit {
                fields.push((name.into_owned(), value.into_owned()));
            }
        })
        .ok()?;
    (size <= limit).then_some((fields, size))
}

/// A string literal as the rewriter writes it: a 7-bit-prefix length, no Huffman coding.
fn string(bytes: &[u8]) -> (&[u8], &[u8]) {
    let (&first, mut rest) = bytes.split_first().expect("a string literal");
    assert_eq!(first & 0x80, 0, "no Huffman coding");
    let mut len = usize::from(first);
    if len == 127 {
        let mut shift = 0;
        loop {
            let (&b, after) = rest.split_first().expect("a whole length");
            rest = after;
            len += usize::from(b & 0x7f) << shift;
            shift += 7;
            assert!(shift <= 21, "a length longer than any header list taken");
            if b & 0x80 == 0 {
                break;
            }
        }
    }
    assert!(rest.len() >= len, "a string literal cut short");
    rest.split_at(len)
}

/// A header block as the rewriter promises to write it: literal fields without indexing, each
/// with a new name, nothing else (no index, no table size update).
fn literals(mut block: &[u8]) -> Fields {
    let mut fields = Vec::new();
    while let Some((&representation, rest)) = block.split_first() {
        assert_eq!(
            representation, 0x00,
            "not a literal without indexing, new name"
        );
        let (name, rest) = string(rest);
        let (value, rest) = string(rest);
        fields.push((name.to_vec(), value.to_vec()));
        block = rest;
    }
    fields
}

/// The frames written for one header block of the client's (`fields`, `size` bytes as HTTP/2
/// counts them, on `stream`, with `end_stream`) are a HEADERS frame and CONTINUATIONs that carry
/// those fields, with a refused `:authority` as `localhost`.
fn check_block<'a>(
    written: &mut impl Iterator<Item = Frame<'a>>,
    server: &mut loona_hpack::Decoder<'_>,
    stream: u32,
    end_stream: u8,
    (fields, size): (Fields, usize),
) {
    let mut block = Vec::new();
    for kind in std::iter::once(HEADERS).chain(std::iter::repeat(CONTINUATION)) {
        let frame = written.next().expect("a header block written");
        assert_eq!(
            frame.kind, kind,
            "a header block is HEADERS, then CONTINUATIONs"
        );
        assert_eq!(frame.stream, stream, "on its stream, reserved bit clear");
        let last = frame.flags & END_HEADERS != 0;
        let end_headers = if last { END_HEADERS } else { 0 };
        let flags = (if kind == HEADERS { end_stream } else { 0 }) | end_headers;
        assert_eq!(
            frame.flags, flags,
            "END_STREAM on the HEADERS alone, no PADDED or PRIORITY"
        );
        block.extend_from_slice(frame.payload);
        if last {
            break;
        }
        assert_eq!(
            frame.payload.len(),
            MAX_FRAME,
            "a block split before a frame is full"
        );
    }
    assert!(
        block.len() <= size,
        "{} bytes for a {size}-byte header list",
        block.len()
    );
    let out = literals(&block);
    assert_eq!(
        server
            .decode(&block)
            .expect("the server decodes what is written"),
        out
    );
    assert_eq!(out.len(), fields.len(), "fields dropped or added");
    for ((name, value), (out_name, out_value)) in fields.iter().zip(&out) {
        assert_eq!(name, out_name);
        if name == b":authority" {
            assert!(Authority::try_from(&out_value[..]).is_ok(), "{out_value:?}");
        }
        if name == b":authority" && Authority::try_from(&value[..]).is_err() {
            assert_eq!(out_value, b"localhost");
        } else {
            assert_eq!(value, out_value, "a field changed");
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let (result, server, calls) = rewrite(data);
    if data.len() < PREFACE.len() {
        assert_eq!(result.map_err(|e| e.kind()), Err(ErrorKind::UnexpectedEof));
        assert!(server.is_empty(), "{server:?}");
        assert_eq!(calls, 0);
        return;
    }
    if &data[..24] != PREFACE {
        // Not HTTP/2 with prior knowledge: the server answers it.
        result.expect("bytes passed on");
        assert_eq!(server, data);
        assert_eq!(calls, 0);
        return;
    }
    assert_eq!(&server[..24], PREFACE);
    let mut written = written_frames(&server[24..]).into_iter();

    let mut client = loona_hpack::Decoder::new();
    client.set_max_allowed_table_size(TABLE_SIZE);
    let mut server_decoder = loona_hpack::Decoder::new();
    server_decoder.set_max_allowed_table_size(TABLE_SIZE);
    // A header block being collected: its stream, END_STREAM, and its fragments so far.
    let mut block: Option<(u32, u8, Vec<u8>)> = None;
    let mut blocks = 0;
    let mut rest = &data[24..];
    let expected = loop {
        if rest.len() < 9 {
            // The client closed at or inside a frame head (an unfinished block goes nowhere).
            break Ok(());
        }
        let (len, kind, flags, raw_stream) = head(rest);
        let stream = raw_stream & 0x7fff_ffff;
        if len > MAX_FRAME {
            break Err(ErrorKind::InvalidData);
        }
        if rest.len() < 9 + len {
            break Err(ErrorKind::UnexpectedEof);
        }
        let (bytes, after) = rest.split_at(9 + len);
        rest = after;
        let payload = &bytes[9..];
        let complete = match (kind, &mut block) {
            (HEADERS, None) => {
                let Some(fragment) = fragment_of(flags, payload) else {
                    break Err(ErrorKind::InvalidData);
                };
                let collected = (stream, flags & END_STREAM, fragment.to_vec());
                if flags & END_HEADERS != 0 {
                    Some(collected)
                } else {
                    block = Some(collected);
                    None
                }
            }
            (CONTINUATION, Some((id, _, fragments))) if *id == stream => {
                if fragments.len() + payload.len() > MAX_HEADER_BLOCK {
                    break Err(ErrorKind::InvalidData);
                }
                fragments.extend_from_slice(payload);
                if flags & END_HEADERS != 0 {
                    block.take()
                } else {
                    None
                }
            }
            (_, Some(_)) | (CONTINUATION, None) => break Err(ErrorKind::InvalidData),
            _ => {
                let frame = written.next().expect("a frame passed on");
                assert_eq!(frame.bytes, bytes, "a frame changed on the way");
                None
            }
        };
        if let Some((stream, end_stream, fragments)) = complete {
            let Some(fields) = client_fields(&mut client, &fragments) else {
                break Err(ErrorKind::InvalidData);
            };
            check_block(
                &mut written,
                &mut server_decoder,
                stream,
                end_stream,
                fields,
            );
            blocks += 1;
        }
    };
    if let Some(extra) = written.next() {
        panic!(
            "written past what the client's frames give (a refused one, partly?): {:?}",
            extra.bytes
        );
    }
    assert_eq!(result.map_err(|e| e.kind()), expected);
    assert_eq!(calls, blocks, "on_call once per block written");
});

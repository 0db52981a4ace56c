//! The inbound's HTTP/1.1 responses from the app (`meshid_runtime::h1`): any bytes as a response
//! head and the body after it, fed to the decoder in pieces of a size the first byte picks. Never
//! panics; a body never yields more bytes than it was given, a length-framed one never more than
//! its length, and one that ends has yielded exactly its length.
#![no_main]

use bytes::BytesMut;
use http::Method;
use libfuzzer_sys::fuzz_target;
use meshid_runtime::h1::{BodyDecoder, Decoded, Framing, parse_response_head};

fuzz_target!(|data: &[u8]| {
    let Some((&first, wire)) = data.split_first() else {
        return;
    };
    let method = if first & 1 == 0 {
        Method::GET
    } else {
        Method::HEAD
    };
    let step = usize::from(first >> 1) + 1;
    let mut buf = BytesMut::new();
    let mut fed = 0;
    let head = loop {
        let next = (fed + step).min(wire.len());
        buf.extend_from_slice(&wire[fed..next]);
        fed = next;
        match parse_response_head(&mut buf, &method) {
            Ok(Some(head)) => break head,
            Ok(None) if fed < wire.len() => {}
            Ok(None) | Err(_) => return,
        }
    };
    let mut decoder = BodyDecoder::new(head.framing);
    let mut yielded = 0u64;
    loop {
        match decoder.decode(&mut buf) {
            Ok(Decoded::Data(d)) => {
                assert!(!d.is_empty());
                yielded += d.len() as u64;
            }
            Ok(Decoded::Trailers(t)) => assert!(!t.is_empty()),
            Ok(Decoded::End) => break,
            Ok(Decoded::NeedMore) if fed < wire.len() => {
                let next = (fed + step).min(wire.len());
                buf.extend_from_slice(&wire[fed..next]);
                fed = next;
            }
            Ok(Decoded::NeedMore) => match decoder.eof() {
                Ok(_) => break,
                Err(_) => return,
            },
            Err(_) => return,
        }
    }
    assert!(yielded <= wire.len() as u64);
    match head.framing {
        Framing::Length(n) => assert_eq!(yielded, n),
        Framing::Empty => assert_eq!(yielded, 0),
        Framing::Chunked | Framing::UntilClose => {}
    }
});

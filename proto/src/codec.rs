//! The codec of every meshid gRPC call: prost, with small initial buffers.
//!
//! tonic's default codec starts every call's encode and decode buffer at 8 KiB. A bundle stream
//! keeps its buffers for as long as it is open, at the CA (one per connected sidecar) and in every
//! sidecar, while our messages are a few hundred bytes to a few KiB. The buffers start at
//! [`INITIAL_BUFFER`] and grow as a message needs, as tonic's own do past 8 KiB; nothing else about
//! encoding changes (tonic still checks its message size limits).

use std::marker::PhantomData;

use tonic::codec::{BufferSettings, Codec};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// Initial size of a call's encode and decode buffer.
pub const INITIAL_BUFFER: usize = 1024;

/// tonic's default: a streamed response is handed on once this much is buffered.
const YIELD_THRESHOLD: usize = 32 * 1024;

/// [`ProstCodec`] with [`INITIAL_BUFFER`]-byte buffers (named in `build.rs` as the generated code's
/// codec).
#[derive(Debug, Clone)]
pub struct LeanCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for LeanCodec<T, U> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<T, U> Codec for LeanCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::raw_encoder(settings())
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstCodec::<T, U>::raw_decoder(settings())
    }
}

fn settings() -> BufferSettings {
    BufferSettings::new(INITIAL_BUFFER, YIELD_THRESHOLD)
}

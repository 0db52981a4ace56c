//! TLS streams over rustls's unbuffered connection API.
//!
//! rustls's buffered connection (what `tokio-rustls` drives) keeps a 4 KiB buffer for records read
//! from the socket for the whole life of the connection, and copies every record it encrypts
//! into a queue of its own before the socket sees it. Here the stream owns both buffers: the read
//! buffer exists only while a record is arriving (an idle connection holds none), and records are
//! encrypted straight into the bytes handed to the socket. rustls still does every check: the
//! handshake, the verifiers, record protection, alerts and key updates.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use rustls::client::{ClientConnectionData, UnbufferedClientConnection};
use rustls::pki_types::ServerName;
use rustls::server::{ServerConnectionData, UnbufferedServerConnection};
use rustls::unbuffered::{
    ConnectionState, EncodeError, EncryptError, InsufficientSizeError, UnbufferedConnectionCommon,
    UnbufferedStatus,
};
use rustls::{ClientConfig, CommonState, ServerConfig};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// How much of the socket one read takes into the stack: a whole record of 16 KiB of plaintext.
const STACK_READ: usize = 16 * 1024 + 256 + 5;
/// Room beyond what is held when a half-read record is kept (grown to the whole record).
const READ_CHUNK: usize = 4096;
/// The most TLS bytes held unprocessed during the handshake: a handshake message may span records
/// up to 64 KiB (as rustls's buffered connection allows), plus one whole record.
const MAX_UNPROCESSED: usize = 0xffff + 16 * 1024 + 2048 + 5;
/// The most held once the handshake is done: one record. What handshake messages come then (a
/// key update, a session ticket) fit in one; a message spread over records is refused rather
/// than held, or a peer could keep 80 KiB of any connection by sending part of one and stopping.
const MAX_UNPROCESSED_AFTER_HANDSHAKE: usize = STACK_READ + READ_CHUNK;
/// Plaintext taken per `poll_write` (about four full records), and the encrypted bytes a writer
/// may leave unsent before it waits for the socket.
const MAX_WRITE: usize = 64 * 1024;

thread_local! {
    /// Where `poll_write_vectored` gathers its buffers (one per thread, not per connection).
    static GATHER: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// One side of rustls's unbuffered API (server or client).
pub trait Side: std::ops::DerefMut<Target = UnbufferedConnectionCommon<Self::Data>> {
    /// rustls's per-side connection data.
    type Data;
    /// Processes the records in `incoming` (see `process_tls_records`).
    fn process<'c, 'i>(
        &'c mut self,
        incoming: &'i mut [u8],
    ) -> UnbufferedStatus<'c, 'i, Self::Data>;
}

impl Side for UnbufferedServerConnection {
    type Data = ServerConnectionData;
    fn process<'c, 'i>(
        &'c mut self,
        incoming: &'i mut [u8],
    ) -> UnbufferedStatus<'c, 'i, Self::Data> {
        self.process_tls_records(incoming)
    }
}

impl Side for UnbufferedClientConnection {
    type Data = ClientConnectionData;
    fn process<'c, 'i>(
        &'c mut self,
        incoming: &'i mut [u8],
    ) -> UnbufferedStatus<'c, 'i, Self::Data> {
        self.process_tls_records(incoming)
    }
}

/// A TLS stream over `IO`, server or client side.
pub struct TlsStream<IO, C> {
    io: IO,
    conn: C,
    /// TLS bytes read and not yet processed: `rbuf[..rlen]`. Empty (no allocation) while the
    /// connection waits for its peer with nothing half-read.
    rbuf: Vec<u8>,
    rlen: usize,
    /// Plaintext decrypted and not yet read: `plain[ppos..]`.
    plain: Vec<u8>,
    ppos: usize,
    /// TLS bytes to send: `wbuf[wpos..]`.
    wbuf: Vec<u8>,
    wpos: usize,
    /// The peer sent close_notify (reads end cleanly once `plain` is drained).
    peer_closed: bool,
    /// The socket reached its end (after close_notify or not).
    io_eof: bool,
    /// Our close_notify is queued.
    close_sent: bool,
    /// The connection failed: every later call repeats the error.
    failed: Option<rustls::Error>,
}

/// A server-side stream.
pub type ServerTlsStream<IO> = TlsStream<IO, UnbufferedServerConnection>;
/// A client-side stream.
pub type ClientTlsStream<IO> = TlsStream<IO, UnbufferedClientConnection>;

/// Completes a server handshake on `io`.
pub async fn accept<IO>(config: Arc<ServerConfig>, io: IO) -> io::Result<ServerTlsStream<IO>>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let conn = UnbufferedServerConnection::new(config).map_err(tls_error)?;
    let mut stream = TlsStream::new(io, conn);
    std::future::poll_fn(|cx| stream.poll_handshake(cx)).await?;
    Ok(stream)
}

/// Completes a client handshake on `io` with the server `name`.
pub async fn connect<IO>(
    config: Arc<ClientConfig>,
    name: ServerName<'static>,
    io: IO,
) -> io::Result<ClientTlsStream<IO>>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let conn = UnbufferedClientConnection::new(config, name).map_err(tls_error)?;
    let mut stream = TlsStream::new(io, conn);
    std::future::poll_fn(|cx| stream.poll_handshake(cx)).await?;
    Ok(stream)
}

/// A rustls error as an I/O error that still carries it (`get_ref().downcast_ref::<rustls::Error>()`).
fn tls_error(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// What processing the buffered records reached.
enum Reached {
    /// The connection may send application data; nothing more can be read without the socket.
    Traffic,
    /// The handshake needs more bytes from the peer.
    Blocked,
    /// Both sides have sent close_notify.
    Closed,
}

impl<IO, C> TlsStream<IO, C>
where
    IO: AsyncRead + AsyncWrite + Unpin,
    C: Side,
{
    fn new(io: IO, conn: C) -> Self {
        Self {
            io,
            conn,
            rbuf: Vec::new(),
            rlen: 0,
            plain: Vec::new(),
            ppos: 0,
            wbuf: Vec::new(),
            wpos: 0,
            peer_closed: false,
            io_eof: false,
            close_sent: false,
            failed: None,
        }
    }

    /// The transport and the TLS state (peer certificates, ALPN, the negotiated group).
    pub fn get_ref(&self) -> (&IO, &CommonState) {
        (&self.io, &self.conn)
    }

    /// Processes every complete record held: application data goes to `out` while it has room
    /// and nothing is waiting before it, then to `plain`; what rustls wants sent is queued in
    /// `wbuf`, then `app` is encrypted there (when the connection may send; the count taken is
    /// returned), and a close_notify (when `close`).
    fn advance(
        &mut self,
        app: &[u8],
        close: bool,
        out: Option<&mut ReadBuf<'_>>,
    ) -> io::Result<(Reached, usize)> {
        let mut rbuf = std::mem::take(&mut self.rbuf);
        let mut rlen = self.rlen;
        let result = self.advance_on(&mut rbuf, &mut rlen, app, close, out);
        if rlen == 0 {
            // Nothing half-read is left: the next bytes are read on the stack.
            rbuf = Vec::new();
        }
        self.rbuf = rbuf;
        self.rlen = rlen;
        result
    }

    /// [`Self::advance`] over the records in `incoming[..*len]`, which it discards from the front
    /// as rustls consumes them.
    fn advance_on(
        &mut self,
        incoming: &mut [u8],
        len: &mut usize,
        app: &[u8],
        close: bool,
        mut out: Option<&mut ReadBuf<'_>>,
    ) -> io::Result<(Reached, usize)> {
        if let Some(e) = &self.failed {
            return Err(tls_error(e.clone()));
        }
        let mut taken = 0;
        loop {
            let UnbufferedStatus { discard, state } = self.conn.process(&mut incoming[..*len]);
            let state = match state {
                Ok(state) => state,
                Err(e) => {
                    // Whatever rustls queued (the alert that tells the peer why) still goes out.
                    discard_front(incoming, len, discard);
                    self.failed = Some(e.clone());
                    self.queue_alert(incoming, len);
                    return Err(tls_error(e));
                }
            };
            let reached = match state {
                ConnectionState::ReadTraffic(mut traffic) => {
                    while let Some(record) = traffic.next_record() {
                        let mut payload = record.map_err(tls_error)?.payload;
                        if self.ppos == self.plain.len() {
                            self.plain.clear();
                            self.ppos = 0;
                            if let Some(out) = &mut out {
                                let n = out.remaining().min(payload.len());
                                out.put_slice(&payload[..n]);
                                payload = &payload[n..];
                            }
                        }
                        self.plain.extend_from_slice(payload);
                    }
                    None
                }
                ConnectionState::EncodeTlsData(mut encode) => {
                    append_grown(&mut self.wbuf, 512, |out| encode.encode(out), encode_needs)?;
                    None
                }
                ConnectionState::TransmitTlsData(transmit) => {
                    // Sent in order before anything queued later; `poll_send` writes it out.
                    transmit.done();
                    None
                }
                ConnectionState::PeerClosed => {
                    self.peer_closed = true;
                    None
                }
                ConnectionState::Closed => Some(Reached::Closed),
                ConnectionState::BlockedHandshake => Some(Reached::Blocked),
                ConnectionState::WriteTraffic(mut traffic) => {
                    if taken < app.len() && !self.close_sent {
                        let rest = &app[taken..];
                        // Room for the records' headers and tags, and a queued message or two.
                        let room = rest.len() + (rest.len() / 16384 + 1) * 32 + 64;
                        append_grown(
                            &mut self.wbuf,
                            room,
                            |out| traffic.encrypt(rest, out),
                            encrypt_needs,
                        )?;
                        taken = app.len();
                    }
                    if close && !self.close_sent {
                        append_grown(
                            &mut self.wbuf,
                            64,
                            |out| traffic.queue_close_notify(out),
                            encrypt_needs,
                        )?;
                        self.close_sent = true;
                    }
                    Some(Reached::Traffic)
                }
                ConnectionState::ReadEarlyData(_) => {
                    // Early data is never enabled: rustls offers none to read.
                    return Err(io::Error::other("tls: unexpected early data"));
                }
                _ => return Err(io::Error::other("tls: unknown connection state")),
            };
            discard_front(incoming, len, discard);
            if let Some(reached) = reached {
                return Ok((reached, taken));
            }
        }
    }

    /// After a failure: collects what rustls queued to send (its alert) into `wbuf`. Only while it
    /// holds something to send: then it hands that out before looking at any record again (which
    /// would only meet its error once more).
    fn queue_alert(&mut self, incoming: &mut [u8], len: &mut usize) {
        for _ in 0..8 {
            if !self.conn.wants_write() {
                return;
            }
            let UnbufferedStatus { discard, state } = self.conn.process(&mut incoming[..*len]);
            let queued = match state {
                Ok(ConnectionState::EncodeTlsData(mut encode)) => {
                    append_grown(&mut self.wbuf, 512, |out| encode.encode(out), encode_needs)
                        .is_ok()
                }
                _ => false,
            };
            discard_front(incoming, len, discard);
            if !queued {
                return;
            }
        }
    }

    /// Writes `wbuf` to the socket until it is empty (`Ready`) or the socket is full (`Pending`).
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(meshid_runtime::io::poll_write_from(
            &mut self.io,
            cx,
            &self.wbuf,
            &mut self.wpos
        ))?;
        // All sent: a connection with nothing in flight keeps no write buffer.
        self.wpos = 0;
        self.wbuf = Vec::new();
        Poll::Ready(Ok(()))
    }

    /// Reads what the socket has and processes it (application data into `out` while it has
    /// room). `Ready(Ok(false))` at the socket's end.
    ///
    /// With nothing half-read, the bytes land in a buffer on the stack and are decrypted there:
    /// a poll that finds the socket empty costs no allocation, and only the tail of a record that
    /// has not fully arrived is kept, in `rbuf`.
    fn poll_fill(
        &mut self,
        cx: &mut Context<'_>,
        out: Option<&mut ReadBuf<'_>>,
    ) -> Poll<io::Result<bool>> {
        if self.rlen > 0 {
            return self.poll_fill_held(cx);
        }
        let mut stack = [std::mem::MaybeUninit::<u8>::uninit(); STACK_READ];
        let mut buf = ReadBuf::uninit(&mut stack);
        ready!(Pin::new(&mut self.io).poll_read(cx, &mut buf))?;
        let mut len = buf.filled().len();
        if len == 0 {
            return Poll::Ready(Ok(false));
        }
        let incoming = buf.filled_mut();
        let result = self.advance_on(incoming, &mut len, &[], false, out);
        if len > 0 {
            // A record (or a handshake message) not complete yet: keep what arrived of it.
            self.rbuf = vec![0; (len + READ_CHUNK).min(self.max_unprocessed())];
            let held = len.min(self.rbuf.len());
            self.rbuf[..held].copy_from_slice(&incoming[..held]);
            self.rlen = held;
        }
        result?;
        Poll::Ready(Ok(true))
    }

    /// The most TLS bytes held unprocessed now.
    fn max_unprocessed(&self) -> usize {
        if self.conn.is_handshaking() {
            MAX_UNPROCESSED
        } else {
            MAX_UNPROCESSED_AFTER_HANDSHAKE
        }
    }

    /// Reads more of a record that is half-read into `rbuf` (processed by the caller).
    fn poll_fill_held(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<bool>> {
        if self.rlen == self.rbuf.len() {
            // Grow to hold the record being read: its header gives its length.
            let want = match self.rbuf.get(..5) {
                Some(h) => 5 + usize::from(u16::from_be_bytes([h[3], h[4]])),
                None => READ_CHUNK,
            };
            let size = want.max(self.rlen + READ_CHUNK).min(self.max_unprocessed());
            if size <= self.rlen {
                return Poll::Ready(Err(tls_error(rustls::Error::General(
                    "tls: message buffer full".into(),
                ))));
            }
            self.rbuf.resize(size, 0);
        }
        let mut buf = ReadBuf::new(&mut self.rbuf[self.rlen..]);
        ready!(Pin::new(&mut self.io).poll_read(cx, &mut buf))?;
        let n = buf.filled().len();
        self.rlen += n;
        Poll::Ready(Ok(n > 0))
    }

    fn poll_handshake(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            let result = self.advance(&[], false, None);
            // What rustls queued goes out first, the alert of a failed handshake included.
            let sent = self.poll_send(cx);
            let (reached, _) = result?;
            ready!(sent)?;
            if !self.conn.is_handshaking() {
                return Poll::Ready(Ok(()));
            }
            match reached {
                Reached::Closed => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "tls handshake eof",
                    )));
                }
                Reached::Traffic | Reached::Blocked => {}
            }
            let filled = self.poll_fill(cx, None);
            if let Poll::Ready(Err(e)) = filled {
                // The alert that tells the peer why goes out first (best effort).
                let _ = self.poll_send(cx);
                return Poll::Ready(Err(e));
            }
            if !ready!(filled)? {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "tls handshake eof",
                )));
            }
        }
    }
}

/// Drops the first `n` bytes of `buf[..*len]`.
fn discard_front(buf: &mut [u8], len: &mut usize, n: usize) {
    if n == 0 {
        return;
    }
    let n = n.min(*len);
    buf.copy_within(n..*len, 0);
    *len -= n;
}

/// Appends to `buf` what `write` puts in the room it is given: `room` bytes at first, then what
/// rustls says it needs (`needs` reads that from its error).
fn append_grown<E: std::fmt::Display>(
    buf: &mut Vec<u8>,
    mut room: usize,
    mut write: impl FnMut(&mut [u8]) -> Result<usize, E>,
    needs: impl Fn(&E) -> Option<usize>,
) -> io::Result<usize> {
    let start = buf.len();
    loop {
        buf.resize(start + room, 0);
        match write(&mut buf[start..]) {
            Ok(n) => {
                buf.truncate(start + n);
                return Ok(n);
            }
            Err(e) => {
                buf.truncate(start);
                match needs(&e) {
                    Some(required) if required > room => room = required,
                    _ => return Err(io::Error::other(format!("tls: {e}"))),
                }
            }
        }
    }
}

fn encode_needs(e: &EncodeError) -> Option<usize> {
    match e {
        EncodeError::InsufficientSize(InsufficientSizeError { required_size }) => {
            Some(*required_size)
        }
        _ => None,
    }
}

fn encrypt_needs(e: &EncryptError) -> Option<usize> {
    match e {
        EncryptError::InsufficientSize(InsufficientSizeError { required_size }) => {
            Some(*required_size)
        }
        _ => None,
    }
}

impl<IO, C> AsyncRead for TlsStream<IO, C>
where
    IO: AsyncRead + AsyncWrite + Unpin,
    C: Side + Unpin,
{
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        loop {
            if this.ppos < this.plain.len() {
                let n = buf.remaining().min(this.plain.len() - this.ppos);
                buf.put_slice(&this.plain[this.ppos..this.ppos + n]);
                this.ppos += n;
                if this.ppos == this.plain.len() {
                    this.ppos = 0;
                    this.plain = Vec::new();
                }
                return Poll::Ready(Ok(()));
            }
            if this.peer_closed {
                return Poll::Ready(Ok(()));
            }
            if this.io_eof {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "peer closed connection without sending TLS close_notify",
                )));
            }
            let before = buf.filled().len();
            let got = if this.rlen > 0 || this.failed.is_some() {
                // Records already held (a half-read one may be whole now).
                this.advance(&[], false, Some(&mut *buf)).map(|_| true)
            } else {
                match this.poll_fill(cx, Some(&mut *buf)) {
                    Poll::Ready(result) => result,
                    Poll::Pending => {
                        // Nothing to read: go on sending what is queued, if anything.
                        if let Poll::Ready(Err(e)) = this.poll_send(cx) {
                            return Poll::Ready(Err(e));
                        }
                        return Poll::Pending;
                    }
                }
            };
            // A key update's answer (or an alert) goes out as soon as it can.
            if let Poll::Ready(Err(e)) = this.poll_send(cx) {
                return Poll::Ready(Err(e));
            }
            if !got? {
                this.io_eof = true;
                continue;
            }
            if buf.filled().len() > before {
                return Poll::Ready(Ok(()));
            }
            if this.rlen > 0 && this.ppos == this.plain.len() && !this.peer_closed {
                // Only part of a record so far: read on.
                match ready!(this.poll_fill_held(cx)) {
                    Ok(true) => {}
                    Ok(false) => this.io_eof = true,
                    Err(e) => return Poll::Ready(Err(e)),
                }
            }
        }
    }
}

impl<IO, C> AsyncWrite for TlsStream<IO, C>
where
    IO: AsyncRead + AsyncWrite + Unpin,
    C: Side + Unpin,
{
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if this.wbuf.len() - this.wpos >= MAX_WRITE {
            ready!(this.poll_send(cx))?;
        }
        if this.close_sent {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        let chunk = &data[..data.len().min(MAX_WRITE)];
        let (reached, taken) = this.advance(chunk, false, None)?;
        if taken == 0 {
            return Poll::Ready(Err(match reached {
                Reached::Closed => io::ErrorKind::BrokenPipe.into(),
                _ => io::Error::other("tls: the connection cannot send yet"),
            }));
        }
        // Start sending now; what the socket does not take waits for the next write or flush.
        if let Poll::Ready(Err(e)) = this.poll_send(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(taken))
    }

    /// The buffers go out as one record where they fit (an h2 frame's header and its payload, an
    /// HTTP/1.1 head and its body), as rustls's buffered writer does: gathered into a scratch
    /// buffer of the thread's, since rustls's unbuffered API encrypts one slice at a time.
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if bufs.iter().filter(|b| !b.is_empty()).nth(1).is_none() {
            let only = bufs
                .iter()
                .find(|b| !b.is_empty())
                .map_or(&[][..], |b| &b[..]);
            return self.poll_write(cx, only);
        }
        GATHER.with(|scratch| {
            let mut scratch = scratch.borrow_mut();
            scratch.clear();
            for b in bufs {
                let room = MAX_WRITE - scratch.len();
                if room == 0 {
                    break;
                }
                scratch.extend_from_slice(&b[..b.len().min(room)]);
            }
            let result = self.poll_write(cx, &scratch);
            if scratch.capacity() > 4 * READ_CHUNK {
                *scratch = Vec::new();
            }
            result
        })
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_send(cx))?;
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.close_sent && this.failed.is_none() {
            // Best effort, as tokio-rustls: a connection that cannot send ends without it.
            let _ = this.advance(&[], true, None);
        }
        ready!(this.poll_send(cx))?;
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use meshid_identity::testing::{LeafShape, TestPki};
    use rustls::RootCertStore;
    use rustls::server::WebPkiClientVerifier;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    fn provider() -> Arc<rustls::crypto::CryptoProvider> {
        Arc::new(rustls::crypto::aws_lc_rs::default_provider())
    }

    struct Configs {
        server: Arc<ServerConfig>,
        client: Arc<ClientConfig>,
        /// A client that presents no certificate (the server requires one).
        anonymous: Arc<ClientConfig>,
    }

    fn configs() -> Configs {
        let pki = TestPki::new("tls");
        let shape = LeafShape {
            dns: vec!["localhost".into()],
            ..LeafShape::default()
        };
        let server_leaf = pki.leaf_shaped("spiffe://td/server", &shape);
        let client_leaf = pki.leaf("spiffe://td/client");
        let mut roots = RootCertStore::empty();
        roots.add(pki.root.clone()).unwrap();
        let roots = Arc::new(roots);
        let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
            .build()
            .unwrap();
        let server = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_client_cert_verifier(verifier)
            .with_single_cert(server_leaf.chain, server_leaf.key)
            .unwrap();
        let client = || {
            ClientConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots.clone())
        };
        Configs {
            server: Arc::new(server),
            client: Arc::new(
                client()
                    .with_client_auth_cert(client_leaf.chain, client_leaf.key)
                    .unwrap(),
            ),
            anonymous: Arc::new(client().with_no_client_auth()),
        }
    }

    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (a, b) = tokio::join!(TcpStream::connect(addr), l.accept());
        (a.unwrap(), b.unwrap().0)
    }

    fn name() -> ServerName<'static> {
        ServerName::try_from("localhost").unwrap()
    }

    fn pattern(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    /// Both directions at once, a megabyte each way, against tokio-rustls on the other end
    /// (server side here, then client side here), then close_notify each way.
    #[tokio::test]
    async fn carries_bulk_data_both_ways_against_the_buffered_implementation() {
        let c = configs();
        let data = pattern(1 << 20);

        // Our server, tokio-rustls's client.
        let (client_tcp, server_tcp) = pair().await;
        let connector = tokio_rustls::TlsConnector::from(c.client.clone());
        let (client, server) = tokio::join!(
            connector.connect(name(), client_tcp),
            accept(c.server.clone(), server_tcp)
        );
        exchange(client.unwrap(), server.unwrap(), &data).await;

        // Our client, tokio-rustls's server.
        let (client_tcp, server_tcp) = pair().await;
        let acceptor = tokio_rustls::TlsAcceptor::from(c.server.clone());
        let (client, server) = tokio::join!(
            connect(c.client.clone(), name(), client_tcp),
            acceptor.accept(server_tcp)
        );
        exchange(client.unwrap(), server.unwrap(), &data).await;

        // Ours on both ends.
        let (client_tcp, server_tcp) = pair().await;
        let (client, server) = tokio::join!(
            connect(c.client.clone(), name(), client_tcp),
            accept(c.server.clone(), server_tcp)
        );
        exchange(client.unwrap(), server.unwrap(), &data).await;
    }

    async fn exchange<A, B>(a: A, b: B, data: &[u8])
    where
        A: AsyncRead + AsyncWrite + Unpin + Send,
        B: AsyncRead + AsyncWrite + Unpin + Send,
    {
        async fn side(mut s: impl AsyncRead + AsyncWrite + Unpin, data: &[u8]) -> Vec<u8> {
            let (mut r, mut w) = tokio::io::split(&mut s);
            let write = async {
                // Uneven writes, so records and reads never line up.
                for chunk in data.chunks(10_007) {
                    w.write_all(chunk).await.unwrap();
                }
                w.shutdown().await.unwrap();
            };
            let read = async {
                let mut got = Vec::new();
                r.read_to_end(&mut got).await.unwrap();
                got
            };
            tokio::join!(write, read).1
        }
        let (got_a, got_b) = tokio::join!(side(a, data), side(b, data));
        assert!(got_a == data, "a read {} bytes", got_a.len());
        assert!(got_b == data, "b read {} bytes", got_b.len());
    }

    #[tokio::test]
    async fn an_idle_connection_holds_no_read_or_write_buffer() {
        let c = configs();
        let (client_tcp, server_tcp) = pair().await;
        let (client, server) = tokio::join!(
            connect(c.client.clone(), name(), client_tcp),
            accept(c.server.clone(), server_tcp)
        );
        let (mut client, mut server) = (client.unwrap(), server.unwrap());
        for _ in 0..3 {
            client.write_all(&pattern(20_000)).await.unwrap();
            client.flush().await.unwrap();
            let mut got = vec![0; 20_000];
            server.read_exact(&mut got).await.unwrap();
            // Waiting for the next byte, with nothing half-read.
            let mut one = [0u8; 1];
            let pending =
                tokio::time::timeout(std::time::Duration::from_millis(50), server.read(&mut one))
                    .await;
            assert!(pending.is_err(), "nothing more was sent");
            assert_eq!(server.rbuf.capacity(), 0);
            assert_eq!(server.wbuf.capacity(), 0);
            assert_eq!(server.plain.len(), 0);
        }
    }

    #[tokio::test]
    async fn a_refused_client_hears_why() {
        let c = configs();
        let (client_tcp, server_tcp) = pair().await;
        let connector = tokio_rustls::TlsConnector::from(c.anonymous.clone());
        let (client, server) = tokio::join!(
            async {
                // TLS 1.3: the client finishes first, then learns of the refusal on its first read.
                let mut tls = connector.connect(name(), client_tcp).await?;
                tls.write_all(b"hello").await?;
                let mut buf = [0u8; 1];
                tls.read(&mut buf).await
            },
            accept(c.server.clone(), server_tcp)
        );
        let server_err = server
            .err()
            .expect("the server refuses a client without a certificate");
        let tls = server_err
            .get_ref()
            .and_then(|e| e.downcast_ref::<rustls::Error>());
        assert!(
            matches!(tls, Some(rustls::Error::NoCertificatesPresented)),
            "{server_err:?}"
        );
        let client_err = client.expect_err("the client is refused");
        let alert = client_err
            .get_ref()
            .and_then(|e| e.downcast_ref::<rustls::Error>());
        assert!(
            matches!(alert, Some(rustls::Error::AlertReceived(_))),
            "the client got an alert, not a bare close: {client_err:?}"
        );
    }

    #[tokio::test]
    async fn garbage_and_a_silent_close_are_errors() {
        let c = configs();
        let (mut client_tcp, server_tcp) = pair().await;
        let server = tokio::spawn(accept(c.server.clone(), server_tcp));
        client_tcp
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let err = server.await.unwrap().err().expect("not TLS");
        assert!(
            err.get_ref().is_some_and(|e| e.is::<rustls::Error>()),
            "{err:?}"
        );

        // A TCP close mid-handshake.
        let (client_tcp, server_tcp) = pair().await;
        drop(client_tcp);
        let err = accept(c.server.clone(), server_tcp).await.err().unwrap();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);

        // A TCP close without close_notify after the handshake: an error, not a clean end.
        let (client_tcp, server_tcp) = pair().await;
        let connector = tokio_rustls::TlsConnector::from(c.client.clone());
        let (client, server) = tokio::join!(
            connector.connect(name(), client_tcp),
            accept(c.server.clone(), server_tcp)
        );
        let (mut client, mut server) = (client.unwrap(), server.unwrap());
        client.get_mut().0.shutdown().await.unwrap();
        let mut buf = Vec::new();
        let err = server.read_to_end(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);

        // Garbage after the handshake: a clear TLS error, and the same error again on the next
        // read (nothing is processed past it).
        let (client_tcp, server_tcp) = pair().await;
        let (client, server) = tokio::join!(
            connector.connect(name(), client_tcp),
            accept(c.server.clone(), server_tcp)
        );
        let (mut client, mut server) = (client.unwrap(), server.unwrap());
        client.write_all(b"before").await.unwrap();
        client.flush().await.unwrap();
        let mut got = [0u8; 6];
        server.read_exact(&mut got).await.unwrap();
        client
            .get_mut()
            .0
            .write_all(&[23, 3, 3, 0, 40, 1, 2, 3])
            .await
            .unwrap();
        client.get_mut().0.write_all(&[0x55; 64]).await.unwrap();
        for _ in 0..2 {
            let err = server.read(&mut got).await.unwrap_err();
            assert!(
                err.get_ref().is_some_and(|e| e.is::<rustls::Error>()),
                "{err:?}"
            );
        }
        assert!(server.write_all(b"after").await.is_err());
    }

    /// A small deterministic generator (xorshift), so a failing case can be replayed.
    fn xorshift(mut seed: u64) -> impl FnMut() -> u64 {
        move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        }
    }

    /// Mutated and truncated first flights, and random bytes, before the handshake; random bytes
    /// after a genuine one: every case ends in an error (no panic, no hang, nothing accepted).
    #[tokio::test]
    async fn hostile_bytes_end_in_an_error_never_a_panic_or_a_hang() {
        let c = configs();
        // A genuine first flight (ClientHello), as the client writes it.
        let hello = {
            let (client_io, mut server_io) = tokio::io::duplex(1 << 16);
            let connector = tokio_rustls::TlsConnector::from(c.client.clone());
            let task = tokio::spawn(async move {
                let _ = connector.connect(name(), client_io).await;
            });
            let mut buf = vec![0u8; 1 << 16];
            let n = server_io.read(&mut buf).await.unwrap();
            task.abort();
            buf.truncate(n);
            buf
        };
        assert_eq!(hello.first(), Some(&22), "a handshake record");
        let mut next = xorshift(0x9e37_79b9_7f4a_7c15);
        for case in 0..300u32 {
            let mut bytes = hello.clone();
            match case % 3 {
                0 => {
                    for _ in 0..1 + next() % 8 {
                        let at = usize::try_from(next()).unwrap() % bytes.len();
                        bytes[at] ^= (next() as u8) | 1;
                    }
                }
                1 => bytes.truncate(usize::try_from(next()).unwrap() % bytes.len()),
                _ => {
                    let len = usize::try_from(next() % 2048).unwrap();
                    bytes = (0..len).map(|_| next() as u8).collect();
                }
            }
            let (mut peer, io) = tokio::io::duplex(1 << 17);
            peer.write_all(&bytes).await.unwrap();
            peer.shutdown().await.unwrap();
            let result = tokio::time::timeout(
                std::time::Duration::from_secs(5),
                accept(c.server.clone(), io),
            )
            .await
            .unwrap_or_else(|_| panic!("case {case} hung"));
            assert!(result.is_err(), "case {case} was accepted");
        }

        // After a genuine handshake: random records, then the end.
        let connector = tokio_rustls::TlsConnector::from(c.client.clone());
        for case in 0..50u32 {
            let (client_io, server_io) = tokio::io::duplex(1 << 17);
            let (client, server) = tokio::join!(
                connector.connect(name(), client_io),
                accept(c.server.clone(), server_io)
            );
            let (mut client, mut server) = (client.unwrap(), server.unwrap());
            let len = usize::try_from(next() % 4096).unwrap();
            let mut junk: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            if case % 2 == 0 && junk.len() >= 5 {
                // A plausible header in front: application data, TLS 1.2 legacy version.
                let body = u16::try_from(junk.len() - 5).unwrap().to_be_bytes();
                junk[..5].copy_from_slice(&[23, 3, 3, body[0], body[1]]);
            }
            let raw = &mut client.get_mut().0;
            raw.write_all(&junk).await.unwrap();
            raw.shutdown().await.unwrap();
            let mut got = Vec::new();
            let read = tokio::time::timeout(
                std::time::Duration::from_secs(5),
                server.read_to_end(&mut got),
            )
            .await
            .unwrap_or_else(|_| panic!("case {case} hung"));
            assert!(
                read.is_err(),
                "case {case}: junk read as {} bytes",
                got.len()
            );
            assert!(got.is_empty(), "case {case}: junk delivered as plaintext");
        }
    }

    /// Once the handshake is done, what is held of a message not complete yet stops at one
    /// record: the part of a handshake message spread over records (which rustls leaves in our
    /// buffer until it is whole) ends the connection instead of growing to 80 KiB. The held bytes
    /// are put in place here: the peer would have to encrypt a handshake fragment itself.
    #[tokio::test]
    async fn after_the_handshake_no_more_than_a_record_is_held() {
        let c = configs();
        let (client_tcp, server_tcp) = pair().await;
        let connector = tokio_rustls::TlsConnector::from(c.client.clone());
        let (client, server) = tokio::join!(
            connector.connect(name(), client_tcp),
            accept(c.server.clone(), server_tcp)
        );
        let (_client, mut server) = (client.unwrap(), server.unwrap());
        let full = MAX_UNPROCESSED_AFTER_HANDSHAKE;
        server.rbuf = vec![0; full];
        server.rbuf[..5].copy_from_slice(&[22, 3, 3, 0xff, 0xff]);
        server.rlen = full;
        let grown = std::future::poll_fn(|cx| Poll::Ready(server.poll_fill_held(cx))).await;
        match grown {
            Poll::Ready(Err(e)) => assert!(e.to_string().contains("buffer full"), "{e}"),
            other => panic!("held more than a record: {other:?}"),
        }
        assert_eq!(server.rbuf.len(), full);
    }

    #[tokio::test]
    async fn key_updates_from_the_peer_are_answered_and_traffic_goes_on() {
        let c = configs();
        let (client_tcp, server_tcp) = pair().await;
        let connector = tokio_rustls::TlsConnector::from(c.client.clone());
        let (client, server) = tokio::join!(
            connector.connect(name(), client_tcp),
            accept(c.server.clone(), server_tcp)
        );
        let (mut client, mut server) = (client.unwrap(), server.unwrap());
        for round in 0..3u8 {
            client.get_mut().1.refresh_traffic_keys().unwrap();
            client.write_all(&[round; 100]).await.unwrap();
            client.flush().await.unwrap();
            let mut got = [0u8; 100];
            server.read_exact(&mut got).await.unwrap();
            assert_eq!(got, [round; 100]);
            // The server's answer (its own key update) comes before its data, under new keys.
            server.write_all(&[round + 10; 100]).await.unwrap();
            server.flush().await.unwrap();
            client.read_exact(&mut got).await.unwrap();
            assert_eq!(got, [round + 10; 100]);
        }
    }
}

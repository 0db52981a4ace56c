//! One small HTTP/1.1 client on hyper, for what meshid asks of plain-HTTP peers: the CA's rotation
//! report from its admin port, an app's probe endpoint on localhost, the demo's calls through its
//! sidecars. One bodiless request per connection, a deadline on the whole exchange, and a cap on the
//! body it reads.

use std::net::SocketAddr;
use std::time::Duration;

use http::Request;
use http::header::{CONNECTION, HOST, HeaderName, HeaderValue};
use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// A request to send (no body).
#[derive(Debug, Clone)]
pub struct Call<'a> {
    pub method: &'a str,
    pub addr: SocketAddr,
    /// The `Host` header (default: `addr`).
    pub host: Option<&'a str>,
    pub path: &'a str,
    pub headers: &'a [(String, String)],
    /// The whole exchange: connect, request, response head and body.
    pub timeout: Duration,
    /// The largest body read; a longer one is an error, unless `cut_body`.
    pub max_body: usize,
    /// A body longer than `max_body` is cut there instead (what a prober wants: the status; the
    /// kubelet reads 10 KiB of a probe's answer and takes the rest for a harmless truncation).
    pub cut_body: bool,
}

impl<'a> Call<'a> {
    /// `GET path` on `addr`, 10 s, bodies up to 64 MiB.
    pub fn get(addr: SocketAddr, path: &'a str) -> Self {
        Self::new("GET", addr, path)
    }

    /// `METHOD path` on `addr`, 10 s, bodies up to 64 MiB.
    pub fn new(method: &'a str, addr: SocketAddr, path: &'a str) -> Self {
        Self {
            method,
            addr,
            host: None,
            path,
            headers: &[],
            timeout: Duration::from_secs(10),
            max_body: 64 << 20,
            cut_body: false,
        }
    }
}

/// What came back.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

/// Why a request got no answer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    #[error("cannot connect to {addr}: {error}")]
    Connect {
        addr: SocketAddr,
        error: std::io::Error,
    },
    #[error("bad request: {0}")]
    Request(String),
    #[error("{0}")]
    Http(String),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

/// A spawned task aborted when this handle is dropped: a connection task that must not outlive
/// the exchange it serves, whichever way that exchange ends.
#[derive(Debug)]
pub struct AbortOnDrop<T>(pub tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Sends one request and reads the whole answer.
pub async fn send(req: &Call<'_>) -> Result<Reply, ClientError> {
    tokio::time::timeout(req.timeout, exchange(req))
        .await
        .map_err(|_| ClientError::Timeout(req.timeout))?
}

async fn exchange(req: &Call<'_>) -> Result<Reply, ClientError> {
    let host = match req.host {
        Some(h) => h.to_owned(),
        None => req.addr.to_string(),
    };
    let method = http::Method::from_bytes(req.method.as_bytes())
        .map_err(|_| ClientError::Request(format!("method {:?}", req.method)))?;
    let mut request = Request::builder()
        .method(method)
        .uri(req.path)
        .header(HOST, &host)
        .header(CONNECTION, "close")
        .body(Empty::<Bytes>::new())
        .map_err(|e| ClientError::Request(e.to_string()))?;
    for (name, value) in req.headers {
        // Names and values that are not valid HTTP (a CR or LF among them) are refused here.
        let name = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| ClientError::Request(format!("header name {name:?}")))?;
        let value = HeaderValue::from_str(value)
            .map_err(|_| ClientError::Request(format!("header value of {name}")))?;
        request.headers_mut().append(name, value);
    }
    let tcp = TcpStream::connect(req.addr)
        .await
        .map_err(|error| ClientError::Connect {
            addr: req.addr,
            error,
        })?;
    let _ = tcp.set_nodelay(true);
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| ClientError::Http(e.to_string()))?;
    // Ended with the exchange however it ends (the caller's timeout drops this future).
    let _conn = AbortOnDrop(tokio::spawn(conn));
    let resp = sender
        .send_request(request)
        .await
        .map_err(|e| ClientError::Http(e.to_string()))?;
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = if req.cut_body {
        let mut body = resp.into_body();
        let mut read = Vec::new();
        while read.len() < req.max_body {
            match body.frame().await {
                None => break,
                Some(Ok(frame)) => {
                    if let Some(data) = frame.data_ref() {
                        let room = req.max_body - read.len();
                        read.extend_from_slice(&data[..data.len().min(room)]);
                    }
                }
                Some(Err(e)) => return Err(ClientError::Http(format!("reading the body: {e}"))),
            }
        }
        Bytes::from(read)
    } else {
        Limited::new(resp.into_body(), req.max_body)
            .collect()
            .await
            .map_err(|e| ClientError::Http(format!("reading the body: {e}")))?
            .to_bytes()
    };
    Ok(Reply {
        status,
        headers,
        body,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    async fn one_shot(answer: &'static [u8]) -> (SocketAddr, tokio::task::JoinHandle<Vec<u8>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut head = vec![0u8; 4096];
            let n = s.read(&mut head).await.unwrap();
            head.truncate(n);
            s.write_all(answer).await.unwrap();
            s.shutdown().await.unwrap();
            head
        });
        (addr, task)
    }

    #[tokio::test]
    async fn reads_status_and_body_and_sends_headers() {
        let (addr, server) =
            one_shot(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 4\r\n\r\ndown").await;
        let headers = [("X-Probe".to_owned(), "yes".to_owned())];
        let mut req = Call::get(addr, "/ready");
        req.host = Some("app");
        req.headers = &headers;
        let reply = send(&req).await.unwrap();
        assert_eq!((reply.status, &reply.body[..]), (503, &b"down"[..]));
        let head = String::from_utf8(server.await.unwrap())
            .unwrap()
            .to_lowercase();
        assert!(head.starts_with("get /ready http/1.1\r\n"), "{head}");
        assert!(
            head.contains("host: app\r\n") && head.contains("x-probe: yes\r\n"),
            "{head}"
        );
    }

    #[tokio::test]
    async fn refuses_what_it_should() {
        let (addr, _server) =
            one_shot(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n0123456789").await;
        let mut req = Call::get(addr, "/");
        req.max_body = 4;
        assert!(matches!(send(&req).await, Err(ClientError::Http(_))));
        let bad = [("X-A".to_owned(), "a\r\nInjected: 1".to_owned())];
        let mut req = Call::get(addr, "/");
        req.headers = &bad;
        assert!(matches!(send(&req).await, Err(ClientError::Request(_))));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut req = Call::get(listener.local_addr().unwrap(), "/");
        req.timeout = Duration::from_millis(200);
        // Accepted by the kernel, never answered.
        assert!(matches!(send(&req).await, Err(ClientError::Timeout(_))));
    }
}

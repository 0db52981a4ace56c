//! What one local client of an outbound HTTP listener can take from the others: the upstream's
//! connections (it caps how many of ours it admits) and the streams of the shared h2 connection
//! (the upstream caps how many are open at once on each); and of a TCP listener: its dials in
//! progress.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use meshid_identity::policy::Protocol;
use meshid_sidecar::outbound::dial::MAX_DIALS_IN_PROGRESS;
use meshid_sidecar::settings::Limits;
use meshid_tests::mesh::{
    SidecarSpec, TestPki, TestSidecar, Workload, metric, read_request_body, read_request_head,
    read_response,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const A: &str = "spiffe://cluster.local/ns/shop/sa/frontend";
const B: &str = "spiffe://cluster.local/ns/shop/sa/backend";

/// An HTTP/1.1 app: `/big` answers 64 MiB; a request with a body is answered once the whole body
/// has arrived; anything else `ok`. Counts the request heads it has read for `/slow`.
async fn app() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let slow = Arc::new(AtomicUsize::new(0));
    let seen = slow.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                continue;
            };
            let seen = seen.clone();
            tokio::spawn(async move {
                let mut pending = Vec::new();
                while let Some(head) = read_request_head(&mut s, &mut pending).await {
                    if head.starts_with("post /slow") {
                        seen.fetch_add(1, Ordering::SeqCst);
                    }
                    if read_request_body(&mut s, &mut pending, &head)
                        .await
                        .is_none()
                    {
                        return;
                    }
                    if head.starts_with("get /big") {
                        let n = 64usize << 20;
                        let block = vec![b'b'; 64 * 1024];
                        let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {n}\r\n\r\n");
                        if s.write_all(head.as_bytes()).await.is_err() {
                            return;
                        }
                        for _ in 0..n / block.len() {
                            if s.write_all(&block).await.is_err() {
                                return;
                            }
                        }
                    } else if s
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    (addr, slow)
}

/// Sidecar B on `ip` in front of `app`, allowing A; sidecar A with B as its one HTTP upstream.
async fn pair(
    pki: &TestPki,
    ip: &'static str,
    app: SocketAddr,
    b_limits: Limits,
    a_limits: Limits,
) -> (TestSidecar, TestSidecar) {
    let b = TestSidecar::start(
        pki,
        &pki.workload(B),
        B,
        SidecarSpec {
            inbound: vec![(ip, app, Protocol::Http)],
            policy: Some(format!(
                "inbound:\n  - port: {{port0}}\n    protocol: http\n    allow:\n      - id: {A}\n"
            )),
            limits: Some(b_limits),
            ..Default::default()
        },
    )
    .await;
    let a = TestSidecar::start(
        pki,
        &pki.workload(A),
        A,
        SidecarSpec {
            outbound: vec![(b.inbound[0].to_string(), B.to_string(), Protocol::Http)],
            limits: Some(a_limits),
            ..Default::default()
        },
    )
    .await;
    (a, b)
}

/// Sends `req` on a new connection to `addr`; the status and body of the answer, which must come
/// within 10 s.
async fn ask(addr: SocketAddr, req: &[u8]) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(req).await.unwrap();
    let answer = tokio::time::timeout(
        Duration::from_secs(10),
        read_response(&mut s, &mut Vec::new()),
    )
    .await;
    let (status, _, body) = answer
        .unwrap_or_else(|_| {
            panic!(
                "no answer within 10 s to {:?}",
                String::from_utf8_lossy(req)
            )
        })
        .unwrap();
    (status, body)
}

const GET: &[u8] = b"GET /small HTTP/1.1\r\nhost: backend\r\n\r\n";
const POST: &[u8] = b"POST /small HTTP/1.1\r\nhost: backend\r\ncontent-length: 1\r\n\r\nx";

/// A local client that asks for large responses one after another and reads none of them holds
/// at most `max_upstream_http1_connections` pooled HTTP/1.1 connections; its later requests, and
/// everyone else's, go over h2. Without the cap each unread response pinned one more upstream
/// connection, until the upstream (`max_connections_per_peer`) refused every new one of ours:
/// other clients' requests got 502.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_left_unread_hold_no_more_pooled_connections_than_the_cap() {
    let pki = TestPki::new();
    let (app, _) = app().await;
    let (a, b) = pair(
        &pki,
        "127.0.0.91",
        app,
        Limits {
            max_connections_per_peer: 4,
            ..Default::default()
        },
        Limits {
            max_upstream_http1_connections: 2,
            ..Default::default()
        },
    )
    .await;
    let mut held = Vec::new();
    for i in 0..4 {
        let mut s = TcpStream::connect(a.outbound[0]).await.unwrap();
        s.write_all(b"GET /big HTTP/1.1\r\nhost: backend\r\n\r\n")
            .await
            .unwrap();
        let mut first = [0u8; 12];
        tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut first))
            .await
            .unwrap_or_else(|_| panic!("request {i}: no response head within 10 s"))
            .unwrap();
        assert_eq!(&first, b"HTTP/1.1 200", "request {i}");
        held.push(s);
        // Apart, as on a quiet listener, where bodiless GETs take the pooled HTTP/1.1 path.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for req in [GET, POST] {
        let (status, body) = ask(a.outbound[0], req).await;
        assert_eq!(
            (status, body.as_str()),
            (200, "ok"),
            "{}",
            String::from_utf8_lossy(req)
        );
    }
    let m = b.metrics().await;
    assert_eq!(
        metric(
            &m,
            "meshid_sidecar_connections_refused_total{",
            &[r#"reason="max_connections_per_peer""#]
        ),
        0,
        "{m}"
    );
    drop(held);
}

/// Sends `n` POSTs to `addr`, each on its own connection, that promise 1,000 bytes of body and
/// send 3; waits until the app has seen `seen_then` of them.
async fn stall(addr: SocketAddr, n: usize, slow: &AtomicUsize, seen_then: usize) -> Vec<TcpStream> {
    let mut held = Vec::with_capacity(n);
    for _ in 0..n {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"POST /slow HTTP/1.1\r\nhost: backend\r\ncontent-length: 1000\r\n\r\nabc")
            .await
            .unwrap();
        held.push(s);
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while slow.load(Ordering::SeqCst) < seen_then {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the app saw {} of the stalled requests",
            slow.load(Ordering::SeqCst)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    held
}

/// One local client's requests whose bodies never finish take every stream the upstream allows on
/// an h2 connection (hyper's default, 200): another client's request goes on another connection
/// and is answered at once, not when the stalled ones time out. Once `max_upstream_h2_connections`
/// are full, a request is answered 503 at once; when the stalled ones go, requests pass again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_streams_filling_an_upstream_connection_do_not_hold_up_other_requests() {
    let pki = TestPki::new();
    let (app, slow) = app().await;
    let long = Duration::from_secs(60);
    let (a, _b) = pair(
        &pki,
        "127.0.0.92",
        app,
        Limits {
            request_timeout: long,
            ..Default::default()
        },
        Limits {
            request_timeout: long,
            max_upstream_h2_connections: 2,
            ..Default::default()
        },
    )
    .await;
    let outbound = a.outbound[0];
    let mut held = stall(outbound, 200, &slow, 200).await;
    let (status, body) = ask(outbound, POST).await;
    assert_eq!((status, body.as_str()), (200, "ok"));

    held.extend(stall(outbound, 200, &slow, 400).await);
    let (status, body) = ask(outbound, POST).await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("--max-upstream-h2-connections"), "{body}");

    drop(held);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (status, body) = ask(outbound, POST).await;
        if status == 200 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "still {status} 10 s after the stalled requests went: {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Sidecar A with an HTTP outbound to `upstream` (as B) that may open one h2 connection to it,
/// waiting up to a minute for each answer.
async fn one_connection_outbound(pki: &TestPki, upstream: std::net::SocketAddr) -> TestSidecar {
    TestSidecar::start(
        pki,
        &pki.workload(A),
        A,
        SidecarSpec {
            outbound: vec![(upstream.to_string(), B.to_string(), Protocol::Http)],
            limits: Some(Limits {
                request_timeout: Duration::from_secs(60),
                max_upstream_h2_connections: 1,
                ..Default::default()
            }),
            ..Default::default()
        },
    )
    .await
}

/// An upstream (holding the expected identity) that advertises the largest stream limit h2 allows
/// (`SETTINGS_MAX_CONCURRENT_STREAMS` 2^31-1) and answers nothing gets at most 200 of our streams
/// on a connection: with `--max-upstream-h2-connections 1`, the request after the 200th is
/// answered 503 at once. Before, the outbound went by the upstream's limit alone: it never opened
/// another connection nor answered 503, and sent every further request there to wait for its
/// timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_allowing_endless_streams_gets_no_more_than_ours_per_connection() {
    let pki = TestPki::new();
    let (upstream, streams, connections) = silent_upstream(pki.workload(B)).await;
    let a = one_connection_outbound(&pki, upstream).await;
    let mut held = Vec::with_capacity(200);
    for _ in 0..200 {
        let mut s = TcpStream::connect(a.outbound[0]).await.unwrap();
        s.write_all(POST).await.unwrap();
        held.push(s);
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while streams.load(Ordering::SeqCst) < 200 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the upstream got {} of the requests",
            streams.load(Ordering::SeqCst)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (status, body) = ask(a.outbound[0], POST).await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("--max-upstream-h2-connections"), "{body}");
    assert_eq!(connections.load(Ordering::SeqCst), 1);
    drop(held);
}

/// An h2 upstream presenting `workload` that allows 2^31-1 streams at once and answers none of
/// them (it keeps every request); counts the streams and connections it got.
async fn silent_upstream(workload: Workload) -> (SocketAddr, Arc<AtomicUsize>, Arc<AtomicUsize>) {
    counting_upstream(workload, Answer::None).await
}

/// What a [`counting_upstream`] does with each request.
#[derive(Clone, Copy)]
enum Answer {
    /// Keeps it unanswered.
    None,
    /// Answers its head and one byte of a body it never ends, and sends GOAWAY after every so
    /// many streams of a connection (keeping their exchanges).
    HeadsThenGoaway(usize),
}

/// An h2 upstream presenting `workload` that allows 2^31-1 streams at once and treats each as
/// `answer` says; counts the streams and connections it got.
async fn counting_upstream(
    workload: Workload,
    answer: Answer,
) -> (SocketAddr, Arc<AtomicUsize>, Arc<AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let acceptor = workload.upstream_acceptor(&[b"h2"]);
    let streams = Arc::new(AtomicUsize::new(0));
    let connections = Arc::new(AtomicUsize::new(0));
    let (counted, dialed) = (streams.clone(), connections.clone());
    tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
            let (acceptor, counted) = (acceptor.clone(), counted.clone());
            dialed.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let Ok(mut conn) = h2::server::Builder::new()
                    .max_concurrent_streams((1 << 31) - 1)
                    .handshake::<_, bytes::Bytes>(tls)
                    .await
                else {
                    return;
                };
                let (mut kept, mut bodies, mut here) = (Vec::new(), Vec::new(), 0);
                while let Some(Ok((req, mut respond))) = conn.accept().await {
                    counted.fetch_add(1, Ordering::SeqCst);
                    here += 1;
                    match answer {
                        Answer::None => kept.push((req, respond)),
                        Answer::HeadsThenGoaway(every) => {
                            let head = http::Response::builder().status(200).body(()).unwrap();
                            if let Ok(mut body) = respond.send_response(head, false) {
                                let _ = body.send_data(bytes::Bytes::from_static(b"x"), false);
                                bodies.push(body);
                            }
                            if here == every {
                                conn.graceful_shutdown();
                            }
                        }
                    }
                }
                if matches!(answer, Answer::HeadsThenGoaway(_)) {
                    // The bodies stay open, and their streams with them.
                    std::future::pending::<()>().await;
                }
                drop((kept, bodies));
            });
        }
    });
    (addr, streams, connections)
}

/// An upstream that accepts TCP connections and reads what comes (a ClientHello) but never
/// answers, until told to answer: then it drops those connections and serves new ones as a TLS
/// echo server presenting `workload`. Counts the silent connections open, and their peak.
struct BlackHole {
    addr: SocketAddr,
    open: Arc<AtomicUsize>,
    peak: Arc<AtomicUsize>,
    answer: tokio::sync::watch::Sender<bool>,
}

impl BlackHole {
    async fn start(workload: Workload) -> Self {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let acceptor = workload.upstream_acceptor(&[]);
        let (answer, answering) = tokio::sync::watch::channel(false);
        let open = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let (counted, highest) = (open.clone(), peak.clone());
        tokio::spawn(async move {
            while let Ok((mut tcp, _)) = l.accept().await {
                if *answering.borrow() {
                    let acceptor = acceptor.clone();
                    tokio::spawn(async move {
                        let Ok(tls) = acceptor.accept(tcp).await else {
                            return;
                        };
                        let (mut r, mut w) = tokio::io::split(tls);
                        let _ = tokio::io::copy(&mut r, &mut w).await;
                    });
                    continue;
                }
                let now = counted.fetch_add(1, Ordering::SeqCst) + 1;
                highest.fetch_max(now, Ordering::SeqCst);
                let (counted, mut answering) = (counted.clone(), answering.clone());
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    loop {
                        tokio::select! {
                            r = tcp.read(&mut buf) => if matches!(r, Ok(0) | Err(_)) {
                                break;
                            },
                            _ = answering.wait_for(|a| *a) => break,
                        }
                    }
                    counted.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        Self {
            addr,
            open,
            peak,
            answer,
        }
    }
}

/// An app that opens connection after connection to a TCP outbound whose upstream never answers
/// the TLS handshake gets at most `MAX_DIALS_IN_PROGRESS` dials to it in progress at once: each
/// further connection waits the connect timeout for one to end, then is closed, counted as a
/// handshake failure (`too_many_dials`). Once the upstream answers, connections get through again.
/// Before, every app connection dialled at once, each dial left half-open with its handshake
/// state until the handshake timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_black_holed_tcp_upstream_gets_no_more_dials_at_once_than_the_cap() {
    let pki = TestPki::new();
    let hole = BlackHole::start(pki.workload(B)).await;
    let a = TestSidecar::start(
        &pki,
        &pki.workload(A),
        A,
        SidecarSpec {
            outbound: vec![(hole.addr.to_string(), B.to_string(), Protocol::Tcp)],
            limits: Some(Limits {
                connect_timeout: Duration::from_secs(2),
                // The dials that got through stay in their handshakes for the whole test.
                handshake_timeout: Duration::from_secs(300),
                ..Default::default()
            }),
            ..Default::default()
        },
    )
    .await;
    let extra = 36;
    let closed = Arc::new(AtomicUsize::new(0));
    let mut apps = Vec::new();
    for _ in 0..MAX_DIALS_IN_PROGRESS + extra {
        let mut s = TcpStream::connect(a.outbound[0]).await.unwrap();
        let closed = closed.clone();
        apps.push(tokio::spawn(async move {
            // Returns when the sidecar closes the app's connection.
            let _ = s.read(&mut [0u8; 16]).await;
            closed.fetch_add(1, Ordering::SeqCst);
        }));
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (open, peak) = (
            hole.open.load(Ordering::SeqCst),
            hole.peak.load(Ordering::SeqCst),
        );
        assert!(
            peak <= MAX_DIALS_IN_PROGRESS,
            "{peak} dials reached the upstream at once"
        );
        let gone = closed.load(Ordering::SeqCst);
        if open == MAX_DIALS_IN_PROGRESS && gone >= extra {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "after 30 s: {open} dials at the upstream, {gone} app connections closed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(closed.load(Ordering::SeqCst), extra);
    let m = a.metrics().await;
    assert_eq!(
        metric(
            &m,
            "meshid_sidecar_tls_handshake_failures_total{",
            &[r#"reason="too_many_dials""#]
        ),
        extra as u64,
        "{m}"
    );

    // The upstream answers: the dials it held fail, and new connections get through.
    hole.answer.send_replace(true);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let mut s = TcpStream::connect(a.outbound[0]).await.unwrap();
        s.write_all(b"ping").await.unwrap();
        let mut echoed = [0u8; 4];
        let got = tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut echoed)).await;
        if matches!(got, Ok(Ok(_))) && &echoed == b"ping" {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no echo through the outbound 30 s after the upstream began answering"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(hole.peak.load(Ordering::SeqCst) <= MAX_DIALS_IN_PROGRESS);
    for app in apps {
        app.abort();
    }
}

/// An upstream that answers each request's head, trickles nothing more of its body, and sends
/// GOAWAY after every 10 streams gets no more streams from us than the connections we may open
/// hold (`--max-upstream-h2-connections` of 200): past that, 503. Before, each GOAWAY had the
/// outbound open a new connection while the old one drained, its streams outside every cap: the
/// streams held, their connections and file descriptors grew without bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_keeps_sending_goaway_gets_no_more_streams_than_the_cap() {
    let pki = TestPki::new();
    let (upstream, streams, connections) =
        counting_upstream(pki.workload(B), Answer::HeadsThenGoaway(10)).await;
    let a = one_connection_outbound(&pki, upstream).await;
    let mut held = Vec::new();
    let mut refused = 0;
    for _ in 0..230 {
        let mut s = TcpStream::connect(a.outbound[0]).await.unwrap();
        s.write_all(POST).await.unwrap();
        let mut head = Vec::new();
        let mut b = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut b))
                .await
                .expect("no response head within 10 s")
                .unwrap();
            assert_eq!(n, 1, "closed: {}", String::from_utf8_lossy(&head));
            head.push(b[0]);
        }
        let head = String::from_utf8_lossy(&head).into_owned();
        if head.starts_with("HTTP/1.1 503") {
            refused += 1;
        } else {
            assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        }
        held.push(s);
    }
    assert_eq!(
        streams.load(Ordering::SeqCst),
        200,
        "streams the upstream got"
    );
    assert_eq!(refused, 30);
    assert!(
        connections.load(Ordering::SeqCst) >= 20,
        "a GOAWAY every 10 streams"
    );
    drop(held);
}

//! streamgate's load generator: `cargo bench --bench load -- <scenario>…` (no scenario: all).
//! Talks only to loopback, bounded in count and time, and prints one table: scenario, target,
//! figure, peer figure, ratio. Peers run in the same run, against the same `redis-server` (one the
//! bench starts on a free port): raw Redis (`redis-benchmark`, and this program's own
//! XREADGROUP/XACK loop), webdis and nginx + nchan (`bench/peers/`; skipped, and said so, when not
//! installed: `bench/peers/install.sh`).
//!
//! Scenarios (SPEC section 7):
//! - `publish`: one message per request, 50 keep-alive connections, 5 s: vs webdis's XADD over
//!   HTTP and `redis-benchmark XADD -c 50`.
//! - `batch`: 100 messages per request, 50 connections, 5 s: vs `redis-benchmark XADD -c 50 -P 64`.
//! - `fanout`: 1,000 SSE subscribers × 1,000 messages, every delivery counted: vs nchan (Redis
//!   mode); then publish-to-receipt latency for 100 subscribers at 20 messages/s for 5 s.
//! - `group`: 10 SSE consumers of one group consuming and finishing 200,000 messages: vs 10 raw
//!   Redis clients running XREADGROUP COUNT 100 + XACK.
//! - `idle`: resident memory per idle SSE subscriber over HTTP/1.1 (target ≤ 3 KiB), per idle SSE
//!   stream over HTTP/2 (≤ 2 KiB) and per idle (subscribed) WebSocket (≤ 4 KiB), 10,000 of each:
//!   10,000 connections for HTTP/1.1 and WebSocket; for HTTP/2, 100 h2c connections (prior
//!   knowledge, on the plain listener) of 100 SSE streams each, every stream held open once its
//!   200 response head has come. Each is measured on a fresh streamgate after one warm-up
//!   connection (of one stream for HTTP/2), as the growth of its resident memory. A server that
//!   does not speak h2c gets a row that says so.
//! - `durable`: the embedded engine on disk against streamgate on a Redis with an append-only
//!   file, `storage.fsync` = `appendfsync` = `everysec`, then `always`: publish (50 connections,
//!   5 s) and batch (100 per request).
//! - `memory`: resident memory of the embedded engine (default 64 MiB cache) while 1 GiB of
//!   1 KB messages is written (batches of 100, 4 connections) and then read back in full.
//! - `cluster`: publish and group (as above) with streamgate on a local Redis Cluster of three
//!   masters against streamgate on one Redis node, side by side; then, on a cluster of three
//!   masters with a replica each, publish with `redis.wait_replicas = 1` against 0.
//!
//! Every client here is a minimal HTTP/1.1 client on a raw socket (the same one for streamgate and
//! for the peers), so the load generator's own cost stays small and equal; the one HTTP/2 client
//! (idle streams) is the `h2` crate's, with nothing on top.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

// The test suite's local Redis Cluster, shared rather than written twice.
#[allow(dead_code)]
#[path = "../tests/it/helpers/redis_cluster.rs"]
mod redis_cluster;
#[allow(dead_code)]
#[path = "../tests/it/helpers/redis_server.rs"]
mod redis_server;
use redis_cluster::RedisCluster;

const TOKEN: &str = "bench-token";

/// One line of the report.
struct Row {
    scenario: String,
    target: String,
    figure: String,
    peer: String,
    ratio: String,
}

/// A streamgate (release build) on a free loopback port, in a temporary working directory of its
/// own (where the embedded engine keeps its data unless told otherwise).
struct Server {
    child: Child,
    pub address: String,
    _cwd: tempfile::TempDir,
}

impl Server {
    fn start(extra: &[&str]) -> Server {
        Server::start_with_env(extra, &[])
    }

    fn start_with_env(extra: &[&str], env: &[(&str, &str)]) -> Server {
        let cwd = tempfile::tempdir().expect("tempdir");
        let mut child = Command::new(env!("CARGO_BIN_EXE_streamgate"))
            .current_dir(cwd.path())
            .args([
                "--bearer-token",
                TOKEN,
                "--http-address",
                "127.0.0.1:0",
                "--log-level",
                "warn",
            ])
            .args(extra)
            .env("STREAMGATE_LIMITS__MAX_CONNECTIONS", "30000")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start streamgate");
        let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        let address = lines
            .by_ref()
            .map_while(Result::ok)
            .find_map(|line| line.strip_prefix("listening on http://").map(str::to_owned))
            .expect("streamgate did not start");
        // Keep reading the rest of the banner so that it never meets a closed pipe.
        std::thread::spawn(move || lines.for_each(drop));
        Server {
            child,
            address,
            _cwd: cwd,
        }
    }

    /// Resident memory in bytes.
    fn rss(&self) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).expect("status");
        let kib: u64 = status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS");
        kib * 1024
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A response being read: what arrived after its head in the reads that found the head (the
/// first events may come in the same packet), then the socket.
type Opened = tokio::io::Chain<std::io::Cursor<Vec<u8>>, TcpStream>;

/// Sends `request` and reads until the end of the response head.
async fn open(address: &str, request: &[u8], expect: &str) -> Opened {
    let mut socket = TcpStream::connect(address).await.expect("connect");
    socket.write_all(request).await.expect("write");
    let mut head = Vec::new();
    let mut buffer = [0u8; 1024];
    let end = loop {
        if let Some(at) = find(&head, b"\r\n\r\n") {
            break at + 4;
        }
        let n = socket.read(&mut buffer).await.expect("read");
        assert!(n > 0, "closed before the response");
        head.extend_from_slice(&buffer[..n]);
    };
    let text = String::from_utf8_lossy(&head[..end]);
    assert!(text.starts_with(expect), "unexpected response: {text}");
    let rest = head.split_off(end);
    std::io::Cursor::new(rest).chain(socket)
}

/// A masked client text frame (RFC 6455), as a WebSocket client must send.
fn client_text_frame(text: &str) -> Vec<u8> {
    let payload = text.as_bytes();
    assert!(payload.len() < 126);
    let mask = [0x12, 0x34, 0x56, 0x78];
    let mut frame = vec![0x81, 0x80 | payload.len() as u8];
    frame.extend_from_slice(&mask);
    frame.extend(
        payload
            .iter()
            .enumerate()
            .map(|(index, byte)| byte ^ mask[index % 4]),
    );
    frame
}

/// Runs `open_one` `n` times, `parallel` at a time, and returns what each run opened.
async fn open_many<T, F, Fut>(n: usize, parallel: usize, open_one: F) -> Vec<T>
where
    T: Send + 'static,
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = T> + Send + 'static,
{
    let mut opened = Vec::with_capacity(n);
    while opened.len() < n {
        let batch: Vec<_> = (0..parallel.min(n - opened.len()))
            .map(|_| tokio::spawn(open_one()))
            .collect();
        for handle in batch {
            opened.push(handle.await.expect("open"));
        }
    }
    opened
}

/// Idle HTTP/1.1 connections (SSE, WebSocket) opened per measurement.
const IDLE_CONNECTIONS: usize = 10_000;
/// HTTP/2 connections of the idle SSE over HTTP/2 measurement.
const IDLE_H2_CONNECTIONS: usize = 100;
/// SSE streams on each of those connections: at most the server's limit of concurrent streams
/// per connection, which is at least 100.
const IDLE_H2_STREAMS_PER_CONNECTION: usize = 100;

/// Resident memory per idle SSE connection over HTTP/1.1, per idle SSE stream over HTTP/2 (h2c
/// with prior knowledge) and per idle subscribed WebSocket, at 10,000 of each (SPEC section 7).
async fn idle(rows: &mut Vec<Row>) {
    rows.push(idle_http1("SSE", "idle SSE over HTTP/1.1 connection", 3).await);
    rows.push(idle_h2().await);
    rows.push(idle_http1("WebSocket", "idle WebSocket connection", 4).await);
}

/// Resident memory per idle HTTP/1.1 connection of `transport` (`SSE` or `WebSocket`) at
/// `IDLE_CONNECTIONS`, against a target of `target_kib` each.
async fn idle_http1(transport: &'static str, scenario: &str, target_kib: u64) -> Row {
    let server = Server::start(&[]);
    let address = server.address.clone();
    // A warm-up connection, so one-time allocations are not counted per connection.
    let warm = open_transport(transport, &address).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = server.rss();
    let started = Instant::now();
    let sockets = open_many(IDLE_CONNECTIONS, 200, || {
        let address = address.clone();
        async move { open_transport(transport, &address).await }
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = server.rss();
    eprintln!(
        "idle {transport}: {IDLE_CONNECTIONS} connections opened in {:?}; RSS {} MiB -> {} MiB",
        started.elapsed(),
        before >> 20,
        after >> 20
    );
    drop((sockets, warm));
    idle_row(
        format!("{scenario}, {IDLE_CONNECTIONS} open"),
        target_kib,
        after.saturating_sub(before),
        IDLE_CONNECTIONS,
    )
}

/// Resident memory per idle SSE stream over HTTP/2: `IDLE_H2_CONNECTIONS` h2c connections with
/// `IDLE_H2_STREAMS_PER_CONNECTION` streams each, every stream holding its 200 response open.
/// A server that does not speak h2c gets a row that says so instead of a figure.
async fn idle_h2() -> Row {
    const TARGET_KIB: u64 = 2;
    let streams = IDLE_H2_CONNECTIONS * IDLE_H2_STREAMS_PER_CONNECTION;
    let scenario = format!(
        "idle SSE over HTTP/2 stream, {IDLE_H2_CONNECTIONS}x{IDLE_H2_STREAMS_PER_CONNECTION} open"
    );
    let server = Server::start(&[]);
    let address = server.address.clone();
    // A warm-up connection with one stream, so one-time allocations (HTTP/2 included) are not
    // counted per stream.
    let warm = match H2Connection::open(&address, 1).await {
        Ok(warm) => warm,
        Err(error) => {
            eprintln!("idle SSE over HTTP/2: skipped, h2c with prior knowledge failed: {error:#}");
            return Row {
                scenario,
                target: format!("≤ {TARGET_KIB} KiB each"),
                figure: "no h2c".into(),
                peer: "-".into(),
                ratio: "-".into(),
            };
        }
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = server.rss();
    let started = Instant::now();
    let connections: Vec<H2Connection> = open_many(IDLE_H2_CONNECTIONS, 10, || {
        let address = address.clone();
        async move { H2Connection::open(&address, IDLE_H2_STREAMS_PER_CONNECTION).await }
    })
    .await
    .into_iter()
    .collect::<anyhow::Result<_>>()
    .expect("open the idle HTTP/2 connections");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = server.rss();
    let open_streams: usize = connections.iter().map(H2Connection::open_streams).sum();
    assert_eq!(
        open_streams, streams,
        "every stream still open at the measurement"
    );
    eprintln!(
        "idle SSE over HTTP/2: {streams} streams on {IDLE_H2_CONNECTIONS} connections opened in \
         {:?}; RSS {} MiB -> {} MiB",
        started.elapsed(),
        before >> 20,
        after >> 20
    );
    drop((connections, warm));
    idle_row(scenario, TARGET_KIB, after.saturating_sub(before), streams)
}

/// The report line of an idle measurement: `grown` bytes of resident memory over `n` idle
/// connections or streams, against a target of `target_kib` each.
fn idle_row(scenario: String, target_kib: u64, grown: u64, n: usize) -> Row {
    let each = grown as f64 / n as f64;
    Row {
        scenario,
        target: format!("≤ {target_kib} KiB each"),
        figure: format!("{:.1} KiB", each / 1024.0),
        peer: "-".into(),
        ratio: format!("{:.2}x of target", each / (target_kib * 1024) as f64),
    }
}

/// Opens one idle HTTP/1.1 connection: an SSE subscription to `idle` up to its response head, or
/// a WebSocket subscribed to `idle`.
async fn open_transport(transport: &str, address: &str) -> Opened {
    if transport == "SSE" {
        let request = format!(
            "GET /api/streams/idle/events HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer {TOKEN}\r\n\r\n"
        );
        open(address, request.as_bytes(), "HTTP/1.1 200").await
    } else {
        let request = format!(
            "GET /ws?token={TOKEN} HTTP/1.1\r\nHost: bench\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        let mut socket = open(address, request.as_bytes(), "HTTP/1.1 101").await;
        let subscribe = client_text_frame(r#"{"type":"subscribe","topics":["idle"]}"#);
        socket
            .get_mut()
            .1
            .write_all(&subscribe)
            .await
            .expect("subscribe");
        let mut reply = [0u8; 256];
        let n = socket.read(&mut reply).await.expect("subscribed");
        assert!(String::from_utf8_lossy(&reply[..n]).contains("subscribed"));
        socket
    }
}

/// How long opening one HTTP/2 connection and all its streams may take before the bench gives up
/// (a server that never answers, or one whose stream limit is below the streams asked for).
const H2_OPEN_TIMEOUT: Duration = Duration::from_secs(30);

/// An HTTP/2 connection (h2c with prior knowledge, as `curl --http2-prior-knowledge` speaks it)
/// holding SSE subscriptions to `idle` open: the `h2` crate's client, nothing on top. The
/// responses are kept, bodies unread, so that every stream stays open until this is dropped.
struct H2Connection {
    /// Kept so that the connection is not closed for want of a handle to send on.
    _send_request: h2::client::SendRequest<bytes::Bytes>,
    responses: Vec<hyper::Response<h2::RecvStream>>,
    /// The task driving the connection's I/O; aborted on drop.
    driver: tokio::task::JoinHandle<()>,
}

impl H2Connection {
    /// Connects to `address` and opens `streams` SSE subscriptions, each up to its 200 response
    /// head.
    async fn open(address: &str, streams: usize) -> anyhow::Result<H2Connection> {
        tokio::time::timeout(H2_OPEN_TIMEOUT, H2Connection::open_now(address, streams))
            .await
            .map_err(|_| {
                anyhow::anyhow!(
                    "{streams} streams not all answered within {H2_OPEN_TIMEOUT:?} (is the \
                     server's limit of concurrent streams lower?)"
                )
            })?
    }

    /// `open` without its time limit.
    async fn open_now(address: &str, streams: usize) -> anyhow::Result<H2Connection> {
        use anyhow::Context as _;

        let socket = TcpStream::connect(address).await.context("connect")?;
        socket.set_nodelay(true).context("nodelay")?;
        // One stream until the server's SETTINGS tell its limit: h2 then queues the streams
        // above that limit instead of sending them to be refused.
        let (mut send_request, connection) = h2::client::Builder::new()
            .initial_max_send_streams(1)
            .handshake(socket)
            .await
            .context("HTTP/2 handshake")?;
        let driver = tokio::spawn(async move {
            if let Err(error) = connection.await {
                eprintln!("idle HTTP/2 connection ended: {error}");
            }
        });
        let mut pending = Vec::with_capacity(streams);
        for _ in 0..streams {
            send_request = send_request.ready().await.context("stream slot")?;
            let (response, _request_body) = send_request
                .send_request(sse_request(address)?, true)
                .context("send the request")?;
            pending.push(response);
        }
        let responses = futures_util::future::try_join_all(pending)
            .await
            .context("response head")?;
        if let Some(response) = responses.iter().find(|response| response.status() != 200) {
            driver.abort();
            anyhow::bail!("answered {} instead of 200", response.status());
        }
        Ok(H2Connection {
            _send_request: send_request,
            responses,
            driver,
        })
    }

    /// How many of this connection's streams the server has not ended.
    fn open_streams(&self) -> usize {
        self.responses
            .iter()
            .filter(|response| !response.body().is_end_stream())
            .count()
    }
}

impl Drop for H2Connection {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

/// The SSE subscription to `idle` as an HTTP/2 request to `address`.
fn sse_request(address: &str) -> anyhow::Result<hyper::Request<()>> {
    Ok(
        hyper::Request::get(format!("http://{address}/api/streams/idle/events"))
            .header("authorization", format!("Bearer {TOKEN}"))
            .body(())?,
    )
}

/// The payload of every published message, the same for streamgate and the peers (~120 bytes).
const PAYLOAD: &str = r#"{"order":12345,"customer":"c-0042","items":["a-1","b-2","c-3"],"total":12.5,"note":"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"}"#;
/// Client connections of the publish scenarios.
const CONNECTIONS: usize = 50;
/// How long each publish measurement runs.
const RUN_FOR: Duration = Duration::from_secs(5);

/// A `redis-server` of the bench's own on a free loopback port, without persistence unless
/// asked (its files then go to a temporary directory of its own).
struct Redis {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Redis {
    fn start() -> Redis {
        Redis::start_with(&["--appendonly", "no"])
    }

    fn start_with(persistence: &[&str]) -> Redis {
        let port = free_port();
        let dir = tempfile::tempdir().expect("tempdir");
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--maxclients", "20000", "--dir"])
            .arg(dir.path())
            .args(persistence)
            .stdout(Stdio::null())
            .spawn()
            .expect("start redis-server");
        let redis = Redis {
            child,
            port,
            _dir: dir,
        };
        for _ in 0..100 {
            if std::net::TcpStream::connect(redis.address()).is_ok() {
                return redis;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("redis-server did not start");
    }

    fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn url(&self) -> String {
        format!("redis://{}", self.address())
    }

    /// Runs one command with `redis-cli`.
    fn cli(&self, args: &[&str]) -> String {
        let output = Command::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(args)
            .output()
            .expect("redis-cli");
        String::from_utf8_lossy(&output.stdout).trim().to_owned()
    }

    /// `redis-benchmark` of `XADD bench-rb * data PAYLOAD`: requests per second.
    fn benchmark_xadd(&self, pipeline: usize, requests: usize) -> f64 {
        let output = Command::new("redis-benchmark")
            .args(["-p", &self.port.to_string(), "-c", &CONNECTIONS.to_string()])
            .args([
                "-n",
                &requests.to_string(),
                "-P",
                &pipeline.to_string(),
                "--csv",
            ])
            .args(["XADD", "bench-rb", "*", "data", PAYLOAD])
            .output()
            .expect("redis-benchmark");
        let text = String::from_utf8_lossy(&output.stdout);
        // "test","rps",… (8 columns) then "XADD bench-rb * data …","123456.78",…: the payload
        // has commas, so count from the end.
        text.lines()
            .nth(1)
            .and_then(|line| line.rsplit(',').nth(6))
            .and_then(|rps| rps.trim_matches('"').parse().ok())
            .unwrap_or_else(|| panic!("redis-benchmark said: {text}"))
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|address| address.port())
        .expect("a free port")
}

/// webdis and nginx + nchan (`bench/peers/`), when installed; stopped on drop.
struct Peers {
    webdis: String,
    nchan: String,
}

impl Peers {
    fn start(redis: &Redis) -> Option<Peers> {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/bench/peers");
        let (webdis, nchan) = (free_port(), free_port());
        let started = Command::new(format!("{dir}/start.sh"))
            .args([redis.port, webdis, nchan].map(|port| port.to_string()))
            .stdout(Stdio::null())
            .status();
        if !started.is_ok_and(|status| status.success()) {
            eprintln!(
                "!!! webdis/nchan not started: run bench/peers/install.sh; their rows stay empty"
            );
            return None;
        }
        Some(Peers {
            webdis: format!("127.0.0.1:{webdis}"),
            nchan: format!("127.0.0.1:{nchan}"),
        })
    }
}

impl Drop for Peers {
    fn drop(&mut self) {
        let stop = concat!(env!("CARGO_MANIFEST_DIR"), "/bench/peers/stop.sh");
        let _ = Command::new(stop).stdout(Stdio::null()).status();
    }
}

/// A keep-alive HTTP/1.1 connection that sends whole requests and reads whole responses
/// (`Content-Length` bodies).
struct Connection {
    socket: TcpStream,
    buffer: Vec<u8>,
}

impl Connection {
    async fn open(address: &str) -> Connection {
        let socket = TcpStream::connect(address).await.expect("connect");
        socket.set_nodelay(true).expect("nodelay");
        Connection {
            socket,
            buffer: Vec::with_capacity(4096),
        }
    }

    /// Sends `request`; returns the status and the body.
    async fn call(&mut self, request: &[u8]) -> (u16, Vec<u8>) {
        self.socket.write_all(request).await.expect("write");
        let head_end = loop {
            if let Some(end) = find(&self.buffer, b"\r\n\r\n") {
                break end + 4;
            }
            self.fill().await;
        };
        let head = String::from_utf8_lossy(&self.buffer[..head_end]).to_ascii_lowercase();
        let status = head[9..12].parse().expect("status");
        let length: usize = head
            .lines()
            .find_map(|line| line.strip_prefix("content-length:"))
            .map(|value| value.trim().parse().expect("content-length"))
            .unwrap_or(0);
        while self.buffer.len() < head_end + length {
            self.fill().await;
        }
        let body = self.buffer[head_end..head_end + length].to_vec();
        self.buffer.drain(..head_end + length);
        (status, body)
    }

    async fn fill(&mut self) {
        let mut chunk = [0u8; 16384];
        let n = self.socket.read(&mut chunk).await.expect("read");
        assert!(n > 0, "the server closed the connection");
        self.buffer.extend_from_slice(&chunk[..n]);
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack
        .windows(needle.len())
        .position(|window| window == needle)
}

/// The whole number right after `key` (e.g. `"t":`) in a JSON text, without parsing the rest.
fn number_after(text: &[u8], key: &[u8]) -> Option<u64> {
    let rest = &text[find(text, key)? + key.len()..];
    let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    std::str::from_utf8(&rest[..digits]).ok()?.parse().ok()
}

fn post(path: &str, host: &str, body: &str, extra_headers: &str) -> Vec<u8> {
    format!(
        "POST {path} HTTP/1.1\r\nHost: {host}\r\n{extra_headers}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

fn auth() -> String {
    format!("Authorization: Bearer {TOKEN}\r\n")
}

/// Requests per second and latency percentiles of `CONNECTIONS` clients repeating one request
/// for `RUN_FOR`; `ok` checks each answer.
struct Throughput {
    per_second: f64,
    p50: Duration,
    p99: Duration,
}

async fn hammer(address: &str, request: Vec<u8>, ok: fn(u16, &[u8]) -> bool) -> Throughput {
    let request = std::sync::Arc::new(request);
    let started = Instant::now();
    let tasks: Vec<_> = (0..CONNECTIONS)
        .map(|_| {
            let (address, request) = (address.to_owned(), request.clone());
            tokio::spawn(async move {
                let mut connection = Connection::open(&address).await;
                let mut latencies = Vec::new();
                while started.elapsed() < RUN_FOR {
                    let sent = Instant::now();
                    let (status, body) = connection.call(&request).await;
                    latencies.push(sent.elapsed());
                    assert!(
                        ok(status, &body),
                        "{status} {}",
                        String::from_utf8_lossy(&body)
                    );
                }
                latencies
            })
        })
        .collect();
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.extend(task.await.expect("client"));
    }
    let elapsed = started.elapsed();
    latencies.sort();
    Throughput {
        per_second: latencies.len() as f64 / elapsed.as_secs_f64(),
        p50: latencies[latencies.len() / 2],
        p99: latencies[latencies.len() * 99 / 100],
    }
}

fn created(status: u16, _: &[u8]) -> bool {
    status == 201
}

fn ratio(figure: f64, peer: f64) -> String {
    format!("{:.2}x", figure / peer)
}

fn rate(per_second: f64) -> String {
    if per_second >= 10_000.0 {
        format!("{:.1}k/s", per_second / 1000.0)
    } else {
        format!("{per_second:.0}/s")
    }
}

/// Scenario 1: one message per request.
/// streamgate's publish throughput: one message per request to `bench-pub`.
async fn publish_rate(server: &Server) -> Throughput {
    let body = format!(r#"{{"data":{PAYLOAD}}}"#);
    let request = post("/api/streams/bench-pub/messages", "bench", &body, &auth());
    hammer(&server.address, request, created).await
}

async fn publish(rows: &mut Vec<Row>, server: &Server, redis: &Redis, peers: Option<&Peers>) {
    let ours = publish_rate(server).await;
    eprintln!(
        "publish: streamgate {:.0}/s p50 {:?} p99 {:?}",
        ours.per_second, ours.p50, ours.p99
    );
    let figure = format!("{} p99 {:.1}ms", rate(ours.per_second), ms(ours.p99));
    if let Some(peers) = peers {
        let request = format!(
            "PUT /XADD/bench-webdis/*/data HTTP/1.1\r\nHost: bench\r\nContent-Length: {}\r\n\r\n{PAYLOAD}",
            PAYLOAD.len()
        );
        let webdis = hammer(&peers.webdis, request.into_bytes(), |status, body| {
            status == 200 && find(body, b"{\"XADD\":\"").is_some()
        })
        .await;
        eprintln!(
            "publish: webdis {:.0}/s p50 {:?} p99 {:?}",
            webdis.per_second, webdis.p50, webdis.p99
        );
        rows.push(Row {
            scenario: "publish 1/request, 50 conns: vs webdis".into(),
            target: "≥ 1.5x".into(),
            figure: figure.clone(),
            peer: format!("{} p99 {:.1}ms", rate(webdis.per_second), ms(webdis.p99)),
            ratio: ratio(ours.per_second, webdis.per_second),
        });
    }
    let raw = redis.benchmark_xadd(1, 200_000);
    rows.push(Row {
        scenario: "publish 1/request, 50 conns: vs redis-benchmark".into(),
        target: "≥ 1x".into(),
        figure,
        peer: rate(raw),
        ratio: ratio(ours.per_second, raw),
    });
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

/// Scenario 2: 100 messages per request.
async fn batch(rows: &mut Vec<Row>, server: &Server, redis: &Redis) {
    let messages = vec![PAYLOAD; 100].join(",");
    let body = format!(r#"{{"messages":[{messages}]}}"#);
    let request = post(
        "/api/streams/bench-batch/messages/batch",
        "bench",
        &body,
        &auth(),
    );
    let ours = hammer(&server.address, request, created).await;
    let per_second = ours.per_second * 100.0;
    let raw = redis.benchmark_xadd(64, 2_000_000);
    eprintln!("batch: streamgate {per_second:.0} messages/s, redis-benchmark -P 64 {raw:.0}/s");
    rows.push(Row {
        scenario: "batch 100/request, 50 conns: vs -P 64".into(),
        target: "≥ 0.8x".into(),
        figure: rate(per_second),
        peer: rate(raw),
        ratio: ratio(per_second, raw),
    });
}

/// Scenario: the embedded engine on disk against streamgate on a Redis that persists the same way
/// (`storage.fsync` = Redis's `appendfsync`), publish and batch, each pair run back to back.
async fn durable(rows: &mut Vec<Row>) {
    let single = post(
        "/api/streams/bench-durable/messages",
        "bench",
        &format!(r#"{{"data":{PAYLOAD}}}"#),
        &auth(),
    );
    let messages = vec![PAYLOAD; 100].join(",");
    let batch = post(
        "/api/streams/bench-durable-batch/messages/batch",
        "bench",
        &format!(r#"{{"messages":[{messages}]}}"#),
        &auth(),
    );
    for policy in ["everysec", "always"] {
        let redis = Redis::start_with(&["--appendonly", "yes", "--appendfsync", policy]);
        let on_redis = Server::start(&["--redis-url", &redis.url()]);
        let on_disk = Server::start_with_env(
            &["--data-dir", "data"],
            &[("STREAMGATE_STORAGE__FSYNC", policy)],
        );
        for (kind, request, per_request) in
            [("publish", &single, 1.0), ("batch 100", &batch, 100.0)]
        {
            let disk = hammer(&on_disk.address, request.clone(), created).await;
            let aof = hammer(&on_redis.address, request.clone(), created).await;
            let (disk_rate, aof_rate) =
                (disk.per_second * per_request, aof.per_second * per_request);
            eprintln!(
                "durable {kind} ({policy}): embedded {disk_rate:.0}/s p99 {:?}, on Redis AOF {aof_rate:.0}/s p99 {:?}",
                disk.p99, aof.p99
            );
            rows.push(Row {
                scenario: format!("{kind}, fsync {policy}: embedded vs Redis AOF"),
                target: "≥ 1x".into(),
                figure: format!("{} p99 {:.1}ms", rate(disk_rate), ms(disk.p99)),
                peer: format!("{} p99 {:.1}ms", rate(aof_rate), ms(aof.p99)),
                ratio: ratio(disk_rate, aof_rate),
            });
        }
    }
}

/// Scenario: resident memory of the embedded engine (default 64 MiB cache) while 1 GiB of
/// messages is written and then read back in full.
async fn memory(rows: &mut Vec<Row>) {
    const MESSAGE_BYTES: usize = 1000;
    const PER_REQUEST: usize = 100;
    const TOTAL_BYTES: usize = 1 << 30;
    const WRITERS: usize = 4;
    let server = std::sync::Arc::new(Server::start(&["--data-dir", "data"]));
    let message = format!(r#"{{"pad":"{}"}}"#, "x".repeat(MESSAGE_BYTES - 10));
    let messages = vec![message.as_str(); PER_REQUEST].join(",");
    let request = std::sync::Arc::new(post(
        "/api/streams/bench-memory/messages/batch",
        "bench",
        &format!(r#"{{"messages":[{messages}]}}"#),
        &auth(),
    ));
    // Resident memory sampled every 100 ms while the phases run.
    let peak = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let sampling = {
        let (server, peak) = (server.clone(), peak.clone());
        tokio::spawn(async move {
            loop {
                peak.fetch_max(server.rss(), std::sync::atomic::Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let requests = TOTAL_BYTES / (MESSAGE_BYTES * PER_REQUEST);
    let started = Instant::now();
    let writers: Vec<_> = (0..WRITERS)
        .map(|_| {
            let (address, request) = (server.address.clone(), request.clone());
            tokio::spawn(async move {
                let mut connection = Connection::open(&address).await;
                for _ in 0..requests / WRITERS {
                    let (status, body) = connection.call(&request).await;
                    assert_eq!(status, 201, "{}", String::from_utf8_lossy(&body));
                }
            })
        })
        .collect();
    for writer in writers {
        writer.await.expect("writer");
    }
    let written = started.elapsed();
    let write_peak = peak.swap(0, std::sync::atomic::Ordering::Relaxed);
    let started = Instant::now();
    let mut connection = Connection::open(&server.address).await;
    let (mut from, mut read) = ("-".to_owned(), 0usize);
    loop {
        let request = format!(
            "GET /api/streams/bench-memory/messages?count=1000&from={from} HTTP/1.1\r\nHost: bench\r\n{}\r\n",
            auth()
        );
        let (status, body) = connection.call(request.as_bytes()).await;
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
        let page: serde_json::Value = serde_json::from_slice(&body).expect("JSON");
        read += page["messages"].as_array().map_or(0, Vec::len);
        match page["next"].as_str() {
            Some(next) => from = next.to_owned(),
            None => break,
        }
    }
    let read_time = started.elapsed();
    let read_peak = peak.load(std::sync::atomic::Ordering::Relaxed);
    sampling.abort();
    let stored = requests / WRITERS * WRITERS * PER_REQUEST;
    assert_eq!(read, stored, "every message read back");
    let gib = (stored * MESSAGE_BYTES) as f64 / f64::from(1 << 30);
    eprintln!(
        "memory: wrote {gib:.2} GiB in {written:?} (peak RSS {} MiB), read it back in {read_time:?} (peak RSS {} MiB)",
        write_peak >> 20,
        read_peak >> 20
    );
    for (phase, peak) in [("writing", write_peak), ("reading back", read_peak)] {
        rows.push(Row {
            scenario: format!("embedded, {gib:.1} GiB, 64 MiB cache: {phase}"),
            target: "≤ 300 MiB".into(),
            figure: format!("{} MiB peak", peak >> 20),
            peer: "-".into(),
            ratio: format!("{:.2}x of target", peak as f64 / (300u64 << 20) as f64),
        });
    }
}

/// Microseconds since the bench started: the publish time carried in fan-out payloads.
fn now_micros() -> u64 {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_micros() as u64
}

/// A broadcast endpoint under test: where to subscribe and how to publish one message.
#[derive(Clone)]
struct Broadcaster {
    address: String,
    subscribe: String,
    publish_path: String,
    /// streamgate wraps the message as `{"data": …}`; nchan takes the body as it is.
    wrap: bool,
    headers: String,
}

impl Broadcaster {
    fn streamgate(server: &Server, stream: &str) -> Broadcaster {
        Broadcaster {
            address: server.address.clone(),
            subscribe: format!(
                "GET /api/streams/{stream}/events HTTP/1.1\r\nHost: bench\r\n{}\r\n",
                auth()
            ),
            publish_path: format!("/api/streams/{stream}/messages"),
            wrap: true,
            headers: auth(),
        }
    }

    fn nchan(peers: &Peers, channel: &str) -> Broadcaster {
        Broadcaster {
            address: peers.nchan.clone(),
            subscribe: format!(
                "GET /sub/{channel} HTTP/1.1\r\nHost: bench\r\nAccept: text/event-stream\r\n\r\n"
            ),
            publish_path: format!("/pub/{channel}"),
            wrap: false,
            headers: String::new(),
        }
    }

    fn message(&self) -> Vec<u8> {
        let message = format!(r#"{{"t":{},"body":{PAYLOAD}}}"#, now_micros());
        let body = match self.wrap {
            true => format!(r#"{{"data":{message}}}"#),
            false => message,
        };
        post(&self.publish_path, "bench", &body, &self.headers)
    }
}

/// What the subscribers got: deliveries, and each one's latency when asked for.
struct Received {
    delivered: usize,
    latencies: Vec<Duration>,
    elapsed: Duration,
}

/// `subscribers` SSE clients; `messages` published at `per_second` (0: as fast as 4 connections
/// go). Waits until every subscriber has every message, or 60 s.
async fn fan_out(
    target: &Broadcaster,
    subscribers: usize,
    messages: usize,
    per_second: u32,
) -> Received {
    let measure_latency = per_second > 0;
    let mut sockets = open_many(subscribers, 100, || {
        let target = target.clone();
        async move { open(&target.address, target.subscribe.as_bytes(), "HTTP/1.1 200").await }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    let readers: Vec<_> = sockets
        .drain(..)
        .map(|socket| {
            tokio::spawn(async move {
                let mut reader = tokio::io::BufReader::new(socket);
                let (mut count, mut latencies, mut line) = (0, Vec::new(), Vec::new());
                while count < messages {
                    line.clear();
                    let read = tokio::time::timeout_at(
                        deadline.into(),
                        tokio::io::AsyncBufReadExt::read_until(&mut reader, b'\n', &mut line),
                    );
                    match read.await {
                        Ok(Ok(n)) if n > 0 => {}
                        _ => break,
                    }
                    if !line.starts_with(b"data:") {
                        continue;
                    }
                    count += 1;
                    if measure_latency {
                        let sent = number_after(&line, b"\"t\":").expect("a timestamp");
                        latencies.push(Duration::from_micros(now_micros().saturating_sub(sent)));
                    }
                }
                (count, latencies, Instant::now())
            })
        })
        .collect();
    let started = Instant::now();
    let publishers = if measure_latency { 1 } else { 4 };
    let interval = (per_second > 0).then(|| Duration::from_secs(1) / per_second);
    let publishing: Vec<_> = (0..publishers)
        .map(|index| {
            let target = target.clone();
            tokio::spawn(async move {
                let mut connection = Connection::open(&target.address).await;
                let mut ticker = interval.map(tokio::time::interval);
                for _ in (index..messages).step_by(publishers) {
                    if let Some(ticker) = ticker.as_mut() {
                        ticker.tick().await;
                    }
                    let (status, body) = connection.call(&target.message()).await;
                    assert!(
                        status < 300,
                        "publish: {status} {}",
                        String::from_utf8_lossy(&body)
                    );
                }
            })
        })
        .collect();
    for publisher in publishing {
        publisher.await.expect("publisher");
    }
    let (mut delivered, mut latencies, mut last) = (0, Vec::new(), started);
    for reader in readers {
        let (count, mut own, finished) = reader.await.expect("subscriber");
        delivered += count;
        latencies.append(&mut own);
        last = last.max(finished);
    }
    latencies.sort();
    Received {
        delivered,
        latencies,
        elapsed: last - started,
    }
}

/// Scenario 3: fan-out throughput, then delivery latency at a steady rate.
async fn fanout(rows: &mut Vec<Row>, server: &Server, peers: Option<&Peers>) {
    const SUBSCRIBERS: usize = 1000;
    const MESSAGES: usize = 1000;
    let expected = SUBSCRIBERS * MESSAGES;
    let ours = fan_out(
        &Broadcaster::streamgate(server, "fan"),
        SUBSCRIBERS,
        MESSAGES,
        0,
    )
    .await;
    let ours_rate = ours.delivered as f64 / ours.elapsed.as_secs_f64();
    eprintln!(
        "fan-out: streamgate {} of {expected} in {:?}",
        ours.delivered, ours.elapsed
    );
    let figure = format!("{} ({}%)", rate(ours_rate), ours.delivered * 100 / expected);
    match peers {
        Some(peers) => {
            let nchan = fan_out(&Broadcaster::nchan(peers, "fan"), SUBSCRIBERS, MESSAGES, 0).await;
            let nchan_rate = nchan.delivered as f64 / nchan.elapsed.as_secs_f64();
            eprintln!(
                "fan-out: nchan {} of {expected} in {:?}",
                nchan.delivered, nchan.elapsed
            );
            rows.push(Row {
                scenario: "fan-out 1000 SSE x 1000 msgs: vs nchan".into(),
                target: "≥ 4x".into(),
                figure,
                peer: format!(
                    "{} ({}%)",
                    rate(nchan_rate),
                    nchan.delivered * 100 / expected
                ),
                ratio: ratio(ours_rate, nchan_rate),
            });
        }
        None => rows.push(Row {
            scenario: "fan-out 1000 SSE x 1000 msgs".into(),
            target: "≥ 4x nchan".into(),
            figure,
            peer: "-".into(),
            ratio: "-".into(),
        }),
    }

    let percentile =
        |received: &Received, p: usize| ms(received.latencies[received.latencies.len() * p / 100]);
    let ours = fan_out(&Broadcaster::streamgate(server, "steady"), 100, 100, 20).await;
    let peer = match peers {
        Some(peers) => {
            let nchan = fan_out(&Broadcaster::nchan(peers, "steady"), 100, 100, 20).await;
            format!("{:.2}ms", percentile(&nchan, 99))
        }
        None => "-".into(),
    };
    eprintln!(
        "latency at 20/s, 100 subscribers: {} samples, p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        ours.latencies.len(),
        percentile(&ours, 50),
        percentile(&ours, 99),
        ms(*ours.latencies.last().expect("samples"))
    );
    rows.push(Row {
        scenario: "publish-to-receipt p99, 100 SSE @ 20/s".into(),
        target: "≤ 1 ms".into(),
        figure: format!("{:.2}ms", percentile(&ours, 99)),
        peer,
        ratio: format!("{:.2}x of target", percentile(&ours, 99) / 1.0),
    });
}

/// Scenario 4: consumer group, consume + finish, against raw XREADGROUP/XACK.
/// Messages and consumers of the group scenarios.
const GROUP_MESSAGES: usize = 200_000;
const GROUP_CONSUMERS: usize = 10;

/// Publishes `GROUP_MESSAGES` to `stream`, in batches of 100.
async fn fill_group_stream(server: &Server, stream: &str) {
    let mut connection = Connection::open(&server.address).await;
    let batch = format!(r#"{{"messages":[{}]}}"#, vec![PAYLOAD; 100].join(","));
    let fill = post(
        &format!("/api/streams/{stream}/messages/batch"),
        "bench",
        &batch,
        &auth(),
    );
    for _ in 0..GROUP_MESSAGES / 100 {
        assert_eq!(connection.call(&fill).await.0, 201);
    }
}

async fn group(rows: &mut Vec<Row>, server: &Server, redis: &Redis) {
    const MESSAGES: usize = GROUP_MESSAGES;
    const CONSUMERS: usize = GROUP_CONSUMERS;
    const STREAM: &str = "bench-group";
    fill_group_stream(server, STREAM).await;
    redis.cli(&["XGROUP", "CREATE", STREAM, "raw", "0"]);

    // The raw Redis client: COUNT 100 reads, each acknowledged at once.
    let started = Instant::now();
    let client = redis::Client::open(redis.url()).expect("redis url");
    let raw: Vec<_> = (0..CONSUMERS)
        .map(|index| {
            let client = client.clone();
            tokio::spawn(async move {
                let mut connection = client
                    .get_multiplexed_async_connection()
                    .await
                    .expect("connect");
                let options = redis::streams::StreamReadOptions::default()
                    .group("raw", format!("c{index}"))
                    .count(100);
                let mut acked = 0;
                loop {
                    let reply: redis::streams::StreamReadReply =
                        redis::AsyncCommands::xread_options(
                            &mut connection,
                            &[STREAM],
                            &[">"],
                            &options,
                        )
                        .await
                        .expect("XREADGROUP");
                    let ids: Vec<String> = reply
                        .keys
                        .into_iter()
                        .flat_map(|key| key.ids)
                        .map(|entry| entry.id)
                        .collect();
                    if ids.is_empty() {
                        return acked;
                    }
                    let n: usize = redis::AsyncCommands::xack(&mut connection, STREAM, "raw", &ids)
                        .await
                        .expect("XACK");
                    acked += n;
                }
            })
        })
        .collect();
    let mut raw_acked = 0;
    for task in raw {
        raw_acked += task.await.expect("raw consumer");
    }
    let raw_rate = raw_acked as f64 / started.elapsed().as_secs_f64();
    assert_eq!(raw_acked, MESSAGES);

    let (done, ours_rate) = consume_group(server, STREAM).await;
    eprintln!(
        "group: streamgate finished {done} of {MESSAGES}; raw Redis {raw_acked} at {raw_rate:.0}/s"
    );
    rows.push(Row {
        scenario: "group consume+finish, 10 consumers".into(),
        target: "≥ 0.7x".into(),
        figure: format!("{} ({}%)", rate(ours_rate), done * 100 / MESSAGES),
        peer: rate(raw_rate),
        ratio: ratio(ours_rate, raw_rate),
    });
}

/// streamgate's group scenario on a filled `STREAM`: SSE consumers finishing what each read
/// delivered, in batches. Returns how many were finished and at what rate.
async fn consume_group(server: &Server, stream: &str) -> (usize, f64) {
    const MESSAGES: usize = GROUP_MESSAGES;
    const CONSUMERS: usize = GROUP_CONSUMERS;
    let stream = stream.to_owned();
    let finished = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let started = Instant::now();
    let consumers: Vec<_> = (0..CONSUMERS)
        .map(|index| {
            let (address, finished) = (server.address.clone(), finished.clone());
            let stream = stream.clone();
            tokio::spawn(async move {
                let subscribe = format!(
                    "GET /api/events?stream={stream}&group=g&consumer=c{index}&limit=200 HTTP/1.1\r\nHost: bench\r\n{}\r\n",
                    auth()
                );
                let socket = open(&address, subscribe.as_bytes(), "HTTP/1.1 200").await;
                let mut reader = tokio::io::BufReader::new(socket);
                let mut finisher = Connection::open(&address).await;
                let finish_path =
                    format!("/api/streams/{stream}/groups/g/consumers/c{index}/finish");
                let (mut ids, mut chunk) = (Vec::new(), Vec::new());
                loop {
                    read_chunk(&mut reader, &mut chunk).await;
                    for line in chunk.split(|&byte| byte == b'\n') {
                        if let Some(id) = line.strip_prefix(b"id: ") {
                            ids.push(format!("\"{}\"", String::from_utf8_lossy(id).trim()));
                        }
                    }
                    // Finish what has arrived once nothing more is waiting in the buffer.
                    if !ids.is_empty() && reader.buffer().is_empty() {
                        let body = format!(r#"{{"message_ids":[{}]}}"#, ids.join(","));
                        let (status, reply) =
                            finisher.call(&post(&finish_path, "bench", &body, &auth())).await;
                        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&reply));
                        let acked = number_after(&reply, b"\"acked\":").expect("acked");
                        finished.fetch_add(acked as usize, std::sync::atomic::Ordering::Relaxed);
                        ids.clear();
                    }
                }
            })
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(120);
    while finished.load(std::sync::atomic::Ordering::Relaxed) < MESSAGES
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let elapsed = started.elapsed();
    for consumer in consumers {
        consumer.abort();
    }
    let done = finished.load(std::sync::atomic::Ordering::Relaxed);
    (done, done as f64 / elapsed.as_secs_f64())
}

/// Reads the next chunk of a chunked HTTP/1.1 body (an SSE stream's) into `chunk`; panics at the
/// body's end.
async fn read_chunk(reader: &mut (impl tokio::io::AsyncBufRead + Unpin), chunk: &mut Vec<u8>) {
    use tokio::io::AsyncBufReadExt as _;

    let mut size = Vec::new();
    let n = reader.read_until(b'\n', &mut size).await.expect("read");
    assert!(n > 0, "the event stream ended");
    let size = std::str::from_utf8(&size)
        .ok()
        .and_then(|size| usize::from_str_radix(size.trim(), 16).ok())
        .unwrap_or_else(|| panic!("not a chunked body: {}", String::from_utf8_lossy(&size)));
    assert!(size > 0, "the event stream ended");
    chunk.resize(size + 2, 0);
    reader.read_exact(chunk).await.expect("read a chunk");
    assert!(chunk.ends_with(b"\r\n"), "a chunk ends with CRLF");
    chunk.truncate(size);
}

/// A streamgate on the local Redis Cluster `cluster` (every node a seed), with `env` settings.
fn cluster_server(cluster: &RedisCluster, env: &[(&str, &str)]) -> Server {
    let urls = cluster.urls().join(",");
    let mut env = env.to_vec();
    env.push(("STREAMGATE_REDIS__URLS", &urls));
    Server::start_with_env(&[], &env)
}

/// Scenario `cluster`: streamgate on a 3-master cluster against streamgate on one node, then
/// the cost of waiting for a replica.
async fn cluster(rows: &mut Vec<Row>) {
    let single_redis = Redis::start();
    let single = Server::start(&["--redis-url", &single_redis.url()]);
    let nodes = tokio::task::spawn_blocking(|| RedisCluster::start(0))
        .await
        .expect("cluster")
        .expect("redis-server and redis-cli are needed for the cluster scenario");
    let clustered = cluster_server(&nodes, &[]);

    let one = publish_rate(&single).await;
    let three = publish_rate(&clustered).await;
    eprintln!(
        "cluster publish: one node {:.0}/s, cluster {:.0}/s",
        one.per_second, three.per_second
    );
    rows.push(Row {
        scenario: "publish 1/request, 50 conns: cluster vs 1 node".into(),
        target: "≥ 0.9x".into(),
        figure: format!("{} p99 {:.1}ms", rate(three.per_second), ms(three.p99)),
        peer: format!("{} p99 {:.1}ms", rate(one.per_second), ms(one.p99)),
        ratio: ratio(three.per_second, one.per_second),
    });

    fill_group_stream(&single, "bench-group").await;
    fill_group_stream(&clustered, "bench-group").await;
    let (one_done, one_rate) = consume_group(&single, "bench-group").await;
    let (three_done, three_rate) = consume_group(&clustered, "bench-group").await;
    eprintln!(
        "cluster group: one node {one_done} at {one_rate:.0}/s, cluster {three_done} at {three_rate:.0}/s"
    );
    rows.push(Row {
        scenario: "group consume+finish: cluster vs 1 node".into(),
        target: "≥ 0.9x".into(),
        figure: format!(
            "{} ({}%)",
            rate(three_rate),
            three_done * 100 / GROUP_MESSAGES
        ),
        peer: format!("{} ({}%)", rate(one_rate), one_done * 100 / GROUP_MESSAGES),
        ratio: ratio(three_rate, one_rate),
    });
    drop((clustered, nodes, single, single_redis));

    let replicated = tokio::task::spawn_blocking(|| RedisCluster::start(1))
        .await
        .expect("cluster")
        .expect("redis-server and redis-cli are needed for the cluster scenario");
    let plain = cluster_server(&replicated, &[]);
    let waiting = cluster_server(&replicated, &[("STREAMGATE_REDIS__WAIT_REPLICAS", "1")]);
    let without = publish_rate(&plain).await;
    let with = publish_rate(&waiting).await;
    eprintln!(
        "cluster wait_replicas: 0 {:.0}/s, 1 {:.0}/s",
        without.per_second, with.per_second
    );
    rows.push(Row {
        scenario: "publish on a cluster with replicas: wait 1 vs 0".into(),
        target: "(cost)".into(),
        figure: format!("{} p99 {:.1}ms", rate(with.per_second), ms(with.p99)),
        peer: format!("{} p99 {:.1}ms", rate(without.per_second), ms(without.p99)),
        ratio: ratio(with.per_second, without.per_second),
    });
}

fn print(rows: &[Row]) {
    let widths = [48, 10, 22, 22, 18];
    println!(
        "{:<w0$} {:<w1$} {:>w2$} {:>w3$} {:>w4$}",
        "scenario",
        "target",
        "streamgate",
        "peer",
        "ratio",
        w0 = widths[0],
        w1 = widths[1],
        w2 = widths[2],
        w3 = widths[3],
        w4 = widths[4]
    );
    for row in rows {
        println!(
            "{:<w0$} {:<w1$} {:>w2$} {:>w3$} {:>w4$}",
            row.scenario,
            row.target,
            row.figure,
            row.peer,
            row.ratio,
            w0 = widths[0],
            w1 = widths[1],
            w2 = widths[2],
            w3 = widths[3],
            w4 = widths[4]
        );
    }
}

fn main() {
    let scenarios: Vec<String> = std::env::args()
        .skip(1)
        .filter(|arg| !arg.starts_with("--"))
        .collect();
    let wants =
        |name: &str| scenarios.is_empty() || scenarios.iter().any(|scenario| scenario == name);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut rows = Vec::new();
    runtime.block_on(async {
        let peer_scenarios = ["publish", "batch", "fanout", "group"];
        if peer_scenarios.iter().any(|name| wants(name)) {
            let redis = Redis::start();
            let peers = match wants("publish") || wants("fanout") {
                true => Peers::start(&redis),
                false => None,
            };
            let server = Server::start(&["--redis-url", &redis.url()]);
            if wants("publish") {
                publish(&mut rows, &server, &redis, peers.as_ref()).await;
            }
            if wants("batch") {
                batch(&mut rows, &server, &redis).await;
            }
            if wants("fanout") {
                fanout(&mut rows, &server, peers.as_ref()).await;
            }
            if wants("group") {
                group(&mut rows, &server, &redis).await;
            }
        }
        if wants("idle") {
            idle(&mut rows).await;
        }
        if wants("durable") {
            durable(&mut rows).await;
        }
        if wants("memory") {
            memory(&mut rows).await;
        }
        if wants("cluster") {
            cluster(&mut rows).await;
        }
    });
    print(&rows);
}

//! streamgate's load generator: `cargo bench --bench load -- <scenario>…` (no scenario: all).
//! Talks only to loopback, bounded in count and time, and prints one table: scenario, target,
//! figure, peer figure, ratio.
//!
//! Scenarios:
//! - `idle`: resident memory per idle SSE subscriber and per idle (subscribed) WebSocket, at
//!   10,000 connections each.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const TOKEN: &str = "bench-token";

/// One line of the report.
struct Row {
    scenario: String,
    target: String,
    figure: String,
    peer: String,
    ratio: String,
}

/// A streamgate (release build) on a free loopback port.
struct Server {
    child: Child,
    pub address: String,
}

impl Server {
    fn start(extra: &[&str]) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_streamgate"))
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
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start streamgate");
        let stdout = child.stdout.take().expect("stdout");
        let mut address = String::new();
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(url) = line.strip_prefix("listening on http://") {
                address = url.to_owned();
                break;
            }
        }
        assert!(!address.is_empty(), "streamgate did not start");
        Server { child, address }
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

/// Sends `request` and reads until the end of the response head (and a little more).
async fn open(address: &str, request: &[u8], expect: &str) -> TcpStream {
    let mut socket = TcpStream::connect(address).await.expect("connect");
    socket.write_all(request).await.expect("write");
    let mut head = Vec::new();
    let mut buffer = [0u8; 1024];
    while !head.windows(4).any(|window| window == b"\r\n\r\n") {
        let n = socket.read(&mut buffer).await.expect("read");
        assert!(n > 0, "closed before the response");
        head.extend_from_slice(&buffer[..n]);
    }
    let text = String::from_utf8_lossy(&head);
    assert!(text.starts_with(expect), "unexpected response: {text}");
    socket
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

/// Opens `n` connections with `open_one`, `parallel` at a time.
async fn open_many<F, Fut>(n: usize, parallel: usize, open_one: F) -> Vec<TcpStream>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = TcpStream> + Send + 'static,
{
    let mut sockets = Vec::with_capacity(n);
    while sockets.len() < n {
        let batch: Vec<_> = (0..parallel.min(n - sockets.len()))
            .map(|_| tokio::spawn(open_one()))
            .collect();
        for handle in batch {
            sockets.push(handle.await.expect("open"));
        }
    }
    sockets
}

/// Resident memory per idle connection, SSE and WebSocket, at 10,000 each.
async fn idle(rows: &mut Vec<Row>) {
    const N: usize = 10_000;
    for (transport, backend) in [("SSE", &[][..]), ("WebSocket", &[][..])] {
        let server = Server::start(backend);
        let address = server.address.clone();
        // A warm-up connection, so one-time allocations are not counted per connection.
        let warm = open_transport(transport, &address).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let before = server.rss();
        let started = Instant::now();
        let sockets = open_many(N, 200, || {
            let address = address.clone();
            async move { open_transport(transport, &address).await }
        })
        .await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let after = server.rss();
        let per_connection = (after.saturating_sub(before)) as f64 / N as f64;
        eprintln!(
            "idle {transport}: {N} connections opened in {:?}; RSS {} MiB -> {} MiB",
            started.elapsed(),
            before >> 20,
            after >> 20
        );
        rows.push(Row {
            scenario: format!("idle {transport} connection, {N} open"),
            target: "≤ 8 KiB each".into(),
            figure: format!("{:.1} KiB", per_connection / 1024.0),
            peer: "-".into(),
            ratio: format!("{:.2}x of target", per_connection / 8192.0),
        });
        drop((sockets, warm));
    }
}

async fn open_transport(transport: &str, address: &str) -> TcpStream {
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
        socket.write_all(&subscribe).await.expect("subscribe");
        let mut reply = [0u8; 256];
        let n = socket.read(&mut reply).await.expect("subscribed");
        assert!(String::from_utf8_lossy(&reply[..n]).contains("subscribed"));
        socket
    }
}

fn print(rows: &[Row]) {
    let widths = [44, 16, 16, 16, 18];
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
        if wants("idle") {
            idle(&mut rows).await;
        }
    });
    print(&rows);
}

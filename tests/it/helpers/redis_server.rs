//! A private `redis-server` per test, on a free port, killable and restartable for fault tests.
//! Never the shared 6379.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Set (to anything) where Redis tests must run: a missing `redis-server` then fails the test
/// instead of skipping it. CI sets it.
const REQUIRE_REDIS: &str = "STREAMGATE_REQUIRE_REDIS";

pub struct RedisServer {
    pub port: u16,
    child: Option<Child>,
    dir: tempfile::TempDir,
    /// Arguments after the defaults (a later argument overrides an earlier one).
    extra_args: Vec<String>,
}

pub fn redis_server_binary() -> Option<PathBuf> {
    let candidates = ["/usr/bin/redis-server", "/usr/local/bin/redis-server"];
    candidates
        .iter()
        .map(PathBuf::from)
        .find(|path| path.exists())
        .or_else(|| {
            let output = Command::new("sh")
                .args(["-c", "command -v redis-server"])
                .output()
                .ok()?;
            let path = String::from_utf8(output.stdout).ok()?.trim().to_owned();
            (!path.is_empty()).then(|| PathBuf::from(path))
        })
}

/// `None`, with a loud message, when `what` is missing on a developer machine; a panic where
/// Redis tests are required (CI).
pub fn require_or_skip<T>(what: &str) -> Option<T> {
    if std::env::var_os(REQUIRE_REDIS).is_some() {
        panic!("{what} is not installed but {REQUIRE_REDIS} is set: Redis tests must run");
    }
    eprintln!(
        "\n!!!!!!!! SKIPPING A REDIS TEST: {what} is not installed. Install it \
         (apt-get install redis-server) to run the Redis half of the suite. !!!!!!!!\n"
    );
    None
}

/// The command `args` (name first).
pub fn command(args: &[&str]) -> redis::Cmd {
    let mut command = redis::cmd(args[0]);
    for arg in &args[1..] {
        command.arg(*arg);
    }
    command
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|address| address.port())
        .expect("no free port")
}

impl RedisServer {
    /// Starts a server, or returns `None` (with a loud message) when `redis-server` is not
    /// installed and Redis tests are not required.
    pub fn start() -> Option<RedisServer> {
        RedisServer::start_with(&[])
    }

    /// Like `start`, with more `redis-server` arguments (TLS, durability).
    pub fn start_with(extra_args: &[String]) -> Option<RedisServer> {
        if redis_server_binary().is_none() {
            return require_or_skip("redis-server");
        }
        let mut server = RedisServer {
            port: 0,
            child: None,
            dir: tempfile::tempdir().expect("tempdir"),
            extra_args: extra_args.to_vec(),
        };
        for _ in 0..5 {
            server.port = free_port();
            if server.spawn() {
                return Some(server);
            }
        }
        panic!("could not start redis-server after 5 attempts");
    }

    /// Starts the process on `self.port` and waits until it answers PING.
    fn spawn(&mut self) -> bool {
        let binary = redis_server_binary().expect("redis-server");
        let child = Command::new(binary)
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--dir", &self.dir.path().display().to_string()])
            .args(&self.extra_args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn redis-server");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if self.ping() {
                return true;
            }
            if let Some(child) = self.child.as_mut()
                && child.try_wait().ok().flatten().is_some()
            {
                self.child = None;
                return false; // the port was taken after all
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.stop();
        false
    }

    fn ping(&self) -> bool {
        let Ok(client) = redis::Client::open(self.url()) else {
            return false;
        };
        let Ok(mut connection) = client.get_connection_with_timeout(Duration::from_millis(200))
        else {
            return false;
        };
        redis::cmd("PING").query::<String>(&mut connection).is_ok()
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Kills the server (its data is gone unless it was started with `--appendonly yes`).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port.
    pub fn restart(&mut self) {
        self.stop();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.spawn() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("redis-server did not restart on port {}", self.port);
    }

    /// A synchronous connection for assertions and for writing as another client would.
    pub fn connection(&self) -> redis::Connection {
        redis::Client::open(self.url())
            .and_then(|client| client.get_connection_with_timeout(Duration::from_secs(2)))
            .expect("connect to the test redis-server")
    }

    /// Runs one command and returns its reply.
    pub fn cmd<T: redis::FromRedisValue>(&self, args: &[&str]) -> T {
        command(args)
            .query(&mut self.connection())
            .expect("redis command")
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

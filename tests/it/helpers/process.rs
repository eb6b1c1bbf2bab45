//! The real `streamgate` binary as a child process, for what only a process shows: flags,
//! environment, the banner, log output, signals and exit codes.

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The binary under test.
pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_streamgate")
}

/// A command for the binary with an environment free of the developer's streamgate settings,
/// run in `cwd` (a temporary directory: the embedded engine's default data directory is relative
/// to it, and the suite never writes into the checkout).
pub fn command(args: &[&str], env: &[(&str, &str)], cwd: &std::path::Path) -> Command {
    let mut command = Command::new(binary());
    command.args(args).current_dir(cwd);
    for (name, _) in std::env::vars() {
        if name.starts_with("STREAMGATE_") || name.starts_with("RS_HTTP_FACADE_") {
            command.env_remove(name);
        }
    }
    command.envs(env.iter().copied());
    command
}

/// Runs the binary to completion (for `config check` and start-up failures).
pub fn run(args: &[&str], env: &[(&str, &str)]) -> Output {
    let cwd = tempfile::tempdir().expect("tempdir");
    run_in(cwd.path(), args, env)
}

/// Runs the binary to completion in `cwd`.
pub fn run_in(cwd: &std::path::Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut child = command(args, env, cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn streamgate");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if child.try_wait().expect("wait").is_some() {
            return child.wait_with_output().expect("output");
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("streamgate {args:?} did not exit within 30 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A running streamgate process whose output is collected line by line.
pub struct Process {
    child: Child,
    /// Its working directory, when the process owns it.
    _cwd: Option<tempfile::TempDir>,
    stdout: Arc<Mutex<Vec<String>>>,
    stderr: Arc<Mutex<Vec<String>>>,
    readers: Vec<std::thread::JoinHandle<()>>,
}

/// Collects a stream's lines on a thread; the handle finishes at end of file.
fn collect(
    stream: impl Read + Send + 'static,
) -> (Arc<Mutex<Vec<String>>>, std::thread::JoinHandle<()>) {
    let lines = Arc::new(Mutex::new(Vec::new()));
    let sink = lines.clone();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stream).lines().map_while(Result::ok) {
            sink.lock().unwrap().push(line);
        }
    });
    (lines, reader)
}

impl Process {
    /// Starts the binary in a temporary working directory of its own.
    pub fn spawn(args: &[&str], env: &[(&str, &str)]) -> Process {
        let cwd = tempfile::tempdir().expect("tempdir");
        let mut process = Process::spawn_in(cwd.path(), args, env);
        process._cwd = Some(cwd);
        process
    }

    /// Starts the binary in `cwd` (for restarts on the same data directory).
    pub fn spawn_in(cwd: &std::path::Path, args: &[&str], env: &[(&str, &str)]) -> Process {
        let mut child = command(args, env, cwd)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn streamgate");
        let (stdout, stdout_reader) = collect(child.stdout.take().expect("stdout"));
        let (stderr, stderr_reader) = collect(child.stderr.take().expect("stderr"));
        Process {
            child,
            _cwd: None,
            stdout,
            stderr,
            readers: vec![stdout_reader, stderr_reader],
        }
    }

    /// Waits for the banner's `listening on` line and returns the URL.
    pub async fn wait_for_url(&mut self) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            let url = self
                .stdout()
                .lines()
                .find_map(|line| line.strip_prefix("listening on ").map(str::to_owned));
            if let Some(url) = url {
                return url;
            }
            if let Some(status) = self.child.try_wait().expect("wait") {
                panic!(
                    "streamgate exited ({status}) before listening:\n{}\n{}",
                    self.stdout(),
                    self.stderr()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!(
            "streamgate did not start listening:\n{}\n{}",
            self.stdout(),
            self.stderr()
        );
    }

    pub fn stdout(&self) -> String {
        self.stdout.lock().unwrap().join("\n")
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().join("\n")
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends a signal (`TERM`, `INT`, `KILL`).
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([format!("-{name}"), self.pid().to_string()])
            .status()
            .expect("kill");
        assert!(status.success(), "kill -{name} failed");
    }

    /// Waits for the process to exit, at most `timeout`.
    pub async fn wait(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().expect("wait") {
                // Every line the process wrote is collected once its pipes reach end of file.
                for reader in self.readers.drain(..) {
                    let _ = tokio::task::spawn_blocking(move || reader.join()).await;
                }
                return Some(status);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        None
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

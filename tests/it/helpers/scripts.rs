//! Test scripts run as other programs: browser scripts (`tests/browser/*.mjs`, run by Node with
//! Debian's Chromium through playwright-core) and third-party SSE clients (Node's `eventsource`,
//! Python's `httpx-sse`). Each prints `ready` once its streams are open, then one JSON report
//! line.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};

/// Whether the browser tests can run here: Node, the installed playwright-core, and Chromium.
/// In CI (`STREAMGATE_REQUIRE_BROWSER`) they must: a missing part fails the test.
pub fn available() -> bool {
    node_package("playwright-core") && {
        let chromium = std::path::Path::new("/usr/bin/chromium").exists();
        if !chromium {
            missing("Debian's chromium");
        }
        chromium
    }
}

/// Whether Node and `package` (installed by `npm ci --prefix tests/browser`) are there; a test
/// needing them skips loudly without them, or fails in CI.
pub fn node_package(package: &str) -> bool {
    let root = env!("CARGO_MANIFEST_DIR");
    let installed =
        std::path::Path::new(&format!("{root}/tests/browser/node_modules/{package}")).exists();
    let node = std::process::Command::new("node")
        .arg("--version")
        .output()
        .is_ok_and(|out| out.status.success());
    if !(installed && node) {
        missing(&format!(
            "node and `npm ci --prefix tests/browser` ({package})"
        ));
    }
    installed && node
}

fn missing(what: &str) {
    if std::env::var_os("STREAMGATE_REQUIRE_BROWSER").is_some() {
        panic!("the browser and Node tests must run: {what} is missing");
    }
    eprintln!("\n!!!!!!!! SKIPPING A BROWSER OR NODE TEST: needs {what} !!!!!!!!\n");
}

/// A Python virtualenv `target/<name>` with `requirements` installed, made on first use (one at
/// a time). Where it cannot be made the test skips loudly, or fails when the environment
/// variable `require` is set (CI sets it).
pub fn python_venv(name: &str, requirements: &[&str], require: &str) -> Option<PathBuf> {
    static INSTALL: Mutex<()> = Mutex::new(());
    let _one_at_a_time = INSTALL.lock().unwrap_or_else(|poison| poison.into_inner());
    let venv = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("target")
        .join(name);
    // Written last: a venv without it was interrupted and is made again.
    let done = venv.join("installed");
    if done.exists() {
        return Some(venv);
    }
    let run = |program: &Path, args: &[&str]| {
        std::process::Command::new(program)
            .args(args)
            .output()
            .map_err(|error| error.to_string())
            .and_then(|output| match output.status.success() {
                true => Ok(()),
                false => Err(String::from_utf8_lossy(&output.stderr).into_owned()),
            })
    };
    let _ = std::fs::remove_dir_all(&venv);
    let installed = run(
        Path::new("python3"),
        &["-m", "venv", venv.to_str().unwrap()],
    )
    .and_then(|()| {
        let mut args = vec!["install", "-q"];
        args.extend_from_slice(requirements);
        run(&venv.join("bin/pip"), &args)
    })
    .and_then(|()| std::fs::write(&done, requirements.join("\n")).map_err(|e| e.to_string()));
    match installed {
        Ok(()) => Some(venv),
        Err(error) => {
            let _ = std::fs::remove_dir_all(&venv);
            if std::env::var_os(require).is_some() {
                panic!("{require} is set but {requirements:?} cannot be installed: {error}");
            }
            eprintln!(
                "\n!!! SKIPPING a test that needs {requirements:?} in a Python virtualenv: \
                 installing failed (needs python3 with venv and PyPI):\n{error}\n"
            );
            None
        }
    }
}

/// A running test script: a Node one in `tests/browser` (a browser driven through
/// playwright-core, or a Node SSE client) or a Python one.
pub struct ScriptRun {
    child: Child,
    lines: Lines<BufReader<ChildStdout>>,
}

impl ScriptRun {
    /// Starts `tests/browser/<script>` with `args`.
    pub fn start(script: &str, args: &[&str]) -> ScriptRun {
        let path = format!("{}/tests/browser/{script}", env!("CARGO_MANIFEST_DIR"));
        ScriptRun::with("node", &path, args)
    }

    /// Starts `program` (an interpreter) on `script` with `args`.
    pub fn with(program: impl AsRef<std::ffi::OsStr>, script: &str, args: &[&str]) -> ScriptRun {
        let mut child = Command::new(program)
            .arg(script)
            .args(args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("run node");
        let lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        ScriptRun { child, lines }
    }

    /// Waits for the script's `ready` line.
    pub async fn ready(&mut self, within: Duration) {
        let ready = tokio::time::timeout(within, self.lines.next_line()).await;
        assert!(
            matches!(&ready, Ok(Ok(Some(line))) if line == "ready"),
            "the script did not open its streams: {ready:?}"
        );
    }

    /// Waits for the report line and the script's successful end; the report.
    pub async fn report(mut self, within: Duration) -> Value {
        let line = tokio::time::timeout(within, self.lines.next_line())
            .await
            .expect("the script reported in time")
            .expect("read the report")
            .unwrap_or_default();
        let status = self.child.wait().await.expect("browser run");
        let mut stderr = String::new();
        if let Some(mut pipe) = self.child.stderr.take() {
            let _ = pipe.read_to_string(&mut stderr).await;
        }
        assert!(status.success(), "script failed: {line}\n{stderr}");
        serde_json::from_str(&line).unwrap_or_else(|error| panic!("report ({error}): {line}"))
    }
}

//! Browser scripts (`tests/browser/*.mjs`), run by Node with Debian's Chromium through
//! playwright-core. Each prints `ready` once its streams are open, then one JSON report line.

use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};

/// Whether the browser tests can run here: Node, the installed playwright-core, and Chromium.
/// In CI (`STREAMGATE_REQUIRE_BROWSER`) they must: a missing part fails the test.
pub fn available() -> bool {
    let root = env!("CARGO_MANIFEST_DIR");
    let ready = std::path::Path::new(&format!(
        "{root}/tests/browser/node_modules/playwright-core"
    ))
    .exists()
        && std::path::Path::new("/usr/bin/chromium").exists()
        && std::process::Command::new("node")
            .arg("--version")
            .output()
            .is_ok_and(|out| out.status.success());
    if !ready {
        if std::env::var_os("STREAMGATE_REQUIRE_BROWSER").is_some() {
            panic!(
                "the browser test must run: install chromium and run `npm ci --prefix tests/browser`"
            );
        }
        eprintln!(
            "\n!!!!!!!! SKIPPING THE BROWSER TEST: needs node, Debian's chromium and \
             `npm ci --prefix tests/browser` !!!!!!!!\n"
        );
    }
    ready
}

/// A running browser script.
pub struct BrowserRun {
    child: Child,
    lines: Lines<BufReader<ChildStdout>>,
}

impl BrowserRun {
    /// Starts `tests/browser/<script>` with `args`.
    pub fn start(script: &str, args: &[&str]) -> BrowserRun {
        let path = format!("{}/tests/browser/{script}", env!("CARGO_MANIFEST_DIR"));
        let mut child = Command::new("node")
            .arg(&path)
            .args(args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("run node");
        let lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        BrowserRun { child, lines }
    }

    /// Waits for the script's `ready` line.
    pub async fn ready(&mut self, within: Duration) {
        let ready = tokio::time::timeout(within, self.lines.next_line()).await;
        assert!(
            matches!(&ready, Ok(Ok(Some(line))) if line == "ready"),
            "the browser did not open its streams: {ready:?}"
        );
    }

    /// Waits for the report line and the script's successful end; the report.
    pub async fn report(mut self, within: Duration) -> Value {
        let line = tokio::time::timeout(within, self.lines.next_line())
            .await
            .expect("the browser reported in time")
            .expect("read the report")
            .unwrap_or_default();
        let status = self.child.wait().await.expect("browser run");
        let mut stderr = String::new();
        if let Some(mut pipe) = self.child.stderr.take() {
            let _ = pipe.read_to_string(&mut stderr).await;
        }
        assert!(status.success(), "browser script failed: {line}\n{stderr}");
        serde_json::from_str(&line).unwrap_or_else(|error| panic!("report ({error}): {line}"))
    }
}

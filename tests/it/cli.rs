//! The binary's command line: configuration sources and precedence, rs-http-facade names,
//! `config check`, validation messages, the banner, and secure defaults.

use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::helpers::process::{self, Process, command};
use crate::helpers::redis_server::free_port;
use crate::helpers::{RedisServer, json};

fn stdout(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn write_config(dir: &tempfile::TempDir, text: &str) -> String {
    let path = dir.path().join("streamgate.toml");
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

#[test]
fn precedence_is_file_then_environment_then_flags() {
    let dir = tempfile::tempdir().unwrap();
    let file = write_config(
        &dir,
        "http_address = \"127.0.0.1:1111\"\nbearer_token = \"from-file\"\n[consumer]\ndefault_limit = 3\nmax_deliveries = 4\n",
    );
    let check = |env: &[(&str, &str)], flags: &[&str]| {
        let mut args = vec!["config", "check", "--config", &file];
        args.extend_from_slice(flags);
        let output = process::run(&args, env);
        assert!(output.status.success(), "{}", stderr(&output));
        stdout(&output)
    };
    let from_file = check(&[], &[]);
    assert!(
        from_file.contains("http_address = \"127.0.0.1:1111\""),
        "{from_file}"
    );
    assert!(from_file.contains("default_limit = 3"), "{from_file}");

    let env = [
        ("STREAMGATE_HTTP_ADDRESS", "127.0.0.1:2222"),
        ("STREAMGATE_CONSUMER__MAX_DELIVERIES", "5"),
    ];
    let from_env = check(&env, &[]);
    assert!(
        from_env.contains("http_address = \"127.0.0.1:2222\""),
        "{from_env}"
    );
    assert!(from_env.contains("max_deliveries = 5"), "{from_env}");
    assert!(
        from_env.contains("default_limit = 3"),
        "file values not overridden stay: {from_env}"
    );

    let from_flags = check(&env, &["--http-address", "127.0.0.1:3333"]);
    assert!(
        from_flags.contains("http_address = \"127.0.0.1:3333\""),
        "{from_flags}"
    );
    assert!(from_flags.contains("max_deliveries = 5"), "{from_flags}");

    // The file can also be named by the environment.
    let output = process::run(&["config", "check"], &[("STREAMGATE_CONFIG", &file)]);
    assert!(stdout(&output).contains("127.0.0.1:1111"));
    // Secrets never appear.
    assert!(!from_file.contains("from-file"), "{from_file}");
}

#[test]
fn rs_http_facade_names_and_go_style_flags_are_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let file = write_config(
        &dir,
        "redis_address = \"localhost:7001\"\nredis_db = 3\nhttp_address = \":8089\"\nbearer_token = \"file\"\nsse_keepalive_interval_sec = 60\n",
    );
    let output = process::run(&["config", "check"], &[("RS_HTTP_FACADE_CONFIG", &file)]);
    let text = stdout(&output);
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(text.contains("backend = \"redis\""), "{text}");
    assert!(
        text.contains("url = \"redis://localhost:7001/3\""),
        "{text}"
    );
    assert!(text.contains("http_address = \"0.0.0.0:8089\""), "{text}");
    assert!(text.contains("sse_keepalive_interval_sec = 60"), "{text}");

    let env = [
        ("RS_HTTP_FACADE_REDIS_ADDRESS", "10.0.0.5:6380"),
        ("RS_HTTP_FACADE_REDIS_PASSWORD", "pa55word"),
        ("RS_HTTP_FACADE_REDIS_DB", "2"),
        ("RS_HTTP_FACADE_HTTP_ADDRESS", "127.0.0.1:9000"),
        ("RS_HTTP_FACADE_BEARER_TOKEN", "compat-token"),
        ("RS_HTTP_FACADE_SSE_KEEPALIVE_INTERVAL_SEC", "-1"),
    ];
    let output = process::run(&["config", "check"], &env);
    let text = stdout(&output);
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(
        text.contains("url = \"redis://:redacted@10.0.0.5:6380/2\""),
        "{text}"
    );
    assert!(text.contains("http_address = \"127.0.0.1:9000\""), "{text}");
    assert!(text.contains("sse_keepalive_interval_sec = 0"), "{text}");
    assert!(
        !text.contains("pa55word") && !text.contains("compat-token"),
        "{text}"
    );

    let output = process::run(
        &[
            "config",
            "check",
            "-redis-address=10.0.0.6:6379",
            "-http-address",
            ":8081",
            "-bearer-token=go",
        ],
        &[],
    );
    let text = stdout(&output);
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(text.contains("redis://10.0.0.6:6379"), "{text}");
    assert!(text.contains("0.0.0.0:8081"), "{text}");
}

#[test]
fn every_invalid_value_is_reported_in_one_message() {
    let dir = tempfile::tempdir().unwrap();
    let file = write_config(
        &dir,
        "backend = \"mongo\"\ntypo_key = 1\n[consumer]\ndefault_limit = 0\nvisibility_timeout = \"later\"\n",
    );
    let output = process::run(
        &["config", "check", "--config", &file, "--log-format", "xml"],
        &[("STREAMGATE_LIMITS__MAX_BODY_BYTES", "lots")],
    );
    assert_eq!(output.status.code(), Some(2));
    let text = stderr(&output);
    assert!(text.contains("6 problems"), "{text}");
    for expected in [
        "backend",
        "typo_key",
        "consumer.default_limit",
        "consumer.visibility_timeout",
        "log_format (from flag --log-format)",
        "limits.max_body_bytes (from environment variable STREAMGATE_LIMITS__MAX_BODY_BYTES)",
    ] {
        assert!(text.contains(expected), "{expected} missing from: {text}");
    }
}

#[test]
fn malformed_or_missing_files_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let file = write_config(&dir, "http_address = \"127.0.0.1:1\"\n[consumer\n");
    let output = process::run(&["config", "check", "--config", &file], &[]);
    assert_eq!(output.status.code(), Some(2));
    assert!(stderr(&output).contains("line 2"), "{}", stderr(&output));
    let output = process::run(
        &[
            "config",
            "check",
            "--config",
            "/nonexistent/streamgate.toml",
        ],
        &[],
    );
    assert_eq!(output.status.code(), Some(2));
    assert!(
        stderr(&output).contains("/nonexistent/streamgate.toml"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn a_public_address_without_a_token_is_refused() {
    let output = process::run(&["--http-address", "0.0.0.0:0"], &[]);
    assert_eq!(output.status.code(), Some(2));
    assert!(
        stderr(&output).contains("refusing to listen on non-loopback address"),
        "{}",
        stderr(&output)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn banner_shows_version_backend_url_docs_and_a_generated_token() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let redis_url = redis.url();
    let mut process = Process::spawn(
        &["--redis-url", &redis_url, "--http-address", "127.0.0.1:0"],
        &[],
    );
    let url = process.wait_for_url().await;
    let banner = process.stdout();
    let lines: Vec<&str> = banner.lines().collect();
    assert_eq!(
        lines[0],
        format!("streamgate {}", env!("CARGO_PKG_VERSION"))
    );
    assert_eq!(lines[1], format!("backend: redis at {}", redis.address()));
    assert_eq!(lines[2], format!("listening on {url}"));
    assert_eq!(lines[3], format!("docs: {url}/api-docs"));
    let token = lines[4]
        .strip_prefix("token: ")
        .expect("token line")
        .split(' ')
        .next()
        .unwrap()
        .to_owned();
    assert_eq!(token.len(), 64);

    let client = reqwest::Client::new();
    let response = client
        .get(format!("{url}/admin/ping"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(json(response).await, json!({ "status": "PONG" }));
    let response = client
        .get(format!("{url}/admin/ping"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    assert!(
        !process.stderr().contains(&token),
        "the generated token is printed once, in the banner"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_with_rs_http_facade_environment() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let address = redis.address();
    let env = [
        ("RS_HTTP_FACADE_REDIS_ADDRESS", address.as_str()),
        ("RS_HTTP_FACADE_HTTP_ADDRESS", "127.0.0.1:0"),
        ("RS_HTTP_FACADE_BEARER_TOKEN", "facade-token"),
    ];
    let mut process = Process::spawn(&[], &env);
    let url = process.wait_for_url().await;
    assert!(
        !process.stdout().contains("token:"),
        "a configured token is not printed"
    );
    let response = reqwest::Client::new()
        .post(format!("{url}/api/streams/test-stream/messages"))
        .bearer_auth("facade-token")
        .json(&json!({ "data": { "hello": "world" } }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    let length: u64 = redis.cmd(&["XLEN", "test-stream"]);
    assert_eq!(length, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keeps_serving_when_its_stdout_is_closed() {
    // A supervisor that stops reading (or `streamgate | head -1`) must not bring the gateway down.
    let port = free_port();
    let address = format!("127.0.0.1:{port}");
    let cwd = tempfile::tempdir().expect("tempdir");
    let mut child = command(
        &["--http-address", &address, "--bearer-token", "t"],
        &[],
        cwd.path(),
    )
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::null())
    .spawn()
    .expect("spawn streamgate");
    drop(child.stdout.take());
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    let ready = loop {
        if let Ok(response) = client
            .get(format!("http://{address}/health/live"))
            .send()
            .await
        {
            break response.status();
        }
        assert!(
            child.try_wait().expect("wait").is_none(),
            "streamgate exited after its stdout was closed"
        );
        assert!(Instant::now() < deadline, "streamgate did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(ready, 200);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        child.try_wait().expect("wait").is_none(),
        "streamgate exited"
    );
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn worker_threads_default_to_the_cores_less_one_left_for_redis() {
    let cores = std::thread::available_parallelism().unwrap().get();
    let output = process::run(&["config", "check"], &[]);
    assert!(output.status.success(), "{}", stderr(&output));
    let expected = format!("worker_threads = {cores}\n");
    assert!(stdout(&output).contains(&expected), "{}", stdout(&output));
    let output = process::run(
        &["config", "check", "--redis-url", "redis://127.0.0.1:1"],
        &[],
    );
    let expected = format!("worker_threads = {}\n", cores.saturating_sub(1).max(1));
    assert!(stdout(&output).contains(&expected), "{}", stdout(&output));

    let output = process::run(&["config", "check"], &[("STREAMGATE_WORKER_THREADS", "3")]);
    assert!(
        stdout(&output).contains("worker_threads = 3"),
        "{}",
        stdout(&output)
    );
    let output = process::run(&["config", "check"], &[("STREAMGATE_WORKER_THREADS", "0")]);
    assert_eq!(output.status.code(), Some(2));
    assert!(
        stderr(&output).contains("worker_threads"),
        "{}",
        stderr(&output)
    );
}

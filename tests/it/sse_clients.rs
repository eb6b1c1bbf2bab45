//! Third-party SSE clients nobody here wrote, as services use them: Node's `eventsource` package
//! and Python's `httpx-sse` read a stream with keep-alives before, between and after its
//! messages, and yield exactly the messages (no empty "phantom" events for the opening `retry:`
//! or a keep-alive comment, which these clients, unlike browsers, turn into events).

use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};

use crate::helpers::scripts::{ScriptRun, node_package, python_venv};
use crate::helpers::{TOKEN, TestApp};

on_each_backend!(third_party_clients_see_only_the_messages = "sse_keepalive_interval_sec = 1\n");

/// Set where the Python clients must be installable (CI sets it): failing to install them then
/// fails the test instead of skipping it.
const REQUIRE_PYTHON: &str = "STREAMGATE_REQUIRE_PYTHON";
const PYTHON_CLIENT: [&str; 2] = ["httpx==0.28.1", "httpx-sse==0.4.3"];
const MESSAGES: usize = 3;

async fn third_party_clients_see_only_the_messages(app: TestApp) {
    let python =
        tokio::task::spawn_blocking(|| python_venv("sse-clients", &PYTHON_CLIENT, REQUIRE_PYTHON))
            .await
            .unwrap();
    let url = app.url(&format!("/api/streams/clients/events?token={TOKEN}"));
    let expected = MESSAGES.to_string();
    let mut clients = Vec::new();
    if let Some(venv) = python {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/sse_client.py");
        let run = ScriptRun::with(
            venv.join("bin/python"),
            script.to_str().unwrap(),
            &[&url, &expected, "30"],
        );
        clients.push(("httpx-sse", run));
    }
    if node_package("eventsource") {
        let run = ScriptRun::start("sse-client.mjs", &[&url, &expected, "30000"]);
        clients.push(("eventsource", run));
    }
    for (_, client) in &mut clients {
        client.ready(Duration::from_secs(15)).await;
    }
    // A keep-alive (every second) before each message and after the last.
    for n in 0..MESSAGES {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        app.publish("clients", json!({ "n": n })).await;
    }
    for (name, client) in clients {
        let report = client.report(Duration::from_secs(40)).await;
        let events = report["events"].as_array().expect("events");
        let bodies: Vec<Value> = events
            .iter()
            .map(|event| {
                let data = event["data"].as_str().unwrap_or_default();
                serde_json::from_str::<Value>(data).unwrap_or_else(|_| {
                    panic!("{name} yielded an event that is not a message: {report}")
                })["body"]
                    .clone()
            })
            .collect();
        let expected: Vec<Value> = (0..MESSAGES).map(|n| json!({ "n": n })).collect();
        assert_eq!(bodies, expected, "{name}: {report}");
        if name == "httpx-sse" {
            // `retry:` came with the first event (as the client reads it).
            assert_eq!(events[0]["retry"], 1000, "{report}");
        }
    }
}

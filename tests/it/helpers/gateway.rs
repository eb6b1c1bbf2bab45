//! The real binary on a data directory of its own, for what only a process on the embedded
//! engine shows: SIGKILL and restart, refusals at start, `streamgate copy`.

use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};

use super::process::Process;
use super::sse::SseClient;

pub const TOKEN: &str = "storage-test-token";

/// A streamgate process on a data directory, and a client for it.
pub struct Gateway {
    pub process: Process,
    pub url: String,
    pub client: reqwest::Client,
}

/// The command line of a gateway on `data_dir`.
pub fn args(data_dir: &Path) -> Vec<String> {
    [
        "--bearer-token",
        TOKEN,
        "--http-address",
        "127.0.0.1:0",
        "--data-dir",
    ]
    .iter()
    .map(|arg| arg.to_string())
    .chain([data_dir.display().to_string()])
    .collect()
}

impl Gateway {
    pub async fn start(cwd: &Path, data_dir: &Path, env: &[(&str, &str)]) -> Gateway {
        let args = args(data_dir);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut process = Process::spawn_in(cwd, &args, env);
        let url = process.wait_for_url().await;
        Gateway {
            process,
            url,
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(20))
                .build()
                .expect("client"),
        }
    }

    pub async fn kill(mut self) {
        self.process.signal("KILL");
        self.process
            .wait(Duration::from_secs(10))
            .await
            .expect("killed");
    }

    /// Stops it cleanly (SIGTERM) and returns what it logged.
    pub async fn stop(mut self) -> String {
        self.process.signal("TERM");
        let status = self
            .process
            .wait(Duration::from_secs(20))
            .await
            .expect("stopped");
        assert!(status.success(), "{}", self.process.stderr());
        self.process.stderr()
    }

    pub fn post(&self, path: &str) -> reqwest::RequestBuilder {
        self.client
            .post(format!("{}{path}", self.url))
            .bearer_auth(TOKEN)
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        let response = self
            .client
            .get(format!("{}{path}", self.url))
            .bearer_auth(TOKEN)
            .send()
            .await
            .expect("GET");
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    pub async fn publish(&self, stream: &str, data: Value) -> String {
        let response = self
            .post(&format!("/api/streams/{stream}/messages"))
            .json(&json!({ "data": data }))
            .send()
            .await
            .expect("publish");
        assert_eq!(response.status(), 201);
        let body: Value = response.json().await.expect("JSON");
        body["id"].as_str().expect("id").to_owned()
    }

    /// Every entry of a stream, oldest first, as (id, body).
    pub async fn history(&self, stream: &str) -> Vec<(String, Value)> {
        let mut all = Vec::new();
        let mut from = "-".to_owned();
        loop {
            let (status, page) = self
                .get(&format!(
                    "/api/streams/{stream}/messages?count=1000&from={from}"
                ))
                .await;
            assert_eq!(status, 200, "{page}");
            for message in page["messages"].as_array().expect("messages") {
                let id = message["id"].as_str().expect("id").to_owned();
                all.push((id, message["body"].clone()));
            }
            match page["next"].as_str() {
                Some(next) => from = next.to_owned(),
                None => return all,
            }
        }
    }

    pub fn consume(&self, query: &str) -> reqwest::RequestBuilder {
        self.client
            .get(format!("{}/api/events?{query}", self.url))
            .bearer_auth(TOKEN)
    }

    /// Finishes `id` as `consumer` of `group` (the explicit route); asserts it was pending.
    pub async fn finish(&self, stream: &str, group: &str, consumer: &str, id: &str) {
        let response = self
            .post(&format!(
                "/api/streams/{stream}/groups/{group}/consumers/{consumer}/messages/{id}/finish"
            ))
            .send()
            .await
            .expect("finish");
        assert_eq!(response.status(), 200, "finish {id}");
    }
}

/// The next `n` messages a consumer receives (10 s at most each).
pub async fn receive(client: &mut SseClient, n: usize) -> Vec<Value> {
    let mut messages = Vec::with_capacity(n);
    for _ in 0..n {
        let event = client
            .next_event(Duration::from_secs(10))
            .await
            .expect("a delivery");
        messages.push(event.json());
    }
    messages
}

/// A delivered message's entry id.
pub fn id_of(message: &Value) -> String {
    message["id"].as_str().expect("id").to_owned()
}

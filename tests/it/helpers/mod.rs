//! Test helpers: a streamgate per test on port 0 (in-process, or the real binary as a child
//! process), its own `redis-server`, and an HTTP client that talks to it over real HTTP.

pub mod gateway;
pub mod process;
pub mod redis_cluster;
pub mod redis_server;
pub mod scripts;
pub mod sse;

use std::net::SocketAddr;
use std::time::Duration;

use reqwest::{Client, Method, RequestBuilder, Response};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use streamgate::backend::embedded::{DiskOptions, EmbeddedBackend, FsyncPolicy};
use streamgate::config::{Config, Flags, Sources};

pub use self::redis_cluster::RedisCluster;
pub use self::redis_server::RedisServer;

/// Longest a plain (not streaming) test request may take: a hang is a failure, not a stuck run.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// The token every in-process test app accepts.
pub const TOKEN: &str = "test-token-0123456789";

/// Which backend a test app runs on.
pub enum Backend {
    Embedded,
    Redis(RedisServer),
    /// A Redis another test app (or the test) owns: `redis://…` or `rediss://…`.
    RedisAt(String),
    /// A Redis Cluster of this app's own.
    Cluster(RedisCluster),
    /// A Redis Cluster another test app (or the test) owns: its node URLs.
    ClusterAt(Vec<String>),
}

/// A running streamgate (in this process) and the backend it uses.
pub struct TestApp {
    pub address: SocketAddr,
    /// `https` when the configuration has `[tls]`.
    pub scheme: &'static str,
    pub client: Client,
    pub redis: Option<RedisServer>,
    pub cluster: Option<RedisCluster>,
    shutdown: CancellationToken,
    _config_dir: tempfile::TempDir,
}

/// The embedded engine on disk in `dir` (which the caller keeps alive), for trait-level tests.
pub fn embedded_on_disk(dir: &std::path::Path) -> EmbeddedBackend {
    let options = DiskOptions {
        path: dir.join("data"),
        fsync: FsyncPolicy::EverySec,
        cache_size: 8 << 20,
    };
    EmbeddedBackend::open(&options, CancellationToken::new()).expect("open the data directory")
}

/// A self-signed certificate for 127.0.0.1 and localhost as PEM files in `dir`: (cert, key).
pub fn test_certificate(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let names = vec!["127.0.0.1".to_owned(), "localhost".to_owned()];
    let certified = rcgen::generate_simple_self_signed(names).expect("certificate");
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert, certified.cert.pem()).expect("write the certificate");
    std::fs::write(&key, certified.signing_key.serialize_pem()).expect("write the key");
    (cert, key)
}

/// The configuration of a cluster's seed nodes (`redis.cluster` detected).
fn cluster_toml(urls: &[String]) -> String {
    let quoted: Vec<String> = urls.iter().map(|url| format!("{url:?}")).collect();
    format!("redis.urls = [{}]\n", quoted.join(", "))
}

/// Builds a configuration from TOML text written to a file in `dir`.
pub fn config_in(dir: &std::path::Path, text: &str) -> Config {
    let path = dir.join("streamgate.toml");
    std::fs::write(&path, text).expect("write config");
    let sources = Sources {
        env: Vec::new(),
        flags: Flags {
            config: Some(path),
            ..Flags::default()
        },
    };
    Config::load(&sources).unwrap_or_else(|error| panic!("test config: {error}"))
}

impl TestApp {
    /// A streamgate on Redis (its own redis-server), or `None` when Redis tests are skipped.
    pub async fn on_redis(extra_toml: &str) -> Option<TestApp> {
        let redis = RedisServer::start()?;
        Some(TestApp::spawn(Backend::Redis(redis), extra_toml).await)
    }

    /// A streamgate on its own Redis Cluster (three masters, no replicas), or `None` when Redis
    /// tests are skipped.
    pub async fn on_cluster(extra_toml: &str) -> Option<TestApp> {
        TestApp::on_cluster_with_replicas(0, extra_toml).await
    }

    /// A streamgate on its own Redis Cluster of three masters with `replicas` replicas each.
    pub async fn on_cluster_with_replicas(replicas: usize, extra_toml: &str) -> Option<TestApp> {
        let cluster = tokio::task::spawn_blocking(move || RedisCluster::start(replicas))
            .await
            .expect("start the cluster")?;
        Some(TestApp::spawn(Backend::Cluster(cluster), extra_toml).await)
    }

    /// A streamgate on the embedded engine.
    pub async fn on_embedded(extra_toml: &str) -> TestApp {
        TestApp::spawn(Backend::Embedded, extra_toml).await
    }

    /// Starts streamgate on port 0 with `extra_toml` appended to the base configuration. The
    /// embedded engine keeps its data in the app's temporary directory.
    pub async fn spawn(backend: Backend, extra_toml: &str) -> TestApp {
        let config_dir = tempfile::tempdir().expect("tempdir");
        let (backend_toml, redis, cluster) = match backend {
            Backend::Embedded => (
                format!(
                    "backend = \"embedded\"\nstorage.path = {:?}\n",
                    config_dir.path().join("data")
                ),
                None,
                None,
            ),
            Backend::RedisAt(url) => (format!("redis.url = \"{url}\"\n"), None, None),
            Backend::Redis(redis) => (
                format!("redis_address = \"{}\"\n", redis.address()),
                Some(redis),
                None,
            ),
            Backend::ClusterAt(urls) => (cluster_toml(&urls), None, None),
            Backend::Cluster(cluster) => (cluster_toml(&cluster.urls()), None, Some(cluster)),
        };
        let text = format!(
            "bearer_token = \"{TOKEN}\"\nshutdown_timeout = \"5s\"\n{backend_toml}{extra_toml}\n"
        );
        let config = config_in(config_dir.path(), &text);
        let mut client = Client::builder().no_proxy();
        if let Some(tls) = &config.tls {
            // The test certificate is self-signed: trust exactly it.
            let pem = std::fs::read(&tls.cert).expect("read the test certificate");
            let certificate = reqwest::Certificate::from_pem(&pem).expect("PEM certificate");
            client = client.tls_certs_only([certificate]);
        }
        let scheme = if config.tls.is_some() {
            "https"
        } else {
            "http"
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let address = listener.local_addr().expect("address");
        let shutdown = CancellationToken::new();
        let run_shutdown = shutdown.clone();
        tokio::spawn(async move {
            if let Err(error) = streamgate::app::run(listener, config, run_shutdown).await {
                panic!("streamgate stopped with an error: {error:#}");
            }
        });
        let app = TestApp {
            address,
            scheme,
            client: client.build().expect("client"),
            redis,
            cluster,
            shutdown,
            _config_dir: config_dir,
        };
        app.wait_until_live().await;
        app
    }

    async fn wait_until_live(&self) {
        for _ in 0..500 {
            if let Ok(response) = self.client.get(self.url("/health/live")).send().await
                && response.status().is_success()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("streamgate did not come up at {}", self.address);
    }

    /// Waits until the first synthetic probe has finished (it writes the probe stream).
    pub async fn probed(&self) -> Value {
        for _ in 0..500 {
            let health = json(self.get("/health").await).await;
            if !health["probe"].is_null() {
                return health["probe"].clone();
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("no probe finished within 5 s");
    }

    /// The dead-letter stream of `stream` (on a cluster, named into the stream's hash slot).
    pub fn dead_letter_of(&self, stream: &str) -> String {
        match &self.cluster {
            Some(_) => format!("{{{stream}}}:dlq"),
            None => format!("{stream}:dlq"),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}://{}{}", self.scheme, self.address, path)
    }

    /// A request with the full-access token.
    pub fn request(&self, method: Method, path: &str) -> RequestBuilder {
        self.client
            .request(method, self.url(path))
            .bearer_auth(TOKEN)
    }

    pub async fn get(&self, path: &str) -> Response {
        self.request(Method::GET, path)
            .timeout(REQUEST_TIMEOUT)
            .send()
            .await
            .expect("GET")
    }

    pub async fn post_json(&self, path: &str, body: &Value) -> Response {
        self.request(Method::POST, path)
            .timeout(REQUEST_TIMEOUT)
            .json(body)
            .send()
            .await
            .expect("POST")
    }

    /// POSTs a body exactly as given (for byte-exact and malformed-input tests).
    pub async fn post_raw(&self, path: &str, body: impl Into<reqwest::Body>) -> Response {
        self.request(Method::POST, path)
            .timeout(REQUEST_TIMEOUT)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .expect("POST")
    }

    /// Publishes one message and returns its id.
    pub async fn publish(&self, stream: &str, data: Value) -> String {
        let response = self
            .post_json(
                &format!("/api/streams/{stream}/messages"),
                &serde_json::json!({ "data": data }),
            )
            .await;
        assert_eq!(response.status(), 201, "publish to {stream}");
        json(response).await["id"].as_str().expect("id").to_owned()
    }

    /// The test's redis-server (panics on the embedded backend).
    pub fn redis(&self) -> &RedisServer {
        self.redis.as_ref().expect("this test app runs on Redis")
    }

    /// The test's Redis Cluster (panics on other backends).
    pub fn cluster(&self) -> &RedisCluster {
        self.cluster
            .as_ref()
            .expect("this test app runs on a Redis Cluster")
    }

    pub fn cluster_mut(&mut self) -> &mut RedisCluster {
        self.cluster
            .as_mut()
            .expect("this test app runs on a Redis Cluster")
    }

    pub fn redis_mut(&mut self) -> &mut RedisServer {
        self.redis.as_mut().expect("this test app runs on Redis")
    }

    /// Begins this streamgate's shutdown (its streams end, its connections drain).
    pub fn begin_shutdown(&self) {
        self.shutdown.cancel();
    }

    /// Stops this streamgate and hands over its redis-server (for a second instance).
    pub fn into_redis(mut self) -> RedisServer {
        self.shutdown.cancel();
        self.redis.take().expect("this test app runs on Redis")
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// The response body as JSON (panics with the text when it is not).
pub async fn json(response: Response) -> Value {
    let text = response.text().await.expect("body");
    serde_json::from_str(&text).unwrap_or_else(|error| panic!("not JSON ({error}): {text}"))
}

/// Asserts a problem+json error with `status`, returning the problem document.
pub async fn problem(response: Response, status: u16) -> Value {
    assert_eq!(response.status(), status, "status");
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    assert_eq!(content_type, "application/problem+json");
    let correlation_id = response
        .headers()
        .get("x-correlation-id")
        .and_then(|value| value.to_str().ok())
        .map(str::to_owned);
    let body = json(response).await;
    assert_eq!(body["status"], status);
    assert!(
        body["type"]
            .as_str()
            .is_some_and(|kind| kind.starts_with("urn:streamgate:problem:"))
    );
    assert!(
        body["title"].is_string() && body["detail"].is_string(),
        "{body}"
    );
    assert_eq!(
        body["correlation_id"].as_str(),
        correlation_id.as_deref(),
        "correlation id"
    );
    body
}

/// Polls `check` every 20 ms until it holds or `within` has passed; returns whether it held.
pub async fn eventually<F, Fut>(within: std::time::Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = std::time::Instant::now() + within;
    loop {
        if check().await {
            return true;
        }
        if std::time::Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

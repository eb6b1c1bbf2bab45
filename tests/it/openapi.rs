//! The OpenAPI document: complete (every route in the source is in it, every operation in it is
//! served), the interactive docs work offline, and Schemathesis finds no behaviour that departs
//! from it, on both backends.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use reqwest::Method;
use serde_json::Value;

use crate::helpers::scripts::python_venv;
use crate::helpers::{TOKEN, TestApp, json};

on_each_backend!(
    schemathesis_finds_nothing_the_document_does_not_allow,
    every_example_body_succeeds_and_destroys_nothing,
);

/// Where the document's routes live.
fn http_sources() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src/http")
}

async fn document(app: &TestApp) -> Value {
    let response = reqwest::get(app.url("/openapi.json")).await.unwrap();
    assert_eq!(response.status(), 200, "the document needs no credentials");
    assert_eq!(response.headers()["content-type"], "application/json");
    json(response).await
}

/// Every (METHOD, path) the document lists.
fn operations(document: &Value) -> BTreeSet<(String, String)> {
    let mut operations = BTreeSet::new();
    for (path, item) in document["paths"].as_object().expect("paths") {
        for method in item.as_object().expect("path item").keys() {
            operations.insert((method.to_uppercase(), path.clone()));
        }
    }
    operations
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_document_is_openapi_3_1_and_every_operation_in_it_is_served() {
    let app = TestApp::on_embedded("").await;
    let document = document(&app).await;
    assert!(
        document["openapi"].as_str().unwrap().starts_with("3.1."),
        "{}",
        document["openapi"]
    );
    assert_eq!(document["info"]["title"], "streamgate");
    let operations = operations(&document);
    assert!(
        operations.len() >= 40,
        "only {} operations",
        operations.len()
    );
    // Every reference resolves (derived parameters do not register what they refer to).
    let text = document.to_string();
    for reference in text.split("\"$ref\":\"#/components/schemas/").skip(1) {
        let name = reference.split('"').next().unwrap();
        assert!(
            document["components"]["schemas"][name].is_object(),
            "a $ref to {name}, which is not in the document"
        );
    }

    for (method, path) in &operations {
        let operation = &document["paths"][path][method.to_lowercase()];
        assert!(
            operation["summary"].is_string() || operation["description"].is_string(),
            "{method} {path} is undocumented"
        );
        assert!(
            operation["tags"][0].is_string(),
            "{method} {path} has no tag"
        );
        let responses = operation["responses"].as_object().unwrap();
        assert!(
            responses
                .keys()
                .any(|status| status.starts_with(['1', '2', '3'])),
            "{method} {path} documents no success"
        );

        // Served: whatever the answer to made-up parameters is, it is not the router's own 404
        // or 405.
        let concrete = path
            .replace("{stream}", "openapi-check")
            .replace("{group}", "g")
            .replace("{consumer}", "c")
            .replace("{id}", "1-0")
            .replace("{file}", "swagger-ui.css");
        let concrete = match concrete.as_str() {
            "/api/v1/poll" => "/api/v1/poll?topics=openapi-check&timeout=0".to_owned(),
            _ => concrete,
        };
        let method = Method::from_bytes(method.as_bytes()).unwrap();
        let response = app
            .request(method.clone(), &concrete)
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .unwrap_or_else(|error| panic!("{method} {concrete}: {error}"));
        let status = response.status();
        assert_ne!(status, 405, "{method} {concrete}");
        if status == 404 {
            let body: Value = response.json().await.unwrap();
            let detail = body["detail"].as_str().unwrap_or_default();
            assert!(
                !detail.starts_with("no route"),
                "{method} {concrete}: {detail}"
            );
        }
    }
}

/// Every `#[utoipa::path(method, path = "…")]` in `src/http`.
fn annotated_operations() -> BTreeSet<(String, String)> {
    let mut found = BTreeSet::new();
    for entry in std::fs::read_dir(http_sources()).unwrap() {
        let file = entry.unwrap().path();
        let text = std::fs::read_to_string(&file).unwrap();
        for attribute in text.split("#[utoipa::path(").skip(1) {
            let method = attribute
                .split(|c: char| c == ',' || c.is_whitespace())
                .find(|word| !word.is_empty())
                .unwrap()
                .to_uppercase();
            let path = attribute
                .split_once("path = \"")
                .and_then(|(_, rest)| rest.split_once('"'))
                .map(|(path, _)| path.to_owned())
                .unwrap_or_else(|| panic!("{}: a utoipa::path without a path", file.display()));
            found.insert((method, path));
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_in_the_source_is_in_the_document() {
    // Routes are registered only through `routes!`, which puts them in the document: a plain
    // axum `.route(` would be served but undocumented.
    for entry in std::fs::read_dir(http_sources()).unwrap() {
        let file = entry.unwrap().path();
        let text = std::fs::read_to_string(&file).unwrap();
        assert!(
            !text.contains(".route(") && !text.contains(".route_service("),
            "{} registers a route outside the document",
            file.display()
        );
    }
    let annotated = annotated_operations();
    assert!(annotated.len() >= 40, "{annotated:?}");
    let app = TestApp::on_embedded("").await;
    let documented = operations(&document(&app).await);
    assert_eq!(
        annotated.difference(&documented).collect::<Vec<_>>(),
        Vec::<&(String, String)>::new(),
        "annotated but not in the document"
    );
    assert_eq!(
        documented.difference(&annotated).collect::<Vec<_>>(),
        Vec::<&(String, String)>::new(),
        "in the document but not annotated"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_interactive_docs_are_served_from_the_binary() {
    let app = TestApp::on_embedded("").await;
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let response = client.get(app.url("/api-docs")).send().await.unwrap();
    assert_eq!(response.status(), 303);
    assert_eq!(response.headers()["location"], "/api-docs/");

    let page = client.get(app.url("/api-docs/")).send().await.unwrap();
    assert_eq!(page.status(), 200);
    assert_eq!(page.headers()["content-type"], "text/html");
    let page = page.text().await.unwrap();
    assert!(page.contains("swagger-ui-bundle.js"), "{page}");

    let initializer = client
        .get(app.url("/api-docs/swagger-initializer.js"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(initializer.contains("\"/openapi.json\""), "{initializer}");
    let bundle = reqwest::get(app.url("/api-docs/swagger-ui-bundle.js"))
        .await
        .unwrap();
    assert_eq!(bundle.status(), 200);
    assert!(bundle.bytes().await.unwrap().len() > 100_000);

    let missing = reqwest::get(app.url("/api-docs/nope.js")).await.unwrap();
    assert_eq!(
        missing.headers()["content-type"],
        "application/problem+json"
    );
    assert_eq!(missing.status(), 404);
}

/// Set (to anything) where the Schemathesis test must run: failing to install it then fails the
/// test instead of skipping it. CI sets it.
const REQUIRE_SCHEMATHESIS: &str = "STREAMGATE_REQUIRE_SCHEMATHESIS";
/// The version installed (into `target/schemathesis`, a virtualenv) when none is there.
const SCHEMATHESIS: &str = "schemathesis==4.32.5";
/// Test cases per operation and phase; the run generates a few thousand in all.
const MAX_EXAMPLES: &str = "30";
/// A fixed seed makes a failure reproducible; `STREAMGATE_SCHEMATHESIS_SEED` explores others.
const SEED: &str = "20261123";

/// The `st` program: `target/schemathesis/bin/st`, installed on first use.
fn schemathesis() -> Option<PathBuf> {
    python_venv("schemathesis", &[SCHEMATHESIS], REQUIRE_SCHEMATHESIS)
        .map(|venv| venv.join("bin/st"))
}

async fn schemathesis_finds_nothing_the_document_does_not_allow(app: TestApp) {
    let st = tokio::task::spawn_blocking(schemathesis).await.unwrap();
    let Some(st) = st else { return };
    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/schemathesis.toml");
    let seed = std::env::var("STREAMGATE_SCHEMATHESIS_SEED").unwrap_or_else(|_| SEED.to_owned());
    // It keeps a cache of crashes in its working directory: not in the repository.
    let scratch = tempfile::tempdir().unwrap();
    let run = tokio::process::Command::new(&st)
        .current_dir(scratch.path())
        .arg("--config-file")
        .arg(&config)
        .args(["run", &app.url("/openapi.json")])
        .args(["-H", &format!("Authorization: Bearer {TOKEN}")])
        .args(["--max-examples", MAX_EXAMPLES, "--seed", &seed])
        .args([
            "--request-timeout",
            "5",
            "--no-color",
            "--max-failures",
            "50",
        ])
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(300), run)
        .await
        .expect("Schemathesis finishes within 5 minutes")
        .expect("run Schemathesis");
    let report = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "Schemathesis found failures (seed {seed}):\n{report}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    // The run really exercised the API: thousands of cases over every operation.
    let generated: u32 = report
        .lines()
        .find_map(|line| line.trim().split_once(" generated,")?.0.parse().ok())
        .unwrap_or_else(|| panic!("no case count in:\n{report}"));
    assert!(generated >= 1000, "only {generated} cases:\n{report}");
    // Every operation it read was tested (it counts `/api-docs` and `/api-docs/` as one).
    let selected = report
        .lines()
        .find_map(|line| line.trim().strip_prefix("Selected: "))
        .and_then(|counts| counts.split_once('/'))
        .unwrap_or_else(|| panic!("no operation count in:\n{report}"));
    assert_eq!(selected.0, selected.1, "{report}");
    assert!(
        report.contains(&format!("Tested: {}\n", selected.0)),
        "not every operation was tested:\n{report}"
    );
    eprintln!("schemathesis: {generated} cases, no failures (seed {seed})");
}

/// The consume routes take exactly the query parameters their operations list (and a token): a
/// listed one is never refused as unknown, and any other is a 400 naming it, so that a typo
/// (`grop=g`) cannot silently make a group consumer a broadcast subscriber.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consume_routes_take_exactly_their_documented_query_parameters() {
    let app = TestApp::on_embedded("").await;
    let document = document(&app).await;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    let mut checked = 0;
    for (method, path) in operations(&document) {
        let operation = &document["paths"][&path][method.to_lowercase()];
        if method != "GET" || operation["tags"][0] != "consume" {
            continue;
        }
        let url = app.url(&path.replace("{stream}", "typos"));
        let listed: Vec<&str> = operation["parameters"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|parameter| parameter["in"] == "query")
            .map(|parameter| parameter["name"].as_str().unwrap())
            .collect();
        for name in &listed {
            // Whatever a junk value makes of it, the name itself is known.
            let reply = client
                .get(format!("{url}?{name}=x&token={TOKEN}"))
                .send()
                .await;
            if let Some(reply) = reply.ok().filter(|reply| reply.status() == 400) {
                let problem: Value = reply.json().await.unwrap();
                assert!(
                    !problem["detail"].as_str().unwrap().contains("unknown"),
                    "GET {path} lists `{name}` but refuses it: {problem}"
                );
            }
        }
        for typo in ["grop", "Stream", "limitt"] {
            let reply = client
                .get(format!("{url}?{typo}=x&token={TOKEN}"))
                .send()
                .await
                .unwrap();
            assert_eq!(reply.status(), 400, "GET {path}?{typo}=x");
            let problem: Value = reply.json().await.unwrap();
            assert!(
                problem["detail"]
                    .as_str()
                    .unwrap()
                    .contains(&format!("unknown query parameter `{typo}`")),
                "GET {path}: {problem}"
            );
        }
        checked += 1;
    }
    assert!(checked >= 4, "only {checked} consume routes");
}

/// The streams the document's examples name.
const EXAMPLE_STREAMS: [&str; 3] = ["orders", "notifications", "alerts"];

/// Each stream's length (0 for one that does not exist).
async fn lengths(app: &TestApp) -> Vec<u64> {
    let mut lengths = Vec::new();
    for stream in EXAMPLE_STREAMS {
        let reply = app.get(&format!("/api/streams/{stream}")).await;
        lengths.push(match reply.status().as_u16() {
            404 => 0,
            _ => json(reply).await["length"].as_u64().unwrap(),
        });
    }
    lengths
}

/// What Swagger UI's "Try it out" sends for an operation: every example request body the
/// document offers, with the path filled from its parameters' examples, executed against a
/// server holding some messages in the streams the examples name. Each must succeed, and none
/// may remove anything (a pre-filled `maxlen: 1` trimmed the stream to one entry; a trim with
/// `max_len: 0` emptied it).
async fn every_example_body_succeeds_and_destroys_nothing(app: TestApp) {
    let document = document(&app).await;
    for stream in EXAMPLE_STREAMS {
        app.publish_batch(stream, (0..5).map(|n| serde_json::json!(n)).collect())
            .await;
    }
    // The groups the examples name exist, as they would for a user trying the group routes.
    for (stream, group) in [("orders", "billing"), ("notifications", "workers")] {
        let created = app
            .request(
                Method::PUT,
                &format!("/api/streams/{stream}/groups/{group}"),
            )
            .send()
            .await
            .unwrap();
        assert!(created.status().is_success(), "{stream}/{group}");
    }
    let mut executed = 0;
    for (method, path) in operations(&document) {
        let operation = &document["paths"][&path][method.to_lowercase()];
        let Some(content) = operation["requestBody"]["content"].as_object() else {
            continue;
        };
        let example = &content["application/json"]["example"];
        assert!(
            !example.is_null(),
            "{method} {path} offers no example body: Swagger UI would make one up"
        );
        let mut url = path.clone();
        for parameter in operation["parameters"].as_array().into_iter().flatten() {
            if parameter["in"] == "path" {
                let name = parameter["name"].as_str().unwrap();
                let value = parameter["schema"]["examples"][0]
                    .as_str()
                    .or_else(|| {
                        // A referenced schema (an entry id): its example.
                        let reference = parameter["schema"]["$ref"].as_str()?;
                        let schema = reference.rsplit('/').next()?;
                        document["components"]["schemas"][schema]["examples"][0].as_str()
                    })
                    .unwrap_or_else(|| panic!("{method} {path}: `{name}` has no example"));
                url = url.replace(&format!("{{{name}}}"), value);
            }
        }
        let before = lengths(&app).await;
        let reply = app
            .request(Method::from_bytes(method.as_bytes()).unwrap(), &url)
            .json(example)
            .send()
            .await
            .unwrap();
        let status = reply.status();
        let body = reply.text().await.unwrap();
        assert!(
            status.is_success(),
            "{method} {url} with its example {example} answered {status}: {body}"
        );
        let after = lengths(&app).await;
        for ((stream, before), after) in EXAMPLE_STREAMS.iter().zip(&before).zip(&after) {
            assert!(
                after >= before,
                "{method} {url} with its example {example} removed entries of {stream}: \
                 {before} -> {after}"
            );
        }
        executed += 1;
    }
    assert!(executed >= 10, "only {executed} example bodies");
}

//! Authentication and authorization: 401 and 403, scoped tokens, stream globs.

use serde_json::json;

use crate::helpers::{TestApp, json, problem};

const SCOPED: &str = r#"
[[tokens]]
name = "orders-writer"
token = "writer-secret"
scopes = ["publish"]
streams = ["orders.*"]

[[tokens]]
name = "team-a-admin"
token = "team-a-secret"
scopes = ["admin"]
streams = ["team-a.*"]
"#;

on_each_backend!(
    missing_or_wrong_credentials_are_401,
    scoped_tokens_are_held_to_their_scopes_and_streams = SCOPED,
);

async fn missing_or_wrong_credentials_are_401(app: TestApp) {
    let client = reqwest::Client::new();
    let response = client.get(app.url("/admin/ping")).send().await.unwrap();
    assert_eq!(
        response.headers()["www-authenticate"],
        r#"Bearer realm="streamgate""#
    );
    problem(response, 401).await;

    let response = client
        .get(app.url("/admin/ping"))
        .bearer_auth("nope")
        .send()
        .await
        .unwrap();
    assert!(
        response.headers()["www-authenticate"]
            .to_str()
            .unwrap()
            .contains("invalid_token")
    );
    problem(response, 401).await;

    for header in [
        "Basic dXNlcjpwYXNz",
        "Bearer",
        "Bearer ",
        "test-token-0123456789",
    ] {
        let response = client
            .get(app.url("/admin/ping"))
            .header("authorization", header)
            .send()
            .await
            .unwrap();
        problem(response, 401).await;
    }
    // A query token is only for streaming GET routes.
    let url = app.url(&format!("/admin/ping?token={}", crate::helpers::TOKEN));
    problem(client.get(url).send().await.unwrap(), 401).await;
    let response = client
        .post(app.url("/api/streams/s/messages"))
        .json(&json!({ "data": 1 }))
        .send()
        .await
        .unwrap();
    problem(response, 401).await;
    // Nothing was written by the refused publish.
    problem(app.get("/admin/s").await, 404).await;
}

async fn scoped_tokens_are_held_to_their_scopes_and_streams(app: TestApp) {
    let client = reqwest::Client::new();
    let as_writer = |method: reqwest::Method, path: &str| {
        client
            .request(method, app.url(path))
            .bearer_auth("writer-secret")
    };
    let response = as_writer(reqwest::Method::POST, "/api/streams/orders.eu/messages")
        .json(&json!({ "data": 1 }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    let response = as_writer(reqwest::Method::POST, "/api/streams/payments/messages")
        .json(&json!({ "data": 1 }))
        .send()
        .await
        .unwrap();
    let detail = problem(response, 403).await["detail"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        detail.contains("orders-writer") && detail.contains("payments"),
        "{detail}"
    );
    // v1 bulk checks every topic before writing any.
    let response = as_writer(reqwest::Method::POST, "/api/v1/messages/bulk")
        .json(&json!({ "messages": [{ "topic": "orders.us", "payload": 1 }, { "topic": "payments", "payload": 2 }] }))
        .send()
        .await
        .unwrap();
    problem(response, 403).await;
    problem(app.get("/admin/orders.us").await, 404).await;
    for path in [
        "/admin/ping",
        "/admin/streams",
        "/api/streams/orders.eu/messages",
    ] {
        problem(
            as_writer(reqwest::Method::GET, path).send().await.unwrap(),
            403,
        )
        .await;
    }

    // An admin limited to team-a.* sees and inspects only those streams, and cannot flush.
    app.publish("team-a.jobs", json!(1)).await;
    app.publish("team-b.jobs", json!(1)).await;
    let as_team_a = |method: reqwest::Method, path: &str| {
        client
            .request(method, app.url(path))
            .bearer_auth("team-a-secret")
    };
    let streams = json(
        as_team_a(reqwest::Method::GET, "/admin/streams")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(streams, json!({ "streams": ["team-a.jobs"] }));
    let stats = json(
        as_team_a(reqwest::Method::GET, "/admin/stats")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(stats["streams"].as_array().unwrap().len(), 1);
    assert_eq!(
        as_team_a(reqwest::Method::GET, "/admin/team-a.jobs")
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    problem(
        as_team_a(reqwest::Method::GET, "/admin/team-b.jobs")
            .send()
            .await
            .unwrap(),
        403,
    )
    .await;
    problem(
        as_team_a(reqwest::Method::POST, "/admin/flush")
            .send()
            .await
            .unwrap(),
        403,
    )
    .await;
    problem(
        as_team_a(reqwest::Method::POST, "/api/streams/team-a.jobs/messages")
            .json(&json!({ "data": 1 }))
            .send()
            .await
            .unwrap(),
        403,
    )
    .await;
    assert_eq!(
        json(app.get("/admin/streams").await).await["streams"]
            .as_array()
            .unwrap()
            .len(),
        3
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_may_be_configured_by_their_sha256() {
    let digest = hex_sha256("reader-secret");
    let config = format!(
        "[[tokens]]\nname = \"hashed\"\ntoken_sha256 = \"{digest}\"\nscopes = [\"admin\"]\n"
    );
    let Some(app) = TestApp::on_redis(&config).await else {
        return;
    };
    let response = reqwest::Client::new()
        .get(app.url("/admin/ping"))
        .bearer_auth("reader-secret")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
}

fn hex_sha256(text: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(text.as_bytes()))
}

//! Health probes, and how they (and publishing) behave while the backend is down.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::helpers::{TestApp, json, problem};

on_each_backend!(probes_answer_without_credentials);

async fn probes_answer_without_credentials(app: TestApp) {
    let anonymous = reqwest::Client::new();
    let get = |path: &str| anonymous.get(app.url(path)).send();
    let live = get("/health/live").await.unwrap();
    assert_eq!(live.status(), 200);
    assert_eq!(json(live).await, json!({ "status": "alive" }));
    for path in ["/health/ready", "/ready"] {
        let ready = get(path).await.unwrap();
        assert_eq!(ready.status(), 200, "{path}");
        assert_eq!(json(ready).await, json!({ "status": "ready" }));
    }
    for path in ["/health", "/health-check"] {
        let report = json(get(path).await.unwrap()).await;
        assert_eq!(report["service"], "streamgate");
        assert_eq!(report["version"], env!("CARGO_PKG_VERSION"));
        assert_eq!(report["status"], "ok");
        assert_eq!(report["backend"]["status"], "up");
        let round_trip = &report["backend"]["round_trip_ms"];
        assert!(round_trip.as_f64().unwrap() >= 0.0);
        // Milliseconds to the microsecond: at most three decimals.
        let decimals = round_trip.to_string().split('.').nth(1).map_or(0, str::len);
        assert!(decimals <= 3, "{round_trip}");
        assert!(report["uptime_seconds"].is_u64());
        assert_eq!(
            report["connections"],
            json!({ "sse": 0, "websocket": 0, "long_poll": 0 })
        );
    }
}

/// Polls `path` until it answers `status`, for at most `limit`.
async fn wait_for_status(app: &TestApp, path: &str, status: u16, limit: Duration) -> Duration {
    let started = Instant::now();
    while started.elapsed() < limit {
        if app.get(path).await.status() == status {
            return started.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{path} did not answer {status} within {limit:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_turns_readiness_and_publish_to_503_and_back() {
    let Some(mut app) = TestApp::on_redis("").await else {
        return;
    };
    app.publish("before", json!(1)).await;

    app.redis_mut().stop();
    let took = wait_for_status(&app, "/health/ready", 503, Duration::from_secs(5)).await;
    assert!(
        took < Duration::from_secs(2),
        "readiness took {took:?} to notice"
    );
    let ready = problem(app.get("/health/ready").await, 503).await;
    assert!(
        ready["detail"].as_str().unwrap().contains("unreachable"),
        "{ready}"
    );
    let report = app.get("/health").await;
    assert_eq!(report.status(), 503);
    assert_eq!(json(report).await["backend"]["status"], "down");

    let response = app
        .post_json("/api/streams/during/messages", &json!({ "data": 1 }))
        .await;
    assert_eq!(response.headers()["retry-after"], "1");
    let body = problem(response, 503).await;
    assert!(
        !body["detail"].as_str().unwrap().contains("refused"),
        "causes stay in the log"
    );
    problem(app.get("/admin/streams").await, 503).await;

    app.redis_mut().restart();
    wait_for_status(&app, "/health/ready", 200, Duration::from_secs(10)).await;
    let response = app
        .post_json("/api/streams/after/messages", &json!({ "data": 2 }))
        .await;
    assert_eq!(response.status(), 201);
}

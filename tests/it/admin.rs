//! Administration and inspection routes: seed 000's shapes, stream info, browsing, groups.

use serde_json::{Value, json};

use crate::helpers::{TestApp, json, problem};

on_each_backend!(
    ping_answers_pong,
    streams_list_is_an_empty_array_then_sorted_names,
    stats_list_every_stream,
    stream_info_and_its_404,
    literal_admin_routes_win_over_stream_names,
    browse_pages_through_history,
    browse_rejects_bad_bounds,
    flush_deletes_everything,
    groups_of_a_stream_without_groups,
    reserved_prefix_cannot_be_published_to,
);

async fn ping_answers_pong(app: TestApp) {
    let response = app.get("/admin/ping").await;
    assert_eq!(response.status(), 200);
    assert_eq!(json(response).await, json!({ "status": "PONG" }));
}

async fn streams_list_is_an_empty_array_then_sorted_names(app: TestApp) {
    assert_eq!(
        json(app.get("/admin/streams").await).await,
        json!({ "streams": [] })
    );
    app.publish("zeta", json!(1)).await;
    app.publish("alpha", json!(1)).await;
    assert_eq!(
        json(app.get("/admin/streams").await).await,
        json!({ "streams": ["alpha", "zeta"] })
    );
}

async fn stats_list_every_stream(app: TestApp) {
    assert_eq!(
        json(app.get("/admin/stats").await).await,
        json!({ "streams": [] })
    );
    app.publish("orders-stream", json!(1)).await;
    app.publish("orders-stream", json!(2)).await;
    let stats = json(app.get("/admin/stats").await).await;
    assert_eq!(
        stats,
        json!({ "streams": [{ "name": "orders-stream", "length": 2, "groups": [] }] })
    );
}

async fn stream_info_and_its_404(app: TestApp) {
    problem(app.get("/admin/nope").await, 404).await;
    problem(app.get("/api/streams/nope").await, 404).await;
    let first = app.publish("orders", json!({ "n": 1 })).await;
    let last = app.publish("orders", json!({ "n": 2 })).await;
    let info = json(app.get("/admin/orders").await).await;
    assert_eq!(info["name"], "orders");
    assert_eq!(info["length"], 2);
    assert_eq!(
        info["first_entry"],
        json!({ "id": first, "body": { "n": 1 } })
    );
    assert_eq!(
        info["last_entry"],
        json!({ "id": last, "body": { "n": 2 } })
    );
    assert_eq!(info["last_generated_id"], json!(last));
    assert_eq!(info["entries_added"], 2);
    assert_eq!(info["groups"], json!([]));
    assert_eq!(json(app.get("/api/streams/orders").await).await, info);
}

async fn literal_admin_routes_win_over_stream_names(app: TestApp) {
    // A stream may be called "ping": /admin/ping is still the ping route, and the stream's info
    // is at /api/streams/ping.
    app.publish("ping", json!(1)).await;
    assert_eq!(
        json(app.get("/admin/ping").await).await,
        json!({ "status": "PONG" })
    );
    assert_eq!(json(app.get("/api/streams/ping").await).await["length"], 1);
    let response = app.get("/admin/info").await;
    assert_eq!(response.status(), 200);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    // /admin/flush only takes POST.
    problem(app.get("/admin/flush").await, 405).await;
    assert_eq!(json(app.get("/api/streams/ping").await).await["length"], 1);
}

async fn browse_pages_through_history(app: TestApp) {
    let messages: Vec<Value> = (0..250).map(|n| json!({ "n": n })).collect();
    let response = app
        .post_json(
            "/api/streams/history/messages/batch",
            &json!({ "messages": messages }),
        )
        .await;
    let ids: Vec<String> = json(response).await["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|id| id.as_str().unwrap().to_owned())
        .collect();

    // Default page of 100, then follow `next` to the end.
    let mut seen = Vec::new();
    let mut path = "/api/streams/history/messages".to_owned();
    loop {
        let page = json(app.get(&path).await).await;
        assert_eq!(page["stream"], "history");
        let batch = page["messages"].as_array().unwrap();
        assert!(batch.len() <= 100);
        seen.extend(batch.iter().map(|m| m["id"].as_str().unwrap().to_owned()));
        match page["next"].as_str() {
            Some(next) => path = format!("/api/streams/history/messages?from={next}"),
            None => break,
        }
    }
    assert_eq!(seen, ids);

    // Newest first, with a count.
    let page = json(
        app.get("/api/streams/history/messages?reverse=true&count=3")
            .await,
    )
    .await;
    let newest: Vec<&str> = page["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(newest, [&ids[249], &ids[248], &ids[247]]);
    assert_eq!(page["next"], json!(ids[246]));
    assert_eq!(page["messages"][0]["body"], json!({ "n": 249 }));

    // Inclusive bounds.
    let path = format!(
        "/api/streams/history/messages?from={}&to={}",
        ids[10], ids[12]
    );
    let page = json(app.get(&path).await).await;
    assert_eq!(page["messages"].as_array().unwrap().len(), 3);
    assert_eq!(page["next"], Value::Null);
    let path = format!(
        "/api/streams/history/messages?reverse=true&from={}&to={}",
        ids[12], ids[10]
    );
    let page = json(app.get(&path).await).await;
    assert_eq!(page["messages"][0]["id"], json!(ids[12]));
    assert_eq!(page["messages"].as_array().unwrap().len(), 3);

    // At most 1000 per page.
    let page = json(app.get("/api/streams/history/messages?count=5000").await).await;
    assert_eq!(page["messages"].as_array().unwrap().len(), 250);
}

async fn browse_rejects_bad_bounds(app: TestApp) {
    problem(app.get("/api/streams/missing/messages").await, 404).await;
    app.publish("bounds", json!(1)).await;
    for query in [
        "from=yesterday",
        "to=1-2-3",
        "count=0",
        "count=-1",
        "reverse=maybe",
    ] {
        let response = app
            .get(&format!("/api/streams/bounds/messages?{query}"))
            .await;
        problem(response, 400).await;
    }
    let page = json(app.get("/api/streams/bounds/messages?from=0&to=%2B").await).await;
    assert_eq!(page["messages"].as_array().unwrap().len(), 1);
}

async fn flush_deletes_everything(app: TestApp) {
    app.publish("a", json!(1)).await;
    app.publish("b", json!(1)).await;
    let response = app
        .request(reqwest::Method::POST, "/admin/flush")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        json(response).await,
        json!({ "status": "ok", "action": "flushed" })
    );
    assert_eq!(
        json(app.get("/admin/streams").await).await,
        json!({ "streams": [] })
    );
}

async fn groups_of_a_stream_without_groups(app: TestApp) {
    problem(app.get("/api/streams/none/groups").await, 404).await;
    app.publish("lonely", json!(1)).await;
    let groups = json(app.get("/api/streams/lonely/groups").await).await;
    assert_eq!(groups, json!({ "stream": "lonely", "groups": [] }));
}

async fn reserved_prefix_cannot_be_published_to(app: TestApp) {
    let response = app
        .post_json(
            "/api/streams/streamgate:probe/messages",
            &json!({ "data": 1 }),
        )
        .await;
    let detail = problem(response, 403).await["detail"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(detail.contains("reserved"), "{detail}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_info_is_the_servers_info() {
    let Some(app) = TestApp::on_redis("").await else {
        return;
    };
    let text = app.get("/admin/info").await.text().await.unwrap();
    assert!(text.contains("redis_version:"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cli_entries_are_browsed_as_field_maps() {
    let Some(app) = TestApp::on_redis("").await else {
        return;
    };
    let port = app.redis().port.to_string();
    let output = std::process::Command::new("redis-cli")
        .args(["-p", &port, "XADD", "foreign", "*", "a", "1", "b", "2"])
        .output()
        .expect("redis-cli");
    assert!(output.status.success(), "{output:?}");
    let id = String::from_utf8(output.stdout).unwrap().trim().to_owned();
    // `data` that is not JSON comes back as a string.
    let _: String = app
        .redis()
        .cmd(&["XADD", "foreign", "*", "data", "not json", "x", "y"]);
    let page = json(app.get("/api/streams/foreign/messages").await).await;
    assert_eq!(
        page["messages"][0],
        json!({ "id": id, "body": { "a": "1", "b": "2" } })
    );
    assert_eq!(page["messages"][1]["body"], json!("not json"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_stats_show_pending_lag_and_consumers() {
    let Some(app) = TestApp::on_redis("").await else {
        return;
    };
    for n in 0..5 {
        app.publish("orders-stream", json!(n)).await;
    }
    let redis = app.redis();
    let _: () = redis.cmd(&["XGROUP", "CREATE", "orders-stream", "processor-group", "0"]);
    let _: redis::Value = redis.cmd(&[
        "XREADGROUP",
        "GROUP",
        "processor-group",
        "c1",
        "COUNT",
        "2",
        "STREAMS",
        "orders-stream",
        ">",
    ]);
    let _: redis::Value = redis.cmd(&[
        "XREADGROUP",
        "GROUP",
        "processor-group",
        "c2",
        "COUNT",
        "1",
        "STREAMS",
        "orders-stream",
        ">",
    ]);
    let stats = json(app.get("/admin/stats").await).await;
    let group = &stats["streams"][0]["groups"][0];
    assert_eq!(stats["streams"][0]["length"], 5);
    assert_eq!(group["name"], "processor-group");
    assert_eq!(group["pending"], 3);
    assert_eq!(group["lag"], 2);
    assert_eq!(group["consumers"], 2);
    let groups = json(app.get("/api/streams/orders-stream/groups").await).await;
    assert_eq!(groups["groups"][0]["pending"], 3);
    let info = json(app.get("/admin/orders-stream").await).await;
    assert_eq!(info["groups"][0]["consumers"], 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_internal_streams_are_hidden_unless_asked_for() {
    let Some(app) = TestApp::on_redis("").await else {
        return;
    };
    // Own streams: the probe's (written at start-up) and one written by hand.
    app.probed().await;
    let _: String = app
        .redis()
        .cmd(&["XADD", "streamgate:other", "*", "data", "1"]);
    app.publish("visible", json!(1)).await;
    assert_eq!(
        json(app.get("/admin/streams").await).await,
        json!({ "streams": ["visible"] })
    );
    let all = json(app.get("/admin/streams?all=true").await).await;
    let all: Vec<&str> = all["streams"]
        .as_array()
        .unwrap()
        .iter()
        .map(|name| name.as_str().unwrap())
        .collect();
    assert_eq!(all.len(), 3, "{all:?}");
    assert_eq!(all[0], "streamgate:other");
    assert!(all[1].starts_with("streamgate:probe:"), "{all:?}");
    assert_eq!(all[2], "visible");
    let stats = json(app.get("/admin/stats").await).await;
    assert_eq!(stats["streams"].as_array().unwrap().len(), 1);
    let stats = json(app.get("/admin/stats?all=true").await).await;
    assert_eq!(stats["streams"].as_array().unwrap().len(), 3);
}

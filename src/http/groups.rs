//! Administering consumer groups (admin scope): list, create, delete, reposition, and inspect
//! who holds what (pending entries, consumers).

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use super::AppState;
use super::auth::Caller;
use super::error::ApiError;
use super::extract::{ApiPath, ApiQuery, LimitedBody, StreamPath, parse_json, stream_name};
use crate::auth::Scope;
use crate::backend::{Backend, ConsumerInfo, GroupInfo, GroupStart, PendingEntry, PendingQuery};
use crate::model::{ConsumerName, EntryId, GroupName, StreamName};

/// Most pending entries listed at once.
const MAX_PENDING: usize = 1000;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/streams/{stream}/groups", get(list))
        .route(
            "/api/streams/{stream}/groups/{group}",
            put(create).delete(destroy),
        )
        .route(
            "/api/streams/{stream}/groups/{group}/position",
            post(reposition),
        )
        .route("/api/streams/{stream}/groups/{group}/pending", get(pending))
        .route(
            "/api/streams/{stream}/groups/{group}/consumers",
            get(consumers),
        )
}

#[derive(Deserialize)]
struct GroupPath {
    stream: String,
    group: String,
}

/// The stream and group of a path, with the caller's admin scope on the stream checked.
fn target(caller: &Caller, path: GroupPath) -> Result<(StreamName, GroupName), ApiError> {
    let stream = stream_name(path.stream)?;
    caller.require(Scope::Admin, &stream)?;
    let group = GroupName::parse(path.group)
        .map_err(|error| ApiError::BadRequest(format!("invalid group name: {error}")))?;
    Ok((stream, group))
}

/// `0` (the beginning), `$` (the end) or an entry id.
pub fn parse_start(text: &str) -> Option<GroupStart> {
    match text {
        "$" => Some(GroupStart::Latest),
        "0" => Some(GroupStart::After(EntryId::MIN)),
        _ => EntryId::parse_bound(text, false)
            .ok()
            .map(GroupStart::After),
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct PositionBody {
    from: Option<String>,
}

fn start_from(body: &[u8]) -> Result<GroupStart, ApiError> {
    let position: PositionBody = if body.iter().all(u8::is_ascii_whitespace) {
        PositionBody::default()
    } else {
        parse_json(body)?
    };
    match position.from.as_deref() {
        None => Ok(GroupStart::After(EntryId::MIN)),
        Some(text) => parse_start(text).ok_or_else(|| {
            ApiError::BadRequest(format!("`from` must be 0, $ or an entry id, got {text:?}"))
        }),
    }
}

#[derive(Serialize)]
struct Done {
    status: &'static str,
    action: &'static str,
}

fn done(action: &'static str) -> Json<Done> {
    Json(Done {
        status: "ok",
        action,
    })
}

#[derive(Serialize)]
struct Groups {
    stream: StreamName,
    groups: Vec<GroupInfo>,
}

async fn list(
    State(state): State<AppState>,
    caller: Caller,
    StreamPath(stream): StreamPath,
) -> Result<Json<Groups>, ApiError> {
    caller.require(Scope::Admin, &stream)?;
    let stats = state.backend.stream_stats(&stream).await?;
    Ok(Json(Groups {
        stream,
        groups: stats.groups,
    }))
}

/// Creates a group (and its stream) at `from` (default `0`): 201, or 200 if it existed.
async fn create(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(path): ApiPath<GroupPath>,
    LimitedBody(body): LimitedBody,
) -> Result<(StatusCode, Json<Done>), ApiError> {
    let (stream, group) = target(&caller, path)?;
    let start = start_from(&body)?;
    Ok(
        match state.backend.create_group(&stream, &group, start).await? {
            true => (StatusCode::CREATED, done("created")),
            false => (StatusCode::OK, done("exists")),
        },
    )
}

async fn destroy(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(path): ApiPath<GroupPath>,
) -> Result<Json<Done>, ApiError> {
    let (stream, group) = target(&caller, path)?;
    match state.backend.destroy_group(&stream, &group).await? {
        true => Ok(done("deleted")),
        false => Err(ApiError::NotFound("consumer group not found".into())),
    }
}

/// Moves the group's last-delivered id (`{"from": "0" | "$" | id}`); pending entries stay.
async fn reposition(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(path): ApiPath<GroupPath>,
    LimitedBody(body): LimitedBody,
) -> Result<Json<Done>, ApiError> {
    let (stream, group) = target(&caller, path)?;
    let start = start_from(&body)?;
    state
        .backend
        .set_group_position(&stream, &group, start)
        .await?;
    Ok(done("repositioned"))
}

#[derive(Deserialize)]
struct PendingFilter {
    count: Option<usize>,
    consumer: Option<String>,
    min_idle_ms: Option<u64>,
}

#[derive(Serialize)]
struct Pending {
    stream: StreamName,
    group: GroupName,
    pending: Vec<PendingEntry>,
}

/// Who holds what: pending entries, oldest first, with owner, idle time and delivery count.
async fn pending(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(path): ApiPath<GroupPath>,
    ApiQuery(filter): ApiQuery<PendingFilter>,
) -> Result<Json<Pending>, ApiError> {
    let (stream, group) = target(&caller, path)?;
    let consumer = filter
        .consumer
        .map(|name| {
            ConsumerName::parse(name)
                .map_err(|error| ApiError::BadRequest(format!("invalid consumer: {error}")))
        })
        .transpose()?;
    let query = PendingQuery {
        consumer,
        min_idle: filter.min_idle_ms.map(std::time::Duration::from_millis),
        ..PendingQuery::all(filter.count.unwrap_or(100).clamp(1, MAX_PENDING))
    };
    let pending = state.backend.pending(&stream, &group, query).await?;
    Ok(Json(Pending {
        stream,
        group,
        pending,
    }))
}

#[derive(Serialize)]
struct Consumers {
    stream: StreamName,
    group: GroupName,
    consumers: Vec<ConsumerInfo>,
}

async fn consumers(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(path): ApiPath<GroupPath>,
) -> Result<Json<Consumers>, ApiError> {
    let (stream, group) = target(&caller, path)?;
    let consumers = state.backend.consumers(&stream, &group).await?;
    Ok(Json(Consumers {
        stream,
        group,
        consumers,
    }))
}

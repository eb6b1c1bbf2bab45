//! Administering consumer groups (admin scope): list, create, delete, reposition, and inspect
//! who holds what (pending entries, consumers).

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::AppState;
use super::auth::Caller;
use super::consume::group_start;
use super::error::ApiError;
use super::extract::{ApiPath, ApiQuery, LimitedBody, StreamPath, parse_json, stream_name};
use super::openapi::{
    Conflicting, GroupParams, Guarded, Invalid, Missing, StartSchema, StreamParam, TooLarge,
};
use crate::auth::Scope;
use crate::backend::{Backend, ConsumerInfo, GroupInfo, GroupStart, PendingEntry, PendingQuery};
use crate::model::{ConsumerName, EntryId, GroupName, StreamName};

/// Most pending entries listed at once.
const MAX_PENDING: usize = 1000;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list))
        .routes(routes!(create, destroy))
        .routes(routes!(reposition))
        .routes(routes!(pending))
        .routes(routes!(consumers))
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

/// Where a group starts (reading after it).
#[derive(Deserialize, Default, ToSchema)]
#[serde(deny_unknown_fields)]
struct PositionBody {
    /// `0` (the beginning, the default), `$` (the end: only new entries) or an entry id
    /// (milliseconds alone mean `<ms>-0`).
    #[schema(example = "$", value_type = Option<StartSchema>)]
    from: Option<String>,
}

fn start_from(body: &[u8]) -> Result<GroupStart, ApiError> {
    // No body and a JSON `null` both mean the default.
    let position: PositionBody = if body.iter().all(u8::is_ascii_whitespace) {
        PositionBody::default()
    } else {
        parse_json::<Option<PositionBody>>(body)?.unwrap_or_default()
    };
    match position.from.as_deref() {
        None => Ok(GroupStart::After(EntryId::MIN)),
        Some(text) => group_start(text).ok_or_else(|| {
            ApiError::BadRequest(format!("`from` must be 0, $ or an entry id, got {text:?}"))
        }),
    }
}

#[derive(Serialize, ToSchema)]
struct Done {
    #[schema(example = "ok")]
    status: &'static str,
    #[schema(example = "created")]
    action: &'static str,
}

fn done(action: &'static str) -> Json<Done> {
    Json(Done {
        status: "ok",
        action,
    })
}

#[derive(Serialize, ToSchema)]
struct Groups {
    stream: StreamName,
    groups: Vec<GroupInfo>,
}

/// The stream's consumer groups.
#[utoipa::path(
    get,
    path = "/api/streams/{stream}/groups",
    tag = "groups",
    params(StreamParam),
    responses((status = 200, description = "The groups", body = Groups), Invalid, Missing, Conflicting, Guarded),
)]
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
#[utoipa::path(
    put,
    path = "/api/streams/{stream}/groups/{group}",
    tag = "groups",
    params(GroupParams),
    request_body(content = Option<PositionBody>, description = "Optional; the default starts at the beginning", example = json!({"from": "$"})),
    responses(
        (status = 201, description = "Created", body = Done),
        (status = 200, description = "It existed already (unchanged)", body = Done),
        Invalid, Conflicting, TooLarge, Guarded,
    ),
)]
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

/// Deletes a group with its pending list.
#[utoipa::path(
    delete,
    path = "/api/streams/{stream}/groups/{group}",
    tag = "groups",
    params(GroupParams),
    responses((status = 200, description = "Deleted", body = Done), Invalid, Missing, Conflicting, Guarded),
)]
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
#[utoipa::path(
    post,
    path = "/api/streams/{stream}/groups/{group}/position",
    tag = "groups",
    params(GroupParams),
    request_body(content = Option<PositionBody>, description = "Optional; the default is the beginning", example = json!({"from": "$"})),
    responses((status = 200, description = "Moved", body = Done), Invalid, Missing, Conflicting, TooLarge, Guarded),
)]
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

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct PendingFilter {
    /// At most this many, 1–1000 (default 100).
    #[param(minimum = 1)]
    count: Option<usize>,
    /// Only this consumer's.
    #[param(value_type = Option<ConsumerName>)]
    consumer: Option<String>,
    /// Only entries idle at least this long.
    min_idle_ms: Option<u64>,
}

#[derive(Serialize, ToSchema)]
struct Pending {
    stream: StreamName,
    group: GroupName,
    pending: Vec<PendingEntry>,
}

/// Who holds what: pending entries, oldest first, with owner, idle time and delivery count.
#[utoipa::path(
    get,
    path = "/api/streams/{stream}/groups/{group}/pending",
    tag = "groups",
    params(GroupParams, PendingFilter),
    responses((status = 200, description = "The pending entries", body = Pending), Invalid, Missing, Conflicting, Guarded),
)]
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
        min_idle: filter
            .min_idle_ms
            .map(|ms| match i64::try_from(ms) {
                Ok(_) => Ok(std::time::Duration::from_millis(ms)),
                Err(_) => Err(ApiError::BadRequest(format!(
                    "`min_idle_ms` must be at most {}",
                    i64::MAX
                ))),
            })
            .transpose()?,
        ..PendingQuery::all(filter.count.unwrap_or(100).clamp(1, MAX_PENDING))
    };
    let pending = state.backend.pending(&stream, &group, query).await?;
    Ok(Json(Pending {
        stream,
        group,
        pending,
    }))
}

#[derive(Serialize, ToSchema)]
struct Consumers {
    stream: StreamName,
    group: GroupName,
    consumers: Vec<ConsumerInfo>,
}

/// The group's consumers (connected or not) with their pending counts and idle times.
#[utoipa::path(
    get,
    path = "/api/streams/{stream}/groups/{group}/consumers",
    tag = "groups",
    params(GroupParams),
    responses((status = 200, description = "The consumers", body = Consumers), Invalid, Missing, Conflicting, Guarded),
)]
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

//! Controlling consumer groups: flow-control limits and status (seed 000), finishing messages
//! (seed 000's route by id and the explicit routes that work from any instance), nack and touch.

use axum::Json;
use axum::extract::State;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::AppState;
use super::auth::Caller;
use super::error::ApiError;
use super::extract::{ApiPath, LimitedBody, parse_json, stream_name, whole_required};
use super::openapi::{
    Conflicting, ConsumerParams, EntryIdParam, GroupParams, Guarded, Invalid, Missing, TooLarge,
};
use crate::auth::Scope;
use crate::delivery::groups::{FinishedById, MAX_LIMIT};
use crate::model::{ConsumerName, EntryId, GroupName, StreamName};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(status))
        .routes(routes!(set_limit))
        .routes(routes!(finish_delivered))
        .routes(routes!(finish_one))
        .routes(routes!(finish_many))
        .routes(routes!(nack))
        .routes(routes!(touch))
}

#[derive(Deserialize)]
struct GroupPath {
    stream: String,
    group: String,
}

#[derive(Deserialize)]
struct MessagePath {
    stream: String,
    group: String,
    id: String,
}

#[derive(Deserialize)]
struct ConsumerMessagePath {
    stream: String,
    group: String,
    consumer: String,
    id: String,
}

#[derive(Deserialize)]
struct ConsumerPath {
    stream: String,
    group: String,
    consumer: String,
}

fn group_name(text: String) -> Result<GroupName, ApiError> {
    GroupName::parse(text)
        .map_err(|error| ApiError::BadRequest(format!("invalid group name: {error}")))
}

fn consumer_name(text: String) -> Result<ConsumerName, ApiError> {
    ConsumerName::parse(text)
        .map_err(|error| ApiError::BadRequest(format!("invalid consumer name: {error}")))
}

/// Parses a message id from a path. A malformed one names no pending message: 404, as
/// rs-http-facade's own tests expect.
fn message_id(text: &str) -> Result<EntryId, ApiError> {
    text.parse().map_err(|_| not_pending(text))
}

fn not_pending(id: impl std::fmt::Display) -> ApiError {
    ApiError::NotFound(format!("message {id} is not pending in this group"))
}

/// Parses the stream and group of a path and checks the caller may consume from the stream.
fn target(
    caller: &Caller,
    stream: String,
    group: String,
) -> Result<(StreamName, GroupName), ApiError> {
    let stream = stream_name(stream)?;
    caller.require(Scope::Consume, &stream)?;
    Ok((stream, group_name(group)?))
}

#[derive(Serialize, ToSchema)]
struct Status {
    stream: StreamName,
    group: GroupName,
    /// Consumers of the group connected to any instance.
    consumers: u64,
    /// Messages delivered to them since each connected.
    messages: u64,
    /// Of those, how many were finished.
    finished: u64,
}

/// The group's consumers on every instance (seed 000); other instances' counts are at most a few
/// seconds old.
#[utoipa::path(
    get,
    path = "/api/consumers/{stream}/{group}",
    tag = "groups",
    params(GroupParams),
    responses(
        (status = 200, description = "Their status", body = Status),
        Invalid, Missing, Conflicting, Guarded,
    ),
)]
async fn status(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(path): ApiPath<GroupPath>,
) -> Result<Json<Status>, ApiError> {
    let (stream, group) = target(&caller, path.stream, path.group)?;
    let status = state.groups.status(&stream, &group).await?.ok_or_else(|| {
        ApiError::NotFound(format!("no consumer of {stream}/{group} is connected"))
    })?;
    Ok(Json(Status {
        stream,
        group,
        consumers: status.consumers,
        messages: status.messages,
        finished: status.finished,
    }))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct LimitBody {
    /// Most messages in flight per consumer.
    #[schema(minimum = 1, maximum = 10_000)]
    #[serde(deserialize_with = "whole_required")]
    count: i64,
}

#[derive(Serialize, ToSchema)]
struct LimitSet {
    #[schema(example = "ok")]
    status: &'static str,
    /// Connected consumers it applies to, on every instance (later ones get it too).
    consumers: u64,
}

/// Sets how many messages each consumer of the group may hold unfinished (seed 000), on every
/// instance within a second, and the default for consumers that connect later.
#[utoipa::path(
    post,
    path = "/api/consumers/{stream}/{group}/limit",
    tag = "groups",
    params(GroupParams),
    request_body(content = LimitBody, example = json!({"count": 100})),
    responses((status = 200, description = "Applied", body = LimitSet), Invalid, TooLarge, Conflicting, Guarded),
)]
async fn set_limit(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(path): ApiPath<GroupPath>,
    LimitedBody(body): LimitedBody,
) -> Result<Json<LimitSet>, ApiError> {
    let (stream, group) = target(&caller, path.stream, path.group)?;
    let LimitBody { count } = parse_json(&body)?;
    let limit = u32::try_from(count)
        .ok()
        .filter(|limit| (1..=MAX_LIMIT).contains(limit))
        .ok_or_else(|| ApiError::BadRequest(format!("count must be between 1 and {MAX_LIMIT}")))?;
    let consumers = state.groups.set_limit(&stream, &group, limit).await?;
    Ok(Json(LimitSet {
        status: "ok",
        consumers,
    }))
}

#[derive(Serialize, ToSchema)]
struct Done {
    #[schema(example = "ok")]
    status: &'static str,
    #[schema(example = "finished")]
    action: &'static str,
}

const FINISHED: Done = Done {
    status: "ok",
    action: "finished",
};

/// Seed 000's finish: the id alone, on any instance. The message is looked up in the pending
/// lists of the groups that have consumers (or had some within a visibility timeout) on any
/// instance; pending in several of them, nothing is finished and the answer (409) names the
/// explicit routes.
#[utoipa::path(
    post,
    path = "/api/messages/{id}/finish",
    tag = "groups",
    params(EntryIdParam),
    responses(
        (status = 200, description = "Finished", body = Done),
        Missing, Conflicting, Guarded,
    ),
)]
async fn finish_delivered(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<Done>, ApiError> {
    let id = message_id(&id)?;
    let visible = |stream: &StreamName| caller.may(Scope::Consume, stream);
    match state.groups.finish_by_id(id, visible).await? {
        FinishedById::Finished(..) => Ok(Json(FINISHED)),
        FinishedById::NotPending => Err(ApiError::NotFound(format!(
            "message {id} is not pending in any group with consumers"
        ))),
        FinishedById::Ambiguous(holders) => {
            let routes: Vec<String> = holders
                .iter()
                .map(|(stream, group, consumer)| {
                    format!(
                        "POST /api/streams/{}/groups/{}/consumers/{}/messages/{id}/finish",
                        encode_path(stream.as_str()),
                        encode_path(group.as_str()),
                        encode_path(consumer.as_str())
                    )
                })
                .collect();
            Err(ApiError::Conflict(format!(
                "message {id} is pending in {} groups, so its id alone does not say which to finish; nothing was finished. Finish it in each with: {}",
                holders.len(),
                routes.join(", ")
            )))
        }
    }
}

/// A name as one segment of a path.
fn encode_path(name: &str) -> String {
    url::form_urlencoded::byte_serialize(name.as_bytes())
        .collect::<String>()
        .replace('+', "%20")
}

/// Finishes (acknowledges) one message; works from any instance.
#[utoipa::path(
    post,
    path = "/api/streams/{stream}/groups/{group}/consumers/{consumer}/messages/{id}/finish",
    tag = "groups",
    params(ConsumerParams, EntryIdParam),
    responses((status = 200, description = "Finished", body = Done), Invalid, Missing, Conflicting, Guarded),
)]
async fn finish_one(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(path): ApiPath<ConsumerMessagePath>,
) -> Result<Json<Done>, ApiError> {
    let (stream, group) = target(&caller, path.stream, path.group)?;
    let consumer = consumer_name(path.consumer)?;
    let id = message_id(&path.id)?;
    match state
        .groups
        .finish(&stream, &group, Some(&consumer), &[id])
        .await?
    {
        0 => Err(not_pending(id)),
        _ => Ok(Json(FINISHED)),
    }
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct FinishMany {
    /// Entry ids (ids that are not are counted as `invalid`).
    message_ids: Vec<String>,
}

#[derive(Serialize, ToSchema)]
struct FinishedMany {
    status: &'static str,
    action: &'static str,
    /// Ids in the request.
    received: usize,
    /// Of those, how many were pending and are now finished.
    acked: u64,
    /// Well-formed ids that were not pending (unknown or already finished).
    not_pending: u64,
    /// Ids that are not entry ids at all.
    invalid: usize,
}

/// Finishes several messages at once; reports what happened to each kind of id.
#[utoipa::path(
    post,
    path = "/api/streams/{stream}/groups/{group}/consumers/{consumer}/finish",
    tag = "groups",
    params(ConsumerParams),
    request_body(content = FinishMany, example = json!({"message_ids": ["1700000000000-0"]})),
    responses((status = 200, description = "Counts", body = FinishedMany), Invalid, TooLarge, Conflicting, Guarded),
)]
async fn finish_many(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(path): ApiPath<ConsumerPath>,
    LimitedBody(body): LimitedBody,
) -> Result<Json<FinishedMany>, ApiError> {
    let (stream, group) = target(&caller, path.stream, path.group)?;
    let consumer = consumer_name(path.consumer)?;
    let FinishMany { message_ids } = parse_json(&body)?;
    let received = message_ids.len();
    let mut ids: Vec<EntryId> = message_ids
        .iter()
        .filter_map(|id| id.parse().ok())
        .collect();
    let invalid = received - ids.len();
    ids.sort();
    ids.dedup();
    let acked = state
        .groups
        .finish(&stream, &group, Some(&consumer), &ids)
        .await?;
    Ok(Json(FinishedMany {
        status: "ok",
        action: "finished",
        received,
        acked,
        not_pending: ids.len() as u64 - acked,
        invalid,
    }))
}

/// Gives a message back: it is redelivered at once (to any consumer of the group).
#[utoipa::path(
    post,
    path = "/api/streams/{stream}/groups/{group}/messages/{id}/nack",
    tag = "groups",
    params(GroupParams, EntryIdParam),
    responses((status = 200, description = "Nacked", body = Done), Invalid, Missing, Conflicting, Guarded),
)]
async fn nack(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(path): ApiPath<MessagePath>,
) -> Result<Json<Done>, ApiError> {
    let (stream, group) = target(&caller, path.stream, path.group)?;
    let id = message_id(&path.id)?;
    if !state.groups.nack(&stream, &group, id).await? {
        return Err(not_pending(id));
    }
    Ok(Json(Done {
        status: "ok",
        action: "nacked",
    }))
}

/// Holds on to a message: restarts its visibility timeout.
#[utoipa::path(
    post,
    path = "/api/streams/{stream}/groups/{group}/messages/{id}/touch",
    tag = "groups",
    params(GroupParams, EntryIdParam),
    responses((status = 200, description = "Touched", body = Done), Invalid, Missing, Conflicting, Guarded),
)]
async fn touch(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(path): ApiPath<MessagePath>,
) -> Result<Json<Done>, ApiError> {
    let (stream, group) = target(&caller, path.stream, path.group)?;
    let id = message_id(&path.id)?;
    if !state.groups.touch(&stream, &group, id).await? {
        return Err(not_pending(id));
    }
    Ok(Json(Done {
        status: "ok",
        action: "touched",
    }))
}

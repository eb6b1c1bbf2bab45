//! Administration and inspection (admin scope): seed 000's `/admin/*` routes, stream info,
//! browsing history and listing groups. Stream-restricted admin credentials see only their
//! streams in listings.

use axum::Json;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use futures_util::{StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use utoipa::openapi::RefOr;
use utoipa::openapi::schema::{
    AdditionalProperties, KnownFormat, ObjectBuilder, OneOfBuilder, Schema, SchemaFormat, Type,
};
use utoipa::{IntoParams, PartialSchema, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::AppState;
use super::auth::Caller;
use super::error::ApiError;
use super::extract::{ApiQuery, LimitedBody, StreamPath, parse_json, whole};
use super::openapi::{
    Conflicting, Guarded, ID_OR_MS_PATTERN, Invalid, Missing, RangeBoundSchema, StreamParam,
    TooLarge,
};
use crate::auth::Scope;
use crate::backend::{Backend, BackendError, Direction, GroupInfo, RangeQuery, StreamInfo, Trim};
use crate::model::{Entry, EntryId, StreamName};

/// Default and largest page size when browsing history.
const DEFAULT_PAGE: usize = 100;
const MAX_PAGE: usize = 1000;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(ping))
        .routes(routes!(info))
        .routes(routes!(list_streams))
        .routes(routes!(stats))
        .routes(routes!(flush))
        .routes(routes!(admin_stream_info))
        .routes(routes!(stream_info, delete_stream))
        .routes(routes!(browse))
        .routes(routes!(trim))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct ListQuery {
    /// Include streamgate's own streams (`streamgate:…`: probes, idempotency records).
    #[serde(default)]
    all: bool,
}

/// What an action did.
#[derive(Serialize, ToSchema)]
struct Done {
    #[schema(example = "ok")]
    status: &'static str,
    #[schema(example = "deleted")]
    action: &'static str,
}

#[derive(Serialize, ToSchema)]
struct Pong {
    #[schema(example = "PONG")]
    status: &'static str,
}

/// Checks the backend answers.
#[utoipa::path(
    get,
    path = "/admin/ping",
    tag = "admin",
    responses((status = 200, description = "The backend answered", body = Pong), Guarded),
)]
async fn ping(State(state): State<AppState>, caller: Caller) -> Result<Json<Pong>, ApiError> {
    caller.require_scope(Scope::Admin)?;
    state.backend.ping().await?;
    Ok(Json(Pong { status: "PONG" }))
}

/// The backend's own report (Redis `INFO`; a summary for the embedded engine). Needs admin
/// access to every stream.
#[utoipa::path(
    get,
    path = "/admin/info",
    tag = "admin",
    responses((status = 200, description = "The report", content_type = "text/plain", body = String), Guarded),
)]
async fn info(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<impl IntoResponse, ApiError> {
    // The server's information covers every stream.
    caller.require_everywhere(Scope::Admin)?;
    let text = state.backend.server_info().await?;
    Ok(([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], text))
}

/// The streams the caller may see.
async fn visible_streams(
    state: &AppState,
    caller: &Caller,
    all: bool,
) -> Result<Vec<StreamName>, ApiError> {
    let streams = state.backend.list_streams().await?;
    Ok(streams
        .into_iter()
        .filter(|stream| all || !stream.is_internal())
        .filter(|stream| caller.0.may_touch(stream))
        .collect())
}

#[derive(Serialize, ToSchema)]
struct StreamList {
    streams: Vec<StreamName>,
}

/// The streams the caller may administer, by name.
#[utoipa::path(
    get,
    path = "/admin/streams",
    tag = "admin",
    params(ListQuery),
    responses((status = 200, description = "The names", body = StreamList), Invalid, Guarded),
)]
async fn list_streams(
    State(state): State<AppState>,
    caller: Caller,
    ApiQuery(query): ApiQuery<ListQuery>,
) -> Result<Json<StreamList>, ApiError> {
    caller.require_scope(Scope::Admin)?;
    let streams = visible_streams(&state, &caller, query.all).await?;
    Ok(Json(StreamList { streams }))
}

#[derive(Serialize, ToSchema)]
struct StreamStatsView {
    name: StreamName,
    length: u64,
    groups: Vec<GroupInfo>,
}

#[derive(Serialize, ToSchema)]
struct StatsList {
    streams: Vec<StreamStatsView>,
}

/// Length and groups of every stream the caller may administer.
#[utoipa::path(
    get,
    path = "/admin/stats",
    tag = "admin",
    params(ListQuery),
    responses((status = 200, description = "The statistics", body = StatsList), Invalid, Guarded),
)]
async fn stats(
    State(state): State<AppState>,
    caller: Caller,
    ApiQuery(query): ApiQuery<ListQuery>,
) -> Result<Json<StatsList>, ApiError> {
    caller.require_scope(Scope::Admin)?;
    let streams = visible_streams(&state, &caller, query.all).await?;
    let stats: Vec<Option<StreamStatsView>> = futures_util::stream::iter(streams)
        .map(|name| {
            let backend = state.backend.clone();
            async move {
                match backend.stream_stats(&name).await {
                    Ok(stats) => Ok(Some(StreamStatsView {
                        name,
                        length: stats.length,
                        groups: stats.groups,
                    })),
                    // Deleted since it was listed.
                    Err(BackendError::StreamNotFound) => Ok(None),
                    Err(error) => Err(error),
                }
            }
        })
        .buffered(16)
        .try_collect()
        .await?;
    let streams: Vec<StreamStatsView> = stats.into_iter().flatten().collect();
    Ok(Json(StatsList { streams }))
}

/// Deletes every stream (the whole Redis database). Needs admin access to every stream.
#[utoipa::path(
    post,
    path = "/admin/flush",
    tag = "admin",
    responses((status = 200, description = "Everything is gone", body = Done), Guarded),
)]
async fn flush(State(state): State<AppState>, caller: Caller) -> Result<Json<Done>, ApiError> {
    caller.require_everywhere(Scope::Admin)?;
    state.backend.flush().await?;
    tracing::warn!(by = %caller.0.name, "flushed every stream");
    Ok(Json(Done {
        status: "ok",
        action: "flushed",
    }))
}

/// A message as shown by the inspection routes.
#[derive(Serialize, ToSchema)]
struct MessageView {
    id: EntryId,
    /// The payload.
    #[schema(value_type = serde_json::Value)]
    body: Box<RawValue>,
    /// Fields beside `data` (a dead letter's origin, another client's extra fields).
    #[serde(skip_serializing_if = "serde_json::Map::is_empty")]
    #[schema(value_type = std::collections::HashMap<String, String>)]
    fields: serde_json::Map<String, serde_json::Value>,
}

impl MessageView {
    fn new(entry: &Entry) -> Result<MessageView, ApiError> {
        let text = String::from_utf8(entry.body_json().to_vec())
            .map_err(|error| ApiError::Internal(error.to_string()))?;
        let body =
            RawValue::from_string(text).map_err(|error| ApiError::Internal(error.to_string()))?;
        let fields = entry
            .extra_fields()
            .into_iter()
            .map(|(key, value)| (key, serde_json::Value::String(value)))
            .collect();
        Ok(MessageView {
            id: entry.id,
            body,
            fields,
        })
    }
}

#[derive(Serialize, ToSchema)]
struct StreamInfoView {
    name: StreamName,
    length: u64,
    first_entry: Option<MessageView>,
    last_entry: Option<MessageView>,
    last_generated_id: EntryId,
    entries_added: u64,
    /// The largest id ever deleted by id (trimming does not count), `0-0` when none was.
    max_deleted_id: EntryId,
    groups: Vec<GroupInfo>,
}

/// One stream: length, first and last entries, groups.
#[utoipa::path(
    get,
    path = "/api/streams/{stream}",
    tag = "admin",
    params(StreamParam),
    responses((status = 200, description = "The stream", body = StreamInfoView), Invalid, Missing, Conflicting, Guarded),
)]
async fn stream_info(
    State(state): State<AppState>,
    caller: Caller,
    StreamPath(stream): StreamPath,
) -> Result<Json<StreamInfoView>, ApiError> {
    caller.require(Scope::Admin, &stream)?;
    let StreamInfo {
        length,
        first_entry,
        last_entry,
        last_generated_id,
        entries_added,
        max_deleted_id,
        groups,
    } = state.backend.stream_info(&stream).await?;
    Ok(Json(StreamInfoView {
        name: stream,
        length,
        first_entry: first_entry.as_ref().map(MessageView::new).transpose()?,
        last_entry: last_entry.as_ref().map(MessageView::new).transpose()?,
        last_generated_id,
        entries_added,
        max_deleted_id,
        groups,
    }))
}

/// Seed 000's name for the same.
#[utoipa::path(
    get,
    path = "/admin/{stream}",
    tag = "admin",
    params(StreamParam),
    responses((status = 200, description = "The stream", body = StreamInfoView), Invalid, Missing, Conflicting, Guarded),
)]
async fn admin_stream_info(
    state: State<AppState>,
    caller: Caller,
    stream: StreamPath,
) -> Result<Json<StreamInfoView>, ApiError> {
    stream_info(state, caller, stream).await
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct BrowseQuery {
    /// Where reading starts (inclusive): an id, milliseconds alone, or `-`/`+`. The oldest entry
    /// by default (the newest with `reverse`); empty is the default too.
    #[param(value_type = Option<RangeBoundSchema>)]
    from: Option<String>,
    /// Where reading stops (inclusive), as `from`.
    #[param(value_type = Option<RangeBoundSchema>)]
    to: Option<String>,
    /// Entries per page, 1–1000 (default 100).
    #[param(minimum = 1)]
    count: Option<usize>,
    /// Newest first.
    #[serde(default)]
    reverse: bool,
}

#[derive(Serialize, ToSchema)]
struct Page {
    stream: StreamName,
    messages: Vec<MessageView>,
    /// Where the next page starts (pass it as `from`), or null at the end.
    next: Option<EntryId>,
}

/// Parses an optional range bound: an id, milliseconds alone, or `-`/`+`.
fn bound(text: Option<&str>, is_end: bool, default: EntryId) -> Result<EntryId, ApiError> {
    match text {
        None | Some("") => Ok(default),
        Some("-") => Ok(EntryId::MIN),
        Some("+") => Ok(EntryId::MAX),
        Some(text) => EntryId::parse_bound(text, is_end)
            .map_err(|error| ApiError::BadRequest(error.to_string())),
    }
}

/// History, oldest first (or newest first with `reverse=true`), `count` at a time.
#[utoipa::path(
    get,
    path = "/api/streams/{stream}/messages",
    tag = "admin",
    params(StreamParam, BrowseQuery),
    responses((status = 200, description = "One page", body = Page), Invalid, Missing, Conflicting, Guarded),
)]
async fn browse(
    State(state): State<AppState>,
    caller: Caller,
    StreamPath(stream): StreamPath,
    ApiQuery(query): ApiQuery<BrowseQuery>,
) -> Result<Json<Page>, ApiError> {
    caller.require(Scope::Admin, &stream)?;
    let count = query.count.unwrap_or(DEFAULT_PAGE);
    if count == 0 {
        return Err(ApiError::BadRequest("count must be at least 1".into()));
    }
    let count = count.min(MAX_PAGE);
    // `from` is where reading starts: the low end going forward, the high end in reverse.
    let (direction, start, end) = if query.reverse {
        let high = bound(query.from.as_deref(), true, EntryId::MAX)?;
        let low = bound(query.to.as_deref(), false, EntryId::MIN)?;
        (Direction::Backward, low, high)
    } else {
        let low = bound(query.from.as_deref(), false, EntryId::MIN)?;
        let high = bound(query.to.as_deref(), true, EntryId::MAX)?;
        (Direction::Forward, low, high)
    };
    let mut entries = state
        .backend
        .range(
            &stream,
            RangeQuery {
                start,
                end,
                count: count + 1,
                direction,
            },
        )
        .await?;
    let next = (entries.len() > count).then(|| entries[count].id);
    entries.truncate(count);
    let messages = entries
        .iter()
        .map(MessageView::new)
        .collect::<Result<_, _>>()?;
    Ok(Json(Page {
        stream,
        messages,
        next,
    }))
}

/// Deletes a stream with its groups.
#[utoipa::path(
    delete,
    path = "/api/streams/{stream}",
    tag = "admin",
    params(StreamParam),
    responses((status = 200, description = "Deleted", body = Done), Invalid, Missing, Conflicting, Guarded),
)]
async fn delete_stream(
    State(state): State<AppState>,
    caller: Caller,
    StreamPath(stream): StreamPath,
) -> Result<Json<Done>, ApiError> {
    caller.require(Scope::Admin, &stream)?;
    match state.backend.delete_stream(&stream).await? {
        true => Ok(Json(Done {
            status: "ok",
            action: "deleted",
        })),
        false => Err(ApiError::NotFound("stream not found".into())),
    }
}

/// Exactly one of the two (a `null` counts as absent).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TrimBody {
    /// Keep the newest this many entries.
    #[serde(default, deserialize_with = "whole")]
    max_len: Option<u64>,
    /// Remove the entries older than this id.
    min_id: Option<String>,
}

/// A derived schema cannot say "exactly one of": this is `oneOf` the two shapes.
impl PartialSchema for TrimBody {
    fn schema() -> RefOr<Schema> {
        let max_len = ObjectBuilder::new()
            .schema_type(Type::Integer)
            .format(Some(SchemaFormat::KnownFormat(KnownFormat::Int64)))
            .minimum(Some(0))
            .description(Some("Keep the newest this many entries"));
        let min_id = ObjectBuilder::new()
            .schema_type(Type::String)
            .pattern(Some(ID_OR_MS_PATTERN))
            .description(Some(
                "Remove the entries older than this id (milliseconds alone mean `<ms>-0`)",
            ));
        let only = |name: &str, schema: ObjectBuilder, other: &str| {
            ObjectBuilder::new()
                .property(name, schema)
                .required(name)
                .property(other, ObjectBuilder::new().schema_type(Type::Null))
                .additional_properties(Some(AdditionalProperties::FreeForm(false)))
        };
        OneOfBuilder::new()
            .item(only("max_len", max_len, "min_id"))
            .item(only("min_id", min_id, "max_len"))
            .into()
    }
}

impl ToSchema for TrimBody {}

#[derive(Serialize, ToSchema)]
struct Trimmed {
    #[schema(example = "ok")]
    status: &'static str,
    stream: StreamName,
    /// Entries removed.
    trimmed: u64,
}

/// Trims exactly: `{"max_len": N}` keeps the newest N, `{"min_id": id}` removes older entries.
#[utoipa::path(
    post,
    path = "/api/streams/{stream}/trim",
    tag = "admin",
    params(StreamParam),
    request_body(content = TrimBody, example = json!({"max_len": 1_000_000})),
    responses((status = 200, description = "Trimmed", body = Trimmed), Invalid, Missing, TooLarge, Conflicting, Guarded),
)]
async fn trim(
    State(state): State<AppState>,
    caller: Caller,
    StreamPath(stream): StreamPath,
    LimitedBody(body): LimitedBody,
) -> Result<Json<Trimmed>, ApiError> {
    caller.require(Scope::Admin, &stream)?;
    let request: TrimBody = parse_json(&body)?;
    let trim = match (request.max_len, request.min_id) {
        (Some(max_len), None) => Trim::MaxLen(max_len),
        (None, Some(min_id)) => Trim::MinId(
            EntryId::parse_bound(&min_id, false)
                .map_err(|error| ApiError::BadRequest(error.to_string()))?,
        ),
        _ => {
            return Err(ApiError::BadRequest(
                "give exactly one of `max_len` or `min_id`".into(),
            ));
        }
    };
    // Trimming a missing stream is a 404, not a silent zero.
    state.backend.stream_stats(&stream).await?;
    let trimmed = state.backend.trim(&stream, trim).await?;
    Ok(Json(Trimmed {
        status: "ok",
        stream,
        trimmed,
    }))
}

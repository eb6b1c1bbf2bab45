//! Administration and inspection (admin scope): seed 000's `/admin/*` routes, stream info,
//! browsing history and listing groups. Stream-restricted admin credentials see only their
//! streams in listings.

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::{StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::AppState;
use super::auth::Caller;
use super::error::ApiError;
use super::extract::{ApiQuery, LimitedBody, StreamPath, parse_json};
use crate::auth::Scope;
use crate::backend::{Backend, BackendError, Direction, GroupInfo, RangeQuery, StreamInfo, Trim};
use crate::model::{Entry, EntryId, StreamName};

/// Default and largest page size when browsing history.
const DEFAULT_PAGE: usize = 100;
const MAX_PAGE: usize = 1000;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/admin/ping", get(ping))
        .route("/admin/info", get(info))
        .route("/admin/streams", get(list_streams))
        .route("/admin/stats", get(stats))
        .route("/admin/flush", post(flush))
        .route("/admin/{stream}", get(stream_info))
        .route(
            "/api/streams/{stream}",
            get(stream_info).delete(delete_stream),
        )
        .route("/api/streams/{stream}/messages", get(browse))
        .route("/api/streams/{stream}/trim", post(trim))
}

#[derive(Deserialize)]
struct ListQuery {
    /// Include streamgate's own streams.
    #[serde(default)]
    all: bool,
}

async fn ping(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<impl IntoResponse, ApiError> {
    caller.require_scope(Scope::Admin)?;
    state.backend.ping().await?;
    Ok(Json(serde_json::json!({ "status": "PONG" })))
}

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

async fn list_streams(
    State(state): State<AppState>,
    caller: Caller,
    ApiQuery(query): ApiQuery<ListQuery>,
) -> Result<impl IntoResponse, ApiError> {
    caller.require_scope(Scope::Admin)?;
    let streams = visible_streams(&state, &caller, query.all).await?;
    Ok(Json(serde_json::json!({ "streams": streams })))
}

#[derive(Serialize)]
struct StreamStatsView {
    name: StreamName,
    length: u64,
    groups: Vec<GroupInfo>,
}

/// Statistics for every visible stream, read a few at a time.
async fn stats(
    State(state): State<AppState>,
    caller: Caller,
    ApiQuery(query): ApiQuery<ListQuery>,
) -> Result<impl IntoResponse, ApiError> {
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
    Ok(Json(serde_json::json!({ "streams": streams })))
}

async fn flush(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<impl IntoResponse, ApiError> {
    caller.require_everywhere(Scope::Admin)?;
    state.backend.flush().await?;
    tracing::warn!(by = %caller.0.name, "flushed every stream");
    Ok(Json(
        serde_json::json!({ "status": "ok", "action": "flushed" }),
    ))
}

/// A message as shown by the inspection routes.
#[derive(Serialize)]
struct MessageView {
    id: EntryId,
    body: Box<RawValue>,
    /// Fields beside `data` (a dead letter's origin, another client's extra fields).
    #[serde(skip_serializing_if = "serde_json::Map::is_empty")]
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

#[derive(Serialize)]
struct StreamInfoView {
    name: StreamName,
    length: u64,
    first_entry: Option<MessageView>,
    last_entry: Option<MessageView>,
    last_generated_id: EntryId,
    entries_added: u64,
    groups: Vec<GroupInfo>,
}

async fn stream_info(
    State(state): State<AppState>,
    caller: Caller,
    StreamPath(stream): StreamPath,
) -> Result<impl IntoResponse, ApiError> {
    caller.require(Scope::Admin, &stream)?;
    let StreamInfo {
        length,
        first_entry,
        last_entry,
        last_generated_id,
        entries_added,
        groups,
    } = state.backend.stream_info(&stream).await?;
    Ok(Json(StreamInfoView {
        name: stream,
        length,
        first_entry: first_entry.as_ref().map(MessageView::new).transpose()?,
        last_entry: last_entry.as_ref().map(MessageView::new).transpose()?,
        last_generated_id,
        entries_added,
        groups,
    }))
}

#[derive(Deserialize)]
struct BrowseQuery {
    from: Option<String>,
    to: Option<String>,
    count: Option<usize>,
    #[serde(default)]
    reverse: bool,
}

#[derive(Serialize)]
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
async fn browse(
    State(state): State<AppState>,
    caller: Caller,
    StreamPath(stream): StreamPath,
    ApiQuery(query): ApiQuery<BrowseQuery>,
) -> Result<impl IntoResponse, ApiError> {
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

async fn delete_stream(
    State(state): State<AppState>,
    caller: Caller,
    StreamPath(stream): StreamPath,
) -> Result<impl IntoResponse, ApiError> {
    caller.require(Scope::Admin, &stream)?;
    match state.backend.delete_stream(&stream).await? {
        true => Ok(Json(
            serde_json::json!({ "status": "ok", "action": "deleted" }),
        )),
        false => Err(ApiError::NotFound("stream not found".into())),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TrimBody {
    max_len: Option<u64>,
    min_id: Option<String>,
}

/// Trims exactly: `{"max_len": N}` keeps the newest N, `{"min_id": id}` removes older entries.
async fn trim(
    State(state): State<AppState>,
    caller: Caller,
    StreamPath(stream): StreamPath,
    LimitedBody(body): LimitedBody,
) -> Result<impl IntoResponse, ApiError> {
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
    Ok(Json(
        serde_json::json!({ "status": "ok", "stream": stream, "trimmed": trimmed }),
    ))
}

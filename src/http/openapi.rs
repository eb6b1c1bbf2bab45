//! The OpenAPI 3.1 document and the interactive docs.
//!
//! The document is generated from the handlers' `#[utoipa::path]` attributes: every route is
//! registered with `utoipa_axum::routes!`, which adds the handler to the router and its operation
//! to the document in one step, so the two cannot drift apart. Error statuses come from the
//! response sets below, one per refusal a route can answer with.
//!
//! `/api-docs/` is Swagger UI, compiled into the binary (no network access needed), reading
//! `/openapi.json`.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Extension;
use axum::extract::Path;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Redirect, Response};
use utoipa::openapi::OpenApi as Document;
use utoipa::openapi::Required;
use utoipa::openapi::header::HeaderBuilder;
use utoipa::openapi::path::{Parameter, ParameterBuilder, ParameterIn};
use utoipa::openapi::schema::{ObjectBuilder, Schema, Type};
use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{ContentBuilder, Ref, RefOr, ResponseBuilder};
use utoipa::{IntoParams, IntoResponses, Modify, OpenApi, PartialSchema, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::AppState;
use super::error::{ApiError, Problem};
use crate::model::{ConsumerName, EntryId, GroupName, MAX_NAME_BYTES, StreamName};

/// The document's fixed part; the paths are added as routes are registered.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "streamgate",
        description = "Redis Streams over HTTP: publish with POST; consume as competing consumers \
                       of a group or as broadcast subscribers, over Server-Sent Events, WebSocket \
                       or long-polling. Errors are RFC 9457 problem documents.",
        license(name = "MIT OR Apache-2.0", identifier = "MIT OR Apache-2.0"),
    ),
    modifiers(&Security),
    // Schemas that parameters refer to (derived parameters do not register what they refer to).
    components(schemas(
        Problem, StreamName, GroupName, ConsumerName, StartSchema, RangeBoundSchema
    )),
    security(("bearer" = [])),
    tags(
        (name = "publish", description = "Append messages to streams"),
        (name = "consume", description = "Receive messages: groups, broadcast, long-polling, WebSocket"),
        (name = "groups", description = "Consumer groups: finish, nack, touch, limits, pending"),
        (name = "admin", description = "Inspect and manage streams"),
        (name = "operations", description = "Health, readiness, metrics, the probe and these docs"),
    ),
)]
struct ApiDoc;

/// Bearer tokens (static or JWT) in the `Authorization` header, or `?token=` on streaming GETs.
struct Security;

impl Modify for Security {
    fn modify(&self, openapi: &mut Document) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "A static token or a JWT with `scope`/`scopes` and `streams` claims",
                    ))
                    .build(),
            ),
        );
        components.add_security_scheme(
            "query_token",
            SecurityScheme::ApiKey(ApiKey::Query(ApiKeyValue::with_description(
                "token",
                "The same token as a query parameter (`token` or `access_token`), accepted on \
                 streaming GET routes because browsers' EventSource and WebSocket cannot set \
                 headers",
            ))),
        );
    }
}

/// A problem+json response, with the headers it carries.
fn problem(
    status: u16,
    slug: &str,
    description: &str,
    headers: &[(&str, &str)],
) -> RefOr<utoipa::openapi::Response> {
    // An example of this very status (the schema's own would read 400 for every one of them).
    let title = axum::http::StatusCode::from_u16(status)
        .ok()
        .and_then(|status| status.canonical_reason())
        .unwrap_or("Error");
    let example = serde_json::json!({
        "type": format!("urn:streamgate:problem:{slug}"),
        "title": title,
        "status": status,
        "detail": description,
        "correlation_id": "9ac397afe41fab60753afd9c",
    });
    let content = ContentBuilder::new()
        .schema(Some(Ref::from_schema_name("Problem")))
        .example(Some(example))
        .build();
    let mut response = ResponseBuilder::new()
        .description(description)
        .content("application/problem+json", content);
    for (name, description) in headers {
        let header = HeaderBuilder::new()
            .schema(Some(ObjectBuilder::new().schema_type(Type::String)))
            .description(Some(*description))
            .build();
        response = response.header(*name, header);
    }
    response.build().into()
}

/// Declares a set of problem responses for `responses(...)` in `#[utoipa::path]`.
macro_rules! problems {
    ($(#[$doc:meta])* $name:ident: $(($status:literal, $slug:literal, $description:literal $(, $header:literal = $header_description:literal)*)),+ $(,)?) => {
        $(#[$doc])*
        pub struct $name;

        impl IntoResponses for $name {
            fn responses() -> BTreeMap<String, RefOr<utoipa::openapi::Response>> {
                BTreeMap::from([$(
                    ($status.to_string(), problem($status, $slug, $description, &[$(($header, $header_description)),*])),
                )+])
            }
        }
    };
}

problems!(
    /// 400.
    Invalid: (400, "bad-request", "Invalid input (path, query, header or body); nothing was changed"),
);
problems!(
    /// 404.
    Missing: (404, "not-found", "The stream, group, consumer or message does not exist"),
);
problems!(
    /// 409.
    Conflicting: (409, "conflict", "Conflicts with the current state: the key is not a stream, or the consumer is already connected"),
);
problems!(
    /// 413.
    TooLarge: (413, "payload-too-large", "The body exceeds `limits.max_body_bytes`, a message `limits.max_message_bytes`, or a batch `limits.max_batch_messages`"),
);
problems!(
    /// The refusals every authenticated route can answer with.
    Guarded:
    (401, "unauthorized", "Missing or invalid credentials", "WWW-Authenticate" = "`Bearer realm=\"streamgate\"`"),
    (403, "forbidden", "The credentials lack the scope, the stream is outside their patterns, or (publishing) the name is reserved (`streamgate:`)"),
    (429, "rate-limited", "Over the rate limit for this credential or address", "Retry-After" = "Seconds to wait"),
    (500, "internal", "An unexpected failure; the log has the cause under the correlation id"),
    (503, "unavailable", "The backend is unreachable, or (streaming routes) this instance is at its connection cap", "Retry-After" = "Seconds to wait"),
);

/// The document and docs routes (no credentials needed).
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(document))
        .routes(routes!(docs))
        .routes(routes!(docs_index))
        .routes(routes!(docs_file))
}

/// The complete document, serialised once (handed to the routes as an extension).
#[derive(Clone)]
pub struct DocumentText(Arc<[u8]>);

/// Completes the document of the registered routes.
pub fn finish(document: Document) -> DocumentText {
    let mut full = ApiDoc::openapi();
    full.merge(document);
    let text = full
        .to_json()
        .unwrap_or_else(|_| unreachable!("the document always serialises"));
    DocumentText(text.into_bytes().into())
}

/// The document, as JSON.
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "operations",
    security(()),
    responses((status = 200, description = "This OpenAPI 3.1 document", content_type = "application/json", body = Object)),
)]
async fn document(Extension(json): Extension<DocumentText>) -> Response {
    let body = axum::body::Bytes::from_owner(json.0);
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// The interactive docs live under `/api-docs/` (their files are relative to it).
#[utoipa::path(
    get,
    path = "/api-docs",
    tag = "operations",
    security(()),
    responses((status = 303, description = "Redirects to `/api-docs/`", headers(("Location" = String)))),
)]
async fn docs() -> Redirect {
    Redirect::to("/api-docs/")
}

/// Swagger UI, served from the binary.
#[utoipa::path(
    get,
    path = "/api-docs/",
    tag = "operations",
    security(()),
    responses((status = 200, description = "The interactive docs", content_type = "text/html", body = String)),
)]
async fn docs_index() -> Response {
    docs_asset("index.html")
}

/// One of Swagger UI's files.
#[utoipa::path(
    get,
    path = "/api-docs/{file}",
    tag = "operations",
    security(()),
    params(("file" = String, Path, description = "A file of Swagger UI, e.g. `swagger-ui.css`")),
    responses(
        (status = 200, description = "The file"),
        (status = 404, description = "No such file", content_type = "application/problem+json", body = Problem),
    ),
)]
async fn docs_file(Path(file): Path<String>) -> Response {
    docs_asset(&file)
}

fn docs_asset(file: &str) -> Response {
    let config = utoipa_swagger_ui::Config::from("/openapi.json").persist_authorization(true);
    match utoipa_swagger_ui::serve(file, Arc::new(config)) {
        Ok(Some(asset)) => {
            let mut response = (
                [(header::CONTENT_TYPE, asset.content_type)],
                asset.bytes.into_owned(),
            )
                .into_response();
            if asset.gzpipped {
                response
                    .headers_mut()
                    .insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
            }
            response
        }
        Ok(None) => ApiError::NotFound(format!("no file {file:?} in the docs")).into_response(),
        Err(error) => ApiError::Internal(format!("serving the docs: {error}")).into_response(),
    }
}

/// Names (streams, groups, consumers): 1–256 bytes of UTF-8 without control characters.
const NAME_PATTERN: &str = "^[^\\u0000-\\u001F\\u007F-\\u009F]+$";

/// A name's schema. JSON Schema counts characters, not bytes, so `maxLength` is only the outer
/// bound: a name of 256 characters beyond ASCII is still too long.
/// A name's schema, with a real-looking example (Swagger UI would otherwise fill in a random
/// string generated from the pattern).
fn name_schema(description: &str, example: &str) -> ObjectBuilder {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .examples([serde_json::json!(example)])
        .min_length(Some(1))
        .max_length(Some(MAX_NAME_BYTES))
        .pattern(Some(NAME_PATTERN))
        .description(Some(format!(
            "{description}: 1–{MAX_NAME_BYTES} bytes of UTF-8 without control characters"
        )))
}

fn name_parameter(name: &str, description: &str, example: &str) -> Parameter {
    ParameterBuilder::new()
        .name(name)
        .parameter_in(ParameterIn::Path)
        .required(Required::True)
        .description(Some(format!(
            "{description}: 1–{MAX_NAME_BYTES} bytes of UTF-8 without control characters"
        )))
        .schema(Some(name_schema(description, example)))
        .build()
}

/// The `{stream}` path parameter.
pub struct StreamParam;

impl IntoParams for StreamParam {
    fn into_params(_: impl Fn() -> Option<ParameterIn>) -> Vec<Parameter> {
        vec![name_parameter("stream", "The stream", "orders")]
    }
}

/// The `{stream}` and `{group}` path parameters.
pub struct GroupParams;

impl IntoParams for GroupParams {
    fn into_params(_: impl Fn() -> Option<ParameterIn>) -> Vec<Parameter> {
        vec![
            name_parameter("stream", "The stream", "orders"),
            name_parameter("group", "The consumer group", "billing"),
        ]
    }
}

/// The `{stream}`, `{group}` and `{consumer}` path parameters.
pub struct ConsumerParams;

impl IntoParams for ConsumerParams {
    fn into_params(_: impl Fn() -> Option<ParameterIn>) -> Vec<Parameter> {
        vec![
            name_parameter("stream", "The stream", "orders"),
            name_parameter("group", "The consumer group", "billing"),
            name_parameter("consumer", "The consumer", "worker-1"),
        ]
    }
}

/// The `{id}` path parameter: an entry id.
pub struct EntryIdParam;

impl IntoParams for EntryIdParam {
    fn into_params(_: impl Fn() -> Option<ParameterIn>) -> Vec<Parameter> {
        let schema = ObjectBuilder::new()
            .schema_type(Type::String)
            .pattern(Some(ENTRY_ID_PATTERN));
        vec![
            ParameterBuilder::new()
                .name("id")
                .parameter_in(ParameterIn::Path)
                .required(Required::True)
                .description(Some("An entry id, `<milliseconds>-<sequence>`"))
                .schema(Some(schema))
                .build(),
        ]
    }
}

/// An entry id, `<milliseconds>-<sequence>`. Redis allows 20 digits where they fit 64 bits; the
/// documented pattern stops at 19, which always fit.
pub const ENTRY_ID_PATTERN: &str = "^[0-9]{1,19}-[0-9]{1,19}$";
/// An entry id, or milliseconds alone (`<ms>-0`, or `<ms>-<max>` as an end bound).
pub const ID_OR_MS_PATTERN: &str = "^[0-9]{1,19}(-[0-9]{1,19})?$";
/// Where a group or a broadcast starts: `0`, `$`, an id or milliseconds.
pub const START_PATTERN: &str = "^(0|\\$|[0-9]{1,19}(-[0-9]{1,19})?)$";
/// A browse bound: empty (the default), `-`, `+`, an id or milliseconds.
pub const RANGE_BOUND_PATTERN: &str = "^([-+]|[0-9]{1,19}(-[0-9]{1,19})?)?$";

/// The `Idempotency-Key` request header.
pub struct IdempotencyHeader;

impl IntoParams for IdempotencyHeader {
    fn into_params(_: impl Fn() -> Option<ParameterIn>) -> Vec<Parameter> {
        let schema = ObjectBuilder::new()
            .schema_type(Type::String)
            .min_length(Some(1))
            .max_length(Some(255))
            .pattern(Some("^[\\x21-\\x7E]+$"));
        vec![ParameterBuilder::new()
            .name("Idempotency-Key")
            .parameter_in(ParameterIn::Header)
            .required(Required::False)
            .description(Some(
                "Makes the publish happen at most once per key and stream for 24 hours: a repeat \
                 writes nothing and answers the first publish's ids with `Idempotent-Replayed: \
                 true`. 1–255 visible ASCII characters.",
            ))
            .schema(Some(schema))
            .build()]
    }
}

impl PartialSchema for StreamName {
    fn schema() -> RefOr<Schema> {
        name_schema("A stream", "orders").into()
    }
}

impl ToSchema for StreamName {}

impl PartialSchema for GroupName {
    fn schema() -> RefOr<Schema> {
        name_schema("A consumer group", "billing").into()
    }
}

impl ToSchema for GroupName {}

impl PartialSchema for ConsumerName {
    fn schema() -> RefOr<Schema> {
        name_schema("A consumer", "worker-1").into()
    }
}

impl ToSchema for ConsumerName {}

impl PartialSchema for EntryId {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .schema_type(Type::String)
            .pattern(Some(ENTRY_ID_PATTERN))
            .description(Some("An entry id, `<milliseconds>-<sequence>`"))
            .examples([serde_json::json!("1700000000000-0")])
            .into()
    }
}

impl ToSchema for EntryId {}

/// Declares a named string schema with a pattern, for `value_type = …` in parameters and fields
/// (utoipa's `pattern = …` takes only a literal, so shared patterns live here).
macro_rules! pattern_schema {
    ($(#[$doc:meta])* $type:ident, $name:literal, $pattern:expr, $example:literal, $description:literal) => {
        $(#[$doc])*
        pub struct $type;

        impl PartialSchema for $type {
            fn schema() -> RefOr<Schema> {
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .pattern(Some($pattern))
                    .examples([serde_json::json!($example)])
                    .description(Some($description))
                    .into()
            }
        }

        impl ToSchema for $type {
            fn name() -> std::borrow::Cow<'static, str> {
                $name.into()
            }
        }
    };
}

pattern_schema!(
    /// Seed 004's opaque `message_id` (see `message_id.rs`).
    MessageIdSchema,
    "MessageId",
    "^m1\\.[A-Za-z0-9_-]+\\.[A-Za-z0-9_-]{8}$",
    // Entry 1700000000000-0 of `notifications` in group `workers` (a real token: acknowledging it
    // acknowledges nothing that is not pending).
    "m1.WyJub3RpZmljYXRpb25zIiwid29ya2VycyIsIjE3MDAwMDAwMDAwMDAtMCJd.QK1GvI47",
    "An opaque token from a poll or a WebSocket message, naming the stream, the group and the \
     entry; a checksum makes a garbled token a 400"
);
pattern_schema!(
    /// Where a group or a broadcast starts.
    StartSchema,
    "Start",
    START_PATTERN,
    "$",
    "`0` (the beginning), `$` (the end: only new entries), or an entry id or milliseconds to \
     start after"
);
pattern_schema!(
    /// A bound of a browsed range.
    RangeBoundSchema,
    "RangeBound",
    RANGE_BOUND_PATTERN,
    "",
    "Inclusive: an entry id, milliseconds alone, `-` (the oldest) or `+` (the newest); empty is \
     the default"
);

/// One Server-Sent Event of a streaming response (as the `text/event-stream` framing carries it;
/// keep-alive comments are not events).
#[derive(ToSchema)]
#[allow(dead_code)] // Only its schema is used.
pub struct SseEvent {
    /// The entry id, or a resume cursor when several streams are merged: reconnect with it as
    /// `Last-Event-ID`.
    id: Option<String>,
    /// `message` (the default), `gap` (resumed later than asked: entries after the resume point
    /// were removed) or `end` (the last event of a stream the server ends on purpose).
    event: Option<String>,
    /// One JSON document: `{"id","body","stream"}` plus `fields` (strings) when the entry has
    /// fields beside its body, and, for group consumers, `group`, `consumer` and `deliveries`; for `gap`, `{"stream","requested","resumed_from"}`; for
    /// `end`, `{"reason"}`: `shutdown`, `token_expired`, `group_deleted` or `stream_deleted`.
    data: String,
    /// Milliseconds a browser waits before reconnecting.
    retry: Option<u64>,
}

//! Extractors that turn request parts into model types, answering bad input with a problem+json
//! 4xx (axum's own rejections are plain text, so none of them reaches a client).

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request};
use axum::http::header;
use axum::http::request::Parts;
use serde::Deserialize;
use serde::de::DeserializeOwned;

use super::AppState;
use super::error::ApiError;
use crate::model::StreamName;

/// The request body, read up to `limits.max_body_bytes` (413 beyond).
pub struct LimitedBody(pub Bytes);

impl FromRequest<AppState> for LimitedBody {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        let limit = state.config.limits.max_body_bytes;
        let too_large =
            || ApiError::PayloadTooLarge(format!("the request body exceeds {limit} bytes"));
        let declared = request
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.parse::<u64>().ok());
        if declared.is_some_and(|length| length > limit as u64) {
            return Err(too_large());
        }
        let bytes = axum::body::to_bytes(request.into_body(), limit)
            .await
            .map_err(|error| {
                let is_limit = std::error::Error::source(&error)
                    .is_some_and(|source| source.is::<http_body_util::LengthLimitError>());
                if is_limit {
                    too_large()
                } else {
                    ApiError::BadRequest(format!("cannot read the request body: {error}"))
                }
            })?;
        Ok(LimitedBody(bytes))
    }
}

/// Parses a JSON body, naming the problem when it is malformed. Every body is an object: an array
/// is refused here, because serde would otherwise fill a struct's fields from it in order.
pub fn parse_json<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, ApiError> {
    match body.iter().find(|byte| !byte.is_ascii_whitespace()) {
        None => {
            return Err(ApiError::BadRequest(
                "the request body is empty; a JSON object is expected".into(),
            ));
        }
        Some(b'[') => {
            return Err(ApiError::BadRequest(
                "the request body is an array; a JSON object is expected".into(),
            ));
        }
        Some(_) => {}
    }
    serde_json::from_slice(body)
        .map_err(|error| ApiError::BadRequest(format!("invalid JSON body: {error}")))
}

/// Parses a stream name given by a client, answering 400 with the reason.
pub fn stream_name(text: impl Into<String>) -> Result<StreamName, ApiError> {
    StreamName::parse(text)
        .map_err(|error| ApiError::BadRequest(format!("invalid stream name: {error}")))
}

/// The `{stream}` segment of the path, validated.
pub struct StreamPath(pub StreamName);

impl<S: Send + Sync> FromRequestParts<S> for StreamPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        #[derive(Deserialize)]
        struct Segment {
            stream: String,
        }
        let Path(segment) = Path::<Segment>::from_request_parts(parts, state)
            .await
            .map_err(|rejection| ApiError::BadRequest(rejection.body_text()))?;
        stream_name(segment.stream).map(StreamPath)
    }
}

/// 400 when a query parameter's name or value is not UTF-8 once percent-decoded: decoding it
/// lossily (as `form_urlencoded` does) would turn `?stream=%FF` into a stream named U+FFFD.
fn check_utf8(query: &str) -> Result<(), ApiError> {
    for pair in query.split('&') {
        let plus_as_space: Vec<u8> = pair
            .bytes()
            .map(|byte| if byte == b'+' { b' ' } else { byte })
            .collect();
        if percent_encoding::percent_decode(&plus_as_space)
            .decode_utf8()
            .is_err()
        {
            let name = pair.split('=').next().unwrap_or_default();
            return Err(ApiError::BadRequest(format!(
                "the query parameter `{}` is not valid UTF-8 once percent-decoded",
                percent_encoding::percent_decode_str(name).decode_utf8_lossy()
            )));
        }
    }
    Ok(())
}

/// Query parameters, 400 when they do not parse.
pub struct ApiQuery<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        check_utf8(parts.uri.query().unwrap_or_default())?;
        Query::<T>::from_request_parts(parts, state)
            .await
            .map(|Query(value)| ApiQuery(value))
            .map_err(|rejection| ApiError::BadRequest(rejection.body_text()))
    }
}

/// The query string as name/value pairs, for routes whose parameters repeat (`stream=a&stream=b`)
/// or mix with a token that must not be rejected as unknown.
pub struct QueryPairs(pub Vec<(String, String)>);

impl<S: Send + Sync> FromRequestParts<S> for QueryPairs {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let query = parts.uri.query().unwrap_or_default();
        check_utf8(query)?;
        Ok(QueryPairs(
            form_urlencoded::parse(query.as_bytes())
                .into_owned()
                .collect(),
        ))
    }
}

impl QueryPairs {
    /// A 400 naming the first parameter that is neither in `accepted` (the route's, as its
    /// OpenAPI operation lists them) nor a token parameter: a typo (`grop=`) must not silently
    /// change what a request does.
    pub fn accept_only(&self, accepted: &[&str]) -> Result<(), ApiError> {
        let unknown = self.0.iter().map(|(name, _)| name.as_str()).find(|name| {
            !accepted.contains(name) && !super::auth::QUERY_TOKEN_PARAMETERS.contains(name)
        });
        match unknown {
            None => Ok(()),
            Some(name) => Err(ApiError::BadRequest(format!(
                "unknown query parameter `{name}` (this route takes {}a token)",
                accepted
                    .iter()
                    .map(|name| format!("`{name}`, "))
                    .collect::<String>()
            ))),
        }
    }

    /// The value of a parameter given at most once.
    pub fn one<'a>(&'a self, name: &'a str) -> Result<Option<&'a str>, ApiError> {
        let mut values = self.all(name);
        let first = values.next();
        if values.next().is_some() {
            return Err(ApiError::BadRequest(format!(
                "`{name}` is given more than once"
            )));
        }
        Ok(first)
    }

    /// Every value of a parameter, in order.
    pub fn all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.0
            .iter()
            .filter(move |(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    }

    /// A parameter parsed with `parse`, 400 naming it when that fails.
    pub fn parsed<T>(
        &self,
        name: &str,
        parse: impl FnOnce(&str) -> Option<T>,
    ) -> Result<Option<T>, ApiError> {
        match self.one(name)? {
            None => Ok(None),
            Some(text) => parse(text)
                .map(Some)
                .ok_or_else(|| ApiError::BadRequest(format!("invalid `{name}`: {text:?}"))),
        }
    }
}

/// Path parameters, 400 when they do not parse.
pub struct ApiPath<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for ApiPath<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        Path::<T>::from_request_parts(parts, state)
            .await
            .map(|Path(value)| ApiPath(value))
            .map_err(|rejection| ApiError::BadRequest(rejection.body_text()))
    }
}

/// Whole numbers in JSON bodies, for `#[serde(default, deserialize_with = "whole")]` on an
/// `Option` of an integer. JSON Schema counts `780.0` as the integer 780 and so do we (serde alone
/// refuses it); values beyond a signed 64-bit integer are refused, as Redis would refuse them.
pub fn whole<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: TryFrom<i64>,
{
    use serde::de::Error;
    let Some(number) = Option::<serde_json::Number>::deserialize(deserializer)? else {
        return Ok(None);
    };
    // 2^63 is exact in an f64; every integral f64 below it converts exactly.
    const LIMIT: f64 = 9_223_372_036_854_775_808.0;
    let integer = number.as_i64().or_else(|| {
        number
            .as_f64()
            .filter(|value| value.fract() == 0.0 && (-LIMIT..LIMIT).contains(value))
            .map(|value| value as i64)
    });
    integer
        .and_then(|value| T::try_from(value).ok())
        .map(Some)
        .ok_or_else(|| D::Error::custom(format!("{number} is not a whole number in range")))
}

/// [`whole`] for a required field.
pub fn whole_required<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: TryFrom<i64>,
{
    use serde::de::Error;
    whole(deserializer)?.ok_or_else(|| D::Error::custom("expected a whole number, got null"))
}

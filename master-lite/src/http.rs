//! HTTP plumbing shared by the scheduler and operator APIs: content types,
//! bounded bodies, errors as plain-text answers, and Mesos-style routing by
//! longest registered path prefix.

use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, Method, Request, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use prost::{Message, Name};

pub const STREAM_ID_HEADER: &str = "Mesos-Stream-Id";
const JSON: &str = "application/json";
const PROTOBUF: &str = "application/x-protobuf";

/// A request refused, with the message the client sees.
#[derive(Debug)]
pub struct HttpError {
    pub status: StatusCode,
    pub message: String,
}

impl HttpError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }
}

impl From<crate::master::Refusal> for HttpError {
    fn from(refusal: crate::master::Refusal) -> Self {
        let status =
            StatusCode::from_u16(refusal.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        Self::new(status, refusal.message)
    }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        let mut message = self.message;
        message.push('\n');
        (
            self.status,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            message,
        )
            .into_response()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Json,
    Protobuf,
}

impl Format {
    pub fn content_type(self) -> &'static str {
        match self {
            Format::Json => JSON,
            Format::Protobuf => PROTOBUF,
        }
    }

    pub fn encode<M: Message + Name>(self, message: &M) -> Vec<u8> {
        match self {
            Format::Protobuf => message.encode_to_vec(),
            Format::Json => butte_api::json::to_json(message)
                .map(String::into_bytes)
                .unwrap_or_else(|error| {
                    tracing::error!(%error, "cannot encode a response as JSON");
                    b"{}".to_vec()
                }),
        }
    }

    pub fn decode<M: Message + Name + Default>(self, bytes: &[u8]) -> Result<M, HttpError> {
        let decoded = match self {
            Format::Json => butte_api::json::from_json(bytes),
            Format::Protobuf => butte_api::json::from_protobuf(bytes),
        };
        decoded.map_err(|e| HttpError::bad_request(format!("Failed to parse body: {e}")))
    }
}

/// The body's format, from Content-Type.
pub fn request_format(headers: &HeaderMap) -> Result<Format, HttpError> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let media = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    match media.as_str() {
        JSON => Ok(Format::Json),
        PROTOBUF => Ok(Format::Protobuf),
        "" => Err(HttpError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "Expecting 'Content-Type' to be present; use application/json or application/x-protobuf",
        )),
        other => Err(HttpError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!(
                "Expecting 'Content-Type' of application/json or application/x-protobuf, got '{other}'"
            ),
        )),
    }
}

/// The answer's format, from Accept (JSON when absent or a wildcard).
pub fn response_format(headers: &HeaderMap) -> Result<Format, HttpError> {
    let Some(accept) = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()) else {
        return Ok(Format::Json);
    };
    for media in accept.split(',').map(|m| {
        m.split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase()
    }) {
        match media.as_str() {
            JSON | "*/*" | "application/*" => return Ok(Format::Json),
            PROTOBUF => return Ok(Format::Protobuf),
            _ => {}
        }
    }
    Err(HttpError::new(
        StatusCode::NOT_ACCEPTABLE,
        format!(
            "Expecting 'Accept' to allow application/json or application/x-protobuf, got '{accept}'"
        ),
    ))
}

/// A call POSTed to one of the APIs, as it arrived.
pub struct Posted {
    pub headers: HeaderMap,
    /// How the body is encoded (its Content-Type).
    pub format: Format,
    pub body: Vec<u8>,
}

/// What every API call goes through first: POST only, a Content-Type we
/// read, and a body of at most `limit` bytes.
pub async fn read_post(request: Request<Body>, limit: usize) -> Result<Posted, HttpError> {
    if request.method() != Method::POST {
        return Err(HttpError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("Expecting 'POST', received '{}'", request.method()),
        ));
    }
    let (parts, body) = request.into_parts();
    let format = request_format(&parts.headers)?;
    let body = read_body(&parts.headers, body, limit).await?;
    Ok(Posted {
        headers: parts.headers,
        format,
        body,
    })
}

/// Reads a body of at most `limit` bytes; more is a 413.
pub async fn read_body(
    headers: &HeaderMap,
    body: Body,
    limit: usize,
) -> Result<Vec<u8>, HttpError> {
    let too_large = || {
        HttpError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body exceeds the limit of {limit} bytes (--max-request-bytes)"),
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|len| len > limit) {
        return Err(too_large());
    }
    let mut bytes = Vec::with_capacity(declared.unwrap_or(0));
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk
            .map_err(|e| HttpError::bad_request(format!("failed to read the request body: {e}")))?;
        if bytes.len() + chunk.len() > limit {
            return Err(too_large());
        }
        bytes.extend_from_slice(&chunk);
    }
    Ok(bytes)
}

/// A protobuf/JSON answer with the right Content-Type.
pub fn encoded<M: Message + Name>(status: StatusCode, format: Format, message: &M) -> Response {
    let mut response = (status, format.encode(message)).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(format.content_type()),
    );
    response
}

pub fn json_response(value: &serde_json::Value) -> Response {
    ([(header::CONTENT_TYPE, JSON)], value.to_string()).into_response()
}

/// The endpoints we serve. A request goes to the longest of these that is a
/// prefix of its path on a `/` boundary (as libprocess routes), after an
/// optional leading `/master` (Mesos's process id).
pub const ROUTES: &[&str] = &[
    "/api/v1/scheduler",
    "/api/v1",
    "/api/v1/telemetry",
    "/telemetry",
    "/state",
    "/state.json",
    "/state-summary",
    "/slaves",
    "/frameworks",
    "/tasks",
    "/tasks.json",
    "/roles",
    "/metrics/snapshot",
    "/metrics",
    "/version",
    "/health",
    "/redirect",
];

pub fn route(path: &str) -> Option<&'static str> {
    let path = match path.strip_prefix("/master") {
        Some(rest) if rest.is_empty() || rest.starts_with('/') => rest,
        _ => path,
    };
    ROUTES
        .iter()
        .filter(|r| {
            path == **r
                || path
                    .strip_prefix(**r)
                    .is_some_and(|rest| rest.starts_with('/'))
        })
        .max_by_key(|r| r.len())
        .copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn longest_prefix_wins_on_component_boundaries() {
        assert_eq!(route("/api/v1/scheduler"), Some("/api/v1/scheduler"));
        assert_eq!(route("/master/api/v1/scheduler"), Some("/api/v1/scheduler"));
        assert_eq!(route("/api/v1"), Some("/api/v1"));
        assert_eq!(route("/api/v1/other"), Some("/api/v1"));
        assert_eq!(route("/metrics/snapshot"), Some("/metrics/snapshot"));
        assert_eq!(route("/metrics"), Some("/metrics"));
        assert_eq!(route("/state/extra"), Some("/state"));
        assert_eq!(route("/statefoo"), None);
        assert_eq!(route("/masterpiece"), None);
        assert_eq!(route("/nothing"), None);
    }

    #[test]
    fn accept_defaults_to_json_and_refuses_others() {
        let mut headers = HeaderMap::new();
        assert_eq!(response_format(&headers).unwrap(), Format::Json);
        headers.insert(
            header::ACCEPT,
            HeaderValue::from_static("application/x-protobuf"),
        );
        assert_eq!(response_format(&headers).unwrap(), Format::Protobuf);
        headers.insert(header::ACCEPT, HeaderValue::from_static("text/html"));
        assert_eq!(
            response_format(&headers).unwrap_err().status,
            StatusCode::NOT_ACCEPTABLE
        );
    }
}

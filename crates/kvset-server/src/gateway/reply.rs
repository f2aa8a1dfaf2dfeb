//! The gateway's HTTP answers as etcd's gives them: status codes from gRPC codes
//! (grpc-gateway v1's `HTTPStatusFromCode`), its error bodies, its plain-text refusals, etcd's
//! CORS headers.

use std::convert::Infallible;

use bytes::Bytes;
use futures::Stream;
use futures::StreamExt;
use http::header;
use http::HeaderValue;
use http::StatusCode;
use http_body::Frame;
use serde::Serialize;
use tonic::body::Body;
use tonic::Code;
use tonic::Status;

/// An HTTP answer of the client port.
pub type Reply = http::Response<Body>;

/// grpc-gateway v1's mapping of a gRPC code to an HTTP status.
pub fn http_status(code: Code) -> StatusCode {
    match code {
        Code::Ok => StatusCode::OK,
        Code::Cancelled => StatusCode::REQUEST_TIMEOUT,
        Code::Unknown => StatusCode::INTERNAL_SERVER_ERROR,
        Code::InvalidArgument => StatusCode::BAD_REQUEST,
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::AlreadyExists => StatusCode::CONFLICT,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Code::FailedPrecondition => StatusCode::PRECONDITION_FAILED,
        Code::Aborted => StatusCode::CONFLICT,
        Code::OutOfRange => StatusCode::BAD_REQUEST,
        Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
        Code::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Code::DataLoss => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// grpc-gateway's error body: `{"error":M,"message":M,"code":N}` (`details` omitted: kvset's
/// statuses carry none).
#[derive(Serialize)]
struct ErrorBody<'a> {
    error: &'a str,
    message: &'a str,
    code: i32,
}

/// grpc-gateway's error of a stream, `{"error":{"grpc_code":N,"http_code":H,"message":M,
/// "http_status":T}}`.
#[derive(Serialize)]
struct StreamError<'a> {
    error: StreamErrorInner<'a>,
}

#[derive(Serialize)]
struct StreamErrorInner<'a> {
    grpc_code: i32,
    http_code: u16,
    message: &'a str,
    http_status: &'a str,
}

fn json_bytes<T: Serialize>(value: &T) -> Bytes {
    // Plain structs of strings and numbers always serialize.
    serde_json::to_vec(value).unwrap_or_default().into()
}

fn response(status: StatusCode, body: Body) -> Reply {
    let mut reply = http::Response::new(body);
    *reply.status_mut() = status;
    reply
}

fn set(reply: &mut Reply, name: header::HeaderName, value: &'static str) {
    reply.headers_mut().insert(name, HeaderValue::from_static(value));
}

/// A JSON answer of one piece.
fn json(status: StatusCode, bytes: Bytes) -> Reply {
    let mut reply = response(status, Body::new(http_body_util::Full::new(bytes)));
    set(&mut reply, header::CONTENT_TYPE, "application/json");
    reply
}

/// A call's answer: the message's JSON, with the header grpc-gateway copies from the gRPC
/// response's metadata.
pub fn message<T: Serialize>(message: &T) -> Reply {
    match super::json::encode(message) {
        Ok(bytes) => {
            let mut reply = json(StatusCode::OK, bytes.into());
            set(
                &mut reply,
                header::HeaderName::from_static("grpc-metadata-content-type"),
                "application/grpc",
            );
            reply
        }
        Err(e) => status(&Status::internal(format!("kvset: the answer has no JSON form: {e}"))),
    }
}

/// A call's error: the HTTP status of its code, grpc-gateway's error body.
pub fn status(status: &Status) -> Reply {
    error(http_status(status.code()), status.code(), status.message())
}

/// An error body with `code`, under HTTP `http`.
pub fn error(http: StatusCode, code: Code, message: &str) -> Reply {
    json(http, json_bytes(&ErrorBody { error: message, message, code: code as i32 }))
}

fn stream_error_bytes(status: &Status) -> Bytes {
    let http = http_status(status.code());
    json_bytes(&StreamError {
        error: StreamErrorInner {
            grpc_code: status.code() as i32,
            http_code: http.as_u16(),
            message: status.message(),
            http_status: http.canonical_reason().unwrap_or(""),
        },
    })
}

/// A stream's answer: headers once its first message (or its end, or its error) is there;
/// then one line per message; an error after the first message is appended as grpc-gateway's
/// stream error and ends it.
pub async fn stream<T, S>(messages: S) -> Reply
where
    T: Serialize + Send + 'static,
    S: Stream<Item = Result<T, Status>> + Send + 'static,
{
    let mut messages = Box::pin(messages);
    let first = match messages.next().await {
        None => return chunked(StatusCode::OK, futures::stream::empty()),
        Some(Err(e)) => {
            let http = http_status(e.code());
            return chunked(http, futures::stream::once(async move { stream_error_bytes(&e) }));
        }
        Some(Ok(first)) => first,
    };
    let lines =
        futures::stream::once(async move { Ok(first) }).chain(messages).scan(false, |failed, item| {
            if *failed {
                return std::future::ready(None);
            }
            let bytes = match item.and_then(|m| super::json::result_line(&m).map_err(Status::internal)) {
                Ok(line) => line,
                Err(e) => {
                    *failed = true;
                    stream_error_bytes(&e)
                }
            };
            std::future::ready(Some(bytes))
        });
    let mut reply = chunked(StatusCode::OK, lines);
    set(&mut reply, header::HeaderName::from_static("grpc-metadata-content-type"), "application/grpc");
    reply
}

/// A JSON answer sent as the stream of `pieces`, each its own chunk.
fn chunked(status: StatusCode, pieces: impl Stream<Item = Bytes> + Send + 'static) -> Reply {
    let frames = pieces.map(|b| Ok::<_, Infallible>(Frame::data(b)));
    let mut reply = response(status, Body::new(http_body_util::StreamBody::new(frames)));
    set(&mut reply, header::CONTENT_TYPE, "application/json");
    reply
}

/// A plain-text answer as Go's `http.Error` writes it.
pub fn text(status: StatusCode, body: &'static str) -> Reply {
    let mut reply =
        response(status, Body::new(http_body_util::Full::new(Bytes::from_static(body.as_bytes()))));
    set(&mut reply, header::CONTENT_TYPE, "text/plain; charset=utf-8");
    set(&mut reply, header::HeaderName::from_static("x-content-type-options"), "nosniff");
    reply
}

/// An empty answer (CORS preflight).
pub fn empty(status: StatusCode) -> Reply {
    let mut reply = response(status, Body::empty());
    reply.headers_mut().insert(header::CONTENT_LENGTH, HeaderValue::from_static("0"));
    reply
}

/// A redirect to `location` (Go's `ServeMux` cleaning a path).
pub fn moved(location: &str) -> Reply {
    let mut reply = empty(StatusCode::MOVED_PERMANENTLY);
    if let Ok(value) = HeaderValue::from_str(location) {
        reply.headers_mut().insert(header::LOCATION, value);
    }
    reply
}

/// etcd's CORS headers (its default `--cors '*'`), on every answer.
pub fn cors(reply: &mut Reply) {
    set(reply, header::ACCESS_CONTROL_ALLOW_HEADERS, "accept, content-type, authorization");
    set(reply, header::ACCESS_CONTROL_ALLOW_METHODS, "POST, GET, OPTIONS, PUT, DELETE");
    set(reply, header::ACCESS_CONTROL_ALLOW_ORIGIN, "*");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_map_as_grpc_gateway_maps_them() {
        assert_eq!(http_status(Code::InvalidArgument), StatusCode::BAD_REQUEST);
        assert_eq!(http_status(Code::OutOfRange), StatusCode::BAD_REQUEST);
        assert_eq!(http_status(Code::NotFound), StatusCode::NOT_FOUND);
        assert_eq!(http_status(Code::FailedPrecondition), StatusCode::PRECONDITION_FAILED);
        assert_eq!(http_status(Code::Unauthenticated), StatusCode::UNAUTHORIZED);
        assert_eq!(http_status(Code::PermissionDenied), StatusCode::FORBIDDEN);
        assert_eq!(http_status(Code::ResourceExhausted), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(http_status(Code::Unknown), StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(http_status(Code::DeadlineExceeded), StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(http_status(Code::Unavailable), StatusCode::SERVICE_UNAVAILABLE);
    }

    #[test]
    fn error_bodies_are_grpc_gateways() {
        let s = Status::invalid_argument("etcdserver: key is not provided");
        let e = ErrorBody { error: s.message(), message: s.message(), code: s.code() as i32 };
        assert_eq!(
            &json_bytes(&e)[..],
            br#"{"error":"etcdserver: key is not provided","message":"etcdserver: key is not provided","code":3}"#
        );
        assert_eq!(
            &stream_error_bytes(&Status::unknown("auth: user name is empty"))[..],
            &br#"{"error":{"grpc_code":2,"http_code":500,"message":"auth: user name is empty","http_status":"Internal Server Error"}}"#[..]
        );
    }
}

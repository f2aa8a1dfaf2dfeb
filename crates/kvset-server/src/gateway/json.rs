//! Request bodies → messages, messages → response bodies, with etcd's gateway's reading rules.
//!
//! The messages' JSON is generated from the protos (`kvset_proto`'s pbjson impls); this file
//! only frames it as etcd's gateway (grpc-gateway v1 with golang/protobuf's jsonpb) does:
//!
//! * a body is read as JSON whatever its `Content-Type`; an empty or whitespace-only body, or
//!   `null`, is the empty message; of a unary body only the first JSON value counts;
//! * a member set to `null` is unset; of duplicate members the last counts;
//! * a stream's body is any number of JSON values, one message each, read as they arrive;
//! * a stream's answers are lines `{"result":<message>}\n`, one HTTP chunk each.

use bytes::Bytes;
use bytes::BytesMut;
use http_body_util::BodyExt;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

/// Why a body gave no message.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// Not JSON, or not the message's JSON: the text names why.
    #[error("{0}")]
    Decode(String),
    /// Larger than the gateway reads.
    #[error("grpc: received message larger than max ({got} vs. {max})")]
    TooLarge { got: usize, max: usize },
}

/// The message of a unary call's body.
pub fn decode_unary<T: DeserializeOwned + Default>(body: &[u8]) -> Result<T, ReadError> {
    match first_value(body).map_err(|e| ReadError::Decode(e.to_string()))? {
        Some((value, _)) => from_value(value),
        None => Ok(T::default()),
    }
}

/// The first JSON value of `buf` and the bytes it took, or `None` if `buf` is only whitespace.
/// An incomplete value is an error whose `is_eof()` tells.
fn first_value(buf: &[u8]) -> Result<Option<(Value, usize)>, serde_json::Error> {
    let mut values = serde_json::Deserializer::from_slice(buf).into_iter::<Value>();
    match values.next() {
        None => Ok(None),
        Some(Ok(value)) => Ok(Some((value, values.byte_offset()))),
        Some(Err(e)) => Err(e),
    }
}

/// A message from a JSON value, `null` members dropped first.
fn from_value<T: DeserializeOwned + Default>(mut value: Value) -> Result<T, ReadError> {
    if value.is_null() {
        return Ok(T::default());
    }
    drop_nulls(&mut value);
    T::deserialize(value).map_err(|e| ReadError::Decode(e.to_string()))
}

/// Removes `null` members at every depth (jsonpb reads them as unset).
fn drop_nulls(value: &mut Value) {
    match value {
        Value::Object(members) => {
            members.retain(|_, v| !v.is_null());
            members.values_mut().for_each(drop_nulls);
        }
        Value::Array(items) => items.iter_mut().for_each(drop_nulls),
        _ => {}
    }
}

/// Reads a whole body, refusing one over `max` bytes.
pub async fn read_body<B>(body: B, max: usize) -> Result<Bytes, ReadError>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    let mut body = body;
    let mut buf = BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| ReadError::Decode(e.to_string()))?;
        if let Ok(data) = frame.into_data() {
            if buf.len() + data.len() > max {
                return Err(ReadError::TooLarge { got: buf.len() + data.len(), max });
            }
            buf.extend_from_slice(&data);
        }
    }
    Ok(buf.freeze())
}

/// The messages of a stream's body, decoded as they arrive.
#[derive(Debug)]
pub struct Messages<B> {
    body: B,
    buf: BytesMut,
    /// The most one message may take in the body.
    max: usize,
    ended: bool,
}

impl<B> Messages<B>
where
    B: http_body::Body<Data = Bytes> + Unpin,
{
    /// The messages of `body`, each at most `max` bytes of JSON.
    pub fn new(body: B, max: usize) -> Self {
        Self { body, buf: BytesMut::new(), max, ended: false }
    }

    /// The next message; `None` at the end of the body (or when the client went away).
    pub async fn next<T: DeserializeOwned + Default>(&mut self) -> Result<Option<T>, ReadError> {
        loop {
            let start = self.buf.iter().position(|b| !b.is_ascii_whitespace()).unwrap_or(self.buf.len());
            let _ = self.buf.split_to(start);
            if !self.buf.is_empty() {
                match first_value(&self.buf) {
                    Ok(Some((value, used))) => {
                        let _ = self.buf.split_to(used);
                        return from_value(value).map(Some);
                    }
                    Ok(None) => {}
                    // An incomplete value: wait for more, unless the body has ended.
                    Err(e) if e.is_eof() && !self.ended => {}
                    Err(e) => return Err(ReadError::Decode(e.to_string())),
                }
            }
            if self.ended {
                return Ok(None);
            }
            match self.body.frame().await {
                None | Some(Err(_)) => self.ended = true,
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        if self.buf.len() + data.len() > self.max {
                            return Err(ReadError::TooLarge {
                                got: self.buf.len() + data.len(),
                                max: self.max,
                            });
                        }
                        self.buf.extend_from_slice(&data);
                    }
                }
            }
        }
    }
}

/// A message's JSON.
pub fn encode<T: Serialize>(message: &T) -> Result<Vec<u8>, String> {
    serde_json::to_vec(message).map_err(|e| e.to_string())
}

/// One line of a stream's answer: `{"result":<message>}\n`.
pub fn result_line<T: Serialize>(message: &T) -> Result<Bytes, String> {
    let json = encode(message)?;
    let mut line = Vec::with_capacity(json.len() + 12);
    line.extend_from_slice(b"{\"result\":");
    line.extend_from_slice(&json);
    line.extend_from_slice(b"}\n");
    Ok(line.into())
}

#[cfg(test)]
mod tests {
    use kvset_proto::etcdserverpb as epb;

    use super::*;

    #[test]
    fn unary_bodies_read_as_etcds_gateway_reads_them() {
        let range = |body: &str| decode_unary::<epb::RangeRequest>(body.as_bytes());
        assert_eq!(range("").unwrap(), epb::RangeRequest::default());
        assert_eq!(range("  \n ").unwrap(), epb::RangeRequest::default());
        assert_eq!(range("null").unwrap(), epb::RangeRequest::default());
        // Only the first value counts; trailing text is ignored.
        assert_eq!(range(r#"{"key":"Zm9v"} garbage"#).unwrap().key, b"foo");
        assert_eq!(range(r#"{"key":"Zm9v"}{"key":"YmFy"}"#).unwrap().key, b"foo");
        // Both spellings, int64 as number or string, enums by name or number, nulls unset.
        let r = range(r#"{"key":"Zm9v","rangeEnd":"Zm9w","limit":"2","sort_order":"DESCEND","sort_target":3,"count_only":null}"#)
            .unwrap();
        assert_eq!((r.range_end.as_slice(), r.limit, r.sort_order, r.sort_target), (&b"fop"[..], 2, 2, 3));
        // Unknown members are ignored, also nested ones; duplicates: the last wins.
        assert_eq!(range(r#"{"key":"Zm9v","bogus":{"x":1}}"#).unwrap().key, b"foo");
        assert_eq!(range(r#"{"key":"bm9wZQ==","key":"Zm9vMQ=="}"#).unwrap().key, b"foo1");
        let t =
            decode_unary::<epb::TxnRequest>(br#"{"success":[{"request_range":{"key":"YQ==","nope":{}}}]}"#)
                .unwrap();
        assert_eq!(t.success.len(), 1);
        // Refused: malformed JSON, wrong types, unknown enum names.
        for bad in [
            r#"{"key":"#,
            r#"{key:"Zm9v"}"#,
            "hello",
            "[]",
            r#""Zm9v""#,
            r#"{"key":"Zm9v","count_only":"true"}"#,
            r#"{"key":123}"#,
            r#"{"key":"Zm9v","limit":true}"#,
            r#"{"key":"Zm9v","limit":1.5}"#,
            r#"{"key":"Zm9v","limit":9223372036854775808}"#,
            r#"{"key":"Zm9v","sort_order":"descend"}"#,
            r#"{"key":"!!!"}"#,
            r#"{"success":{}}"#,
        ] {
            let what = if bad.starts_with(r#"{"success"#) {
                decode_unary::<epb::TxnRequest>(bad.as_bytes()).map(|_| ())
            } else {
                range(bad).map(|_| ())
            };
            assert!(matches!(what, Err(ReadError::Decode(_))), "{bad} must be refused: {what:?}");
        }
    }

    #[tokio::test]
    async fn stream_bodies_give_one_message_per_value_as_they_arrive() {
        let chunks = [r#"{"ID":1000}{"ID":"1"#, "000\"}\n  {\"ID\":1002}", r#" {"ID":"#];
        let body = http_body_util::StreamBody::new(futures::stream::iter(
            chunks.map(|c| Ok::<_, std::convert::Infallible>(http_body::Frame::data(Bytes::from(c)))),
        ));
        let mut messages = Messages::new(body, 1024);
        let ids: Vec<i64> = vec![
            messages.next::<epb::LeaseKeepAliveRequest>().await.unwrap().unwrap().id,
            messages.next::<epb::LeaseKeepAliveRequest>().await.unwrap().unwrap().id,
            messages.next::<epb::LeaseKeepAliveRequest>().await.unwrap().unwrap().id,
        ];
        assert_eq!(ids, [1000, 1000, 1002]);
        // A value cut off by the end of the body is an error.
        assert!(matches!(messages.next::<epb::LeaseKeepAliveRequest>().await, Err(ReadError::Decode(_))));
    }

    #[tokio::test]
    async fn a_message_over_the_limit_is_refused() {
        let big = format!(r#"{{"ID":1,"pad":"{}"}}"#, "x".repeat(2000));
        let body = http_body_util::Full::new(Bytes::from(big.clone()));
        let mut messages = Messages::new(body, 1024);
        assert!(matches!(
            messages.next::<epb::LeaseKeepAliveRequest>().await,
            Err(ReadError::TooLarge { max: 1024, .. })
        ));
        let body = http_body_util::Full::new(Bytes::from(big));
        assert!(matches!(read_body(body, 1024).await, Err(ReadError::TooLarge { .. })));
    }

    #[test]
    fn responses_use_proto_names_strings_for_int64_and_omit_defaults() {
        let resp = epb::RangeResponse {
            header: Some(epb::ResponseHeader { cluster_id: 1, member_id: 2, revision: 9, raft_term: 0 }),
            kvs: vec![kvset_proto::mvccpb::KeyValue {
                key: b"foo".to_vec(),
                create_revision: 2,
                mod_revision: 7,
                version: 3,
                value: b"baz".to_vec(),
                lease: 0,
            }],
            more: false,
            count: 1,
        };
        assert_eq!(
            String::from_utf8(encode(&resp).unwrap()).unwrap(),
            r#"{"header":{"cluster_id":"1","member_id":"2","revision":"9"},"kvs":[{"key":"Zm9v","create_revision":"2","mod_revision":"7","version":"3","value":"YmF6"}],"count":"1"}"#
        );
        let grant = epb::LeaseGrantResponse { header: None, id: 7777, ttl: 600, error: String::new() };
        assert_eq!(String::from_utf8(encode(&grant).unwrap()).unwrap(), r#"{"ID":"7777","TTL":"600"}"#);
        let hash = epb::HashResponse { header: None, hash: 3_690_965_554 };
        assert_eq!(String::from_utf8(encode(&hash).unwrap()).unwrap(), r#"{"hash":3690965554}"#);
        let event = kvset_proto::mvccpb::Event {
            r#type: 1,
            kv: Some(kvset_proto::mvccpb::KeyValue {
                key: b"foo".to_vec(),
                mod_revision: 19,
                ..Default::default()
            }),
            prev_kv: None,
        };
        let line = result_line(&event).unwrap();
        assert_eq!(
            &line[..],
            &br#"{"result":{"type":"DELETE","kv":{"key":"Zm9v","mod_revision":"19"}}}
"#[..]
        );
        // A set but empty message is {} (a nested txn's header).
        let nested = epb::TxnResponse { header: Some(Default::default()), ..Default::default() };
        assert_eq!(String::from_utf8(encode(&nested).unwrap()).unwrap(), r#"{"header":{}}"#);
    }
}

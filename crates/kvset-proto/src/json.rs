//! What the generated JSON impls (`build.rs`, pbjson) read bytes fields with: Go's
//! `encoding/json` rules for `[]byte`, which etcd's gateway (golang/protobuf's jsonpb) applies.
//!
//! * a string of standard base64 with its padding; `\r` and `\n` anywhere in it are skipped;
//!   anything else is "illegal base64 data at input byte N";
//! * an array of numbers 0–255, one per byte.

use std::fmt;
use std::marker::PhantomData;

use base64::Engine;
use serde::de::SeqAccess;
use serde::de::Visitor;
use serde::Deserialize;
use serde::Deserializer;

/// A bytes field read as Go reads a `[]byte`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GoBytes<T>(pub T);

struct GoBytesVisitor<T>(PhantomData<T>);

impl<'de, T: From<Vec<u8>>> Visitor<'de> for GoBytesVisitor<T> {
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("standard base64 text or an array of bytes")
    }

    fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<T, E> {
        decode_base64(s).map(Into::into).map_err(E::custom)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<T, A::Error> {
        let mut bytes = Vec::with_capacity(seq.size_hint().unwrap_or(0));
        while let Some(b) = seq.next_element::<u8>()? {
            bytes.push(b);
        }
        Ok(bytes.into())
    }
}

impl<'de, T: From<Vec<u8>>> Deserialize<'de> for GoBytes<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(GoBytesVisitor(PhantomData)).map(GoBytes)
    }
}

/// Go's `base64.StdEncoding.DecodeString`: padding required, `\r` and `\n` skipped.
pub fn decode_base64(text: &str) -> Result<Vec<u8>, String> {
    let illegal = |at: usize| format!("illegal base64 data at input byte {at}");
    let mut clean = Vec::with_capacity(text.len());
    // Positions in the input of the bytes kept, to report an error where Go does.
    let mut positions = Vec::with_capacity(text.len());
    for (i, b) in text.bytes().enumerate() {
        if b != b'\r' && b != b'\n' {
            clean.push(b);
            positions.push(i);
        }
    }
    let at = |i: usize| positions.get(i).copied().unwrap_or(text.len());
    base64::engine::general_purpose::STANDARD.decode(&clean).map_err(|e| match e {
        base64::DecodeError::InvalidByte(i, _) => illegal(at(i)),
        // Go reads whole quanta of four: a short or badly ended last one fails where it starts.
        base64::DecodeError::InvalidLastSymbol(i, _) => illegal(at(i - i % 4)),
        base64::DecodeError::InvalidLength(len) => illegal(at(len - len % 4)),
        base64::DecodeError::InvalidPadding => illegal(at(clean.len().saturating_sub(1) / 4 * 4)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(json: &str) -> Result<Vec<u8>, String> {
        serde_json::from_str::<GoBytes<Vec<u8>>>(json).map(|b| b.0).map_err(|e| e.to_string())
    }

    #[test]
    fn bytes_read_as_go_reads_them() {
        assert_eq!(read(r#""Zm9v""#).unwrap(), b"foo");
        assert_eq!(read(r#""Zm9vMQ==""#).unwrap(), b"foo1");
        assert_eq!(read(r#""Zm9v\nMQ==""#).unwrap(), b"foo1", "a newline is skipped");
        assert_eq!(read(r#""""#).unwrap(), b"");
        assert_eq!(read("[1,2,255]").unwrap(), [1, 2, 255]);
        for (bad, at) in [(r#""!!!""#, 0), (r#""-_-_""#, 0), (r#""Zm9vMQ""#, 4), (r#""Zm9v MQ==""#, 4)] {
            let e = read(bad).unwrap_err();
            assert!(e.starts_with(&format!("illegal base64 data at input byte {at}")), "{bad}: {e}");
        }
        assert!(read("123").is_err() && read("[256]").is_err() && read("true").is_err());
    }
}

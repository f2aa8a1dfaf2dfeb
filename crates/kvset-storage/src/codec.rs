//! Binary encoding of everything kvset stores or sends: postcard over serde.
//!
//! postcard is compact (varints, no field names) and deterministic, and it round-trips every
//! openraft type (none of them relies on self-describing formats). A decode failure on data
//! read back from disk means corruption and is reported as a storage error by the caller.

use serde::de::DeserializeOwned;
use serde::Serialize;

/// Error encoding or decoding a stored value.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {source}")]
pub struct CodecError {
    what: &'static str,
    source: postcard::Error,
}

/// Encodes `value`.
pub fn encode<T: Serialize + ?Sized>(what: &'static str, value: &T) -> Result<Vec<u8>, CodecError> {
    postcard::to_stdvec(value).map_err(|source| CodecError { what, source })
}

/// Decodes a `T` from `bytes`.
pub fn decode<T: DeserializeOwned>(what: &'static str, bytes: &[u8]) -> Result<T, CodecError> {
    postcard::from_bytes(bytes).map_err(|source| CodecError { what, source })
}

//! Conversions between the protobuf messages of `kvset-proto` and the domain types of
//! `kvset-storage`, one file per direction.
//!
//! * [`request`]: client requests → validated domain commands and queries. Every limit of
//!   [`crate::config::Limits`] is enforced here, before anything reaches Raft, so a rejected
//!   request changes nothing.
//! * [`response`]: command results and reads → protobuf responses.
//! * [`etcd`]: the same two directions for etcd's v3 API.

pub mod etcd;
pub mod request;
pub mod response;

//! Conversions between etcd's v3 messages (`kvset_proto::etcdserverpb`, `mvccpb`) and the
//! domain, one file per direction, and etcd's errors.
//!
//! * [`request`]: etcd requests → the same commands, queries and watch requests kvset.v1
//!   produces, after etcd's checks (with etcd's error texts) and kvset's limits;
//! * [`response`]: results → etcd responses, headers filled as etcd fills them;
//! * [`errors`]: etcd's exact status codes and messages, which Go clients match on.

pub mod errors;
pub mod request;
pub mod response;

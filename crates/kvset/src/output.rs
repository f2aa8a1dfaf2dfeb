//! Human and JSON renderings of client results.

use kvset_client::pb;
use serde_json::json;
use serde_json::Value;

/// How client commands print their results.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Human,
    Json,
}

/// Bytes as text when they are UTF-8, else as `0x…` hex.
pub fn text(bytes: &[u8]) -> String {
    match std::str::from_utf8(bytes) {
        Ok(s) => s.to_string(),
        Err(_) => format!("0x{}", bytes.iter().map(|b| format!("{b:02x}")).collect::<String>()),
    }
}

/// A key-value pair as JSON.
pub fn kv_json(kv: &pb::KeyValue) -> Value {
    json!({
        "key": text(&kv.key),
        "value": text(&kv.value),
        "create_revision": kv.create_revision,
        "mod_revision": kv.mod_revision,
        "version": kv.version,
        "lease": kv.lease,
    })
}

/// Prints one watch event: `PUT key = value (revision R)` or a JSON line.
pub fn print_event(format: Format, e: &pb::Event) {
    let kind = if e.r#type == pb::event::EventType::Delete as i32 { "DELETE" } else { "PUT" };
    let kv = e.kv.clone().unwrap_or_default();
    match format {
        Format::Json => print_json(&json!({
            "type": kind,
            "kv": kv_json(&kv),
            "prev_kv": e.prev_kv.as_ref().map(kv_json),
        })),
        Format::Human => {
            let prev = e.prev_kv.as_ref().map(|p| format!(" (was {})", text(&p.value))).unwrap_or_default();
            if kind == "PUT" {
                println!("PUT {} = {}{prev} (revision {})", text(&kv.key), text(&kv.value), kv.mod_revision);
            } else {
                println!("DELETE {}{prev} (revision {})", text(&kv.key), kv.mod_revision);
            }
        }
    }
}

/// A response header as JSON.
pub fn header_json(h: &Option<pb::ResponseHeader>) -> Value {
    match h {
        Some(h) => {
            json!({"cluster_id": h.cluster_id, "member_id": h.member_id, "revision": h.revision, "raft_term": h.raft_term})
        }
        None => Value::Null,
    }
}

/// Prints a JSON value on one line.
pub fn print_json(v: &Value) {
    println!("{v}");
}

/// A role's name.
pub fn role(r: i32) -> &'static str {
    match pb::Role::try_from(r) {
        Ok(pb::Role::Leader) => "leader",
        Ok(pb::Role::Follower) => "follower",
        Ok(pb::Role::Candidate) => "candidate",
        Ok(pb::Role::Learner) => "learner",
        Ok(pb::Role::Joining) => "joining",
        Ok(pb::Role::Shutdown) => "shutdown",
        _ => "unknown",
    }
}

/// A Status as JSON.
pub fn status_json(endpoint: &str, s: &pb::StatusResponse) -> Value {
    json!({
        "endpoint": endpoint,
        "name": s.name,
        "node_id": s.node_id,
        "ordinal": s.ordinal,
        "cluster_id": s.cluster_id,
        "role": role(s.role),
        "term": s.term,
        "leader_id": s.leader_id,
        "leader_addr": s.leader_addr,
        "last_log_index": s.last_log_index,
        "applied_index": s.applied_index,
        "commit_index": s.commit_index,
        "revision": s.revision,
        "desired_replicas": s.desired_replicas,
        "reconciler": s.reconciler,
        "version": s.version,
        "db_size_bytes": s.db_size_bytes,
    })
}

/// A member as JSON.
pub fn member_json(m: &pb::Member) -> Value {
    json!({
        "node_id": m.node_id,
        "ordinal": m.ordinal,
        "name": m.name,
        "peer_addr": m.peer_addr,
        "client_addr": m.client_addr,
        "voter": m.voter,
        "matched_index": m.matched_index,
    })
}

/// Prints a member table.
pub fn print_members(format: Format, leader: u64, members: &[pb::Member]) {
    match format {
        Format::Json => print_json(
            &json!({"leader_id": leader, "members": members.iter().map(member_json).collect::<Vec<_>>()}),
        ),
        Format::Human => {
            println!(
                "{:<10} {:<20} {:<8} {:<7} {:<24} {:<24} MATCHED",
                "NAME", "NODE ID", "ROLE", "LEADER", "PEER", "CLIENT"
            );
            for m in members {
                println!(
                    "{:<10} {:<20} {:<8} {:<7} {:<24} {:<24} {}",
                    m.name,
                    m.node_id,
                    if m.voter { "voter" } else { "learner" },
                    if m.node_id == leader { "*" } else { "" },
                    m.peer_addr,
                    m.client_addr,
                    m.matched_index
                );
            }
        }
    }
}

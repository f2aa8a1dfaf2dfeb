//! The client subcommands.

use anyhow::bail;
use kvset_client::pb;
use kvset_client::Client;
use kvset_client::ClientOptions;
use kvset_client::WatchEvent;
use kvset_client::WatchOptions;
use serde_json::json;

use crate::output::*;
use crate::Command;
use crate::LeaseCommand;
use crate::MemberCommand;
use crate::TxnCommand;

/// Runs one client command against `endpoints`.
pub async fn run(
    command: Command,
    endpoints: &[String],
    format: Format,
    options: &ClientOptions,
) -> anyhow::Result<()> {
    let client = Client::new(endpoints.iter().cloned(), options.clone())?;
    match command {
        Command::Get { key, serializable, rev } => {
            let consistency = if serializable {
                pb::ReadConsistency::Serializable
            } else {
                pb::ReadConsistency::Linearizable
            };
            let resp = client
                .get_request(pb::GetRequest {
                    key: key.clone().into_bytes(),
                    consistency: consistency as i32,
                    revision: rev,
                })
                .await?;
            match format {
                Format::Json => print_json(
                    &json!({"header": header_json(&resp.header), "kv": resp.kv.as_ref().map(kv_json)}),
                ),
                Format::Human => match resp.kv {
                    Some(kv) => println!("{}", text(&kv.value)),
                    None => bail!("key {key:?} not found"),
                },
            }
        }
        Command::Put { key, value, prev, lease } => {
            let resp = client
                .put_request(pb::PutRequest {
                    key: key.into_bytes(),
                    value: value.into_bytes(),
                    lease,
                    prev_kv: prev,
                })
                .await?;
            match format {
                Format::Json => print_json(
                    &json!({"header": header_json(&resp.header), "prev_kv": resp.prev_kv.as_ref().map(kv_json)}),
                ),
                Format::Human => {
                    println!("OK (revision {})", resp.header.map_or(0, |h| h.revision));
                    if let Some(prev) = resp.prev_kv {
                        println!("previous: {}", text(&prev.value));
                    }
                }
            }
        }
        Command::Del { key, prefix, range_end } => {
            let resp = client
                .delete(pb::DeleteRequest {
                    key: key.into_bytes(),
                    range_end: range_end.map(String::into_bytes).unwrap_or_default(),
                    prefix,
                    prev_kv: false,
                })
                .await?;
            match format {
                Format::Json => {
                    print_json(&json!({"header": header_json(&resp.header), "deleted": resp.deleted}))
                }
                Format::Human => println!("{} deleted", resp.deleted),
            }
        }
        Command::Range { key, prefix, range_end, limit, keys_only, count, serializable, rev } => {
            let consistency = if serializable {
                pb::ReadConsistency::Serializable
            } else {
                pb::ReadConsistency::Linearizable
            };
            let prefix = prefix || range_end.is_none();
            let key = key.into_bytes();
            let mut next = Vec::new();
            let mut printed = 0u64;
            let mut all = Vec::new();
            // Every page at the first page's revision: one consistent listing.
            let mut revision = rev;
            loop {
                let resp = client
                    .range(pb::RangeRequest {
                        key: key.clone(),
                        range_end: range_end.clone().map(String::into_bytes).unwrap_or_default(),
                        prefix,
                        limit: 0,
                        keys_only,
                        count_only: count,
                        consistency: consistency as i32,
                        page_key: next.clone(),
                        revision,
                    })
                    .await?;
                if revision == 0 {
                    revision = resp.header.as_ref().map_or(0, |h| h.revision);
                }
                if count {
                    match format {
                        Format::Json => print_json(&json!({"count": resp.count})),
                        Format::Human => println!("{}", resp.count),
                    }
                    return Ok(());
                }
                for kv in &resp.kvs {
                    if limit > 0 && printed >= limit {
                        break;
                    }
                    printed += 1;
                    match format {
                        Format::Json => all.push(kv_json(kv)),
                        Format::Human if keys_only => println!("{}", text(&kv.key)),
                        Format::Human => println!("{} = {}", text(&kv.key), text(&kv.value)),
                    }
                }
                if !resp.more || (limit > 0 && printed >= limit) {
                    break;
                }
                next = resp.next_key;
            }
            if format == Format::Json {
                print_json(&json!({"kvs": all}));
            }
        }
        Command::Watch { key, prefix, range_end, rev, prev_kv } => {
            let options = WatchOptions {
                prefix,
                range_end: range_end.map(String::into_bytes),
                start_revision: rev,
                prev_kv,
                ..Default::default()
            };
            let mut watch = client.watch(key.into_bytes(), options).await?;
            while let Some(delivery) = watch.next().await {
                let WatchEvent::Events { events, .. } = delivery? else { continue };
                for e in events {
                    print_event(format, &e);
                }
            }
        }
        Command::Lease(l) => lease(&client, l, format).await?,
        Command::Compact { revision } => {
            let resp = client.compact(revision).await?;
            match format {
                Format::Json => {
                    print_json(&json!({"header": header_json(&resp.header), "compact_revision": revision}))
                }
                Format::Human => println!("compacted: history before revision {revision} is gone"),
            }
        }
        Command::Txn(TxnCommand::Cas { key, expect, expect_absent, new }) => {
            let expected = if expect_absent { None } else { expect.as_deref().map(str::as_bytes) };
            let resp = client.compare_and_swap(key.clone().into_bytes(), expected, new.into_bytes()).await?;
            let current = resp.responses.first().and_then(|r| match &r.response {
                Some(pb::response_op::Response::ResponseRange(rr)) => rr.kvs.first().cloned(),
                _ => None,
            });
            match format {
                Format::Json => print_json(&json!({
                    "header": header_json(&resp.header),
                    "succeeded": resp.succeeded,
                    "current": current.as_ref().map(kv_json),
                })),
                Format::Human if resp.succeeded => {
                    println!("OK (revision {})", resp.header.map_or(0, |h| h.revision))
                }
                Format::Human => {
                    let now =
                        current.map_or_else(|| "absent".to_string(), |kv| format!("{:?}", text(&kv.value)));
                    bail!("compare failed: {key:?} is {now}");
                }
            }
        }
        Command::Status => {
            let mut failures = 0;
            let mut rows = Vec::new();
            for endpoint in endpoints {
                match client.status_of(endpoint).await {
                    Ok(s) => rows.push((endpoint.clone(), Ok(s))),
                    Err(e) => {
                        failures += 1;
                        rows.push((endpoint.clone(), Err(e)));
                    }
                }
            }
            match format {
                Format::Json => print_json(&json!(rows
                    .iter()
                    .map(|(e, r)| match r {
                        Ok(s) => status_json(e, s),
                        Err(err) => json!({"endpoint": e, "error": err.to_string()}),
                    })
                    .collect::<Vec<_>>())),
                Format::Human => {
                    println!(
                        "{:<22} {:<9} {:<20} {:<9} {:<5} {:<20} {:<8} {:<8} {:<8} CLUSTER",
                        "ENDPOINT",
                        "NAME",
                        "NODE ID",
                        "ROLE",
                        "TERM",
                        "LEADER",
                        "APPLIED",
                        "REVISION",
                        "DESIRED",
                    );
                    for (e, r) in &rows {
                        match r {
                            Ok(s) => println!(
                                "{:<22} {:<9} {:<20} {:<9} {:<5} {:<20} {:<8} {:<8} {:<8} {}",
                                e,
                                s.name,
                                s.node_id,
                                role(s.role),
                                s.term,
                                s.leader_id,
                                s.applied_index,
                                s.revision,
                                s.desired_replicas,
                                s.cluster_id
                            ),
                            Err(err) => println!("{e:<22} error: {err}"),
                        }
                    }
                    if let Some((_, Ok(s))) = rows.iter().find(|(_, r)| r.is_ok()) {
                        if !s.reconciler.is_empty() {
                            println!("\nmembership ({}): {}", s.name, s.reconciler);
                        }
                    }
                }
            }
            if failures == endpoints.len() {
                bail!("no endpoint answered");
            }
        }
        Command::Member(m) => member(&client, m, format).await?,
        Command::Serve(_)
        | Command::Cluster(_)
        | Command::Bench(_)
        | Command::BenchCompare(_)
        | Command::Snapshot(_)
        | Command::Defrag { .. } => {
            bail!("not a client command")
        }
    }
    Ok(())
}

async fn lease(client: &Client, command: LeaseCommand, format: Format) -> anyhow::Result<()> {
    match command {
        LeaseCommand::Grant { ttl, id } => {
            let resp = client.lease_grant(ttl, id).await?;
            match format {
                Format::Json => print_json(&json!({"id": resp.id, "ttl": resp.ttl_seconds})),
                Format::Human => println!("lease {} granted with TTL {}s", resp.id, resp.ttl_seconds),
            }
        }
        LeaseCommand::Revoke { id } => {
            let resp = client.lease_revoke(id).await?;
            match format {
                Format::Json => print_json(&json!({"header": header_json(&resp.header), "id": id})),
                Format::Human => println!("lease {id} revoked"),
            }
        }
        LeaseCommand::KeepAlive { id, once } => {
            let ttl = client.lease_time_to_live(id, false).await?.granted_ttl_seconds;
            if ttl <= 0 {
                bail!("lease {id} not found");
            }
            let mut keep = client.keep_alive(id, ttl);
            while let Some(answer) = keep.next().await {
                match answer {
                    Ok(0) => bail!("lease {id} expired or was revoked"),
                    Ok(ttl) => match format {
                        Format::Json => print_json(&json!({"id": id, "ttl": ttl})),
                        Format::Human => println!("lease {id} kept alive with TTL {ttl}s"),
                    },
                    Err(e) => eprintln!("renewal failed, retrying: {e}"),
                }
                if once {
                    break;
                }
            }
        }
        LeaseCommand::Ttl { id, keys } => {
            let resp = client.lease_time_to_live(id, keys).await?;
            let names: Vec<String> = resp.keys.iter().map(|k| text(k)).collect();
            match format {
                Format::Json => print_json(&json!({
                    "id": id, "ttl": resp.ttl_seconds, "granted_ttl": resp.granted_ttl_seconds, "keys": names
                })),
                Format::Human if resp.ttl_seconds < 0 => bail!("lease {id} not found"),
                Format::Human => {
                    println!("lease {id}: {}s left of {}s", resp.ttl_seconds, resp.granted_ttl_seconds);
                    if keys {
                        println!("keys: {}", names.join(", "));
                    }
                }
            }
        }
        LeaseCommand::List => {
            let resp = client.lease_leases().await?;
            match format {
                Format::Json => print_json(&json!({"leases": resp
                    .leases
                    .iter()
                    .map(|l| json!({"id": l.id, "granted_ttl": l.granted_ttl_seconds}))
                    .collect::<Vec<_>>()})),
                Format::Human => {
                    for l in &resp.leases {
                        println!("{} (TTL {}s)", l.id, l.granted_ttl_seconds);
                    }
                }
            }
        }
    }
    Ok(())
}

async fn member(client: &Client, command: MemberCommand, format: Format) -> anyhow::Result<()> {
    match command {
        MemberCommand::List => {
            let resp = client.member_list().await?;
            print_members(format, resp.leader_id, &resp.members);
        }
        MemberCommand::Scale { replicas } => {
            let resp = client.set_replicas(replicas).await?;
            match format {
                Format::Json => print_json(&json!({"replicas": resp.replicas})),
                Format::Human => println!(
                    "desired replicas set to {}; members join or leave one at a time in ordinal order (watch `kvset status`)",
                    resp.replicas
                ),
            }
        }
        MemberCommand::Add { node_id, ordinal, peer_addr, client_addr } => {
            let resp = client
                .add_learner(pb::AddLearnerRequest { node_id, ordinal, peer_addr, client_addr })
                .await?;
            print_members(format, 0, &resp.members);
        }
        MemberCommand::Promote { node_id } => {
            let resp = client.promote(node_id).await?;
            print_members(format, 0, &resp.members);
        }
        MemberCommand::Remove { node_id } => {
            let resp = client.remove(node_id).await?;
            print_members(format, 0, &resp.members);
        }
        MemberCommand::TransferLeader { to } => {
            let members = client.member_list().await?.members;
            let name_of =
                |id: u64| members.iter().find(|m| m.node_id == id).map_or(String::new(), |m| m.name.clone());
            let node_id = match to {
                None => 0,
                Some(to) => match members.iter().find(|m| m.name == to) {
                    Some(m) => m.node_id,
                    None => match to.parse::<u64>() {
                        Ok(id) if members.iter().any(|m| m.node_id == id) => id,
                        _ => anyhow::bail!(
                            "no member named {to:?}; members: {}",
                            members.iter().map(|m| m.name.as_str()).collect::<Vec<_>>().join(", ")
                        ),
                    },
                },
            };
            let resp = client.transfer_leader(node_id).await?;
            match format {
                Format::Json => {
                    print_json(&json!({"leader_id": resp.leader_id, "leader": name_of(resp.leader_id)}))
                }
                Format::Human => {
                    println!("leader is now {} (node {})", name_of(resp.leader_id), resp.leader_id)
                }
            }
        }
    }
    Ok(())
}

//! Checking a recorded history: linearizability per key (porcupine-rs) and lost writes.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use porcupine_rs::CheckResult;
use porcupine_rs::Model;
use porcupine_rs::Operation;
use serde::Serialize;

use crate::history::Kind;
use crate::history::Op;

/// A key-value store as a set of independent registers, one per key (values are strings).
#[derive(Debug, Clone)]
pub struct Registers;

impl Model for Registers {
    type State = Option<String>;
    type Op = (String, Kind);
    type Metadata = ();

    fn partition_operations(history: &[Operation<Self>]) -> Vec<Vec<Operation<Self>>> {
        let mut by_key: BTreeMap<String, Vec<Operation<Self>>> = BTreeMap::new();
        for op in history {
            by_key.entry(op.op.0.clone()).or_default().push(op.clone());
        }
        by_key.into_values().collect()
    }

    fn init() -> Self::State {
        None
    }

    fn step(state: &Self::State, op: &Self::Op) -> (bool, Self::State) {
        match &op.1 {
            Kind::Put { value } => (true, Some(value.clone())),
            Kind::Get { result } => (result == state, state.clone()),
            Kind::Cas { expected, new, succeeded: Some(true) } => (state == expected, Some(new.clone())),
            Kind::Cas { expected, succeeded: Some(false), .. } => (state != expected, state.clone()),
            // Unknown outcome: a CAS is deterministic, so if it took effect where the state
            // matched, it swapped; where it did not match, it changed nothing.
            Kind::Cas { expected, new, succeeded: None } => {
                if state == expected {
                    (true, Some(new.clone()))
                } else {
                    (true, state.clone())
                }
            }
        }
    }
}

/// What a scenario's checks found.
#[derive(Debug, Clone, Serialize)]
pub struct Figures {
    pub scenario: String,
    pub seed: u64,
    /// Operations attempted by the clients.
    pub attempted: u64,
    /// Operations in the history (answered, or indeterminate writes).
    pub recorded: usize,
    /// Operations with a known answer.
    pub acknowledged: usize,
    /// Writes whose outcome is unknown.
    pub indeterminate: usize,
    /// Acknowledged writes missing from the final state (must be 0).
    pub writes_lost: usize,
    /// "Ok", "Illegal" or "Unknown".
    pub linearizable: String,
    /// Events the watchers received (all checked against the history).
    pub watch_events_delivered: usize,
    /// Times a watcher resumed on another stream.
    pub watch_reconnects: usize,
    /// Renewals of the lease kept alive through the scenario.
    pub lease_renewals: u64,
    /// Holds of the lease-based lock by its clients (`crate::lock_check`).
    pub lock_holds: usize,
    /// Acknowledged increments of the counter the lock guards.
    pub lock_increments: usize,
    /// The longest time with no acknowledged write, in milliseconds.
    pub longest_write_gap_ms: u64,
}

/// Checks `ops` with porcupine within `timeout`.
pub fn check(ops: &[Op], timeout: Duration) -> (CheckResult, porcupine_rs::LinearizationInfo<Registers>) {
    let history: Vec<Operation<Registers>> = ops
        .iter()
        .map(|o| Operation {
            client_id: Some(o.client),
            call_time: o.call_ns,
            return_time: o.return_ns,
            op: (o.key.clone(), o.kind.clone()),
            metadata: None,
        })
        .collect();
    porcupine_rs::check_operations_info_timeout::<Registers>(&history, timeout)
}

/// Counts acknowledged writes that the final state rolled back: for each key, the final value
/// must come from a write that did not finish before an acknowledged write started.
/// `finals` are the final reads (key → value).
pub fn lost_writes(ops: &[Op], finals: &BTreeMap<String, Option<String>>) -> Vec<String> {
    let mut lost = Vec::new();
    for (key, final_value) in finals {
        let writes: Vec<&Op> =
            ops.iter().filter(|o| &o.key == key && o.kind.is_write() && o.client != u32::MAX).collect();
        let acked: Vec<&Op> = writes
            .iter()
            .copied()
            .filter(|o| !o.indeterminate() && !matches!(o.kind, Kind::Cas { succeeded: Some(false), .. }))
            .collect();
        match final_value {
            None => {
                for a in &acked {
                    lost.push(format!("{key}: acknowledged write {:?} but the key is absent", a.kind));
                }
            }
            Some(v) => {
                let Some(source) = writes.iter().find(|o| o.kind.written() == Some(v.as_str())) else {
                    lost.push(format!("{key}: final value {v:?} was never written"));
                    continue;
                };
                for a in &acked {
                    if source.return_ns != crate::history::NEVER && source.return_ns < a.call_ns {
                        lost.push(format!(
                            "{key}: final value {v:?} was written before acknowledged {:?} started; that write is lost",
                            a.kind
                        ));
                    }
                }
            }
        }
    }
    lost
}

/// The longest stretch, in milliseconds, between `start_ns` and `end_ns` without an
/// acknowledged write returning.
pub fn longest_write_gap(ops: &[Op], start_ns: i64, end_ns: i64) -> u64 {
    let mut times: Vec<i64> = ops
        .iter()
        .filter(|o| o.kind.is_write() && !o.indeterminate() && o.client != u32::MAX)
        .map(|o| o.return_ns)
        .filter(|t| *t >= start_ns && *t <= end_ns)
        .collect();
    times.push(start_ns);
    times.push(end_ns);
    times.sort_unstable();
    times.windows(2).map(|w| (w[1] - w[0]) / 1_000_000).max().unwrap_or(0) as u64
}

/// Where failing scenarios leave their history and visualisation.
pub fn artifact_dir() -> PathBuf {
    let dir = crate::manifests::repo_root().join("target/chaos");
    let _ = std::fs::create_dir_all(&dir);
    dir
}

/// Saves the history as JSON and porcupine's HTML visualisation; returns their paths.
pub fn save_artifacts(
    scenario: &str,
    seed: u64,
    ops: &[Op],
    info: &porcupine_rs::LinearizationInfo<Registers>,
) -> (PathBuf, PathBuf) {
    let dir = artifact_dir();
    let json = dir.join(format!("{scenario}-{seed}-history.json"));
    let html = dir.join(format!("{scenario}-{seed}.html"));
    let _ = std::fs::write(&json, serde_json::to_vec_pretty(ops).unwrap_or_default());
    let _ = porcupine_rs::visualize_path::<Registers>(info, &html);
    (json, html)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(client: u32, key: &str, kind: Kind, call: i64, ret: i64) -> Op {
        Op { client, key: key.into(), kind, call_ns: call, return_ns: ret, revision: 0 }
    }

    fn put(v: &str) -> Kind {
        Kind::Put { value: v.into() }
    }

    fn get(v: Option<&str>) -> Kind {
        Kind::Get { result: v.map(str::to_string) }
    }

    #[test]
    fn a_stale_read_is_not_linearizable() {
        let ops = vec![
            op(0, "k", put("a"), 0, 10),
            op(1, "k", put("b"), 20, 30),
            op(2, "k", get(Some("a")), 40, 50),
        ];
        assert_eq!(check(&ops, Duration::from_secs(5)).0, CheckResult::Illegal);
        let ok = vec![
            op(0, "k", put("a"), 0, 10),
            op(1, "k", put("b"), 20, 30),
            op(2, "k", get(Some("b")), 40, 50),
        ];
        assert_eq!(check(&ok, Duration::from_secs(5)).0, CheckResult::Ok);
    }

    #[test]
    fn an_indeterminate_write_may_or_may_not_have_happened() {
        let maybe = op(0, "k", put("x"), 0, crate::history::NEVER);
        for seen in [None, Some("x")] {
            let ops = vec![maybe.clone(), op(1, "k", get(seen), 10, 20)];
            assert_eq!(check(&ops, Duration::from_secs(5)).0, CheckResult::Ok, "{seen:?}");
        }
    }

    #[test]
    fn cas_outcomes_are_checked() {
        let cas = |exp: Option<&str>, new: &str, ok: Option<bool>| Kind::Cas {
            expected: exp.map(str::to_string),
            new: new.into(),
            succeeded: ok,
        };
        let good = vec![
            op(0, "k", put("a"), 0, 10),
            op(1, "k", cas(Some("a"), "b", Some(true)), 20, 30),
            op(2, "k", get(Some("b")), 40, 50),
        ];
        assert_eq!(check(&good, Duration::from_secs(5)).0, CheckResult::Ok);
        let bad = vec![op(0, "k", put("a"), 0, 10), op(1, "k", cas(Some("a"), "b", Some(false)), 20, 30)];
        assert_eq!(check(&bad, Duration::from_secs(5)).0, CheckResult::Illegal, "the CAS had to succeed");
    }

    #[test]
    fn a_rolled_back_write_is_lost() {
        let ops = vec![op(0, "k", put("a"), 0, 10), op(1, "k", put("b"), 20, 30)];
        let finals = BTreeMap::from([("k".to_string(), Some("a".to_string()))]);
        assert_eq!(lost_writes(&ops, &finals).len(), 1);
        let finals = BTreeMap::from([("k".to_string(), Some("b".to_string()))]);
        assert!(lost_writes(&ops, &finals).is_empty());
        let finals = BTreeMap::from([("k".to_string(), None)]);
        assert_eq!(lost_writes(&ops, &finals).len(), 2);
    }

    #[test]
    fn write_gaps() {
        let ops = vec![op(0, "k", put("a"), 0, 1_000_000_000), op(0, "k", put("b"), 0, 4_000_000_000)];
        assert_eq!(longest_write_gap(&ops, 0, 5_000_000_000), 3000);
    }
}

//! Crash test: a child process writes through a real (single-member) Raft as fast as it can,
//! printing each write once openraft acknowledged it; the test SIGKILLs the child at a random
//! moment, and the next child first proves that every acknowledged write survived: its log
//! entry is still in the log (or covered by a snapshot) and its key has its value once the
//! member restarted. Snapshots every 200 entries make kills land in builds and purges too.
//!
//! Set `KVSET_CRASH_SEED` to replay a run, `KVSET_CRASH_ROUNDS` to change the round count.

mod common;

use std::io::BufRead;
use std::io::BufReader;
use std::io::Write;
use std::path::Path;
use std::path::PathBuf;
use std::process::Child;
use std::process::Command;
use std::process::Stdio;
use std::sync::mpsc;
use std::time::Duration;
use std::time::Instant;

use openraft::storage::RaftLogStorage;
use rand::rngs::StdRng;
use rand::Rng;
use rand::SeedableRng;

const CHILD_DIR: &str = "KVSET_CRASH_CHILD_DIR";
const CHILD_ACKS: &str = "KVSET_CRASH_CHILD_ACKS";
const CHILD_ROUND: &str = "KVSET_CRASH_CHILD_ROUND";
const WRITERS: usize = 8;

fn spawn_child(data: &Path, acks: &Path, round: Option<usize>) -> Child {
    let mut cmd = Command::new(std::env::current_exe().expect("test binary path"));
    cmd.args(["crash_child", "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_DIR, data)
        .env(CHILD_ACKS, acks)
        .env("RUST_LOG", "error")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(round) = round {
        cmd.env(CHILD_ROUND, round.to_string());
    }
    cmd.spawn().expect("spawn crash child")
}

/// Forwards the child's stdout lines to a channel from a thread; ends at EOF.
fn line_reader(child: &mut Child) -> (mpsc::Receiver<String>, std::thread::JoinHandle<()>) {
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = mpsc::channel();
    let handle = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    (rx, handle)
}

fn stderr_of(child: &mut Child) -> String {
    let mut s = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut e, &mut s);
    }
    s
}

/// Waits for a line starting with `prefix` (or one starting with `FAIL`: the child failed),
/// collecting `ack` lines seen meanwhile.
fn wait_for(
    rx: &mpsc::Receiver<String>,
    prefix: &str,
    deadline: Instant,
    acks: &mut Vec<String>,
) -> Option<String> {
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match rx.recv_timeout(left) {
            Ok(line) if line.starts_with(prefix) => return Some(line),
            Ok(line) if line.starts_with("ack ") => acks.push(line),
            // "FAIL …" from the child's checks, or libtest's "FAILED" when the child panicked.
            Ok(line) if line.starts_with("FAIL") => return Some(line),
            Ok(_) => {}
            Err(_) => return None,
        }
    }
    None
}

#[test]
fn acknowledged_writes_survive_kill_9() {
    let seed: u64 =
        std::env::var("KVSET_CRASH_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random);
    let rounds: usize = std::env::var("KVSET_CRASH_ROUNDS").ok().and_then(|s| s.parse().ok()).unwrap_or(20);
    println!("crash test: seed {seed} (replay with KVSET_CRASH_SEED={seed}), {rounds} rounds");
    let mut rng = StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let acks_path = dir.path().join("acks.txt");
    std::fs::File::create(&acks_path).expect("acks file");
    let mut total = 0usize;

    for round in 0..rounds {
        let mut child = spawn_child(&data, &acks_path, Some(round));
        let (rx, reader) = line_reader(&mut child);
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut acks = Vec::new();
        let verified = wait_for(&rx, "verified ", deadline, &mut acks);
        let ready = verified.as_deref().is_some_and(|v| v.starts_with("verified "))
            && wait_for(&rx, "ready", deadline, &mut acks).is_some_and(|r| r == "ready");
        if !ready {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "round {round} (seed {seed}): child did not get ready ({verified:?}); stderr:\n{}",
                stderr_of(&mut child)
            );
        }
        assert_eq!(verified.as_deref(), Some(format!("verified {total}").as_str()), "seed {seed}");

        let kill_after = Duration::from_millis(rng.gen_range(20..400));
        let until = Instant::now() + kill_after;
        while let Some(left) = until.checked_duration_since(Instant::now()) {
            match rx.recv_timeout(left) {
                Ok(line) if line.starts_with("ack ") => acks.push(line),
                Ok(line) if line.starts_with("FAIL") => panic!("seed {seed}: {line}"),
                _ => {}
            }
        }
        child.kill().expect("SIGKILL the child");
        let status = child.wait().expect("reap the child");
        assert!(!status.success(), "the child was killed, not finished");
        // Lines the child wrote before it died are acknowledged writes too.
        reader.join().expect("reader thread");
        acks.extend(rx.try_iter().filter(|l| l.starts_with("ack ")));

        let mut f = std::fs::OpenOptions::new().append(true).open(&acks_path).expect("acks file");
        for line in &acks {
            writeln!(f, "{line}").expect("record ack");
        }
        total += acks.len();
        println!(
            "round {round}: killed after {kill_after:?}, {} acknowledged writes ({total} in all)",
            acks.len()
        );
    }
    assert!(total > rounds, "the children acknowledged almost nothing ({total}); the test proves little");

    // A last child only verifies.
    let mut child = spawn_child(&data, &acks_path, None);
    let (rx, reader) = line_reader(&mut child);
    let mut ignored = Vec::new();
    let verified = wait_for(&rx, "verified ", Instant::now() + Duration::from_secs(60), &mut ignored);
    let status = child.wait().expect("verifier exits");
    reader.join().expect("reader thread");
    let stderr = stderr_of(&mut child);
    assert_eq!(verified, Some(format!("verified {total}")), "seed {seed}; stderr:\n{stderr}");
    assert!(status.success(), "seed {seed}: verifier failed:\n{stderr}");
}

/// The child's side. A no-op unless started by the test above.
#[test]
fn crash_child() {
    let Ok(data) = std::env::var(CHILD_DIR) else { return };
    let acks = PathBuf::from(std::env::var(CHILD_ACKS).expect("acks path"));
    let round: Option<usize> = std::env::var(CHILD_ROUND).ok().and_then(|r| r.parse().ok());
    let rt =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    rt.block_on(child_main(PathBuf::from(data), acks, round));
}

fn fail(msg: String) -> ! {
    println!("FAIL {msg}");
    std::process::exit(3);
}

async fn child_main(data: PathBuf, acks_path: PathBuf, round: Option<usize>) {
    // The test harness printed "test crash_child ... " without a newline: end that line.
    println!();
    // Verify every write acknowledged by earlier rounds.
    let acks = std::fs::read_to_string(&acks_path).expect("read acks");
    let mut expected = Vec::new();
    let mut max_index = 0u64;
    for line in acks.lines() {
        let mut parts = line.split(' ');
        let (Some("ack"), Some(index), Some(key)) = (parts.next(), parts.next(), parts.next()) else {
            fail(format!("bad ack line {line:?}"));
        };
        let index: u64 = index.parse().unwrap_or_else(|_| fail(format!("bad index in {line:?}")));
        max_index = max_index.max(index);
        expected.push(key.to_string());
    }

    if data.exists() {
        // The log itself must reach every acknowledged entry (or a snapshot must cover it).
        let mut store = kvset_storage::Store::open_dir(&data, Default::default()).expect("open store");
        let state = store.log.get_log_state().await.expect("log state");
        let last = state.last_log_id.map_or(0, |l| l.index);
        if last < max_index {
            fail(format!("log ends at {last} but entry {max_index} was acknowledged"));
        }
        drop(store);
    }

    let (raft, reader) = common::start_single(&data, 200).await;
    if max_index > 0 {
        raft.wait(Some(Duration::from_secs(30)))
            .applied_index_at_least(Some(max_index), "re-apply acknowledged entries")
            .await
            .unwrap_or_else(|e| fail(format!("not applied up to {max_index}: {e}")));
    }
    for key in &expected {
        match reader.get(key.as_bytes(), 0) {
            Ok((Some(kv), _)) if kv.value == value_of(key) => {}
            other => fail(format!("acknowledged key {key} lost or wrong after crash: {other:?}")),
        }
    }
    println!("verified {}", expected.len());
    let Some(round) = round else { return };

    println!("ready");
    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let raft = raft.clone();
        tasks.push(tokio::spawn(async move {
            for seq in 0u64.. {
                let key = format!("r{round}-w{w}-{seq}");
                match raft.client_write(common::put(&key, &value_of(&key))).await {
                    Ok(resp) => {
                        let mut out = std::io::stdout().lock();
                        let _ = writeln!(out, "ack {} {key}", resp.log_id.index);
                        let _ = out.flush();
                    }
                    Err(e) => fail(format!("write failed: {e}")),
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
}

fn value_of(key: &str) -> Vec<u8> {
    format!("v-{key}").into_bytes()
}

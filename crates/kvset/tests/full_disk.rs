//! A full disk, tried as a new user would: one follower's volume is a 24 MiB filesystem (a
//! tmpfs mounted by the test; needs root, as the CI machine has) and clients write 100 KB
//! values. The cluster keeps serving with nothing acknowledged lost; the full member exits
//! non-zero, saying why, instead of hanging; started again on the still-full volume it exits
//! again at once; once the filesystem has room it starts, catches up and serves.

mod common;

use std::path::Path;
use std::process::Child;
use std::process::Command;
use std::time::Duration;
use std::time::Instant;

use common::released_config;
use common::serve;
use kvset_tests::cluster::Cluster;
use kvset_tests::eventually;
use kvset_tests::member_get;
use kvset_tests::poll_until;

/// A tmpfs of `size` mounted at `dir` for the test's lifetime.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Result<Self, String> {
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output()
            .map_err(|e| format!("mount: {e}"))?;
        if !out.status.success() {
            return Err(format!("mount: {}", String::from_utf8_lossy(&out.stderr).trim()));
        }
        Ok(Self(dir.to_path_buf()))
    }

    fn grow(&self, size: &str) {
        let out = Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.0)
            .output()
            .expect("remount");
        assert!(out.status.success(), "remount: {}", String::from_utf8_lossy(&out.stderr));
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Waits up to `limit` for `child` to exit; returns its exit code (None if it runs on).
async fn exits_within(child: &mut Child, limit: Duration) -> Option<i32> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status.code().unwrap_or(-1));
        }
        if Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_member_whose_disk_fills_exits_and_recovers_once_the_disk_has_room() {
    let mut c = Cluster::new(3, |c| c.shutdown_timeout_ms = 3000).await;
    let tmp = tempfile::tempdir().unwrap();
    let volume = c.data_dir(2);
    let fs = match Tmpfs::mount(&volume, "24m") {
        Ok(fs) => fs,
        Err(e) => {
            println!("SKIPPED: cannot mount a small filesystem here ({e}); the CI machine runs as root");
            return;
        }
    };
    let config_file = released_config(&mut c, 2, tmp.path());
    let log = tmp.path().join("kvset-2.log");
    let mut member = serve(&config_file, &log);
    c.start_node(0).await;
    c.start_node(1).await;
    let client = c.client();
    eventually("three voters", Duration::from_secs(60), || {
        let client = client.clone();
        async move {
            client.member_list().await.ok().filter(|m| m.members.iter().filter(|m| m.voter).count() == 3)
        }
    })
    .await;

    // Write 100 KB values until the member on the small disk has stopped (at most 300).
    let value = vec![b'x'; 100 * 1024];
    let mut acked = Vec::new();
    let mut exit = None;
    for i in 0..300 {
        let key = format!("big-{i:03}");
        if client.put(key.clone(), value.clone()).await.is_ok() {
            acked.push(key);
        }
        if let Some(status) = member.try_wait().unwrap() {
            exit = status.code();
            break;
        }
    }
    // The member has a fatal storage error by now; it must stop within its shutdown timeout.
    let code = match exit {
        Some(code) => code,
        None => exits_within(&mut member, Duration::from_secs(20)).await.unwrap_or_else(|| {
            let _ = member.kill();
            panic!(
                "the member on a full disk is still running:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            )
        }),
    };
    let output = std::fs::read_to_string(&log).unwrap();
    assert_ne!(code, 0, "a member stopped by a full disk must exit non-zero");
    assert!(output.contains("No space left on device"), "the member did not say why:\n{output}");
    assert!(acked.len() >= 20, "only {} writes were acknowledged", acked.len());

    // The other two kept serving, with every acknowledged write.
    for key in &acked {
        let kv = client.get(key.clone()).await.unwrap();
        assert_eq!(kv.map(|kv| kv.value.len()), Some(value.len()), "{key} lost");
    }
    client.put("after-full", "ok").await.unwrap();

    // Started again on the still-full volume, it exits at once, saying why in its last line.
    let log2 = tmp.path().join("kvset-2-again.log");
    let mut again = serve(&config_file, &log2);
    let code = exits_within(&mut again, Duration::from_secs(30)).await;
    let output = std::fs::read_to_string(&log2).unwrap();
    if code.is_none() {
        let _ = again.kill();
    }
    assert!(
        code.is_some_and(|c| c != 0),
        "on a full volume the member must exit non-zero ({code:?}):\n{output}"
    );
    let last = output.lines().last().unwrap_or_default();
    assert!(last.contains("No space left on device"), "last line does not say why: {last}\n{output}");

    // The PVC is expanded: the member starts, catches up and serves every key.
    fs.grow("1g");
    let log3 = tmp.path().join("kvset-2-grown.log");
    let mut grown = serve(&config_file, &log3);
    let member_client =
        kvset_client::Client::new([c.endpoint(2)], kvset_client::ClientOptions::default()).unwrap();
    let caught_up =
        poll_until("kvset-2 serves the write made while it was down", Duration::from_secs(60), || {
            let member_client = member_client.clone();
            async move { member_get(&member_client, "after-full").await.ok()?.filter(|kv| kv.value == b"ok") }
        })
        .await;
    if let Err(e) = caught_up {
        let _ = grown.kill();
        panic!("{e}\n{}", std::fs::read_to_string(&log3).unwrap_or_default());
    }
    for key in &acked {
        let kv = member_get(&member_client, key.clone()).await.unwrap();
        assert_eq!(kv.map(|kv| kv.value.len()), Some(value.len()), "kvset-2 lacks {key}");
    }
    let _ = grown.kill();
    let _ = grown.wait();
    c.shutdown().await;
    drop(fs);
}

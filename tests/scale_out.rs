//! Several nodes and graceful stops: two nodes sharing PostgreSQL and S3 (moto) with one killed by
//! SIGKILL while it holds leases; two nodes started together, resuming each other's uploads and
//! handing work over at SIGTERM; a dead node's abandoned S3 upload aborted by the survivor; and a
//! SIGTERM that lets an upload under way finish.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use common::*;
use ingestion::state::JobState;

fn keys(test: &str) -> Option<(tempfile::TempDir, Key)> {
    for program in ["sftp", "ssh-keygen", "python3"] {
        if !require(program, test) {
            return None;
        }
    }
    let files = tempfile::tempdir().unwrap();
    let key = keygen(files.path(), "acme_key", &["-t", "ed25519"]);
    Some((files, key))
}

#[test]
fn sigterm_lets_an_upload_under_way_finish_then_exits_cleanly() {
    let test = "sigterm_lets_an_upload_under_way_finish_then_exits_cleanly";
    let Some((files, key)) = keys(test) else {
        return;
    };
    let mut server = Server::start(
        &[UserSpec::new("acme", &key)],
        "drain_time = \"60s\"",
        Landing::Local,
    );
    let file = files.path().join("slow.bin");
    random_file(&file, 3 << 20, 31);
    // 3 MiB at 4 Mbit/s: about six seconds in flight.
    let upload = server.sftp_spawn(
        "acme",
        &key,
        &format!("put {} slow.bin\n", file.display()),
        &["-l", "4000"],
    );
    wait_until(30, "the upload under way", || {
        server.events("open").first().cloned()
    });
    server.terminate();
    wait_until(10, "the stop announced", || {
        server.events("service_stopping").first().cloned()
    });
    // No new logins while draining: the listener is closed.
    wait_until(10, "the listener closed", || {
        std::net::TcpStream::connect(("127.0.0.1", server.port))
            .is_err()
            .then_some(())
    });
    // Balancers are told: the admin plane stays up through the drain and says not ready.
    if require("curl", test) {
        let ready = http_get(&format!("{}/readyz", server.admin_url()), None);
        assert_eq!(ready.status, 503, "{}", ready.body);
        assert_eq!(ready.json()["reason"], "the service is stopping");
    }
    let finished = upload.wait_with_output().unwrap();
    assert_success(&finished, "the upload under way when SIGTERM came");
    let status = server.child.wait().unwrap();
    assert!(status.success(), "exit status {status}\n{}", server.log());
    let close = server.events("close");
    assert_eq!(close.len(), 1, "{close:?}");
    assert_eq!(close[0]["sha256"], sha256_file(&file));
    let stopped = server.events("service_stopped");
    assert_eq!(stopped.len(), 1, "{stopped:?}");
    assert_eq!(stopped[0]["connections_cut"], 0);
    assert_eq!(server.jobs().len(), 1);
    assert_eq!(
        server.landed("acme", "slow.bin"),
        Some(std::fs::read(&file).unwrap())
    );
}

/// What several nodes share: a fresh PostgreSQL database and a moto S3 server (with local files and
/// acme's key).
struct Shared {
    files: tempfile::TempDir,
    key: Key,
    moto: Moto,
    database: ingestion::config::Database,
}

/// acme, delivering to the S3 destination bucket.
fn acme_on_s3<'k>(key: &'k Key, buckets: &Buckets) -> UserSpec<'k> {
    let mut user = UserSpec::new("acme", key);
    user.destination = buckets.destination("acme");
    user
}

fn shared(test: &str) -> Option<Shared> {
    let (files, key) = keys(test)?;
    let postgres = require_postgres(test)?;
    let moto = require_moto(test)?;
    let database = ingestion::config::Database::Postgres {
        url: fresh_postgres_database(&postgres),
    };
    Some(Shared {
        files,
        key,
        moto,
        database,
    })
}

/// Webhook alerts received, by event id, for files (paths) announced as delivered.
fn delivered_alerts(receiver: &Receiver) -> BTreeMap<String, BTreeSet<String>> {
    let mut by_path: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for call in receiver.requests("/hook") {
        let facts: serde_json::Value =
            serde_json::from_str(call["body"].as_str().unwrap()).unwrap();
        if facts["event"] == "delivered" {
            by_path
                .entry(facts["path"].as_str().unwrap().to_string())
                .or_default()
                .insert(facts["event_id"].as_str().unwrap().to_string());
        }
    }
    by_path
}

#[test]
fn two_nodes_share_postgres_and_s3_and_a_killed_node_loses_nothing() {
    let test = "two_nodes_share_postgres_and_s3_and_a_killed_node_loses_nothing";
    let Some(Shared {
        files,
        key,
        moto,
        database,
    }) = shared(test)
    else {
        return;
    };
    let buckets = Buckets::S3(&moto);
    let receiver = Receiver::start(&[]);
    let mut user = acme_on_s3(&key, &buckets);
    user.extra = format!(
        "notify_webhook = {{ url = \"{}\" }}\n",
        receiver.url("/hook")
    );
    let sections = "[scanner]\nengine = \"builtin\"\n[pipeline]\nlease = \"2s\"\nretry_base = \"200ms\"\nretry_cap = \"1s\"\n";
    // Node A stops after copying each file, before removing it from landing, holding its lease.
    let mut node_a = Server::launch_with(
        &[user],
        "",
        sections,
        buckets.landing(),
        &[("INGESTION_FAILPOINT", "pause-after-copy")],
        Some(database),
    );
    let node_b = node_a.second_node(&[]);
    let fingerprints: Vec<_> = [&node_a, &node_b]
        .iter()
        .map(|node| node.events("service_started")[0]["host_key_fingerprint"].clone())
        .collect();
    assert_eq!(
        fingerprints[0], fingerprints[1],
        "both nodes show one host key"
    );

    let mut scripts = [String::new(), String::new()];
    for index in 0..100 {
        let local = files.path().join(format!("file-{index:03}.csv"));
        random_file(&local, 64 << 10, 100 + index);
        scripts[index as usize % 2]
            .push_str(&format!("put {} file-{index:03}.csv\n", local.display()));
    }
    let uploads: Vec<_> = [&node_a, &node_b]
        .iter()
        .zip(&scripts)
        .map(|(node, script)| node.sftp_spawn("acme", &key, script, &[]))
        .collect();
    for upload in uploads {
        assert_success(
            &upload.wait_with_output().unwrap(),
            "50 uploads to one node",
        );
    }
    // Node A holds leases on jobs it copied and will never finish.
    node_b.wait_for_jobs(60, "node A holding copied jobs", |jobs| {
        jobs.iter()
            .any(|job| job.copied_at.is_some() && job.state != JobState::Delivered)
    });
    node_a.kill9();

    let jobs = node_b.wait_for_jobs(120, "every file delivered by node B", |jobs| {
        jobs.len() == 100 && jobs.iter().all(|job| job.state == JobState::Delivered)
    });
    let paths: BTreeSet<_> = jobs.iter().map(|job| job.path.clone()).collect();
    assert_eq!(paths.len(), 100, "one job per file");
    let expected: Vec<String> = (0..100)
        .map(|index| format!("file-{index:03}.csv"))
        .collect();
    assert_eq!(
        buckets.delivered(&node_b),
        expected,
        "each file exactly once"
    );
    for index in [0, 1, 42, 99] {
        let name = format!("file-{index:03}.csv");
        let local = std::fs::read(files.path().join(&name)).unwrap();
        assert!(
            buckets.delivered_bytes(&node_b, &name).unwrap() == local,
            "{name} differs"
        );
    }
    wait_until(30, "landing emptied", || {
        node_b.landing_listing().is_empty().then_some(())
    });
    // A file delivered twice would show two delivery events across the two audit logs. Each is
    // appended just after its job is marked delivered: wait for the last of them.
    let from_a = node_a.events("delivered").len();
    node_b.wait_events("delivered", 100usize.saturating_sub(from_a));
    let mut deliveries: BTreeMap<i64, usize> = BTreeMap::new();
    for event in node_a
        .events("delivered")
        .iter()
        .chain(&node_b.events("delivered"))
    {
        *deliveries
            .entry(event["job"].as_i64().unwrap())
            .or_default() += 1;
    }
    assert_eq!(deliveries.len(), 100);
    assert!(
        deliveries.values().all(|count| *count == 1),
        "{deliveries:?}"
    );
    // Alerts: at least once, and a repeat carries the same event id. Alerts node A had claimed when
    // it was killed come back to node B when their 30 s lease passes.
    let alerts = wait_until(120, "100 delivery alerts", || {
        let alerts = delivered_alerts(&receiver);
        (alerts.len() == 100).then_some(alerts)
    });
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(delivered_alerts(&receiver), alerts);
    assert!(
        alerts.values().all(|ids| ids.len() == 1),
        "one event id per delivered file: {alerts:?}"
    );
}

#[test]
fn an_upload_cut_at_the_end_of_the_drain_is_kept_and_resumed_after_the_restart() {
    let test = "an_upload_cut_at_the_end_of_the_drain_is_kept_and_resumed_after_the_restart";
    let Some((files, key)) = keys(test) else {
        return;
    };
    let mut server = Server::start(
        &[UserSpec::new("acme", &key)],
        "drain_time = \"2s\"",
        Landing::Local,
    );
    let file = files.path().join("long.bin");
    random_file(&file, 60 << 20, 32);
    // 60 MiB at 40 Mbit/s: about twelve seconds, far longer than the drain.
    let upload = server.sftp_spawn(
        "acme",
        &key,
        &format!("put {} long.bin\n", file.display()),
        &["-l", "40000"],
    );
    wait_until(30, "the upload under way", || {
        server
            .partials()
            .into_iter()
            .find(|partial| partial.size >= 4 << 20)
    });
    server.terminate();
    let status = server.child.wait().unwrap();
    assert!(status.success(), "exit status {status}\n{}", server.log());
    assert_failure(
        &upload.wait_with_output().unwrap(),
        "the upload cut by the stop",
    );
    let stopped = server.events("service_stopped");
    assert_eq!(
        stopped[0]["connections_cut"].as_u64().map(|n| n >= 1),
        Some(true),
        "{stopped:?}"
    );
    let interrupted = server.events("upload_interrupted");
    assert_eq!(interrupted.len(), 1, "{:?}", server.audit());
    let kept = interrupted[0]["bytes_stored"].as_u64().unwrap();
    assert!((4 << 20..60 << 20).contains(&kept), "{kept}");
    assert_eq!(server.partials()[0].size, kept);

    server.restart(&[]);
    let output = server.sftp(
        "acme",
        &key,
        &format!("reput {} long.bin\n", file.display()),
    );
    assert_success(&output, "reput after the restart");
    assert_eq!(
        server.events("upload_resumed")[0]["from"].as_u64(),
        Some(kept)
    );
    assert_eq!(
        server.landed("acme", "long.bin"),
        Some(std::fs::read(&file).unwrap())
    );
    assert_eq!(server.jobs()[0].sha256, sha256_file(&file));
}

/// The host key a client sees on `port`, as `ssh-keyscan` prints it (without the host name).
fn host_key_on_the_wire(port: u16) -> String {
    let output = std::process::Command::new("ssh-keyscan")
        // One key type: each type is a connection of its own, and failed key exchanges count
        // towards the address's ban.
        .args(["-t", "ed25519", "-p", &port.to_string(), "127.0.0.1"])
        .output()
        .unwrap();
    assert_success(&output, "ssh-keyscan");
    let keys: Vec<String> = text(&output)
        .lines()
        .filter(|line| !line.starts_with('#'))
        .map(|line| line.split_once(' ').unwrap().1.to_string())
        .collect();
    assert_eq!(keys.len(), 1, "one host key: {keys:?}");
    keys[0].clone()
}

/// Two nodes on PostgreSQL and S3 through a node's life: started at the same moment on an empty
/// database, one host key on the wire, an upload cut off on one node resumed through the other, a
/// SIGTERM drain that lets an upload under way finish, and a SIGTERM that hands a job this node
/// was in the middle of to the other node at once instead of after its lease.
#[test]
fn two_nodes_start_together_resume_each_others_uploads_and_hand_over_at_sigterm() {
    let test = "two_nodes_start_together_resume_each_others_uploads_and_hand_over_at_sigterm";
    if !require("ssh-keyscan", test) {
        return;
    }
    let Some(Shared {
        files,
        key,
        moto,
        database,
    }) = shared(test)
    else {
        return;
    };
    let buckets = Buckets::S3(&moto);
    let user = acme_on_s3(&key, &buckets);
    // A lease far longer than the waits below: a job comes back early only if it is handed back.
    let sections = "[scanner]\nengine = \"builtin\"\n[pipeline]\nlease = \"60s\"\nretry_base = \"200ms\"\nretry_cap = \"1s\"\n";

    // Both started at once on an empty database: the migrations run once, under a lock.
    let mut node_a = Server::spawn_with(
        &[user],
        "drain_time = \"60s\"",
        sections,
        buckets.landing(),
        &[],
        Some(database),
    );
    let mut node_b = node_a.spawn_second_node(&[]);
    node_a.wait_ready();
    node_b.wait_ready();
    assert_eq!(
        host_key_on_the_wire(node_a.port),
        host_key_on_the_wire(node_b.port),
        "both nodes show one host key"
    );

    // Cut off on node B, resumed through node A: the stored parts are in S3, the record in
    // PostgreSQL.
    let big = files.path().join("big.bin");
    random_file(&big, 64 << 20, 41);
    let mut client = node_b.sftp_spawn(
        "acme",
        &key,
        &format!("put {} big.bin\n", big.display()),
        // 64 MiB at 40 Mbit/s: about 13 s, time enough to see 32 MiB stored (two S3 parts).
        &["-l", "40000"],
    );
    let stored = wait_until(120, "32 MiB of big.bin stored", || {
        if let Some(status) = client.try_wait().unwrap() {
            let mut said = String::new();
            if let Some(mut stderr) = client.stderr.take() {
                std::io::Read::read_to_string(&mut stderr, &mut said).unwrap();
            }
            panic!(
                "the upload ended early ({status}): {said}\n{:?}",
                node_b.audit()
            );
        }
        node_b
            .partials()
            .into_iter()
            .find(|partial| partial.size >= 32 << 20)
            .map(|partial| partial.size)
    });
    client.kill().unwrap();
    client.wait().unwrap();
    let interrupted = node_b.wait_events("upload_interrupted", 1);
    let kept = interrupted[0]["bytes_stored"].as_u64().unwrap();
    assert!(kept >= stored, "{interrupted:?}");
    let output = node_a.sftp("acme", &key, &format!("reput {} big.bin\n", big.display()));
    assert_success(&output, "reput through the other node");
    let resumed = node_a.events("upload_resumed");
    assert_eq!(resumed.len(), 1, "{resumed:?}");
    assert_eq!(resumed[0]["from"].as_u64(), Some(kept));
    node_a.wait_for_jobs(120, "big.bin delivered", |jobs| {
        jobs.iter().any(|job| job.state == JobState::Delivered)
    });
    assert!(buckets.delivered_bytes(&node_a, "big.bin").unwrap() == std::fs::read(&big).unwrap());

    // SIGTERM to node A with an upload under way: it finishes, node A exits 0, node B delivers.
    let slow = files.path().join("slow.bin");
    random_file(&slow, 3 << 20, 42);
    let upload = node_a.sftp_spawn(
        "acme",
        &key,
        &format!("put {} slow.bin\n", slow.display()),
        &["-l", "4000"],
    );
    wait_until(30, "the upload under way", || {
        node_a
            .events("open")
            .into_iter()
            .find(|event| event["path"] == "/slow.bin")
    });
    node_a.terminate();
    assert_success(
        &upload.wait_with_output().unwrap(),
        "the upload under way when SIGTERM came",
    );
    let status = node_a.child.wait().unwrap();
    assert!(status.success(), "exit status {status}\n{}", node_a.log());
    assert_eq!(node_a.events("service_stopped")[0]["connections_cut"], 0);
    node_b.wait_for_jobs(60, "slow.bin delivered by node B", |jobs| {
        jobs.iter()
            .any(|job| job.path == "slow.bin" && job.state == JobState::Delivered)
    });
    assert!(buckets.delivered_bytes(&node_b, "slow.bin").unwrap() == std::fs::read(&slow).unwrap());

    // Node A alone, stopped after copying a file: a SIGTERM gives its lease back, and node B takes
    // the job over at once rather than after the 60 s lease.
    node_b.terminate();
    assert!(node_b.child.wait().unwrap().success(), "{}", node_b.log());
    node_a.restart(&[("INGESTION_FAILPOINT", "pause-after-copy")]);
    let held = files.path().join("held.csv");
    random_file(&held, 64 << 10, 43);
    let output = node_a.sftp("acme", &key, &format!("put {} held.csv\n", held.display()));
    assert_success(&output, "an upload to node A");
    node_a.wait_for_jobs(60, "held.csv copied by node A", |jobs| {
        jobs.iter()
            .any(|job| job.path == "held.csv" && job.copied_at.is_some())
    });
    node_a.terminate();
    assert!(node_a.child.wait().unwrap().success(), "{}", node_a.log());
    let stopped = node_a.events("service_stopped");
    assert_eq!(
        stopped.last().unwrap()["leases_released"]
            .as_u64()
            .map(|n| n >= 1),
        Some(true),
        "{stopped:?}"
    );
    node_b.restart(&[]);
    let jobs = node_b.wait_for_jobs(30, "held.csv delivered by node B", |jobs| {
        jobs.iter()
            .any(|job| job.path == "held.csv" && job.state == JobState::Delivered)
    });
    assert_eq!(jobs.len(), 3, "{jobs:#?}");
    assert_eq!(
        buckets.delivered(&node_b),
        ["big.bin", "held.csv", "slow.bin"]
    );
    assert!(buckets.delivered_bytes(&node_b, "held.csv").unwrap() == std::fs::read(&held).unwrap());
}

/// A node killed with SIGKILL in the middle of an upload leaves a multipart upload in S3 that no
/// client comes back for: the surviving node's janitor aborts it once `partial_retention` passes.
#[test]
fn a_dead_nodes_abandoned_upload_is_aborted_by_the_survivor() {
    let test = "a_dead_nodes_abandoned_upload_is_aborted_by_the_survivor";
    let Some(Shared {
        files,
        key,
        moto,
        database,
    }) = shared(test)
    else {
        return;
    };
    let buckets = Buckets::S3(&moto);
    let user = acme_on_s3(&key, &buckets);
    let mut node_a = Server::launch_with(
        &[user],
        // Longer than the gaps between an upload's stored parts, which keep its record fresh.
        "partial_retention = \"5s\"",
        "[scanner]\nengine = \"builtin\"\n",
        buckets.landing(),
        &[],
        Some(database),
    );
    let node_b = node_a.second_node(&[]);
    let big = files.path().join("big.bin");
    random_file(&big, 300 << 20, 44);
    // 300 MiB at 200 Mbit/s: a 16 MiB part stored about every 0.7 s, for 12 s; node A dies after
    // the first.
    let mut client = node_a.sftp_spawn(
        "acme",
        &key,
        &format!("put {} big.bin\n", big.display()),
        &["-l", "200000"],
    );
    let stored = node_b.wait_for_stored("big.bin", 16 << 20).size;
    node_a.kill9();
    let _ = client.wait();
    let landing = node_b.landing_listing();
    assert_eq!(
        landing,
        ["MULTIPART landing-prefix/acme/big.bin"],
        "the dead node's upload is open in S3"
    );
    // Node B removes the record and aborts the multipart upload, and says so.
    let expired = node_b.wait_events("partial_expired", 1);
    assert_eq!(expired[0]["path"], "/big.bin", "{expired:?}");
    assert!(
        expired[0]["bytes_stored"].as_u64() >= Some(stored),
        "{expired:?}"
    );
    wait_until(30, "the multipart upload aborted", || {
        node_b.landing_listing().is_empty().then_some(())
    });
    assert!(node_b.partials().is_empty());
    assert!(node_b.jobs().is_empty(), "nothing is delivered");
}

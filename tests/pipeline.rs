//! Scan and deliver, end to end: uploads with OpenSSH sftp, a real clamd with a custom signature
//! database, deliveries to local folders and to S3 (moto) with SSE-KMS, and crashes.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use ingestion::state::{Job, JobState, Verdict};

struct Setup {
    files: tempfile::TempDir,
    key: Key,
}

fn setup(test: &str, needs_clamd: bool) -> Option<Setup> {
    if !require("sftp", test) || !require("ssh-keygen", test) || !require("python3", test) {
        return None;
    }
    if needs_clamd && !require_clamd(test) {
        return None;
    }
    let files = tempfile::tempdir().unwrap();
    let key = keygen(files.path(), "acme_key", &["-t", "ed25519"]);
    Some(Setup { files, key })
}

fn clamd_sections(address: &str, pipeline: &str) -> String {
    format!(
        "[scanner]\nengine = \"clamd\"\nclamd = \"{address}\"\ntimeout = \"60s\"\n[pipeline]\nretry_base = \"200ms\"\nretry_cap = \"1s\"\n{pipeline}"
    )
}

/// Clean, EICAR, EICAR inside a zip and a file over clamd's limit.
struct Samples {
    clean: std::path::PathBuf,
    eicar: std::path::PathBuf,
    zipped: std::path::PathBuf,
    too_big: std::path::PathBuf,
}

fn samples(setup: &Setup) -> Samples {
    let dir = setup.files.path();
    let clean = dir.join("data.csv");
    random_file(&clean, 300_000, 11);
    let eicar = dir.join("eicar.txt");
    std::fs::write(&eicar, EICAR).unwrap();
    let zipped = dir.join("bundle.zip");
    zip_file(&zipped, "inner/eicar.com", EICAR);
    let too_big = dir.join("big.bin");
    random_file(&too_big, 11 << 20, 12);
    Samples {
        clean,
        eicar,
        zipped,
        too_big,
    }
}

fn upload_samples(server: &Server, setup: &Setup, samples: &Samples) {
    let script = format!(
        "mkdir in\nmkdir in/deep\nput {} \"in/deep/data file.csv\"\nput {} eicar.txt\nput {} bundle.zip\nput {} big.bin\n",
        samples.clean.display(),
        samples.eicar.display(),
        samples.zipped.display(),
        samples.too_big.display()
    );
    assert_success(&server.sftp("acme", &setup.key, &script), "uploads");
}

fn check_verdicts(jobs: &[Job]) {
    let clean = job(jobs, "in/deep/data file.csv");
    assert_eq!(
        (clean.state, clean.verdict.clone()),
        (JobState::Delivered, Some(Verdict::Clean))
    );
    assert_eq!(clean.engine.as_deref(), Some("clamd"));
    for path in ["eicar.txt", "bundle.zip"] {
        let infected = job(jobs, path);
        assert_eq!(infected.state, JobState::Quarantined, "{path}");
        match &infected.verdict {
            Some(Verdict::Infected { signature }) => {
                assert!(signature.contains("EICAR"), "{path}: {signature}")
            }
            other => panic!("{path}: {other:?}"),
        }
    }
    let big = job(jobs, "big.bin");
    assert_eq!(big.state, JobState::Quarantined);
    assert!(
        matches!(big.verdict, Some(Verdict::Unscannable { .. })),
        "{big:#?}"
    );
}

#[test]
fn clean_files_are_delivered_and_infected_or_unscannable_ones_quarantined() {
    let test = "clean_files_are_delivered_and_infected_or_unscannable_ones_quarantined";
    let Some(setup) = setup(test, true) else {
        return;
    };
    let clamd = ClamdPeer::start_on_free_port();
    let server = Server::launch(
        &[UserSpec::new("acme", &setup.key)],
        "",
        &clamd_sections(&clamd.address(), ""),
        Landing::Local,
        &[],
    );
    let samples = samples(&setup);
    upload_samples(&server, &setup, &samples);
    let jobs = server.wait_for_jobs(60, "four final jobs", |jobs| all_final(jobs, 4));
    check_verdicts(&jobs);

    assert_eq!(
        server.files_in("buckets/delivered/acme"),
        ["in/deep/data file.csv"]
    );
    let delivered = server
        .dir
        .path()
        .join("buckets/delivered/acme/in/deep/data file.csv");
    assert_eq!(sha256_file(&delivered), sha256_file(&samples.clean));
    assert_eq!(
        server.files_in("buckets/quarantine"),
        ["acme/big.bin", "acme/bundle.zip", "acme/eicar.txt"]
    );
    assert!(
        server.landing_listing().is_empty(),
        "{:?}",
        server.landing_listing()
    );
    assert_eq!(server.wait_events("delivered", 1).len(), 1);
    let quarantined = server.wait_events("quarantined", 3);
    assert_eq!(quarantined.len(), 3);
    assert!(
        quarantined
            .iter()
            .any(|e| e["reason"] == "unscannable" && e["path"] == "/big.bin")
    );

    let listing = server.cli(&["transfers", "list", "--state", "quarantined"]);
    assert_success(&listing, "transfers list");
    let listing = text(&listing);
    assert!(
        listing.contains("/eicar.txt") && !listing.contains("data file.csv"),
        "{listing}"
    );
    let shown = server.cli(&["transfers", "show", &job(&jobs, "eicar.txt").id.to_string()]);
    assert_success(&shown, "transfers show");
    assert!(
        text(&shown).contains("Custom.Test.EICAR-NDB"),
        "{}",
        text(&shown)
    );
}

#[test]
fn nothing_is_delivered_while_clamd_is_down_and_everything_after_it_returns() {
    let test = "nothing_is_delivered_while_clamd_is_down_and_everything_after_it_returns";
    let Some(setup) = setup(test, true) else {
        return;
    };
    if !require("curl", test) {
        return;
    }
    let mut clamd = ClamdPeer::prepare(free_port());
    let server = Server::launch(
        &[UserSpec::new("acme", &setup.key)],
        "",
        &clamd_sections(&clamd.address(), ""),
        Landing::Local,
        &[],
    );
    let first = setup.files.path().join("report.csv");
    random_file(&first, 50_000, 3);
    assert_success(
        &server.sftp(
            "acme",
            &setup.key,
            &format!("put {} report.csv\n", first.display()),
        ),
        "upload",
    );
    let jobs = server.wait_for_jobs(30, "a failed scan attempt", |jobs| {
        jobs.first().is_some_and(|job| job.attempts >= 1)
    });
    assert!(
        jobs[0]
            .last_error
            .as_deref()
            .unwrap_or("")
            .contains("unreachable"),
        "{jobs:#?}"
    );
    assert_eq!(server.events("scanner_unavailable").len(), 1);

    // While clamd is down, files wait unscanned, and spend no attempts: a second upload is not
    // tried at all, and the first is not tried again (its retry was due after 400 ms).
    let second = setup.files.path().join("second.csv");
    random_file(&second, 20_000, 4);
    assert_success(
        &server.sftp(
            "acme",
            &setup.key,
            &format!("put {} second.csv\n", second.display()),
        ),
        "upload during the outage",
    );
    std::thread::sleep(std::time::Duration::from_secs(2));
    let jobs = server.wait_for_jobs(5, "both uploads recorded", |jobs| jobs.len() == 2);
    let mut tries: Vec<(&str, JobState, u32)> = jobs
        .iter()
        .map(|job| (job.path.as_str(), job.state, job.attempts))
        .collect();
    tries.sort_by_key(|(path, _, _)| *path);
    assert_eq!(
        tries,
        [
            ("report.csv", JobState::Landed, 1),
            ("second.csv", JobState::Landed, 0)
        ],
        "fail closed, and no attempts spent: {jobs:#?}"
    );
    assert!(server.files_in("buckets/delivered").is_empty());
    assert!(server.files_in("buckets/quarantine").is_empty());
    assert_eq!(
        server.landing_listing(),
        ["acme/report.csv", "acme/second.csv"]
    );
    assert_eq!(
        server.events("scanner_unavailable").len(),
        1,
        "audited once"
    );
    let paused = |server: &Server| {
        let metrics = http_get(&format!("{}/metrics", server.admin_url()), None).body;
        metrics
            .lines()
            .find_map(|line| line.strip_prefix("ingestion_scanning_paused "))
            .map(str::to_string)
    };
    assert_eq!(paused(&server).as_deref(), Some("1"));

    clamd.start();
    server.wait_for_jobs(30, "delivery after clamd returns", |jobs| {
        all_final(jobs, 2)
    });
    assert_eq!(
        server.files_in("buckets/delivered/acme"),
        ["report.csv", "second.csv"]
    );
    assert!(!server.events("job_retrying").is_empty());
    let back = server.events("scanner_available");
    assert_eq!(back.len(), 1, "{back:?}");
    assert!(
        back[0]["unavailable_ms"].as_u64().unwrap() >= 2000,
        "{back:?}"
    );
    assert_eq!(paused(&server).as_deref(), Some("0"));
}

#[test]
fn a_job_that_keeps_failing_is_marked_failed_and_retried_on_command() {
    let test = "a_job_that_keeps_failing_is_marked_failed_and_retried_on_command";
    let Some(setup) = setup(test, true) else {
        return;
    };
    let clamd = ClamdPeer::start_on_free_port();
    let server = Server::launch(
        &[UserSpec::new("acme", &setup.key)],
        "",
        &clamd_sections(&clamd.address(), "max_attempts = 2\n"),
        Landing::Local,
        &[],
    );
    // The destination cannot be written: where the user's folder should be there is a file.
    let blocker = server.dir.path().join("buckets/delivered/acme");
    std::fs::create_dir_all(blocker.parent().unwrap()).unwrap();
    std::fs::write(&blocker, b"not a folder").unwrap();
    let file = setup.files.path().join("a.csv");
    std::fs::write(&file, b"a,b\n").unwrap();
    assert_success(
        &server.sftp(
            "acme",
            &setup.key,
            &format!("put {} a.csv\n", file.display()),
        ),
        "upload",
    );
    let jobs = server.wait_for_jobs(30, "a failed job", |jobs| {
        jobs.first()
            .is_some_and(|job| job.state == JobState::Failed)
    });
    assert_eq!(jobs[0].verdict, Some(Verdict::Clean), "{jobs:#?}");
    assert_eq!(server.events("job_failed").len(), 1);
    let failed = text(&server.cli(&["transfers", "list", "--state", "failed"]));
    assert!(failed.contains("/a.csv"), "{failed}");

    std::fs::remove_file(&blocker).unwrap();
    std::thread::sleep(std::time::Duration::from_secs(2));
    assert!(
        server.files_in("buckets/delivered").is_empty(),
        "a failed job waits for the operator"
    );
    assert_success(
        &server.cli(&["transfers", "retry", &jobs[0].id.to_string()]),
        "transfers retry",
    );
    server.wait_for_jobs(30, "delivery after retry", |jobs| all_final(jobs, 1));
    assert_eq!(server.files_in("buckets/delivered/acme"), ["a.csv"]);
    // The retry resumed from the recorded verdict: the file was scanned once.
    assert_eq!(server.events("scanned").len(), 1);
    // The operator's retry is among the job's events in the state database, not only in the file.
    let id = jobs[0].id;
    let events = server.query(|state| async move { state.job_events(id).await.unwrap() });
    assert!(
        events
            .iter()
            .any(|event| event.event == "job_retry_requested"),
        "{events:?}"
    );
    let refused = server.cli(&["transfers", "retry", &jobs[0].id.to_string()]);
    assert_failure(&refused, "retrying a delivered transfer");
}

/// The server is killed with SIGKILL after copying files to their destinations and before removing
/// them from landing; after a restart each file ends up in exactly one place.
fn crash_between_copy_and_delete(test: &str, buckets: Buckets) {
    let Some(setup) = setup(test, true) else {
        return;
    };
    let clamd = ClamdPeer::start_on_free_port();
    let mut user = UserSpec::new("acme", &setup.key);
    user.destination = buckets.destination("acme");
    let sections = clamd_sections(&clamd.address(), "lease = \"2s\"\n");
    let mut server = Server::launch(
        &[user],
        "",
        &sections,
        buckets.landing(),
        &[("INGESTION_FAILPOINT", "pause-after-copy")],
    );
    let clean = setup.files.path().join("clean.csv");
    random_file(&clean, 6 << 20, 4);
    let eicar = setup.files.path().join("eicar.txt");
    std::fs::write(&eicar, EICAR).unwrap();
    let script = format!(
        "put {} clean.csv\nput {} eicar.txt\n",
        clean.display(),
        eicar.display()
    );
    assert_success(&server.sftp("acme", &setup.key, &script), "uploads");
    let copied = server.wait_for_jobs(60, "both copies made", |jobs| {
        jobs.len() == 2 && jobs.iter().all(|job| job.copied_at.is_some())
    });
    server.kill9();
    // Copied but not yet removed from landing: each file is in two places until the restart.
    assert_eq!(
        buckets.delivered(&server),
        ["clean.csv"],
        "{copied:#?}\n{}",
        server.log()
    );
    assert_eq!(buckets.quarantined(&server), ["acme/eicar.txt"]);
    assert_eq!(
        server.landing_listing().len(),
        2,
        "{:?}",
        server.landing_listing()
    );

    server.restart(&[]);
    let jobs = server.wait_for_jobs(60, "jobs finished after the restart", |jobs| {
        all_final(jobs, 2)
    });
    assert_eq!(job(&jobs, "clean.csv").state, JobState::Delivered);
    assert_eq!(job(&jobs, "eicar.txt").state, JobState::Quarantined);
    assert!(
        server.landing_listing().is_empty(),
        "{:?}",
        server.landing_listing()
    );
    assert_eq!(buckets.delivered(&server), ["clean.csv"]);
    assert_eq!(buckets.quarantined(&server), ["acme/eicar.txt"]);
    let delivered = buckets.delivered_bytes(&server, "clean.csv").unwrap();
    assert!(
        delivered == std::fs::read(&clean).unwrap(),
        "the delivered bytes differ"
    );
}

#[test]
fn a_crash_between_copy_and_delete_converges_on_exactly_one_copy() {
    crash_between_copy_and_delete(
        "a_crash_between_copy_and_delete_converges_on_exactly_one_copy",
        Buckets::Local,
    );
}

#[test]
fn a_crash_between_copy_and_delete_converges_on_exactly_one_copy_on_s3() {
    let test = "a_crash_between_copy_and_delete_converges_on_exactly_one_copy_on_s3";
    let Some(moto) = require_moto(test) else {
        return;
    };
    crash_between_copy_and_delete(test, Buckets::S3(&moto));
}

/// A file left in landing without a job (a crash after storing, before recording) is adopted at
/// start, scanned and delivered.
#[test]
fn files_in_landing_without_a_job_are_adopted_at_start() {
    let test = "files_in_landing_without_a_job_are_adopted_at_start";
    let Some(setup) = setup(test, false) else {
        return;
    };
    let sections = "[scanner]\nengine = \"builtin\"\n";
    let mut server = Server::launch(
        &[UserSpec::new("acme", &setup.key)],
        "",
        sections,
        Landing::Local,
        &[],
    );
    let orphan = server
        .dir
        .path()
        .join("buckets/landing/acme/sub/orphan.csv");
    std::fs::create_dir_all(orphan.parent().unwrap()).unwrap();
    std::fs::write(&orphan, b"left behind\n").unwrap();
    // Left by a crash ten minutes ago; a file stored seconds ago may still be being recorded by
    // another node, and is left for a later pass.
    std::fs::File::options()
        .write(true)
        .open(&orphan)
        .unwrap()
        .set_modified(std::time::SystemTime::now() - std::time::Duration::from_secs(600))
        .unwrap();
    let young = server.dir.path().join("buckets/landing/acme/young.csv");
    std::fs::write(&young, b"just stored\n").unwrap();
    server.restart(&[]);
    let jobs = server.wait_for_jobs(30, "the orphan delivered", |jobs| all_final(jobs, 1));
    std::thread::sleep(std::time::Duration::from_secs(1));
    assert_eq!(server.jobs().len(), 1, "the young file is not adopted yet");
    assert!(young.exists());
    assert_eq!(jobs[0].session, "reconcile");
    assert_eq!(jobs[0].sha256.len(), 64);
    assert_eq!(
        server.files_in("buckets/delivered/acme"),
        ["sub/orphan.csv"]
    );
    assert_eq!(server.events("adopted").len(), 1);
}

#[test]
fn on_s3_with_kms_every_bucket_is_s3_and_metadata_is_stored() {
    let test = "on_s3_with_kms_every_bucket_is_s3_and_metadata_is_stored";
    let Some(setup) = setup(test, true) else {
        return;
    };
    let Some(moto) = require_moto(test) else {
        return;
    };
    let clamd = ClamdPeer::start_on_free_port();
    let kms = "arn:aws:kms:eu-west-2:123456789012:key/11111111-2222-3333-4444-555555555555";
    let mut user = UserSpec::new("acme", &setup.key);
    user.destination = Some("s3://team-bucket/acme/deliveries".into());
    user.destination_kms_key = Some(kms.into());
    let server = Server::launch(
        &[user],
        "",
        &clamd_sections(&clamd.address(), ""),
        Landing::S3 {
            endpoint: moto.endpoint.clone(),
            bucket: "landing-bucket".into(),
        },
        &[],
    );
    let samples = samples(&setup);
    upload_samples(&server, &setup, &samples);
    let jobs = server.wait_for_jobs(60, "four final jobs", |jobs| all_final(jobs, 4));
    check_verdicts(&jobs);

    let key = "acme/deliveries/in/deep/data file.csv";
    assert_eq!(
        s3_get_object(&moto.endpoint, "team-bucket", key).unwrap(),
        std::fs::read(&samples.clean).unwrap()
    );
    let head = s3_head(&moto.endpoint, "team-bucket", key).unwrap();
    assert_eq!(head["SSEKMSKeyId"], kms, "{head}");
    let clean = job(&jobs, "in/deep/data file.csv");
    assert_eq!(
        head["Metadata"]["ingestion-sha256"],
        clean.sha256.as_str(),
        "{head}"
    );
    assert_eq!(head["Metadata"]["ingestion-scan-result"], "clean", "{head}");
    assert_eq!(head["Metadata"]["ingestion-scan-engine"], "clamd", "{head}");
    assert_eq!(head["Metadata"]["ingestion-uploader"], "acme", "{head}");
    assert!(
        head["Metadata"]["ingestion-scan-time"]
            .as_str()
            .unwrap()
            .starts_with("20"),
        "{head}"
    );
    assert_eq!(
        head["Tags"]["ingestion-sha256"],
        clean.sha256.as_str(),
        "{head}"
    );

    assert_eq!(s3_keys(&moto.endpoint, "team-bucket"), [key]);
    assert_eq!(
        s3_keys(&moto.endpoint, "landing-bucket-quarantine"),
        ["acme/big.bin", "acme/bundle.zip", "acme/eicar.txt"]
    );
    let quarantined = s3_head(
        &moto.endpoint,
        "landing-bucket-quarantine",
        "acme/eicar.txt",
    )
    .unwrap();
    assert!(
        quarantined["Metadata"]["ingestion-signature"]
            .as_str()
            .unwrap()
            .contains("EICAR"),
        "{quarantined}"
    );
    assert!(
        server.landing_listing().is_empty(),
        "{:?}",
        server.landing_listing()
    );
}

/// A 6 GiB upload goes through landing, the scanner and delivery with the server's memory flat.
/// Slow (minutes): runs when INGESTION_SLOW_TESTS=1, as .ci/run sets.
#[test]
fn a_6_gib_file_is_delivered_byte_exact_with_bounded_memory() {
    let test = "a_6_gib_file_is_delivered_byte_exact_with_bounded_memory";
    if std::env::var("INGESTION_SLOW_TESTS").is_err() {
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED {test}: slow; set INGESTION_SLOW_TESTS=1 (.ci/run does)"
        );
        return;
    }
    let Some(setup) = setup(test, false) else {
        return;
    };
    let size: u64 = 6 << 30;
    let source = setup.files.path().join("six.bin");
    {
        use std::io::{Read, Write};
        let mut random = std::fs::File::open("/dev/urandom").unwrap();
        let mut out = std::fs::File::create(&source).unwrap();
        let mut block = vec![0u8; 1 << 20];
        for _ in 0..(size >> 20) {
            random.read_exact(&mut block).unwrap();
            out.write_all(&block).unwrap();
        }
    }
    let expected = sha256_file(&source);
    let server = Server::launch(
        &[UserSpec::new("acme", &setup.key)],
        "max_file_size = \"7 GiB\"",
        "[scanner]\nengine = \"builtin\"\n",
        Landing::Local,
        &[],
    );
    assert_success(
        &server.sftp(
            "acme",
            &setup.key,
            &format!("put {} six.bin\n", source.display()),
        ),
        "6 GiB upload",
    );
    let jobs = server.wait_for_jobs(1200, "the 6 GiB file delivered", |jobs| all_final(jobs, 1));
    assert_eq!(
        (jobs[0].state, jobs[0].size, jobs[0].sha256.as_str()),
        (JobState::Delivered, size, expected.as_str())
    );
    std::fs::remove_file(&source).unwrap();
    let delivered = server.dir.path().join("buckets/delivered/acme/six.bin");
    assert_eq!(sha256_file(&delivered), expected);
    let status = std::fs::read_to_string(format!("/proc/{}/status", server.child.id())).unwrap();
    let peak_kib: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    let _ = {
        use std::io::Write;
        writeln!(
            std::io::stderr(),
            "{test}: peak RSS of the server {} MiB",
            peak_kib / 1024
        )
    };
    assert!(
        peak_kib < 200 * 1024,
        "peak RSS {peak_kib} KiB is not under 200 MiB"
    );
}

/// WinSCP and others upload to `name.filepart` and rename when done: the file is delivered once,
/// under its final name; a temporary file never renamed is processed after the timeout.
#[test]
fn a_temporary_upload_name_is_delivered_once_under_its_final_name() {
    let test = "a_temporary_upload_name_is_delivered_once_under_its_final_name";
    let Some(setup) = setup(test, false) else {
        return;
    };
    let server = Server::launch(
        &[UserSpec::new("acme", &setup.key)],
        "temporary_name_timeout = \"3s\"",
        "[scanner]\nengine = \"builtin\"\n",
        Landing::Local,
        &[],
    );
    let file = setup.files.path().join("data.csv");
    random_file(&file, 100_000, 21);
    let script = format!(
        "put {f} data.csv.filepart\nput {f} stray.partial\n",
        f = file.display()
    );
    assert_success(
        &server.sftp("acme", &setup.key, &script),
        "uploads to temporary names",
    );
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let jobs = server.jobs();
    assert!(
        jobs.iter().all(|job| job.state == JobState::Held),
        "{jobs:#?}"
    );
    assert!(server.files_in("buckets/delivered").is_empty());

    assert_success(
        &server.sftp("acme", &setup.key, "rename data.csv.filepart data.csv\n"),
        "rename",
    );
    let jobs = server.wait_for_jobs(30, "both delivered", |jobs| all_final(jobs, 2));
    assert_eq!(job(&jobs, "data.csv").state, JobState::Delivered);
    assert_eq!(job(&jobs, "stray.partial").state, JobState::Delivered);
    assert_eq!(
        server.files_in("buckets/delivered/acme"),
        ["data.csv", "stray.partial"]
    );
    assert_eq!(server.wait_events("delivered", 2).len(), 2);
}

/// `server.temporary_names` replaces the default patterns: a name matching the configured pattern
/// is held until renamed, and a name only the defaults matched is an ordinary file.
#[test]
fn configured_temporary_name_patterns_replace_the_defaults() {
    let test = "configured_temporary_name_patterns_replace_the_defaults";
    let Some(setup) = setup(test, false) else {
        return;
    };
    let server = Server::launch(
        &[UserSpec::new("acme", &setup.key)],
        "temporary_names = [\"~*.tmp\"]\ntemporary_name_timeout = \"1h\"",
        "[scanner]\nengine = \"builtin\"\n",
        Landing::Local,
        &[],
    );
    let file = setup.files.path().join("data.csv");
    random_file(&file, 100_000, 22);
    let script = format!(
        "put {f} ~report.tmp\nput {f} data.filepart\n",
        f = file.display()
    );
    assert_success(
        &server.sftp("acme", &setup.key, &script),
        "uploads to a configured and a default temporary name",
    );
    let jobs = server.wait_for_jobs(30, "data.filepart delivered", |jobs| {
        jobs.iter()
            .any(|job| job.path == "data.filepart" && job.state == JobState::Delivered)
    });
    assert_eq!(job(&jobs, "~report.tmp").state, JobState::Held);
    assert_eq!(server.files_in("buckets/delivered/acme"), ["data.filepart"]);

    assert_success(
        &server.sftp("acme", &setup.key, "rename ~report.tmp report.csv\n"),
        "rename",
    );
    let jobs = server.wait_for_jobs(30, "report.csv delivered", |jobs| {
        jobs.iter()
            .any(|job| job.path == "report.csv" && job.state == JobState::Delivered)
    });
    assert!(
        jobs.iter().all(|job| job.path != "~report.tmp"),
        "the held job was renamed, not copied: {jobs:#?}"
    );
    assert_eq!(
        server.files_in("buckets/delivered/acme"),
        ["data.filepart", "report.csv"]
    );
}

/// The same name uploaded twice, the first already delivered: by default the second replaces the
/// first at the destination; with `on_conflict = "suffix"` it is kept beside it.
#[test]
fn the_same_name_twice_overwrites_or_gets_a_suffix() {
    let test = "the_same_name_twice_overwrites_or_gets_a_suffix";
    let Some(setup) = setup(test, false) else {
        return;
    };
    let first = setup.files.path().join("first.csv");
    std::fs::write(&first, b"first version\n").unwrap();
    let second = setup.files.path().join("second.csv");
    std::fs::write(&second, b"second version\n").unwrap();
    for (sections, expected) in [
        ("", vec![("report.csv", "second version\n")]),
        (
            "[delivery]\non_conflict = \"suffix\"\n",
            vec![
                ("report (2).csv", "second version\n"),
                ("report.csv", "first version\n"),
            ],
        ),
    ] {
        let server = Server::launch(
            &[UserSpec::new("acme", &setup.key)],
            "",
            &format!("[scanner]\nengine = \"builtin\"\n{sections}"),
            Landing::Local,
            &[],
        );
        let put = |file: &std::path::Path| {
            assert_success(
                &server.sftp(
                    "acme",
                    &setup.key,
                    &format!("put {} report.csv\n", file.display()),
                ),
                "upload",
            );
        };
        put(&first);
        server.wait_for_jobs(30, "the first delivery", |jobs| all_final(jobs, 1));
        put(&second);
        server.wait_for_jobs(30, "the second delivery", |jobs| all_final(jobs, 2));
        let delivered: Vec<(String, String)> = server
            .files_in("buckets/delivered/acme")
            .into_iter()
            .map(|name| {
                let content = std::fs::read_to_string(
                    server.dir.path().join("buckets/delivered/acme").join(&name),
                )
                .unwrap();
                (name, content)
            })
            .collect();
        let expected: Vec<(String, String)> = expected
            .iter()
            .map(|(n, c)| (n.to_string(), c.to_string()))
            .collect();
        assert_eq!(delivered, expected, "{sections}");
    }
}

/// The server is killed with SIGKILL in the middle of copying a file to its destination; after a
/// restart the file is delivered once, and the cut-off copy's parts are gone from the destination.
fn crash_mid_copy(test: &str, buckets: Buckets) {
    let Some(setup) = setup(test, false) else {
        return;
    };
    let mut user = UserSpec::new("acme", &setup.key);
    user.destination = buckets.destination("acme");
    let mut server = Server::launch(
        &[user],
        "",
        "[scanner]\nengine = \"builtin\"\n[pipeline]\nlease = \"2s\"\nretry_base = \"200ms\"\nretry_cap = \"1s\"\n",
        buckets.landing(),
        &[("INGESTION_FAILPOINT", "pause-mid-copy")],
    );
    let big = setup.files.path().join("big.bin");
    random_file(&big, 40 << 20, 41);
    assert_success(
        &server.sftp(
            "acme",
            &setup.key,
            &format!("put {} big.bin\n", big.display()),
        ),
        "upload",
    );
    server.wait_for_jobs(60, "a copy under way", |jobs| {
        jobs.len() == 1 && jobs[0].copy_upload.is_some()
    });
    server.kill9();
    let stray = |entry: &String| entry.starts_with("MULTIPART ") || entry.contains('#');
    let destination = match &buckets {
        Buckets::Local => server.files_in("buckets/delivered/acme"),
        Buckets::S3(moto) => s3_keys(&moto.endpoint, "team-bucket"),
    };
    assert!(destination.iter().any(stray), "{destination:?}");

    server.restart(&[]);
    let jobs = server.wait_for_jobs(60, "delivery after the restart", |jobs| all_final(jobs, 1));
    assert_eq!(jobs[0].state, JobState::Delivered);
    assert_eq!(jobs[0].copy_upload, None);
    assert_eq!(buckets.delivered(&server), ["big.bin"]);
    if let Buckets::S3(moto) = &buckets {
        let keys = s3_keys(&moto.endpoint, "team-bucket");
        assert!(!keys.iter().any(stray), "{keys:?}");
    }
    assert!(
        buckets.delivered_bytes(&server, "big.bin").unwrap() == std::fs::read(&big).unwrap(),
        "the delivered bytes differ"
    );
}

#[test]
fn a_crash_mid_copy_leaves_no_parts_behind() {
    crash_mid_copy("a_crash_mid_copy_leaves_no_parts_behind", Buckets::Local);
}

#[test]
fn a_crash_mid_copy_leaves_no_parts_behind_on_s3() {
    let test = "a_crash_mid_copy_leaves_no_parts_behind_on_s3";
    let Some(moto) = require_moto(test) else {
        return;
    };
    crash_mid_copy(test, Buckets::S3(&moto));
}

/// A job that takes far longer than its lease (1 s here) keeps it by renewing it: no other worker
/// takes it over, so it is scanned and delivered exactly once.
#[test]
fn a_job_longer_than_its_lease_is_not_taken_over() {
    let test = "a_job_longer_than_its_lease_is_not_taken_over";
    let Some(setup) = setup(test, false) else {
        return;
    };
    let server = Server::launch(
        &[UserSpec::new("acme", &setup.key)],
        "",
        "[scanner]\nengine = \"builtin\"\n[pipeline]\nworkers = 4\nlease = \"1s\"\n",
        Landing::Local,
        &[],
    );
    let big = setup.files.path().join("big.bin");
    // Large enough that scanning and copying it takes well over the 1 s lease.
    random_file(&big, 768 << 20, 51);
    assert_success(
        &server.sftp(
            "acme",
            &setup.key,
            &format!("put {} big.bin\n", big.display()),
        ),
        "upload",
    );
    let jobs = server.wait_for_jobs(300, "delivery", |jobs| all_final(jobs, 1));
    assert_eq!(jobs[0].state, JobState::Delivered);
    assert_eq!(jobs[0].attempts, 0, "{:#?}", jobs[0]);
    let scanned = server.events("scanned");
    let delivered = server.wait_events("delivered", 1);
    assert_eq!((scanned.len(), delivered.len()), (1, 1));
    assert!(server.events("job_retrying").is_empty());
    // The test means something only if the job outlived its lease several times over.
    let time = |event: &serde_json::Value| {
        humantime::parse_rfc3339(event["time"].as_str().unwrap()).unwrap()
    };
    let worked = time(&delivered[0])
        .duration_since(time(&scanned[0]))
        .unwrap()
        + std::time::Duration::from_millis(scanned[0]["scan_ms"].as_u64().unwrap());
    assert!(
        worked > std::time::Duration::from_millis(1500),
        "the job took only {worked:?}; make the file bigger"
    );
}

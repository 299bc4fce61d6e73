//! Receipts, read with the OpenSSH sftp client: `/.receipts` mirrors each supplier's uploads with one
//! text per file (received, size, SHA-256, outcome), is left out of `ls /`, refuses every change, and
//! shows nobody else's uploads; the builtin scanner delivers clean files and quarantines EICAR.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::Path;

use common::*;
use ingestion::state::JobState;

const BUILTIN: &str = "[scanner]\nengine = \"builtin\"\n";

struct Setup {
    files: tempfile::TempDir,
    acme: Key,
    other: Key,
}

fn setup(test: &str) -> Option<Setup> {
    if !require("sftp", test) || !require("ssh-keygen", test) {
        return None;
    }
    let files = tempfile::tempdir().unwrap();
    let acme = keygen(files.path(), "acme_key", &["-t", "ed25519"]);
    let other = keygen(files.path(), "other_key", &["-t", "ed25519"]);
    Some(Setup { files, acme, other })
}

/// Downloads `remote` with `get` and returns its text.
fn get(server: &Server, user: &str, key: &Key, remote: &str, local: &Path) -> String {
    let _ = std::fs::remove_file(local);
    let output = server.sftp(
        user,
        key,
        &format!("get \"{remote}\" {}\n", local.display()),
    );
    assert_success(&output, &format!("get {remote}"));
    std::fs::read_to_string(local).unwrap()
}

/// The value of the `key: value` line of a receipt.
fn value<'a>(receipt: &'a str, key: &str) -> Option<&'a str> {
    receipt
        .lines()
        .find_map(|line| line.strip_prefix(&format!("{key}: ")))
}

/// The size `ls -l` shows for `name` (the fifth column of its line).
fn listed_size(listing: &str, name: &str) -> u64 {
    let line = listing
        .lines()
        .find(|line| line.ends_with(&format!(" {name}")) && !line.starts_with("sftp>"))
        .unwrap_or_else(|| panic!("{name} is not listed: {listing}"));
    line.split_whitespace().nth(4).unwrap().parse().unwrap()
}

/// Names `ls -1 <folder>` shows, without the echoed command.
fn names(server: &Server, user: &str, key: &Key, folder: &str) -> Vec<String> {
    let output = server.sftp(user, key, &format!("ls -1 {folder}\n"));
    assert_success(&output, &format!("ls {folder}"));
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter(|line| !line.starts_with("sftp>"))
        .map(|line| line.trim().rsplit('/').next().unwrap().to_string())
        .collect()
}

#[test]
fn a_supplier_reads_the_receipt_of_a_delivered_upload_with_openssh() {
    let test = "a_supplier_reads_the_receipt_of_a_delivered_upload_with_openssh";
    let Some(setup) = setup(test) else { return };
    let server = Server::launch(
        &[
            UserSpec::new("acme", &setup.acme),
            UserSpec::new("other", &setup.other),
        ],
        "",
        BUILTIN,
        Landing::Local,
        &[],
    );
    let dir = setup.files.path();
    let data = dir.join("data.csv");
    random_file(&data, 123_457, 5);
    let eicar = dir.join("eicar.txt");
    std::fs::write(&eicar, EICAR).unwrap();
    let script = format!(
        "put {data} data.csv\nmkdir sub\nput {data} sub/x.csv\nput {eicar} eicar.txt\n",
        data = data.display(),
        eicar = eicar.display()
    );
    assert_success(&server.sftp("acme", &setup.acme, &script), "uploads");
    let jobs = server.wait_for_jobs(60, "three final jobs", |jobs| all_final(jobs, 3));
    let delivered = job(&jobs, "data.csv");
    assert_eq!(delivered.state, JobState::Delivered);
    assert_eq!(job(&jobs, "eicar.txt").state, JobState::Quarantined);

    // The receipt of the delivered file, read by path.
    let local = dir.join("receipt.txt");
    let receipt = get(
        &server,
        "acme",
        &setup.acme,
        "/.receipts/data.csv.txt",
        &local,
    );
    assert!(receipt.ends_with('\n'), "{receipt:?}");
    assert_eq!(value(&receipt, "file"), Some("/data.csv"), "{receipt}");
    assert_eq!(
        value(&receipt, "received"),
        Some(delivered.received_at.as_str()),
        "{receipt}"
    );
    assert_eq!(value(&receipt, "size"), Some("123457 bytes"), "{receipt}");
    assert_eq!(
        value(&receipt, "sha256"),
        Some(sha256_file(&data).as_str()),
        "{receipt}"
    );
    let finished = delivered.finished_at.as_deref().unwrap();
    assert_eq!(
        value(&receipt, "outcome"),
        Some(format!("delivered at {finished}").as_str()),
        "{receipt}"
    );
    assert_eq!(receipt.lines().count(), 5, "{receipt}");
    assert!(!receipt.contains("buckets") && !receipt.contains("delivered/acme"));

    // Hidden from the root's listing, even with -a; listed when asked for by path, with the exact size.
    let output = server.sftp("acme", &setup.acme, "ls -la /\n");
    assert_success(&output, "ls -la /");
    assert!(!text(&output).contains(".receipts"), "{}", text(&output));
    assert_eq!(
        names(&server, "acme", &setup.acme, "/.receipts"),
        ["data.csv.txt", "eicar.txt.txt", "sub"]
    );
    let output = server.sftp("acme", &setup.acme, "ls -l /.receipts\n");
    assert_success(&output, "ls -l /.receipts");
    let listing = text(&output);
    assert_eq!(
        listed_size(&listing, "data.csv.txt"),
        receipt.len() as u64,
        "{listing}"
    );
    assert!(
        listing
            .lines()
            .any(|line| line.starts_with("-r--------") && line.ends_with(" data.csv.txt")),
        "receipts show as read-only: {listing}"
    );

    // A sub-folder's upload, reached with cd.
    assert_eq!(
        names(&server, "acme", &setup.acme, "/.receipts/sub"),
        ["x.csv.txt"]
    );
    let output = server.sftp(
        "acme",
        &setup.acme,
        &format!("cd /.receipts/sub\nget x.csv.txt {}\n", local.display()),
    );
    assert_success(&output, "cd and get");
    let sub = std::fs::read_to_string(&local).unwrap();
    assert_eq!(value(&sub, "file"), Some("/sub/x.csv"), "{sub}");
    assert!(
        value(&sub, "outcome").unwrap().starts_with("delivered at "),
        "{sub}"
    );

    // The quarantined file: why, but not the signature (show_signature is off by default).
    let quarantined = get(
        &server,
        "acme",
        &setup.acme,
        "/.receipts/eicar.txt.txt",
        &local,
    );
    let outcome = value(&quarantined, "outcome").unwrap();
    assert!(
        outcome.starts_with("quarantined at ") && outcome.ends_with(" (infected)"),
        "{quarantined}"
    );
    assert!(!quarantined.contains("signature"), "{quarantined}");
    assert!(!quarantined.contains("Eicar"), "{quarantined}");
    assert!(!quarantined.contains("quarantine/"), "{quarantined}");

    // Another supplier sees none of them.
    assert!(names(&server, "other", &setup.other, "/.receipts").is_empty());
    assert_failure(
        &server.sftp(
            "other",
            &setup.other,
            &format!("get /.receipts/data.csv.txt {}\n", local.display()),
        ),
        "another user's receipt",
    );

    // Nothing in /.receipts can be changed, and nothing named .receipts can be made at the root.
    // Each line is its own batch: sftp -b stops at the first failing command.
    let before = server.landing_listing();
    for attempt in [
        format!("put {} /.receipts/", data.display()),
        format!("put {} /.receipts/new.txt", data.display()),
        format!("put {} /.receipts/data.csv.txt", data.display()),
        "rm /.receipts/data.csv.txt".to_string(),
        "rename /.receipts/data.csv.txt /stolen.txt".to_string(),
        "rename /.receipts/sub /moved".to_string(),
        "mkdir /.receipts/new".to_string(),
        "rmdir /.receipts/sub".to_string(),
        "chmod 644 /.receipts/data.csv.txt".to_string(),
        "mkdir /.receipts".to_string(),
        format!("put {} /.receipts", data.display()),
    ] {
        let output = server.sftp("acme", &setup.acme, &format!("{attempt}\n"));
        assert_failure(&output, &attempt);
        assert!(
            text(&output).to_lowercase().contains("permission denied"),
            "{attempt}: {}",
            text(&output)
        );
    }
    assert_eq!(server.landing_listing(), before);
    assert_eq!(
        get(
            &server,
            "acme",
            &setup.acme,
            "/.receipts/data.csv.txt",
            &local
        ),
        receipt,
        "unchanged"
    );
    assert_eq!(server.jobs().len(), 3, "no upload was recorded");
}

/// A user with a download area finds `/.receipts` beside `/upload` and `/download`, and an operator
/// who allows it shows the signature a quarantined file matched.
#[test]
fn egress_users_have_receipts_and_signatures_show_when_allowed() {
    let test = "egress_users_have_receipts_and_signatures_show_when_allowed";
    let Some(setup) = setup(test) else { return };
    let egress = tempfile::tempdir().unwrap();
    let mut acme = UserSpec::new("acme", &setup.acme);
    acme.egress = Some(format!("file://{}", egress.path().display()));
    let server = Server::launch(
        &[acme],
        "",
        &format!("{BUILTIN}[receipts]\nshow_signature = true\n"),
        Landing::Local,
        &[],
    );
    let eicar = setup.files.path().join("eicar.txt");
    std::fs::write(&eicar, EICAR).unwrap();
    assert_success(
        &server.sftp(
            "acme",
            &setup.acme,
            &format!("put {} /upload/eicar.txt\n", eicar.display()),
        ),
        "upload",
    );
    let jobs = server.wait_for_jobs(60, "the file quarantined", |jobs| all_final(jobs, 1));
    assert_eq!(jobs[0].state, JobState::Quarantined);

    assert_eq!(
        names(&server, "acme", &setup.acme, "/"),
        ["download", "upload"]
    );
    assert_eq!(
        names(&server, "acme", &setup.acme, "/.receipts"),
        ["eicar.txt.txt"]
    );
    let local = setup.files.path().join("receipt.txt");
    let receipt = get(
        &server,
        "acme",
        &setup.acme,
        "/.receipts/eicar.txt.txt",
        &local,
    );
    assert_eq!(
        value(&receipt, "file"),
        Some("/upload/eicar.txt"),
        "{receipt}"
    );
    assert_eq!(
        value(&receipt, "sha256"),
        Some(sha256_file(&eicar).as_str()),
        "{receipt}"
    );
    assert!(
        value(&receipt, "outcome").unwrap().ends_with(" (infected)"),
        "{receipt}"
    );
    assert_eq!(
        value(&receipt, "signature"),
        Some("Eicar-Test-Signature"),
        "{receipt}"
    );
    assert!(receipt.ends_with("signature: Eicar-Test-Signature\n"));

    for attempt in [
        "mkdir /upload/.receipts".to_string(),
        format!("put {} /upload/.receipts", eicar.display()),
        format!("put {} /.receipts/x.txt", eicar.display()),
    ] {
        let output = server.sftp("acme", &setup.acme, &format!("{attempt}\n"));
        assert_failure(&output, &attempt);
    }
}

/// A file not processed yet has a receipt that says it is waiting, without the scanner's error.
#[test]
fn an_upload_waiting_for_the_scanner_has_a_pending_receipt() {
    let test = "an_upload_waiting_for_the_scanner_has_a_pending_receipt";
    let Some(setup) = setup(test) else { return };
    // Nothing listens at the clamd address: the upload stays in landing, retried.
    let server = Server::launch(
        &[UserSpec::new("acme", &setup.acme)],
        "",
        &format!("{NO_SCANNER}[pipeline]\nretry_base = \"200ms\"\nretry_cap = \"1s\"\n"),
        Landing::Local,
        &[],
    );
    let data = setup.files.path().join("data.csv");
    std::fs::write(&data, b"a,b\n1,2\n").unwrap();
    assert_success(
        &server.sftp(
            "acme",
            &setup.acme,
            &format!("put {} data.csv\n", data.display()),
        ),
        "upload",
    );
    server.wait_for_jobs(30, "a failed scan attempt", |jobs| {
        jobs.first().is_some_and(|job| job.attempts >= 1)
    });
    let local = setup.files.path().join("receipt.txt");
    let receipt = get(
        &server,
        "acme",
        &setup.acme,
        "/.receipts/data.csv.txt",
        &local,
    );
    assert_eq!(
        value(&receipt, "outcome"),
        Some("pending (being retried after an error)"),
        "{receipt}"
    );
    assert_eq!(value(&receipt, "size"), Some("8 bytes"), "{receipt}");
    assert!(
        !receipt.contains("127.0.0.1") && !receipt.contains("clamd"),
        "{receipt}"
    );
    // The upload itself is still there, write-only, and the root hides the receipts, even when the
    // home holds something of that name from before receipts existed.
    let stale = server
        .dir
        .path()
        .join("buckets/landing/acme/.receipts/old.csv");
    std::fs::create_dir_all(stale.parent().unwrap()).unwrap();
    std::fs::write(&stale, b"old").unwrap();
    let output = server.sftp("acme", &setup.acme, "ls -la\n");
    assert_success(&output, "ls -la");
    assert!(text(&output).contains("data.csv"), "{}", text(&output));
    assert!(!text(&output).contains(".receipts"), "{}", text(&output));
    assert_eq!(
        names(&server, "acme", &setup.acme, "/.receipts"),
        ["data.csv.txt"]
    );
}

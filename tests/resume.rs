//! Resumable uploads, end to end on local disk and on S3 (moto): OpenSSH `sftp` cut off mid-upload
//! (client killed, or server killed with SIGKILL), the partial seen by its owner only, `reput` and
//! lftp `put -c` carrying on, `put` starting over, and expiry after `server.partial_retention`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};

use common::*;
use ingestion::state::JobState;

/// Parts are 16 MiB on S3 and 4 MiB on local disk; two S3 parts are stored well before the end.
const STORED_BEFORE_KILL: u64 = 32 << 20;

struct Setup {
    files: tempfile::TempDir,
    acme: Key,
    beta: Key,
}

fn setup(test: &str, needs_lftp: bool) -> Option<Setup> {
    for program in ["sftp", "ssh-keygen", "python3"] {
        if !require(program, test) {
            return None;
        }
    }
    if !require_python("paramiko", test) {
        return None;
    }
    if needs_lftp && !require("lftp", test) {
        return None;
    }
    let files = tempfile::tempdir().unwrap();
    let acme = keygen(files.path(), "acme_key", &["-t", "ed25519"]);
    let beta = keygen(files.path(), "beta_key", &["-t", "ed25519"]);
    Some(Setup { files, acme, beta })
}

fn users<'k>(buckets: &Buckets, setup: &'k Setup) -> Vec<UserSpec<'k>> {
    let mut acme = UserSpec::new("acme", &setup.acme);
    let mut beta = UserSpec::new("beta", &setup.beta);
    acme.destination = buckets.destination("acme");
    beta.destination = buckets.destination("beta");
    vec![acme, beta]
}

/// Whether a landing entry is an interrupted upload of acme's `name` (at the home's top): a staging
/// file or a multipart upload.
fn is_partial_of(buckets: &Buckets, entry: &str, name: &str) -> bool {
    match buckets {
        // A staging file in the file's folder, named after the upload, not the file.
        Buckets::Local => entry
            .strip_prefix("acme/.upload#")
            .is_some_and(|id| id.len() == 19 && id.bytes().all(|b| b.is_ascii_digit())),
        Buckets::S3(_) => entry == format!("MULTIPART landing-prefix/acme/{name}"),
    }
}

fn launch(buckets: &Buckets, setup: &Setup, retention: &str) -> Server {
    Server::launch(
        &users(buckets, setup),
        &format!("partial_retention = \"{retention}\"\nmax_file_size = \"1 GiB\""),
        "[scanner]\nengine = \"builtin\"\n[pipeline]\nretry_base = \"200ms\"\nretry_cap = \"1s\"\n",
        buckets.landing(),
        &[],
    )
}

/// Starts OpenSSH sftp uploading `local` to `remote`, throttled so that it can be cut off midway.
fn start_put(server: &Server, key: &Key, local: &Path, remote: &str) -> Child {
    let script = format!("put {} {remote}\n", local.display());
    server.sftp_spawn("acme", key, &script, &["-l", "200000"])
}

/// Uploads `local` to acme's `remote` with OpenSSH sftp and kills the client once part of it is
/// stored. Returns the bytes the server kept, after checking what the owner and the audit see.
fn interrupted_put(server: &Server, setup: &Setup, local: &Path, remote: &str) -> u64 {
    let mut client = start_put(server, &setup.acme, local, remote);
    server.wait_for_stored(remote, STORED_BEFORE_KILL);
    client.kill().unwrap();
    client.wait().unwrap();
    let event = wait_until(60, "the interruption audited", || {
        server
            .events("upload_interrupted")
            .into_iter()
            .find(|event| event["path"] == format!("/{remote}"))
    });
    let stored = event["bytes_stored"].as_u64().unwrap();
    let received = event["bytes_received"].as_u64().unwrap();
    let size = std::fs::metadata(local).unwrap().len();
    assert!(
        STORED_BEFORE_KILL <= stored && stored <= received && received < size,
        "{event}"
    );
    let partial = server
        .partials()
        .into_iter()
        .find(|partial| partial.path == remote)
        .unwrap();
    assert_eq!(partial.size, stored);
    // The owner sees it with the size to resume from.
    let listing = server.sftp("acme", &setup.acme, &format!("ls -l {remote}\n"));
    assert_success(&listing, "listing a partial");
    let shown: Vec<u64> = text(&listing)
        .lines()
        .filter(|line| line.ends_with(remote))
        .filter_map(|line| line.split_whitespace().nth(4)?.parse().ok())
        .collect();
    assert_eq!(shown, [stored], "{}", text(&listing));
    stored
}

/// Opens `path` for writing without truncation (a resume) and writes 1 KiB at `offset`, printing
/// `accepted` or `refused: <the server's message>`.
const WRITE_AT: &str = r#"
import sys, paramiko
from paramiko.sftp import CMD_OPEN, CMD_WRITE, CMD_CLOSE, int64
from paramiko.sftp_attr import SFTPAttributes
port, key, path, offset = int(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
t = paramiko.Transport(("127.0.0.1", port))
t.connect(username="acme", pkey=paramiko.Ed25519Key.from_private_key_file(key))
s = paramiko.SFTPClient.from_transport(t)
_, reply = s._request(CMD_OPEN, path, 0x02 | 0x08, SFTPAttributes())  # WRITE | CREAT, no TRUNC
handle = reply.get_binary()
try:
    s._request(CMD_WRITE, handle, int64(offset), b"x" * 1024)
    print("accepted")
except IOError as error:
    print("refused:", error.args[-1] if error.args else error)
t.close()
"#;

fn wait_delivered(server: &Server, buckets: &Buckets, name: &str, local: &Path) {
    let jobs = server.wait_for_jobs(120, &format!("{name} delivered"), |jobs| {
        jobs.iter()
            .any(|job| job.path == name && job.state == JobState::Delivered)
    });
    let delivered: Vec<_> = jobs.iter().filter(|job| job.path == name).collect();
    assert_eq!(delivered.len(), 1, "delivered once: {jobs:#?}");
    assert_eq!(delivered[0].sha256, sha256_file(local));
    assert_eq!(delivered[0].size, std::fs::metadata(local).unwrap().len());
    // The supplier's copy of the SHA-256: the close event covers the whole file.
    let closed = server.events("close");
    let close = closed
        .iter()
        .find(|event| event["path"] == format!("/{name}"))
        .unwrap();
    assert_eq!(close["sha256"], delivered[0].sha256.as_str(), "{close}");
    let bytes = buckets.delivered_bytes(server, name).unwrap();
    assert!(
        bytes == std::fs::read(local).unwrap(),
        "{name}: the delivered bytes differ"
    );
    assert!(
        server.partials().iter().all(|partial| partial.path != name),
        "{:?}",
        server.partials()
    );
}

fn lftp_resume(server: &Server, setup: &Setup, local: &Path, remote: &str) {
    let connect = format!(
        "ssh -a -x -i {} -o IdentitiesOnly=yes -o IdentityAgent=none -o StrictHostKeyChecking=no -o UserKnownHostsFile={}",
        setup.acme.private.display(),
        server.known_hosts().display()
    );
    let commands = format!(
        "set sftp:connect-program \"{connect}\"; set cmd:fail-exit yes; open -u acme, -p {port} sftp://127.0.0.1; \
         put -c {local} -o {remote}; bye",
        port = server.port,
        local = local.display(),
    );
    let output = Command::new("lftp")
        .args(["-c", &commands])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_success(&output, "lftp put -c");
}

fn resume_scenarios(test: &str, buckets: Buckets) {
    let Some(setup) = setup(test, true) else {
        return;
    };
    let mut server = launch(&buckets, &setup, "1h");
    let dir = setup.files.path();

    // Cut off at a few dozen MiB of 300: kept, invisible to others, never delivered.
    let big = dir.join("big.bin");
    random_file(&big, 300 << 20, 21);
    let stored = interrupted_put(&server, &setup, &big, "big.bin");
    assert!(server.jobs().is_empty(), "{:#?}", server.jobs());
    let landing = server.landing_listing();
    assert!(
        landing.len() == 1 && is_partial_of(&buckets, &landing[0], "big.bin"),
        "{landing:?}"
    );
    let listed = server.cli(&["transfers", "list", "--state", "partial"]);
    assert_success(&listed, "transfers list --state partial");
    // ID, USER, BYTES, AGE, IDLE, STARTED, PATH: the owner, the bytes stored and how old it is.
    let listed = text(&listed);
    let header: Vec<&str> = listed.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        ["ID", "USER", "BYTES", "AGE", "IDLE", "STARTED", "PATH"],
        "{listed}"
    );
    let row: Vec<&str> = listed
        .lines()
        .find(|line| line.ends_with("/big.bin"))
        .unwrap()
        .split_whitespace()
        .collect();
    assert_eq!(
        (row[1], row[2]),
        ("acme", stored.to_string().as_str()),
        "{listed}"
    );
    let age = humantime::parse_duration(row[3]).unwrap();
    assert!(age < std::time::Duration::from_secs(600), "{listed}");
    let other = server.sftp("beta", &setup.beta, "ls -l\n");
    assert_success(&other, "another user's listing");
    assert!(!text(&other).contains("big.bin"), "{}", text(&other));
    let other = server.sftp(
        "beta",
        &setup.beta,
        &format!("reput {} big.bin\n", big.display()),
    );
    assert_failure(&other, "another user resuming the partial");
    assert!(server.partials()[0].size == stored);

    // OpenSSH reput carries on from there: delivered byte-exact, once.
    let output = server.sftp(
        "acme",
        &setup.acme,
        &format!("reput {} big.bin\n", big.display()),
    );
    assert_success(&output, "reput");
    let resumed = server.events("upload_resumed");
    assert_eq!(resumed.len(), 1, "{resumed:?}");
    assert_eq!(resumed[0]["from"].as_u64(), Some(stored));
    wait_delivered(&server, &buckets, "big.bin", &big);

    // lftp `put -c` resumes too.
    let second = dir.join("second.bin");
    random_file(&second, 100 << 20, 22);
    interrupted_put(&server, &setup, &second, "second.bin");
    lftp_resume(&server, &setup, &second, "second.bin");
    assert_eq!(server.events("upload_resumed").len(), 2, "lftp resumed");
    wait_delivered(&server, &buckets, "second.bin", &second);

    // `put` (with truncation) after an interruption starts over and replaces the partial.
    let third = dir.join("third.bin");
    random_file(&third, 100 << 20, 23);
    let third_stored = interrupted_put(&server, &setup, &third, "third.bin");
    // A write beyond what is stored is refused with the offset to resume from; nothing changes.
    let beyond = third_stored + (1 << 20);
    let output = python(
        WRITE_AT,
        &[
            &server.port.to_string(),
            &setup.acme.private.display().to_string(),
            "third.bin",
            &beyond.to_string(),
        ],
    );
    assert_success(&output, "paramiko writing beyond the stored size");
    let said = text(&output);
    assert!(
        said.starts_with("refused: ")
            && said.contains(&format!("resume from offset {third_stored} ")),
        "{said}"
    );
    let kept: Vec<_> = server
        .partials()
        .into_iter()
        .map(|p| (p.path, p.size))
        .collect();
    assert_eq!(kept, [("third.bin".to_string(), third_stored)]);
    let replacement = dir.join("third-v2.bin");
    random_file(&replacement, 5 << 20, 24);
    let output = server.sftp(
        "acme",
        &setup.acme,
        &format!("put {} third.bin\n", replacement.display()),
    );
    assert_success(&output, "put over a partial");
    assert_eq!(server.events("partial_discarded").len(), 1);
    wait_delivered(&server, &buckets, "third.bin", &replacement);

    // The server killed with SIGKILL mid-upload: after a restart, reput completes.
    let fourth = dir.join("fourth.bin");
    random_file(&fourth, 100 << 20, 25);
    let mut client = start_put(&server, &setup.acme, &fourth, "fourth.bin");
    server.wait_for_stored("fourth.bin", STORED_BEFORE_KILL);
    server.kill9();
    client.wait().unwrap();
    let kept = server.partials();
    assert!(
        kept.len() == 1 && kept[0].size >= STORED_BEFORE_KILL,
        "{kept:?}"
    );
    server.restart(&[]);
    let output = server.sftp(
        "acme",
        &setup.acme,
        &format!("reput {} fourth.bin\n", fourth.display()),
    );
    assert_success(&output, "reput after a server crash");
    let resumed = server.events("upload_resumed");
    // The fourth opening for resume: reput, lftp, the refused write, and this one.
    assert_eq!(resumed.len(), 4, "{resumed:?}");
    assert_eq!(resumed[3]["from"].as_u64(), Some(kept[0].size));
    wait_delivered(&server, &buckets, "fourth.bin", &fourth);

    wait_until(60, "landing emptied", || {
        server.landing_listing().is_empty().then_some(())
    });
    assert_eq!(server.jobs().len(), 4, "{:#?}", server.jobs());
}

/// A partial left alone past `server.partial_retention` is removed, with its stored parts.
fn expiry(test: &str, buckets: Buckets) {
    let Some(setup) = setup(test, false) else {
        return;
    };
    // Long enough for `interrupted_put` to list the partial after the client is killed.
    let server = launch(&buckets, &setup, "5s");
    let file = setup.files.path().join("left.bin");
    random_file(&file, 100 << 20, 26);
    interrupted_put(&server, &setup, &file, "left.bin");
    wait_until(60, "the partial expired", || {
        server.partials().is_empty().then_some(())
    });
    wait_until(30, "its stored parts removed", || {
        server.landing_listing().is_empty().then_some(())
    });
    // Audited once the parts are gone, a moment after the listing empties.
    let expired = server.wait_events("partial_expired", 1);
    assert_eq!(expired.len(), 1, "{expired:?}");
    assert_eq!(expired[0]["path"], "/left.bin");
    let output = server.sftp(
        "acme",
        &setup.acme,
        &format!("reput {} left.bin\n", file.display()),
    );
    assert_failure(&output, "reput after expiry");
    assert!(server.jobs().is_empty());
}

#[test]
fn an_interrupted_upload_is_kept_and_resumed_on_local_disk() {
    resume_scenarios(
        "an_interrupted_upload_is_kept_and_resumed_on_local_disk",
        Buckets::Local,
    );
}

#[test]
fn an_interrupted_upload_is_kept_and_resumed_on_s3() {
    let test = "an_interrupted_upload_is_kept_and_resumed_on_s3";
    if let Some(moto) = require_moto(test) {
        resume_scenarios(test, Buckets::S3(&moto));
    }
}

#[test]
fn an_abandoned_partial_expires_on_local_disk() {
    expiry("an_abandoned_partial_expires_on_local_disk", Buckets::Local);
}

#[test]
fn an_abandoned_partial_expires_on_s3() {
    let test = "an_abandoned_partial_expires_on_s3";
    if let Some(moto) = require_moto(test) {
        expiry(test, Buckets::S3(&moto));
    }
}

/// Makes every partial of the server look last written long ago (left behind), as a client that
/// never came back would leave it.
fn age_partials(server: &Server) {
    let url = match &server.database {
        ingestion::config::Database::Sqlite { path } => format!("sqlite://{}", path.display()),
        ingestion::config::Database::Postgres { url } => url.clone(),
    };
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        sqlx::any::install_default_drivers();
        let pool = sqlx::AnyPool::connect(&url).await.unwrap();
        sqlx::query("UPDATE partials SET updated_ms = 0")
            .execute(&pool)
            .await
            .unwrap();
    });
}

/// `limits.max_partials_per_user`: with that many interrupted uploads left behind, a new upload is
/// refused with what to do; resuming one is not, and once it is done new uploads work again.
#[test]
fn interrupted_uploads_left_behind_are_capped_per_user() {
    let test = "interrupted_uploads_left_behind_are_capped_per_user";
    let Some(setup) = setup(test, false) else {
        return;
    };
    let buckets = Buckets::Local;
    let server = Server::launch(
        &users(&buckets, &setup),
        "max_file_size = \"1 GiB\"",
        "[scanner]\nengine = \"builtin\"\n[limits]\nmax_partials_per_user = 1\n",
        buckets.landing(),
        &[],
    );
    let big = setup.files.path().join("big.bin");
    random_file(&big, 300 << 20, 27);
    interrupted_put(&server, &setup, &big, "big.bin");
    let small = setup.files.path().join("small.csv");
    std::fs::write(&small, "a,b\n").unwrap();
    let put_small = || {
        server.sftp(
            "acme",
            &setup.acme,
            &format!("put {} small.csv\n", small.display()),
        )
    };
    // Still being written a moment ago: not left behind yet.
    assert_success(&put_small(), "an upload beside a fresh partial");
    age_partials(&server);
    assert_eq!(
        server.paramiko_uploads(&setup.acme, &["other.csv"]),
        [
            "other.csv refused: /other.csv: you have 1 interrupted uploads waiting to be resumed (at most 1 may \
         wait); resume them (reput), remove the ones you no longer need (rm), or wait until they \
         expire"
        ]
    );
    // Another user is not affected.
    let theirs = server.sftp(
        "beta",
        &setup.beta,
        &format!("put {} small.csv\n", small.display()),
    );
    assert_success(&theirs, "another user's upload");
    // Resuming is allowed, and afterwards new uploads are again.
    let output = server.sftp(
        "acme",
        &setup.acme,
        &format!("reput {} big.bin\n", big.display()),
    );
    assert_success(&output, "reput of the partial left behind");
    assert_eq!(
        server.paramiko_uploads(&setup.acme, &["other.csv"]),
        ["other.csv ok"]
    );
}

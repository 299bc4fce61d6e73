//! The clients suppliers actually use, each through the same scenario: connect, make a sub-folder,
//! upload two files under temporary names (as WinSCP and others do), list, rename one to its final
//! name, remove the stray one, disconnect — and exactly the renamed file is delivered.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::process::{Command, Output, Stdio};

use common::*;
use ingestion::state::JobState;

struct Scenario {
    _files: tempfile::TempDir,
    key: Key,
    data: std::path::PathBuf,
    server: Server,
}

fn scenario(test: &str, tools: &[&str], modules: &[&str]) -> Option<Scenario> {
    if !require("ssh-keygen", test) || tools.iter().any(|tool| !require(tool, test)) {
        return None;
    }
    if modules.iter().any(|module| !require_python(module, test)) {
        return None;
    }
    let files = tempfile::tempdir().unwrap();
    let key = keygen(files.path(), "acme_key", &["-t", "ed25519"]);
    let data = files.path().join("data.csv");
    random_file(&data, 700_000, 31);
    let server = Server::launch(
        &[UserSpec::new("acme", &key)],
        "",
        "[scanner]\nengine = \"builtin\"\n",
        Landing::Local,
        &[],
    );
    Some(Scenario {
        _files: files,
        key,
        data,
        server,
    })
}

/// Exactly `sub/data.csv` is delivered, byte for byte; the stray upload was removed, not delivered.
fn check_outcome(scenario: &Scenario, output: &Output, client: &str) {
    assert_success(output, client);
    let listing = text(output);
    assert!(
        listing.contains("data.csv.part") && listing.contains("stray.csv.part"),
        "{client} listing: {listing}"
    );
    let jobs = scenario.server.wait_for_jobs(30, "the delivery", |jobs| {
        jobs.iter().any(|job| job.state == JobState::Delivered)
            && jobs.iter().any(|job| job.state == JobState::Removed)
    });
    assert_eq!(jobs.len(), 2, "{client}: {jobs:#?}");
    assert_eq!(
        scenario.server.files_in("buckets/delivered/acme"),
        ["sub/data.csv"],
        "{client}"
    );
    assert_eq!(
        sha256_file(
            &scenario
                .server
                .dir
                .path()
                .join("buckets/delivered/acme/sub/data.csv")
        ),
        sha256_file(&scenario.data),
        "{client}"
    );
    assert!(
        scenario.server.landing_listing().is_empty(),
        "{client}: {:?}",
        scenario.server.landing_listing()
    );
}

#[test]
fn openssh_sftp() {
    let Some(s) = scenario("openssh_sftp", &["sftp"], &[]) else {
        return;
    };
    let script = format!(
        "mkdir sub\nput {d} sub/data.csv.part\nput {d} sub/stray.csv.part\nls sub\nrename sub/data.csv.part sub/data.csv\nrm sub/stray.csv.part\n",
        d = s.data.display()
    );
    let output = s.server.sftp("acme", &s.key, &script);
    check_outcome(&s, &output, "OpenSSH sftp");
}

#[test]
fn openssh_scp() {
    let Some(s) = scenario("openssh_scp", &["scp", "sftp"], &[]) else {
        return;
    };
    // scp only copies: the folder is made with sftp, the file goes straight to its final name.
    assert_success(&s.server.sftp("acme", &s.key, "mkdir sub\n"), "mkdir");
    assert_success(
        &s.server
            .scp_upload("acme", &s.key, &s.data, "/sub/data.csv"),
        "scp",
    );
    s.server.wait_for_jobs(30, "the delivery", |jobs| {
        jobs.iter().any(|job| job.state == JobState::Delivered)
    });
    assert_eq!(
        s.server.files_in("buckets/delivered/acme"),
        ["sub/data.csv"]
    );
}

#[test]
fn curl_libssh2() {
    let Some(s) = scenario("curl_libssh2", &["curl"], &[]) else {
        return;
    };
    let base = format!("sftp://acme@127.0.0.1:{}", s.server.port);
    let curl = |args: &[&str]| {
        Command::new("curl")
            .args(["-sS", "--insecure", "--key"])
            .arg(&s.key.private)
            .arg("--pubkey")
            .arg(format!("{}.pub", s.key.private.display()))
            .args(args)
            .output()
            .unwrap()
    };
    let data = s.data.display().to_string();
    assert_success(
        &curl(&[
            "-Q",
            "mkdir /sub",
            "-T",
            &data,
            &format!("{base}/sub/data.csv.part"),
        ]),
        "mkdir + upload",
    );
    assert_success(
        &curl(&["-T", &data, &format!("{base}/sub/stray.csv.part")]),
        "stray upload",
    );
    let listing = curl(&[&format!("{base}/sub/")]);
    assert_success(&listing, "list");
    let finish = curl(&[
        "-Q",
        "rename /sub/data.csv.part /sub/data.csv",
        "-Q",
        "rm /sub/stray.csv.part",
        &format!("{base}/"),
    ]);
    assert_success(&finish, "rename + rm");
    let combined = Output {
        status: finish.status,
        stdout: [listing.stdout, finish.stdout].concat(),
        stderr: finish.stderr,
    };
    check_outcome(&s, &combined, "curl");
}

const PARAMIKO: &str = r#"
import sys, paramiko
host, port, key, data = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
t = paramiko.Transport((host, port))
t.connect(username="acme", pkey=paramiko.Ed25519Key.from_private_key_file(key))
s = paramiko.SFTPClient.from_transport(t)
s.mkdir("sub")
s.put(data, "sub/data.csv.part")
s.put(data, "sub/stray.csv.part")
print("\n".join(s.listdir("sub")))
s.rename("sub/data.csv.part", "sub/data.csv")
s.remove("sub/stray.csv.part")
t.close()
"#;

#[test]
fn paramiko() {
    let Some(s) = scenario("paramiko", &["python3"], &["paramiko"]) else {
        return;
    };
    let output = python(
        PARAMIKO,
        &[
            "127.0.0.1",
            &s.server.port.to_string(),
            &s.key.private.display().to_string(),
            &s.data.display().to_string(),
        ],
    );
    check_outcome(&s, &output, "paramiko");
}

const ASYNCSSH: &str = r#"
import asyncio, sys, asyncssh
host, port, key, data = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
async def main():
    async with asyncssh.connect(host, port=port, username="acme", client_keys=[key], known_hosts=None) as conn:
        async with conn.start_sftp_client() as sftp:
            await sftp.mkdir("sub")
            await sftp.put(data, "sub/data.csv.part")
            await sftp.put(data, "sub/stray.csv.part")
            print("\n".join(await sftp.listdir("sub")))
            await sftp.rename("sub/data.csv.part", "sub/data.csv")
            await sftp.remove("sub/stray.csv.part")
asyncio.run(main())
"#;

#[test]
fn asyncssh() {
    let Some(s) = scenario("asyncssh", &["python3"], &["asyncssh"]) else {
        return;
    };
    let output = python(
        ASYNCSSH,
        &[
            "127.0.0.1",
            &s.server.port.to_string(),
            &s.key.private.display().to_string(),
            &s.data.display().to_string(),
        ],
    );
    check_outcome(&s, &output, "asyncssh");
}

#[test]
fn rclone() {
    let Some(s) = scenario("rclone", &["rclone"], &[]) else {
        return;
    };
    let port = s.server.port.to_string();
    let key = s.key.private.display().to_string();
    let rclone = |args: &[&str]| {
        Command::new("rclone")
            .args(args)
            .args([
                "--sftp-host",
                "127.0.0.1",
                "--sftp-port",
                &port,
                "--sftp-user",
                "acme",
                "--sftp-key-file",
                &key,
                "--sftp-disable-hashcheck",
                "--config",
                "/dev/null",
                "-q",
            ])
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let data = s.data.display().to_string();
    assert_success(&rclone(&["mkdir", ":sftp:sub"]), "rclone mkdir");
    assert_success(
        &rclone(&["copyto", &data, ":sftp:sub/data.csv.part"]),
        "rclone copyto",
    );
    assert_success(
        &rclone(&["copyto", &data, ":sftp:sub/stray.csv.part"]),
        "rclone copyto stray",
    );
    let listing = rclone(&["lsf", ":sftp:sub"]);
    assert_success(&listing, "rclone lsf");
    assert_success(
        &rclone(&["moveto", ":sftp:sub/data.csv.part", ":sftp:sub/data.csv"]),
        "rclone moveto",
    );
    let removed = rclone(&["deletefile", ":sftp:sub/stray.csv.part"]);
    let combined = Output {
        status: removed.status,
        stdout: listing.stdout,
        stderr: removed.stderr,
    };
    check_outcome(&s, &combined, "rclone");
}

#[test]
fn lftp() {
    let Some(s) = scenario("lftp", &["lftp", "ssh"], &[]) else {
        return;
    };
    let connect = format!(
        "ssh -a -x -i {} -o IdentitiesOnly=yes -o IdentityAgent=none -o StrictHostKeyChecking=no -o UserKnownHostsFile={}",
        s.key.private.display(),
        s.server.known_hosts().display()
    );
    let commands = format!(
        "set sftp:connect-program \"{connect}\"; set cmd:fail-exit yes; open -u acme, -p {port} sftp://127.0.0.1; \
         mkdir sub; put {d} -o sub/data.csv.part; put {d} -o sub/stray.csv.part; cls -1 sub; \
         mv sub/data.csv.part sub/data.csv; rm sub/stray.csv.part; bye",
        port = s.server.port,
        d = s.data.display()
    );
    let output = Command::new("lftp")
        .args(["-c", &commands])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    check_outcome(&s, &output, "lftp");
}

//! Hostile input and the algorithm audit: requests a stock client would never send (paramiko), and
//! ssh-audit's verdict on what the server offers.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::process::Command;

use common::*;

#[test]
fn hostile_sftp_requests_are_refused_and_the_server_keeps_serving() {
    let test = "hostile_sftp_requests_are_refused_and_the_server_keeps_serving";
    if !require("ssh-keygen", test) || !require_python("paramiko", test) {
        return;
    }
    let keys = tempfile::tempdir().unwrap();
    let acme = keygen(keys.path(), "acme", &["-t", "ed25519"]);
    let other = keygen(keys.path(), "other", &["-t", "ed25519"]);
    let server = Server::start(
        &[UserSpec::new("acme", &acme), UserSpec::new("other", &other)],
        "",
        Landing::Local,
    );
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/peers/adversarial.py");
    let output = Command::new("python3")
        .arg(script)
        .args(["127.0.0.1", &server.port.to_string(), "acme"])
        .arg(&acme.private)
        .arg("other")
        .arg(&other.private)
        .output()
        .unwrap();
    assert_success(&output, "adversarial.py");
    let results: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let outcome = |case: &str| {
        results[case]
            .as_str()
            .unwrap_or_else(|| panic!("no result for {case}: {results}"))
            .to_string()
    };

    for (case, result) in results.as_object().unwrap() {
        if case.starts_with("dotdot") {
            assert_eq!(result, "denied", "{case}");
        }
    }
    assert_eq!(outcome("absolute /etc/passwd stat"), "no such file");
    assert!(
        outcome("nul in path").contains("control character"),
        "{results}"
    );
    for case in [
        "symlink",
        "readlink",
        "hardlink",
        "rename out of home",
        "rename onto another user",
        "posix-rename out of home",
        "open read on upload",
        "open read|write|create",
    ] {
        assert_eq!(outcome(case), "denied", "{case}: {results}");
    }
    assert!(
        outcome("write at 1 TB").contains("maximum upload size"),
        "{results}"
    );
    let folder = outcome("folder handle used as a file");
    assert!(
        folder.starts_with("status 4:") && folder.contains("folder"),
        "{results}"
    );
    let foreign = outcome("handle of another session");
    assert!(
        foreign.starts_with("status 4:") && foreign.contains("invalid handle"),
        "{results}"
    );
    assert_eq!(outcome("unknown extension"), "unsupported");
    assert_eq!(
        outcome("unknown packet type"),
        "status 8",
        "SSH_FX_OP_UNSUPPORTED"
    );
    assert_eq!(outcome("truncated open"), "status 5", "SSH_FX_BAD_MESSAGE");
    assert_eq!(outcome("still serving after bad packets"), "ok");
    assert_eq!(outcome("1 MiB packet"), "closed");
    assert_eq!(outcome("new session after the oversized packet"), "ok");

    // Nothing escaped or was written where it must not be.
    let keys_found = server.landing_listing();
    assert_eq!(
        keys_found,
        ["acme/mine.txt", "other/theirs.txt"],
        "{keys_found:?}"
    );
}

fn ssh_audit(port: u16) -> serde_json::Value {
    let output = Command::new("python3")
        .args([
            "-m",
            "ssh_audit",
            "-j",
            "-p",
            &port.to_string(),
            "127.0.0.1",
        ])
        .output()
        .unwrap();
    // ssh-audit exits non-zero when it has warnings; the JSON is what matters.
    serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|_| panic!("ssh-audit output: {}", text(&output)))
}

/// Every (algorithm, level, note) that ssh-audit flags as a warning or failure.
fn flagged(report: &serde_json::Value) -> Vec<(String, String)> {
    let mut found = Vec::new();
    for section in ["kex", "key", "enc", "mac"] {
        for entry in report[section].as_array().into_iter().flatten() {
            for level in ["warn", "fail"] {
                for note in entry["notes"][level].as_array().into_iter().flatten() {
                    found.push((
                        format!(
                            "{level} {}",
                            entry["algorithm"].as_str().unwrap_or_default()
                        ),
                        note.to_string(),
                    ));
                }
            }
        }
    }
    found
}

#[test]
fn ssh_audit_finds_nothing_but_the_documented_compatibility_algorithms() {
    let test = "ssh_audit_finds_nothing_but_the_documented_compatibility_algorithms";
    if !require("ssh-keygen", test) || !require_python("ssh_audit", test) {
        return;
    }
    let keys = tempfile::tempdir().unwrap();
    let acme = keygen(keys.path(), "acme", &["-t", "ed25519"]);
    let server = Server::start(&[UserSpec::new("acme", &acme)], "", Landing::Local);
    let report = ssh_audit(server.port);
    let mut flagged_names: Vec<String> =
        flagged(&report).into_iter().map(|(name, _)| name).collect();
    flagged_names.sort();
    flagged_names.dedup();
    // Kept for curl (libssh2 1.10), rclone 1.60 and OpenSSH before 9.9, which have nothing newer.
    assert_eq!(
        flagged_names,
        [
            "warn curve25519-sha256",
            "warn curve25519-sha256@libssh.org",
            "warn hmac-sha2-256",
            "warn hmac-sha2-512"
        ],
        "{report}"
    );
    assert!(
        report["cves"].as_array().is_none_or(|cves| cves.is_empty()),
        "{report}"
    );

    let strict = Server::launch(
        &[UserSpec::new("acme", &acme)],
        "algorithms = \"post-quantum-only\"",
        NO_SCANNER,
        Landing::Local,
        &[],
    );
    let report = ssh_audit(strict.port);
    assert!(
        flagged(&report).is_empty(),
        "post-quantum-only must audit clean: {report}"
    );
}

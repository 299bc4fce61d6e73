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
    // A packet cut short, then the client's EOF: the session ends at once (exit status 0, the
    // channel closed), rather than waiting for bytes that will never come.
    assert_eq!(
        outcome("packet cut short, then EOF"),
        "closed, exit status 0"
    );
    assert_eq!(outcome("packet cut short, then disconnect"), "sent");
    assert_eq!(
        outcome("length cut short, then EOF"),
        "closed, exit status 0"
    );
    assert_eq!(outcome("still serving after cut-short packets"), "ok");
    assert_eq!(outcome("1 MiB packet"), "closed");
    assert_eq!(outcome("new session after the oversized packet"), "ok");
    // Another user's session, opened before the first hostile request with an upload under way,
    // finishes that upload and keeps working after the last.
    assert_eq!(outcome("bystander session after the hostile cases"), "ok");
    assert_eq!(
        server.landed("other", "bystander.txt").as_deref(),
        Some(&b"written before the hostile cases, and finished after them"[..])
    );

    // The oversized packet, and only it, is audited as a protocol error of acme's session; the
    // packets cut short are a client going away, not an attack.
    let errors = server.wait_events("protocol_error", 1);
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(errors[0]["user"], "acme", "{errors:?}");
    assert_eq!(
        errors[0]["reason"],
        "an SFTP packet of 1048577 bytes is outside the limit of 1..=262144"
    );
    let session = errors[0]["session"].as_str().unwrap();
    wait_until(
        30,
        "the disconnect of the oversized packet's session",
        || {
            server
                .events("disconnect")
                .iter()
                .any(|event| event["session"] == session)
                .then_some(())
        },
    );

    // Nothing escaped or was written where it must not be.
    let keys_found = server.landing_listing();
    assert_eq!(
        keys_found,
        ["acme/mine.txt", "other/bystander.txt", "other/theirs.txt"],
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

/// Runs tests/peers/limits.py with `args` and returns the JSON object it printed.
fn limits_peer(args: &[&str]) -> serde_json::Value {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/peers/limits.py");
    let output = Command::new("python3")
        .arg(script)
        .args(args)
        .output()
        .unwrap();
    assert_success(&output, &format!("limits.py {}", args[0]));
    serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|_| panic!("limits.py {}: {}", args[0], text(&output)))
}

/// A TCP connection to the server from `source` (a loopback address), reads timing out after 10 s.
fn connect_from(source: &str, port: u16) -> std::net::TcpStream {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .unwrap();
    let stream = runtime.block_on(async {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
        let stream = socket.connect(([127, 0, 0, 1], port).into()).await.unwrap();
        stream.into_std().unwrap()
    });
    stream.set_nonblocking(false).unwrap();
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    stream
}

/// A connection from `source` that the server admits (it sends its SSH version line) and that then
/// stalls before authenticating, holding its place among the unauthenticated connections.
fn hold_unauthenticated(source: &str, port: u16) -> std::net::TcpStream {
    use std::io::{Read, Write};
    let mut stream = connect_from(source, port);
    let mut seen = Vec::new();
    let mut buffer = [0u8; 256];
    while !seen.contains(&b'\n') {
        let read = stream.read(&mut buffer).unwrap();
        assert!(
            read > 0,
            "the server closed an admitted connection from {source}"
        );
        seen.extend_from_slice(&buffer[..read]);
    }
    assert!(
        seen.starts_with(b"SSH-2.0-ingestion\r\n"),
        "{}",
        String::from_utf8_lossy(&seen)
    );
    stream.write_all(b"SSH-2.0-stalling\r\n").unwrap();
    stream
}

/// A connection from `source` that the server must close before SSH starts: not a byte is sent.
fn assert_refused_before_ssh(source: &str, port: u16) {
    use std::io::Read;
    let mut stream = connect_from(source, port);
    let mut buffer = [0u8; 256];
    match stream.read(&mut buffer) {
        Ok(0) => {}
        Err(error) if error.kind() == std::io::ErrorKind::ConnectionReset => {}
        Ok(read) => panic!(
            "a connection from {source} over the cap was served: {:?}",
            String::from_utf8_lossy(&buffer[..read])
        ),
        Err(error) => panic!("a connection from {source} over the cap was left open: {error}"),
    }
}

#[test]
fn unauthenticated_connections_are_capped_while_another_address_logs_in() {
    let test = "unauthenticated_connections_are_capped_while_another_address_logs_in";
    if !require("ssh-keygen", test) || !require("sftp", test) {
        return;
    }
    let keys = tempfile::tempdir().unwrap();
    let acme = keygen(keys.path(), "acme", &["-t", "ed25519"]);
    let mut user = UserSpec::new("acme", &acme);
    user.allowed_ips = vec!["127.0.0.1/32", "127.0.0.2/32"];
    let server = Server::launch(
        &[user],
        "",
        &format!("{NO_SCANNER}[limits]\nmax_unauthenticated = 4\nmax_unauthenticated_per_ip = 2\n"),
        Landing::Local,
        &[],
    );
    let upload = keys.path().join("report.csv");
    std::fs::write(&upload, "a,b\n1,2\n").unwrap();
    // `Server::launch`'s readiness probe was a connection from 127.0.0.1 too: wait until it is gone.
    server.wait_events("disconnect", 1);

    // 127.0.0.1 holds its two places and never logs in; a third connection is closed unserved.
    let mut held = vec![
        hold_unauthenticated("127.0.0.1", server.port),
        hold_unauthenticated("127.0.0.1", server.port),
    ];
    assert_refused_before_ssh("127.0.0.1", server.port);
    let refused = server.wait_events("connection_refused", 1);
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert_eq!(refused[0]["ip"], "127.0.0.1");
    assert_eq!(
        refused[0]["reason"],
        "too many connections from this address are waiting to log in"
    );

    // Meanwhile the same user logs in from another address and uploads.
    let output = server.sftp_from(
        "acme",
        &acme,
        &format!("put {} report.csv\nls\n", upload.display()),
        Some("127.0.0.2"),
    );
    assert_success(
        &output,
        "login from 127.0.0.2 while 127.0.0.1 holds its places",
    );
    assert_eq!(
        server.landed("acme", "report.csv").as_deref(),
        Some(&b"a,b\n1,2\n"[..])
    );

    // Two more stalled connections from 127.0.0.3 fill the overall cap (4): a fourth address is
    // closed unserved too, for the other reason.
    held.push(hold_unauthenticated("127.0.0.3", server.port));
    held.push(hold_unauthenticated("127.0.0.3", server.port));
    assert_refused_before_ssh("127.0.0.4", server.port);
    let refused = server.wait_events("connection_refused", 2);
    assert_eq!(refused.len(), 2, "{refused:?}");
    assert_eq!(refused[1]["ip"], "127.0.0.4");
    assert_eq!(
        refused[1]["reason"],
        "too many connections are waiting to log in"
    );

    // Once the stalled connections are gone, 127.0.0.1 is served again.
    drop(held);
    wait_until(30, "the stalled connections' disconnects", || {
        let from = |ip: &str| {
            server
                .events("disconnect")
                .iter()
                .filter(|event| event["ip"] == ip && event["user"].is_null())
                .count()
        };
        // 127.0.0.1: the readiness probe and two stalled connections.
        (from("127.0.0.1") == 3 && from("127.0.0.3") == 2).then_some(())
    });
    assert_success(
        &server.sftp("acme", &acme, "ls\n"),
        "login from 127.0.0.1 once its stalled connections are closed",
    );
    assert_eq!(server.events("connection_refused").len(), 2);
}

/// A front-door server with one user, acme, whose Ed25519 key is returned, for a paramiko peer.
fn paramiko_peer(test: &str) -> Option<(tempfile::TempDir, Key, Server)> {
    if !require("ssh-keygen", test) || !require_python("paramiko", test) {
        return None;
    }
    let keys = tempfile::tempdir().unwrap();
    let acme = keygen(keys.path(), "acme", &["-t", "ed25519"]);
    let server = Server::start(&[UserSpec::new("acme", &acme)], "", Landing::Local);
    Some((keys, acme, server))
}

#[test]
fn auth_attempts_per_connection_are_capped() {
    let Some((_keys, acme, server)) = paramiko_peer("auth_attempts_per_connection_are_capped")
    else {
        return;
    };
    let port = server.port.to_string();

    // Ten wrong keys on one connection: six are answered, the seventh ends the connection.
    let result = limits_peer(&["auth-cap", "127.0.0.1", &port, "acme", "10"]);
    assert_eq!(result["refused"], 6, "{result}");
    assert_eq!(result["then"], "disconnected", "{result}");
    assert_eq!(
        result["disconnect"], "Disconnect (code 14): Too many authentication attempts",
        "{result}"
    );
    let refusals = server.wait_events("auth_refused", 6);
    assert_eq!(refusals.len(), 6, "{refusals:?}");
    let session = refusals[0]["session"].as_str().unwrap();
    for refusal in &refusals {
        assert_eq!(refusal["session"], session, "{refusals:?}");
        assert_eq!(
            refusal["reason"],
            "the key is not one of the user's ssh_keys"
        );
    }
    wait_until(30, "the capped connection's disconnect", || {
        server
            .events("disconnect")
            .iter()
            .any(|event| event["session"] == session)
            .then_some(())
    });
    assert!(server.events("auth_accepted").is_empty());

    // The address is not banned for one such connection: a normal session works.
    let key = acme.private.display().to_string();
    let result = limits_peer(&["upload", "127.0.0.1", &port, "acme", &key, "after.txt"]);
    assert_eq!(result["upload"], "ok", "{result}");
    assert_eq!(
        server.landed("acme", "after.txt").as_deref(),
        Some(&b"after.txt"[..])
    );
}

#[test]
fn open_uploads_and_folder_listings_are_capped_per_session() {
    let Some((_keys, acme, server)) =
        paramiko_peer("open_uploads_and_folder_listings_are_capped_per_session")
    else {
        return;
    };
    let port = server.port.to_string();
    let key = acme.private.display().to_string();

    let results = limits_peer(&["handle-caps", "127.0.0.1", &port, "acme", &key]);
    // SSH_FX_FAILURE (4) with the cap in the message, at the ninth open of each kind.
    assert_eq!(results["uploads opened"], 8, "{results}");
    assert_eq!(
        results["upload refused"],
        "status 4: too many files open for upload in this session (at most 8); close some first"
    );
    assert_eq!(results["close one upload"], "status 0: OK", "{results}");
    assert_eq!(results["upload after closing one"], "handle", "{results}");
    assert_eq!(results["folders opened"], 8, "{results}");
    assert_eq!(
        results["folder refused"],
        "status 4: too many open folder listings in this session (at most 8); close some first"
    );
    assert_eq!(results["close one folder"], "status 0: OK", "{results}");
    assert_eq!(results["folder after closing one"], "handle", "{results}");
    assert_eq!(results["close the rest"], "ok", "{results}");
    assert_eq!(results["same session afterwards"], "ok", "{results}");

    let result = limits_peer(&["upload", "127.0.0.1", &port, "acme", &key, "next.txt"]);
    assert_eq!(result["upload"], "ok", "{result}");
    assert_eq!(
        server.landed("acme", "next.txt").as_deref(),
        Some(&b"next.txt"[..])
    );
    let mut landed = server.landing_listing();
    landed.retain(|name| name.starts_with("acme/cap-"));
    assert_eq!(
        landed.len(),
        9,
        "eight uploads and the one after the close: {landed:?}"
    );
}

/// The names in the first `label` line of OpenSSH's `-vv` log after `section` (comma-separated,
/// optionally in `<…>`).
fn vv_names(log: &str, section: &str, label: &str) -> Vec<String> {
    let after = log
        .split_once(section)
        .unwrap_or_else(|| panic!("no {section:?} in {log}"))
        .1;
    let line = after
        .lines()
        .find_map(|line| line.split_once(label).map(|(_, names)| names))
        .unwrap_or_else(|| panic!("no {label:?} after {section:?} in {log}"));
    line.trim()
        .trim_start_matches('<')
        .trim_end_matches('>')
        .split(',')
        .map(str::to_string)
        .collect()
}

#[test]
fn sha1_rsa_signatures_are_refused_and_rsa_sha2_is_accepted() {
    let test = "sha1_rsa_signatures_are_refused_and_rsa_sha2_is_accepted";
    if !require("ssh-keygen", test) || !require("sftp", test) || !require_python("paramiko", test) {
        return;
    }
    let keys = tempfile::tempdir().unwrap();
    let rsa = keygen(keys.path(), "rsa", &["-t", "rsa", "-b", "3072"]);
    let server = Server::start(&[UserSpec::new("acme", &rsa)], "", Landing::Local);
    let port = server.port.to_string();
    let key = rsa.private.display().to_string();

    // paramiko signs with SHA-1 and sends it although the server does not list ssh-rsa: refused,
    // for that reason; the same key signing with SHA-256 logs in.
    let results = limits_peer(&["rsa", "127.0.0.1", &port, "acme", &key]);
    assert_eq!(
        results["ssh-rsa"], "refused: Authentication failed.",
        "{results}"
    );
    assert!(results.get("ssh-rsa session").is_none(), "{results}");
    assert_eq!(
        results["rsa-sha2-256"], "accepted as rsa-sha2-256",
        "{results}"
    );
    assert_eq!(results["rsa-sha2-256 session"], "ok", "{results}");
    assert_eq!(results["host key type"], "ssh-ed25519", "{results}");
    let sig_algs: Vec<&str> = results["server-sig-algs"]
        .as_str()
        .unwrap()
        .split(',')
        .collect();
    assert!(sig_algs.contains(&"rsa-sha2-256"), "{results}");
    assert!(!sig_algs.contains(&"ssh-rsa"), "{results}");
    let refused = server.wait_events("auth_refused", 1);
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert_eq!(
        refused[0]["reason"],
        "ssh-rsa (SHA-1) signatures are refused; use rsa-sha2-256/512 or an Ed25519 key"
    );
    let accepted = server.wait_events("auth_accepted", 1);
    assert_eq!(accepted.len(), 1, "{accepted:?}");
    assert_eq!(
        refused[0]["key_fingerprint"],
        accepted[0]["key_fingerprint"]
    );

    // OpenSSH: limited to ssh-rsa it finds no signature algorithm in common and cannot log in;
    // with rsa-sha2-256 it can. What the server offers (host keys, server-sig-algs) has no ssh-rsa.
    let sftp = |algorithms: &str| {
        server
            .sftp_spawn(
                "acme",
                &rsa,
                "ls\n",
                &[
                    "-o",
                    &format!("PubkeyAcceptedAlgorithms={algorithms}"),
                    "-vv",
                ],
            )
            .wait_with_output()
            .unwrap()
    };
    let output = sftp("ssh-rsa");
    assert_failure(&output, "OpenSSH with ssh-rsa only");
    let log = text(&output);
    assert!(log.contains("no mutual signature algorithm"), "{log}");
    let output = sftp("rsa-sha2-256");
    assert_success(&output, "OpenSSH with rsa-sha2-256");
    let log = text(&output);
    let host_keys = vv_names(
        &log,
        "peer server KEXINIT proposal",
        "host key algorithms: ",
    );
    assert_eq!(host_keys, ["ssh-ed25519"], "{log}");
    let sig_algs = vv_names(&log, "kex_input_ext_info", "server-sig-algs=");
    assert!(sig_algs.iter().any(|name| name == "rsa-sha2-256"), "{log}");
    assert!(!sig_algs.iter().any(|name| name == "ssh-rsa"), "{log}");
    assert_eq!(server.events("auth_accepted").len(), 2);
}

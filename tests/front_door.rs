//! The front door, driven by real clients: OpenSSH sftp and scp, curl (libssh2), against the real
//! binary, with landing on a local folder and on S3 (moto).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::Path;

use common::*;

struct Setup {
    keys: tempfile::TempDir,
    acme: Key,
    other: Key,
}

fn setup(test: &str) -> Option<Setup> {
    if !require("sftp", test) || !require("ssh-keygen", test) {
        return None;
    }
    let keys = tempfile::tempdir().unwrap();
    let acme = keygen(keys.path(), "acme_key", &["-t", "ed25519"]);
    let other = keygen(keys.path(), "other_key", &["-t", "ed25519"]);
    Some(Setup { keys, acme, other })
}

fn acme<'a>(setup: &'a Setup) -> UserSpec<'a> {
    UserSpec::new("acme", &setup.acme)
}

/// Uploads 0 B, 1 B, 1 MiB and 200 MiB with sftp and checks every byte and the recorded sha256.
fn byte_exact_uploads(landing: Landing, test: &str) {
    let Some(setup) = setup(test) else { return };
    let server = Server::start(&[acme(&setup)], "", landing);
    let sizes: [(&str, u64); 4] = [
        ("empty.bin", 0),
        ("one.bin", 1),
        ("mib.bin", 1 << 20),
        ("big.bin", 200 << 20),
    ];
    let mut script = String::from("mkdir sub\n");
    for (index, (name, size)) in sizes.iter().enumerate() {
        random_file(&setup.keys.path().join(name), *size, index as u64);
        script.push_str(&format!(
            "put {} sub/{name}\n",
            setup.keys.path().join(name).display()
        ));
    }
    assert_success(&server.sftp("acme", &setup.acme, &script), "sftp uploads");
    let closes = server.events("close");
    let jobs = server.jobs();
    assert_eq!(jobs.len(), sizes.len(), "{jobs:?}");
    for (name, size) in sizes {
        let local = setup.keys.path().join(name);
        let landed = server
            .landed("acme", &format!("sub/{name}"))
            .unwrap_or_else(|| panic!("{name} did not land"));
        assert_eq!(landed.len() as u64, size, "{name}");
        let expected = sha256_file(&local);
        assert_eq!(
            ingestion::storage::hex(&<sha2::Sha256 as sha2::Digest>::digest(&landed)),
            expected,
            "{name} bytes differ"
        );
        let close = closes
            .iter()
            .find(|e| e["path"] == format!("/sub/{name}"))
            .unwrap_or_else(|| panic!("no close event for {name}"));
        assert_eq!(close["sha256"], expected.as_str());
        assert_eq!(close["bytes"], size);
        let job = jobs
            .iter()
            .find(|job| job.path == format!("sub/{name}"))
            .unwrap_or_else(|| panic!("no job for {name}: {jobs:?}"));
        assert_eq!(
            (job.id, job.size, job.sha256.as_str(), job.state.as_str()),
            (
                close["job"].as_i64().unwrap(),
                size,
                expected.as_str(),
                "landed"
            )
        );
        assert_eq!(job.username, "acme");
    }
    let listing = server.landing_listing();
    assert!(
        listing
            .iter()
            .all(|key| !key.contains('#') && !key.starts_with("MULTIPART")),
        "leftover staging objects: {listing:?}"
    );
}

#[test]
fn sftp_uploads_are_byte_exact_on_local_disk() {
    byte_exact_uploads(Landing::Local, "sftp_uploads_are_byte_exact_on_local_disk");
}

#[test]
fn sftp_uploads_are_byte_exact_on_s3() {
    let test = "sftp_uploads_are_byte_exact_on_s3";
    if !require_python("moto.server", test) || !require_python("boto3", test) {
        return;
    }
    let moto = Moto::start(&["landing-bucket", "landing-bucket-quarantine"]);
    byte_exact_uploads(
        Landing::S3 {
            endpoint: moto.endpoint.clone(),
            bucket: "landing-bucket".into(),
        },
        test,
    );
}

#[test]
fn scp_and_curl_upload() {
    let test = "scp_and_curl_upload";
    let Some(setup) = setup(test) else { return };
    if !require("scp", test) || !require("curl", test) {
        return;
    }
    let server = Server::start(&[acme(&setup)], "", Landing::Local);
    let file = setup.keys.path().join("data.csv");
    random_file(&file, 300_000, 7);
    assert_success(
        &server.scp_upload("acme", &setup.acme, &file, "/via scp.csv"),
        "scp",
    );
    assert_success(
        &server.curl_upload("acme", &setup.acme, &file, "via%20curl.csv"),
        "curl",
    );
    for name in ["via scp.csv", "via curl.csv"] {
        assert_eq!(
            server.landed("acme", name).unwrap(),
            std::fs::read(&file).unwrap(),
            "{name}"
        );
    }
}

#[test]
fn names_are_stored_exactly_and_control_characters_refused() {
    let test = "names_are_stored_exactly_and_control_characters_refused";
    let Some(setup) = setup(test) else { return };
    if !require("curl", test) {
        return;
    }
    let server = Server::start(&[acme(&setup)], "", Landing::Local);
    let file = setup.keys.path().join("x");
    std::fs::write(&file, b"content").unwrap();
    let names = [
        "my report (final).csv",
        "données €.csv",
        "a;b&c|d$(e)`f`'g\".csv",
        "50%.csv",
    ];
    let script: String = names
        .iter()
        .map(|name| format!("put {} \"{}\"\n", file.display(), name.replace('"', "\\\"")))
        .collect();
    assert_success(
        &server.sftp("acme", &setup.acme, &script),
        "sftp with odd names",
    );
    for name in names {
        assert_eq!(
            server.landed("acme", name).as_deref(),
            Some(&b"content"[..]),
            "{name}"
        );
    }
    // curl decodes %0A into a newline in the remote name: the server must refuse it.
    let output = server.curl_upload("acme", &setup.acme, &file, "bad%0Aname.csv");
    assert_failure(&output, "upload of a name with a newline");
    let long = "n".repeat(1100);
    let output = server.sftp(
        "acme",
        &setup.acme,
        &format!("put {} {long}\n", file.display()),
    );
    assert_failure(&output, "upload of a 1100-byte name");
    assert!(server.landed("acme", &long).is_none());
}

#[test]
fn wrong_key_is_refused_and_audited() {
    let Some(setup) = setup("wrong_key_is_refused_and_audited") else {
        return;
    };
    let server = Server::start(&[acme(&setup)], "", Landing::Local);
    let output = server.sftp("acme", &setup.other, "ls\n");
    assert_failure(&output, "login with another user's key");
    let refused = server.events("auth_refused");
    assert!(
        refused
            .iter()
            .any(|e| e["user"] == "acme" && e["reason"].as_str().unwrap().contains("not one of")),
        "{refused:?}"
    );
    assert!(server.events("auth_accepted").is_empty());
}

#[test]
fn right_key_from_a_disallowed_address_is_refused() {
    let Some(setup) = setup("right_key_from_a_disallowed_address_is_refused") else {
        return;
    };
    let mut nobody = acme(&setup);
    nobody.name = "nobody";
    nobody.keys = vec![&setup.other];
    nobody.allowed_ips = vec![];
    let server = Server::start(&[acme(&setup), nobody], "", Landing::Local);
    let output = server.sftp_from("acme", &setup.acme, "ls\n", Some("127.0.0.2"));
    assert_failure(&output, "login from 127.0.0.2");
    let output = server.sftp("nobody", &setup.other, "ls\n");
    assert_failure(&output, "login of a user without allowed_ips");
    let refused = server.events("ip_refused");
    assert!(
        refused
            .iter()
            .any(|e| e["user"] == "acme" && e["ip"] == "127.0.0.2"),
        "{refused:?}"
    );
    assert!(refused.iter().any(|e| e["user"] == "nobody"), "{refused:?}");
    assert_success(
        &server.sftp("acme", &setup.acme, "ls\n"),
        "login from the allowed address",
    );
}

#[test]
fn rsa_and_ecdsa_keys_work_and_password_is_not_offered() {
    let test = "rsa_and_ecdsa_keys_work_and_password_is_not_offered";
    let Some(setup) = setup(test) else { return };
    let rsa = keygen(setup.keys.path(), "rsa_key", &["-t", "rsa", "-b", "3072"]);
    let ecdsa = keygen(
        setup.keys.path(),
        "ecdsa_key",
        &["-t", "ecdsa", "-b", "256"],
    );
    let mut user = acme(&setup);
    user.keys = vec![&rsa, &ecdsa];
    let server = Server::start(&[user], "", Landing::Local);
    assert_success(
        &server.sftp("acme", &rsa, "ls\n"),
        "login with RSA (rsa-sha2)",
    );
    assert_success(&server.sftp("acme", &ecdsa, "ls\n"), "login with ECDSA");
    let output = std::process::Command::new("ssh")
        .args([
            "-v",
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "PubkeyAuthentication=no",
        ])
        .arg("-o")
        .arg(format!(
            "UserKnownHostsFile={}",
            server.known_hosts().display()
        ))
        .args(["-p", &server.port.to_string(), "acme@127.0.0.1", "true"])
        .output()
        .unwrap();
    assert_failure(&output, "login without a key");
    let log = text(&output);
    assert!(
        log.contains("Authentications that can continue: publickey\n")
            || log.contains("Authentications that can continue: publickey\r"),
        "{log}"
    );
}

#[test]
fn the_home_is_a_jail() {
    let Some(setup) = setup("the_home_is_a_jail") else {
        return;
    };
    let mut other = acme(&setup);
    other.name = "other";
    other.keys = vec![&setup.other];
    let server = Server::start(&[acme(&setup), other], "", Landing::Local);
    let file = setup.keys.path().join("secret.txt");
    std::fs::write(&file, b"other's data").unwrap();
    assert_success(
        &server.sftp(
            "other",
            &setup.other,
            &format!("put {} secret.txt\n", file.display()),
        ),
        "other's upload",
    );

    // Each line is its own batch: sftp -b stops at the first failing command.
    for attempt in [
        format!("put {} ../escape.txt", file.display()),
        format!("put {} /../other/escape.txt", file.display()),
        format!("put {} ../../../../tmp/escape.txt", file.display()),
        "get ../other/secret.txt /dev/null".to_string(),
        "ls ..".to_string(),
        "ls /../other".to_string(),
        "rename ../other/secret.txt mine.txt".to_string(),
        "rm ../other/secret.txt".to_string(),
        "ln -s /etc/passwd passwd".to_string(),
        "ln secret.txt hard".to_string(),
        "get /etc/passwd /dev/null".to_string(),
    ] {
        let output = server.sftp("acme", &setup.acme, &format!("{attempt}\n"));
        assert_failure(&output, &attempt);
    }
    // cd .. at the root stays at the root, which holds only acme's own (empty) home.
    let output = server.sftp("acme", &setup.acme, "cd ..\npwd\nls -la\n");
    assert_success(&output, "cd .. at the root");
    let listing = text(&output);
    assert!(listing.contains("Remote working directory: /"), "{listing}");
    assert!(
        !listing.contains("secret") && !listing.contains("other"),
        "{listing}"
    );
    assert_eq!(
        server.landed("other", "secret.txt").unwrap(),
        b"other's data"
    );
    let keys = server.landing_listing();
    assert_eq!(
        keys,
        ["other/secret.txt"],
        "nothing escaped or moved: {keys:?}"
    );
}

/// A file goes into a folder made with mkdir (at any depth), into a folder that holds stored
/// objects without having been made (files put into the bucket by other means), or is refused
/// with a message saying what is wrong with the folder.
#[test]
fn uploads_need_an_existing_folder() {
    let test = "uploads_need_an_existing_folder";
    let Some(setup) = setup(test) else { return };
    if !require("python3", test) || !require_python("paramiko", test) {
        return;
    }
    let server = Server::start(&[acme(&setup)], "", Landing::Local);
    assert_success(
        &server.sftp("acme", &setup.acme, "mkdir in\nmkdir in/deep\n"),
        "mkdir",
    );
    // Stored below `legacy/` by other means than this service: a folder all the same.
    let legacy = server.dir.path().join("buckets/landing/acme/legacy");
    std::fs::create_dir_all(&legacy).unwrap();
    std::fs::write(legacy.join("old.csv"), b"old\n").unwrap();
    let outcomes = server.paramiko_uploads(
        &setup.acme,
        &[
            "top.csv",
            "in/a.csv",
            "in/deep/b.csv",
            "legacy/new.csv",
            "missing/c.csv",
            "in/missing/d.csv",
            "top.csv/e.csv",
        ],
    );
    assert_eq!(
        outcomes,
        [
            "top.csv ok",
            "in/a.csv ok",
            "in/deep/b.csv ok",
            "legacy/new.csv ok",
            "missing/c.csv refused: the folder /missing does not exist; create it first (mkdir)",
            "in/missing/d.csv refused: the folder /in/missing does not exist; create it first (mkdir)",
            "top.csv/e.csv refused: /top.csv is a file, not a folder",
        ]
    );
    assert_eq!(
        server.landing_listing(),
        [
            "acme/in/a.csv",
            "acme/in/deep/b.csv",
            "acme/legacy/new.csv",
            "acme/legacy/old.csv",
            "acme/top.csv"
        ]
    );
}

#[test]
fn uploads_cannot_be_read_back_but_can_be_managed() {
    let Some(setup) = setup("uploads_cannot_be_read_back_but_can_be_managed") else {
        return;
    };
    let server = Server::start(&[acme(&setup)], "", Landing::Local);
    let file = setup.keys.path().join("a.csv");
    std::fs::write(&file, b"1,2,3\n").unwrap();
    let script = format!(
        "mkdir in\nput {f} in/a.csv\nput {f} in/stray.csv\nrename in/a.csv in/b.csv\nrm in/stray.csv\nls -l in\nmkdir empty\nrmdir empty\n",
        f = file.display()
    );
    let output = server.sftp("acme", &setup.acme, &script);
    assert_success(&output, "manage own files");
    let listing = text(&output);
    let files: Vec<&str> = listing
        .lines()
        .filter(|line| line.starts_with('-'))
        .collect();
    assert!(
        files.len() == 1 && files[0].ends_with(" b.csv"),
        "{listing}"
    );
    assert!(
        listing.contains("--w-------"),
        "uploads show as write-only: {listing}"
    );
    let output = server.sftp("acme", &setup.acme, "get in/b.csv /dev/null\n");
    assert_failure(&output, "reading back an upload");
    assert!(
        text(&output).to_lowercase().contains("permission denied"),
        "{}",
        text(&output)
    );
    assert_eq!(server.landing_listing(), ["acme/in/b.csv"]);
    // Regression: a rename onto itself (posix-rename) used to mark the file's job removed.
    assert_success(
        &server.sftp("acme", &setup.acme, "rename in/b.csv in/b.csv\n"),
        "rename onto itself",
    );
    assert_eq!(server.landing_listing(), ["acme/in/b.csv"]);
    let jobs = server.jobs();
    assert!(
        jobs.iter()
            .any(|job| job.path == "in/b.csv" && job.state.as_str() == "landed"),
        "{jobs:#?}"
    );
    let events: Vec<String> = server
        .audit()
        .iter()
        .map(|e| e["event"].as_str().unwrap().to_string())
        .collect();
    // The audit chain verifies, and one changed byte breaks it at that line.
    assert_success(&server.cli(&["audit", "verify"]), "audit verify");
    let log = server.dir.path().join("state/audit.jsonl");
    let original = std::fs::read_to_string(&log).unwrap();
    let tampered = original.replacen("\"event\":\"rename\"", "\"event\":\"renamE\"", 1);
    assert_ne!(original, tampered);
    std::fs::write(&log, &tampered).unwrap();
    let broken = server.cli(&["audit", "verify"]);
    assert_failure(&broken, "audit verify after tampering");
    assert!(
        text(&broken).contains("edited, removed or reordered"),
        "{}",
        text(&broken)
    );
    std::fs::write(&log, &original).unwrap();
    for expected in [
        "connect",
        "auth_accepted",
        "mkdir",
        "open",
        "close",
        "rename",
        "remove",
        "rmdir",
        "disconnect",
    ] {
        assert!(
            events.iter().any(|e| e == expected),
            "no {expected} event in {events:?}"
        );
    }
}

#[test]
fn max_file_size_is_enforced_while_bytes_arrive() {
    let Some(setup) = setup("max_file_size_is_enforced_while_bytes_arrive") else {
        return;
    };
    let server = Server::start(&[acme(&setup)], "max_file_size = \"1 MiB\"", Landing::Local);
    let file = setup.keys.path().join("big.bin");
    random_file(&file, 3 << 20, 1);
    let output = server.sftp(
        "acme",
        &setup.acme,
        &format!("put {} big.bin\n", file.display()),
    );
    assert_failure(&output, "upload over max_file_size");
    assert!(
        server.landing_listing().is_empty(),
        "{:?}",
        server.landing_listing()
    );
    let aborted = server.events("upload_aborted");
    assert!(
        aborted.iter().any(|e| e["reason"]
            .as_str()
            .unwrap()
            .contains("maximum upload size")),
        "{aborted:?}"
    );
    let small = setup.keys.path().join("small.bin");
    random_file(&small, 1 << 20, 2);
    assert_success(
        &server.sftp(
            "acme",
            &setup.acme,
            &format!("put {} small.bin\n", small.display()),
        ),
        "upload at the limit",
    );
}

#[test]
fn egress_users_see_upload_and_a_read_only_download() {
    let Some(setup) = setup("egress_users_see_upload_and_a_read_only_download") else {
        return;
    };
    let egress_dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(egress_dir.path().join("reports")).unwrap();
    let report = egress_dir.path().join("reports/monthly report.csv");
    random_file(&report, 3 << 20, 9);
    let mut user = acme(&setup);
    user.egress = Some(format!("file://{}", egress_dir.path().display()));
    let server = Server::start(&[user], "", Landing::Local);

    let output = server.sftp("acme", &setup.acme, "ls -1 /\nls -1 /download/reports\n");
    assert_success(&output, "egress listing");
    let listing = text(&output);
    assert!(
        listing.contains("upload") && listing.contains("download"),
        "{listing}"
    );
    assert!(listing.contains("monthly report.csv"), "{listing}");

    let copy = setup.keys.path().join("copy.csv");
    let output = server.sftp(
        "acme",
        &setup.acme,
        &format!(
            "get \"/download/reports/monthly report.csv\" {}\n",
            copy.display()
        ),
    );
    assert_success(&output, "egress download");
    assert_eq!(sha256_file(&copy), sha256_file(&report));

    let upload = setup.keys.path().join("up.csv");
    std::fs::write(&upload, b"x").unwrap();
    for attempt in [
        format!("put {} /download/new.csv", upload.display()),
        "mkdir /download/new".to_string(),
        "rm \"/download/reports/monthly report.csv\"".to_string(),
        format!("put {} /top-level.csv", upload.display()),
    ] {
        assert_failure(
            &server.sftp("acme", &setup.acme, &format!("{attempt}\n")),
            &attempt,
        );
    }
    assert!(report.exists());
    assert!(!egress_dir.path().join("new.csv").exists());
    assert_success(
        &server.sftp(
            "acme",
            &setup.acme,
            &format!("put {} /upload/up.csv\n", upload.display()),
        ),
        "egress user upload",
    );
    assert_eq!(server.landed("acme", "up.csv").unwrap(), b"x");
}

#[test]
fn egress_download_from_s3() {
    let test = "egress_download_from_s3";
    let Some(setup) = setup(test) else { return };
    if !require_python("moto.server", test) || !require_python("boto3", test) {
        return;
    }
    let moto = Moto::start(&[
        "landing-bucket",
        "landing-bucket-quarantine",
        "egress-bucket",
    ]);
    let report = setup.keys.path().join("report.bin");
    random_file(&report, 20 << 20, 5);
    moto.put("egress-bucket", "acme/out/report.bin", &report);
    let mut user = acme(&setup);
    user.egress = Some("s3://egress-bucket/acme".into());
    let server = Server::start(
        &[user],
        "",
        Landing::S3 {
            endpoint: moto.endpoint.clone(),
            bucket: "landing-bucket".into(),
        },
    );
    let copy = setup.keys.path().join("copy.bin");
    let output = server.sftp(
        "acme",
        &setup.acme,
        &format!(
            "ls /download/out\nget /download/out/report.bin {}\n",
            copy.display()
        ),
    );
    assert_success(&output, "download from S3 egress");
    assert_eq!(sha256_file(&copy), sha256_file(&report));
}

#[test]
fn invalid_configuration_stops_the_start_with_file_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("ingestion.toml");
    std::fs::write(&config, "[server]\nmax_file_size = \"lots\"\n[buckets]\nlanding = \"/tmp/l\"\nquarantine = \"/tmp/q\"\n").unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_ingestion"))
        .args(["serve", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert_failure(&output, "serve with a bad config");
    let message = text(&output);
    assert!(
        message.contains("ingestion.toml:2:17") && message.contains("server.max_file_size"),
        "{message}"
    );
    assert!(
        !Path::new(&dir.path().join("state")).exists(),
        "nothing may be created by a failed start"
    );
}

#[test]
fn an_address_that_keeps_failing_is_banned_while_others_log_in() {
    let Some(setup) = setup("an_address_that_keeps_failing_is_banned_while_others_log_in") else {
        return;
    };
    let mut user = acme(&setup);
    user.allowed_ips = vec!["127.0.0.1/32", "127.0.0.2/32"];
    let server = Server::launch(
        &[user],
        "",
        &format!(
            "{NO_SCANNER}[limits]\npenalty_after = 3\npenalty_base = \"60s\"\nauth_timeout = \"2s\"\n"
        ),
        Landing::Local,
        &[],
    );
    for attempt in 0..3 {
        let output = server.sftp_from("acme", &setup.other, "ls\n", Some("127.0.0.2"));
        assert_failure(&output, &format!("wrong key, attempt {attempt}"));
    }
    // Banned now: even the right key from that address is turned away before SSH starts.
    let output = server.sftp_from("acme", &setup.acme, "ls\n", Some("127.0.0.2"));
    assert_failure(&output, "the right key from a banned address");
    let refused = server.events("connection_refused");
    assert!(
        refused
            .iter()
            .any(|e| e["ip"] == "127.0.0.2" && e["reason"].as_str().unwrap().contains("banned")),
        "{refused:?}"
    );
    assert_success(
        &server.sftp("acme", &setup.acme, "ls\n"),
        "the same user from another address",
    );

    // A connection that never logs in is closed after auth_timeout.
    use std::io::{Read, Write};
    let mut idle = std::net::TcpStream::connect(("127.0.0.1", server.port)).unwrap();
    idle.write_all(b"SSH-2.0-idle\r\n").unwrap();
    idle.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    let started = std::time::Instant::now();
    let mut buffer = [0u8; 4096];
    loop {
        match idle.read(&mut buffer) {
            Ok(0) | Err(_) => break,
            Ok(_) => continue,
        }
    }
    assert!(
        started.elapsed() < std::time::Duration::from_secs(9),
        "the idle connection was not closed"
    );
    wait_until(10, "the auth_timeout audit event", || {
        (server.events("auth_timeout").len() == 1).then_some(())
    });
}

/// Behind a load balancer that sends the PROXY protocol, the client's address (not the
/// balancer's) is what allow-lists, bans and the audit log see; a trusted balancer's connection
/// without a header is refused, and a silent health check is neither served nor counted.
#[test]
fn behind_a_proxy_protocol_balancer_the_client_address_counts() {
    let test = "behind_a_proxy_protocol_balancer_the_client_address_counts";
    let Some(setup) = setup(test) else { return };
    if !require("python3", test) {
        return;
    }
    let mut user = acme(&setup);
    user.allowed_ips = vec!["203.0.113.0/24"];
    let server = Server::start(
        &[user],
        "proxy_protocol_from = [\"127.0.0.1/32\"]",
        Landing::Local,
    );
    let relay = |version: &str, client: &str| {
        format!(
            "ProxyCommand=python3 {}/tests/peers/proxy_relay.py 127.0.0.1 {} {version} {client}",
            env!("CARGO_MANIFEST_DIR"),
            server.port
        )
    };
    let file = setup.keys.path().join("data.csv");
    std::fs::write(&file, b"a,b\n").unwrap();
    let script = format!("put {} data.csv\n", file.display());

    // A health check: connect, close, nothing sent.
    drop(std::net::TcpStream::connect(("127.0.0.1", server.port)).unwrap());
    // Straight from the balancer's address, without a header: refused.
    assert_failure(
        &server.sftp("acme", &setup.acme, &script),
        "no PROXY header",
    );
    let refused = wait_until(10, "the refusal audited", || {
        server.events("connection_refused").first().cloned()
    });
    assert!(
        refused["reason"]
            .as_str()
            .unwrap()
            .contains("PROXY protocol header"),
        "{refused}"
    );
    assert_eq!(
        server.events("connection_refused").len(),
        1,
        "the health check is not refused"
    );

    for (version, client) in [("1", "203.0.113.7"), ("2", "203.0.113.8")] {
        let output = server
            .sftp_spawn(
                "acme",
                &setup.acme,
                &script,
                &["-o", &relay(version, client)],
            )
            .wait_with_output()
            .unwrap();
        assert_success(
            &output,
            &format!("upload through a version {version} header"),
        );
        let connected: Vec<_> = server
            .events("auth_accepted")
            .into_iter()
            .filter(|event| event["ip"] == client)
            .collect();
        assert_eq!(connected.len(), 1, "{:?}", server.events("auth_accepted"));
    }
    // An address outside the user's allow-list, claimed through the balancer: refused.
    let output = server
        .sftp_spawn(
            "acme",
            &setup.acme,
            &script,
            &["-o", &relay("2", "198.51.100.9")],
        )
        .wait_with_output()
        .unwrap();
    assert_failure(&output, "a client outside the allow-list");
    assert!(
        server
            .audit()
            .iter()
            .any(|event| event["ip"] == "198.51.100.9" && event["event"] != "auth_accepted"),
        "{:?}",
        server.audit()
    );
    assert_eq!(server.jobs().len(), 2);
}

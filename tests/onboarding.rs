//! Onboarding as an operator does it: `user add` → `check` → `reload` → the supplier logs in with
//! OpenSSH; every refusal leaves the users folder untouched; policies parse as the guide's JSON.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::process::{Command, Stdio};

use common::*;
use serde_json::json;

fn ingestion(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_ingestion"))
        .args(args)
        .output()
        .unwrap()
}

fn users_folder(server: &Server) -> Vec<(String, String)> {
    let mut files: Vec<(String, String)> = std::fs::read_dir(server.dir.path().join("users"))
        .unwrap()
        .map(|entry| {
            let path = entry.unwrap().path();
            (
                path.display().to_string(),
                std::fs::read_to_string(&path).unwrap(),
            )
        })
        .collect();
    files.sort();
    files
}

fn add_args<'a>(username: &'a str, key: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "user",
        "add",
        "--username",
        username,
        "--name",
        "Jane Doe",
        "--ssh-key",
        key,
        "--ip",
        "127.0.0.1/32",
    ];
    if !extra.contains(&"--email") {
        args.extend(["--email", "jane.doe@acme.example"]);
    }
    if !extra.contains(&"--destination") {
        args.extend(["--destination", "s3://team-bucket/acme/deliveries"]);
    }
    args.extend(extra);
    args
}

#[test]
fn user_add_then_check_then_reload_lets_the_supplier_log_in() {
    let test = "user_add_then_check_then_reload_lets_the_supplier_log_in";
    if !require("sftp", test) || !require("ssh-keygen", test) {
        return;
    }
    let keys = tempfile::tempdir().unwrap();
    let ed25519 = keygen(keys.path(), "jane_ed25519", &["-t", "ed25519"]);
    let rsa = keygen(keys.path(), "jane_rsa", &["-t", "rsa", "-b", "3072"]);
    // The RSA key arrives in RFC 4716 form, as some Windows tools export it.
    let exported = Command::new("ssh-keygen")
        .args(["-e", "-f"])
        .arg(format!("{}.pub", rsa.private.display()))
        .output()
        .unwrap();
    assert_success(&exported, "ssh-keygen -e");
    let rfc4716 = String::from_utf8(exported.stdout).unwrap();
    assert!(rfc4716.contains("BEGIN SSH2 PUBLIC KEY"));

    let server = Server::launch(
        &[],
        "public_host = \"sftp.example.org\"",
        NO_SCANNER,
        Landing::Local,
        &[],
    );
    assert_failure(
        &server.sftp("acme", &ed25519, "ls\n"),
        "login before onboarding",
    );

    let pub_file = format!("{}.pub", ed25519.private.display());
    let kms = "arn:aws:kms:eu-west-2:123456789012:key/11111111-2222-3333-4444-555555555555";
    let added = server.cli(&add_args(
        "acme",
        &pub_file,
        &[
            "--ssh-key",
            &rfc4716,
            "--kms-key",
            kms,
            "--env",
            "development",
        ],
    ));
    assert_success(&added, "user add");
    let printed = text(&added);
    assert!(
        printed.contains("arn:aws:iam::730335344807:role/transfer"),
        "{printed}"
    );
    assert!(
        printed.contains("\"arn:aws:s3:::team-bucket/*\""),
        "{printed}"
    );
    assert!(printed.contains("kms:GenerateDataKey"), "{printed}");
    assert!(
        printed.contains(&format!("sftp -P {} acme@sftp.example.org", server.port)),
        "{printed}"
    );
    assert!(
        printed.contains("host key fingerprint is SHA256:"),
        "{printed}"
    );

    assert_success(&server.cli(&["check"]), "check after user add");
    let listed = text(&server.cli(&["user", "list"]));
    assert!(
        listed.contains("acme") && listed.contains("Jane Doe <jane.doe@acme.example>"),
        "{listed}"
    );
    assert_eq!(listed.matches("SHA256:").count(), 2, "{listed}");

    assert_success(&server.cli(&["reload"]), "reload");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while server.events("users_reloaded").is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "no reload: {}",
            server.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert_success(
        &server.sftp("acme", &ed25519, "ls\n"),
        "login with the Ed25519 key",
    );
    assert_success(
        &server.sftp("acme", &rsa, "ls\n"),
        "login with the RSA key given as RFC 4716",
    );
    assert_eq!(server.events("user_added").len(), 1);
    // The CLI copies its line to the state database too, where every node's events are found.
    let copied = server.query(|state| async move { state.recent_events(1000).await.unwrap() });
    let added: Vec<_> = copied
        .iter()
        .filter(|event| event.event == "user_added")
        .collect();
    assert_eq!(added.len(), 1, "{copied:?}");
    assert!(
        added[0].line.contains("\"username\":\"acme\""),
        "{}",
        added[0].line
    );
}

#[test]
fn bad_onboarding_requests_are_refused_and_nothing_is_written() {
    let test = "bad_onboarding_requests_are_refused_and_nothing_is_written";
    if !require("ssh-keygen", test) {
        return;
    }
    let keys = tempfile::tempdir().unwrap();
    let taken = keygen(keys.path(), "taken", &["-t", "ed25519"]);
    let fresh = keygen(keys.path(), "fresh", &["-t", "ed25519"]);
    let weak = keygen(keys.path(), "weak", &["-t", "rsa", "-b", "1024"]);
    let server = Server::launch(
        &[UserSpec::new("existing", &taken)],
        "",
        NO_SCANNER,
        Landing::Local,
        &[],
    );
    let before = users_folder(&server);
    let fresh_pub = format!("{}.pub", fresh.private.display());
    let taken_pub = format!("{}.pub", taken.private.display());
    let weak_pub = format!("{}.pub", weak.private.display());
    let private = fresh.private.display().to_string();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (add_args("existing", &fresh_pub, &[]), "already exists"),
        (
            add_args("acme", &taken_pub, &[]),
            "already used by user `existing`",
        ),
        (add_args("acme", &private, &[]), "PRIVATE key"),
        (add_args("acme", &weak_pub, &[]), "at least 2048"),
        (
            add_args("acme", "ssh-ed25519 not-base64", &[]),
            "not an OpenSSH public key",
        ),
        (add_args("Acme!", &fresh_pub, &[]), "not a valid username"),
        (
            add_args("acme", &fresh_pub, &["--ip", "0.0.0.0/0"]),
            "--allow-any-ip",
        ),
        (
            add_args("acme", &fresh_pub, &["--ip", "10.0.0.1/8"]),
            "did you mean \"10.0.0.0/8\"",
        ),
        (
            add_args("acme", &fresh_pub, &["--destination", "s3://Bad_Bucket"]),
            "not a valid S3 bucket name",
        ),
        (
            add_args(
                "acme",
                &fresh_pub,
                &["--destination", "buckets/landing/acme"],
            ),
            "overlaps buckets.landing",
        ),
        (
            add_args("acme", &fresh_pub, &["--kms-key", "key-123"]),
            "not a KMS key ARN",
        ),
        (
            add_args("acme", &fresh_pub, &["--email", "jane"]),
            "not an email address",
        ),
        (
            add_args(
                "acme",
                &fresh_pub,
                &["--egress-location", "buckets/landing"],
            ),
            "overlaps buckets.landing",
        ),
    ];
    for (args, expected) in cases {
        let output = server.cli(&args);
        assert_failure(&output, &format!("{args:?}"));
        assert!(
            text(&output).contains(expected),
            "{args:?}: expected {expected:?} in {}",
            text(&output)
        );
        assert_eq!(
            users_folder(&server),
            before,
            "{args:?} changed the users folder"
        );
    }
    // A shared inbox and a private range are accepted with warnings.
    let output = server.cli(&add_args(
        "acme",
        &fresh_pub,
        &["--email", "info@acme.example", "--ip", "10.20.0.0/16"],
    ));
    assert_success(&output, "user add with warnings");
    let printed = text(&output);
    assert!(
        printed.contains("shared inbox") && printed.contains("private or local range"),
        "{printed}"
    );
    assert_success(&server.cli(&["user", "remove", "acme"]), "user remove");
    assert_eq!(users_folder(&server), before);
}

#[test]
fn reload_adds_and_removes_users_while_an_upload_continues() {
    let test = "reload_adds_and_removes_users_while_an_upload_continues";
    if !require("sftp", test) || !require("ssh-keygen", test) {
        return;
    }
    let keys = tempfile::tempdir().unwrap();
    let acme = keygen(keys.path(), "acme", &["-t", "ed25519"]);
    let carol = keygen(keys.path(), "carol", &["-t", "ed25519"]);
    let bob = keygen(keys.path(), "bob", &["-t", "ed25519"]);
    let server = Server::launch(
        &[UserSpec::new("acme", &acme), UserSpec::new("carol", &carol)],
        "",
        NO_SCANNER,
        Landing::Local,
        &[],
    );
    let file = keys.path().join("slow.bin");
    random_file(&file, 3 << 20, 8);
    // 3 MiB at 4 Mbit/s: about six seconds in flight.
    let upload = server.sftp_spawn(
        "acme",
        &acme,
        &format!("put {} slow.bin\n", file.display()),
        &["-l", "4000"],
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while server.events("open").is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "the upload never started"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let bob_pub = format!("{}.pub", bob.private.display());
    assert_success(&server.cli(&add_args("bob", &bob_pub, &[])), "user add bob");
    assert_success(
        &server.cli(&["user", "remove", "carol"]),
        "user remove carol",
    );
    assert_success(&server.cli(&["reload"]), "reload");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while server.events("users_reloaded").is_empty() {
        assert!(std::time::Instant::now() < deadline, "no reload");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_success(
        &server.sftp("bob", &bob, "ls\n"),
        "bob logs in after the reload",
    );
    assert_failure(&server.sftp("carol", &carol, "ls\n"), "carol was removed");
    assert!(
        server.events("close").is_empty(),
        "the upload should still be in flight for this test to mean anything"
    );

    // An invalid user file: the reload is rejected whole and the previous users stay.
    std::fs::write(
        server.dir.path().join("users/broken.toml"),
        "username = \"broken\"\nthis is not toml\n",
    )
    .unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(server.child.id()).unwrap()),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while server.events("reload_rejected").is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "the broken reload was not reported"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(
        server.events("reload_rejected")[0]["error"]
            .as_str()
            .unwrap()
            .contains("broken.toml")
    );
    assert_success(
        &server.sftp("bob", &bob, "ls\n"),
        "bob still logs in after a rejected reload",
    );
    assert_failure(
        &server.cli(&["reload"]),
        "reload refuses to signal with an invalid configuration",
    );

    let finished = upload.wait_with_output().unwrap();
    assert_success(&finished, "the upload in flight during the reloads");
    assert_eq!(
        server.landed("acme", "slow.bin").unwrap(),
        std::fs::read(&file).unwrap()
    );
}

#[test]
fn policy_statements_match_the_onboarding_guide() {
    let expected_bucket = |account: &str| {
        json!({
            "Sid": "AllowAnalyticalPlatformIngestionService",
            "Effect": "Allow",
            "Principal": { "AWS": format!("arn:aws:iam::{account}:role/transfer") },
            "Action": [
                "s3:AbortMultipartUpload", "s3:DeleteObject", "s3:GetObject", "s3:GetObjectAcl",
                "s3:ListBucket", "s3:PutObject", "s3:PutObjectAcl", "s3:PutObjectTagging"
            ],
            "Resource": ["arn:aws:s3:::mojap-land", "arn:aws:s3:::mojap-land/*"]
        })
    };
    let expected_kms = |account: &str| {
        json!({
            "Sid": "AllowAnalyticalPlatformIngestionService",
            "Effect": "Allow",
            "Principal": { "AWS": format!("arn:aws:iam::{account}:role/transfer") },
            "Action": ["kms:GenerateDataKey", "kms:Encrypt", "kms:Decrypt"],
            "Resource": "*"
        })
    };
    let parse = |args: &[&str]| -> serde_json::Value {
        let output = ingestion(args);
        assert_success(&output, &format!("{args:?}"));
        serde_json::from_slice(&output.stdout).unwrap()
    };
    for (env, account) in [
        ("production", "471112983409"),
        ("development", "730335344807"),
    ] {
        let bucket = parse(&["policy", "bucket", "--bucket", "mojap-land", "--env", env]);
        let expected = expected_bucket(account);
        for field in ["Sid", "Effect", "Principal", "Action", "Resource"] {
            assert_eq!(bucket[field], expected[field], "{env} bucket {field}");
        }
        assert_eq!(bucket, expected);
        assert_eq!(
            parse(&["policy", "kms", "--env", env]),
            expected_kms(account)
        );
    }
    let document = parse(&[
        "policy",
        "bucket",
        "--bucket",
        "mojap-land",
        "--env",
        "production",
        "--document",
    ]);
    assert_eq!(document["Version"], "2012-10-17");
    assert_eq!(document["Statement"][0], expected_bucket("471112983409"));
    assert_failure(
        &ingestion(&[
            "policy",
            "bucket",
            "--bucket",
            "Not_A_Bucket",
            "--env",
            "production",
        ]),
        "bad bucket",
    );

    if require("python3", "policy_statements_match_the_onboarding_guide") {
        let output = ingestion(&["policy", "kms", "--env", "production"]);
        let mut tool = Command::new("python3")
            .args(["-m", "json.tool"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        {
            use std::io::Write;
            tool.stdin
                .take()
                .unwrap()
                .write_all(&output.stdout)
                .unwrap();
        }
        assert!(
            tool.wait().unwrap().success(),
            "python3 -m json.tool refused the policy"
        );
    }

    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("ingestion.toml");
    std::fs::write(
        &config,
        "[buckets]\nlanding = \"l\"\nquarantine = \"q\"\n[onboarding]\nproduction_account_id = \"111122223333\"\nrole_name = \"ingest\"\n",
    )
    .unwrap();
    let custom = parse(&[
        "policy",
        "kms",
        "--env",
        "production",
        "--config",
        config.to_str().unwrap(),
    ]);
    assert_eq!(
        custom["Principal"]["AWS"],
        "arn:aws:iam::111122223333:role/ingest"
    );
}

/// README's first command, as a newcomer runs it: `ingestion quickstart` in a fresh folder, then the
/// `sftp` command it prints (its key and its known_hosts), the delivery and the dashboard's
/// readiness. A dashboard port already taken is refused before anything is written.
#[test]
fn quickstart_runs_a_working_setup_and_refuses_a_taken_port() {
    let test = "quickstart_runs_a_working_setup_and_refuses_a_taken_port";
    if !require("sftp", test) || !require("curl", test) {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let folder = work.path().join("quickstart");
    let folder_arg = folder.display().to_string();
    let (port, admin_port) = (free_port().to_string(), free_port().to_string());

    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_port = taken.local_addr().unwrap().port().to_string();
    let refused = ingestion(&[
        "quickstart",
        "--dir",
        &folder_arg,
        "--port",
        &port,
        "--admin-port",
        &taken_port,
    ]);
    assert_failure(&refused, "quickstart on a taken dashboard port");
    let said = text(&refused);
    assert!(
        said.contains(&format!("port {taken_port} (the dashboard)"))
            && said.contains("--admin-port"),
        "{said}"
    );
    assert!(!folder.exists(), "nothing written");
    drop(taken);

    let printed = work.path().join("printed.txt");
    let mut quickstart = Command::new(env!("CARGO_BIN_EXE_ingestion"))
        .args(["quickstart", "--dir", &folder_arg, "--port", &port])
        .args(["--admin-port", &admin_port])
        .stdout(std::fs::File::create(&printed).unwrap())
        .stderr(std::fs::File::create(work.path().join("log.txt")).unwrap())
        .spawn()
        .unwrap();
    let log = || std::fs::read_to_string(work.path().join("log.txt")).unwrap_or_default();
    wait_until(60, "the quickstart to listen", || {
        assert!(
            quickstart.try_wait().unwrap().is_none(),
            "quickstart exited: {}",
            log()
        );
        listening(port.parse().unwrap()).then_some(())
    });
    let shown = std::fs::read_to_string(&printed).unwrap();
    let key = folder.join("demo_key");
    let known_hosts = folder.join("known_hosts");
    let command = format!(
        "sftp -P {port} -i {} -o UserKnownHostsFile={} demo@127.0.0.1",
        key.display(),
        known_hosts.display()
    );
    assert!(shown.contains(&command), "{shown}");
    assert!(
        shown.contains(&format!("http://127.0.0.1:{admin_port}/readyz")),
        "{shown}"
    );

    let report = work.path().join("report.csv");
    random_file(&report, 100_000, 7);
    let mut sftp = Command::new("sftp")
        .args(["-P", &port, "-i"])
        .arg(&key)
        .arg(format!("-oUserKnownHostsFile={}", known_hosts.display()))
        .args(["-o", "BatchMode=yes", "-b", "-", "demo@127.0.0.1"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write as _;
        let mut stdin = sftp.stdin.take().unwrap();
        writeln!(stdin, "put {} report.csv", report.display()).unwrap();
    }
    assert_success(
        &sftp.wait_with_output().unwrap(),
        "sftp put to the quickstart",
    );
    let delivered = folder.join("buckets/delivered/demo/report.csv");
    wait_until(30, "the delivery", || {
        std::fs::read(&delivered)
            .ok()
            .filter(|bytes| *bytes == std::fs::read(&report).unwrap())
    });
    let ready = http_get(&format!("http://127.0.0.1:{admin_port}/readyz"), None);
    assert_eq!(ready.status, 200, "{}", ready.body);
    quickstart.kill().unwrap();
    quickstart.wait().unwrap();
}

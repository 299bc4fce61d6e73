//! The operations surface with real peers: readiness following a real clamd, metrics read by the
//! Prometheus reference parser, the transfers API through curl, the dashboard in headless Chromium,
//! and the audit trail checked by `ingestion audit verify` and found in the state database.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeSet;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use ingestion::state::JobState;

const TOKEN: &str = "test-admin-token-0123456789abcdef";
const TOKEN_ENV: &str = "INGESTION_TEST_ADMIN_TOKEN";

fn keys(test: &str) -> Option<(tempfile::TempDir, Key)> {
    for program in ["sftp", "ssh-keygen", "python3", "curl"] {
        if !require(program, test) {
            return None;
        }
    }
    let files = tempfile::tempdir().unwrap();
    let key = keygen(files.path(), "acme_key", &["-t", "ed25519"]);
    Some((files, key))
}

/// A server with the admin token set and the builtin scanner (unless `sections` says otherwise).
fn server_with_token(key: &Key, sections: &str) -> Server {
    Server::launch(
        &[UserSpec::new("acme", key)],
        "",
        &format!("[admin]\nlisten = \"127.0.0.1:0\"\ntoken_env = \"{TOKEN_ENV}\"\n{sections}"),
        Landing::Local,
        &[(TOKEN_ENV, TOKEN)],
    )
}

const BUILTIN: &str = "[scanner]\nengine = \"builtin\"\n";

fn upload(server: &Server, files: &tempfile::TempDir, key: &Key, names: &[&str]) {
    let mut script = String::new();
    for (index, name) in names.iter().enumerate() {
        let local = files.path().join(format!("local-{index}"));
        random_file(&local, 10_000 + index as u64, index as u64);
        script.push_str(&format!("put {} \"{name}\"\n", local.display()));
    }
    assert_success(&server.sftp("acme", key, &script), "uploads");
}

fn delivered(server: &Server, count: usize) {
    server.wait_for_jobs(60, "every upload delivered", |jobs| {
        jobs.len() == count && jobs.iter().all(|job| job.state == JobState::Delivered)
    });
}

#[test]
fn readiness_follows_clamd_down_and_back() {
    let test = "readiness_follows_clamd_down_and_back";
    let Some((_files, key)) = keys(test) else {
        return;
    };
    if !require_clamd(test) {
        return;
    }
    let mut clamd = ClamdPeer::start_on_free_port();
    let server = server_with_token(
        &key,
        &format!(
            "[scanner]\nengine = \"clamd\"\nclamd = \"{}\"\n",
            clamd.address()
        ),
    );
    let url = format!("{}/readyz", server.admin_url());
    let ready = http_get(&url, None);
    assert_eq!(ready.status, 200, "{}", ready.body);
    let checks = ready.json()["checks"].clone();
    let names: Vec<_> = checks
        .as_array()
        .unwrap()
        .iter()
        .map(|check| check["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["state_database", "landing_bucket", "scanner"]);
    assert!(checks[2]["latency_ms"].is_u64());
    assert_eq!(
        http_get(&format!("{}/healthz", server.admin_url()), None).status,
        200
    );

    clamd.stop();
    let down = wait_until(30, "readyz to fail", || {
        let answer = http_get(&url, None);
        (answer.status == 503).then_some(answer)
    });
    let scanner = &down.json()["checks"][2];
    assert_eq!(scanner["ok"], false, "{}", down.body);
    assert!(
        scanner["error"].as_str().unwrap().contains("unreachable"),
        "{}",
        down.body
    );
    assert_eq!(down.json()["checks"][0]["ok"], true);
    // Health is about the process, not its dependencies.
    assert_eq!(
        http_get(&format!("{}/healthz", server.admin_url()), None).status,
        200
    );

    clamd.start();
    wait_until(60, "readyz to pass again", || {
        (http_get(&url, None).status == 200).then_some(())
    });
}

#[test]
fn readiness_reports_smtp_without_requiring_it() {
    let test = "readiness_reports_smtp_without_requiring_it";
    let Some((_files, key)) = keys(test) else {
        return;
    };
    if !require_python("aiosmtpd", test) {
        return;
    }
    let mut smtp = SmtpSink::prepare();
    smtp.start();
    let server = server_with_token(
        &key,
        &format!(
            "{BUILTIN}[notify]\nsmtp_url = \"{}\"\nemail_from = \"ingestion@example.org\"\n",
            smtp.url()
        ),
    );
    let url = format!("{}/readyz", server.admin_url());
    let ready = http_get(&url, None);
    assert_eq!(ready.status, 200, "{}", ready.body);
    let smtp_check = ready.json()["checks"][3].clone();
    assert_eq!(smtp_check["name"], "smtp", "{}", ready.body);
    assert_eq!(
        (&smtp_check["ok"], &smtp_check["required"]),
        (&serde_json::json!(true), &serde_json::json!(false))
    );
    drop(smtp);
    let down = wait_until(30, "the SMTP check to fail", || {
        let answer = http_get(&url, None);
        (answer.json()["checks"][3]["ok"] == false).then_some(answer)
    });
    assert_eq!(down.status, 200, "alerts wait in the outbox: {}", down.body);
    assert!(down.json()["checks"][3]["error"].is_string());
}

/// Samples of `/metrics` as the Prometheus reference parser reads them.
fn scrape(server: &Server) -> serde_json::Value {
    let answer = http_get(&format!("{}/metrics", server.admin_url()), None);
    assert_eq!(answer.status, 200);
    assert!(
        answer.headers.contains("text/plain; version=0.0.4"),
        "{}",
        answer.headers
    );
    let mut parser = Command::new("python3")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/peers/prometheus_parse.py"
        ))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        parser
            .stdin
            .take()
            .unwrap()
            .write_all(answer.body.as_bytes())
            .unwrap();
    }
    let output = parser.wait_with_output().unwrap();
    assert_success(&output, "the Prometheus parser reads /metrics");
    serde_json::from_slice(&output.stdout).unwrap()
}

/// The value of one sample, 0 when absent.
fn sample(scraped: &serde_json::Value, name: &str, labels: &[(&str, &str)]) -> f64 {
    scraped["samples"]
        .as_array()
        .unwrap()
        .iter()
        .find(|sample| {
            sample["name"] == name
                && labels
                    .iter()
                    .all(|(key, value)| sample["labels"][*key] == *value)
        })
        .map_or(0.0, |sample| sample["value"].as_f64().unwrap())
}

#[test]
fn metrics_parse_and_move_with_uploads() {
    let test = "metrics_parse_and_move_with_uploads";
    let Some((files, key)) = keys(test) else {
        return;
    };
    if !require_python("prometheus_client", test) {
        return;
    }
    let server = server_with_token(&key, BUILTIN);
    let before = scrape(&server);
    for (name, kind) in [
        ("ingestion_logins", "counter"),
        ("ingestion_uploads", "counter"),
        ("ingestion_jobs", "gauge"),
        ("ingestion_sessions_active", "gauge"),
    ] {
        assert_eq!(before["types"][name], kind, "{}", before["types"]);
    }
    assert_eq!(
        sample(
            &before,
            "ingestion_uploads_total",
            &[("outcome", "completed")]
        ),
        0.0
    );

    upload(&server, &files, &key, &["a.csv", "b.csv"]);
    delivered(&server, 2);
    // A wrong key: one refused login.
    let stranger = keygen(files.path(), "stranger", &["-t", "ed25519"]);
    assert_failure(
        &server.sftp("acme", &stranger, "ls\n"),
        "a login with a wrong key",
    );

    let after = wait_until(30, "the delivery latency recorded", || {
        let after = scrape(&server);
        (sample(&after, "ingestion_delivery_seconds_count", &[]) >= 2.0).then_some(after)
    });
    assert_eq!(
        sample(
            &after,
            "ingestion_uploads_total",
            &[("outcome", "completed")]
        ),
        2.0
    );
    assert_eq!(
        sample(&after, "ingestion_bytes_received_total", &[]),
        f64::from(10_000 + 10_001)
    );
    assert!(
        sample(
            &after,
            "ingestion_logins_total",
            &[("result", "accepted"), ("reason", "publickey")]
        ) >= 1.0
    );
    assert!(
        sample(
            &after,
            "ingestion_logins_total",
            &[("result", "refused"), ("reason", "wrong_key")]
        ) >= 1.0,
        "{after}"
    );
    assert_eq!(
        sample(
            &after,
            "ingestion_scan_verdicts_total",
            &[("verdict", "clean"), ("engine", "builtin")]
        ),
        2.0
    );
    assert_eq!(sample(&after, "ingestion_scan_seconds_count", &[]), 2.0);
    assert_eq!(
        sample(&after, "ingestion_jobs", &[("state", "delivered")]),
        2.0
    );
    assert_eq!(
        sample(&after, "ingestion_jobs", &[("state", "landed")]),
        0.0
    );
    assert_eq!(
        sample(&after, "ingestion_oldest_unfinished_job_seconds", &[]),
        0.0
    );
    assert_eq!(sample(&after, "ingestion_sessions_active", &[]), 0.0);
}

#[test]
fn the_api_wants_the_token_and_pages_through_transfers() {
    let test = "the_api_wants_the_token_and_pages_through_transfers";
    let Some((files, key)) = keys(test) else {
        return;
    };
    let server = server_with_token(&key, BUILTIN);
    let api = format!("{}/api", server.admin_url());
    let missing = http_get(&format!("{api}/transfers"), None);
    assert_eq!(missing.status, 401, "{}", missing.body);
    assert!(missing.json()["error"].as_str().unwrap().contains("Bearer"));
    let wrong = http_get(
        &format!("{api}/transfers"),
        Some("test-admin-token-0123456789abcdeX"),
    );
    assert_eq!(wrong.status, 401);
    assert_eq!(http_get(&format!("{api}/users"), Some("short")).status, 401);
    let refused = server.events("admin_refused");
    assert_eq!(refused.len(), 3, "{refused:?}");
    assert_eq!(refused[0]["ip"], "127.0.0.1");

    let names = ["a.csv", "b.csv", "c.csv", "d.csv", "e.csv"];
    upload(&server, &files, &key, &names);
    delivered(&server, 5);

    let mut seen = Vec::new();
    let mut cursor = String::new();
    let mut pages = 0;
    loop {
        let page = http_get(
            &format!("{api}/transfers?limit=2&user=acme&state=delivered&since=1h&cursor={cursor}"),
            Some(TOKEN),
        );
        assert_eq!(page.status, 200, "{}", page.body);
        let page = page.json();
        pages += 1;
        for transfer in page["transfers"].as_array().unwrap() {
            seen.push(transfer["path"].as_str().unwrap().to_string());
            assert_eq!(transfer["state"], "delivered");
            assert_eq!(transfer["verdict"], "clean");
            assert_eq!(transfer["sha256"].as_str().unwrap().len(), 64);
        }
        match page["next_cursor"].as_str() {
            Some(next) => cursor = next.to_string(),
            None => break,
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(
        seen,
        ["/e.csv", "/d.csv", "/c.csv", "/b.csv", "/a.csv"],
        "newest first"
    );
    let none = http_get(&format!("{api}/transfers?state=quarantined"), Some(TOKEN)).json();
    assert_eq!(none["transfers"].as_array().unwrap().len(), 0);
    let other_user = http_get(&format!("{api}/transfers?user=nobody"), Some(TOKEN)).json();
    assert_eq!(other_user["transfers"].as_array().unwrap().len(), 0);
    let bad = http_get(&format!("{api}/transfers?state=lost"), Some(TOKEN));
    assert_eq!(bad.status, 400);
    assert!(
        bad.json()["error"]
            .as_str()
            .unwrap()
            .contains("quarantined"),
        "{}",
        bad.body
    );
    assert_eq!(
        http_get(&format!("{api}/transfers?limit=0"), Some(TOKEN)).status,
        400
    );

    let first = server
        .jobs()
        .into_iter()
        .find(|job| job.path == "a.csv")
        .unwrap();
    // The audit trail's copy in the state database holds this job's events (copied in batches a
    // moment after they happen).
    wait_until(10, "the job's events in the API", || {
        let one = http_get(&format!("{api}/transfers/{}", first.id), Some(TOKEN));
        assert_eq!(one.status, 200, "{}", one.body);
        let one = one.json();
        assert_eq!(one["transfer"]["path"], "/a.csv");
        let events: BTreeSet<_> = one["events"]
            .as_array()
            .unwrap()
            .iter()
            .map(|event| event["event"].as_str().unwrap().to_string())
            .collect();
        ["close", "scanned", "delivered"]
            .iter()
            .all(|expected| events.contains(*expected))
            .then_some(())
    });
    assert_eq!(
        http_get(&format!("{api}/transfers/999999"), Some(TOKEN)).status,
        404
    );
    assert_eq!(
        http_get(&format!("{api}/transfers/x"), Some(TOKEN)).status,
        400
    );

    let users = http_get(&format!("{api}/users"), Some(TOKEN));
    assert_eq!(users.status, 200);
    let acme = &users.json()["users"][0];
    assert_eq!(acme["username"], "acme");
    assert!(
        acme["key_fingerprints"][0]
            .as_str()
            .unwrap()
            .starts_with("SHA256:")
    );
    assert!(!users.body.contains("PRIVATE") && !users.body.contains("ssh-ed25519 AAAA"));

    let openapi = http_get(&format!("{api}/openapi.json"), None).json();
    assert_eq!(openapi["openapi"], "3.1.0");
    assert!(openapi["paths"]["/api/transfers"]["get"].is_object());
}

#[test]
fn without_a_token_the_api_and_dashboard_are_closed_and_beyond_loopback_is_refused() {
    let test = "without_a_token_the_api_and_dashboard_are_closed_and_beyond_loopback_is_refused";
    let Some((_files, key)) = keys(test) else {
        return;
    };
    let server = Server::launch(
        &[UserSpec::new("acme", &key)],
        "",
        BUILTIN,
        Landing::Local,
        &[],
    );
    let closed = http_get(
        &format!("{}/api/transfers", server.admin_url()),
        Some(TOKEN),
    );
    assert_eq!(closed.status, 403);
    assert!(
        closed.json()["error"]
            .as_str()
            .unwrap()
            .contains("token_env")
    );
    assert_eq!(
        http_get(&format!("{}/", server.admin_url()), None).status,
        403
    );
    assert_eq!(
        http_get(&format!("{}/metrics", server.admin_url()), None).status,
        200
    );

    std::fs::write(
        server.dir.path().join("ingestion.toml"),
        format!(
            "{}\n[admin]\nlisten = \"0.0.0.0:0\"\n",
            std::fs::read_to_string(server.dir.path().join("ingestion.toml"))
                .unwrap()
                .replace("[admin]\nlisten = \"127.0.0.1:0\"\n", "")
        ),
    )
    .unwrap();
    let check = server.cli(&["check"]);
    assert_failure(&check, "admin beyond loopback without a token");
    assert!(text(&check).contains("admin.token_env"), "{}", text(&check));
}

#[test]
fn the_dashboard_shows_a_hostile_file_name_as_text_in_chromium() {
    let test = "the_dashboard_shows_a_hostile_file_name_as_text_in_chromium";
    let Some((files, key)) = keys(test) else {
        return;
    };
    if !require("chromium", test) || !require_python("websocket", test) {
        return;
    }
    let server = server_with_token(&key, BUILTIN);
    let hostile = "<img src=x onerror=alert(1)>.csv";
    upload(&server, &files, &key, &[hostile, "plain.csv"]);
    delivered(&server, 2);

    let screenshot = files.path().join("dashboard.png");
    let output = Command::new("python3")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/peers/dashboard_browser.py"
        ))
        .args(["--url", &format!("{}/", server.admin_url())])
        .args(["--token", TOKEN, "--expect-text", hostile, "--screenshot"])
        .arg(&screenshot)
        .output()
        .unwrap();
    assert_success(&output, "headless Chromium loads the dashboard");
    let seen: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(seen["login_ok"], true, "{seen}");
    assert_eq!(
        seen["text_found"], true,
        "the name is shown as text: {seen}"
    );
    assert_eq!(seen["img_elements"], 0, "no element was injected: {seen}");
    assert_eq!(seen["dialogs"], serde_json::json!([]), "{seen}");
    assert_eq!(seen["csp_violations"], serde_json::json!([]), "{seen}");
    assert_eq!(seen["transfer_rows"], 2, "{seen}");
    let png = std::fs::read(&screenshot).unwrap();
    assert!(png.starts_with(b"\x89PNG") && png.len() > 1000);
    assert_eq!(server.events("admin_login").len(), 1);

    // Signing out clears the session cookie.
    let logout = Command::new("curl")
        .args(["-sS", "-X", "POST", "-D", "-", "-o", "/dev/null"])
        .arg(format!("{}/logout", server.admin_url()))
        .output()
        .unwrap();
    let headers = String::from_utf8_lossy(&logout.stdout).to_lowercase();
    assert!(headers.starts_with("http/1.1 303"), "{headers}");
    assert!(
        headers
            .contains("set-cookie: ingestion_admin=; path=/; httponly; samesite=strict; max-age=0"),
        "{headers}"
    );

    // The page itself: escaped, with a strict policy.
    let page = Command::new("curl")
        .args(["-sS", "-D", "-", "-o", "/dev/null"])
        .arg(format!("{}/", server.admin_url()))
        .output()
        .unwrap();
    let headers = String::from_utf8_lossy(&page.stdout).to_lowercase();
    assert!(
        headers.contains("content-security-policy: default-src 'none'"),
        "{headers}"
    );
}

#[test]
fn audit_verify_passes_on_a_real_run_and_fails_after_one_byte_changes() {
    let test = "audit_verify_passes_on_a_real_run_and_fails_after_one_byte_changes";
    let Some((files, key)) = keys(test) else {
        return;
    };
    let server = server_with_token(&key, BUILTIN);
    upload(&server, &files, &key, &["a.csv", "b.csv"]);
    delivered(&server, 2);
    server.wait_events("delivered", 2);
    let verified = server.cli(&["audit", "verify"]);
    assert_success(&verified, "audit verify on a real run");
    let audit_path = server.dir.path().join("state/audit.jsonl");
    let original = std::fs::read(&audit_path).unwrap();
    // One byte: the name of the first file in the first line that names it (never the last line,
    // which the delivery of b.csv follows).
    let lines = String::from_utf8(original.clone()).unwrap();
    let needle = "\"path\":\"/a.csv\"";
    let at = lines.find(needle).unwrap() + needle.len() - "a.csv\"".len();
    let target = lines[..at].matches('\n').count();
    let mut tampered = original.clone();
    tampered[at] = b'b';
    std::fs::write(&audit_path, &tampered).unwrap();
    let broken = server.cli(&["audit", "verify"]);
    assert_failure(&broken, "audit verify after one byte changed");
    assert!(
        text(&broken).contains(&format!("line {}", target + 2)),
        "names the line after the edited one: {}",
        text(&broken)
    );
}

/// Copied audit lines older than `[admin] audit_retention` leave the state database when the
/// service starts (and hourly); newer ones stay.
#[test]
fn copied_audit_lines_past_their_retention_leave_the_database() {
    let test = "copied_audit_lines_past_their_retention_leave_the_database";
    let Some((_files, key)) = keys(test) else {
        return;
    };
    let mut server = server_with_token(&key, &format!("audit_retention = \"2h\"\n{BUILTIN}"));
    let copied = |server: &Server| -> Vec<(String, String)> {
        server.query(|state| async move {
            state
                .recent_events(1000)
                .await
                .unwrap()
                .into_iter()
                .map(|event| (event.event, event.time))
                .collect()
        })
    };
    wait_until(30, "the start copied", || {
        copied(&server)
            .iter()
            .any(|(event, _)| event == "service_started")
            .then_some(())
    });
    // Lines as if copied three hours and one hour ago.
    let at = |hours: u64| {
        let then = std::time::SystemTime::now() - Duration::from_secs(hours * 3600);
        humantime::format_rfc3339_millis(then).to_string()
    };
    let old = ingestion::state::AuditRecord {
        time: at(3),
        event: "old_line".into(),
        username: None,
        job: None,
        line: "{\"event\":\"old_line\"}".into(),
    };
    let recent = ingestion::state::AuditRecord {
        time: at(1),
        event: "recent_line".into(),
        ..old.clone()
    };
    server.query(|state| async move {
        state.insert_audit_events(&[old, recent]).await.unwrap();
    });
    server.restart(&[(TOKEN_ENV, TOKEN)]);
    let events: Vec<String> = wait_until(30, "the second start copied, the old line gone", || {
        let events: Vec<String> = copied(&server)
            .into_iter()
            .map(|(event, _)| event)
            .collect();
        let starts = events.iter().filter(|event| *event == "service_started");
        (starts.count() == 2 && !events.contains(&"old_line".to_string())).then_some(events)
    });
    assert!(events.contains(&"recent_line".to_string()), "{events:?}");
    // The audit file keeps everything it had.
    assert_eq!(server.events("service_started").len(), 2);
}

//! Alerts, end to end: uploads with OpenSSH sftp, a real SMTP server (aiosmtpd) and an HTTP receiver
//! standing in for Slack and a signed webhook; receivers that are down, fail or refuse.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;

struct Setup {
    files: tempfile::TempDir,
    key: Key,
}

fn setup(test: &str) -> Option<Setup> {
    if !require("sftp", test) || !require("ssh-keygen", test) || !require("python3", test) {
        return None;
    }
    if !require_python("aiosmtpd", test) {
        return None;
    }
    let files = tempfile::tempdir().unwrap();
    let key = keygen(files.path(), "acme_key", &["-t", "ed25519"]);
    Some(Setup { files, key })
}

fn sections(smtp: &str) -> String {
    format!(
        "[scanner]\nengine = \"builtin\"\n[notify]\nsmtp_url = \"{smtp}\"\nemail_from = \"ingestion@example.org\"\n"
    )
}

fn header<'a>(message: &'a str, name: &str) -> Option<&'a str> {
    message.lines().find_map(|line| {
        line.strip_prefix(name)
            .and_then(|rest| rest.strip_prefix(": "))
    })
}

#[test]
fn delivered_and_quarantined_files_are_announced_by_email_slack_and_a_signed_webhook() {
    let test = "delivered_and_quarantined_files_are_announced_by_email_slack_and_a_signed_webhook";
    let Some(setup) = setup(test) else { return };
    let mut smtp = SmtpSink::prepare();
    smtp.start();
    let receiver = Receiver::start(&[]);
    let mut user = UserSpec::new("acme", &setup.key);
    user.extra =
        "notify_emails = [\"team@acme.example\"]\nnotify_slack_webhook_env = \"ACME_SLACK\"\n\
                  notify_webhook = { url = \"WEBHOOK\", secret_env = \"ACME_HMAC\" }\n"
            .replace("WEBHOOK", &receiver.url("/hook"));
    let slack_url = receiver.url("/slack");
    let server = Server::launch(
        &[user],
        "",
        &sections(&smtp.url()),
        Landing::Local,
        &[("ACME_SLACK", &slack_url), ("ACME_HMAC", "shared-secret")],
    );
    let clean = setup.files.path().join("data.csv");
    std::fs::write(&clean, b"a,b\n1,2\n").unwrap();
    let eicar = setup.files.path().join("eicar.txt");
    std::fs::write(&eicar, EICAR).unwrap();
    let script = format!(
        "put {} data.csv\nput {} eicar.txt\n",
        clean.display(),
        eicar.display()
    );
    assert_success(&server.sftp("acme", &setup.key, &script), "uploads");
    server.wait_for_jobs(30, "both files routed", |jobs| all_final(jobs, 2));

    let messages = wait_until(30, "two emails", || {
        let messages = smtp.messages();
        (messages.len() >= 2).then_some(messages)
    });
    let slack = wait_until(30, "two Slack posts", || {
        let posts = receiver.requests("/slack");
        (posts.len() >= 2).then_some(posts)
    });
    let hooks = wait_until(30, "two webhook calls", || {
        let calls = receiver.requests("/hook");
        (calls.len() >= 2).then_some(calls)
    });
    std::thread::sleep(std::time::Duration::from_secs(1));
    assert_eq!(
        (
            smtp.messages().len(),
            receiver.requests("/slack").len(),
            receiver.requests("/hook").len()
        ),
        (2, 2, 2)
    );

    let subjects: Vec<&str> = messages
        .iter()
        .filter_map(|m| header(m, "Subject"))
        .collect();
    assert!(
        subjects.contains(&"[ingestion] acme: data.csv delivered"),
        "{subjects:?}"
    );
    assert!(
        subjects.contains(&"[ingestion] acme: eicar.txt quarantined (Eicar-Test-Signature)"),
        "{subjects:?}"
    );
    assert!(
        messages
            .iter()
            .all(|m| header(m, "To") == Some("team@acme.example"))
    );

    let texts: Vec<String> = slack
        .iter()
        .map(|post| serde_json::from_str::<serde_json::Value>(post["body"].as_str().unwrap()).unwrap()["text"].as_str().unwrap().to_string())
        .collect();
    assert!(
        texts.iter().any(|t| t.starts_with(
            "A file uploaded by `acme` has been quarantined (Eicar-Test-Signature). • `/eicar.txt`"
        )),
        "{texts:?}"
    );
    assert!(
        texts
            .iter()
            .any(|t| t.starts_with("A file uploaded by `acme` has been transferred to")),
        "{texts:?}"
    );

    for call in &hooks {
        let body = call["body"].as_str().unwrap();
        let signature = call["headers"]["x-ingestion-signature"].as_str().unwrap();
        assert_eq!(
            signature,
            format!(
                "sha256={}",
                ingestion::notify::sign("shared-secret", body.as_bytes())
            )
        );
        let facts: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(call["headers"]["x-ingestion-event-id"], facts["event_id"]);
        assert_eq!(call["headers"]["idempotency-key"], facts["event_id"]);
        if facts["event"] == "quarantined" {
            assert_eq!(facts["signature"], "Eicar-Test-Signature");
            // The email for the same event carries the same id in its Message-ID.
            let event_id = facts["event_id"].as_str().unwrap();
            assert!(
                messages
                    .iter()
                    .any(|m| header(m, "Message-ID") == Some(&format!("<{event_id}@ingestion>"))),
                "{messages:?}"
            );
        }
    }

    // A test alert reaches each target and is reported target by target.
    let env = [
        ("ACME_SLACK", slack_url.as_str()),
        ("ACME_HMAC", "shared-secret"),
    ];
    let tested = server.cli_env(&["notify", "test", "--user", "acme"], &env);
    assert_success(&tested, "notify test");
    assert_eq!(
        text(&tested)
            .lines()
            .filter(|line| line.starts_with("ok "))
            .count(),
        3,
        "{}",
        text(&tested)
    );
    wait_until(30, "the test email", || {
        smtp.messages()
            .iter()
            .any(|m| header(m, "Subject") == Some("[ingestion] acme: test alert"))
            .then_some(())
    });
}

#[test]
fn files_are_delivered_while_smtp_is_down_and_every_email_goes_out_after() {
    let test = "files_are_delivered_while_smtp_is_down_and_every_email_goes_out_after";
    let Some(setup) = setup(test) else { return };
    let mut smtp = SmtpSink::prepare();
    let mut user = UserSpec::new("acme", &setup.key);
    user.extra = "notify_emails = [\"team@acme.example\"]\n".into();
    let server = Server::launch(&[user], "", &sections(&smtp.url()), Landing::Local, &[]);
    let mut script = String::new();
    for index in 0..3 {
        let file = setup.files.path().join(format!("f{index}.csv"));
        std::fs::write(&file, format!("file {index}\n")).unwrap();
        script.push_str(&format!("put {} f{index}.csv\n", file.display()));
    }
    assert_success(&server.sftp("acme", &setup.key, &script), "uploads");
    server.wait_for_jobs(20, "delivery while SMTP is down", |jobs| all_final(jobs, 3));
    assert_eq!(server.files_in("buckets/delivered/acme").len(), 3);
    std::thread::sleep(std::time::Duration::from_secs(2));
    assert!(smtp.messages().is_empty());
    smtp.start();
    let messages = wait_until(60, "three emails after SMTP returns", || {
        let messages = smtp.messages();
        (messages.len() >= 3).then_some(messages)
    });
    let mut subjects: Vec<&str> = messages
        .iter()
        .filter_map(|m| header(m, "Subject"))
        .collect();
    subjects.sort();
    assert_eq!(
        subjects,
        [
            "[ingestion] acme: f0.csv delivered",
            "[ingestion] acme: f1.csv delivered",
            "[ingestion] acme: f2.csv delivered"
        ]
    );
}

#[test]
fn a_failing_receiver_gets_one_logical_alert_and_a_refusing_one_no_retry_storm() {
    let test = "a_failing_receiver_gets_one_logical_alert_and_a_refusing_one_no_retry_storm";
    let Some(setup) = setup(test) else { return };
    let receiver = Receiver::start(&[("/hook", "500"), ("/slack", "400")]);
    let mut user = UserSpec::new("acme", &setup.key);
    user.extra =
        "notify_slack_webhook_env = \"ACME_SLACK\"\nnotify_webhook = { url = \"WEBHOOK\" }\n"
            .replace("WEBHOOK", &receiver.url("/hook"));
    let slack_url = receiver.url("/slack");
    let server = Server::launch(
        &[user],
        "",
        "[scanner]\nengine = \"builtin\"\n",
        Landing::Local,
        &[("ACME_SLACK", &slack_url)],
    );
    let file = setup.files.path().join("data.csv");
    std::fs::write(&file, b"x\n").unwrap();
    assert_success(
        &server.sftp(
            "acme",
            &setup.key,
            &format!("put {} data.csv\n", file.display()),
        ),
        "upload",
    );
    let calls = wait_until(30, "the webhook retried after a 500", || {
        let calls = receiver.requests("/hook");
        (calls.len() >= 2).then_some(calls)
    });
    assert_eq!(
        (calls[0]["status"].as_i64(), calls[1]["status"].as_i64()),
        (Some(500), Some(200))
    );
    assert_eq!(
        calls[0]["headers"]["x-ingestion-event-id"], calls[1]["headers"]["x-ingestion-event-id"],
        "a retry is the same logical alert"
    );
    std::thread::sleep(std::time::Duration::from_secs(5));
    assert_eq!(
        receiver.requests("/hook").len(),
        2,
        "nothing more after the 200"
    );
    assert_eq!(receiver.requests("/slack").len(), 1, "a 400 is not retried");
    let failed = server.events("alert_failed");
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert_eq!(failed[0]["channel"], "slack");
    assert!(
        failed[0]["error"].as_str().unwrap().contains("400"),
        "{failed:?}"
    );
}

#[test]
fn a_job_that_keeps_failing_is_reported_stuck_once() {
    let test = "a_job_that_keeps_failing_is_reported_stuck_once";
    let Some(setup) = setup(test) else { return };
    let receiver = Receiver::start(&[]);
    let mut user = UserSpec::new("acme", &setup.key);
    user.extra = format!(
        "notify_webhook = {{ url = \"{}\" }}\n",
        receiver.url("/hook")
    );
    // clamd is unreachable, so the job keeps failing; stuck after one second.
    let server = Server::launch(
        &[user],
        "",
        &format!(
            "{NO_SCANNER}[pipeline]\nretry_base = \"100ms\"\nretry_cap = \"200ms\"\n[notify]\nstuck_after = \"1s\"\n"
        ),
        Landing::Local,
        &[],
    );
    let file = setup.files.path().join("data.csv");
    std::fs::write(&file, b"x\n").unwrap();
    assert_success(
        &server.sftp(
            "acme",
            &setup.key,
            &format!("put {} data.csv\n", file.display()),
        ),
        "upload",
    );
    let stuck = wait_until(30, "a stuck alert", || {
        let calls = receiver.requests("/hook");
        (!calls.is_empty()).then_some(calls)
    });
    let facts: serde_json::Value =
        serde_json::from_str(stuck[0]["body"].as_str().unwrap()).unwrap();
    assert_eq!(
        (facts["event"].as_str(), facts["path"].as_str()),
        (Some("stuck"), Some("/data.csv"))
    );
    assert!(
        facts["last_error"]
            .as_str()
            .unwrap()
            .contains("unreachable"),
        "{facts}"
    );
    std::thread::sleep(std::time::Duration::from_secs(3));
    assert_eq!(receiver.requests("/hook").len(), 1, "reported once");
    assert_eq!(server.events("job_stuck").len(), 1);
    assert!(server.files_in("buckets/delivered").is_empty());
}

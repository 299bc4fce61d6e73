//! Prometheus metrics: owns every metric's name, labels and help text, and the recorder that the
//! admin listener renders at `/metrics`.
//!
//! Most counters are derived from audit events in one place ([`audited`]), so that what is counted
//! and what is audited cannot drift apart. Bytes moving through SFTP, the latency from an upload's
//! CLOSE to its delivery and alert sends are counted where they happen. Figures that live in the
//! state database (jobs by state, the oldest unfinished job) or in the front door (bans in force)
//! are read when `/metrics` is scraped ([`Scraped`]). Label values come from fixed vocabularies,
//! never from what a peer sends, so the number of series stays bounded.

use std::time::Duration;

use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::audit::Event;

const SESSIONS: &str = "ingestion_sessions_active";
const LOGINS: &str = "ingestion_logins_total";
const CONNECTIONS_REFUSED: &str = "ingestion_connections_refused_total";
const BYTES_RECEIVED: &str = "ingestion_bytes_received_total";
const BYTES_SENT: &str = "ingestion_bytes_sent_total";
const UPLOADS: &str = "ingestion_uploads_total";
const SCAN_VERDICTS: &str = "ingestion_scan_verdicts_total";
const SCAN_SECONDS: &str = "ingestion_scan_seconds";
const DELIVERY_SECONDS: &str = "ingestion_delivery_seconds";
const JOBS: &str = "ingestion_jobs";
const OLDEST_UNFINISHED: &str = "ingestion_oldest_unfinished_job_seconds";
const NOTIFICATIONS: &str = "ingestion_notifications_total";
const BANS: &str = "ingestion_bans_in_force";
const AUDIT_COPY_DROPPED: &str = "ingestion_audit_lines_not_copied_total";
const SCANNING_PAUSED: &str = "ingestion_scanning_paused";

/// Latency buckets, in seconds: from 5 ms to 10 minutes.
const LATENCY_BUCKETS: [f64; 16] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
];

/// Installs the process-wide recorder and describes every metric. Call once, at start.
pub fn install() -> anyhow::Result<PrometheusHandle> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &LATENCY_BUCKETS)?
        .install_recorder()?;
    describe_gauge!(SESSIONS, "SSH connections open now");
    describe_counter!(
        LOGINS,
        "Login attempts by result (accepted, refused) and reason"
    );
    describe_counter!(
        CONNECTIONS_REFUSED,
        "Connections closed before SSH started (banned address, too many waiting logins, a bad PROXY header)"
    );
    describe_counter!(BYTES_RECEIVED, "File bytes received over SFTP");
    describe_counter!(
        BYTES_SENT,
        "File bytes sent over SFTP (downloads and receipts)"
    );
    describe_counter!(
        UPLOADS,
        "Uploads by outcome: completed (CLOSE), aborted, interrupted (kept to resume)"
    );
    describe_counter!(SCAN_VERDICTS, "Scan verdicts by verdict and engine");
    describe_histogram!(SCAN_SECONDS, "Time to scan one file");
    describe_histogram!(
        DELIVERY_SECONDS,
        "Time from an upload's CLOSE to its delivery at the destination"
    );
    describe_gauge!(
        JOBS,
        "Jobs by state, in the state database (all nodes' jobs)"
    );
    describe_gauge!(
        OLDEST_UNFINISHED,
        "Age of the oldest job the pipeline has yet to finish: landed, scanned or failing (0 when none)"
    );
    describe_counter!(
        NOTIFICATIONS,
        "Alert sends by channel and result (sent, retry, failed)"
    );
    describe_gauge!(BANS, "Addresses banned now after repeated failed logins");
    describe_counter!(
        AUDIT_COPY_DROPPED,
        "Audit lines written to the audit file that could not be queued for the state database copy"
    );
    describe_gauge!(
        SCANNING_PAUSED,
        "1 while this node pauses scanning because the scanner does not answer, else 0"
    );
    for outcome in ["completed", "aborted", "interrupted"] {
        counter!(UPLOADS, "outcome" => outcome).absolute(0);
    }
    for result in ["accepted", "refused"] {
        counter!(LOGINS, "result" => result, "reason" => "none").absolute(0);
    }
    counter!(BYTES_RECEIVED).absolute(0);
    counter!(BYTES_SENT).absolute(0);
    gauge!(SESSIONS).set(0.0);
    gauge!(SCANNING_PAUSED).set(0.0);
    Ok(handle)
}

/// Counts what an audit event reports.
pub fn audited(event: &Event) {
    match event {
        Event::AuthAccepted { method, .. } => {
            counter!(LOGINS, "result" => "accepted", "reason" => method_label(method)).increment(1);
        }
        Event::AuthRefused { reason, .. } => {
            counter!(LOGINS, "result" => "refused", "reason" => refusal_label(reason)).increment(1);
        }
        Event::IpRefused { .. } => {
            counter!(LOGINS, "result" => "refused", "reason" => "address_not_allowed").increment(1);
        }
        Event::AuthTimeout { .. } => {
            counter!(LOGINS, "result" => "refused", "reason" => "timeout").increment(1);
        }
        Event::ConnectionRefused { reason } => {
            let label = if reason.contains("banned") {
                "banned"
            } else if reason.contains("waiting to log in") {
                "too_many_connections"
            } else {
                "bad_proxy_header"
            };
            counter!(CONNECTIONS_REFUSED, "reason" => label).increment(1);
        }
        Event::Connect { .. } => gauge!(SESSIONS).increment(1.0),
        Event::Disconnect { .. } => gauge!(SESSIONS).decrement(1.0),
        Event::Close { .. } => counter!(UPLOADS, "outcome" => "completed").increment(1),
        Event::UploadAborted { .. } => counter!(UPLOADS, "outcome" => "aborted").increment(1),
        Event::UploadInterrupted { .. } => {
            counter!(UPLOADS, "outcome" => "interrupted").increment(1);
        }
        Event::ScannerUnavailable { .. } => gauge!(SCANNING_PAUSED).set(1.0),
        Event::ScannerAvailable { .. } => gauge!(SCANNING_PAUSED).set(0.0),
        Event::Scanned {
            verdict,
            engine,
            scan_ms,
            ..
        } => {
            counter!(SCAN_VERDICTS, "verdict" => verdict_label(verdict), "engine" => engine_label(engine))
                .increment(1);
            histogram!(SCAN_SECONDS)
                .record(Duration::from_millis(u64::try_from(*scan_ms).unwrap_or(0)).as_secs_f64());
        }
        _ => {}
    }
}

/// Counts file bytes received from a client.
pub fn bytes_received(bytes: u64) {
    counter!(BYTES_RECEIVED).increment(bytes);
}

/// Counts file bytes sent to a client.
pub fn bytes_sent(bytes: u64) {
    counter!(BYTES_SENT).increment(bytes);
}

/// Records the time from an upload's CLOSE (`received_at`, RFC 3339) to its delivery, now.
pub fn delivered(received_at: &str) {
    if let Ok(received) = humantime::parse_rfc3339(received_at)
        && let Ok(latency) = std::time::SystemTime::now().duration_since(received)
    {
        histogram!(DELIVERY_SECONDS).record(latency.as_secs_f64());
    }
}

/// An alert send's result: `sent`, `retry` or `failed` (for good).
pub fn notification(channel: &str, result: &'static str) {
    let channel = match channel {
        "email" | "slack" | "webhook" => channel.to_string(),
        _ => "other".to_string(),
    };
    counter!(NOTIFICATIONS, "channel" => channel, "result" => result).increment(1);
}

/// An audit line that could not be queued for the state database.
pub fn audit_copy_dropped() {
    counter!(AUDIT_COPY_DROPPED).increment(1);
}

/// Figures read at scrape time. Those the state database could not give are `None`, and their
/// gauges keep their last values rather than dropping to zero while the database is down.
#[derive(Debug, Default)]
pub struct Scraped {
    /// Jobs by state name.
    pub jobs: Option<Vec<(String, i64)>>,
    /// The oldest unfinished job's age (`Some(None)`: there is none).
    pub oldest_unfinished: Option<Option<Duration>>,
    pub bans: usize,
}

impl Scraped {
    /// Sets the gauges these figures feed.
    pub fn publish(&self) {
        if let Some(jobs) = &self.jobs {
            publish_jobs(jobs);
        }
        if let Some(oldest) = self.oldest_unfinished {
            gauge!(OLDEST_UNFINISHED).set(oldest.unwrap_or_default().as_secs_f64());
        }
        #[allow(clippy::cast_precision_loss)]
        gauge!(BANS).set(self.bans as f64);
    }
}

fn publish_jobs(jobs: &[(String, i64)]) {
    for state in crate::state::JobState::ALL {
        let count = jobs
            .iter()
            .find(|(name, _)| name == state.as_str())
            .map_or(0, |(_, count)| *count);
        #[allow(clippy::cast_precision_loss)]
        gauge!(JOBS, "state" => state.as_str()).set(count as f64);
    }
}

fn method_label(method: &str) -> &'static str {
    match method {
        "publickey" => "publickey",
        "password" => "password",
        _ => "other",
    }
}

/// A short, fixed reason for a refused login, from the audit text.
fn refusal_label(reason: &str) -> &'static str {
    const LABELS: [(&str, &str); 5] = [
        ("unknown user", "unknown_user"),
        ("ssh_keys", "wrong_key"),
        ("SHA-1", "sha1_signature"),
        ("limits.max_sessions_per_user", "too_many_sessions"),
        ("authentication is disabled", "method_disabled"),
    ];
    LABELS
        .iter()
        .find(|(needle, _)| reason.contains(needle))
        .map_or("other", |(_, label)| label)
}

fn verdict_label(verdict: &str) -> &'static str {
    match verdict {
        "clean" => "clean",
        "infected" => "infected",
        "unscannable" => "unscannable",
        _ => "other",
    }
}

fn engine_label(engine: &str) -> &'static str {
    match engine {
        "clamd" => "clamd",
        "builtin" => "builtin",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusal_reasons_map_to_a_fixed_vocabulary() {
        assert_eq!(refusal_label("unknown user"), "unknown_user");
        assert_eq!(
            refusal_label("the key is not one of the user's ssh_keys"),
            "wrong_key"
        );
        assert_eq!(
            refusal_label("the user already has 3 sessions (limits.max_sessions_per_user)"),
            "too_many_sessions"
        );
        assert_eq!(
            refusal_label("ssh-rsa (SHA-1) signatures are refused; use rsa-sha2-256/512"),
            "sha1_signature"
        );
        assert_eq!(refusal_label("<script>"), "other");
    }
}

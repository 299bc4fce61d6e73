//! The audit trail: one JSON line per event, appended to the audit file and echoed to the log.
//!
//! Owns the event vocabulary (what happened, to whom, from where) and the file format. Callers say
//! what happened; they never format lines themselves. An audit write failure is logged loudly but
//! never stops a transfer that is already durable.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::sync::Mutex;
use std::time::SystemTime;

use serde::Serialize;

/// Who and where an event is about.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Subject {
    /// Connection id, shared by every event of one SSH connection.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ip: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
}

/// What happened.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    ServiceStarted {
        listen: String,
        host_key_fingerprint: String,
        users: usize,
    },
    Connect {
        port: u16,
    },
    AuthAccepted {
        method: String,
        key_fingerprint: String,
    },
    AuthRefused {
        method: String,
        reason: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        key_fingerprint: Option<String>,
    },
    IpRefused {
        reason: String,
    },
    ChannelRefused {
        request: String,
    },
    /// A connection closed before SSH started: a banned address or too many waiting logins.
    ConnectionRefused {
        reason: String,
    },
    /// A connection that did not log in within `limits.auth_timeout` was closed.
    AuthTimeout {
        seconds: u64,
    },
    Open {
        path: String,
        mode: &'static str,
    },
    Close {
        path: String,
        bytes: u64,
        sha256: String,
        job: i64,
    },
    UploadAborted {
        path: String,
        bytes_received: u64,
        reason: String,
    },
    Download {
        path: String,
        bytes: u64,
    },
    Rename {
        from: String,
        to: String,
    },
    Remove {
        path: String,
    },
    Mkdir {
        path: String,
    },
    Rmdir {
        path: String,
    },
    Disconnect {
        #[serde(skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
    /// A file found in landing without a job was given one at start.
    Adopted {
        job: i64,
        path: String,
        bytes: u64,
    },
    Scanned {
        job: i64,
        path: String,
        verdict: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        signature: Option<String>,
        engine: String,
        scan_ms: i64,
    },
    Delivered {
        job: i64,
        path: String,
        bytes: u64,
        sha256: String,
        destination: String,
    },
    Quarantined {
        job: i64,
        path: String,
        bytes: u64,
        sha256: String,
        /// `infected` or `unscannable`.
        reason: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        signature: Option<String>,
    },
    JobRetrying {
        job: i64,
        path: String,
        attempts: u32,
        retry_in_ms: u64,
        error: String,
    },
    JobFailed {
        job: i64,
        path: String,
        attempts: u32,
        error: String,
    },
    /// An operator asked for a job to be tried again.
    JobRetryRequested {
        job: i64,
    },
    /// The users were read again (SIGHUP or `ingestion reload`).
    UsersReloaded {
        users: usize,
    },
    /// A reload found an invalid configuration; the previous users stay in force.
    ReloadRejected {
        error: String,
    },
    UserAdded {
        username: String,
        key_fingerprints: Vec<String>,
    },
    UserRemoved {
        username: String,
    },
    /// An alert was refused for good (e.g. a 4xx answer); it is not retried.
    AlertFailed {
        event_id: String,
        channel: String,
        kind: String,
        error: String,
    },
    /// A job has been failing for longer than `notify.stuck_after`; reported once.
    JobStuck {
        job: i64,
        path: String,
        error: String,
    },
}

#[derive(Serialize)]
struct Line<'a> {
    time: String,
    #[serde(flatten)]
    subject: &'a Subject,
    #[serde(flatten)]
    event: &'a Event,
}

/// The audit sink.
#[derive(Debug)]
pub struct Audit {
    file: Mutex<File>,
}

#[derive(Debug, thiserror::Error)]
#[error("cannot open the audit log {path}: {source}")]
pub struct AuditError {
    path: String,
    source: std::io::Error,
}

impl Audit {
    /// Opens (creating if needed) the audit file for appending.
    pub fn open(path: &Path) -> Result<Audit, AuditError> {
        let error = |source| AuditError {
            path: path.display().to_string(),
            source,
        };
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(error)?;
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(error)?;
        Ok(Audit {
            file: Mutex::new(file),
        })
    }

    /// Records one event.
    pub fn record(&self, subject: &Subject, event: Event) {
        let line = Line {
            time: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
            subject,
            event: &event,
        };
        let mut text = match serde_json::to_string(&line) {
            Ok(text) => text,
            Err(error) => {
                tracing::error!(%error, ?event, "cannot serialise an audit event");
                return;
            }
        };
        tracing::info!(target: "audit", "{text}");
        text.push('\n');
        let written = match self.file.lock() {
            Ok(mut file) => file.write_all(text.as_bytes()),
            Err(poisoned) => poisoned.into_inner().write_all(text.as_bytes()),
        };
        if let Err(error) = written {
            tracing::error!(%error, "cannot append to the audit log");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_one_json_line_per_event() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit/audit.jsonl");
        let audit = Audit::open(&path).unwrap();
        let subject = Subject {
            session: Some("s1".into()),
            ip: Some("127.0.0.1".into()),
            user: Some("acme".into()),
        };
        audit.record(
            &subject,
            Event::Remove {
                path: "/a b.csv".into(),
            },
        );
        audit.record(&Subject::default(), Event::Disconnect { error: None });
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["event"], "remove");
        assert_eq!(lines[0]["user"], "acme");
        assert_eq!(lines[0]["path"], "/a b.csv");
        assert!(lines[1].get("user").is_none());
    }
}

//! The audit trail: one JSON line per event, appended to the audit file and echoed to the log.
//!
//! Owns the event vocabulary (what happened, to whom, from where) and the file format. Each line
//! carries `prev`, the SHA-256 of the line before it (64 zeros for the first), so [`verify`] detects
//! any edited, removed or reordered line. Writers (the service and CLI commands) take an exclusive
//! `flock` on the file to read the last line and append, so the chain holds across processes.
//! Callers say what happened; they never format lines themselves. An audit write failure is logged
//! loudly but never stops a transfer that is already durable.

use std::fs::OpenOptions;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use nix::fcntl::{Flock, FlockArg};
use serde::Serialize;
use sha2::{Digest, Sha256};

/// The `prev` of the first line.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

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

impl Subject {
    /// An event about a user's files, outside any connection (the pipeline, the notifier).
    pub fn of_user(username: &str) -> Subject {
        Subject {
            user: Some(username.to_string()),
            ..Subject::default()
        }
    }
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
    /// The connection ended before CLOSE: the bytes stored are kept for a resume.
    UploadInterrupted {
        path: String,
        bytes_received: u64,
        bytes_stored: u64,
    },
    /// An interrupted upload was opened again to carry on from `from`.
    UploadResumed {
        path: String,
        from: u64,
    },
    /// An interrupted upload was thrown away by its owner (upload again with truncation, or rm).
    PartialDiscarded {
        path: String,
        bytes_stored: u64,
        reason: String,
    },
    /// An interrupted upload nobody resumed within `server.partial_retention` was removed.
    PartialExpired {
        path: String,
        bytes_stored: u64,
        retention: String,
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
    /// SIGTERM or SIGINT: no new connections; open ones have `drain` to finish.
    ServiceStopping {
        drain: String,
    },
    /// The process is exiting: connections still open after the drain were cut, and this node's
    /// job and alert leases were handed back.
    ServiceStopped {
        connections_cut: usize,
        leases_released: u64,
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
    prev: &'a str,
    #[serde(flatten)]
    subject: &'a Subject,
    #[serde(flatten)]
    event: &'a Event,
}

/// The audit sink.
#[derive(Debug)]
pub struct Audit {
    path: PathBuf,
    /// Serialises this process's writers (the flock serialises processes).
    writing: Mutex<()>,
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
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(error)?;
        Ok(Audit {
            path: path.to_path_buf(),
            writing: Mutex::new(()),
        })
    }

    /// Appends `event` chained to the last line, under an exclusive lock on the file.
    fn append(&self, subject: &Subject, event: &Event) -> std::io::Result<String> {
        let _writing = match self.writing.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        let file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&self.path)?;
        let mut file = Flock::lock(file, FlockArg::LockExclusive)
            .map_err(|(_, errno)| std::io::Error::from(errno))?;
        let prev = last_line_hash(&mut file)?;
        let line = Line {
            time: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
            prev: &prev,
            subject,
            event,
        };
        let mut text = serde_json::to_string(&line).map_err(std::io::Error::other)?;
        let logged = text.clone();
        text.push('\n');
        file.write_all(text.as_bytes())?;
        Ok(logged)
    }

    /// Records one event.
    pub fn record(&self, subject: &Subject, event: Event) {
        match self.append(subject, &event) {
            Ok(line) => tracing::info!(target: "audit", "{line}"),
            Err(error) => tracing::error!(%error, ?event, "cannot append to the audit log"),
        }
    }
}

/// SHA-256 (hex) of the file's last line, or [`GENESIS`] for an empty file.
fn last_line_hash(file: &mut std::fs::File) -> std::io::Result<String> {
    let length = file.seek(SeekFrom::End(0))?;
    let mut window = 4096u64;
    loop {
        let start = length.saturating_sub(window);
        file.seek(SeekFrom::Start(start))?;
        let mut tail = Vec::new();
        file.read_to_end(&mut tail)?;
        let text = tail.strip_suffix(b"\n").unwrap_or(&tail);
        if text.is_empty() {
            return Ok(GENESIS.to_string());
        }
        match text.iter().rposition(|&b| b == b'\n') {
            Some(newline) => return Ok(line_hash(text.get(newline + 1..).unwrap_or_default())),
            None if start == 0 => return Ok(line_hash(text)),
            None => window = window.saturating_mul(4),
        }
    }
}

fn line_hash(line: &[u8]) -> String {
    crate::storage::hex(&Sha256::digest(line))
}

/// What [`verify`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Every line chains to the one before it.
    Intact { lines: usize },
    /// The first line (1-based) whose `prev` does not match, and why.
    Broken { line: usize, reason: String },
}

/// Checks the whole chain of an audit file.
pub fn verify(path: &Path) -> std::io::Result<Verdict> {
    let text = std::fs::read(path)?;
    let mut expected = GENESIS.to_string();
    let mut count = 0;
    for (index, line) in text.split(|&b| b == b'\n').enumerate() {
        if line.is_empty() {
            continue;
        }
        count += 1;
        let number = index + 1;
        let value: serde_json::Value = match serde_json::from_slice(line) {
            Ok(value) => value,
            Err(error) => {
                return Ok(Verdict::Broken {
                    line: number,
                    reason: format!("not a JSON line ({error})"),
                });
            }
        };
        let prev = value
            .get("prev")
            .and_then(serde_json::Value::as_str)
            .unwrap_or_default();
        if prev != expected {
            return Ok(Verdict::Broken {
                line: number,
                reason: "its `prev` does not match the line before it: a line was edited, removed or reordered here"
                    .into(),
            });
        }
        expected = line_hash(line);
    }
    Ok(Verdict::Intact { lines: count })
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
        assert_eq!(lines[0]["prev"], GENESIS);
        assert_eq!(verify(&path).unwrap(), Verdict::Intact { lines: 2 });
        assert_eq!(lines[0]["event"], "remove");
        assert_eq!(lines[0]["user"], "acme");
        assert_eq!(lines[0]["path"], "/a b.csv");
        assert!(lines[1].get("user").is_none());
    }

    #[test]
    fn verify_detects_edits_removals_and_reordering() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let audit = Audit::open(&path).unwrap();
        for n in 0..4 {
            audit.record(
                &Subject::default(),
                Event::Remove {
                    path: format!("/f{n}"),
                },
            );
        }
        // A second writer (another process in real life) continues the same chain.
        Audit::open(&path)
            .unwrap()
            .record(&Subject::default(), Event::Remove { path: "/g".into() });
        assert_eq!(verify(&path).unwrap(), Verdict::Intact { lines: 5 });
        let original = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = original.lines().collect();
        let check = |text: String, broken_at: usize| {
            std::fs::write(&path, text).unwrap();
            match verify(&path).unwrap() {
                Verdict::Broken { line, .. } => assert_eq!(line, broken_at),
                intact => panic!("tampering not detected: {intact:?}"),
            }
        };
        check(original.replacen("/f1", "/f9", 1), 3);
        check(
            format!("{}\n{}\n{}\n{}\n", lines[0], lines[2], lines[3], lines[4]),
            2,
        );
        check(
            format!(
                "{}\n{}\n{}\n{}\n{}\n",
                lines[0], lines[2], lines[1], lines[3], lines[4]
            ),
            2,
        );
    }
}

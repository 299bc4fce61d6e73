//! The audit trail: one JSON line per event, appended to the audit file and echoed to the log.
//!
//! Owns the event vocabulary (what happened, to whom, from where) and the file format. Each line
//! carries `prev`, the SHA-256 of the line before it (64 zeros for the first), so [`verify`] detects
//! any edited, removed or reordered line. Writers (the service and CLI commands) take an exclusive
//! `flock` on the file to read the last line and append, so the chain holds across processes.
//! Callers say what happened; they never format lines themselves. An audit write failure is logged
//! loudly but never stops a transfer that is already durable.
//!
//! The service also copies every line to the state database ([`Audit::copy_to_database`]), so that
//! the events of all nodes can be searched in one place (admin API, dashboard). The copy is made in
//! the background through a bounded queue, and trimmed to `[admin] audit_retention`
//! ([`trim_database_copy`]); the file stays the record of truth.

use std::fs::OpenOptions;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use nix::fcntl::{Flock, FlockArg};

use crate::state::{AuditRecord, State};
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
        /// Where the admin plane listens, when it does.
        #[serde(skip_serializing_if = "Option::is_none")]
        admin: Option<String>,
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
    /// An SFTP session was ended for breaking the protocol (a packet over the size limit).
    ProtocolError {
        reason: String,
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
    /// A scan found the scanner unreachable: this node scans nothing more until it answers (files
    /// wait in landing; those already scanned are still routed).
    ScannerUnavailable {
        error: String,
    },
    /// The scanner answers again; scanning resumes.
    ScannerAvailable {
        unavailable_ms: u64,
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
    /// The admin dashboard was signed in to.
    AdminLogin {},
    /// A request to the admin API or dashboard was refused (missing or wrong token).
    AdminRefused {
        path: String,
        reason: String,
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

/// The fields of a line the database copy is searched by.
#[derive(serde::Deserialize)]
struct LineKeys {
    event: String,
    job: Option<i64>,
}

/// The audit sink.
#[derive(Debug)]
pub struct Audit {
    path: PathBuf,
    /// Serialises this process's writers (the flock serialises processes).
    writing: Mutex<()>,
    /// The queue to the database copier, when there is one.
    copies: Mutex<Option<DatabaseCopier>>,
}

#[derive(Debug)]
struct DatabaseCopier {
    queue: tokio::sync::mpsc::Sender<AuditRecord>,
    task: tokio::task::JoinHandle<()>,
}

/// Lines waiting for the database beyond this are not copied (and counted); the file has them.
const COPY_QUEUE: usize = 8192;

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
            copies: Mutex::new(None),
        })
    }

    /// From now on, copies every line to the state database as well, in the background.
    pub fn copy_to_database(&self, state: State) {
        let (queue, lines) = tokio::sync::mpsc::channel(COPY_QUEUE);
        let task = tokio::spawn(copy_lines(state, lines));
        *lock(&self.copies) = Some(DatabaseCopier { queue, task });
    }

    /// Waits (up to `patience`) for the lines queued for the database to be stored, then stops
    /// copying.
    pub async fn finish_copying(&self, patience: Duration) {
        let copier = lock(&self.copies).take();
        if let Some(DatabaseCopier { queue, task }) = copier {
            drop(queue);
            if tokio::time::timeout(patience, task).await.is_err() {
                tracing::warn!(
                    "audit lines were still waiting for the database at exit; the audit file has them"
                );
            }
        }
    }

    /// Appends `event` chained to the last line, under an exclusive lock on the file.
    fn append(&self, subject: &Subject, event: &Event) -> std::io::Result<AuditRecord> {
        let _writing = lock(&self.writing);
        let file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&self.path)?;
        let mut file = Flock::lock(file, FlockArg::LockExclusive)
            .map_err(|(_, errno)| std::io::Error::from(errno))?;
        let prev = last_line_hash(&mut file)?;
        let time = humantime::format_rfc3339_millis(SystemTime::now()).to_string();
        let line = Line {
            time: time.clone(),
            prev: &prev,
            subject,
            event,
        };
        // Serialised from the struct, so that fields keep their order (time first) in the file.
        let text = serde_json::to_string(&line).map_err(std::io::Error::other)?;
        file.write_all(format!("{text}\n").as_bytes())?;
        let keys: LineKeys = serde_json::from_str(&text).map_err(std::io::Error::other)?;
        Ok(AuditRecord {
            time,
            event: keys.event,
            username: subject.user.clone(),
            job: keys.job,
            line: text,
        })
    }

    /// Records one event.
    pub fn record(&self, subject: &Subject, event: Event) {
        crate::telemetry::audited(&event);
        match self.append(subject, &event) {
            Ok(record) => {
                tracing::info!(target: "audit", "{}", record.line);
                if let Some(copier) = lock(&self.copies).as_ref()
                    && copier.queue.try_send(record).is_err()
                {
                    crate::telemetry::audit_copy_dropped();
                    tracing::error!(
                        "the state database is not keeping up with audit lines; this one is only in the audit file"
                    );
                }
            }
            Err(error) => tracing::error!(%error, ?event, "cannot append to the audit log"),
        }
    }
}

/// How long a CLI command waits for the state database to store its audit line.
const CLI_COPY_PATIENCE: Duration = Duration::from_secs(10);

impl Audit {
    /// Records one event of a CLI command (a user added or removed, a retry requested) and copies
    /// its line to the state database of `database` directly, since no copier runs in the CLI. The
    /// file is written first and is enough: a database that cannot be reached (within 10 s) only
    /// costs the copy, with a warning.
    pub async fn record_from_cli(
        &self,
        database: &crate::config::Database,
        subject: &Subject,
        event: Event,
    ) {
        let record = match self.append(subject, &event) {
            Ok(record) => record,
            Err(error) => {
                tracing::error!(%error, ?event, "cannot append to the audit log");
                return;
            }
        };
        let copy = async {
            let state = State::open(database).await?;
            state.insert_audit_events(&[record]).await
        };
        match tokio::time::timeout(CLI_COPY_PATIENCE, copy).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::warn!(
                %error,
                "the audit line is in the audit file but could not be copied to the state database"
            ),
            Err(_) => tracing::warn!(
                "the audit line is in the audit file; the state database did not answer in time to copy it"
            ),
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match mutex.lock() {
        Ok(guard) => guard,
        Err(poisoned) => poisoned.into_inner(),
    }
}

/// The most lines stored in one statement.
const COPY_BATCH: usize = 512;

/// How long the copier lets lines gather before storing them: a burst of events (an upload's open,
/// close and verdict) becomes one database write instead of one each. The file already holds them.
const COPY_LINGER: Duration = Duration::from_millis(100);

/// Stores queued lines in batches until the queue closes, retrying a batch the database refused.
async fn copy_lines(state: State, mut lines: tokio::sync::mpsc::Receiver<AuditRecord>) {
    let mut batch = Vec::new();
    while lines.recv_many(&mut batch, COPY_BATCH).await > 0 {
        let linger = tokio::time::sleep(COPY_LINGER);
        tokio::pin!(linger);
        while batch.len() < COPY_BATCH {
            let room = COPY_BATCH - batch.len();
            tokio::select! {
                () = &mut linger => break,
                received = lines.recv_many(&mut batch, room) => {
                    if received == 0 {
                        break;
                    }
                }
            }
        }
        let mut delay = Duration::from_millis(100);
        while let Err(error) = state.insert_audit_events(&batch).await {
            if lines.is_closed() && delay > Duration::from_secs(2) {
                tracing::error!(%error, lines = batch.len(), "audit lines not copied to the database at exit; the audit file has them");
                return;
            }
            tracing::warn!(%error, "cannot copy audit lines to the database; retrying");
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(10));
        }
        batch.clear();
    }
}

/// How often the database copy is trimmed to its retention.
const TRIM_EVERY: Duration = Duration::from_secs(3600);

/// Lines deleted per statement, so that trimming never holds the database for long.
const TRIM_BATCH: u32 = 5000;

/// Deletes, every hour and at start, the copied lines older than `retention` from the state
/// database (`[admin] audit_retention`). The audit file is not touched: it keeps every line.
pub async fn trim_database_copy(state: State, retention: Duration) {
    loop {
        let before = crate::state::time_ago(retention);
        let mut deleted = 0u64;
        loop {
            match state.delete_audit_events_before(&before, TRIM_BATCH).await {
                Ok(count) => {
                    deleted += count;
                    if count < u64::from(TRIM_BATCH) {
                        break;
                    }
                }
                Err(error) => {
                    tracing::warn!(%error, "cannot trim the audit lines copied to the database; trying again later");
                    break;
                }
            }
        }
        if deleted > 0 {
            tracing::info!(deleted, %before, "trimmed audit lines copied to the database");
        }
        tokio::time::sleep(TRIM_EVERY).await;
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
        assert!(text.starts_with("{\"time\":"), "time comes first: {text}");
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

//! The pipeline: claims landed jobs, scans them and routes them — clean files to the user's
//! destination, infected and unscannable ones to quarantine — exactly once, surviving crashes.
//!
//! Workers take jobs with leases (`state::jobs`), renew them while they work, and retry failures
//! with exponential backoff up to a cap; a job that keeps failing becomes `failed` (audited, shown by
//! `ingestion transfers`, retried on operator command). On start, [`Pipeline::reconcile`] gives a job
//! to every landed file that has none.
//!
//! Architecture invariants: the pipeline never speaks SSH; nothing is routed without a recorded
//! verdict, and the route follows the recorded verdict only (so a retry can never send one file to
//! both places); a file is removed from landing only after its copy is complete and verified.

mod gate;
mod steps;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::TryStreamExt;
use tokio::sync::Notify;

use crate::audit::{Audit, Event, Subject};
use crate::config::SharedUsers;
use crate::scan::{ScanError, Scanner};
use crate::state::{Claimable, Job, JobState, State, StateError};
use crate::storage::{Bucket, Location, StorageError};
use gate::ScannerGate;

/// How the pipeline runs.
///
/// # Defaults
/// 2 workers, 60 s leases, retries after 1 s doubling up to 60 s, `failed` after 20 attempts.
#[derive(Debug, Clone)]
pub struct Settings {
    pub workers: usize,
    pub lease: Duration,
    pub retry_base: Duration,
    pub retry_cap: Duration,
    pub max_attempts: u32,
}

impl Default for Settings {
    fn default() -> Settings {
        Settings {
            workers: 2,
            lease: Duration::from_secs(60),
            retry_base: Duration::from_secs(1),
            retry_cap: Duration::from_secs(60),
            max_attempts: 20,
        }
    }
}

impl Settings {
    /// The wait before the next attempt after `attempts` failures.
    pub fn backoff(&self, attempts: u32) -> Duration {
        let factor = 2u32.saturating_pow(attempts.min(16));
        self.retry_base.saturating_mul(factor).min(self.retry_cap)
    }
}

/// Why one step of a job did not complete; the job is retried later.
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    #[error(transparent)]
    Scan(#[from] crate::scan::ScanError),
    #[error("storage: {0}")]
    Store(#[from] object_store::Error),
    #[error("copy: {0}")]
    Copy(#[from] crate::storage::UploadError),
    #[error("{0}")]
    Open(#[from] StorageError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error("{0}")]
    Other(String),
    /// Another worker owns the job now; this one must change nothing.
    #[error("the job's lease was lost")]
    LeaseLost,
}

pub struct Pipeline {
    state: State,
    landing: Bucket,
    quarantine: Bucket,
    users: Arc<SharedUsers>,
    scanner: Scanner,
    audit: Arc<Audit>,
    settings: Settings,
    landed: Arc<Notify>,
    node: String,
    destinations: Mutex<HashMap<(Location, Option<String>), Bucket>>,
    /// Operators' alert targets (every user's files).
    operators: Vec<crate::config::NotifyTarget>,
    /// Held upload names, and how long they may sit before being processed anyway.
    temporary_names: crate::config::TemporaryNames,
    on_conflict: crate::config::OnConflict,
    /// Test hook (`INGESTION_FAILPOINT`) for a test that kills the process at that point.
    failpoint: Failpoint,
    /// Closed while the scanner is unreachable: workers then only route.
    gate: ScannerGate,
    /// Wakes the probe when the gate closes.
    gate_closed: Notify,
}

/// How old a file in landing without a job must be before it is adopted as an orphan.
pub const ORPHAN_GRACE: Duration = Duration::from_secs(60);
/// How long the scanner gate's probe waits for an answer to one PING.
const PROBE_PATIENCE: Duration = Duration::from_secs(10);
/// How often landing is checked for orphans while running.
const RECONCILE_EVERY: Duration = Duration::from_secs(300);

/// Where a test asks the pipeline to stop for good (`INGESTION_FAILPOINT`), so that it can kill the
/// process there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Failpoint {
    None,
    /// `pause-after-copy`: between the copy to the destination and the delete from landing.
    PauseAfterCopy,
    /// `pause-mid-copy`: once the copy's multipart upload is recorded.
    PauseMidCopy,
}

impl Pipeline {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        state: State,
        landing: Bucket,
        quarantine: Bucket,
        users: Arc<SharedUsers>,
        scanner: Scanner,
        audit: Arc<Audit>,
        settings: Settings,
        landed: Arc<Notify>,
        operators: Vec<crate::config::NotifyTarget>,
        temporary_names: crate::config::TemporaryNames,
        on_conflict: crate::config::OnConflict,
    ) -> Pipeline {
        let node: [u8; 4] = rand::random();
        Pipeline {
            state,
            landing,
            quarantine,
            users,
            scanner,
            audit,
            settings,
            landed,
            node: format!("node-{}", crate::storage::hex(&node)),
            destinations: Mutex::new(HashMap::new()),
            operators,
            temporary_names,
            on_conflict,
            failpoint: match std::env::var("INGESTION_FAILPOINT").as_deref() {
                Ok("pause-after-copy") => Failpoint::PauseAfterCopy,
                Ok("pause-mid-copy") => Failpoint::PauseMidCopy,
                _ => Failpoint::None,
            },
            gate: ScannerGate::default(),
            gate_closed: Notify::new(),
        }
    }

    /// Gives a job to every file in landing that has none (a node died between storing a file and
    /// recording it). Files younger than [`ORPHAN_GRACE`] are left for a later pass: another node may
    /// be recording them right now. Returns how many were adopted.
    pub async fn reconcile(&self) -> Result<usize, StepError> {
        let young = crate::state::ms_ago(ORPHAN_GRACE);
        let prefix = self.landing.key::<&str>(&[]);
        let prefix_len = prefix.parts().count();
        let mut objects = self
            .landing
            .store()
            .list((prefix_len > 0).then_some(&prefix));
        let mut adopted = 0;
        while let Some(object) = objects.try_next().await? {
            if object.last_modified.timestamp_millis() > young
                || object
                    .location
                    .filename()
                    .is_some_and(crate::storage::is_staging_name)
            {
                continue;
            }
            let parts: Vec<String> = object
                .location
                .parts()
                .skip(prefix_len)
                .map(|part| part.as_ref().to_string())
                .collect();
            let Some((username, path)) = parts.split_first() else {
                continue;
            };
            if path.is_empty() || crate::config::check_username(username).is_err() {
                tracing::warn!(object = %object.location, "an object in landing is outside every home; left alone");
                continue;
            }
            let path = path.join("/");
            if let Some(job) = self
                .state
                .adopt_orphan(
                    username,
                    &path,
                    object.size,
                    self.temporary_names.matches(&path),
                )
                .await?
            {
                adopted += 1;
                self.audit.record(
                    &Subject::of_user(username),
                    Event::Adopted {
                        job,
                        path: format!("/{path}"),
                        bytes: object.size,
                    },
                );
            }
        }
        Ok(adopted)
    }

    /// This process's name in lease owners: its workers are `<node>/worker-<n>`.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// Runs the workers forever.
    pub async fn run(self: Arc<Self>) {
        let mut workers = tokio::task::JoinSet::new();
        for index in 0..self.settings.workers.max(1) {
            workers.spawn(self.clone().worker(index));
        }
        workers.spawn(self.clone().release_idle_held_forever());
        workers.spawn(self.clone().reconcile_forever());
        workers.spawn(self.clone().probe_scanner_forever());
        while workers.join_next().await.is_some() {}
    }

    async fn worker(self: Arc<Self>, index: usize) {
        let owner = format!("{}/worker-{index}", self.node);
        loop {
            let claimable = match self.gate.is_open() {
                true => Claimable::All,
                false => Claimable::Scanned,
            };
            match self
                .state
                .claim(&owner, self.settings.lease, claimable)
                .await
            {
                Ok(Some(job)) => {
                    // Another idle worker may take the next job at once.
                    self.landed.notify_one();
                    self.process(&owner, job).await;
                }
                Ok(None) => {
                    tokio::select! {
                        () = self.landed.notified() => {}
                        () = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
                Err(error) => {
                    tracing::error!(%error, "cannot claim jobs; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }

    /// Adopts orphans every [`RECONCILE_EVERY`], so that a file a dead node stored but never
    /// recorded is processed by the nodes still running, not only at the next start.
    async fn reconcile_forever(self: Arc<Self>) {
        loop {
            tokio::time::sleep(RECONCILE_EVERY).await;
            match self.reconcile().await {
                Ok(0) => {}
                Ok(adopted) => {
                    tracing::warn!(adopted, "files in landing had no job; they were given one");
                    self.landed.notify_one();
                }
                Err(error) => tracing::warn!(%error, "cannot reconcile landing with the jobs"),
            }
        }
    }

    /// While the gate is closed, asks the scanner whether it answers; opens the gate when it does.
    async fn probe_scanner_forever(self: Arc<Self>) {
        let every = ScannerGate::probe_every(self.settings.retry_base);
        loop {
            self.gate_closed.notified().await;
            while !self.gate.is_open() {
                tokio::time::sleep(every).await;
                // A scanner that takes a connection and never answers must not stall the probe.
                let answered = tokio::time::timeout(PROBE_PATIENCE, self.scanner.ping()).await;
                if matches!(answered, Ok(Ok(()))) {
                    let unavailable = self.gate.open();
                    tracing::info!(?unavailable, "the scanner answers again; scanning resumes");
                    self.audit.record(
                        &Subject::default(),
                        Event::ScannerAvailable {
                            unavailable_ms: u64::try_from(unavailable.as_millis())
                                .unwrap_or(u64::MAX),
                        },
                    );
                    self.landed.notify_waiters();
                }
            }
        }
    }

    /// Files left under a temporary name past the timeout are processed under that name.
    async fn release_idle_held_forever(self: Arc<Self>) {
        let timeout = self.temporary_names.timeout;
        let period = (timeout / 4).clamp(Duration::from_millis(200), Duration::from_secs(30));
        loop {
            tokio::time::sleep(period).await;
            let cutoff = crate::state::time_ago(timeout);
            match self.state.release_idle_held(&cutoff).await {
                Ok(0) => {}
                Ok(released) => {
                    tracing::info!(
                        released,
                        "files under temporary names were never renamed; processing them"
                    );
                    self.landed.notify_one();
                }
                Err(error) => tracing::error!(%error, "cannot release idle temporary files"),
            }
        }
    }

    /// Works on one claimed job, renewing its lease meanwhile, and records a failure for a retry.
    async fn process(&self, owner: &str, job: Job) {
        let renewer = {
            let state = self.state.clone();
            let (id, owner, lease) = (job.id, owner.to_string(), self.settings.lease);
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(lease / 3).await;
                    match state.renew(id, &owner, lease).await {
                        Ok(true) => {}
                        // Lost: another worker owns the job; every later step of ours is refused.
                        Ok(false) => break,
                        // A passing database error: try again at the next tick, well before expiry.
                        Err(error) => {
                            tracing::warn!(job = id, %error, "cannot renew a lease; retrying")
                        }
                    }
                }
            })
        };
        let result = self.work(owner, &job).await;
        renewer.abort();
        let error = match result {
            Ok(()) | Err(StepError::LeaseLost) => return,
            Err(error) => {
                if let StepError::Scan(ScanError::Unreachable(_)) = error
                    && self.gate.close()
                {
                    tracing::warn!(%error, "scanning is paused until the scanner answers");
                    self.audit.record(
                        &Subject::default(),
                        Event::ScannerUnavailable {
                            error: error.to_string(),
                        },
                    );
                    self.gate_closed.notify_one();
                }
                error.to_string()
            }
        };
        let subject = Subject::of_user(&job.username);
        let backoff = self.settings.backoff(job.attempts);
        match self
            .state
            .record_failure(job.id, owner, &error, backoff, self.settings.max_attempts)
            .await
        {
            Ok(Some((JobState::Failed, attempts))) => {
                tracing::error!(job = job.id, %error, "a job failed for good");
                self.audit.record(
                    &subject,
                    Event::JobFailed {
                        job: job.id,
                        path: format!("/{}", job.path),
                        attempts,
                        error,
                    },
                );
            }
            Ok(Some((_, attempts))) => {
                tracing::warn!(job = job.id, %error, ?backoff, "a job step failed; it will be retried");
                self.audit.record(
                    &subject,
                    Event::JobRetrying {
                        job: job.id,
                        path: format!("/{}", job.path),
                        attempts,
                        retry_in_ms: u64::try_from(backoff.as_millis()).unwrap_or(u64::MAX),
                        error,
                    },
                );
            }
            Ok(None) => {}
            Err(state_error) => {
                tracing::error!(%state_error, job = job.id, "cannot record a failed step")
            }
        }
    }

    /// The user's destination bucket, opened once per location and KMS key.
    fn destination(
        &self,
        location: &Location,
        kms_key: Option<&str>,
    ) -> Result<Bucket, StorageError> {
        let key = (location.clone(), kms_key.map(str::to_string));
        if let Ok(cache) = self.destinations.lock()
            && let Some(bucket) = cache.get(&key)
        {
            return Ok(bucket.clone());
        }
        let bucket = Bucket::open_with_kms(location, kms_key)?;
        if let Ok(mut cache) = self.destinations.lock() {
            cache.insert(key, bucket.clone());
        }
        Ok(bucket)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let settings = Settings::default();
        let waits: Vec<u64> = (0..9).map(|n| settings.backoff(n).as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
        assert_eq!(settings.backoff(u32::MAX).as_secs(), 60);
    }
}

//! The job life cycle: one row per acknowledged upload, moved through its states by leases.
//!
//! ```text
//! held ──renamed or idle──▶ landed ──scan──▶ clean | infected | unscannable ──route──▶ delivered | quarantined
//!                             │                         (verdict kept)                      (final)
//!    ├──▶ superseded (the same path was uploaded again before processing)
//!    ├──▶ removed    (its owner removed it before processing)
//!    └──▶ failed     (too many attempts; `retry` puts it back where it was)
//! ```
//!
//! A worker owns a job only while it holds an unexpired lease (owner + deadline), taken and checked in
//! single statements, so two workers never process one job and a dead worker's job is taken over once
//! its lease expires. Every step that changes a job names the lease owner, so a worker that lost its
//! lease changes nothing. The SFTP side takes the same leases ("holds") on a path before it replaces,
//! renames or removes a file, so a file is never changed under a worker processing it.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sqlx::Row;
use sqlx::any::AnyRow;

use super::{NewAlert, State, StateError, now};

/// States in which a job still needs work (a macro so that queries stay `&'static str` via `concat!`).
macro_rules! open_states {
    () => {
        "('landed', 'clean', 'infected', 'unscannable')"
    };
}

/// The open states of jobs with a recorded verdict: they need routing, not the scanner.
macro_rules! scanned_states {
    () => {
        "('clean', 'infected', 'unscannable')"
    };
}

/// The condition of a stuck job, received before `$1`: still unfinished or failed, after at least
/// one attempt. What stuck alerts report and the dashboard lists.
macro_rules! stuck_since {
    () => {
        concat!(
            "(state IN ",
            open_states!(),
            " OR state = 'failed') AND attempts > 0 AND received_at < $1"
        )
    };
}

/// States of the jobs that get a receipt: all but those that never reached the pipeline because
/// a later upload replaced their bytes (`superseded`) or their owner removed the file (`removed`).
macro_rules! receipt_states {
    () => {
        "('held', 'landed', 'clean', 'infected', 'unscannable', 'delivered', 'quarantined', 'failed')"
    };
}

/// Every column of a job row, in the order `job_from_row` reads them by name.
macro_rules! columns {
    () => {
        "id, username, path, size, sha256, state, session, received_at, updated_at, attempts, \
         last_error, verdict, signature, engine, scanned_at, scan_ms, routed_to, copied_at, finished_at, route_key, copy_upload"
    };
}

/// The condition "the row's `path` is `$p` or below it (`$p/...`)". On SQLite it starts with a
/// range on `path` so that the `(username, path)` index is used instead of reading every job of the
/// user; PostgreSQL's text order depends on the database's collation, so there only the exact test
/// is used.
macro_rules! at_or_below {
    (postgres, $p:literal) => {
        concat!(
            "(path = ",
            $p,
            " OR substr(path, 1, length(",
            $p,
            ") + 1) = ",
            $p,
            " || '/')"
        )
    };
    (sqlite, $p:literal) => {
        concat!(
            "path >= ",
            $p,
            " AND path < ",
            $p,
            " || '0' AND ",
            at_or_below!(postgres, $p)
        )
    };
}

/// `dialect.pick` of a query that tests "the row's `path` is `$p` or below it": the same text around
/// each dialect's [`at_or_below`].
macro_rules! at_or_below_query {
    ($dialect:expr, $p:literal, ($($before:tt)*), ($($after:tt)*)) => {
        $dialect.pick(
            concat!($($before)*, at_or_below!(sqlite, $p), $($after)*),
            concat!($($before)*, at_or_below!(postgres, $p), $($after)*),
        )
    };
}

/// The condition "another worker or session has this job" (binds `$3`: the holder, `$4`: now in
/// milliseconds): being scanned or routed, or held by someone else with an unexpired lease.
macro_rules! busy_for_others {
    () => {
        "(state IN ('clean', 'infected', 'unscannable') OR (lease_owner IS NOT NULL \
         AND lease_owner <> $3 AND lease_until >= $4))"
    };
}

/// Where a job is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JobState {
    /// Uploaded under a temporary name (`name.filepart`): waits for its rename, or its timeout.
    Held,
    Landed,
    Clean,
    Infected,
    Unscannable,
    Delivered,
    Quarantined,
    Failed,
    Superseded,
    Removed,
}

impl JobState {
    pub const ALL: [JobState; 10] = [
        JobState::Held,
        JobState::Landed,
        JobState::Clean,
        JobState::Infected,
        JobState::Unscannable,
        JobState::Delivered,
        JobState::Quarantined,
        JobState::Failed,
        JobState::Superseded,
        JobState::Removed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Held => "held",
            JobState::Landed => "landed",
            JobState::Clean => "clean",
            JobState::Infected => "infected",
            JobState::Unscannable => "unscannable",
            JobState::Delivered => "delivered",
            JobState::Quarantined => "quarantined",
            JobState::Failed => "failed",
            JobState::Superseded => "superseded",
            JobState::Removed => "removed",
        }
    }

    pub fn parse(text: &str) -> Option<JobState> {
        JobState::ALL
            .into_iter()
            .find(|state| state.as_str() == text)
    }
}

impl std::fmt::Display for JobState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.as_str())
    }
}

/// A scan result as recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Clean,
    Infected { signature: String },
    Unscannable { reason: String },
}

impl Verdict {
    pub fn state(&self) -> JobState {
        match self {
            Verdict::Clean => JobState::Clean,
            Verdict::Infected { .. } => JobState::Infected,
            Verdict::Unscannable { .. } => JobState::Unscannable,
        }
    }

    /// The signature (infected) or reason (unscannable).
    pub fn detail(&self) -> Option<&str> {
        match self {
            Verdict::Clean => None,
            Verdict::Infected { signature } => Some(signature),
            Verdict::Unscannable { reason } => Some(reason),
        }
    }
}

/// Everything known of one job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    pub id: i64,
    pub username: String,
    /// Path inside the user's home, `/`-separated, no leading `/`.
    pub path: String,
    pub size: u64,
    /// SHA-256 taken while the upload arrived (empty for a file found in landing without a job).
    pub sha256: String,
    pub state: JobState,
    pub session: String,
    pub received_at: String,
    pub updated_at: String,
    pub attempts: u32,
    pub last_error: Option<String>,
    pub verdict: Option<Verdict>,
    pub engine: Option<String>,
    pub scanned_at: Option<String>,
    pub scan_ms: Option<i64>,
    pub routed_to: Option<String>,
    /// The object key chosen for routing, kept so that a retry writes to the same place.
    pub route_key: Option<String>,
    /// The multipart upload of a copy under way (to `route_key` in the job's target).
    pub copy_upload: Option<String>,
    pub copied_at: Option<String>,
    pub finished_at: Option<String>,
}

#[cfg(test)]
impl Job {
    /// A job for unit tests of what shows jobs: `acme`'s 1234-byte `sub/data.csv`, received at
    /// 21:00:00.123 on 2026-12-04, in `state`, with nothing else recorded.
    pub(crate) fn example(state: JobState) -> Job {
        Job {
            id: 7,
            username: "acme".into(),
            path: "sub/data.csv".into(),
            size: 1234,
            sha256: "ab".repeat(32),
            state,
            session: "0123456789abcdef".into(),
            received_at: "2026-12-04T21:00:00.123Z".into(),
            updated_at: "2026-12-04T21:00:01.456Z".into(),
            attempts: 0,
            last_error: None,
            verdict: None,
            engine: None,
            scanned_at: None,
            scan_ms: None,
            routed_to: None,
            route_key: None,
            copy_upload: None,
            copied_at: None,
            finished_at: None,
        }
    }
}

/// A just-completed upload, about to become a job.
#[derive(Debug, Clone)]
pub struct NewJob<'a> {
    pub username: &'a str,
    /// The file's path inside the user's home, `/`-separated, without a leading `/`.
    pub path: &'a str,
    pub size: u64,
    pub sha256: &'a str,
    pub session: &'a str,
    /// Uploaded under a temporary name: held until renamed (or idle too long).
    pub held: bool,
    /// The writer token of the interrupted upload this completes, deleted with the recording.
    pub partial_writer: Option<&'a str>,
}

/// Which jobs to list.
#[derive(Debug, Clone, Default)]
pub struct JobFilter {
    pub username: Option<String>,
    pub state: Option<JobState>,
    /// Received at or after this RFC 3339 time.
    pub since: Option<String>,
    /// Only ids below this one: the next page after a page ending at this id.
    pub before_id: Option<i64>,
    pub limit: Option<u32>,
}

/// How many jobs are in one state, and their bytes.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct JobTotal {
    pub state: String,
    pub jobs: i64,
    pub bytes: i64,
}

/// The states of jobs the pipeline still has to finish.
const UNFINISHED: [JobState; 5] = [
    JobState::Landed,
    JobState::Clean,
    JobState::Infected,
    JobState::Unscannable,
    JobState::Failed,
];

/// A path is being processed by the pipeline and cannot be changed right now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathBusy;

/// Which jobs [`State::claim`] may take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claimable {
    /// Every job that needs work: to be scanned, or routed after its scan.
    All,
    /// Only jobs with a recorded verdict, which need routing and not the scanner.
    Scanned,
}

/// What [`State::hold_path`] took: whether there is anything for [`State::release_path`] to release.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub enum Held {
    /// The path had no unprocessed job.
    Nothing,
    /// The path's unprocessed jobs are held.
    Jobs,
}

fn unix_ms(at: SystemTime) -> i64 {
    at.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Now, in Unix milliseconds (the unit of the times compared in queries).
pub fn now_ms() -> i64 {
    unix_ms(SystemTime::now())
}

pub(super) fn later_ms(after: Duration) -> i64 {
    now_ms().saturating_add(i64::try_from(after.as_millis()).unwrap_or(i64::MAX))
}

/// The time `ago` before now, in Unix milliseconds (for cutoffs compared in queries).
pub fn ms_ago(ago: Duration) -> i64 {
    now_ms().saturating_sub(i64::try_from(ago.as_millis()).unwrap_or(i64::MAX))
}

fn job_from_row(row: &AnyRow) -> Result<Job, StateError> {
    let state: String = row.try_get("state")?;
    let verdict: Option<String> = row.try_get("verdict")?;
    let signature: Option<String> = row.try_get("signature")?;
    let verdict = match verdict.as_deref() {
        Some("clean") => Some(Verdict::Clean),
        Some("infected") => Some(Verdict::Infected {
            signature: signature.unwrap_or_default(),
        }),
        Some("unscannable") => Some(Verdict::Unscannable {
            reason: signature.unwrap_or_default(),
        }),
        _ => None,
    };
    Ok(Job {
        id: row.try_get("id")?,
        username: row.try_get("username")?,
        path: row.try_get("path")?,
        size: u64::try_from(row.try_get::<i64, _>("size")?).unwrap_or(0),
        sha256: row.try_get("sha256")?,
        state: JobState::parse(&state).unwrap_or(JobState::Failed),
        session: row.try_get("session")?,
        received_at: row.try_get("received_at")?,
        updated_at: row.try_get("updated_at")?,
        attempts: u32::try_from(row.try_get::<i64, _>("attempts")?).unwrap_or(u32::MAX),
        last_error: row.try_get("last_error")?,
        verdict,
        engine: row.try_get("engine")?,
        scanned_at: row.try_get("scanned_at")?,
        scan_ms: row.try_get("scan_ms")?,
        routed_to: row.try_get("routed_to")?,
        route_key: row.try_get("route_key")?,
        copy_upload: row.try_get("copy_upload")?,
        copied_at: row.try_get("copied_at")?,
        finished_at: row.try_get("finished_at")?,
    })
}

impl State {
    /// Records a completed upload as a `landed` job. Older `landed` jobs for the same path (held by
    /// `holder`, see [`State::hold_path`]) are marked `superseded`: their bytes were just replaced.
    pub async fn record_upload(&self, job: &NewJob<'_>, holder: &str) -> Result<i64, StateError> {
        self.record_upload_with_alerts(job, holder, |_| Vec::new())
            .await
    }

    /// [`State::record_upload`], queueing the alerts `alerts(job id)` in the same transaction.
    pub async fn record_upload_with_alerts(
        &self,
        job: &NewJob<'_>,
        holder: &str,
        alerts: impl FnOnce(i64) -> Vec<NewAlert>,
    ) -> Result<i64, StateError> {
        let now = now();
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "UPDATE jobs SET state = 'superseded', updated_at = $1, lease_owner = NULL, lease_until = NULL, \
             finished_at = $1 WHERE username = $2 AND path = $3 AND state IN ('landed', 'held') \
             AND (lease_owner IS NULL OR lease_owner = $4 OR lease_until < $5)",
        )
        .bind(&now)
        .bind(job.username)
        .bind(job.path)
        .bind(holder)
        .bind(now_ms())
        .execute(&mut *tx)
        .await?;
        let size = i64::try_from(job.size).unwrap_or(i64::MAX);
        let row = sqlx::query(
            "INSERT INTO jobs (username, path, size, sha256, state, session, received_at, updated_at) \
             VALUES ($1, $2, $3, $4, CASE WHEN $7 THEN 'held' ELSE 'landed' END, $5, $6, $6) RETURNING id",
        )
        .bind(job.username)
        .bind(job.path)
        .bind(size)
        .bind(job.sha256)
        .bind(job.session)
        .bind(&now)
        .bind(job.held)
        .fetch_one(&mut *tx)
        .await?;
        let id: i64 = row.try_get(0)?;
        if let Some(writer) = job.partial_writer {
            State::complete_partial(&mut tx, job.username, job.path, writer).await?;
        }
        State::insert_alerts(&mut tx, &alerts(id)).await?;
        tx.commit().await?;
        Ok(id)
    }

    /// Takes a hold on every unprocessed job of `path` (and, for a folder, below it) so that the
    /// pipeline leaves them alone while the SFTP side replaces, renames or removes the file. Fails
    /// with [`PathBusy`] when a job of that path is being scanned or routed. A path without jobs
    /// (the common case: a new file) costs one query and leaves nothing to release.
    pub async fn hold_path(
        &self,
        username: &str,
        path: &str,
        holder: &str,
        hold_for: Duration,
    ) -> Result<Result<Held, PathBusy>, StateError> {
        let row = sqlx::query(at_or_below_query!(
            self.dialect,
            "$2",
            (
                "SELECT COUNT(*), COALESCE(SUM(CASE WHEN ",
                busy_for_others!(),
                " THEN 1 ELSE 0 END), 0) FROM jobs WHERE username = $1 AND "
            ),
            (" AND state IN ('held', 'landed', 'clean', 'infected', 'unscannable')")
        ))
        .bind(username)
        .bind(path)
        .bind(holder)
        .bind(now_ms())
        .fetch_one(&self.pool)
        .await?;
        let (jobs, busy): (i64, i64) = (row.try_get(0)?, row.try_get(1)?);
        if busy > 0 {
            return Ok(Err(PathBusy));
        }
        if jobs == 0 {
            return Ok(Ok(Held::Nothing));
        }
        let now = now_ms();
        sqlx::query(at_or_below_query!(
            self.dialect,
            "$4",
            ("UPDATE jobs SET lease_owner = $1, lease_until = $2 WHERE username = $3 AND "),
            (" AND state IN ('landed', 'held') \
                 AND (lease_owner IS NULL OR lease_owner = $1 OR lease_until < $5)")
        ))
        .bind(holder)
        .bind(later_ms(hold_for))
        .bind(username)
        .bind(path)
        .bind(now)
        .execute(&self.pool)
        .await?;
        // The pipeline may have claimed a job between the count and the hold.
        let busy: i64 = sqlx::query(at_or_below_query!(
            self.dialect,
            "$2",
            ("SELECT COUNT(*) FROM jobs WHERE username = $1 AND "),
            (" AND state IN ('held', 'landed', 'clean', 'infected', 'unscannable') \
                 AND NOT (state IN ('landed', 'held') AND lease_owner = $3)")
        ))
        .bind(username)
        .bind(path)
        .bind(holder)
        .fetch_one(&self.pool)
        .await?
        .try_get(0)?;
        if busy > 0 {
            self.release_path(username, path, holder).await?;
            return Ok(Err(PathBusy));
        }
        Ok(Ok(Held::Jobs))
    }

    /// Releases what [`State::hold_path`] took.
    pub async fn release_path(
        &self,
        username: &str,
        path: &str,
        holder: &str,
    ) -> Result<(), StateError> {
        sqlx::query(at_or_below_query!(
            self.dialect,
            "$2",
            ("UPDATE jobs SET lease_owner = NULL, lease_until = NULL WHERE username = $1 AND "),
            (" AND lease_owner = $3")
        ))
        .bind(username)
        .bind(path)
        .bind(holder)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Follows a rename of a held, unprocessed file (or of every file below a renamed folder) and
    /// releases the hold. A file renamed to a temporary name is held; renamed away from one, it is
    /// released to the pipeline.
    pub async fn rename_landed(
        &self,
        username: &str,
        from: &str,
        to: &str,
        holder: &str,
        to_temporary: bool,
    ) -> Result<(), StateError> {
        sqlx::query(at_or_below_query!(
            self.dialect,
            "$2",
            ("UPDATE jobs SET path = $1 || substr(path, length($2) + 1), updated_at = $3, \
                 state = CASE WHEN path = $2 THEN (CASE WHEN $6 THEN 'held' ELSE 'landed' END) ELSE state END, \
                 lease_owner = NULL, lease_until = NULL \
                 WHERE username = $4 AND state IN ('landed', 'held') AND lease_owner = $5 AND "),
            ()
        ))
        .bind(to)
        .bind(from)
        .bind(now())
        .bind(username)
        .bind(holder)
        .bind(to_temporary)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Marks the held jobs of a file its owner removed before processing as `removed`.
    pub async fn remove_landed(
        &self,
        username: &str,
        path: &str,
        holder: &str,
    ) -> Result<(), StateError> {
        let now = now();
        sqlx::query(
            "UPDATE jobs SET state = 'removed', updated_at = $1, finished_at = $1, lease_owner = NULL, \
             lease_until = NULL WHERE username = $2 AND path = $3 AND state IN ('landed', 'held') AND lease_owner = $4",
        )
        .bind(&now)
        .bind(username)
        .bind(path)
        .bind(holder)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Records a file found in landing without a job (after a crash between storing and recording).
    /// Returns `None` when the path already has an unfinished or failed job (a failed job's file
    /// stays in landing and waits for the operator), or an interrupted upload: a multipart upload
    /// being completed right now has one until its job is recorded, in the same transaction.
    pub async fn adopt_orphan(
        &self,
        username: &str,
        path: &str,
        size: u64,
        held: bool,
    ) -> Result<Option<i64>, StateError> {
        let now = now();
        let mut tx = self.pool.begin().await?;
        // Two nodes reconciling at once must not both adopt a file: on PostgreSQL, whose `NOT EXISTS`
        // below does not see the other's uncommitted row, adoptions take turns (SQLite has one writer).
        sqlx::query(self.dialect.pick(
            "SELECT 1",
            "SELECT 1 FROM (SELECT pg_advisory_xact_lock(7364857261)) AS locked",
        ))
        .execute(&mut *tx)
        .await?;
        let row = sqlx::query(
            "INSERT INTO jobs (username, path, size, sha256, state, session, received_at, updated_at) \
             SELECT $1, $2, $3, '', CASE WHEN $5 THEN 'held' ELSE 'landed' END, 'reconcile', $4, $4 WHERE NOT EXISTS \
             (SELECT 1 FROM jobs WHERE username = $1 AND path = $2 \
              AND state IN ('held', 'landed', 'clean', 'infected', 'unscannable', 'failed')) \
             AND NOT EXISTS (SELECT 1 FROM partials WHERE username = $1 AND path = $2) RETURNING id",
        )
        .bind(username)
        .bind(path)
        .bind(i64::try_from(size).unwrap_or(i64::MAX))
        .bind(&now)
        .bind(held)
        .fetch_optional(&mut *tx)
        .await?;
        tx.commit().await?;
        row.map(|row| row.try_get(0))
            .transpose()
            .map_err(StateError::from)
    }

    /// Releases to the pipeline the held files (temporary names) untouched since `cutoff` (RFC 3339,
    /// as `updated_at`): a client that never renamed them. Returns how many.
    pub async fn release_idle_held(&self, cutoff: &str) -> Result<u64, StateError> {
        let result = sqlx::query(
            "UPDATE jobs SET state = 'landed', updated_at = $1 WHERE state = 'held' AND updated_at < $2 \
             AND (lease_owner IS NULL OR lease_until < $3)",
        )
        .bind(now())
        .bind(cutoff)
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        Ok(result.rows_affected())
    }

    /// Claims the next job that needs work and whose lease is free, for `owner`, until `lease` passes.
    /// [`Claimable::Scanned`] (while the scanner is unreachable) takes only jobs with a verdict.
    pub async fn claim(
        &self,
        owner: &str,
        lease: Duration,
        claimable: Claimable,
    ) -> Result<Option<Job>, StateError> {
        let now = now_ms();
        // On PostgreSQL, nodes claiming at once skip each other's candidate rows instead of queueing.
        macro_rules! claim {
            ($states:expr, $lock:literal) => {
                concat!(
                    "UPDATE jobs SET lease_owner = $1, lease_until = $2 WHERE id = (\
                     SELECT id FROM jobs WHERE state IN ",
                    $states,
                    " AND next_attempt_at <= $3 AND (lease_owner IS NULL OR lease_until < $3) \
                     ORDER BY next_attempt_at, id LIMIT 1",
                    $lock,
                    ") RETURNING ",
                    columns!()
                )
            };
        }
        let query = match claimable {
            Claimable::All => self.dialect.pick(
                claim!(open_states!(), ""),
                claim!(open_states!(), " FOR UPDATE SKIP LOCKED"),
            ),
            Claimable::Scanned => self.dialect.pick(
                claim!(scanned_states!(), ""),
                claim!(scanned_states!(), " FOR UPDATE SKIP LOCKED"),
            ),
        };
        let row = sqlx::query(query)
            .bind(owner)
            .bind(later_ms(lease))
            .bind(now)
            .fetch_optional(&self.leases)
            .await?;
        row.as_ref().map(job_from_row).transpose()
    }

    /// Gives up every job and alert lease whose owner starts with one of `owners` (a stopping node's
    /// workers), so that other nodes take the work at once. Returns how many were released.
    pub async fn release_leases(&self, owners: &[&str]) -> Result<u64, StateError> {
        let mut released = 0;
        for owner in owners {
            for query in [
                "UPDATE jobs SET lease_owner = NULL, lease_until = NULL \
                 WHERE substr(lease_owner, 1, length($1)) = $1",
                "UPDATE outbox SET lease_owner = NULL, lease_until = NULL \
                 WHERE substr(lease_owner, 1, length($1)) = $1",
            ] {
                released += sqlx::query(query)
                    .bind(*owner)
                    .execute(&self.pool)
                    .await?
                    .rows_affected();
            }
        }
        Ok(released)
    }

    /// Extends a lease still held by `owner`; `false` if it was lost.
    pub async fn renew(&self, id: i64, owner: &str, lease: Duration) -> Result<bool, StateError> {
        let result =
            sqlx::query("UPDATE jobs SET lease_until = $1 WHERE id = $2 AND lease_owner = $3")
                .bind(later_ms(lease))
                .bind(id)
                .bind(owner)
                .execute(&self.leases)
                .await?;
        Ok(result.rows_affected() == 1)
    }

    /// Records a scan verdict (and the SHA-256 when the job had none); `false` if the lease was lost.
    pub async fn record_verdict(
        &self,
        id: i64,
        owner: &str,
        verdict: &Verdict,
        engine: &str,
        scan_ms: i64,
        sha256: &str,
    ) -> Result<bool, StateError> {
        let now = now();
        let result = sqlx::query(
            "UPDATE jobs SET state = $1, verdict = $1, signature = $2, engine = $3, scanned_at = $4, \
             scan_ms = $5, sha256 = CASE WHEN sha256 = '' THEN $6 ELSE sha256 END, attempts = 0, \
             last_error = NULL, updated_at = $4 WHERE id = $7 AND lease_owner = $8 AND state = 'landed'",
        )
        .bind(verdict.state().as_str())
        .bind(verdict.detail())
        .bind(engine)
        .bind(&now)
        .bind(scan_ms)
        .bind(sha256)
        .bind(id)
        .bind(owner)
        .execute(&self.pool)
        .await?;
        Ok(result.rows_affected() == 1)
    }

    /// Records the key a job will be routed to, before the copy starts; `false` if the lease was lost.
    pub async fn record_route_key(
        &self,
        id: i64,
        owner: &str,
        key: &str,
    ) -> Result<bool, StateError> {
        let result =
            sqlx::query("UPDATE jobs SET route_key = $1 WHERE id = $2 AND lease_owner = $3")
                .bind(key)
                .bind(id)
                .bind(owner)
                .execute(&self.pool)
                .await?;
        Ok(result.rows_affected() == 1)
    }

    /// Records (or, with `None`, forgets) the multipart upload of the copy `owner` is making;
    /// `false` if the lease was lost.
    pub async fn record_copy_upload(
        &self,
        id: i64,
        owner: &str,
        upload: Option<&str>,
    ) -> Result<bool, StateError> {
        let result =
            sqlx::query("UPDATE jobs SET copy_upload = $1 WHERE id = $2 AND lease_owner = $3")
                .bind(upload)
                .bind(id)
                .bind(owner)
                .execute(&self.pool)
                .await?;
        Ok(result.rows_affected() == 1)
    }

    /// Notes that the file was copied to `routed_to` (before the landing copy is deleted), which
    /// ends the copy's multipart upload record.
    pub async fn record_copied(
        &self,
        id: i64,
        owner: &str,
        routed_to: &str,
    ) -> Result<bool, StateError> {
        let now = now();
        let result = sqlx::query(
            "UPDATE jobs SET routed_to = $1, copied_at = $2, updated_at = $2, copy_upload = NULL \
             WHERE id = $3 AND lease_owner = $4",
        )
        .bind(routed_to)
        .bind(&now)
        .bind(id)
        .bind(owner)
        .execute(&self.pool)
        .await?;
        Ok(result.rows_affected() == 1)
    }

    /// Ends a job in a final state and releases its lease.
    pub async fn finish(
        &self,
        id: i64,
        owner: &str,
        state: JobState,
        error: Option<&str>,
    ) -> Result<bool, StateError> {
        self.finish_with_alerts(id, owner, state, error, &[]).await
    }

    /// [`State::finish`], queueing `alerts` in the same transaction: the outcome and its alerts are
    /// recorded together or not at all.
    pub async fn finish_with_alerts(
        &self,
        id: i64,
        owner: &str,
        state: JobState,
        error: Option<&str>,
        alerts: &[NewAlert],
    ) -> Result<bool, StateError> {
        let now = now();
        let mut tx = self.pool.begin().await?;
        let result = sqlx::query(
            "UPDATE jobs SET state = $1, finished_at = $2, updated_at = $2, last_error = COALESCE($3, last_error), \
             lease_owner = NULL, lease_until = NULL WHERE id = $4 AND lease_owner = $5",
        )
        .bind(state.as_str())
        .bind(&now)
        .bind(error)
        .bind(id)
        .bind(owner)
        .execute(&mut *tx)
        .await?;
        if result.rows_affected() != 1 {
            return Ok(false);
        }
        State::insert_alerts(&mut tx, alerts).await?;
        tx.commit().await?;
        Ok(true)
    }

    /// Jobs that have been failing since before `cutoff` (RFC 3339, same format as `received_at`)
    /// and have had no `stuck` alert yet; each is marked so that it is reported once, together with
    /// the alerts `alerts(job)` in one transaction.
    pub async fn report_stuck(
        &self,
        cutoff: &str,
        alerts: impl Fn(&Job) -> Vec<NewAlert>,
    ) -> Result<Vec<Job>, StateError> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            columns!(),
            " FROM jobs WHERE ",
            stuck_since!(),
            " AND stuck_alerted_at IS NULL ORDER BY id"
        ))
        .bind(cutoff)
        .fetch_all(&self.pool)
        .await?;
        let mut reported = Vec::new();
        for row in &rows {
            let job = job_from_row(row)?;
            let mut tx = self.pool.begin().await?;
            let marked = sqlx::query(
                "UPDATE jobs SET stuck_alerted_at = $1 WHERE id = $2 AND stuck_alerted_at IS NULL",
            )
            .bind(now())
            .bind(job.id)
            .execute(&mut *tx)
            .await?;
            // Another node reported it in the meantime: once is enough.
            if marked.rows_affected() != 1 {
                continue;
            }
            State::insert_alerts(&mut tx, &alerts(&job)).await?;
            tx.commit().await?;
            reported.push(job);
        }
        Ok(reported)
    }

    /// Stuck jobs received before `cutoff` (as stuck alerts define them, alerted or not), newest
    /// first, at most `limit`.
    pub async fn stuck_jobs(&self, cutoff: &str, limit: u32) -> Result<Vec<Job>, StateError> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            columns!(),
            " FROM jobs WHERE ",
            stuck_since!(),
            " ORDER BY id DESC LIMIT $2"
        ))
        .bind(cutoff)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(job_from_row).collect()
    }

    /// Records a failed attempt: the job waits `backoff` before its next try, or becomes `failed`
    /// once `max_attempts` is reached. Returns the job's new state.
    pub async fn record_failure(
        &self,
        id: i64,
        owner: &str,
        error: &str,
        backoff: Duration,
        max_attempts: u32,
    ) -> Result<Option<(JobState, u32)>, StateError> {
        let now = now();
        let row = sqlx::query(
            "UPDATE jobs SET attempts = attempts + 1, last_error = $1, next_attempt_at = $2, updated_at = $3, \
             state = CASE WHEN attempts + 1 >= $4 THEN 'failed' ELSE state END, \
             finished_at = CASE WHEN attempts + 1 >= $4 THEN $3 ELSE finished_at END, \
             lease_owner = NULL, lease_until = NULL WHERE id = $5 AND lease_owner = $6 RETURNING state, attempts",
        )
        .bind(error)
        .bind(later_ms(backoff))
        .bind(&now)
        .bind(i64::from(max_attempts))
        .bind(id)
        .bind(owner)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|row| {
            let state: String = row.try_get(0)?;
            let attempts: i64 = row.try_get(1)?;
            Ok((
                JobState::parse(&state).unwrap_or(JobState::Failed),
                u32::try_from(attempts).unwrap_or(u32::MAX),
            ))
        })
        .transpose()
    }

    /// Puts a failed (or waiting) job back to work now: to `landed` if it has no verdict yet,
    /// otherwise to its verdict so that it is routed as scanned. `false` if there is no such job.
    pub async fn retry(&self, id: i64) -> Result<bool, StateError> {
        let now = now();
        let result = sqlx::query(concat!(
            "UPDATE jobs SET state = COALESCE(verdict, 'landed'), attempts = 0, next_attempt_at = 0, \
             finished_at = NULL, updated_at = $1 WHERE id = $2 AND (state = 'failed' OR state IN ",
            open_states!(),
            ")"
        ))
        .bind(&now)
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(result.rows_affected() == 1)
    }

    pub async fn job(&self, id: i64) -> Result<Option<Job>, StateError> {
        let row = sqlx::query(concat!("SELECT ", columns!(), " FROM jobs WHERE id = $1"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(job_from_row).transpose()
    }

    /// Jobs, newest first.
    pub async fn jobs(&self, filter: &JobFilter) -> Result<Vec<Job>, StateError> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            columns!(),
            " FROM jobs WHERE ($1 IS NULL OR username = $1) AND ($2 IS NULL OR state = $2) \
             AND ($3 IS NULL OR received_at >= $3) AND ($4 IS NULL OR id < $4) \
             ORDER BY id DESC LIMIT $5"
        ))
        .bind(filter.username.as_deref())
        .bind(filter.state.map(JobState::as_str))
        .bind(filter.since.as_deref())
        .bind(filter.before_id)
        .bind(i64::from(filter.limit.unwrap_or(u32::MAX)))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(job_from_row).collect()
    }

    /// Jobs and bytes by state, of the jobs received at or after `since` (all of them if `None`).
    pub async fn job_totals(&self, since: Option<&str>) -> Result<Vec<JobTotal>, StateError> {
        let rows = sqlx::query(
            "SELECT state, COUNT(*) AS jobs, CAST(SUM(size) AS BIGINT) AS bytes FROM jobs \
             WHERE ($1 IS NULL OR received_at >= $1) GROUP BY state ORDER BY state",
        )
        .bind(since)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(JobTotal {
                    state: row.try_get("state")?,
                    jobs: row.try_get("jobs")?,
                    // SUM is NUMERIC on PostgreSQL, hence the cast to BIGINT in the query.
                    bytes: row.try_get::<Option<i64>, _>("bytes")?.unwrap_or(0),
                })
            })
            .collect()
    }

    /// When the oldest job the pipeline has yet to finish was received.
    pub async fn oldest_unfinished(&self) -> Result<Option<String>, StateError> {
        let row = sqlx::query(
            "SELECT MIN(received_at) AS oldest FROM jobs WHERE state IN ($1, $2, $3, $4, $5)",
        )
        .bind(UNFINISHED[0].as_str())
        .bind(UNFINISHED[1].as_str())
        .bind(UNFINISHED[2].as_str())
        .bind(UNFINISHED[3].as_str())
        .bind(UNFINISHED[4].as_str())
        .fetch_one(&self.pool)
        .await?;
        Ok(row.try_get("oldest")?)
    }
}

/// Where the names directly below a folder of a home end: the first `/` after `$2` (the folder's
/// prefix, `sub/`). SQLite spells it `instr`, PostgreSQL `strpos`; the rest of the text is shared.
macro_rules! receipt_folders {
    ($find:literal) => {
        concat!(
            "SELECT DISTINCT substr(path, length($2) + 1, ",
            $find,
            "(substr(path, length($2) + 1), '/') - 1) AS name FROM jobs \
             WHERE username = $1 AND state IN ",
            receipt_states!(),
            " AND substr(path, 1, length($2)) = $2 AND ",
            $find,
            "(substr(path, length($2) + 1), '/') > 0 ORDER BY name LIMIT $3"
        )
    };
}

/// The prefix of the paths inside a home folder (`""` for the home itself, else `folder/`).
fn folder_prefix(folder: &str) -> String {
    if folder.is_empty() {
        String::new()
    } else {
        format!("{folder}/")
    }
}

/// Receipts: a user's own jobs, read by path for the `/.receipts` folder of their SFTP view. Each
/// path shows its latest job (highest id) among [`receipt_states`]; nothing here changes a job.
impl State {
    /// The latest job of one path of a user's home, if it has one that gets a receipt.
    pub async fn receipt_job(&self, username: &str, path: &str) -> Result<Option<Job>, StateError> {
        let row = sqlx::query(concat!(
            "SELECT ",
            columns!(),
            " FROM jobs WHERE username = $1 AND path = $2 AND state IN ",
            receipt_states!(),
            " ORDER BY id DESC LIMIT 1"
        ))
        .bind(username)
        .bind(path)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(job_from_row).transpose()
    }

    /// The latest job of each path directly inside `folder` of a user's home (`""`: the home
    /// itself), by path, at most `limit` of them.
    pub async fn receipt_jobs_in(
        &self,
        username: &str,
        folder: &str,
        limit: usize,
    ) -> Result<Vec<Job>, StateError> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            columns!(),
            " FROM jobs WHERE id IN (SELECT MAX(id) FROM jobs WHERE username = $1 AND state IN ",
            receipt_states!(),
            " AND substr(path, 1, length($2)) = $2 AND substr(path, length($2) + 1) NOT LIKE '%/%' \
             GROUP BY path) ORDER BY path LIMIT $3"
        ))
        .bind(username)
        .bind(folder_prefix(folder))
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(job_from_row).collect()
    }

    /// The names of the folders directly inside `folder` of a user's home that hold, at any depth,
    /// paths with a receipt; at most `limit` of them, by name.
    pub async fn receipt_folders_in(
        &self,
        username: &str,
        folder: &str,
        limit: usize,
    ) -> Result<Vec<String>, StateError> {
        let rows = sqlx::query(
            self.dialect
                .pick(receipt_folders!("instr"), receipt_folders!("strpos")),
        )
        .bind(username)
        .bind(folder_prefix(folder))
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(|row| Ok(row.try_get(0)?)).collect()
    }

    /// Whether a folder of a user's home holds, at any depth, a path with a receipt.
    pub async fn has_receipts_below(
        &self,
        username: &str,
        folder: &str,
    ) -> Result<bool, StateError> {
        let row = sqlx::query(concat!(
            "SELECT id FROM jobs WHERE username = $1 AND state IN ",
            receipt_states!(),
            " AND substr(path, 1, length($2)) = $2 LIMIT 1"
        ))
        .bind(username)
        .bind(folder_prefix(folder))
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.is_some())
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::state;
    use super::*;

    const HOLD: Duration = Duration::from_secs(30);

    fn job<'a>(path: &'a str) -> NewJob<'a> {
        NewJob {
            username: "acme",
            path,
            size: 3,
            sha256: "abc",
            session: "s",
            held: false,
            partial_writer: None,
        }
    }

    fn states(jobs: &[Job]) -> Vec<JobState> {
        jobs.iter().map(|job| job.state).collect()
    }

    #[tokio::test]
    async fn second_upload_of_a_path_supersedes_the_first() {
        let (_dir, state) = state().await;
        let first = state.record_upload(&job("a.csv"), "s1").await.unwrap();
        assert_eq!(
            state.hold_path("acme", "a.csv", "s2", HOLD).await.unwrap(),
            Ok(Held::Jobs)
        );
        let second = state.record_upload(&job("a.csv"), "s2").await.unwrap();
        assert!(second > first);
        let jobs = state.jobs(&JobFilter::default()).await.unwrap();
        assert_eq!(states(&jobs), [JobState::Landed, JobState::Superseded]);
    }

    #[tokio::test]
    async fn pages_totals_and_the_oldest_unfinished_job() {
        let (_dir, state) = state().await;
        assert_eq!(state.oldest_unfinished().await.unwrap(), None);
        let ids = [
            state.record_upload(&job("a.csv"), "s").await.unwrap(),
            state.record_upload(&job("b.csv"), "s").await.unwrap(),
            state.record_upload(&job("c.csv"), "s").await.unwrap(),
        ];
        let page = |before_id| JobFilter {
            before_id,
            limit: Some(2),
            ..JobFilter::default()
        };
        let first = state.jobs(&page(None)).await.unwrap();
        assert_eq!(
            first.iter().map(|j| j.id).collect::<Vec<_>>(),
            [ids[2], ids[1]]
        );
        let second = state.jobs(&page(Some(ids[1]))).await.unwrap();
        assert_eq!(second.iter().map(|j| j.id).collect::<Vec<_>>(), [ids[0]]);
        let future = JobFilter {
            since: Some("2999-01-01T00:00:00.000Z".into()),
            ..JobFilter::default()
        };
        assert!(state.jobs(&future).await.unwrap().is_empty());
        let totals = state.job_totals(None).await.unwrap();
        assert_eq!(
            totals,
            [JobTotal {
                state: "landed".into(),
                jobs: 3,
                bytes: 9
            }]
        );
        assert!(
            state
                .job_totals(Some("2999-01-01T00:00:00.000Z"))
                .await
                .unwrap()
                .is_empty()
        );
        let oldest = state.oldest_unfinished().await.unwrap().unwrap();
        assert_eq!(
            Some(oldest),
            state.job(ids[0]).await.unwrap().map(|j| j.received_at)
        );
    }

    #[tokio::test]
    async fn a_path_being_processed_cannot_be_held() {
        let (_dir, state) = state().await;
        state.record_upload(&job("a.csv"), "s").await.unwrap();
        let claimed = state
            .claim("worker", HOLD, Claimable::All)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            state
                .hold_path("acme", "a.csv", "sftp", HOLD)
                .await
                .unwrap(),
            Err(PathBusy)
        );
        assert!(
            state
                .record_verdict(claimed.id, "worker", &Verdict::Clean, "builtin", 1, "abc")
                .await
                .unwrap()
        );
        state
            .finish(claimed.id, "worker", JobState::Delivered, None)
            .await
            .unwrap();
        assert_eq!(
            state
                .hold_path("acme", "a.csv", "sftp", HOLD)
                .await
                .unwrap(),
            Ok(Held::Nothing)
        );
    }

    #[tokio::test]
    async fn a_hold_takes_the_path_and_what_is_below_it_and_nothing_beside_it() {
        let (_dir, state) = state().await;
        assert_eq!(
            state.hold_path("acme", "a", "sftp", HOLD).await.unwrap(),
            Ok(Held::Nothing),
            "a path without jobs has nothing to hold"
        );
        // Beside "a" in text order: "a.csv" and "a-b" sort between "a" and "a/", "a0" and "ab" after.
        for path in ["a.csv", "a-b/c", "a0", "ab/c", "b/a"] {
            state.record_upload(&job(path), "s").await.unwrap();
        }
        assert_eq!(
            state.hold_path("acme", "a", "sftp", HOLD).await.unwrap(),
            Ok(Held::Nothing)
        );
        state.record_upload(&job("a/x/y.csv"), "s").await.unwrap();
        state.record_upload(&job("a"), "s").await.unwrap();
        assert_eq!(
            state.hold_path("acme", "a", "sftp", HOLD).await.unwrap(),
            Ok(Held::Jobs)
        );
        let mut free = Vec::new();
        while let Some(claimed) = state.claim("worker", HOLD, Claimable::All).await.unwrap() {
            free.push(claimed.path);
        }
        free.sort();
        assert_eq!(free, ["a-b/c", "a.csv", "a0", "ab/c", "b/a"]);
        state.release_path("acme", "a", "sftp").await.unwrap();
        let mut released = Vec::new();
        while let Some(claimed) = state.claim("worker", HOLD, Claimable::All).await.unwrap() {
            released.push(claimed.path);
        }
        released.sort();
        assert_eq!(released, ["a", "a/x/y.csv"]);
    }

    #[tokio::test]
    async fn a_held_path_is_not_claimed() {
        let (_dir, state) = state().await;
        state.record_upload(&job("in/a.csv"), "s").await.unwrap();
        assert_eq!(
            state.hold_path("acme", "in", "sftp", HOLD).await.unwrap(),
            Ok(Held::Jobs)
        );
        assert!(
            state
                .claim("worker", HOLD, Claimable::All)
                .await
                .unwrap()
                .is_none()
        );
        state
            .rename_landed("acme", "in", "out", "sftp", false)
            .await
            .unwrap();
        let claimed = state
            .claim("worker", HOLD, Claimable::All)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(claimed.path, "out/a.csv");
    }

    #[tokio::test]
    async fn without_the_scanner_only_scanned_jobs_are_claimed() {
        let (_dir, state) = state().await;
        state.record_upload(&job("scanned.csv"), "s").await.unwrap();
        let first = state
            .claim("w", HOLD, Claimable::All)
            .await
            .unwrap()
            .unwrap();
        state
            .record_verdict(first.id, "w", &Verdict::Clean, "b", 1, "")
            .await
            .unwrap();
        state
            .release_path("acme", "scanned.csv", "w")
            .await
            .unwrap();
        state.record_upload(&job("new.csv"), "s").await.unwrap();
        let routable = state
            .claim("w", HOLD, Claimable::Scanned)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            (routable.path.as_str(), routable.state),
            ("scanned.csv", JobState::Clean)
        );
        assert!(
            state
                .claim("w", HOLD, Claimable::Scanned)
                .await
                .unwrap()
                .is_none(),
            "a landed job waits for the scanner"
        );
        let landed = state
            .claim("w", HOLD, Claimable::All)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(landed.path, "new.csv");
    }

    #[tokio::test]
    async fn an_expired_lease_is_taken_over_and_the_old_owner_changes_nothing() {
        let (_dir, state) = state().await;
        let id = state.record_upload(&job("a.csv"), "s").await.unwrap();
        let first = state
            .claim("dead", Duration::ZERO, Claimable::All)
            .await
            .unwrap()
            .unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
        let second = state
            .claim("alive", HOLD, Claimable::All)
            .await
            .unwrap()
            .unwrap();
        assert_eq!((first.id, second.id), (id, id));
        assert!(
            !state
                .record_verdict(id, "dead", &Verdict::Clean, "b", 1, "")
                .await
                .unwrap()
        );
        assert!(!state.renew(id, "dead", HOLD).await.unwrap());
        let infected = Verdict::Infected {
            signature: "Eicar".into(),
        };
        assert!(
            state
                .record_verdict(id, "alive", &infected, "clamd", 7, "")
                .await
                .unwrap()
        );
        let job = state.job(id).await.unwrap().unwrap();
        assert_eq!(
            (job.state, job.verdict, job.engine.as_deref()),
            (JobState::Infected, Some(infected), Some("clamd"))
        );
    }

    #[tokio::test]
    async fn failures_back_off_then_fail_and_retry_resumes_from_the_verdict() {
        let (_dir, state) = state().await;
        let id = state.record_upload(&job("a.csv"), "s").await.unwrap();
        let claimed = state
            .claim("w", HOLD, Claimable::All)
            .await
            .unwrap()
            .unwrap();
        state
            .record_verdict(claimed.id, "w", &Verdict::Clean, "b", 1, "")
            .await
            .unwrap();
        state.release_path("acme", "a.csv", "w").await.unwrap();
        let claimed = state
            .claim("w", HOLD, Claimable::All)
            .await
            .unwrap()
            .unwrap();
        let (after_one, attempts) = state
            .record_failure(claimed.id, "w", "disk full", HOLD, 2)
            .await
            .unwrap()
            .unwrap();
        assert_eq!((after_one, attempts), (JobState::Clean, 1));
        assert!(
            state
                .claim("w", HOLD, Claimable::All)
                .await
                .unwrap()
                .is_none(),
            "backing off"
        );
        assert!(state.retry(id).await.unwrap());
        let claimed = state
            .claim("w", HOLD, Claimable::All)
            .await
            .unwrap()
            .unwrap();
        let (after_two, _) = state
            .record_failure(claimed.id, "w", "disk full", Duration::ZERO, 1)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(after_two, JobState::Failed);
        assert!(
            state
                .claim("w", HOLD, Claimable::All)
                .await
                .unwrap()
                .is_none()
        );
        assert!(state.retry(id).await.unwrap());
        let job = state.job(id).await.unwrap().unwrap();
        assert_eq!(
            (job.state, job.attempts, job.last_error.as_deref()),
            (JobState::Clean, 0, Some("disk full"))
        );
    }

    #[tokio::test]
    async fn stuck_jobs_are_those_tried_and_unfinished_or_failed_before_the_cutoff() {
        let (_dir, state) = state().await;
        let retrying = state.record_upload(&job("b.csv"), "s").await.unwrap();
        let failed = state.record_upload(&job("c.csv"), "s").await.unwrap();
        for (id, max_attempts) in [(retrying, 5), (failed, 1)] {
            let claimed = state
                .claim("w", HOLD, Claimable::All)
                .await
                .unwrap()
                .unwrap();
            assert_eq!(claimed.id, id, "claimed in order");
            state
                .record_failure(
                    id,
                    "w",
                    "clamd down",
                    Duration::from_secs(3600),
                    max_attempts,
                )
                .await
                .unwrap()
                .unwrap();
        }
        // Never tried yet: waiting, not stuck.
        state.record_upload(&job("a.csv"), "s").await.unwrap();
        let ids = |jobs: Vec<Job>| jobs.iter().map(|job| job.id).collect::<Vec<_>>();
        let later = "9999-01-01T00:00:00.000Z";
        assert_eq!(
            ids(state.stuck_jobs(later, 10).await.unwrap()),
            [failed, retrying]
        );
        assert_eq!(ids(state.stuck_jobs(later, 1).await.unwrap()), [failed]);
        let earlier = "2000-01-01T00:00:00.000Z";
        assert!(state.stuck_jobs(earlier, 10).await.unwrap().is_empty());
        // The alerts report the same jobs, once; the dashboard keeps listing them.
        let reported = state.report_stuck(later, |_| Vec::new()).await.unwrap();
        assert_eq!(ids(reported), [retrying, failed]);
        assert_eq!(
            ids(state.stuck_jobs(later, 10).await.unwrap()),
            [failed, retrying]
        );
    }

    #[tokio::test]
    async fn orphans_are_adopted_once() {
        let (_dir, state) = state().await;
        assert!(
            state
                .adopt_orphan("acme", "x.csv", 5, false)
                .await
                .unwrap()
                .is_some()
        );
        assert!(
            state
                .adopt_orphan("acme", "x.csv", 5, false)
                .await
                .unwrap()
                .is_none()
        );
        let jobs = state
            .jobs(&JobFilter {
                state: Some(JobState::Landed),
                ..JobFilter::default()
            })
            .await
            .unwrap();
        assert_eq!((jobs.len(), jobs[0].sha256.as_str()), (1, ""));
        let completing = crate::state::NewPartial {
            username: "acme",
            path: "big.bin",
            parent: "",
            name: "big.bin",
            landing_key: "acme/big.bin",
            writer: "w",
        };
        state.start_partial(&completing, false).await.unwrap();
        assert_eq!(
            state
                .adopt_orphan("acme", "big.bin", 5, false)
                .await
                .unwrap(),
            None
        );
    }

    #[tokio::test]
    async fn temporary_names_are_held_until_renamed_or_idle() {
        let (_dir, state) = state().await;
        let mut part = job("data.csv.filepart");
        part.held = true;
        let id = state.record_upload(&part, "s").await.unwrap();
        assert!(
            state
                .claim("w", HOLD, Claimable::All)
                .await
                .unwrap()
                .is_none(),
            "held jobs are not processed"
        );
        assert_eq!(
            state
                .hold_path("acme", "data.csv.filepart", "sftp", HOLD)
                .await
                .unwrap(),
            Ok(Held::Jobs)
        );
        state
            .rename_landed("acme", "data.csv.filepart", "data.csv", "sftp", false)
            .await
            .unwrap();
        let claimed = state
            .claim("w", HOLD, Claimable::All)
            .await
            .unwrap()
            .unwrap();
        assert_eq!((claimed.id, claimed.path.as_str()), (id, "data.csv"));

        let idle = state.record_upload(&part, "s").await.unwrap();
        assert_eq!(
            state
                .release_idle_held("2000-01-01T00:00:00.000Z")
                .await
                .unwrap(),
            0
        );
        assert_eq!(
            state
                .release_idle_held("2999-01-01T00:00:00.000Z")
                .await
                .unwrap(),
            1
        );
        assert_eq!(
            state.job(idle).await.unwrap().unwrap().state,
            JobState::Landed
        );
    }

    #[tokio::test]
    async fn receipts_show_each_paths_latest_job_of_one_user() {
        let (_dir, state) = state().await;
        let first = state.record_upload(&job("a.csv"), "s").await.unwrap();
        let claimed = state
            .claim("w", HOLD, Claimable::All)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(claimed.id, first);
        state
            .record_verdict(first, "w", &Verdict::Clean, "builtin", 1, "abc")
            .await
            .unwrap();
        state
            .finish(first, "w", JobState::Delivered, None)
            .await
            .unwrap();
        for path in [
            "in/b.csv",
            "in/deep/c.csv",
            "in/deep/d.csv",
            "a%b/z.csv",
            "gone.csv",
        ] {
            state.record_upload(&job(path), "s").await.unwrap();
        }
        // Uploaded again, then again before processing: the middle one is superseded.
        state.record_upload(&job("again.csv"), "s").await.unwrap();
        assert_eq!(
            state
                .hold_path("acme", "again.csv", "s2", HOLD)
                .await
                .unwrap(),
            Ok(Held::Jobs)
        );
        let again = state.record_upload(&job("again.csv"), "s2").await.unwrap();
        state.release_path("acme", "again.csv", "s2").await.unwrap();
        assert_eq!(
            state
                .hold_path("acme", "gone.csv", "s", HOLD)
                .await
                .unwrap(),
            Ok(Held::Jobs)
        );
        state.remove_landed("acme", "gone.csv", "s").await.unwrap();
        let mut theirs = job("x.csv");
        theirs.username = "other";
        state.record_upload(&theirs, "s").await.unwrap();
        // A later upload of a delivered path is its receipt (pending), not the delivered one.
        let second = state.record_upload(&job("a.csv"), "s").await.unwrap();

        let paths = |jobs: Vec<Job>| {
            jobs.into_iter()
                .map(|job| (job.path, job.id))
                .collect::<Vec<_>>()
        };
        let top = state.receipt_jobs_in("acme", "", 100).await.unwrap();
        assert_eq!(
            paths(top),
            [
                ("a.csv".to_string(), second),
                ("again.csv".to_string(), again)
            ]
        );
        assert_eq!(
            state.receipt_folders_in("acme", "", 100).await.unwrap(),
            ["a%b", "in"]
        );
        assert_eq!(
            state.receipt_folders_in("acme", "in", 100).await.unwrap(),
            ["deep"]
        );
        assert!(
            state
                .receipt_folders_in("acme", "in/deep", 100)
                .await
                .unwrap()
                .is_empty()
        );
        let deep = state.receipt_jobs_in("acme", "in/deep", 100).await.unwrap();
        assert_eq!(deep.len(), 2);
        assert_eq!(
            state
                .receipt_jobs_in("acme", "in/deep", 1)
                .await
                .unwrap()
                .len(),
            1
        );
        assert_eq!(
            state.receipt_jobs_in("acme", "in", 100).await.unwrap()[0].path,
            "in/b.csv"
        );
        assert_eq!(
            state.receipt_jobs_in("acme", "a%b", 100).await.unwrap()[0].path,
            "a%b/z.csv"
        );
        for (folder, expected) in [
            ("in", true),
            ("in/deep", true),
            ("a%b", true),
            ("i", false),
            ("a", false),
            ("a.csv", false),
            ("in/deep/c.csv", false),
        ] {
            assert_eq!(
                state.has_receipts_below("acme", folder).await.unwrap(),
                expected,
                "{folder}"
            );
        }
        assert_eq!(
            state
                .receipt_job("acme", "a.csv")
                .await
                .unwrap()
                .unwrap()
                .id,
            second
        );
        assert_eq!(
            state
                .receipt_job("acme", "again.csv")
                .await
                .unwrap()
                .unwrap()
                .id,
            again
        );
        assert_eq!(state.receipt_job("acme", "gone.csv").await.unwrap(), None);
        assert_eq!(state.receipt_job("acme", "x.csv").await.unwrap(), None);
        assert_eq!(
            paths(state.receipt_jobs_in("other", "", 100).await.unwrap())
                .into_iter()
                .map(|(path, _)| path)
                .collect::<Vec<_>>(),
            ["x.csv"]
        );
        assert!(
            state
                .receipt_folders_in("other", "", 100)
                .await
                .unwrap()
                .is_empty()
        );
    }

    #[tokio::test]
    async fn removal_needs_the_hold() {
        let (_dir, state) = state().await;
        let id = state.record_upload(&job("x.csv"), "s").await.unwrap();
        state.remove_landed("acme", "x.csv", "sftp").await.unwrap();
        assert_eq!(
            state.job(id).await.unwrap().unwrap().state,
            JobState::Landed
        );
        assert_eq!(
            state
                .hold_path("acme", "x.csv", "sftp", HOLD)
                .await
                .unwrap(),
            Ok(Held::Jobs)
        );
        state.remove_landed("acme", "x.csv", "sftp").await.unwrap();
        assert_eq!(
            state.job(id).await.unwrap().unwrap().state,
            JobState::Removed
        );
    }
}

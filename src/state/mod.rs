//! Durable state: transfer jobs, interrupted uploads and users' folders, in SQLite (sqlx).
//!
//! Owns the schema and every query; all SQL here is static text with bound parameters, never built
//! from strings. A job row is written when an upload's CLOSE succeeds, in state `landed`, ready for
//! the pipeline (`jobs.rs` holds the job life cycle). Folders live here rather than in the buckets
//! because object stores have none.

mod jobs;
mod outbox;
mod partials;

pub use jobs::{Job, JobFilter, JobState, NewJob, PathBusy, Verdict, now_ms};
pub use outbox::{Alert, NewAlert};
pub use partials::{NewPartial, Partial, Replaced};

use std::borrow::Cow;
use std::path::Path;
use std::str::FromStr;
use std::time::SystemTime;

use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{Row, SqlSafeStr};

use crate::config::Database;

const SCHEMA_V1: &str = r#"
CREATE TABLE jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    username TEXT NOT NULL,
    path TEXT NOT NULL,
    size INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    state TEXT NOT NULL,
    session TEXT NOT NULL,
    received_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE INDEX jobs_by_state ON jobs (state);
CREATE INDEX jobs_by_user_path ON jobs (username, path);
CREATE TABLE folders (
    username TEXT NOT NULL,
    parent TEXT NOT NULL,
    name TEXT NOT NULL,
    created_at TEXT NOT NULL,
    PRIMARY KEY (username, parent, name)
);
"#;

/// The pipeline's columns: leases, retries, verdicts and where the file went. Times used for
/// comparisons are Unix milliseconds; the others are RFC 3339 text for people.
const SCHEMA_V2: &str = r#"
ALTER TABLE jobs ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN next_attempt_at INTEGER NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN lease_owner TEXT;
ALTER TABLE jobs ADD COLUMN lease_until INTEGER;
ALTER TABLE jobs ADD COLUMN last_error TEXT;
ALTER TABLE jobs ADD COLUMN verdict TEXT;
ALTER TABLE jobs ADD COLUMN signature TEXT;
ALTER TABLE jobs ADD COLUMN engine TEXT;
ALTER TABLE jobs ADD COLUMN scanned_at TEXT;
ALTER TABLE jobs ADD COLUMN scan_ms INTEGER;
ALTER TABLE jobs ADD COLUMN routed_to TEXT;
ALTER TABLE jobs ADD COLUMN copied_at TEXT;
ALTER TABLE jobs ADD COLUMN finished_at TEXT;
CREATE INDEX jobs_ready ON jobs (state, next_attempt_at);
"#;

/// The notification outbox, and when a job's `stuck` alert went out.
const SCHEMA_V3: &str = r#"
CREATE TABLE outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id TEXT NOT NULL,
    job_id INTEGER,
    channel TEXT NOT NULL,
    target TEXT NOT NULL,
    kind TEXT NOT NULL,
    payload TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at INTEGER NOT NULL DEFAULT 0,
    lease_owner TEXT,
    lease_until INTEGER,
    last_error TEXT,
    created_at TEXT NOT NULL,
    sent_at TEXT
);
CREATE INDEX outbox_due ON outbox (state, next_attempt_at);
ALTER TABLE jobs ADD COLUMN stuck_alerted_at TEXT;
"#;

/// The object key a job is routed to, chosen once before copying (for `on_conflict = "suffix"`).
const SCHEMA_V4: &str = "ALTER TABLE jobs ADD COLUMN route_key TEXT;";

/// Interrupted uploads and the parts they stored (`partials.rs`).
const SCHEMA_V5: &str = r#"
CREATE TABLE partials (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    username TEXT NOT NULL,
    path TEXT NOT NULL,
    parent TEXT NOT NULL,
    name TEXT NOT NULL,
    landing_key TEXT NOT NULL,
    multipart_id TEXT,
    size INTEGER NOT NULL DEFAULT 0,
    writer TEXT NOT NULL,
    started_at TEXT NOT NULL,
    updated_ms INTEGER NOT NULL,
    UNIQUE (username, path)
);
CREATE INDEX partials_by_parent ON partials (username, parent);
CREATE INDEX partials_by_age ON partials (updated_ms);
CREATE TABLE partial_parts (
    partial_id INTEGER NOT NULL,
    idx INTEGER NOT NULL,
    content_id TEXT NOT NULL,
    end_offset INTEGER NOT NULL,
    hash_state BLOB NOT NULL,
    PRIMARY KEY (partial_id, idx)
);
"#;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot create the folder for the state database {path}: {source}")]
    Folder {
        path: String,
        source: std::io::Error,
    },
    #[error("state database error: {0}")]
    Sql(#[from] sqlx::Error),
    #[error("cannot apply the state database migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

#[derive(Debug, Clone)]
pub struct State {
    pub(crate) pool: SqlitePool,
}

pub(crate) fn now() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

impl State {
    /// Opens (creating if missing) the database and applies migrations.
    pub async fn open(database: &Database) -> Result<State, StateError> {
        match database {
            Database::Sqlite { path } => State::open_sqlite(path).await,
        }
    }

    async fn open_sqlite(path: &Path) -> Result<State, StateError> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|source| StateError::Folder {
                path: parent.display().to_string(),
                source,
            })?;
        }
        let options = SqliteConnectOptions::from_str("sqlite://")?
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(std::time::Duration::from_secs(10));
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await?;
        let migrator = Migrator::with_migrations(vec![
            Migration::new(
                1,
                Cow::Borrowed("jobs and folders"),
                MigrationType::Simple,
                SCHEMA_V1.into_sql_str(),
                false,
            ),
            Migration::new(
                2,
                Cow::Borrowed("pipeline leases and verdicts"),
                MigrationType::Simple,
                SCHEMA_V2.into_sql_str(),
                false,
            ),
            Migration::new(
                3,
                Cow::Borrowed("notification outbox"),
                MigrationType::Simple,
                SCHEMA_V3.into_sql_str(),
                false,
            ),
            Migration::new(
                4,
                Cow::Borrowed("route keys"),
                MigrationType::Simple,
                SCHEMA_V4.into_sql_str(),
                false,
            ),
            Migration::new(
                5,
                Cow::Borrowed("interrupted uploads"),
                MigrationType::Simple,
                SCHEMA_V5.into_sql_str(),
                false,
            ),
        ]);
        migrator.run(&pool).await?;
        Ok(State { pool })
    }

    /// Creates a folder; `false` if it already existed.
    pub async fn create_folder(
        &self,
        username: &str,
        parent: &str,
        name: &str,
    ) -> Result<bool, StateError> {
        let result = sqlx::query(
            "INSERT INTO folders (username, parent, name, created_at) VALUES ($1, $2, $3, $4) \
             ON CONFLICT DO NOTHING",
        )
        .bind(username)
        .bind(parent)
        .bind(name)
        .bind(now())
        .execute(&self.pool)
        .await?;
        Ok(result.rows_affected() == 1)
    }

    pub async fn folder_exists(
        &self,
        username: &str,
        parent: &str,
        name: &str,
    ) -> Result<bool, StateError> {
        let row = sqlx::query(
            "SELECT COUNT(*) FROM folders WHERE username = $1 AND parent = $2 AND name = $3",
        )
        .bind(username)
        .bind(parent)
        .bind(name)
        .fetch_one(&self.pool)
        .await?;
        Ok(row.try_get::<i64, _>(0)? > 0)
    }

    /// Names of the folders directly inside `parent`.
    pub async fn child_folders(
        &self,
        username: &str,
        parent: &str,
    ) -> Result<Vec<String>, StateError> {
        let rows = sqlx::query(
            "SELECT name FROM folders WHERE username = $1 AND parent = $2 ORDER BY name",
        )
        .bind(username)
        .bind(parent)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(|row| Ok(row.try_get(0)?)).collect()
    }

    pub async fn remove_folder(
        &self,
        username: &str,
        parent: &str,
        name: &str,
    ) -> Result<bool, StateError> {
        let result =
            sqlx::query("DELETE FROM folders WHERE username = $1 AND parent = $2 AND name = $3")
                .bind(username)
                .bind(parent)
                .bind(name)
                .execute(&self.pool)
                .await?;
        Ok(result.rows_affected() == 1)
    }

    /// Moves an empty folder.
    pub async fn rename_folder(
        &self,
        username: &str,
        (from_parent, from_name): (&str, &str),
        (to_parent, to_name): (&str, &str),
    ) -> Result<bool, StateError> {
        let result = sqlx::query(
            "UPDATE folders SET parent = $1, name = $2 WHERE username = $3 AND parent = $4 AND name = $5",
        )
        .bind(to_parent)
        .bind(to_name)
        .bind(username)
        .bind(from_parent)
        .bind(from_name)
        .execute(&self.pool)
        .await?;
        Ok(result.rows_affected() == 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) async fn state() -> (tempfile::TempDir, State) {
        let dir = tempfile::tempdir().unwrap();
        let state = State::open(&Database::Sqlite {
            path: dir.path().join("state/db.sqlite"),
        })
        .await
        .unwrap();
        (dir, state)
    }

    #[tokio::test]
    async fn folders() {
        let (_dir, state) = state().await;
        assert!(state.create_folder("acme", "", "in").await.unwrap());
        assert!(!state.create_folder("acme", "", "in").await.unwrap());
        assert!(state.folder_exists("acme", "", "in").await.unwrap());
        assert!(!state.folder_exists("other", "", "in").await.unwrap());
        assert_eq!(state.child_folders("acme", "").await.unwrap(), ["in"]);
        assert!(
            state
                .rename_folder("acme", ("", "in"), ("", "out"))
                .await
                .unwrap()
        );
        assert!(state.remove_folder("acme", "", "out").await.unwrap());
        assert!(state.child_folders("acme", "").await.unwrap().is_empty());
    }
}

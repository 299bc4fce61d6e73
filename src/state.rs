//! Durable state: transfer jobs and users' folders, in SQLite (sqlx).
//!
//! Owns the schema and every query; all SQL here is static text with bound parameters, never built
//! from strings. A job row is written when an upload's CLOSE succeeds, in state `landed`, ready for
//! the pipeline. Folders live here rather than in the buckets because object stores have none.

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

/// What is known of one job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    pub id: i64,
    pub username: String,
    pub path: String,
    pub size: u64,
    pub sha256: String,
    pub state: String,
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
}

#[derive(Debug, Clone)]
pub struct State {
    pool: SqlitePool,
}

fn now() -> String {
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
        let migrator = Migrator::with_migrations(vec![Migration::new(
            1,
            Cow::Borrowed("jobs and folders"),
            MigrationType::Simple,
            SCHEMA_V1.into_sql_str(),
            false,
        )]);
        migrator.run(&pool).await?;
        Ok(State { pool })
    }

    /// Records a completed upload as a `landed` job. An older job for the same path that has not
    /// been processed yet is marked `superseded`: its bytes were overwritten by this upload.
    pub async fn record_upload(&self, job: &NewJob<'_>) -> Result<i64, StateError> {
        let now = now();
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "UPDATE jobs SET state = 'superseded', updated_at = $1 \
             WHERE username = $2 AND path = $3 AND state = 'landed'",
        )
        .bind(&now)
        .bind(job.username)
        .bind(job.path)
        .execute(&mut *tx)
        .await?;
        let size = i64::try_from(job.size).unwrap_or(i64::MAX);
        let row = sqlx::query(
            "INSERT INTO jobs (username, path, size, sha256, state, session, received_at, updated_at) \
             VALUES ($1, $2, $3, $4, 'landed', $5, $6, $6) RETURNING id",
        )
        .bind(job.username)
        .bind(job.path)
        .bind(size)
        .bind(job.sha256)
        .bind(job.session)
        .bind(&now)
        .fetch_one(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(row.try_get(0)?)
    }

    /// Follows a rename of a not-yet-processed file (or of every file below a renamed folder).
    pub async fn rename_landed(
        &self,
        username: &str,
        from: &str,
        to: &str,
    ) -> Result<(), StateError> {
        sqlx::query(
            "UPDATE jobs SET path = $1 || substr(path, length($2) + 1), updated_at = $3 \
             WHERE username = $4 AND state = 'landed' AND (path = $2 OR substr(path, 1, length($2) + 1) = $2 || '/')",
        )
        .bind(to)
        .bind(from)
        .bind(now())
        .bind(username)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Marks the job of a file its owner removed before processing as `removed`.
    pub async fn remove_landed(&self, username: &str, path: &str) -> Result<(), StateError> {
        sqlx::query(
            "UPDATE jobs SET state = 'removed', updated_at = $1 \
             WHERE username = $2 AND path = $3 AND state = 'landed'",
        )
        .bind(now())
        .bind(username)
        .bind(path)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Jobs, newest first, optionally of one user.
    pub async fn jobs(&self, username: Option<&str>) -> Result<Vec<Job>, StateError> {
        let rows = sqlx::query(
            "SELECT id, username, path, size, sha256, state FROM jobs \
             WHERE ($1 IS NULL OR username = $1) ORDER BY id DESC",
        )
        .bind(username)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(Job {
                    id: row.try_get("id")?,
                    username: row.try_get("username")?,
                    path: row.try_get("path")?,
                    size: u64::try_from(row.try_get::<i64, _>("size")?).unwrap_or(0),
                    sha256: row.try_get("sha256")?,
                    state: row.try_get("state")?,
                })
            })
            .collect()
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

    async fn state() -> (tempfile::TempDir, State) {
        let dir = tempfile::tempdir().unwrap();
        let state = State::open(&Database::Sqlite {
            path: dir.path().join("state/db.sqlite"),
        })
        .await
        .unwrap();
        (dir, state)
    }

    fn job<'a>(path: &'a str) -> NewJob<'a> {
        NewJob {
            username: "acme",
            path,
            size: 3,
            sha256: "abc",
            session: "s",
        }
    }

    #[tokio::test]
    async fn second_upload_of_a_path_supersedes_the_first() {
        let (_dir, state) = state().await;
        let first = state.record_upload(&job("a.csv")).await.unwrap();
        let second = state.record_upload(&job("a.csv")).await.unwrap();
        assert!(second > first);
        let jobs = state.jobs(Some("acme")).await.unwrap();
        let states: Vec<_> = jobs.iter().map(|j| j.state.as_str()).collect();
        assert_eq!(states, ["landed", "superseded"]);
    }

    #[tokio::test]
    async fn rename_follows_files_and_folders() {
        let (_dir, state) = state().await;
        state.record_upload(&job("in/a.csv")).await.unwrap();
        state.record_upload(&job("inside.csv")).await.unwrap();
        state.rename_landed("acme", "in", "out").await.unwrap();
        state
            .rename_landed("acme", "inside.csv", "x.csv")
            .await
            .unwrap();
        let mut paths: Vec<_> = state
            .jobs(None)
            .await
            .unwrap()
            .into_iter()
            .map(|j| j.path)
            .collect();
        paths.sort();
        assert_eq!(paths, ["out/a.csv", "x.csv"]);
        state.remove_landed("acme", "x.csv").await.unwrap();
        let removed = state.jobs(None).await.unwrap();
        assert!(
            removed
                .iter()
                .any(|j| j.path == "x.csv" && j.state == "removed")
        );
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

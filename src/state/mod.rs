//! Durable state: transfer jobs, interrupted uploads and users' folders, in SQLite (one node) or
//! PostgreSQL (several nodes), through sqlx's `Any` driver.
//!
//! Owns the schema and every query; all SQL here is static text with bound parameters, never built
//! from strings, and written once for both databases (`$n` parameters, `RETURNING`, `ON CONFLICT`).
//! Where they differ (the schema's types, `FOR UPDATE SKIP LOCKED` when claiming work) there are two
//! static texts, chosen by [`Dialect`]. A job row is written when an upload's CLOSE succeeds, in state `landed`, ready for
//! the pipeline (`jobs.rs` holds the job life cycle). Folders live here rather than in the buckets
//! because object stores have none.

mod events;
mod jobs;
mod outbox;
mod partials;

pub use events::{AuditRecord, StoredEvent};
pub use jobs::{
    Claimable, Held, Job, JobFilter, JobState, JobTotal, NewJob, PathBusy, Verdict, ms_ago, now_ms,
};
pub use outbox::{Alert, NewAlert};
pub use partials::{NewPartial, Partial, Replaced, UploadTarget};

use std::borrow::Cow;
use std::path::Path;
use std::str::FromStr;
use std::time::SystemTime;

use sqlx::AnyPool;
use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::sqlite::SqliteConnectOptions;
use sqlx::{ConnectOptions, Executor, Row, SqlSafeStr};

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

/// The multipart upload of a copy to a destination under way, so that whoever takes the job over
/// after a crash aborts it instead of leaving it in the team's bucket.
const SCHEMA_V6: &str = "ALTER TABLE jobs ADD COLUMN copy_upload TEXT;";

/// The audit trail's copy in the database (`events.rs`): each line exactly as in the audit file.
const SCHEMA_V7: &str = r#"
CREATE TABLE audit_events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time TEXT NOT NULL,
    event TEXT NOT NULL,
    username TEXT,
    job_id INTEGER,
    line TEXT NOT NULL
);
CREATE INDEX audit_events_by_job ON audit_events (job_id);
CREATE INDEX audit_events_by_time ON audit_events (time);
"#;

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

/// The SQLite schema, one migration each.
const SQLITE_SCHEMA: [(&str, &str); 7] = [
    ("jobs and folders", SCHEMA_V1),
    ("pipeline leases and verdicts", SCHEMA_V2),
    ("notification outbox", SCHEMA_V3),
    ("route keys", SCHEMA_V4),
    ("interrupted uploads", SCHEMA_V5),
    ("copies under way", SCHEMA_V6),
    ("audit trail", SCHEMA_V7),
];

/// The same schema for PostgreSQL: 64-bit integers and identity columns, `BYTEA` for bytes.
const POSTGRES_SCHEMA: [(&str, &str); 7] = [
    (
        "jobs and folders",
        r#"
CREATE TABLE jobs (
    id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    username TEXT NOT NULL,
    path TEXT NOT NULL,
    size BIGINT NOT NULL,
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
"#,
    ),
    (
        "pipeline leases and verdicts",
        r#"
ALTER TABLE jobs ADD COLUMN attempts BIGINT NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN next_attempt_at BIGINT NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN lease_owner TEXT;
ALTER TABLE jobs ADD COLUMN lease_until BIGINT;
ALTER TABLE jobs ADD COLUMN last_error TEXT;
ALTER TABLE jobs ADD COLUMN verdict TEXT;
ALTER TABLE jobs ADD COLUMN signature TEXT;
ALTER TABLE jobs ADD COLUMN engine TEXT;
ALTER TABLE jobs ADD COLUMN scanned_at TEXT;
ALTER TABLE jobs ADD COLUMN scan_ms BIGINT;
ALTER TABLE jobs ADD COLUMN routed_to TEXT;
ALTER TABLE jobs ADD COLUMN copied_at TEXT;
ALTER TABLE jobs ADD COLUMN finished_at TEXT;
CREATE INDEX jobs_ready ON jobs (state, next_attempt_at);
"#,
    ),
    (
        "notification outbox",
        r#"
CREATE TABLE outbox (
    id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    event_id TEXT NOT NULL,
    job_id BIGINT,
    channel TEXT NOT NULL,
    target TEXT NOT NULL,
    kind TEXT NOT NULL,
    payload TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts BIGINT NOT NULL DEFAULT 0,
    next_attempt_at BIGINT NOT NULL DEFAULT 0,
    lease_owner TEXT,
    lease_until BIGINT,
    last_error TEXT,
    created_at TEXT NOT NULL,
    sent_at TEXT
);
CREATE INDEX outbox_due ON outbox (state, next_attempt_at);
ALTER TABLE jobs ADD COLUMN stuck_alerted_at TEXT;
"#,
    ),
    ("route keys", SCHEMA_V4),
    (
        "interrupted uploads",
        r#"
CREATE TABLE partials (
    id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    username TEXT NOT NULL,
    path TEXT NOT NULL,
    parent TEXT NOT NULL,
    name TEXT NOT NULL,
    landing_key TEXT NOT NULL,
    multipart_id TEXT,
    size BIGINT NOT NULL DEFAULT 0,
    writer TEXT NOT NULL,
    started_at TEXT NOT NULL,
    updated_ms BIGINT NOT NULL,
    UNIQUE (username, path)
);
CREATE INDEX partials_by_parent ON partials (username, parent);
CREATE INDEX partials_by_age ON partials (updated_ms);
CREATE TABLE partial_parts (
    partial_id BIGINT NOT NULL,
    idx BIGINT NOT NULL,
    content_id TEXT NOT NULL,
    end_offset BIGINT NOT NULL,
    hash_state BYTEA NOT NULL,
    PRIMARY KEY (partial_id, idx)
);
"#,
    ),
    ("copies under way", SCHEMA_V6),
    (
        "audit trail",
        r#"
CREATE TABLE audit_events (
    id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    time TEXT NOT NULL,
    event TEXT NOT NULL,
    username TEXT,
    job_id BIGINT,
    line TEXT NOT NULL
);
CREATE INDEX audit_events_by_job ON audit_events (job_id);
CREATE INDEX audit_events_by_time ON audit_events (time);
"#,
    ),
];

/// The SQLite file, created if missing (with its folder).
fn sqlite_options(path: &Path) -> Result<AnyConnectOptions, StateError> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|source| StateError::Folder {
            path: parent.display().to_string(),
            source,
        })?;
    }
    let url = SqliteConnectOptions::from_str("sqlite://")?
        .filename(path)
        .create_if_missing(true)
        .to_url_lossy();
    Ok(AnyConnectOptions::from_url(&url)?)
}

/// SQLite tuned for durability on every connection: WAL, a full sync at each commit, and waiting
/// (not failing) on another connection's lock.
const SQLITE_PRAGMAS: &str =
    "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; PRAGMA busy_timeout = 10000;";

/// The connections that take and renew leases: the same, but a commit is not synced on its own.
/// WAL frames stay in order and the next synced commit (any upload or outcome) syncs them too, so
/// a power cut can only forget the latest leases, which a restart gives up anyway, and can never
/// make a synced commit undone. A pipeline claim then costs no sync of its own.
const SQLITE_LEASE_PRAGMAS: &str =
    "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; PRAGMA busy_timeout = 10000;";

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

/// Which SQL the database speaks, where the two differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Sqlite,
    Postgres,
}

impl Dialect {
    /// The text for this database of a query that differs between the two.
    pub(crate) fn pick(self, sqlite: &'static str, postgres: &'static str) -> &'static str {
        match self {
            Dialect::Sqlite => sqlite,
            Dialect::Postgres => postgres,
        }
    }
}

#[derive(Debug, Clone)]
pub struct State {
    pub(crate) pool: AnyPool,
    /// For taking and renewing leases (see [`SQLITE_LEASE_PRAGMAS`]); on PostgreSQL, the same
    /// pool.
    pub(crate) leases: AnyPool,
    pub(crate) dialect: Dialect,
}

pub(crate) fn now() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

/// The time `ago` before now, in the form times are stored in (RFC 3339 UTC with milliseconds, so
/// that text order is time order), for cutoffs; the Unix epoch when that is earlier still, so that
/// no configured duration can overflow.
pub(crate) fn time_ago(ago: std::time::Duration) -> String {
    let then = SystemTime::now()
        .checked_sub(ago)
        .unwrap_or(SystemTime::UNIX_EPOCH);
    humantime::format_rfc3339_millis(then).to_string()
}

impl State {
    /// Opens (creating if missing) the database and applies migrations. On PostgreSQL, migrations
    /// run under sqlx's advisory lock, so nodes starting together apply them once.
    pub async fn open(database: &Database) -> Result<State, StateError> {
        sqlx::any::install_default_drivers();
        let (options, dialect, connections) = match database {
            Database::Sqlite { path } => (sqlite_options(path)?, Dialect::Sqlite, 4),
            Database::Postgres { url } => {
                (AnyConnectOptions::from_str(url)?, Dialect::Postgres, 16)
            }
        };
        let pool = Self::pool(&options, dialect, connections, SQLITE_PRAGMAS).await?;
        let schema = match dialect {
            Dialect::Sqlite => &SQLITE_SCHEMA,
            Dialect::Postgres => &POSTGRES_SCHEMA,
        };
        let mut migrator = Migrator::with_migrations(
            schema
                .iter()
                .zip(1..)
                .map(|((description, sql), version)| {
                    Migration::new(
                        version,
                        Cow::Borrowed(*description),
                        MigrationType::Simple,
                        sql.into_sql_str(),
                        false,
                    )
                })
                .collect(),
        );
        // A node still on the previous release starts against a schema a newer one migrated
        // (migrations only add), so that a rolling upgrade can restart either.
        migrator.set_ignore_missing(true);
        migrator.run(&pool).await?;
        let leases = match dialect {
            Dialect::Sqlite => Self::pool(&options, dialect, 2, SQLITE_LEASE_PRAGMAS).await?,
            Dialect::Postgres => pool.clone(),
        };
        Ok(State {
            pool,
            leases,
            dialect,
        })
    }

    /// A pool of `connections`, each set up with `sqlite_pragmas` on SQLite.
    async fn pool(
        options: &AnyConnectOptions,
        dialect: Dialect,
        connections: u32,
        sqlite_pragmas: &'static str,
    ) -> Result<AnyPool, StateError> {
        Ok(AnyPoolOptions::new()
            .max_connections(connections)
            // sqlx pings a connection as it returns to the pool; a second ping as it leaves again
            // is worth its round trip only for a server that may have dropped an idle connection,
            // not for a local file, where it would add a thread hand-off to every statement.
            .test_before_acquire(dialect == Dialect::Postgres)
            .after_connect(move |connection, _| {
                Box::pin(async move {
                    if dialect == Dialect::Sqlite {
                        connection.execute(sqlite_pragmas).await?;
                    }
                    Ok(())
                })
            })
            .connect_with(options.clone())
            .await?)
    }

    /// Whether the database answers.
    pub async fn ping(&self) -> Result<(), StateError> {
        sqlx::query("SELECT 1").fetch_one(&self.pool).await?;
        Ok(())
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

    /// A fresh, empty state database: SQLite, or a new PostgreSQL database when the test run asks
    /// for one (`INGESTION_TEST_STATE=postgres`, as `scripts/test` does for its second pass).
    pub(super) async fn state() -> (tempfile::TempDir, State) {
        let dir = tempfile::tempdir().unwrap();
        let database = if std::env::var("INGESTION_TEST_STATE").is_ok_and(|v| v == "postgres") {
            let server = std::env::var("INGESTION_TEST_POSTGRES")
                .expect("INGESTION_TEST_STATE=postgres needs INGESTION_TEST_POSTGRES");
            Database::Postgres {
                url: fresh_postgres_database(&server).await,
            }
        } else {
            Database::Sqlite {
                path: dir.path().join("state/db.sqlite"),
            }
        };
        (dir, State::open(&database).await.unwrap())
    }

    /// Creates a database with a random name on the server at `url`; returns its URL.
    pub async fn fresh_postgres_database(url: &str) -> String {
        use sqlx::Connection;
        sqlx::any::install_default_drivers();
        let name = format!("test_{}", crate::storage::hex(&rand::random::<[u8; 8]>()));
        let mut connection = sqlx::AnyConnection::connect(url).await.unwrap();
        connection
            .execute(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .await
            .unwrap();
        let mut fresh = url::Url::parse(url).unwrap();
        fresh.set_path(&name);
        fresh.to_string()
    }

    #[test]
    fn time_ago_is_an_ordered_cutoff_and_never_overflows() {
        let hour_ago = time_ago(std::time::Duration::from_secs(3600));
        let day_ago = time_ago(std::time::Duration::from_secs(24 * 3600));
        assert!(
            day_ago < hour_ago && hour_ago < now(),
            "{day_ago} {hour_ago}"
        );
        assert_eq!(
            time_ago(std::time::Duration::MAX),
            "1970-01-01T00:00:00.000Z"
        );
    }

    #[tokio::test]
    async fn a_schema_migrated_by_a_newer_release_still_opens() {
        let dir = tempfile::tempdir().unwrap();
        let database = Database::Sqlite {
            path: dir.path().join("db.sqlite"),
        };
        let state = State::open(&database).await.unwrap();
        sqlx::query(
            "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(99_i64)
        .bind("from a newer release")
        .bind(true)
        .bind(vec![0_u8])
        .bind(0_i64)
        .execute(&state.pool)
        .await
        .unwrap();
        state.pool.close().await;
        State::open(&database).await.unwrap();
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

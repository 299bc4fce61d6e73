//! The audit trail's copy in the state database: every line the audit file gets, stored with the
//! fields the admin API and dashboard search by (time, event, user, job), so that the events of all
//! nodes can be read in one place. The file, with its hash chain, stays the record of truth; these
//! rows hold the same lines, `prev` included.

use sqlx::Row;
use sqlx::any::AnyRow;

use super::{State, StateError};

/// One audit line to store.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AuditRecord {
    pub time: String,
    pub event: String,
    pub username: Option<String>,
    pub job: Option<i64>,
    /// The JSON line exactly as appended to the audit file.
    pub line: String,
}

/// One stored audit line.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StoredEvent {
    pub id: i64,
    pub time: String,
    pub event: String,
    pub username: Option<String>,
    pub job: Option<i64>,
    pub line: String,
}

fn event_from_row(row: &AnyRow) -> Result<StoredEvent, StateError> {
    Ok(StoredEvent {
        id: row.try_get("id")?,
        time: row.try_get("time")?,
        event: row.try_get("event")?,
        username: row.try_get("username")?,
        job: row.try_get("job_id")?,
        line: row.try_get("line")?,
    })
}

impl State {
    /// Stores audit lines, in order, with one statement: the batch travels as one JSON array that
    /// the database unpacks into rows.
    pub async fn insert_audit_events(&self, records: &[AuditRecord]) -> Result<(), StateError> {
        let rows =
            serde_json::to_string(records).map_err(|error| sqlx::Error::Encode(error.into()))?;
        sqlx::query(self.dialect.pick(
            "INSERT INTO audit_events (time, event, username, job_id, line) \
             SELECT json_extract(value, '$.time'), json_extract(value, '$.event'), \
             json_extract(value, '$.username'), json_extract(value, '$.job'), \
             json_extract(value, '$.line') FROM json_each($1) ORDER BY key",
            "INSERT INTO audit_events (time, event, username, job_id, line) \
             SELECT \"time\", \"event\", \"username\", \"job\", \"line\" \
             FROM ROWS FROM (json_to_recordset($1::json) AS (\"time\" text, \"event\" text, \
             \"username\" text, \"job\" bigint, \"line\" text)) WITH ORDINALITY \
             AS batch (\"time\", \"event\", \"username\", \"job\", \"line\", position) \
             ORDER BY position",
        ))
        .bind(rows)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The audit lines about one job, oldest first.
    pub async fn job_events(&self, job: i64) -> Result<Vec<StoredEvent>, StateError> {
        let rows = sqlx::query(
            "SELECT id, time, event, username, job_id, line FROM audit_events \
             WHERE job_id = $1 ORDER BY id LIMIT 1000",
        )
        .bind(job)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(event_from_row).collect()
    }

    /// Deletes up to `batch` copied audit lines older than `before` (an RFC 3339 UTC time, the
    /// form lines are stored in, so that text order is time order); returns how many went.
    pub async fn delete_audit_events_before(
        &self,
        before: &str,
        batch: u32,
    ) -> Result<u64, StateError> {
        let deleted = sqlx::query(
            "DELETE FROM audit_events WHERE id IN \
             (SELECT id FROM audit_events WHERE time < $1 ORDER BY time LIMIT $2)",
        )
        .bind(before)
        .bind(i64::from(batch))
        .execute(&self.pool)
        .await?;
        Ok(deleted.rows_affected())
    }

    /// The most recent audit lines, newest first.
    pub async fn recent_events(&self, limit: u32) -> Result<Vec<StoredEvent>, StateError> {
        let rows = sqlx::query(
            "SELECT id, time, event, username, job_id, line FROM audit_events \
             ORDER BY id DESC LIMIT $1",
        )
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(event_from_row).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::state;
    use super::*;

    fn record(event: &str, job: Option<i64>) -> AuditRecord {
        AuditRecord {
            time: "2026-12-04T10:00:00.000Z".into(),
            event: event.into(),
            username: Some("acme".into()),
            job,
            line: format!("{{\"event\":\"{event}\"}}"),
        }
    }

    #[tokio::test]
    async fn old_audit_lines_are_deleted_in_batches_and_recent_ones_kept() {
        let (_dir, state) = state().await;
        let at = |time: &str, event: &str| AuditRecord {
            time: time.into(),
            ..record(event, None)
        };
        state
            .insert_audit_events(&[
                at("2026-09-01T00:00:00.000Z", "old-1"),
                at("2026-09-02T23:59:59.999Z", "old-2"),
                at("2026-09-03T00:00:00.000Z", "kept-1"),
                at("2026-12-04T10:00:00.000Z", "kept-2"),
                at("2026-08-31T12:00:00.000Z", "old-3"),
            ])
            .await
            .unwrap();
        let cutoff = "2026-09-03T00:00:00.000Z";
        assert_eq!(
            state.delete_audit_events_before(cutoff, 2).await.unwrap(),
            2
        );
        assert_eq!(
            state.delete_audit_events_before(cutoff, 2).await.unwrap(),
            1
        );
        assert_eq!(
            state.delete_audit_events_before(cutoff, 2).await.unwrap(),
            0
        );
        let kept: Vec<String> = state
            .recent_events(10)
            .await
            .unwrap()
            .into_iter()
            .map(|event| event.event)
            .collect();
        assert_eq!(kept, ["kept-2", "kept-1"]);
    }

    #[tokio::test]
    async fn audit_lines_are_stored_and_found_by_job() {
        let (_dir, state) = state().await;
        state
            .insert_audit_events(&[
                record("close", Some(7)),
                record("connect", None),
                record("delivered", Some(7)),
                AuditRecord {
                    username: None,
                    line: "{\"path\":\"/\\\"ä\\u0000'.csv\"}".into(),
                    ..record("service_started", None)
                },
            ])
            .await
            .unwrap();
        let of_job: Vec<_> = state
            .job_events(7)
            .await
            .unwrap()
            .into_iter()
            .map(|event| event.event)
            .collect();
        assert_eq!(of_job, ["close", "delivered"]);
        let recent = state.recent_events(3).await.unwrap();
        assert_eq!(recent[0].event, "service_started");
        assert_eq!(recent[0].username, None);
        assert_eq!(recent[0].line, "{\"path\":\"/\\\"ä\\u0000'.csv\"}");
        assert_eq!(recent[1].event, "delivered");
        assert_eq!(recent.len(), 3);
        assert_eq!(recent[2].line, "{\"event\":\"connect\"}");
    }
}

//! The notification outbox: alerts are rows written in the same transaction as the outcome they
//! report, then sent by the notifier with leases and retries, at least once, each with a stable
//! event id that receivers use to drop duplicates.

use std::time::Duration;

use sqlx::Row;
use sqlx::any::AnyRow;

use super::jobs::{later_ms, now_ms};
use super::{State, StateError, now};

/// An alert to send to one target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewAlert {
    /// Stable across retries: receivers deduplicate on it.
    pub event_id: String,
    /// `email`, `slack` or `webhook`.
    pub channel: String,
    /// The address, or the name of the environment variable / file holding the secret URL.
    pub target: String,
    /// `delivered`, `quarantined`, `stuck`, `received`.
    pub kind: String,
    /// The facts, as JSON, rendered into a message when sent.
    pub payload: String,
    pub job: Option<i64>,
}

/// An alert claimed for sending.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Alert {
    pub id: i64,
    pub event_id: String,
    pub channel: String,
    pub target: String,
    pub kind: String,
    pub payload: String,
    pub attempts: u32,
}

fn alert_from_row(row: &AnyRow) -> Result<Alert, StateError> {
    Ok(Alert {
        id: row.try_get("id")?,
        event_id: row.try_get("event_id")?,
        channel: row.try_get("channel")?,
        target: row.try_get("target")?,
        kind: row.try_get("kind")?,
        payload: row.try_get("payload")?,
        attempts: u32::try_from(row.try_get::<i64, _>("attempts")?).unwrap_or(u32::MAX),
    })
}

impl State {
    /// Inserts alerts inside an open transaction (the one recording the outcome).
    pub(crate) async fn insert_alerts(
        tx: &mut sqlx::AnyConnection,
        alerts: &[NewAlert],
    ) -> Result<(), StateError> {
        let created = now();
        for alert in alerts {
            sqlx::query(
                "INSERT INTO outbox (event_id, job_id, channel, target, kind, payload, state, attempts, \
                 next_attempt_at, created_at) VALUES ($1, $2, $3, $4, $5, $6, 'pending', 0, 0, $7)",
            )
            .bind(&alert.event_id)
            .bind(alert.job)
            .bind(&alert.channel)
            .bind(&alert.target)
            .bind(&alert.kind)
            .bind(&alert.payload)
            .bind(&created)
            .execute(&mut *tx)
            .await?;
        }
        Ok(())
    }

    /// Queues alerts on their own (a test alert, or `stuck`).
    pub async fn queue_alerts(&self, alerts: &[NewAlert]) -> Result<(), StateError> {
        let mut tx = self.pool.begin().await?;
        State::insert_alerts(&mut tx, alerts).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Claims up to `limit` alerts that are due, for `owner`, until `lease` passes.
    pub async fn claim_alerts(
        &self,
        owner: &str,
        lease: Duration,
        limit: u32,
    ) -> Result<Vec<Alert>, StateError> {
        let now = now_ms();
        macro_rules! claim {
            ($lock:literal) => {
                concat!(
                    "UPDATE outbox SET lease_owner = $1, lease_until = $2 WHERE id IN (\
                     SELECT id FROM outbox WHERE state = 'pending' AND next_attempt_at <= $3 \
                     AND (lease_owner IS NULL OR lease_until < $3) ORDER BY id LIMIT $4",
                    $lock,
                    ") RETURNING id, event_id, channel, target, kind, payload, attempts"
                )
            };
        }
        let rows = sqlx::query(
            self.dialect
                .pick(claim!(""), claim!(" FOR UPDATE SKIP LOCKED")),
        )
        .bind(owner)
        .bind(later_ms(lease))
        .bind(now)
        .bind(i64::from(limit))
        .fetch_all(&self.leases)
        .await?;
        rows.iter().map(alert_from_row).collect()
    }

    pub async fn alert_sent(&self, id: i64, owner: &str) -> Result<(), StateError> {
        sqlx::query(
            "UPDATE outbox SET state = 'sent', sent_at = $1, attempts = attempts + 1, lease_owner = NULL, \
             lease_until = NULL WHERE id = $2 AND lease_owner = $3",
        )
        .bind(now())
        .bind(id)
        .bind(owner)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Records a failed send: retried after `backoff`, or given up for good when `permanent`.
    pub async fn alert_failed(
        &self,
        id: i64,
        owner: &str,
        error: &str,
        backoff: Duration,
        permanent: bool,
    ) -> Result<(), StateError> {
        sqlx::query(
            "UPDATE outbox SET attempts = attempts + 1, last_error = $1, next_attempt_at = $2, \
             state = CASE WHEN $3 THEN 'failed' ELSE 'pending' END, lease_owner = NULL, lease_until = NULL \
             WHERE id = $4 AND lease_owner = $5",
        )
        .bind(error)
        .bind(later_ms(backoff))
        .bind(permanent)
        .bind(id)
        .bind(owner)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Counts alerts by state (for tests and the operator).
    pub async fn alert_counts(&self) -> Result<Vec<(String, i64)>, StateError> {
        let rows = sqlx::query("SELECT state, COUNT(*) FROM outbox GROUP BY state ORDER BY state")
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|row| Ok((row.try_get(0)?, row.try_get(1)?)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::state;
    use super::*;

    fn alert(event_id: &str) -> NewAlert {
        NewAlert {
            event_id: event_id.into(),
            channel: "email".into(),
            target: "team@example.org".into(),
            kind: "delivered".into(),
            payload: "{}".into(),
            job: None,
        }
    }

    #[tokio::test]
    async fn alerts_are_claimed_once_retried_and_finished() {
        let (_dir, state) = state().await;
        state
            .queue_alerts(&[alert("e1"), alert("e2")])
            .await
            .unwrap();
        let lease = Duration::from_secs(30);
        let claimed = state.claim_alerts("a", lease, 10).await.unwrap();
        assert_eq!(claimed.len(), 2);
        assert!(state.claim_alerts("b", lease, 10).await.unwrap().is_empty());
        state
            .alert_failed(claimed[0].id, "a", "smtp down", Duration::ZERO, false)
            .await
            .unwrap();
        state
            .alert_failed(claimed[1].id, "a", "400", Duration::ZERO, true)
            .await
            .unwrap();
        let again = state.claim_alerts("b", lease, 10).await.unwrap();
        assert_eq!(
            (again.len(), again[0].event_id.as_str(), again[0].attempts),
            (1, "e1", 1)
        );
        state.alert_sent(again[0].id, "b").await.unwrap();
        assert_eq!(
            state.alert_counts().await.unwrap(),
            [("failed".to_string(), 1), ("sent".to_string(), 1)]
        );
    }
}

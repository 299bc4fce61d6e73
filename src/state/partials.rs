//! Interrupted uploads ("partials"): one row per upload that has not been closed, with the parts it
//! stored, so that its owner can resume it from another connection, or after a restart.
//!
//! A partial has one writer at a time, named by a random token. The writer that resumes a partial
//! takes the token over; a writer whose token was taken (or whose row was discarded) learns it at its
//! next record and stops, so two connections never both extend one upload. A partial becomes a job
//! only through `record_upload_with_alerts`, which deletes it in the same transaction.

use sqlx::Row;
use sqlx::any::AnyRow;

use super::jobs::now_ms;
use super::{State, StateError, now};
use crate::storage::StoredPart;

/// An interrupted upload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partial {
    pub id: i64,
    pub username: String,
    /// Path inside the home, as for jobs.
    pub path: String,
    /// The landing object the upload completes to.
    pub landing_key: String,
    pub multipart_id: Option<String>,
    /// Bytes durably stored, from which the upload resumes.
    pub size: u64,
    pub started_at: String,
    /// Last time its writer stored a part or let go of it (Unix milliseconds).
    pub updated_ms: i64,
}

/// A partial to create when an upload first stores a part, or is cut off.
#[derive(Debug, Clone)]
pub struct NewPartial<'a> {
    pub username: &'a str,
    pub path: &'a str,
    pub parent: &'a str,
    pub name: &'a str,
    pub landing_key: &'a str,
    pub writer: &'a str,
}

/// A partial that a new one replaced: its multipart upload is to be discarded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replaced {
    pub landing_key: String,
    pub multipart_id: Option<String>,
}

/// Every column `partial_from_row` reads (a macro so that queries stay `&'static str`).
macro_rules! partial_columns {
    () => {
        "id, username, path, landing_key, multipart_id, size, started_at, updated_ms"
    };
}

/// [`partial_columns`] and the table.
macro_rules! from_partials {
    () => {
        concat!(partial_columns!(), " FROM partials")
    };
}

fn partial_from_row(row: &AnyRow) -> Result<Partial, StateError> {
    Ok(Partial {
        id: row.try_get("id")?,
        username: row.try_get("username")?,
        path: row.try_get("path")?,
        landing_key: row.try_get("landing_key")?,
        multipart_id: row.try_get("multipart_id")?,
        size: u64::try_from(row.try_get::<i64, _>("size")?).unwrap_or(0),
        started_at: row.try_get("started_at")?,
        updated_ms: row.try_get("updated_ms")?,
    })
}

/// What [`State::upload_target`] found about a path about to be opened for upload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UploadTarget {
    /// The path is a folder made with `mkdir`.
    pub is_made_folder: bool,
    /// Its parent is a folder made with `mkdir`.
    pub parent_is_made_folder: bool,
    /// The user's partials last written before the time given (left behind, not being written).
    pub left_behind: u64,
    /// Its interrupted upload.
    pub partial: Option<Partial>,
}

impl State {
    /// Creates the partial of a path for `new.writer`. With `replace`, a partial already there is
    /// discarded and returned (a newer upload of the path wins); without, nothing changes if there
    /// is one (`Ok(None)`).
    pub async fn start_partial(
        &self,
        new: &NewPartial<'_>,
        replace: bool,
    ) -> Result<Option<(i64, Option<Replaced>)>, StateError> {
        let mut tx = self.pool.begin().await?;
        let mut replaced = None;
        if replace {
            let old = sqlx::query(
                "DELETE FROM partials WHERE username = $1 AND path = $2 RETURNING id, landing_key, multipart_id",
            )
            .bind(new.username)
            .bind(new.path)
            .fetch_optional(&mut *tx)
            .await?;
            if let Some(old) = old {
                let old_id: i64 = old.try_get("id")?;
                sqlx::query("DELETE FROM partial_parts WHERE partial_id = $1")
                    .bind(old_id)
                    .execute(&mut *tx)
                    .await?;
                replaced = Some(Replaced {
                    landing_key: old.try_get("landing_key")?,
                    multipart_id: old.try_get("multipart_id")?,
                });
            }
        }
        let row = sqlx::query(
            "INSERT INTO partials (username, path, parent, name, landing_key, writer, started_at, updated_ms) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (username, path) DO NOTHING RETURNING id",
        )
        .bind(new.username)
        .bind(new.path)
        .bind(new.parent)
        .bind(new.name)
        .bind(new.landing_key)
        .bind(new.writer)
        .bind(now())
        .bind(now_ms())
        .fetch_optional(&mut *tx)
        .await?;
        tx.commit().await?;
        match row {
            Some(row) => Ok(Some((row.try_get(0)?, replaced))),
            None => Ok(None),
        }
    }

    /// Records parts `writer` stored (none: only that it is still the writer). `false` when the
    /// partial is no longer `writer`'s: it was resumed elsewhere, replaced or discarded.
    pub async fn record_parts(
        &self,
        id: i64,
        writer: &str,
        multipart_id: Option<&str>,
        parts: &[StoredPart],
    ) -> Result<bool, StateError> {
        let mut tx = self.pool.begin().await?;
        let size = parts
            .last()
            .map(|part| i64::try_from(part.end).unwrap_or(i64::MAX));
        let updated = sqlx::query(
            "UPDATE partials SET updated_ms = $1, size = COALESCE($2, size), \
             multipart_id = COALESCE($3, multipart_id) WHERE id = $4 AND writer = $5",
        )
        .bind(now_ms())
        .bind(size)
        .bind(multipart_id)
        .bind(id)
        .bind(writer)
        .execute(&mut *tx)
        .await?;
        if updated.rows_affected() != 1 {
            return Ok(false);
        }
        for part in parts {
            sqlx::query(
                "INSERT INTO partial_parts (partial_id, idx, content_id, end_offset, hash_state) \
                 VALUES ($1, $2, $3, $4, $5) ON CONFLICT (partial_id, idx) DO UPDATE SET \
                 content_id = excluded.content_id, end_offset = excluded.end_offset, hash_state = excluded.hash_state",
            )
            .bind(id)
            .bind(i64::try_from(part.index).unwrap_or(i64::MAX))
            .bind(&part.content_id)
            .bind(i64::try_from(part.end).unwrap_or(i64::MAX))
            .bind(&part.hash_state)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(true)
    }

    /// The partial of a path, if there is one.
    pub async fn partial(&self, username: &str, path: &str) -> Result<Option<Partial>, StateError> {
        sqlx::query(concat!(
            "SELECT ",
            from_partials!(),
            " WHERE username = $1 AND path = $2"
        ))
        .bind(username)
        .bind(path)
        .fetch_optional(&self.pool)
        .await?
        .as_ref()
        .map(partial_from_row)
        .transpose()
    }

    /// What opening `path` for upload needs to know, with one query: whether it is a folder made
    /// with `mkdir` (`folder`: its parent and name in `folders`), whether its parent folder is one
    /// (`parent_folder`, likewise), its partial, if there is one, and how many of the user's
    /// partials were last written before `left_behind_ms`.
    pub async fn upload_target(
        &self,
        username: &str,
        path: &str,
        folder: (&str, &str),
        parent_folder: (&str, &str),
        left_behind_ms: i64,
    ) -> Result<UploadTarget, StateError> {
        let row = sqlx::query(concat!(
            "SELECT (SELECT COUNT(*) FROM folders WHERE username = $1 AND parent = $3 AND name = $4) \
             AS made_folders, \
             (SELECT COUNT(*) FROM folders WHERE username = $1 AND parent = $5 AND name = $6) \
             AS made_parents, \
             (SELECT COUNT(*) FROM partials WHERE username = $1 AND updated_ms < $7) \
             AS left_behind, ",
            partial_columns!(),
            " FROM (SELECT 1 AS here) AS here LEFT JOIN partials ON username = $1 AND path = $2"
        ))
        .bind(username)
        .bind(path)
        .bind(folder.0)
        .bind(folder.1)
        .bind(parent_folder.0)
        .bind(parent_folder.1)
        .bind(left_behind_ms)
        .fetch_one(&self.pool)
        .await?;
        let partial = match row.try_get::<Option<i64>, _>("id")? {
            Some(_) => Some(partial_from_row(&row)?),
            None => None,
        };
        Ok(UploadTarget {
            is_made_folder: row.try_get::<i64, _>("made_folders")? > 0,
            parent_is_made_folder: row.try_get::<i64, _>("made_parents")? > 0,
            left_behind: u64::try_from(row.try_get::<i64, _>("left_behind")?).unwrap_or(0),
            partial,
        })
    }

    /// Makes `writer` the writer of a partial and returns it with its stored parts, in order.
    pub async fn take_partial(
        &self,
        id: i64,
        writer: &str,
    ) -> Result<Option<(Partial, Vec<StoredPart>)>, StateError> {
        let mut tx = self.pool.begin().await?;
        let taken = sqlx::query("UPDATE partials SET writer = $1, updated_ms = $2 WHERE id = $3")
            .bind(writer)
            .bind(now_ms())
            .bind(id)
            .execute(&mut *tx)
            .await?;
        if taken.rows_affected() != 1 {
            return Ok(None);
        }
        let partial = partial_from_row(
            &sqlx::query(concat!("SELECT ", from_partials!(), " WHERE id = $1"))
                .bind(id)
                .fetch_one(&mut *tx)
                .await?,
        )?;
        let rows = sqlx::query(
            "SELECT idx, content_id, end_offset, hash_state FROM partial_parts \
             WHERE partial_id = $1 ORDER BY idx",
        )
        .bind(id)
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        let parts = rows
            .iter()
            .map(|row| {
                Ok(StoredPart {
                    index: usize::try_from(row.try_get::<i64, _>("idx")?).unwrap_or(usize::MAX),
                    content_id: row.try_get("content_id")?,
                    end: u64::try_from(row.try_get::<i64, _>("end_offset")?).unwrap_or(0),
                    hash_state: row.try_get("hash_state")?,
                })
            })
            .collect::<Result<Vec<_>, StateError>>()?;
        Ok(Some((partial, parts)))
    }

    /// Partials directly inside a folder of a home (`parent` as for folders), for listings: at most
    /// one more than a listing may hold (`sftp::fs::MAX_LISTING`), so an over-full folder is told.
    pub async fn partials_in(
        &self,
        username: &str,
        parent: &str,
    ) -> Result<Vec<(String, Partial)>, StateError> {
        let rows = sqlx::query(concat!(
            "SELECT name, ",
            from_partials!(),
            " WHERE username = $1 AND parent = $2 ORDER BY name LIMIT 100001"
        ))
        .bind(username)
        .bind(parent)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| Ok((row.try_get("name")?, partial_from_row(row)?)))
            .collect()
    }

    /// Every partial (of one user, if given), oldest first.
    pub async fn partials(&self, username: Option<&str>) -> Result<Vec<Partial>, StateError> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            from_partials!(),
            " WHERE ($1 IS NULL OR username = $1) ORDER BY updated_ms, id"
        ))
        .bind(username)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(partial_from_row).collect()
    }

    /// Partials nobody has written to since `before_ms`, the oldest thousand (the expiry takes
    /// the rest on its next pass).
    pub async fn idle_partials(&self, before_ms: i64) -> Result<Vec<Partial>, StateError> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            from_partials!(),
            " WHERE updated_ms < $1 ORDER BY updated_ms, id LIMIT 1000"
        ))
        .bind(before_ms)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(partial_from_row).collect()
    }

    /// Deletes a partial and its parts. With `unchanged_since`, only if nobody wrote to it after
    /// that (so an expiry never takes a partial that came back to life); with `writer`, only if it
    /// is still that writer's (so a connection that lost it never deletes its successor's).
    /// `false` if nothing was deleted.
    pub async fn remove_partial(
        &self,
        id: i64,
        unchanged_since: Option<i64>,
        writer: Option<&str>,
    ) -> Result<bool, StateError> {
        let mut tx = self.pool.begin().await?;
        let removed = sqlx::query(
            "DELETE FROM partials WHERE id = $1 AND ($2 IS NULL OR updated_ms = $2) \
             AND ($3 IS NULL OR writer = $3)",
        )
        .bind(id)
        .bind(unchanged_since)
        .bind(writer)
        .execute(&mut *tx)
        .await?;
        if removed.rows_affected() != 1 {
            return Ok(false);
        }
        sqlx::query("DELETE FROM partial_parts WHERE partial_id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(true)
    }

    /// Deletes `writer`'s partial of a path inside a transaction that completes the upload.
    pub(super) async fn complete_partial(
        tx: &mut sqlx::AnyConnection,
        username: &str,
        path: &str,
        writer: &str,
    ) -> Result<(), StateError> {
        // The partial first, then its parts: the order every other statement here takes, so two
        // transactions on PostgreSQL never wait for each other in a circle.
        let removed = sqlx::query(
            "DELETE FROM partials WHERE username = $1 AND path = $2 AND writer = $3 RETURNING id",
        )
        .bind(username)
        .bind(path)
        .bind(writer)
        .fetch_optional(&mut *tx)
        .await?;
        if let Some(row) = removed {
            sqlx::query("DELETE FROM partial_parts WHERE partial_id = $1")
                .bind(row.try_get::<i64, _>(0)?)
                .execute(&mut *tx)
                .await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::state;
    use super::*;

    fn new<'a>(writer: &'a str) -> NewPartial<'a> {
        NewPartial {
            username: "acme",
            path: "in/big.bin",
            parent: "in",
            name: "big.bin",
            landing_key: "acme/in/big.bin",
            writer,
        }
    }

    fn part(index: usize) -> StoredPart {
        StoredPart {
            index,
            content_id: format!("etag-{index}"),
            end: (index as u64 + 1) * 16,
            hash_state: vec![index as u8; 3],
        }
    }

    #[tokio::test]
    async fn an_upload_target_is_a_made_folder_a_partial_or_nothing() {
        let (_dir, state) = state().await;
        let target = |path: &'static str, folder: (&'static str, &'static str)| {
            let state = state.clone();
            async move {
                let parent = path.rsplit_once('/').map_or("", |(parent, _)| parent);
                let parent_folder = parent.rsplit_once('/').unwrap_or(("", parent));
                let target = state
                    .upload_target("acme", path, folder, parent_folder, i64::MAX)
                    .await
                    .unwrap();
                (
                    target.is_made_folder,
                    target.parent_is_made_folder,
                    target.partial.map(|partial| partial.path),
                )
            }
        };
        assert_eq!(
            target("in/big.bin", ("in", "big.bin")).await,
            (false, false, None)
        );
        state
            .start_partial(&new("w1"), true)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            target("in/big.bin", ("in", "big.bin")).await,
            (false, false, Some("in/big.bin".to_string()))
        );
        assert!(state.create_folder("acme", "", "in").await.unwrap());
        assert_eq!(
            target("in/big.bin", ("in", "big.bin")).await,
            (false, true, Some("in/big.bin".to_string()))
        );
        assert_eq!(target("in", ("", "in")).await, (true, false, None));
        assert_eq!(target("other", ("", "other")).await, (false, false, None));
        assert!(state.create_folder("acme", "in", "deep").await.unwrap());
        assert_eq!(
            target("in/deep/x.csv", ("in/deep", "x.csv")).await,
            (false, true, None)
        );
        assert_eq!(
            target("in/other/x.csv", ("in/other", "x.csv")).await,
            (false, false, None)
        );
        let theirs = state
            .upload_target(
                "someone",
                "in/big.bin",
                ("in", "big.bin"),
                ("", "in"),
                i64::MAX,
            )
            .await
            .unwrap();
        assert_eq!(
            (
                theirs.parent_is_made_folder,
                theirs.left_behind,
                theirs.partial
            ),
            (false, 0, None),
            "another user's folder and partials are not this one's"
        );
        let left_behind = |before_ms: i64| {
            let state = state.clone();
            async move {
                state
                    .upload_target("acme", "x.csv", ("", "x.csv"), ("", ""), before_ms)
                    .await
                    .unwrap()
                    .left_behind
            }
        };
        assert_eq!(left_behind(i64::MAX).await, 1, "written before now");
        assert_eq!(left_behind(0).await, 0, "written after 1970");
    }

    #[tokio::test]
    async fn a_partial_is_recorded_resumed_by_a_new_writer_and_the_old_one_stops() {
        let (_dir, state) = state().await;
        let (id, replaced) = state
            .start_partial(&new("w1"), true)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(replaced, None);
        assert!(
            state
                .start_partial(&new("w2"), false)
                .await
                .unwrap()
                .is_none()
        );
        assert!(
            state
                .record_parts(id, "w1", Some("mp"), &[part(0), part(1)])
                .await
                .unwrap()
        );
        let partial = state.partial("acme", "in/big.bin").await.unwrap().unwrap();
        assert_eq!(
            (partial.size, partial.multipart_id.as_deref()),
            (32, Some("mp"))
        );
        assert_eq!(
            state.partials_in("acme", "in").await.unwrap()[0].0,
            "big.bin"
        );
        assert!(state.partials_in("acme", "").await.unwrap().is_empty());
        assert!(state.partials_in("other", "in").await.unwrap().is_empty());

        let (taken, parts) = state.take_partial(id, "w2").await.unwrap().unwrap();
        assert_eq!(taken.size, 32);
        assert_eq!(parts, [part(0), part(1)]);
        assert!(
            !state
                .record_parts(id, "w1", None, &[part(2)])
                .await
                .unwrap()
        );
        assert!(
            state
                .record_parts(id, "w2", None, &[part(2)])
                .await
                .unwrap()
        );
        assert_eq!(
            state
                .partial("acme", "in/big.bin")
                .await
                .unwrap()
                .unwrap()
                .size,
            48
        );

        // A newer upload of the path replaces it.
        let (newer, replaced) = state
            .start_partial(&new("w3"), true)
            .await
            .unwrap()
            .unwrap();
        assert_ne!(newer, id);
        assert_eq!(replaced.unwrap().multipart_id.as_deref(), Some("mp"));
        assert!(!state.record_parts(id, "w2", None, &[]).await.unwrap());
        let (_, parts) = state.take_partial(newer, "w3").await.unwrap().unwrap();
        assert!(parts.is_empty());
    }

    #[tokio::test]
    async fn expiry_takes_only_a_partial_left_alone_and_completion_deletes_it() {
        let (_dir, state) = state().await;
        let (id, _) = state
            .start_partial(&new("w1"), true)
            .await
            .unwrap()
            .unwrap();
        let idle = state.idle_partials(i64::MAX).await.unwrap();
        assert_eq!(idle.len(), 1);
        assert!(state.idle_partials(0).await.unwrap().is_empty());
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        assert!(
            state
                .record_parts(id, "w1", None, &[part(0)])
                .await
                .unwrap()
        );
        assert!(
            !state
                .remove_partial(id, Some(idle[0].updated_ms), None)
                .await
                .unwrap()
        );
        let mut tx = state.pool.begin().await.unwrap();
        State::complete_partial(&mut tx, "acme", "in/big.bin", "other")
            .await
            .unwrap();
        tx.commit().await.unwrap();
        assert_eq!(state.partials(Some("acme")).await.unwrap().len(), 1);
        let mut tx = state.pool.begin().await.unwrap();
        State::complete_partial(&mut tx, "acme", "in/big.bin", "w1")
            .await
            .unwrap();
        tx.commit().await.unwrap();
        assert!(state.partials(None).await.unwrap().is_empty());
        let parts: i64 = sqlx::query("SELECT COUNT(*) FROM partial_parts")
            .fetch_one(&state.pool)
            .await
            .unwrap()
            .get(0);
        assert_eq!(parts, 0);
        assert!(!state.remove_partial(id, None, None).await.unwrap());
    }
}

//! Uploads into the landing bucket that survive a dropped connection: an upload that ends without a
//! successful CLOSE is kept as a *partial* (never scanned or delivered), which its owner sees in
//! listings with the size durably stored, and can resume by opening it again without truncation
//! and writing from that size (OpenSSH `reput`, lftp `put -c`).
//!
//! Owns the link between a streaming [`Upload`] and its record in the state database: every part
//! the store acknowledges is recorded with the hash state after it, so a resume needs neither the
//! old connection nor the old process. Also owns the expiry of partials left alone for longer than
//! `server.partial_retention`.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use object_store::path::Path as ObjectPath;

use super::paths::VirtualPath;
use crate::audit::{Audit, Event, Subject};
use crate::state::{NewPartial, Partial, State, StateError};
use crate::storage::{Bucket, Progress, Resume, Upload, UploadError, Uploaded};

/// Why a write was not taken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteError {
    /// The upload cannot go on and is to be discarded.
    Failed(String),
    /// This write was refused, and the interrupted upload is kept as it was for another try.
    Refused(String),
    /// The store or the state database failed: what is stored is kept as an interrupted upload, to
    /// be resumed once they are back.
    Interrupted(String),
}

const SUPERSEDED: &str = "this upload was resumed or replaced by another connection, or expired \
                          on the server; upload the file again";
const INTERRUPTED: &str = "the server's storage failed; what was received is kept: resume the \
                           upload later (OpenSSH reput, lftp put -c)";
/// How often an upload receiving bytes tells the database it is alive, so that expiry
/// (`server.partial_retention`) never takes an upload that is slow but still under way.
const TOUCH_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

/// A partial not written to for this long counts as left behind (for
/// `limits.max_partials_per_user`): an upload still receiving bytes refreshes its record more often.
pub const LEFT_BEHIND_AFTER: std::time::Duration = TOUCH_EVERY.saturating_mul(2);

/// Why recording progress failed.
enum RecordError {
    /// Another writer has the partial now, or it is gone.
    Superseded,
    /// The state database failed.
    Database,
}

impl RecordError {
    fn into_write_error(self) -> WriteError {
        match self {
            RecordError::Superseded => WriteError::Failed(SUPERSEDED.into()),
            RecordError::Database => WriteError::Interrupted(INTERRUPTED.into()),
        }
    }
}

/// An upload into a user's home in the landing bucket, recorded as it goes so that it can be resumed.
pub struct LandingUpload {
    upload: Upload,
    state: State,
    landing: Bucket,
    username: String,
    /// Path inside the home, and its folder and name (as folders are recorded).
    path: String,
    parent: String,
    name: String,
    key: ObjectPath,
    max_size: u64,
    /// This connection's token as the partial's writer.
    writer: String,
    /// The partial's row, once there is one.
    row: Option<i64>,
    /// Bytes durably stored and recorded.
    stored: u64,
    resumed_from: Option<u64>,
    /// Bytes of the interrupted upload thrown away because the client started over from byte 0.
    restarted_over: Option<u64>,
    /// A write that could not continue a resumed upload: CLOSE must not complete it.
    refused: Option<String>,
    /// Another writer took the partial over.
    superseded: bool,
    /// When the database last heard from this upload.
    touched: std::time::Instant,
}

/// What `UserView::open` found for a path in the home.
pub struct Target<'a> {
    pub state: &'a State,
    pub landing: &'a Bucket,
    pub username: &'a str,
    pub home: &'a VirtualPath,
    pub key: ObjectPath,
    pub max_size: u64,
}

impl LandingUpload {
    /// A new upload from the first byte.
    pub fn start(target: Target<'_>) -> LandingUpload {
        let upload = target
            .landing
            .upload(target.key.clone(), target.max_size)
            .keep_parts_on_failure();
        LandingUpload::with(target, upload)
    }

    /// Carries on `partial`, taking it over from whichever connection wrote it before. A partial
    /// whose record cannot be used is discarded, with a message saying to upload the file again.
    pub async fn resume(target: Target<'_>, partial: &Partial) -> Result<LandingUpload, String> {
        let writer = new_writer();
        let Some((partial, parts)) = target
            .state
            .take_partial(partial.id, &writer)
            .await
            .map_err(|error| state_failure(&error))?
        else {
            return Err(
                "the interrupted upload was just removed; upload the whole file (put)".into(),
            );
        };
        let resume = Resume {
            multipart_id: partial.multipart_id.clone(),
            parts,
        };
        let upload = match target
            .landing
            .resume_upload(target.key.clone(), target.max_size, resume)
        {
            Ok(upload) => upload.keep_parts_on_failure(),
            Err(error) => {
                let _ = discard_partial(target.state, target.landing, &partial, None).await;
                return Err(error.to_string());
            }
        };
        let mut landing = LandingUpload::with(target, upload);
        landing.writer = writer;
        landing.row = Some(partial.id);
        landing.stored = partial.size;
        landing.resumed_from = Some(partial.size);
        Ok(landing)
    }

    fn with(target: Target<'_>, upload: Upload) -> LandingUpload {
        LandingUpload {
            upload,
            state: target.state.clone(),
            landing: target.landing.clone(),
            username: target.username.to_string(),
            path: target.home.relative(),
            parent: target.home.parent().relative(),
            name: target.home.name().unwrap_or_default().to_string(),
            key: target.key,
            max_size: target.max_size,
            writer: new_writer(),
            row: None,
            stored: 0,
            resumed_from: None,
            restarted_over: None,
            refused: None,
            superseded: false,
            touched: std::time::Instant::now(),
        }
    }

    /// Where a resumed upload carries on from.
    pub fn resumed_from(&self) -> Option<u64> {
        self.resumed_from
    }

    /// Bytes of an interrupted upload thrown away because the client wrote from byte 0 instead of
    /// resuming (a client that opens without truncation and sends the whole file); once.
    pub fn take_restart(&mut self) -> Option<u64> {
        self.restarted_over.take()
    }

    /// Bytes accepted so far, from offset 0.
    pub fn len(&self) -> u64 {
        self.upload.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Why CLOSE must fail while keeping the partial, if a write was refused.
    pub fn refused(&self) -> Option<&str> {
        self.refused.as_deref()
    }

    pub async fn write(&mut self, offset: u64, data: Bytes) -> Result<(), WriteError> {
        if let Some(reason) = &self.refused {
            return Err(WriteError::Refused(reason.clone()));
        }
        let result = match self.upload.write(offset, data.clone()).await {
            Err(UploadError::ResumeOffset { offset: 0, stored }) if stored > 0 => {
                // Written from the start without truncation: the client is sending the whole file.
                self.restart().await?;
                self.restarted_over = Some(stored);
                self.upload.write(offset, data).await
            }
            other => other,
        };
        match result {
            Ok(()) => {}
            Err(error @ UploadError::ResumeOffset { .. }) => {
                let reason = error.to_string();
                self.refused = Some(reason.clone());
                return Err(WriteError::Refused(reason));
            }
            Err(error) if error.is_outside_the_upload() => {
                tracing::warn!(path = %self.path, user = %self.username, %error, "storage failed during an upload");
                return Err(WriteError::Interrupted(INTERRUPTED.into()));
            }
            Err(error) => return Err(WriteError::Failed(error.to_string())),
        }
        if let Some(progress) = self.upload.take_progress() {
            self.record(Some(progress))
                .await
                .map_err(RecordError::into_write_error)?;
        } else if self.row.is_some() && self.touched.elapsed() >= TOUCH_EVERY {
            self.record(None)
                .await
                .map_err(RecordError::into_write_error)?;
        }
        Ok(())
    }

    /// Throws away the interrupted upload this one resumed, to start over from byte 0.
    async fn restart(&mut self) -> Result<(), WriteError> {
        if let Some(id) = self.row.take() {
            match self
                .state
                .remove_partial(id, None, Some(&self.writer))
                .await
            {
                Ok(true) => {
                    if let Some(multipart) = self.upload.multipart_id() {
                        abort(&self.landing, self.key.as_ref(), multipart).await;
                    }
                }
                Ok(false) => {
                    self.superseded = true;
                    return Err(WriteError::Failed(SUPERSEDED.into()));
                }
                Err(error) => {
                    state_failure(&error);
                    return Err(WriteError::Interrupted(INTERRUPTED.into()));
                }
            }
        }
        self.upload = self
            .landing
            .upload(self.key.clone(), self.max_size)
            .keep_parts_on_failure();
        self.stored = 0;
        self.resumed_from = None;
        Ok(())
    }

    /// Records stored parts (or, with none, that this writer still holds the partial), creating the
    /// partial's row first if needed.
    async fn record(&mut self, progress: Option<Progress>) -> Result<(), RecordError> {
        let id = match self.row {
            Some(id) => id,
            None => self.create_row().await?,
        };
        let (multipart, parts) = match &progress {
            Some(progress) => (
                Some(progress.multipart_id.as_str()),
                progress.parts.as_slice(),
            ),
            None => (None, &[][..]),
        };
        match self
            .state
            .record_parts(id, &self.writer, multipart, parts)
            .await
        {
            Ok(true) => {}
            Ok(false) => {
                self.superseded = true;
                return Err(RecordError::Superseded);
            }
            Err(error) => {
                state_failure(&error);
                return Err(RecordError::Database);
            }
        }
        self.touched = std::time::Instant::now();
        if let Some(last) = parts.last() {
            self.stored = last.end;
        }
        Ok(())
    }

    /// Creates the partial's row. A partial of the same path from another upload is discarded
    /// (this, newer upload wins).
    async fn create_row(&mut self) -> Result<i64, RecordError> {
        let key = self.key.to_string();
        let new = NewPartial {
            username: &self.username,
            path: &self.path,
            parent: &self.parent,
            name: &self.name,
            landing_key: &key,
            writer: &self.writer,
        };
        match self.state.start_partial(&new, true).await {
            Ok(Some((id, replaced))) => {
                if let Some(replaced) = replaced
                    && let Some(multipart) = replaced.multipart_id
                    && Some(multipart.as_str()) != self.upload.multipart_id()
                {
                    abort(&self.landing, &replaced.landing_key, &multipart).await;
                }
                self.row = Some(id);
                Ok(id)
            }
            Ok(None) => {
                self.superseded = true;
                Err(RecordError::Superseded)
            }
            Err(error) => {
                state_failure(&error);
                Err(RecordError::Database)
            }
        }
    }

    /// The connection ended without CLOSE (or the storage failed): keeps what is stored as a
    /// partial, to be resumed. An upload that stored nothing leaves nothing behind (there is
    /// nothing to resume; the client sends the file again). Returns the bytes kept.
    pub async fn suspend(mut self) -> u64 {
        if self.superseded {
            return 0;
        }
        if let Some(progress) = self.upload.suspend().await
            && let Err(RecordError::Superseded | RecordError::Database) =
                self.record(Some(progress)).await
        {
            tracing::warn!(path = %self.path, user = %self.username, "the last parts of an interrupted upload were not recorded");
        }
        if self.stored == 0 && !self.superseded {
            let stored = self.stored;
            self.discard().await;
            return stored;
        }
        self.stored
    }

    /// Completes the upload. On success, returns what was stored and the writer token whose partial
    /// the job recording must delete. When the storage or the database fails, what is stored is
    /// kept for a resume.
    pub async fn finish(mut self) -> Result<(Uploaded, Option<String>), String> {
        if self.row.is_some() {
            match self.record(None).await {
                Ok(()) => {}
                Err(RecordError::Superseded) => {
                    self.discard().await;
                    return Err(SUPERSEDED.into());
                }
                Err(RecordError::Database) => return Err(INTERRUPTED.into()),
            }
        }
        let (row, writer, state) = (self.row, self.writer.clone(), self.state.clone());
        match self.upload.finish().await {
            Ok(uploaded) => Ok((uploaded, row.map(|_| writer))),
            Err(error) if error.is_outside_the_upload() && row.is_some() => {
                tracing::warn!(%error, "completing an upload failed; its parts are kept for a resume");
                Err(INTERRUPTED.into())
            }
            Err(error) => {
                // The upload aborted its multipart upload; its record goes too.
                if let Some(id) = row {
                    remove_row(&state, id, &writer).await;
                }
                Err(error.to_string())
            }
        }
    }

    /// Throws the upload away, and its partial unless another connection took that over.
    pub async fn discard(self) {
        if self.superseded {
            let current = self.state.partial(&self.username, &self.path).await;
            let shared = match &current {
                Ok(Some(partial)) => partial.multipart_id.as_deref() == self.upload.multipart_id(),
                // Unknown: keeping a stray multipart upload is better than breaking someone's.
                Err(_) => true,
                Ok(None) => false,
            };
            if !shared {
                self.upload.abort().await;
            }
            return;
        }
        match self.row {
            // Only this writer's record, and then its parts: never a successor's.
            Some(id) => {
                if remove_row(&self.state, id, &self.writer).await {
                    self.upload.abort().await;
                }
            }
            None => self.upload.abort().await,
        }
    }
}

fn new_writer() -> String {
    crate::storage::hex(&rand::random::<[u8; 8]>())
}

fn state_failure(error: &StateError) -> String {
    tracing::error!(%error, "state database error while recording an upload");
    "the server could not record this upload; try again later".into()
}

/// Deletes `writer`'s record of an interrupted upload; `false` if it is not (or no longer) theirs
/// or the database failed.
async fn remove_row(state: &State, id: i64, writer: &str) -> bool {
    match state.remove_partial(id, None, Some(writer)).await {
        Ok(removed) => removed,
        Err(error) => {
            tracing::warn!(%error, id, "cannot delete the record of an interrupted upload");
            false
        }
    }
}

/// Aborts a multipart upload of the landing bucket, logging (not failing) when that is impossible:
/// the bucket's lifecycle rule for incomplete multipart uploads is the backstop.
async fn abort(landing: &Bucket, key: &str, multipart: &str) {
    let result = match ObjectPath::parse(key) {
        Ok(key) => landing.abort_multipart(&key, multipart).await,
        Err(error) => Err(error.into()),
    };
    if let Err(error) = result {
        tracing::warn!(%key, %error, "cannot abort the multipart upload of an interrupted upload");
    }
}

/// Discards a partial for good: its record first (so nobody resumes it meanwhile), then its
/// stored parts. `unchanged_since` as for [`State::remove_partial`]. `false` if it was not removed.
pub async fn discard_partial(
    state: &State,
    landing: &Bucket,
    partial: &Partial,
    unchanged_since: Option<i64>,
) -> Result<bool, StateError> {
    if !state
        .remove_partial(partial.id, unchanged_since, None)
        .await?
    {
        return Ok(false);
    }
    if let Some(multipart) = &partial.multipart_id {
        abort(landing, &partial.landing_key, multipart).await;
    }
    Ok(true)
}

/// Removes partials nobody wrote to for `retention`, checking every so often, for ever.
pub async fn expire_partials(
    state: State,
    landing: Bucket,
    retention: Duration,
    audit: Arc<Audit>,
) {
    let every = (retention / 4).clamp(Duration::from_millis(500), Duration::from_secs(60));
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let cutoff = crate::state::ms_ago(retention);
        let idle = match state.idle_partials(cutoff).await {
            Ok(idle) => idle,
            Err(error) => {
                tracing::warn!(%error, "cannot look for expired interrupted uploads");
                continue;
            }
        };
        for partial in idle {
            match discard_partial(&state, &landing, &partial, Some(partial.updated_ms)).await {
                Ok(true) => audit.record(
                    &Subject::of_user(&partial.username),
                    Event::PartialExpired {
                        path: format!("/{}", partial.path),
                        bytes_stored: partial.size,
                        retention: humantime::format_duration(retention).to_string(),
                    },
                ),
                Ok(false) => {}
                Err(error) => tracing::warn!(%error, "cannot remove an expired interrupted upload"),
            }
        }
    }
}

//! A streaming upload: bytes from the client go to the store as they arrive, in parts, with a SHA-256
//! computed on the way and memory bounded by a few parts whatever the file size.
//!
//! Writes normally arrive in order. A bounded reorder window absorbs writes that arrive slightly
//! ahead, and rewrites of bytes not yet sent to the store are applied in place, so the stored object is
//! exactly what the client wrote. A rewrite of bytes already streamed cannot be honoured and fails the
//! upload loudly; nothing is ever silently corrupted or truncated. Small files (below one part) are
//! stored with a single put; larger ones part by part through [`MultipartStore`] (S3 multipart, or a
//! staging file on local disk). Nothing is visible in the store before [`Upload::finish`] succeeds.
//!
//! Every stored part is reported ([`Upload::take_progress`]) with the hash state after it, so that an
//! upload cut off by a dropped connection or a crash can carry on later from its last stored part
//! ([`Upload::resume`]) and still end with the SHA-256 of the whole file.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use object_store::multipart::{MultipartStore, PartId};
use object_store::path::Path as ObjectPath;
use object_store::{
    Attribute, AttributeValue, Attributes, MultipartId, ObjectStore, PutMultipartOptions,
    PutOptions, PutPayload, TagSet,
};
use sha2::digest::common::hazmat::SerializableState;
use sha2::{Digest, Sha256};
use tokio::task::JoinHandle;

/// Parts uploading at once per file; more means more memory, fewer means less overlap.
const PARTS_IN_FLIGHT: usize = 2;
/// Bytes that may wait ahead of a gap before the upload is refused.
const REORDER_WINDOW: usize = 8 * 1024 * 1024;
/// Writes that may wait after a gap (tiny writes would otherwise cost far more than their bytes).
const REORDER_ENTRIES: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    #[error("the file exceeds the maximum upload size of {limit} bytes (server.max_file_size)")]
    TooLarge { limit: u64 },
    #[error(
        "a write at offset {offset} rewrites bytes before offset {streamed} that were already \
         stored; upload the file again sequentially"
    )]
    Rewrite { offset: u64, streamed: u64 },
    #[error(
        "this is an interrupted upload holding {stored} bytes, and a write at offset {offset} cannot \
         continue it: resume from offset {stored} (OpenSSH `reput`, lftp `put -c`), or upload the \
         whole file again with truncation (`put`)"
    )]
    ResumeOffset { offset: u64, stored: u64 },
    #[error(
        "writes arrived too far out of order (more than {REORDER_WINDOW} bytes or {REORDER_ENTRIES} writes waiting after a gap \
         at offset {gap}); upload the file again sequentially"
    )]
    ReorderWindow { gap: u64 },
    #[error("a write at offset {offset} overlaps another write still waiting after a gap")]
    OverlapAhead { offset: u64 },
    #[error("the file has a gap: no bytes were written at offset {offset}")]
    Gap { offset: u64 },
    #[error("the storage refused the upload: {0}")]
    Store(#[from] object_store::Error),
    #[error("the upload task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
    #[error("the upload already failed: {0}")]
    Failed(String),
    #[error("the bytes read have SHA-256 {actual} but {expected} was expected; nothing was stored")]
    Mismatch { expected: String, actual: String },
    #[error(
        "the record of the interrupted upload cannot be used ({0}); upload the whole file again"
    )]
    BadRecord(String),
}

impl UploadError {
    /// The store, the network or the server failed, not the bytes or the client: what is stored
    /// remains good, and the upload can go on later.
    pub fn is_outside_the_upload(&self) -> bool {
        matches!(self, UploadError::Store(_) | UploadError::Task(_))
    }
}

/// What a finished upload stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Uploaded {
    pub size: u64,
    /// Lowercase hex SHA-256 of the stored bytes.
    pub sha256: String,
}

/// A part durably stored, with what is needed to carry on after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredPart {
    /// Part number, from 0.
    pub index: usize,
    /// The store's id of the part (the S3 ETag), needed to complete the upload.
    pub content_id: String,
    /// Bytes of the file stored up to the end of this part.
    pub end: u64,
    /// The SHA-256 state after hashing every byte up to `end`.
    pub hash_state: Vec<u8>,
}

/// Parts stored since the last [`Upload::take_progress`], in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Progress {
    pub multipart_id: String,
    pub parts: Vec<StoredPart>,
}

/// Where an interrupted upload stands: its multipart upload and the parts it stored, in order.
#[derive(Debug, Clone, Default)]
pub struct Resume {
    pub multipart_id: Option<String>,
    pub parts: Vec<StoredPart>,
}

/// A part on its way to the store.
struct InFlight {
    index: usize,
    end: u64,
    hash_state: Vec<u8>,
    task: JoinHandle<object_store::Result<PartId>>,
}

pub struct Upload {
    store: Arc<dyn ObjectStore>,
    parts_store: Arc<dyn MultipartStore>,
    key: ObjectPath,
    part_size: usize,
    max_size: u64,
    /// Bytes from `sealed` onwards not yet handed to the store.
    buffer: BytesMut,
    /// Bytes before this offset are hashed and handed to the store.
    sealed: u64,
    /// Writes that arrived ahead of `sealed + buffer.len()`, by offset.
    ahead: BTreeMap<u64, Bytes>,
    ahead_bytes: usize,
    hasher: Sha256,
    multipart: Option<MultipartId>,
    /// Ids of the parts stored, in order.
    parts: Vec<PartId>,
    in_flight: VecDeque<InFlight>,
    /// Stored parts not yet taken by [`Upload::take_progress`].
    progress: Vec<StoredPart>,
    /// A resumed upload's first write must start here.
    resumed_at: Option<u64>,
    /// Whether [`Upload::take_progress`] has reported the multipart upload.
    multipart_reported: bool,
    failed: Option<String>,
    /// Stored with the object (S3 metadata and tags).
    tags: TagSet,
    attributes: Attributes,
    /// When set, the object is published only if its SHA-256 is this.
    expected_sha256: Option<String>,
    /// Keep the stored parts when completing fails for a reason outside the upload (the store or
    /// the network), so that a recorded upload can be completed later.
    keep_parts_on_failure: bool,
}

impl Upload {
    pub(super) fn new(
        store: Arc<dyn ObjectStore>,
        parts_store: Arc<dyn MultipartStore>,
        key: ObjectPath,
        part_size: usize,
        max_size: u64,
    ) -> Upload {
        Upload {
            store,
            parts_store,
            key,
            part_size,
            max_size,
            buffer: BytesMut::new(),
            sealed: 0,
            ahead: BTreeMap::new(),
            ahead_bytes: 0,
            hasher: Sha256::new(),
            multipart: None,
            parts: Vec::new(),
            in_flight: VecDeque::new(),
            progress: Vec::new(),
            resumed_at: None,
            multipart_reported: false,
            failed: None,
            tags: TagSet::default(),
            attributes: Attributes::new(),
            expected_sha256: None,
            keep_parts_on_failure: false,
        }
    }

    /// See `keep_parts_on_failure`: for uploads whose parts are recorded elsewhere.
    pub fn keep_parts_on_failure(mut self) -> Upload {
        self.keep_parts_on_failure = true;
        self
    }

    /// Carries on an interrupted upload after its last stored part. The parts must be the ones
    /// [`Upload::take_progress`] reported, in order.
    pub(super) fn resume(mut self, resume: Resume) -> Result<Upload, UploadError> {
        let part_size = self.part_size as u64;
        for (position, part) in resume.parts.iter().enumerate() {
            if part.index != position || part.end != (position as u64 + 1) * part_size {
                return Err(UploadError::BadRecord(format!(
                    "part {position} is recorded as part {} ending at byte {}",
                    part.index, part.end
                )));
            }
        }
        if let Some(last) = resume.parts.last() {
            let state =
                sha2::digest::array::Array::try_from(last.hash_state.as_slice()).map_err(|_| {
                    UploadError::BadRecord("the hash state has the wrong length".into())
                })?;
            self.hasher = Sha256::deserialize(&state)
                .map_err(|_| UploadError::BadRecord("the hash state is not valid".into()))?;
            self.sealed = last.end;
        }
        if resume.multipart_id.is_none() && !resume.parts.is_empty() {
            return Err(UploadError::BadRecord(
                "parts without a multipart upload".into(),
            ));
        }
        self.multipart_reported = resume.multipart_id.is_some();
        self.multipart = resume.multipart_id;
        self.parts = resume
            .parts
            .into_iter()
            .map(|part| PartId {
                content_id: part.content_id,
            })
            .collect();
        self.resumed_at = Some(self.sealed);
        Ok(self)
    }

    /// Stores `metadata` as object metadata and tags.
    pub(super) fn with_metadata(mut self, metadata: &[(&str, String)]) -> Upload {
        for (key, value) in metadata {
            self.tags.push(key, value);
            self.attributes.insert(
                Attribute::Metadata((*key).to_string().into()),
                AttributeValue::from(value.clone()),
            );
        }
        self
    }

    /// Publishes the object only if its bytes hash to `sha256`; otherwise nothing is stored.
    pub fn expect_sha256(mut self, sha256: &str) -> Upload {
        self.expected_sha256 = Some(sha256.to_string());
        self
    }

    /// Bytes accepted so far in one contiguous run from offset 0.
    pub fn len(&self) -> u64 {
        self.buffered_end()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn buffered_end(&self) -> u64 {
        self.sealed + self.buffer.len() as u64
    }

    /// Accepts `data` at `offset`. After an error the upload is failed for good, except for a
    /// resumed upload's first write at the wrong offset, which leaves it as it was.
    pub async fn write(&mut self, offset: u64, data: Bytes) -> Result<(), UploadError> {
        if let Some(reason) = &self.failed {
            return Err(UploadError::Failed(reason.clone()));
        }
        if let Some(stored) = self.resumed_at {
            if offset != stored {
                return Err(UploadError::ResumeOffset { offset, stored });
            }
            self.resumed_at = None;
        }
        let result = self.write_inner(offset, data).await;
        if let Err(error) = &result {
            self.failed = Some(error.to_string());
        }
        result
    }

    async fn write_inner(&mut self, offset: u64, data: Bytes) -> Result<(), UploadError> {
        let end = offset.saturating_add(data.len() as u64);
        if end > self.max_size {
            return Err(UploadError::TooLarge {
                limit: self.max_size,
            });
        }
        if data.is_empty() {
            return Ok(());
        }
        if offset < self.sealed {
            return Err(UploadError::Rewrite {
                offset,
                streamed: self.sealed,
            });
        }
        if self.overlaps_ahead(offset, end) {
            return Err(UploadError::OverlapAhead { offset });
        }
        if offset > self.buffered_end() {
            self.ahead_bytes += data.len();
            if self.ahead_bytes > REORDER_WINDOW || self.ahead.len() >= REORDER_ENTRIES {
                return Err(UploadError::ReorderWindow {
                    gap: self.buffered_end(),
                });
            }
            self.ahead.insert(offset, data);
            return Ok(());
        }
        self.apply(offset, &data);
        let mut end = self.buffered_end();
        while let Some(entry) = self.ahead.first_entry() {
            if *entry.key() > end {
                break;
            }
            let (offset, data) = entry.remove_entry();
            self.ahead_bytes -= data.len();
            self.apply(offset, &data);
            end = self.buffered_end();
        }
        // Strictly more than a part: the last byte always waits for `finish`, so what is stored of an
        // interrupted upload is always less than the whole file (a resuming client sees it unfinished).
        while self.buffer.len() > self.part_size {
            let part = self.buffer.split_to(self.part_size).freeze();
            self.send_part(part).await?;
        }
        Ok(())
    }

    fn overlaps_ahead(&self, offset: u64, end: u64) -> bool {
        self.ahead
            .range(..end)
            .next_back()
            .is_some_and(|(start, data)| start + data.len() as u64 > offset)
    }

    /// Copies `data` into the buffer at `offset`, which is within or just after the buffered bytes.
    fn apply(&mut self, offset: u64, data: &[u8]) {
        let start = usize::try_from(offset - self.sealed).unwrap_or(usize::MAX);
        let overlap = self.buffer.len().saturating_sub(start).min(data.len());
        if let (Some(target), Some(source)) = (
            self.buffer.get_mut(start..start + overlap),
            data.get(..overlap),
        ) {
            target.copy_from_slice(source);
        }
        if let Some(rest) = data.get(overlap..) {
            self.buffer.extend_from_slice(rest);
        }
    }

    /// Hashes a full part and hands it to the store, waiting while too many parts are in flight.
    async fn send_part(&mut self, part: Bytes) -> Result<(), UploadError> {
        self.hasher.update(&part);
        self.sealed += part.len() as u64;
        let multipart = match &self.multipart {
            Some(id) => id.clone(),
            None => {
                let options = PutMultipartOptions {
                    tags: self.tags.clone(),
                    attributes: self.attributes.clone(),
                    ..PutMultipartOptions::default()
                };
                let id = self
                    .parts_store
                    .create_multipart_opts(&self.key, options)
                    .await?;
                self.multipart = Some(id.clone());
                id
            }
        };
        let index = self.parts.len() + self.in_flight.len();
        let store = self.parts_store.clone();
        let key = self.key.clone();
        let task = tokio::spawn(async move {
            store
                .put_part(&key, &multipart, index, PutPayload::from(part))
                .await
        });
        self.in_flight.push_back(InFlight {
            index,
            end: self.sealed,
            hash_state: self.hasher.serialize().to_vec(),
            task,
        });
        while self.in_flight.len() > PARTS_IN_FLIGHT
            || self
                .in_flight
                .front()
                .is_some_and(|oldest| oldest.task.is_finished())
        {
            self.store_oldest().await?;
        }
        Ok(())
    }

    /// Waits for the oldest part in flight and records it as stored.
    async fn store_oldest(&mut self) -> Result<(), UploadError> {
        if let Some(oldest) = self.in_flight.pop_front() {
            let id = oldest.task.await??;
            self.progress.push(StoredPart {
                index: oldest.index,
                content_id: id.content_id.clone(),
                end: oldest.end,
                hash_state: oldest.hash_state,
            });
            self.parts.push(id);
        }
        Ok(())
    }

    /// Parts stored since the last call, if any, for a caller that records them so that the upload
    /// can be resumed. A multipart upload just started is reported at once, before its first part
    /// is stored, so that a record of it exists if this process dies: nothing unrecorded is left
    /// behind in the store.
    pub fn take_progress(&mut self) -> Option<Progress> {
        let new_multipart = self.multipart.is_some() && !self.multipart_reported;
        if self.progress.is_empty() && !new_multipart {
            return None;
        }
        self.multipart_reported = true;
        Some(Progress {
            multipart_id: self.multipart.clone().unwrap_or_default(),
            parts: std::mem::take(&mut self.progress),
        })
    }

    /// The multipart upload holding the stored parts, once there is one.
    pub fn multipart_id(&self) -> Option<&str> {
        self.multipart.as_deref()
    }

    /// Stops without completing or discarding: waits for the parts in flight, keeps what the store
    /// acknowledged, and drops the bytes not yet in a part. Returns the parts stored since the last
    /// [`Upload::take_progress`]. A part that fails ends the stored run there.
    pub async fn suspend(&mut self) -> Option<Progress> {
        while !self.in_flight.is_empty() {
            if let Err(error) = self.store_oldest().await {
                tracing::warn!(key = %self.key, %error, "a part of an interrupted upload was not stored");
                for part in self.in_flight.drain(..) {
                    part.task.abort();
                }
            }
        }
        self.take_progress()
    }

    /// Completes the object. Only after this returns `Ok` is the object visible, whole, in the store.
    pub async fn finish(mut self) -> Result<Uploaded, UploadError> {
        if let Some(reason) = self.failed.take() {
            self.abort().await;
            return Err(UploadError::Failed(reason));
        }
        if !self.ahead.is_empty() {
            let gap = self.buffered_end();
            self.abort().await;
            return Err(UploadError::Gap { offset: gap });
        }
        match self.complete().await {
            Ok(uploaded) => Ok(uploaded),
            Err(error) if self.keep_parts_on_failure && error.is_outside_the_upload() => Err(error),
            Err(error) => {
                self.abort().await;
                Err(error)
            }
        }
    }

    async fn complete(&mut self) -> Result<Uploaded, UploadError> {
        let last = std::mem::take(&mut self.buffer).freeze();
        match self.multipart.clone() {
            None => {
                self.hasher.update(&last);
                self.sealed += last.len() as u64;
                let uploaded = self.verified()?;
                let options = PutOptions {
                    tags: self.tags.clone(),
                    attributes: self.attributes.clone(),
                    ..PutOptions::default()
                };
                self.store
                    .put_opts(&self.key, PutPayload::from(last), options)
                    .await?;
                Ok(uploaded)
            }
            Some(multipart) => {
                if !last.is_empty() {
                    self.send_part(last).await?;
                }
                while !self.in_flight.is_empty() {
                    self.store_oldest().await?;
                }
                let uploaded = self.verified()?;
                self.parts_store
                    .complete_multipart(&self.key, &multipart, self.parts.clone())
                    .await?;
                self.multipart = None;
                Ok(uploaded)
            }
        }
    }

    /// The size and SHA-256 of every byte, checked against the expected SHA-256 if there is one.
    fn verified(&self) -> Result<Uploaded, UploadError> {
        let sha256 = hex(&self.hasher.clone().finalize());
        if let Some(expected) = &self.expected_sha256
            && *expected != sha256
        {
            return Err(UploadError::Mismatch {
                expected: expected.clone(),
                actual: sha256,
            });
        }
        Ok(Uploaded {
            size: self.sealed,
            sha256,
        })
    }

    /// Discards everything: in-flight parts are cancelled and the multipart upload aborted.
    pub async fn abort(mut self) {
        for part in self.in_flight.drain(..) {
            part.task.abort();
        }
        if let Some(multipart) = self.multipart.take()
            && let Err(error) = self
                .parts_store
                .abort_multipart(&self.key, &multipart)
                .await
        {
            tracing::warn!(key = %self.key, %error, "could not abort a multipart upload");
        }
    }
}

/// Lowercase hex of bytes.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut out, byte| {
            let _ = write!(out, "{byte:02x}");
            out
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::ObjectStoreExt;
    use object_store::memory::InMemory;

    fn upload_to(store: &Arc<InMemory>, key: &ObjectPath, part_size: usize, max: u64) -> Upload {
        Upload::new(store.clone(), store.clone(), key.clone(), part_size, max)
    }

    async fn run(
        part_size: usize,
        writes: &[(u64, &[u8])],
    ) -> Result<(Uploaded, Vec<u8>), UploadError> {
        let store = Arc::new(InMemory::new());
        let key = ObjectPath::from("acme/file.bin");
        let mut upload = upload_to(&store, &key, part_size, 1 << 30);
        for (offset, data) in writes {
            upload.write(*offset, Bytes::copy_from_slice(data)).await?;
        }
        let uploaded = upload.finish().await?;
        let stored = store.get(&key).await?.bytes().await?.to_vec();
        Ok((uploaded, stored))
    }

    fn sha(data: &[u8]) -> String {
        hex(&Sha256::digest(data))
    }

    #[tokio::test]
    async fn sequential_small_and_multipart() {
        for part_size in [4, 1000] {
            let (uploaded, stored) = run(part_size, &[(0, b"hello "), (6, b"world"), (11, b"!")])
                .await
                .unwrap();
            assert_eq!(stored, b"hello world!");
            assert_eq!(uploaded.size, 12);
            assert_eq!(uploaded.sha256, sha(b"hello world!"));
        }
    }

    #[tokio::test]
    async fn empty_file() {
        let (uploaded, stored) = run(4, &[]).await.unwrap();
        assert!(stored.is_empty());
        assert_eq!(uploaded.sha256, sha(b""));
    }

    #[tokio::test]
    async fn out_of_order_within_window() {
        let (uploaded, stored) = run(4, &[(6, b"world"), (0, b"hello "), (11, b"!")])
            .await
            .unwrap();
        assert_eq!(stored, b"hello world!");
        assert_eq!(uploaded.sha256, sha(b"hello world!"));
    }

    #[tokio::test]
    async fn rewrite_of_unsent_bytes_is_applied() {
        let (_, stored) = run(1000, &[(0, b"hello world"), (0, b"HELLO")])
            .await
            .unwrap();
        assert_eq!(stored, b"HELLO world");
    }

    #[tokio::test]
    async fn rewrite_of_sent_bytes_fails() {
        let error = run(4, &[(0, b"hello world"), (0, b"H")]).await.unwrap_err();
        assert!(matches!(error, UploadError::Rewrite { .. }), "{error}");
    }

    #[tokio::test]
    async fn gap_fails_at_finish() {
        let error = run(4, &[(0, b"ab"), (5, b"cd")]).await.unwrap_err();
        assert!(matches!(error, UploadError::Gap { offset: 2 }), "{error}");
    }

    #[tokio::test]
    async fn too_large_fails_and_leaves_nothing() {
        let store = Arc::new(InMemory::new());
        let key = ObjectPath::from("f");
        let mut upload = upload_to(&store, &key, 4, 10);
        upload
            .write(0, Bytes::from_static(b"12345678"))
            .await
            .unwrap();
        let error = upload
            .write(8, Bytes::from_static(b"abc"))
            .await
            .unwrap_err();
        assert!(matches!(error, UploadError::TooLarge { limit: 10 }));
        assert!(upload.finish().await.is_err());
        assert!(store.head(&key).await.is_err());
    }

    #[tokio::test]
    async fn a_sha256_mismatch_publishes_nothing() {
        for part_size in [2, 1000] {
            let store = Arc::new(InMemory::new());
            let key = ObjectPath::from("f");
            let mut upload = upload_to(&store, &key, part_size, 100).expect_sha256(&sha(b"other"));
            upload.write(0, Bytes::from_static(b"hello")).await.unwrap();
            let error = upload.finish().await.unwrap_err();
            assert!(matches!(error, UploadError::Mismatch { .. }), "{error}");
            assert!(store.head(&key).await.is_err());
            let mut upload = upload_to(&store, &key, part_size, 100).expect_sha256(&sha(b"hello"));
            upload.write(0, Bytes::from_static(b"hello")).await.unwrap();
            upload.finish().await.unwrap();
            assert!(store.head(&key).await.is_ok());
        }
    }

    /// Writes `data` from `from`, then suspends as a dropped connection would.
    async fn interrupted(
        store: &Arc<InMemory>,
        key: &ObjectPath,
        resume: Option<Resume>,
        from: u64,
        data: &[u8],
    ) -> Resume {
        let mut upload = upload_to(store, key, 4, 100);
        let mut record = resume.clone().unwrap_or_default();
        if let Some(resume) = resume {
            upload = upload.resume(resume).unwrap();
        }
        upload
            .write(from, Bytes::copy_from_slice(data))
            .await
            .unwrap();
        for progress in [upload.take_progress(), upload.suspend().await]
            .into_iter()
            .flatten()
        {
            record.multipart_id = Some(progress.multipart_id);
            record.parts.extend(progress.parts);
        }
        record
    }

    #[tokio::test]
    async fn an_interrupted_upload_resumes_after_its_last_stored_part() {
        let store = Arc::new(InMemory::new());
        let key = ObjectPath::from("acme/big.bin");
        let whole = b"0123456789abcdefghij";
        // 10 bytes sent: two 4-byte parts stored, two bytes lost with the connection.
        let first = interrupted(&store, &key, None, 0, &whole[..10]).await;
        assert_eq!(first.parts.len(), 2);
        assert_eq!(first.parts[1].end, 8);
        assert!(store.head(&key).await.is_err(), "nothing is visible yet");
        // A second interruption: resumed at 8, three more parts stored.
        let second = interrupted(&store, &key, Some(first), 8, &whole[8..19]).await;
        assert_eq!(second.parts.len(), 4);
        let mut upload = upload_to(&store, &key, 4, 100).resume(second).unwrap();
        assert_eq!(upload.len(), 16);
        let error = upload
            .write(0, Bytes::from_static(b"0123"))
            .await
            .unwrap_err();
        assert!(
            matches!(
                error,
                UploadError::ResumeOffset {
                    offset: 0,
                    stored: 16
                }
            ),
            "{error}"
        );
        assert!(
            error.to_string().contains("resume from offset 16"),
            "{error}"
        );
        upload
            .write(16, Bytes::copy_from_slice(&whole[16..]))
            .await
            .unwrap();
        let uploaded = upload.finish().await.unwrap();
        assert_eq!(uploaded.size, 20);
        assert_eq!(uploaded.sha256, sha(whole));
        let stored = store.get(&key).await.unwrap().bytes().await.unwrap();
        assert_eq!(&stored[..], whole);
    }

    #[tokio::test]
    async fn what_is_stored_of_an_interrupted_upload_is_always_less_than_the_file() {
        // 8 bytes, exactly two parts of 4: the last part waits for `finish`, so a client comparing
        // sizes never takes the interrupted upload for a finished one.
        let store = Arc::new(InMemory::new());
        let record = interrupted(&store, &ObjectPath::from("f"), None, 0, b"01234567").await;
        assert_eq!(record.parts.last().map(|part| part.end), Some(4));
    }

    #[tokio::test]
    async fn the_size_limit_counts_the_whole_file_across_resumes() {
        let store = Arc::new(InMemory::new());
        let key = ObjectPath::from("f");
        let record = interrupted(&store, &key, None, 0, b"012345678").await;
        let mut upload = Upload::new(store.clone(), store.clone(), key, 4, 10)
            .resume(record)
            .unwrap();
        let error = upload
            .write(8, Bytes::from_static(b"89ab"))
            .await
            .unwrap_err();
        assert!(
            matches!(error, UploadError::TooLarge { limit: 10 }),
            "{error}"
        );
    }

    #[tokio::test]
    async fn a_resume_record_that_does_not_add_up_is_refused() {
        let store = Arc::new(InMemory::new());
        let key = ObjectPath::from("f");
        let mut record = interrupted(&store, &key, None, 0, b"0123456789").await;
        record.parts.remove(0);
        let refused = upload_to(&store, &key, 4, 100).resume(record);
        assert!(matches!(refused, Err(UploadError::BadRecord(_))));
        let mut bad = interrupted(&store, &key, None, 0, b"012345678").await;
        bad.parts[1].hash_state.truncate(3);
        let refused = upload_to(&store, &key, 4, 100).resume(bad);
        assert!(matches!(refused, Err(UploadError::BadRecord(_))));
    }

    #[test]
    fn hex_is_lowercase() {
        assert_eq!(hex(&[0, 15, 255]), "000fff");
    }
}

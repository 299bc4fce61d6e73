//! A streaming upload: bytes from the client go to the store as they arrive, in parts, with a SHA-256
//! computed on the way and memory bounded by a few parts whatever the file size.
//!
//! Writes normally arrive in order. A bounded reorder window absorbs writes that arrive slightly
//! ahead, and rewrites of bytes not yet sent to the store are applied in place, so the stored object is
//! exactly what the client wrote. A rewrite of bytes already streamed cannot be honoured and fails the
//! upload loudly; nothing is ever silently corrupted or truncated. Small files (below one part) are
//! stored with a single put; larger ones with a multipart upload (S3 multipart, or a staged file plus
//! an atomic rename on local disk). Nothing is visible in the store before [`Upload::finish`] succeeds.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use object_store::path::Path as ObjectPath;
use object_store::{
    Attribute, AttributeValue, Attributes, MultipartUpload, ObjectStore, PutMultipartOptions,
    PutOptions, PutPayload, TagSet,
};
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
}

/// What a finished upload stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Uploaded {
    pub size: u64,
    /// Lowercase hex SHA-256 of the stored bytes.
    pub sha256: String,
}

pub struct Upload {
    store: Arc<dyn ObjectStore>,
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
    multipart: Option<Box<dyn MultipartUpload>>,
    in_flight: VecDeque<JoinHandle<object_store::Result<()>>>,
    failed: Option<String>,
    /// Stored with the object (S3 metadata and tags).
    tags: TagSet,
    attributes: Attributes,
    /// When set, the object is published only if its SHA-256 is this.
    expected_sha256: Option<String>,
}

impl Upload {
    pub(super) fn new(
        store: Arc<dyn ObjectStore>,
        key: ObjectPath,
        part_size: usize,
        max_size: u64,
    ) -> Upload {
        Upload {
            store,
            key,
            part_size,
            max_size,
            buffer: BytesMut::new(),
            sealed: 0,
            ahead: BTreeMap::new(),
            ahead_bytes: 0,
            hasher: Sha256::new(),
            multipart: None,
            in_flight: VecDeque::new(),
            failed: None,
            tags: TagSet::default(),
            attributes: Attributes::new(),
            expected_sha256: None,
        }
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

    /// Accepts `data` at `offset`. After an error the upload is failed for good; call [`Upload::abort`].
    pub async fn write(&mut self, offset: u64, data: Bytes) -> Result<(), UploadError> {
        if let Some(reason) = &self.failed {
            return Err(UploadError::Failed(reason.clone()));
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
        while self.buffer.len() >= self.part_size {
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
        if self.multipart.is_none() {
            let options = PutMultipartOptions {
                tags: self.tags.clone(),
                attributes: self.attributes.clone(),
                ..PutMultipartOptions::default()
            };
            self.multipart = Some(self.store.put_multipart_opts(&self.key, options).await?);
        }
        if let Some(multipart) = self.multipart.as_mut() {
            let upload_part = multipart.put_part(PutPayload::from(part));
            self.in_flight.push_back(tokio::spawn(upload_part));
        }
        while self.in_flight.len() > PARTS_IN_FLIGHT {
            if let Some(oldest) = self.in_flight.pop_front() {
                oldest.await??;
            }
        }
        Ok(())
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
            Err(error) => {
                self.abort().await;
                Err(error)
            }
        }
    }

    async fn complete(&mut self) -> Result<Uploaded, UploadError> {
        let last = std::mem::take(&mut self.buffer).freeze();
        if self.multipart.is_none() {
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
        } else {
            if !last.is_empty() {
                self.send_part(last).await?;
            }
            while let Some(part) = self.in_flight.pop_front() {
                part.await??;
            }
            let uploaded = self.verified()?;
            if let Some(multipart) = self.multipart.as_mut() {
                multipart.complete().await?;
            }
            self.multipart = None;
            Ok(uploaded)
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
            part.abort();
        }
        if let Some(mut multipart) = self.multipart.take()
            && let Err(error) = multipart.abort().await
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

    async fn run(
        part_size: usize,
        writes: &[(u64, &[u8])],
    ) -> Result<(Uploaded, Vec<u8>), UploadError> {
        let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let key = ObjectPath::from("acme/file.bin");
        let mut upload = Upload::new(store.clone(), key.clone(), part_size, 1 << 30);
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
        let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let key = ObjectPath::from("f");
        let mut upload = Upload::new(store.clone(), key.clone(), 4, 10);
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
            let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
            let key = ObjectPath::from("f");
            let mut upload = Upload::new(store.clone(), key.clone(), part_size, 100)
                .expect_sha256(&sha(b"other"));
            upload.write(0, Bytes::from_static(b"hello")).await.unwrap();
            let error = upload.finish().await.unwrap_err();
            assert!(matches!(error, UploadError::Mismatch { .. }), "{error}");
            assert!(store.head(&key).await.is_err());
            let mut upload = Upload::new(store.clone(), key.clone(), part_size, 100)
                .expect_sha256(&sha(b"hello"));
            upload.write(0, Bytes::from_static(b"hello")).await.unwrap();
            upload.finish().await.unwrap();
            assert!(store.head(&key).await.is_ok());
        }
    }

    #[test]
    fn hex_is_lowercase() {
        assert_eq!(hex(&[0, 15, 255]), "000fff");
    }
}

//! Buckets: the landing, quarantine, destination and egress stores, local folders or S3 alike.
//!
//! Owns turning a [`Location`] into an object store (object_store's `LocalFileSystem` with fsync, or
//! `AmazonS3` configured from the standard AWS environment variables with path-style addressing), and
//! the streaming [`Upload`] and [`Download`] that move bytes with bounded memory. It never decides
//! which bucket a file belongs in and never sees SSH.

mod download;
mod location;
mod parts;
mod read;
mod upload;

pub use read::byte_stream;

use std::sync::Arc;

use object_store::ObjectStore;
use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::multipart::MultipartStore;
use object_store::path::{Path as ObjectPath, PathPart};

pub use download::Download;
pub use location::{Location, check_bucket_name};
pub use upload::{Progress, Resume, StoredPart, Upload, UploadError, Uploaded, hex};

/// Whether a file name is a staging name (`…#<digits>`): object_store's own (`name#1`) and ours
/// (`.upload#<19 digits>`). Such files are never a user's file: refused from clients, never listed,
/// never adopted.
pub fn is_staging_name(name: &str) -> bool {
    name.rsplit_once('#')
        .is_some_and(|(_, suffix)| !suffix.is_empty() && suffix.bytes().all(|b| b.is_ascii_digit()))
}

/// S3 parts are at least this big so that 10,000 parts hold files far beyond 5 GiB (160 GiB).
const S3_PART_SIZE: usize = 16 * 1024 * 1024;
/// Local folders have no part-size rules; smaller parts keep memory per upload low.
const LOCAL_PART_SIZE: usize = 4 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("cannot create the folder {path} for {location}: {source}")]
    CreateFolder {
        location: String,
        path: String,
        source: std::io::Error,
    },
    #[error("cannot open {location}: {source}")]
    Open {
        location: String,
        source: object_store::Error,
    },
}

/// An opened bucket (or folder) with its key prefix.
#[derive(Clone)]
pub struct Bucket {
    store: Arc<dyn ObjectStore>,
    /// The same bucket, for multipart uploads driven part by part.
    parts: Arc<dyn MultipartStore>,
    prefix: Vec<String>,
    location: Location,
    part_size: usize,
}

impl std::fmt::Debug for Bucket {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Bucket")
            .field("location", &self.location)
            .field("part_size", &self.part_size)
            .finish_non_exhaustive()
    }
}

impl Bucket {
    /// Opens the store behind `location`. Local folders are created if missing.
    pub fn open(location: &Location) -> Result<Bucket, StorageError> {
        Bucket::open_with_kms(location, None)
    }

    /// Opens the store behind `location`, writing to S3 with SSE-KMS under `kms_key` when given.
    pub fn open_with_kms(
        location: &Location,
        kms_key: Option<&str>,
    ) -> Result<Bucket, StorageError> {
        type Opened = (
            Arc<dyn ObjectStore>,
            Arc<dyn MultipartStore>,
            Vec<String>,
            usize,
        );
        let (store, parts, prefix, part_size): Opened = match location {
            Location::Local { root } => {
                std::fs::create_dir_all(root).map_err(|source| StorageError::CreateFolder {
                    location: location.to_string(),
                    path: root.display().to_string(),
                    source,
                })?;
                let store = Arc::new(
                    LocalFileSystem::new_with_prefix(root)
                        .map_err(|source| StorageError::Open {
                            location: location.to_string(),
                            source,
                        })?
                        .with_fsync(true)
                        .with_automatic_cleanup(true),
                );
                let parts = Arc::new(parts::LocalParts::new(store.clone(), LOCAL_PART_SIZE));
                (store, parts, Vec::new(), LOCAL_PART_SIZE)
            }
            Location::S3 { bucket, prefix } => {
                let mut builder = AmazonS3Builder::from_env().with_bucket_name(bucket);
                let endpoint = std::env::var("AWS_ENDPOINT_URL_S3")
                    .or_else(|_| std::env::var("AWS_ENDPOINT_URL"))
                    .unwrap_or_default();
                if endpoint.starts_with("http://") {
                    builder = builder.with_allow_http(true);
                }
                if let Some(kms_key) = kms_key {
                    builder = builder.with_sse_kms_encryption(kms_key);
                }
                let store = Arc::new(builder.build().map_err(|source| StorageError::Open {
                    location: location.to_string(),
                    source,
                })?);
                (store.clone(), store, prefix.clone(), S3_PART_SIZE)
            }
        };
        Ok(Bucket {
            store,
            parts,
            prefix,
            location: location.clone(),
            part_size,
        })
    }

    pub fn store(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }

    pub fn location(&self) -> &Location {
        &self.location
    }

    /// Whether the bucket answers: a listing of a prefix nothing uses, which fails on a missing
    /// bucket or wrong credentials and costs one small request.
    pub async fn reachable(&self) -> Result<(), object_store::Error> {
        let probe = self.key(&[".ingestion-probe"]);
        self.store
            .list_with_delimiter(Some(&probe))
            .await
            .map(|_| ())
    }

    /// The object key for `parts` below this bucket's prefix. Parts must already be normalised
    /// (no empty, `.` or `..` parts, no `/`): `sftp::paths` guarantees that for peer input.
    pub fn key<S: AsRef<str>>(&self, parts: &[S]) -> ObjectPath {
        self.prefix
            .iter()
            .map(String::as_str)
            .chain(parts.iter().map(AsRef::as_ref))
            .map(|part| PathPart::parse(part).unwrap_or_else(|_| PathPart::from(part)))
            .collect()
    }

    /// Starts a streaming upload to `key` that accepts at most `max_size` bytes.
    pub fn upload(&self, key: ObjectPath, max_size: u64) -> Upload {
        Upload::new(
            self.store.clone(),
            self.parts.clone(),
            key,
            self.part_size,
            max_size,
        )
    }

    /// Carries on an interrupted upload to `key` (see [`Upload::resume`]).
    pub fn resume_upload(
        &self,
        key: ObjectPath,
        max_size: u64,
        resume: Resume,
    ) -> Result<Upload, UploadError> {
        self.upload(key, max_size).resume(resume)
    }

    /// Discards an interrupted multipart upload and the parts it stored.
    pub async fn abort_multipart(&self, key: &ObjectPath, id: &str) -> object_store::Result<()> {
        self.parts.abort_multipart(key, &id.to_string()).await
    }

    /// Like [`Bucket::upload`], storing `metadata` with the object: as S3 user metadata
    /// (`x-amz-meta-*`) and tags. Local folders cannot hold metadata, so there it is not stored.
    pub fn upload_with_metadata(
        &self,
        key: ObjectPath,
        max_size: u64,
        metadata: &[(&str, String)],
    ) -> Upload {
        let upload = self.upload(key, max_size);
        match self.location {
            Location::Local { .. } => upload,
            Location::S3 { .. } => upload.with_metadata(metadata),
        }
    }

    /// Opens `key` for sequential reading with bounded memory.
    pub fn download(&self, key: ObjectPath, size: u64) -> Download {
        Download::new(self.store.clone(), key, size)
    }
}

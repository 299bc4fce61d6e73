//! Buckets: the landing, quarantine, destination and egress stores, local folders or S3 alike.
//!
//! Owns turning a [`Location`] into an object store (object_store's `LocalFileSystem` with fsync, or
//! `AmazonS3` configured from the standard AWS environment variables with path-style addressing), and
//! the streaming [`Upload`] and [`Download`] that move bytes with bounded memory. It never decides
//! which bucket a file belongs in and never sees SSH.

mod download;
mod location;
mod upload;

use std::sync::Arc;

use object_store::ObjectStore;
use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::path::{Path as ObjectPath, PathPart};

pub use download::Download;
pub use location::{Location, check_bucket_name};
pub use upload::{Upload, UploadError, Uploaded, hex};

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
#[derive(Debug, Clone)]
pub struct Bucket {
    store: Arc<dyn ObjectStore>,
    prefix: Vec<String>,
    location: Location,
    part_size: usize,
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
        let (store, prefix, part_size): (Arc<dyn ObjectStore>, Vec<String>, usize) = match location
        {
            Location::Local { root } => {
                std::fs::create_dir_all(root).map_err(|source| StorageError::CreateFolder {
                    location: location.to_string(),
                    path: root.display().to_string(),
                    source,
                })?;
                let store = LocalFileSystem::new_with_prefix(root)
                    .map_err(|source| StorageError::Open {
                        location: location.to_string(),
                        source,
                    })?
                    .with_fsync(true)
                    .with_automatic_cleanup(true);
                (Arc::new(store), Vec::new(), LOCAL_PART_SIZE)
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
                let store = builder.build().map_err(|source| StorageError::Open {
                    location: location.to_string(),
                    source,
                })?;
                (Arc::new(store), prefix.clone(), S3_PART_SIZE)
            }
        };
        Ok(Bucket {
            store,
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
        Upload::new(self.store.clone(), key, self.part_size, max_size)
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

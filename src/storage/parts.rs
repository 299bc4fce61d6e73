//! Multipart uploads on a local folder, through object_store's [`MultipartStore`] interface so that
//! local folders and S3 are driven by the same upload code.
//!
//! object_store's own local multipart upload lives in memory and cannot be picked up again after a
//! dropped connection or a crash; this one can. An upload is a staging file in its destination's
//! folder (so that completing it is a rename), named `.upload#<19 digits>`: object_store's listings
//! hide names whose text after the first `#` is all digits, whatever the destination's name holds,
//! and the SFTP layer refuses such names from clients. Part `i` is written at offset `i × part_size` and synced before it counts as
//! stored, completing truncates the file to the parts' total length (a crash may have left bytes of
//! an unrecorded part behind) and renames it over the destination, and aborting deletes it.

use std::io::ErrorKind;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use object_store::local::LocalFileSystem;
use object_store::multipart::{MultipartStore, PartId};
use object_store::path::Path as ObjectPath;
use object_store::{MultipartId, PutPayload, PutResult};

/// The local half of [`super::Bucket`]'s multipart interface.
#[derive(Debug)]
pub struct LocalParts {
    files: Arc<LocalFileSystem>,
    part_size: usize,
}

impl LocalParts {
    pub fn new(files: Arc<LocalFileSystem>, part_size: usize) -> LocalParts {
        LocalParts { files, part_size }
    }

    /// The staging file of upload `id` to `path`. The id must be the digits this type handed out:
    /// anything else could name another file.
    fn staging(&self, path: &ObjectPath, id: &MultipartId) -> object_store::Result<PathBuf> {
        if id.len() != 19 || !id.bytes().all(|b| b.is_ascii_digit()) {
            return Err(generic(format!(
                "{id:?} is not a local multipart upload id"
            )));
        }
        let destination = self.files.path_to_filesystem(path)?;
        let folder = destination
            .parent()
            .ok_or_else(|| generic(format!("{} has no folder", destination.display())))?;
        Ok(folder.join(format!(".upload#{id}")))
    }
}

fn generic(message: impl Into<String>) -> object_store::Error {
    let message: String = message.into();
    object_store::Error::Generic {
        store: "LocalParts",
        source: message.into(),
    }
}

fn io(error: std::io::Error, what: &str, file: &std::path::Path) -> object_store::Error {
    generic(format!("{what} {}: {error}", file.display()))
}

/// Runs blocking file work off the async threads.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> object_store::Result<T> + Send + 'static,
) -> object_store::Result<T> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|error| generic(format!("a file task failed: {error}")))?
}

/// Syncs the folder holding `file`, so that a created or renamed entry survives a crash.
fn sync_parent(file: &std::path::Path) -> object_store::Result<()> {
    if let Some(parent) = file.parent() {
        std::fs::File::open(parent)
            .and_then(|folder| folder.sync_all())
            .map_err(|error| io(error, "cannot sync the folder of", file))?;
    }
    Ok(())
}

#[async_trait]
impl MultipartStore for LocalParts {
    async fn create_multipart(&self, path: &ObjectPath) -> object_store::Result<MultipartId> {
        // 19 digits, never below 10^18, so never one of object_store's own small staging numbers.
        let id = (rand::random::<u64>() % 9_000_000_000_000_000_000 + 1_000_000_000_000_000_000)
            .to_string();
        let staging = self.staging(path, &id)?;
        blocking(move || {
            if let Some(parent) = staging.parent() {
                std::fs::create_dir_all(parent)
                    .map_err(|error| io(error, "cannot create the folder for", &staging))?;
            }
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&staging)
                .map_err(|error| io(error, "cannot create", &staging))?;
            sync_parent(&staging)
        })
        .await?;
        Ok(id)
    }

    async fn put_part(
        &self,
        path: &ObjectPath,
        id: &MultipartId,
        part_idx: usize,
        data: PutPayload,
    ) -> object_store::Result<PartId> {
        let staging = self.staging(path, id)?;
        let offset = u64::try_from(part_idx.saturating_mul(self.part_size)).unwrap_or(u64::MAX);
        blocking(move || {
            let file = std::fs::OpenOptions::new()
                .write(true)
                .open(&staging)
                .map_err(|error| match error.kind() {
                    ErrorKind::NotFound => object_store::Error::NotFound {
                        path: staging.display().to_string(),
                        source: error.into(),
                    },
                    _ => io(error, "cannot open", &staging),
                })?;
            let mut at = offset;
            for chunk in &data {
                file.write_all_at(chunk, at)
                    .map_err(|error| io(error, "cannot write", &staging))?;
                at += chunk.len() as u64;
            }
            file.sync_data()
                .map_err(|error| io(error, "cannot sync", &staging))?;
            // The length is all `complete_multipart` needs of a part.
            Ok(PartId {
                content_id: data.content_length().to_string(),
            })
        })
        .await
    }

    async fn complete_multipart(
        &self,
        path: &ObjectPath,
        id: &MultipartId,
        parts: Vec<PartId>,
    ) -> object_store::Result<PutResult> {
        let staging = self.staging(path, id)?;
        let destination = self.files.path_to_filesystem(path)?;
        let mut total: u64 = 0;
        for (index, part) in parts.iter().enumerate() {
            let length: u64 = part
                .content_id
                .parse()
                .map_err(|_| generic(format!("part {index} has no length: {part:?}")))?;
            let last = index + 1 == parts.len();
            if !last && length != self.part_size as u64 {
                return Err(generic(format!(
                    "part {index} holds {length} bytes; every part but the last must hold {}",
                    self.part_size
                )));
            }
            total += length;
        }
        blocking(move || {
            let file = std::fs::OpenOptions::new()
                .write(true)
                .open(&staging)
                .map_err(|error| io(error, "cannot open", &staging))?;
            file.set_len(total)
                .and_then(|()| file.sync_all())
                .map_err(|error| io(error, "cannot finish", &staging))?;
            std::fs::rename(&staging, &destination)
                .map_err(|error| io(error, "cannot publish", &destination))?;
            sync_parent(&destination)?;
            Ok(PutResult {
                e_tag: None,
                version: None,
                extensions: Default::default(),
            })
        })
        .await
    }

    async fn abort_multipart(
        &self,
        path: &ObjectPath,
        id: &MultipartId,
    ) -> object_store::Result<()> {
        let staging = self.staging(path, id)?;
        blocking(move || match std::fs::remove_file(&staging) {
            Ok(()) => Ok(()),
            Err(error) if error.kind() == ErrorKind::NotFound => Ok(()),
            Err(error) => Err(io(error, "cannot remove", &staging)),
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::{ObjectStore, ObjectStoreExt};

    fn parts(dir: &std::path::Path) -> (Arc<LocalFileSystem>, LocalParts) {
        let files = Arc::new(LocalFileSystem::new_with_prefix(dir).unwrap());
        (files.clone(), LocalParts::new(files, 4))
    }

    #[tokio::test]
    async fn parts_in_any_order_complete_to_their_total_length() {
        let dir = tempfile::tempdir().unwrap();
        let (files, store) = parts(dir.path());
        let path = ObjectPath::from("acme/in/file.bin");
        let id = store.create_multipart(&path).await.unwrap();
        let second = store
            .put_part(&path, &id, 1, PutPayload::from_static(b"5678"))
            .await
            .unwrap();
        // A part written by a writer that later lost: longer than what is finally recorded.
        store
            .put_part(&path, &id, 2, PutPayload::from_static(b"stale"))
            .await
            .unwrap();
        let first = store
            .put_part(&path, &id, 0, PutPayload::from_static(b"1234"))
            .await
            .unwrap();
        let last = store
            .put_part(&path, &id, 2, PutPayload::from_static(b"9"))
            .await
            .unwrap();
        // Hidden from listings while in progress.
        assert!(
            files
                .list_with_delimiter(None)
                .await
                .unwrap()
                .objects
                .is_empty()
        );
        store
            .complete_multipart(&path, &id, vec![first, second, last])
            .await
            .unwrap();
        let stored = files.get(&path).await.unwrap().bytes().await.unwrap();
        assert_eq!(&stored[..], b"123456789");
        assert_eq!(
            std::fs::read_dir(dir.path().join("acme/in"))
                .unwrap()
                .count(),
            1
        );
    }

    #[tokio::test]
    async fn a_staging_file_stays_hidden_whatever_the_name_holds() {
        let dir = tempfile::tempdir().unwrap();
        let (files, store) = parts(dir.path());
        let path = ObjectPath::from("acme/invoice#12.pdf");
        let id = store.create_multipart(&path).await.unwrap();
        store
            .put_part(&path, &id, 0, PutPayload::from_static(b"1234"))
            .await
            .unwrap();
        let listed = files
            .list_with_delimiter(Some(&ObjectPath::from("acme")))
            .await
            .unwrap();
        assert!(listed.objects.is_empty(), "{listed:?}");
    }

    #[tokio::test]
    async fn abort_removes_the_staging_file_and_ids_cannot_name_other_files() {
        let dir = tempfile::tempdir().unwrap();
        let (_files, store) = parts(dir.path());
        let path = ObjectPath::from("acme/file.bin");
        let id = store.create_multipart(&path).await.unwrap();
        store
            .put_part(&path, &id, 0, PutPayload::from_static(b"12"))
            .await
            .unwrap();
        store.abort_multipart(&path, &id).await.unwrap();
        store.abort_multipart(&path, &id).await.unwrap();
        assert_eq!(
            std::fs::read_dir(dir.path().join("acme")).unwrap().count(),
            0
        );
        for bad in ["1", "../../etc/passwd", "123456789012345678x"] {
            assert!(
                store
                    .abort_multipart(&path, &bad.to_string())
                    .await
                    .is_err()
            );
        }
        let error = store
            .put_part(&path, &id, 0, PutPayload::from_static(b"12"))
            .await
            .unwrap_err();
        assert!(
            matches!(error, object_store::Error::NotFound { .. }),
            "{error}"
        );
    }

    #[tokio::test]
    async fn a_short_part_before_the_last_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (_files, store) = parts(dir.path());
        let path = ObjectPath::from("f");
        let id = store.create_multipart(&path).await.unwrap();
        let short = store
            .put_part(&path, &id, 0, PutPayload::from_static(b"12"))
            .await
            .unwrap();
        let last = store
            .put_part(&path, &id, 1, PutPayload::from_static(b"34"))
            .await
            .unwrap();
        assert!(
            store
                .complete_multipart(&path, &id, vec![short, last])
                .await
                .is_err()
        );
    }
}

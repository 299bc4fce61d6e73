//! A download: serves SFTP reads from one streaming GET, re-opened only when the client jumps.
//!
//! Clients read sequentially with many requests in flight; one ranged GET stream serves them all with
//! memory bounded by the read size plus one chunk of the stream.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use futures::stream::BoxStream;
use object_store::path::Path as ObjectPath;
use object_store::{GetOptions, GetRange, ObjectStore};

pub struct Download {
    store: Arc<dyn ObjectStore>,
    key: ObjectPath,
    size: u64,
    /// The open stream and the offset of its next byte (after `pending`).
    stream: Option<BoxStream<'static, object_store::Result<Bytes>>>,
    /// Bytes taken from the stream but not yet returned, starting at `position`.
    pending: Bytes,
    position: u64,
}

impl Download {
    pub(super) fn new(store: Arc<dyn ObjectStore>, key: ObjectPath, size: u64) -> Download {
        Download {
            store,
            key,
            size,
            stream: None,
            pending: Bytes::new(),
            position: 0,
        }
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// Reads up to `len` bytes at `offset`; an empty result means end of file.
    pub async fn read(&mut self, offset: u64, len: usize) -> object_store::Result<Bytes> {
        if offset >= self.size || len == 0 {
            return Ok(Bytes::new());
        }
        if self.stream.is_none() || offset != self.position {
            let options = GetOptions {
                range: Some(GetRange::Offset(offset)),
                ..GetOptions::default()
            };
            let result = self.store.get_opts(&self.key, options).await?;
            self.stream = Some(super::byte_stream(result));
            self.pending = Bytes::new();
            self.position = offset;
        }
        let want = len.min(usize::try_from(self.size - offset).unwrap_or(usize::MAX));
        let mut out = BytesMut::new();
        while out.len() < want {
            if self.pending.is_empty() {
                let next = match self.stream.as_mut() {
                    Some(stream) => stream.next().await,
                    None => None,
                };
                match next {
                    Some(chunk) => self.pending = chunk?,
                    None => break,
                }
                continue;
            }
            if out.is_empty() && self.pending.len() >= want {
                // The whole answer is in one chunk read from the store: a slice of it, no copy.
                let slice = self.pending.split_to(want);
                self.position += want as u64;
                return Ok(slice);
            }
            let take = (want - out.len()).min(self.pending.len());
            out.reserve(want - out.len());
            out.extend_from_slice(&self.pending.split_to(take));
        }
        self.position += out.len() as u64;
        Ok(out.freeze())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::ObjectStoreExt;
    use object_store::memory::InMemory;

    #[tokio::test]
    async fn sequential_and_jumping_reads() {
        let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let key = ObjectPath::from("out/report.csv");
        store
            .put(&key, Bytes::from_static(b"0123456789").into())
            .await
            .unwrap();
        let mut download = Download::new(store, key, 10);
        assert_eq!(&download.read(0, 4).await.unwrap()[..], b"0123");
        assert_eq!(&download.read(4, 4).await.unwrap()[..], b"4567");
        assert_eq!(&download.read(2, 3).await.unwrap()[..], b"234");
        assert_eq!(&download.read(8, 100).await.unwrap()[..], b"89");
        assert!(download.read(10, 4).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn reads_across_the_chunks_of_a_local_file_return_every_byte_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn ObjectStore> =
            Arc::new(object_store::local::LocalFileSystem::new_with_prefix(dir.path()).unwrap());
        let key = ObjectPath::from("out/big.bin");
        // Longer than two of the 1 MiB chunks local files are read in.
        let content: Vec<u8> = (0..2_500_000u32).map(|i| (i % 251) as u8).collect();
        store
            .put(&key, Bytes::from(content.clone()).into())
            .await
            .unwrap();
        let mut download = Download::new(store, key, content.len() as u64);
        let mut got = Vec::new();
        loop {
            // Not a divisor of 1 MiB: some reads come from one chunk, some span two.
            let data = download.read(got.len() as u64, 300_000).await.unwrap();
            if data.is_empty() {
                break;
            }
            got.extend_from_slice(&data);
        }
        assert!(got == content, "the bytes read differ from the file's");
    }
}

//! The built-in engine, for demos and tests: it finds the EICAR test string anywhere in a file and
//! files whose SHA-256 is on a configured blocklist. **It is not an antivirus**: it knows no real
//! malware, and the startup log says so.

use std::collections::HashSet;

use futures::StreamExt;
use sha2::{Digest, Sha256};

use super::{Bytestream, Engine, ScanError, Verdict};

/// The 68-byte EICAR anti-virus test file.
pub const EICAR: &[u8] = br"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*";
/// The name ClamAV gives the EICAR file.
pub const EICAR_SIGNATURE: &str = "Eicar-Test-Signature";

#[derive(Debug, Clone, Default)]
pub struct Builtin {
    /// Lowercase hex SHA-256 digests of files to treat as infected.
    blocklist: HashSet<String>,
}

impl Builtin {
    pub fn new(blocklist: impl IntoIterator<Item = String>) -> Builtin {
        Builtin {
            blocklist: blocklist
                .into_iter()
                .map(|hash| hash.to_ascii_lowercase())
                .collect(),
        }
    }
}

impl Engine for Builtin {
    fn name(&self) -> &'static str {
        "builtin"
    }

    async fn scan(&self, bytes: &mut Bytestream<'_>) -> Result<Verdict, ScanError> {
        let mut hasher = Sha256::new();
        // The end of the previous chunk, so that a match across two chunks is found.
        let mut carry: Vec<u8> = Vec::with_capacity(2 * EICAR.len());
        let mut found = false;
        while let Some(chunk) = bytes.next().await {
            let chunk = chunk?;
            hasher.update(&chunk);
            if found {
                continue;
            }
            let keep = EICAR.len() - 1;
            let head = chunk.get(..chunk.len().min(keep)).unwrap_or_default();
            let mut window = carry.clone();
            window.extend_from_slice(head);
            found = contains(&window, EICAR) || contains(&chunk, EICAR);
            // Keep the last `keep` bytes of everything seen so far.
            if chunk.len() >= keep {
                carry.clear();
                carry.extend_from_slice(chunk.get(chunk.len() - keep..).unwrap_or_default());
            } else {
                carry.extend_from_slice(&chunk);
                let excess = carry.len().saturating_sub(keep);
                carry.drain(..excess);
            }
        }
        if found {
            return Ok(Verdict::Infected {
                signature: EICAR_SIGNATURE.into(),
            });
        }
        let digest = crate::storage::hex(&hasher.finalize());
        if self.blocklist.contains(&digest) {
            return Ok(Verdict::Infected {
                signature: format!("Blocklist.SHA256.{digest}"),
            });
        }
        Ok(Verdict::Clean)
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    memchr::memmem::find(haystack, needle).is_some()
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    async fn scan(engine: &Builtin, chunks: Vec<&[u8]>) -> Verdict {
        let mut stream = futures::stream::iter(
            chunks
                .into_iter()
                .map(|chunk| Ok(Bytes::copy_from_slice(chunk)))
                .collect::<Vec<_>>(),
        );
        engine.scan(&mut stream).await.unwrap()
    }

    #[tokio::test]
    async fn finds_eicar_anywhere_even_across_chunks() {
        let engine = Builtin::default();
        let mut file = b"header ".to_vec();
        file.extend_from_slice(EICAR);
        file.extend_from_slice(b" trailer");
        for split in [0, 1, 10, 40, 74, file.len()] {
            let (a, b) = file.split_at(split);
            assert_eq!(
                scan(&engine, vec![a, b]).await,
                Verdict::Infected {
                    signature: EICAR_SIGNATURE.into()
                },
                "split at {split}"
            );
        }
        assert_eq!(
            scan(&engine, vec![b"harmless", b" text"]).await,
            Verdict::Clean
        );
        assert_eq!(scan(&engine, vec![&EICAR[..67]]).await, Verdict::Clean);
        let bytewise: Vec<&[u8]> = file.chunks(1).collect();
        assert_eq!(
            scan(&engine, bytewise).await,
            Verdict::Infected {
                signature: EICAR_SIGNATURE.into()
            }
        );
    }

    #[tokio::test]
    async fn blocklisted_hashes_are_infected() {
        let digest = crate::storage::hex(&Sha256::digest(b"bad file"));
        let engine = Builtin::new([digest.to_uppercase()]);
        assert_eq!(
            scan(&engine, vec![b"bad ", b"file"]).await,
            Verdict::Infected {
                signature: format!("Blocklist.SHA256.{digest}")
            }
        );
        assert_eq!(scan(&engine, vec![b"good file"]).await, Verdict::Clean);
    }
}

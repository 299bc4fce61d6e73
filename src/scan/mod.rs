//! Malware scanning: a stream of bytes in, a verdict out — clean, infected (with the signature) or
//! unscannable (with the reason) — or an error, which is never a verdict.
//!
//! Two engines behind one trait: [`clamd`] (production: ClamAV's daemon over INSTREAM) and
//! [`builtin`] (EICAR and a SHA-256 blocklist, for demos and tests; it is not an antivirus).
//! Invariant: an engine that cannot tell returns `Err` or `Unscannable`, never `Clean`.

pub mod builtin;
pub mod clamd;

use std::time::Duration;

use bytes::Bytes;
use futures::Stream;

pub use crate::state::Verdict;
pub use builtin::Builtin;
pub use clamd::{Clamd, ClamdAddress};

/// The bytes to scan, read as they come from storage.
pub type Bytestream<'a> = dyn Stream<Item = Result<Bytes, object_store::Error>> + Send + Unpin + 'a;

/// Why a scan gave no verdict. The file stays where it is and the scan is retried.
#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    #[error("the scanner is unreachable: {0}")]
    Unreachable(String),
    #[error("the scan did not finish within {0:?} (scanner.timeout)")]
    Timeout(Duration),
    #[error("the scanner reported an error: {0}")]
    Engine(String),
    #[error("cannot read the file to scan: {0}")]
    Read(#[from] object_store::Error),
}

/// One scanning engine.
pub trait Engine: Send + Sync {
    /// The engine's name, recorded with every verdict.
    fn name(&self) -> &'static str;
    /// Scans every byte of `bytes`.
    fn scan(
        &self,
        bytes: &mut Bytestream<'_>,
    ) -> impl Future<Output = Result<Verdict, ScanError>> + Send;
}

/// The configured engine.
#[derive(Debug, Clone)]
pub enum Scanner {
    Clamd(Clamd),
    Builtin(Builtin),
}

impl Scanner {
    pub fn name(&self) -> &'static str {
        match self {
            Scanner::Clamd(engine) => engine.name(),
            Scanner::Builtin(engine) => engine.name(),
        }
    }

    /// Whether the engine answers: clamd's `PING`; the builtin engine always does.
    pub async fn ping(&self) -> Result<(), ScanError> {
        match self {
            Scanner::Clamd(engine) => engine.ping().await,
            Scanner::Builtin(_) => Ok(()),
        }
    }

    pub async fn scan(&self, bytes: &mut Bytestream<'_>) -> Result<Verdict, ScanError> {
        match self {
            Scanner::Clamd(engine) => engine.scan(bytes).await,
            Scanner::Builtin(engine) => engine.scan(bytes).await,
        }
    }
}

//! A ClamAV daemon client: the INSTREAM protocol over TCP or a unix socket, with timeouts.
//!
//! `zINSTREAM\0`, then chunks of `<u32 big-endian length><bytes>`, then a zero length; clamd answers
//! `stream: OK`, `stream: <signature> FOUND` or `<message> ERROR`, each ending in NUL. Size limits are
//! verdicts, not errors: `INSTREAM size limit exceeded` and `Heuristics.Limits.Exceeded.*` mean the file
//! could not be scanned whole, so it is unscannable (quarantined), never clean. Any other error or an
//! unreadable reply is an error (the scan is retried). The reply is read while the bytes are still
//! being sent, so an early answer (clamd stops reading past its limit) is not lost to a reset socket.

use std::path::PathBuf;
use std::time::Duration;

use futures::StreamExt;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};

use super::{Bytestream, Engine, ScanError, Verdict};

/// Largest chunk sent in one INSTREAM frame.
const CHUNK: usize = 1 << 20;
/// Longest reply accepted from clamd.
const MAX_REPLY: usize = 4096;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Where clamd listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClamdAddress {
    Tcp(String),
    Unix(PathBuf),
}

/// The socket of Debian's clamav-daemon package.
pub const DEBIAN_SOCKET: &str = "/run/clamav/clamd.ctl";

impl ClamdAddress {
    /// Debian's clamav-daemon socket ([`DEBIAN_SOCKET`]), the default.
    pub fn debian() -> ClamdAddress {
        ClamdAddress::Unix(PathBuf::from(DEBIAN_SOCKET))
    }

    /// Parses `tcp://host:port` or `unix:///path/to/socket`.
    pub fn parse(text: &str) -> Result<ClamdAddress, String> {
        if let Some(address) = text.strip_prefix("tcp://") {
            let valid = address.rsplit_once(':').is_some_and(|(host, port)| {
                !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0)
            });
            if valid {
                return Ok(ClamdAddress::Tcp(address.to_string()));
            }
        } else if let Some(path) = text.strip_prefix("unix://")
            && path.starts_with('/')
        {
            return Ok(ClamdAddress::Unix(PathBuf::from(path)));
        }
        Err(format!(
            "`{text}` is not a clamd address; write tcp://127.0.0.1:3310 or unix:///run/clamav/clamd.ctl"
        ))
    }
}

impl std::fmt::Display for ClamdAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClamdAddress::Tcp(address) => write!(f, "tcp://{address}"),
            ClamdAddress::Unix(path) => write!(f, "unix://{}", path.display()),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Clamd {
    address: ClamdAddress,
    timeout: Duration,
}

trait Connection: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Connection for T {}

impl Clamd {
    pub fn new(address: ClamdAddress, timeout: Duration) -> Clamd {
        Clamd { address, timeout }
    }

    pub fn address(&self) -> &ClamdAddress {
        &self.address
    }

    async fn connect(&self) -> Result<Box<dyn Connection>, ScanError> {
        let unreachable =
            |error: std::io::Error| ScanError::Unreachable(format!("{}: {error}", self.address));
        let connecting = async {
            Ok::<Box<dyn Connection>, std::io::Error>(match &self.address {
                ClamdAddress::Tcp(address) => Box::new(TcpStream::connect(address).await?),
                ClamdAddress::Unix(path) => Box::new(UnixStream::connect(path).await?),
            })
        };
        match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
            Ok(connected) => connected.map_err(unreachable),
            Err(_) => Err(ScanError::Unreachable(format!(
                "{}: no connection within {CONNECT_TIMEOUT:?}",
                self.address
            ))),
        }
    }

    /// Asks clamd whether it is alive (`PING` → `PONG`).
    pub async fn ping(&self) -> Result<(), ScanError> {
        let mut connection = self.connect().await?;
        connection
            .write_all(b"zPING\0")
            .await
            .map_err(|e| ScanError::Unreachable(e.to_string()))?;
        let reply = read_reply(&mut connection).await?;
        if reply == "PONG" {
            Ok(())
        } else {
            Err(ScanError::Engine(format!(
                "unexpected reply to PING: {reply:?}"
            )))
        }
    }

    async fn instream(&self, bytes: &mut Bytestream<'_>) -> Result<Verdict, ScanError> {
        let connection = self.connect().await?;
        let (mut reader, mut writer) = tokio::io::split(connection);
        let reply = read_reply(&mut reader);
        tokio::pin!(reply);
        let sent = send_stream(&mut writer, bytes);
        let reply = tokio::select! {
            early = &mut reply => early?,
            sent = sent => match sent {
                Ok(()) => reply.await?,
                Err(SendError::Read(error)) => return Err(ScanError::Read(error)),
                Err(SendError::Write(error)) => match tokio::time::timeout(Duration::from_secs(2), reply).await {
                    Ok(Ok(reply)) if !reply.is_empty() => reply,
                    _ => return Err(ScanError::Unreachable(format!("{}: {error}", self.address))),
                },
            },
        };
        parse_reply(&reply)
    }
}

impl Engine for Clamd {
    fn name(&self) -> &'static str {
        "clamd"
    }

    async fn scan(&self, bytes: &mut Bytestream<'_>) -> Result<Verdict, ScanError> {
        match tokio::time::timeout(self.timeout, self.instream(bytes)).await {
            Ok(result) => result,
            Err(_) => Err(ScanError::Timeout(self.timeout)),
        }
    }
}

enum SendError {
    Read(object_store::Error),
    Write(std::io::Error),
}

async fn send_stream<W: AsyncWrite + Unpin>(
    writer: &mut W,
    bytes: &mut Bytestream<'_>,
) -> Result<(), SendError> {
    writer
        .write_all(b"zINSTREAM\0")
        .await
        .map_err(SendError::Write)?;
    while let Some(chunk) = bytes.next().await {
        let chunk = chunk.map_err(SendError::Read)?;
        for piece in chunk.chunks(CHUNK) {
            let length = u32::try_from(piece.len()).unwrap_or(u32::MAX);
            writer
                .write_all(&length.to_be_bytes())
                .await
                .map_err(SendError::Write)?;
            writer.write_all(piece).await.map_err(SendError::Write)?;
        }
    }
    writer
        .write_all(&[0, 0, 0, 0])
        .await
        .map_err(SendError::Write)?;
    writer.flush().await.map_err(SendError::Write)
}

/// Reads one NUL-terminated reply (or up to EOF), bounded.
async fn read_reply<R: AsyncRead + Unpin>(reader: &mut R) -> Result<String, ScanError> {
    let mut reply = Vec::new();
    let mut buffer = [0u8; 512];
    loop {
        let read = reader
            .read(&mut buffer)
            .await
            .map_err(|e| ScanError::Unreachable(format!("reading the reply: {e}")))?;
        let Some(data) = buffer.get(..read) else {
            break;
        };
        if data.is_empty() {
            break;
        }
        if let Some(end) = data.iter().position(|&b| b == 0) {
            reply.extend_from_slice(data.get(..end).unwrap_or_default());
            break;
        }
        reply.extend_from_slice(data);
        if reply.len() > MAX_REPLY {
            return Err(ScanError::Engine("clamd's reply is too long".into()));
        }
    }
    Ok(String::from_utf8_lossy(&reply).trim().to_string())
}

/// Turns clamd's reply into a verdict, or an error when it is neither a verdict nor a size limit.
pub fn parse_reply(reply: &str) -> Result<Verdict, ScanError> {
    let reply = reply.trim_end_matches('\0').trim();
    if reply.is_empty() {
        return Err(ScanError::Engine(
            "clamd closed the connection without an answer".into(),
        ));
    }
    if let Some(message) = reply.strip_suffix(" ERROR") {
        if message.contains("size limit exceeded") {
            return Ok(Verdict::Unscannable {
                reason: "the file is larger than clamd's StreamMaxLength".into(),
            });
        }
        return Err(ScanError::Engine(message.to_string()));
    }
    let body = reply.strip_prefix("stream:").map_or(reply, str::trim);
    if body == "OK" {
        return Ok(Verdict::Clean);
    }
    if let Some(signature) = body.strip_suffix(" FOUND") {
        let signature = signature.trim().to_string();
        if signature.starts_with("Heuristics.Limits.Exceeded") {
            return Ok(Verdict::Unscannable { reason: signature });
        }
        return Ok(Verdict::Infected { signature });
    }
    Err(ScanError::Engine(format!(
        "unexpected reply from clamd: {reply:?}"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(reply: &str, expected: Result<Verdict, ()>) {
        let got = parse_reply(reply);
        match expected {
            Ok(verdict) => assert_eq!(got.ok(), Some(verdict), "{reply:?}"),
            Err(()) => assert!(got.is_err(), "{reply:?} should be an error, got {got:?}"),
        }
    }

    #[test]
    fn replies() {
        check("stream: OK\0", Ok(Verdict::Clean));
        check(
            "stream: Eicar-Test-Signature FOUND\0",
            Ok(Verdict::Infected {
                signature: "Eicar-Test-Signature".into(),
            }),
        );
        check(
            "stream: Custom.Test.EICAR-NDB.UNOFFICIAL FOUND",
            Ok(Verdict::Infected {
                signature: "Custom.Test.EICAR-NDB.UNOFFICIAL".into(),
            }),
        );
        check(
            "stream: Heuristics.Limits.Exceeded.MaxFileSize FOUND",
            Ok(Verdict::Unscannable {
                reason: "Heuristics.Limits.Exceeded.MaxFileSize".into(),
            }),
        );
        check(
            "INSTREAM size limit exceeded. ERROR",
            Ok(Verdict::Unscannable {
                reason: "the file is larger than clamd's StreamMaxLength".into(),
            }),
        );
        check("Can't allocate memory ERROR", Err(()));
        check("", Err(()));
        check("PONG", Err(()));
    }

    #[test]
    fn addresses() {
        assert_eq!(
            ClamdAddress::parse("tcp://127.0.0.1:3310"),
            Ok(ClamdAddress::Tcp("127.0.0.1:3310".into()))
        );
        assert_eq!(
            ClamdAddress::parse("unix:///run/clamav/clamd.ctl"),
            Ok(ClamdAddress::Unix("/run/clamav/clamd.ctl".into()))
        );
        for bad in [
            "127.0.0.1:3310",
            "tcp://host",
            "tcp://:3310",
            "unix://relative",
            "http://x",
        ] {
            assert!(ClamdAddress::parse(bad).is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn an_unreachable_clamd_is_an_error_not_a_verdict() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let clamd = Clamd::new(
            ClamdAddress::Tcp(format!("127.0.0.1:{port}")),
            Duration::from_secs(5),
        );
        let mut bytes = futures::stream::iter(vec![Ok(bytes::Bytes::from_static(b"data"))]);
        let result = clamd.scan(&mut bytes).await;
        assert!(
            matches!(result, Err(ScanError::Unreachable(_))),
            "{result:?}"
        );
    }
}

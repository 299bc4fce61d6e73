//! The PROXY protocol (HAProxy's, versions 1 and 2) in front of SSH: a TCP load balancer opens the
//! connection and first sends the client's real address, so that allow-lists, bans and the audit
//! log see the supplier, not the balancer.
//!
//! Only connections from `[server] proxy_protocol_from` networks are read this way, and they must
//! start with a header; connections from anywhere else are direct (a client cannot claim an
//! address). The header is read exactly, byte for byte, so that SSH then starts on an untouched
//! stream; it is parsed by the `ppp` crate.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};

/// Version 2 headers start with these 12 bytes; version 1 headers with `PROXY `.
const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
/// The longest version 1 header, CRLF included (the specification's bound).
const V1_MAX: usize = 107;
/// The largest version 2 address block and extensions accepted (addresses are at most 216 bytes).
const V2_MAX_BODY: usize = 1024;
/// How long the balancer may take to send the header.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProxyError {
    #[error("the connection closed before a PROXY protocol header")]
    Closed,
    #[error("no PROXY protocol header within {}s", HEADER_TIMEOUT.as_secs())]
    Timeout,
    #[error("the connection did not start with a PROXY protocol header")]
    Missing,
    #[error("the PROXY protocol header is not valid: {0}")]
    Invalid(String),
}

/// Reads the header from `stream`: the client's address, or `None` when the balancer speaks for
/// itself (v2 `LOCAL`, v1 `UNKNOWN`: a health check).
pub async fn read_header<S: AsyncRead + Unpin>(
    stream: &mut S,
) -> Result<Option<SocketAddr>, ProxyError> {
    match tokio::time::timeout(HEADER_TIMEOUT, read_exact_header(stream)).await {
        Ok(result) => result.and_then(|header| parse(&header)),
        Err(_) => Err(ProxyError::Timeout),
    }
}

async fn read_exact_header<S: AsyncRead + Unpin>(stream: &mut S) -> Result<Vec<u8>, ProxyError> {
    let mut header = vec![0; 6];
    read(stream, &mut header).await?;
    if header == b"PROXY " {
        // Version 1: text up to CRLF.
        while !header.ends_with(b"\r\n") {
            if header.len() >= V1_MAX {
                return Err(ProxyError::Invalid(format!(
                    "a version 1 header longer than {V1_MAX} bytes"
                )));
            }
            let mut byte = [0; 1];
            read(stream, &mut byte).await?;
            header.push(byte[0]);
        }
        return Ok(header);
    }
    if !V2_SIGNATURE.starts_with(&header) {
        return Err(ProxyError::Missing);
    }
    // Version 2: the signature, version/command, family, a 16-bit length, then that many bytes.
    header.resize(16, 0);
    read(stream, &mut header[6..]).await?;
    if header[..12] != V2_SIGNATURE[..] {
        return Err(ProxyError::Missing);
    }
    let length = usize::from(u16::from_be_bytes([header[14], header[15]]));
    if length > V2_MAX_BODY {
        return Err(ProxyError::Invalid(format!(
            "a version 2 header announcing {length} bytes"
        )));
    }
    header.resize(16 + length, 0);
    read(stream, &mut header[16..]).await?;
    Ok(header)
}

async fn read<S: AsyncRead + Unpin>(stream: &mut S, buffer: &mut [u8]) -> Result<(), ProxyError> {
    match stream.read_exact(buffer).await {
        Ok(_) => Ok(()),
        Err(error) if error.kind() == std::io::ErrorKind::UnexpectedEof => Err(ProxyError::Closed),
        Err(error) => Err(ProxyError::Invalid(error.to_string())),
    }
}

/// The client's address in a whole header.
fn parse(header: &[u8]) -> Result<Option<SocketAddr>, ProxyError> {
    match ppp::HeaderResult::parse(header) {
        ppp::HeaderResult::V1(Ok(header)) => Ok(match header.addresses {
            ppp::v1::Addresses::Tcp4(ip) => Some(SocketAddr::new(
                IpAddr::V4(ip.source_address),
                ip.source_port,
            )),
            ppp::v1::Addresses::Tcp6(ip) => Some(SocketAddr::new(
                IpAddr::V6(ip.source_address),
                ip.source_port,
            )),
            ppp::v1::Addresses::Unknown => None,
        }),
        ppp::HeaderResult::V2(Ok(header)) => {
            match (header.command, header.addresses) {
                (ppp::v2::Command::Local, _) => Ok(None),
                (ppp::v2::Command::Proxy, ppp::v2::Addresses::IPv4(ip)) => Ok(Some(
                    SocketAddr::new(IpAddr::V4(ip.source_address), ip.source_port),
                )),
                (ppp::v2::Command::Proxy, ppp::v2::Addresses::IPv6(ip)) => Ok(Some(
                    SocketAddr::new(IpAddr::V6(ip.source_address), ip.source_port),
                )),
                (ppp::v2::Command::Proxy, other) => Err(ProxyError::Invalid(format!(
                    "a proxied connection must carry an IP address, not {:?}",
                    other.address_family()
                ))),
            }
        }
        ppp::HeaderResult::V1(Err(error)) => Err(ProxyError::Invalid(error.to_string())),
        ppp::HeaderResult::V2(Err(error)) => Err(ProxyError::Invalid(error.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn header_then(bytes: &[u8]) -> (Result<Option<SocketAddr>, ProxyError>, Vec<u8>) {
        let mut stream = bytes;
        let result = read_header(&mut stream).await;
        (result, stream.to_vec())
    }

    fn v2(command: u8, family: u8, body: &[u8]) -> Vec<u8> {
        let mut header = V2_SIGNATURE.to_vec();
        header.extend([command, family]);
        header.extend(u16::try_from(body.len()).unwrap().to_be_bytes());
        header.extend(body);
        header
    }

    #[tokio::test]
    async fn version_1_gives_the_client_address_and_leaves_ssh_untouched() {
        let (address, rest) =
            header_then(b"PROXY TCP4 203.0.113.7 10.0.0.5 51234 22\r\nSSH-2.0-OpenSSH_9.2\r\n")
                .await;
        assert_eq!(address, Ok(Some("203.0.113.7:51234".parse().unwrap())));
        assert_eq!(rest, b"SSH-2.0-OpenSSH_9.2\r\n");
        let (address, _) = header_then(b"PROXY TCP6 2001:db8::7 2001:db8::1 4000 22\r\n").await;
        assert_eq!(address, Ok(Some("[2001:db8::7]:4000".parse().unwrap())));
        assert_eq!(header_then(b"PROXY UNKNOWN\r\n").await.0, Ok(None));
    }

    #[tokio::test]
    async fn version_2_gives_the_client_address_and_local_means_the_balancer_itself() {
        let mut body = vec![203, 0, 113, 9, 10, 0, 0, 5];
        body.extend(40000u16.to_be_bytes());
        body.extend(22u16.to_be_bytes());
        let mut bytes = v2(0x21, 0x11, &body);
        bytes.extend(b"SSH-2.0-x\r\n");
        let (address, rest) = header_then(&bytes).await;
        assert_eq!(address, Ok(Some("203.0.113.9:40000".parse().unwrap())));
        assert_eq!(rest, b"SSH-2.0-x\r\n");
        assert_eq!(header_then(&v2(0x20, 0x00, &[])).await.0, Ok(None));
    }

    #[tokio::test]
    async fn anything_else_is_refused() {
        for bad in [
            &b"SSH-2.0-OpenSSH_9.2\r\n"[..],
            b"PROXY TCP4 not-an-address 10.0.0.5 1 22\r\n",
            b"PROXY TCP4 203.0.113.7 10.0.0.5 51234 22 and much more text that never ends with a line break at all, ever",
            b"PROXY TCP4",
            b"",
        ] {
            let (result, _) = header_then(bad).await;
            assert!(result.is_err(), "{:?} gave {result:?}", String::from_utf8_lossy(bad));
        }
        assert_eq!(header_then(b"").await.0, Err(ProxyError::Closed));
        let oversized = v2(0x21, 0x11, &vec![0; 2000]);
        assert!(matches!(
            header_then(&oversized).await.0,
            Err(ProxyError::Invalid(_))
        ));
        let unix = v2(0x21, 0x31, &[0; 216]);
        assert!(matches!(
            header_then(&unix).await.0,
            Err(ProxyError::Invalid(_))
        ));
    }
}

//! The admin plane's listener: at most [`MAX_CONNECTIONS`] connections at once, each closed after
//! [`IDLE`] without a byte moving either way.
//!
//! `axum::serve` has neither limit. Without them, anyone who can reach the port could hold
//! connections open (never sending a request, or never reading the answer) until the process runs
//! out of file descriptors, and the SFTP front door, in the same process, could no longer accept
//! suppliers. When every place is taken, the next connection waits in the kernel's backlog until
//! one frees up; the idle limit guarantees that one does.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::connect_info::Connected;
use axum::serve::{IncomingStream, Listener};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};

/// Connections served at once (health checks, scrapes, API calls and dashboard pages are short).
pub const MAX_CONNECTIONS: usize = 64;

/// A connection on which nothing was read or written for this long is closed. Longer than any
/// answer takes (readiness checks take at most 3 s) and than scrapers keep idle connections.
pub const IDLE: Duration = Duration::from_secs(60);

/// A TCP listener that admits at most `limit` connections at once.
pub struct CappedListener {
    inner: TcpListener,
    places: Arc<Semaphore>,
    idle: Duration,
}

impl CappedListener {
    pub fn new(inner: TcpListener, limit: usize, idle: Duration) -> CappedListener {
        CappedListener {
            inner,
            places: Arc::new(Semaphore::new(limit)),
            idle,
        }
    }
}

impl Listener for CappedListener {
    type Io = CappedStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (CappedStream, SocketAddr) {
        // The semaphore is never closed, so this waits until a place is free.
        let place = match self.places.clone().acquire_owned().await {
            Ok(place) => place,
            Err(_) => std::future::pending().await,
        };
        let (stream, peer) = Listener::accept(&mut self.inner).await;
        let stream = CappedStream {
            stream,
            idle: self.idle,
            deadline: Box::pin(tokio::time::sleep(self.idle)),
            _place: place,
        };
        (stream, peer)
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

/// An admitted connection: holds its place until dropped, and fails once idle too long.
pub struct CappedStream {
    stream: TcpStream,
    idle: Duration,
    deadline: Pin<Box<Sleep>>,
    _place: OwnedSemaphorePermit,
}

impl CappedStream {
    /// After an operation that did not complete: an error once the connection has been idle for
    /// too long, so that hyper closes it.
    fn pending_or_idle<T>(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<T>> {
        match self.deadline.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the admin connection was idle for too long",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }

    /// After an operation that moved bytes: the idle time starts again.
    fn moved<T>(&mut self, result: std::io::Result<T>) -> Poll<std::io::Result<T>> {
        self.deadline.as_mut().reset(Instant::now() + self.idle);
        Poll::Ready(result)
    }
}

impl AsyncRead for CappedStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        match Pin::new(&mut this.stream).poll_read(cx, buf) {
            Poll::Ready(result) => this.moved(result),
            Poll::Pending => this.pending_or_idle(cx),
        }
    }
}

impl AsyncWrite for CappedStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        match Pin::new(&mut this.stream).poll_write(cx, buf) {
            Poll::Ready(result) => this.moved(result),
            Poll::Pending => this.pending_or_idle(cx),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

/// The client's address, for handlers (`ConnectInfo<Peer>`) behind a [`CappedListener`].
#[derive(Debug, Clone, Copy)]
pub struct PeerAddress(pub SocketAddr);

impl Connected<IncomingStream<'_, CappedListener>> for PeerAddress {
    fn connect_info(stream: IncomingStream<'_, CappedListener>) -> PeerAddress {
        PeerAddress(*stream.remote_addr())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    /// Serves a one-route app on a listener capped at two connections and 300 ms of idleness.
    async fn capped_server() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let app = axum::Router::new().route(
            "/",
            axum::routing::get(|peer: axum::extract::ConnectInfo<PeerAddress>| async move {
                format!("hello {}", peer.0.0.ip())
            }),
        );
        let capped = CappedListener::new(listener, 2, Duration::from_millis(300));
        tokio::spawn(async move {
            axum::serve(
                capped,
                app.into_make_service_with_connect_info::<PeerAddress>(),
            )
            .await
        });
        address
    }

    fn get(address: SocketAddr) -> String {
        let mut stream = std::net::TcpStream::connect(address).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        stream
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).unwrap();
        answer
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn silent_connections_take_a_place_only_until_they_are_idle_too_long() {
        let address = capped_server().await;
        let started = std::time::Instant::now();
        let (silent, answer) = tokio::task::spawn_blocking(move || {
            // Two connections that never send a byte take both places.
            let mut silent: Vec<std::net::TcpStream> = (0..2)
                .map(|_| std::net::TcpStream::connect(address).unwrap())
                .collect();
            // A third is served once the idle limit has closed one of them.
            let answer = get(address);
            let closed: Vec<usize> = silent
                .iter_mut()
                .map(|stream| {
                    stream
                        .set_read_timeout(Some(Duration::from_secs(10)))
                        .unwrap();
                    match stream.read(&mut [0u8; 16]) {
                        Ok(read) => read,
                        Err(error) if error.kind() == std::io::ErrorKind::ConnectionReset => 0,
                        // Still open after 10 s: not closed by the idle limit.
                        Err(_) => usize::MAX,
                    }
                })
                .collect();
            (closed, answer)
        })
        .await
        .unwrap();
        assert!(answer.ends_with("hello 127.0.0.1"), "{answer}");
        assert_eq!(silent, [0, 0], "both silent connections were closed");
        assert!(
            started.elapsed() >= Duration::from_millis(300),
            "served before a place was free"
        );
    }
}

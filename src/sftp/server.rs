//! SSH: the listener, the algorithm policy, authentication, and handing the `sftp` subsystem to the
//! protocol loop.
//!
//! Authentication is public key only; a key is accepted only for its user and only from that user's
//! allowed networks (deny by default); SHA-1 RSA signatures are refused. Every decision is audited.
//! Rejections take a constant time (russh's `auth_rejection_time`).

use std::borrow::Cow;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use russh::keys::{Algorithm, EcdsaCurve, HashAlg, PrivateKey, PublicKey};
use russh::server::{Auth, Handler, Msg, PublicKeyOffer, Session, VerifiedPublicKey};
use russh::{Channel, ChannelId, MethodKind, MethodSet, Preferred, cipher, compression, kex, mac};
use tokio::net::{TcpListener, TcpStream};

use super::fs::UserView;
use super::guard::{Guard, Ticket};
use super::session::{self, SessionContext};
use crate::audit::{Audit, Event, Subject};
use crate::config::{SharedUsers, User, Users};
use crate::state::State;
use crate::storage::Bucket;

/// Key exchanges: post-quantum hybrid first, then classical curve25519 for libssh2 (curl) and
/// rclone, which have nothing newer; the strict-kex markers (Terrapin) and ext-info.
const KEX: &[kex::Name] = &[
    kex::MLKEM768X25519_SHA256,
    kex::CURVE25519,
    kex::CURVE25519_PRE_RFC_8731,
    kex::EXTENSION_SUPPORT_AS_SERVER,
    kex::EXTENSION_OPENSSH_STRICT_KEX_AS_SERVER,
];
/// AEAD ciphers first; CTR (with ETM MACs preferred) for older clients. No CBC.
const CIPHERS: &[cipher::Name] = &[
    cipher::CHACHA20_POLY1305,
    cipher::AES_256_GCM,
    cipher::AES_128_GCM,
    cipher::AES_256_CTR,
    cipher::AES_192_CTR,
    cipher::AES_128_CTR,
];
/// `algorithms = "post-quantum-only"`: no classical key exchange (OpenSSH 9.9 and later only).
const KEX_POST_QUANTUM_ONLY: &[kex::Name] = &[
    kex::MLKEM768X25519_SHA256,
    kex::EXTENSION_SUPPORT_AS_SERVER,
    kex::EXTENSION_OPENSSH_STRICT_KEX_AS_SERVER,
];
/// `algorithms = "post-quantum-only"`: encrypt-then-MAC only.
const MACS_ETM_ONLY: &[mac::Name] = &[mac::HMAC_SHA512_ETM, mac::HMAC_SHA256_ETM];
/// SHA-2 MACs only; non-ETM variants last, for libssh2 1.10 (curl on Debian 12).
const MACS: &[mac::Name] = &[
    mac::HMAC_SHA512_ETM,
    mac::HMAC_SHA256_ETM,
    mac::HMAC_SHA512,
    mac::HMAC_SHA256,
];
/// Client key signature algorithms: no `ssh-rsa` (SHA-1).
const KEY_ALGORITHMS: &[Algorithm] = &[
    Algorithm::Ed25519,
    Algorithm::Ecdsa {
        curve: EcdsaCurve::NistP256,
    },
    Algorithm::Ecdsa {
        curve: EcdsaCurve::NistP384,
    },
    Algorithm::Ecdsa {
        curve: EcdsaCurve::NistP521,
    },
    Algorithm::Rsa {
        hash: Some(HashAlg::Sha512),
    },
    Algorithm::Rsa {
        hash: Some(HashAlg::Sha256),
    },
];

/// The russh server configuration: our host key, our algorithm policy, public keys only.
pub fn ssh_config(
    host_key: PrivateKey,
    algorithms: crate::config::Algorithms,
) -> russh::server::Config {
    let (kex, macs) = match algorithms {
        crate::config::Algorithms::Compatible => (KEX, MACS),
        crate::config::Algorithms::PostQuantumOnly => (KEX_POST_QUANTUM_ONLY, MACS_ETM_ONLY),
    };
    russh::server::Config {
        server_id: russh::SshId::Standard(Cow::Borrowed("SSH-2.0-ingestion")),
        methods: MethodSet::from(&[MethodKind::PublicKey][..]),
        auth_rejection_time: Duration::from_millis(500),
        auth_rejection_time_initial: Some(Duration::ZERO),
        keys: vec![host_key],
        window_size: 16 * 1024 * 1024,
        maximum_packet_size: 65535,
        channel_buffer_size: 256,
        max_auth_attempts: 6,
        inactivity_timeout: Some(Duration::from_secs(600)),
        keepalive_interval: Some(Duration::from_secs(60)),
        nodelay: true,
        preferred: Preferred {
            kex: Cow::Borrowed(kex),
            key: Cow::Borrowed(KEY_ALGORITHMS),
            host_key_certificates: Cow::Borrowed(&[]),
            cipher: Cow::Borrowed(CIPHERS),
            mac: Cow::Borrowed(macs),
            compression: Cow::Borrowed(&[compression::NONE]),
        },
        ..Default::default()
    }
}

/// What every connection shares.
pub struct FrontDoor {
    guard: Arc<Guard>,
    /// KiB of write data queued across every session, so that memory stays bounded however many
    /// clients push at once.
    write_budget: Arc<tokio::sync::Semaphore>,
    users: Arc<SharedUsers>,
    temporary_names: Arc<crate::config::TemporaryNames>,
    operators: Arc<Vec<crate::config::NotifyTarget>>,
    landed: Arc<tokio::sync::Notify>,
    landing: Bucket,
    state: State,
    audit: Arc<Audit>,
    max_file_size: u64,
    receipts: crate::config::Receipts,
    ssh: Arc<russh::server::Config>,
    /// Every open connection, so that a shutdown can wait for them.
    connections: tokio_util::task::TaskTracker,
    /// Load balancers whose connections start with a PROXY protocol header.
    proxy_from: Vec<ipnet::IpNet>,
    /// Cancelled when the drain time is over: SFTP sessions still open end, keeping their uploads.
    stopping: tokio_util::sync::CancellationToken,
}

impl FrontDoor {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        guard: Arc<Guard>,
        users: Arc<SharedUsers>,
        temporary_names: crate::config::TemporaryNames,
        operators: Vec<crate::config::NotifyTarget>,
        landed: Arc<tokio::sync::Notify>,
        landing: Bucket,
        state: State,
        audit: Arc<Audit>,
        max_file_size: u64,
        receipts: crate::config::Receipts,
        ssh: russh::server::Config,
        proxy_from: Vec<ipnet::IpNet>,
    ) -> FrontDoor {
        FrontDoor {
            guard,
            write_budget: Arc::new(tokio::sync::Semaphore::new(WRITE_BUDGET_KIB)),
            users,
            temporary_names: Arc::new(temporary_names),
            operators: Arc::new(operators),
            landed,
            landing,
            state,
            audit,
            max_file_size,
            receipts,
            ssh: Arc::new(ssh),
            connections: tokio_util::task::TaskTracker::new(),
            proxy_from,
            stopping: tokio_util::sync::CancellationToken::new(),
        }
    }

    fn users(&self) -> Arc<Users> {
        self.users.current()
    }

    /// Accepts connections until `stop` completes; the listener is closed when this returns.
    pub async fn run(self: Arc<Self>, listener: TcpListener, stop: impl Future<Output = ()>) {
        tokio::pin!(stop);
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                () = &mut stop => return,
            };
            let (socket, peer) = match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors and the like: wait, do not spin or die.
                    tracing::warn!(%error, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            self.connections.spawn(self.clone().admit(socket, peer));
        }
    }

    /// Finds who is connecting (the PROXY protocol header, when `peer` is a trusted balancer),
    /// then admits the connection past the pre-authentication limits, or refuses it.
    async fn admit(self: Arc<Self>, mut socket: TcpStream, peer: SocketAddr) {
        let balancer = crate::config::canonical_ip(peer.ip());
        let peer = if self.proxy_from.iter().any(|net| net.contains(&balancer)) {
            match super::proxy::read_header(&mut socket).await {
                Ok(Some(client)) => client,
                // The balancer speaking for itself (a health check with `LOCAL`, or `UNKNOWN`): served
                // as a direct connection from the balancer, as the PROXY protocol asks.
                Ok(None) => peer,
                // A TCP health check: nothing to serve, nothing to count.
                Err(super::proxy::ProxyError::Closed) => return,
                Err(error) => {
                    let subject = Subject {
                        ip: Some(balancer.to_string()),
                        ..Subject::default()
                    };
                    self.audit.record(
                        &subject,
                        Event::ConnectionRefused {
                            reason: error.to_string(),
                        },
                    );
                    return;
                }
            }
        } else {
            peer
        };
        let ip = crate::config::canonical_ip(peer.ip());
        match self.guard.admit(ip, std::time::Instant::now()) {
            Ok(ticket) => self.connection(socket, peer, ticket).await,
            Err(refusal) => {
                drop(socket);
                let subject = Subject {
                    ip: Some(ip.to_string()),
                    ..Subject::default()
                };
                self.audit.record(
                    &subject,
                    Event::ConnectionRefused {
                        reason: refusal.to_string(),
                    },
                );
            }
        }
    }

    /// Waits up to `drain` for the open connections (and their uploads) to end, once [`FrontDoor::run`]
    /// has returned. Then the SFTP sessions still open are ended: an upload under way is kept as an
    /// interrupted upload, to be resumed on any node. Returns how many connections and sessions were
    /// still open when the drain time ran out.
    pub async fn drain(&self, drain: Duration) -> usize {
        self.connections.close();
        if tokio::time::timeout(drain, self.connections.wait())
            .await
            .is_ok()
        {
            return 0;
        }
        let open = self.connections.len();
        self.stopping.cancel();
        if tokio::time::timeout(CUT_GRACE, self.connections.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                left = self.connections.len(),
                "connections still open after their sessions were ended; exiting anyway"
            );
        }
        open
    }

    async fn connection(self: Arc<Self>, socket: TcpStream, peer: SocketAddr, ticket: Ticket) {
        let subject = Subject {
            session: Some(session_id()),
            ip: Some(crate::config::canonical_ip(peer.ip()).to_string()),
            user: None,
        };
        self.audit
            .record(&subject, Event::Connect { port: peer.port() });
        let subject = Arc::new(Mutex::new(subject));
        let logged_in = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let ticket_spoke = ticket.spoke();
        let handler = Connection {
            door: self.clone(),
            peer,
            subject: subject.clone(),
            user: None,
            channels: HashMap::new(),
            ticket,
            logged_in: logged_in.clone(),
            sftp_sessions: Arc::new(std::sync::atomic::AtomicUsize::new(0)),
        };
        let timeout = self.guard.limits().auth_timeout;
        let started = std::time::Instant::now();
        let socket = AuthDeadline::new(socket, logged_in.clone(), timeout, ticket_spoke);
        let result = match russh::server::run_stream(self.ssh.clone(), socket, handler).await {
            Ok(running) => running.await,
            Err(error) => Err(error),
        };
        if !logged_in.load(std::sync::atomic::Ordering::SeqCst) && started.elapsed() >= timeout {
            let subject = subject.lock().map(|s| s.clone()).unwrap_or_default();
            self.audit.record(
                &subject,
                Event::AuthTimeout {
                    seconds: timeout.as_secs(),
                },
            );
        }
        let subject = subject.lock().map(|s| s.clone()).unwrap_or_default();
        self.audit.record(
            &subject,
            Event::Disconnect {
                error: result.err().map(|error| error.to_string()),
            },
        );
    }
}

/// After the drain time, how long ended sessions get to keep their uploads and close.
const CUT_GRACE: Duration = Duration::from_secs(10);

/// A socket that stops reading once `deadline` passes unless the connection has logged in, so a
/// peer that never finishes (or never starts) authenticating is dropped, whatever stage it stalls in.
struct AuthDeadline<S> {
    inner: S,
    logged_in: Arc<std::sync::atomic::AtomicBool>,
    deadline: std::pin::Pin<Box<tokio::time::Sleep>>,
    /// Set once the peer has sent a byte (see `guard::Ticket`).
    spoke: Arc<std::sync::atomic::AtomicBool>,
}

impl<S> AuthDeadline<S> {
    fn new(
        inner: S,
        logged_in: Arc<std::sync::atomic::AtomicBool>,
        timeout: Duration,
        spoke: Arc<std::sync::atomic::AtomicBool>,
    ) -> AuthDeadline<S> {
        AuthDeadline {
            inner,
            logged_in,
            deadline: Box::pin(tokio::time::sleep(timeout)),
            spoke,
        }
    }
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for AuthDeadline<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if !self.logged_in.load(std::sync::atomic::Ordering::SeqCst)
            && self.deadline.as_mut().poll(cx).is_ready()
        {
            return std::task::Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "authentication timed out",
            )));
        }
        let before = buf.filled().len();
        let read = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.spoke.store(true, std::sync::atomic::Ordering::SeqCst);
        }
        read
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for AuthDeadline<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

fn session_of(subject: &Mutex<Subject>) -> String {
    subject
        .lock()
        .ok()
        .and_then(|subject| subject.session.clone())
        .unwrap_or_default()
}

fn session_id() -> String {
    let bytes: [u8; 8] = rand::random();
    crate::storage::hex(&bytes)
}

/// One SSH connection.
struct Connection {
    door: Arc<FrontDoor>,
    peer: SocketAddr,
    subject: Arc<Mutex<Subject>>,
    user: Option<Arc<User>>,
    channels: HashMap<ChannelId, Channel<Msg>>,
    /// This connection's place among unauthenticated ones; dropping it un-logged-in is a failure.
    ticket: Ticket,
    logged_in: Arc<std::sync::atomic::AtomicBool>,
    /// SFTP subsystems running on this connection (each counts against MAX_CHANNELS until it ends).
    sftp_sessions: Arc<std::sync::atomic::AtomicUsize>,
}

/// Write data (KiB) that may wait in queues across all sessions: 512 MiB.
const WRITE_BUDGET_KIB: usize = 512 * 1024;

/// Session channels one connection may open (OpenSSH's sftp uses one).
const MAX_CHANNELS: usize = 4;

/// Why a key was refused, for the audit log.
enum Refusal {
    Ip(String),
    Auth(String),
}

impl Connection {
    fn subject(&self, user: Option<&str>) -> Subject {
        let mut subject = self.subject.lock().map(|s| s.clone()).unwrap_or_default();
        if let Some(user) = user {
            subject.user = Some(user.to_string());
        }
        subject
    }

    /// Decides whether `key` may log in as `username` from this connection's address.
    fn check(
        &self,
        username: &str,
        key: &PublicKey,
        algorithm: &Algorithm,
    ) -> Result<Arc<User>, Refusal> {
        if matches!(algorithm, Algorithm::Rsa { hash: None }) {
            return Err(Refusal::Auth(
                "ssh-rsa (SHA-1) signatures are refused; use rsa-sha2-256/512 or an Ed25519 key"
                    .into(),
            ));
        }
        let Some(user) = self.door.users().get(username) else {
            return Err(Refusal::Auth("unknown user".into()));
        };
        if !user.ip_allowed(self.peer.ip()) {
            return Err(Refusal::Ip(if user.allowed_ips.is_empty() {
                "the user has no allowed_ips, so every address is refused".into()
            } else {
                "the address is not in the user's allowed_ips".into()
            }));
        }
        if !user.has_key(key) {
            return Err(Refusal::Auth(
                "the key is not one of the user's ssh_keys".into(),
            ));
        }
        Ok(user)
    }

    fn audit_refusal(&self, username: &str, key: &PublicKey, refusal: Refusal) {
        let subject = self.subject(Some(username));
        let event = match refusal {
            Refusal::Ip(reason) => Event::IpRefused { reason },
            Refusal::Auth(reason) => Event::AuthRefused {
                method: "publickey".into(),
                reason,
                key_fingerprint: Some(key.fingerprint(HashAlg::Sha256).to_string()),
            },
        };
        self.door.audit.record(&subject, event);
    }

    fn refuse_method(&self, username: &str, method: &str) {
        self.door.audit.record(
            &self.subject(Some(username)),
            Event::AuthRefused {
                method: method.into(),
                reason: format!("{method} authentication is disabled; use an SSH key"),
                key_fingerprint: None,
            },
        );
    }
}

impl Handler for Connection {
    type Error = russh::Error;

    async fn auth_password(&mut self, user: &str, _password: &str) -> Result<Auth, Self::Error> {
        self.refuse_method(user, "password");
        Ok(Auth::reject())
    }

    async fn auth_keyboard_interactive<'a>(
        &'a mut self,
        user: &str,
        _submethods: &str,
        _response: Option<russh::server::Response<'a>>,
    ) -> Result<Auth, Self::Error> {
        self.refuse_method(user, "keyboard-interactive");
        Ok(Auth::reject())
    }

    async fn auth_publickey_offered(
        &mut self,
        user: &str,
        offer: PublicKeyOffer<'_>,
    ) -> Result<Auth, Self::Error> {
        match self.check(user, offer.public_key, offer.algorithm) {
            Ok(_) => Ok(Auth::Accept),
            Err(refusal) => {
                self.audit_refusal(user, offer.public_key, refusal);
                Ok(Auth::reject())
            }
        }
    }

    async fn auth_publickey(
        &mut self,
        user: &str,
        key: VerifiedPublicKey<'_>,
    ) -> Result<Auth, Self::Error> {
        match self.check(user, key.public_key, key.algorithm) {
            Ok(found) => {
                if !self.ticket.is_logged_in() && !self.door.guard.open_session(&found.username) {
                    // A supplier whose tool opens too many sessions is not an attacker: no penalty.
                    self.ticket.forgive();
                    self.audit_refusal(
                        user,
                        key.public_key,
                        Refusal::Auth(format!(
                            "the user already has {} sessions (limits.max_sessions_per_user)",
                            self.door.guard.limits().max_sessions_per_user
                        )),
                    );
                    return Ok(Auth::reject());
                }
                self.ticket.logged_in(&found.username);
                self.logged_in
                    .store(true, std::sync::atomic::Ordering::SeqCst);
                if let Ok(mut subject) = self.subject.lock() {
                    subject.user = Some(found.username.clone());
                }
                self.door.audit.record(
                    &self.subject(None),
                    Event::AuthAccepted {
                        method: "publickey".into(),
                        key_fingerprint: key.public_key.fingerprint(HashAlg::Sha256).to_string(),
                    },
                );
                self.user = Some(found);
                Ok(Auth::Accept)
            }
            Err(refusal) => {
                self.audit_refusal(user, key.public_key, refusal);
                Ok(Auth::reject())
            }
        }
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        reply: russh::server::ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        if self.user.is_some()
            && self.channels.len() + self.sftp_sessions.load(std::sync::atomic::Ordering::SeqCst)
                < MAX_CHANNELS
        {
            self.channels.insert(channel.id(), channel);
            reply.accept().await;
        } else {
            reply
                .reject(russh::ChannelOpenFailure::AdministrativelyProhibited)
                .await;
        }
        Ok(())
    }

    async fn subsystem_request(
        &mut self,
        channel_id: ChannelId,
        name: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let (Some(user), true) = (self.user.clone(), name == "sftp") else {
            self.door.audit.record(
                &self.subject(None),
                Event::ChannelRefused {
                    request: format!("subsystem {name}"),
                },
            );
            return session.channel_failure(channel_id);
        };
        let Some(channel) = self.channels.remove(&channel_id) else {
            return session.channel_failure(channel_id);
        };
        let egress = match user
            .egress
            .as_ref()
            .map(|egress| Bucket::open(&egress.location))
        {
            None => None,
            Some(Ok(bucket)) => Some(bucket),
            Some(Err(error)) => {
                tracing::error!(%error, user = %user.username, "cannot open the user's egress area");
                return session.channel_failure(channel_id);
            }
        };
        session.channel_success(channel_id)?;
        self.sftp_sessions
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let running = self.sftp_sessions.clone();
        let ctx = Arc::new(SessionContext {
            view: UserView::new(
                user,
                self.door.landing.clone(),
                egress,
                self.door.state.clone(),
                crate::sftp::fs::UploadLimits {
                    max_file_size: self.door.max_file_size,
                    max_partials: self.door.guard.limits().max_partials_per_user,
                },
                &session_of(&self.subject),
                self.door.temporary_names.clone(),
                self.door.receipts,
            ),
            state: self.door.state.clone(),
            audit: self.door.audit.clone(),
            subject: self.subject(None),
            landed: self.door.landed.clone(),
            operators: self.door.operators.clone(),
            write_budget: self.door.write_budget.clone(),
            stopping: self.door.stopping.clone(),
        });
        let handle = session.handle();
        // Tracked with the connections, so that a stop waits for the session to keep its uploads.
        self.door.connections.spawn(async move {
            let finish = async move {
                let _ = handle.exit_status_request(channel_id, 0).await;
                let _ = handle.eof(channel_id).await;
            };
            session::serve(channel.into_stream(), ctx, finish).await;
            running.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        });
        Ok(())
    }

    async fn exec_request(
        &mut self,
        channel: ChannelId,
        data: &[u8],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let command: String = String::from_utf8_lossy(data).chars().take(200).collect();
        self.door.audit.record(
            &self.subject(None),
            Event::ChannelRefused {
                request: format!("exec {command}"),
            },
        );
        session.channel_failure(channel)
    }

    async fn shell_request(
        &mut self,
        channel: ChannelId,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.door.audit.record(
            &self.subject(None),
            Event::ChannelRefused {
                request: "shell".into(),
            },
        );
        session.channel_failure(channel)
    }
}

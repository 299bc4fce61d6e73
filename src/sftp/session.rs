//! The SFTP protocol loop of one subsystem channel, pipelined.
//!
//! russh-sftp's own server loop answers one request at a time; this one uses its packet types but
//! keeps many requests in flight: each open file has a worker task that handles its requests in
//! order (so writes stream without waiting for each other), path requests run concurrently up to a
//! bound, and replies are batched onto the channel as they are ready. Backpressure is natural: when a
//! file's queue is full the loop stops reading, so the SSH window stops opening.
//!
//! This module speaks SFTP only; what a path means and what is allowed is `fs`'s business.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use russh_sftp::protocol::{
    Attrs, ExtendedReply, File, FileAttributes, Handle, Name, OpenFlags, Packet, Status,
    StatusCode, Version,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{Semaphore, mpsc};

use super::fs::{Entry, Opened, SftpError, UserView, file_attrs, in_read_only_area};
use super::partial::{LandingUpload, WriteError};
use super::paths::{AboveRoot, VirtualPath, normalise};
use crate::audit::{Audit, Event, Subject};
use crate::state::{Held, NewJob, State};
use crate::storage::Download;

/// Largest SFTP packet accepted from a client (as OpenSSH's sftp-server).
pub const MAX_PACKET: u32 = 256 * 1024;
/// Largest READ/WRITE payload, advertised through limits@openssh.com.
pub const MAX_READ_WRITE: u32 = MAX_PACKET - 1024;
/// Open files and folders per session.
pub const MAX_HANDLES: usize = 256;
/// Write data (KiB) one session may have queued; taken before the shared budget, so one client that
/// stops reading its replies cannot drain the budget every session shares.
const SESSION_WRITE_KIB: u32 = 64 * 1024;
/// Uploads open at once per session (each buffers up to a few parts in memory).
pub const MAX_UPLOADS: usize = 8;
/// Open folder listings per session (each may hold up to 100,000 names).
pub const MAX_FOLDER_HANDLES: usize = 8;
/// Requests queued per open file before the loop stops reading.
const FILE_QUEUE: usize = 32;
/// Names per READDIR reply.
const NAMES_PER_READDIR: usize = 128;

const SSH_FXP_INIT: u8 = 1;
const SSH_FXP_EXTENDED: u8 = 200;
const SSH_FXP_WRITE: u8 = 6;
const SSH_FXP_DATA: u8 = 103;

/// Everything a session needs, shared by its tasks.
pub struct SessionContext {
    pub view: UserView,
    pub state: State,
    pub audit: Arc<Audit>,
    pub subject: Subject,
    /// Woken whenever a job is recorded, so the pipeline starts at once.
    pub landed: Arc<tokio::sync::Notify>,
    /// Operators' alert targets, for `received` alerts.
    pub operators: Arc<Vec<crate::config::NotifyTarget>>,
    /// Shared budget (KiB) of queued write data; see `server`.
    pub write_budget: Arc<Semaphore>,
    /// Cancelled when a stopping server's drain time is over: the session ends as if the client had
    /// gone, so that uploads under way are kept as interrupted uploads.
    pub stopping: tokio_util::sync::CancellationToken,
}

impl SessionContext {
    fn audit(&self, event: Event) {
        self.audit.record(&self.subject, event);
    }
}

enum OpenHandle {
    File(mpsc::Sender<FileRequest>),
    Folder(VecDeque<File>),
}

enum FileRequest {
    Write {
        id: u32,
        offset: u64,
        data: Bytes,
        /// Its share of the session's and the shared write budgets, returned when the write is done.
        _budget: (
            tokio::sync::OwnedSemaphorePermit,
            tokio::sync::OwnedSemaphorePermit,
        ),
    },
    Read {
        id: u32,
        offset: u64,
        len: u32,
    },
    Stat {
        id: u32,
    },
    SetStat {
        id: u32,
        size: Option<u64>,
    },
    /// `done` fires once the reply is sent, so that later requests see the file closed.
    Close {
        id: u32,
        done: tokio::sync::oneshot::Sender<()>,
    },
}

struct Session {
    ctx: Arc<SessionContext>,
    replies: mpsc::Sender<Reply>,
    handles: Arc<Mutex<HashMap<String, OpenHandle>>>,
    next_handle: Arc<AtomicU64>,
    session_budget: Arc<Semaphore>,
    /// Every task holds a clone; when all are dropped the session's work is done.
    alive: mpsc::Sender<()>,
}

/// Runs the SFTP protocol on `stream` until the client closes it, then runs `finish` (which sends
/// exit-status and EOF) before the stream is dropped, which closes the channel: OpenSSH's scp wants
/// that order.
pub async fn serve<S, F>(stream: S, ctx: Arc<SessionContext>, finish: F)
where
    S: AsyncRead + AsyncWrite + Send + 'static,
    F: Future<Output = ()>,
{
    let (mut reader, writer) = tokio::io::split(stream);
    let (replies, reply_queue) = mpsc::channel(256);
    let writer_task = tokio::spawn(write_replies(writer, reply_queue));
    let (alive, mut all_done) = mpsc::channel::<()>(1);
    let mut session = Session {
        ctx,
        replies,
        handles: Arc::new(Mutex::new(HashMap::new())),
        next_handle: Arc::new(AtomicU64::new(1)),
        session_budget: Arc::new(Semaphore::new(SESSION_WRITE_KIB as usize)),
        alive,
    };
    loop {
        let packet = tokio::select! {
            packet = read_packet(&mut reader) => packet,
            () = session.ctx.stopping.cancelled() => {
                tracing::info!("ending the SFTP session: the server is stopping");
                break;
            }
        };
        match packet {
            Ok(Some(packet)) => session.dispatch(packet).await,
            Ok(None) => break,
            Err(error) => {
                if let Some(oversized) = error
                    .get_ref()
                    .and_then(|inner| inner.downcast_ref::<PacketSizeError>())
                {
                    session.ctx.audit(Event::ProtocolError {
                        reason: oversized.to_string(),
                    });
                }
                tracing::info!(%error, "ending the SFTP session");
                break;
            }
        }
    }
    // Dropping the handle table ends every file worker: uploads not closed are discarded.
    if let Ok(mut handles) = session.handles.lock() {
        handles.clear();
    }
    drop(session);
    let _ = all_done.recv().await;
    let _ = writer_task.await;
    finish.await;
    drop(reader);
}

/// A declared SFTP packet length outside `1..=MAX_PACKET`: the session ends, and is audited.
#[derive(Debug, thiserror::Error)]
#[error("an SFTP packet of {length} bytes is outside the limit of 1..={MAX_PACKET}")]
struct PacketSizeError {
    length: u32,
}

async fn read_packet<R: AsyncRead + Unpin>(reader: &mut R) -> std::io::Result<Option<Bytes>> {
    let length = match reader.read_u32().await {
        Ok(length) => length,
        Err(error) if error.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(error) => return Err(error),
    };
    if length == 0 || length > MAX_PACKET {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            PacketSizeError { length },
        ));
    }
    // Read straight into spare capacity: no zero-fill of a buffer about to be overwritten.
    let length = length as usize;
    let mut buffer = BytesMut::with_capacity(length);
    let mut packet = reader.take(length as u64);
    while buffer.len() < length {
        if packet.read_buf(&mut buffer).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
    }
    Ok(Some(buffer.freeze()))
}

/// A reply on its way to the client: a russh-sftp packet, or file data kept in the `Bytes` it was
/// read into, so that a download's bytes are copied once, into the outgoing batch, rather than
/// into a `Vec` for the packet, into its encoding, and then into the batch.
enum Reply {
    Packet(Packet),
    Data { id: u32, data: Bytes },
}

impl From<Packet> for Reply {
    fn from(packet: Packet) -> Reply {
        Reply::Packet(packet)
    }
}

/// Writes replies in batches: everything ready goes out in one channel write.
async fn write_replies<W: AsyncWrite + Unpin>(mut writer: W, mut queue: mpsc::Receiver<Reply>) {
    let mut batch = BytesMut::new();
    while let Some(packet) = queue.recv().await {
        encode_into(&mut batch, packet);
        while batch.len() < 1024 * 1024 {
            match queue.try_recv() {
                Ok(packet) => encode_into(&mut batch, packet),
                Err(_) => break,
            }
        }
        if let Err(error) = writer.write_all(&batch).await {
            tracing::debug!(%error, "cannot send SFTP replies; the client has gone");
            return;
        }
        batch.clear();
        let _ = writer.flush().await;
    }
}

fn encode_into(batch: &mut BytesMut, reply: Reply) {
    match reply {
        Reply::Packet(packet) => match Bytes::try_from(packet) {
            Ok(bytes) => batch.extend_from_slice(&bytes),
            Err(error) => tracing::error!(%error, "cannot encode an SFTP reply"),
        },
        Reply::Data { id, data } => {
            // SSH_FXP_DATA: length, type, request id, then the data as an SSH string. Reads are
            // capped far below 4 GiB, so the lengths fit.
            let lengths = u32::try_from(data.len())
                .ok()
                .and_then(|length| Some((length, length.checked_add(9)?)));
            let Some((length, packet_length)) = lengths else {
                tracing::error!(
                    bytes = data.len(),
                    "an SFTP data reply is too long to encode"
                );
                return;
            };
            batch.reserve(13 + data.len());
            batch.put_u32(packet_length);
            batch.put_u8(SSH_FXP_DATA);
            batch.put_u32(id);
            batch.put_u32(length);
            batch.extend_from_slice(&data);
        }
    }
}

fn status(id: u32, code: StatusCode, message: impl Into<String>) -> Packet {
    Packet::Status(Status {
        id,
        status_code: code,
        error_message: message.into(),
        language_tag: "en".into(),
    })
}

fn ok(id: u32) -> Packet {
    status(id, StatusCode::Ok, "OK")
}

fn error_reply(id: u32, error: SftpError) -> Packet {
    status(id, error.code, error.message)
}

fn reply_for(id: u32, result: Result<Packet, SftpError>) -> Packet {
    result.unwrap_or_else(|error| error_reply(id, error))
}

fn parse_path(raw: &str) -> Result<VirtualPath, SftpError> {
    Ok(normalise(raw, AboveRoot::Refuse)?)
}

impl Session {
    async fn send(&self, packet: Packet) {
        let _ = self.replies.send(packet.into()).await;
    }

    async fn dispatch(&mut self, raw: Bytes) {
        let packet = match decode_request(raw) {
            Request::Write(write) => return self.write(write).await,
            Request::Refused(reply) => return self.send(reply).await,
            Request::Packet(packet) => packet,
        };
        match packet {
            Packet::Init(_) => {
                let mut version = Version::new();
                version
                    .extensions
                    .insert("limits@openssh.com".into(), "1".into());
                version
                    .extensions
                    .insert("posix-rename@openssh.com".into(), "1".into());
                self.send(Packet::Version(version)).await;
            }
            Packet::Write(write) => {
                self.write(WriteRequest {
                    id: write.id,
                    handle: write.handle,
                    offset: write.offset,
                    data: Bytes::from(write.data),
                })
                .await;
            }
            Packet::Read(read) => {
                let request = FileRequest::Read {
                    id: read.id,
                    offset: read.offset,
                    len: read.len,
                };
                self.to_file(&read.handle, read.id, request).await;
            }
            Packet::Fstat(fstat) => {
                self.to_file(&fstat.handle, fstat.id, FileRequest::Stat { id: fstat.id })
                    .await;
            }
            Packet::FSetStat(fsetstat) => {
                self.to_file(
                    &fsetstat.handle,
                    fsetstat.id,
                    FileRequest::SetStat {
                        id: fsetstat.id,
                        size: fsetstat.attrs.size,
                    },
                )
                .await;
            }
            Packet::Close(close) => self.close(&close.handle, close.id).await,
            Packet::ReadDir(readdir) => {
                let reply = self.read_folder(&readdir.handle, readdir.id);
                self.send(reply).await;
            }
            Packet::RealPath(realpath) => {
                let resolved =
                    normalise(&realpath.path, AboveRoot::StayAtRoot).map_err(SftpError::from);
                let reply = resolved.map(|path| {
                    Packet::Name(Name {
                        id: realpath.id,
                        files: vec![File {
                            filename: path.to_string(),
                            longname: String::new(),
                            attrs: FileAttributes::empty(),
                        }],
                    })
                });
                self.send(reply_for(realpath.id, reply)).await;
            }
            Packet::ReadLink(readlink) => {
                self.send(status(
                    readlink.id,
                    StatusCode::PermissionDenied,
                    "symbolic links are not supported",
                ))
                .await;
            }
            Packet::Symlink(symlink) => {
                self.send(status(
                    symlink.id,
                    StatusCode::PermissionDenied,
                    "symbolic links are not supported",
                ))
                .await;
            }
            Packet::Open(open) => {
                let id = open.id;
                let (filename, flags) = (open.filename, open.pflags);
                self.spawn(id, move |session| async move {
                    session.open(id, &filename, flags).await
                })
                .await;
            }
            Packet::OpenDir(opendir) => {
                let id = opendir.id;
                self.spawn(id, move |session| async move {
                    session.open_folder(id, &opendir.path).await
                })
                .await;
            }
            Packet::Stat(stat) => {
                let id = stat.id;
                self.spawn(id, move |session| async move {
                    session.stat(id, &stat.path).await
                })
                .await;
            }
            Packet::Lstat(lstat) => {
                let id = lstat.id;
                self.spawn(id, move |session| async move {
                    session.stat(id, &lstat.path).await
                })
                .await;
            }
            Packet::SetStat(setstat) => {
                let id = setstat.id;
                self.spawn(id, move |session| async move {
                    let path = parse_path(&setstat.path)?;
                    session.ctx.view.check_setstat(&path)?;
                    let entry = session.stat_path(id, &path).await?;
                    match (setstat.attrs.size, entry) {
                        (Some(size), Packet::Attrs(attrs)) if attrs.attrs.size != Some(size) => {
                            Err(size_change())
                        }
                        _ => Ok(ok(id)),
                    }
                })
                .await;
            }
            Packet::MkDir(mkdir) => {
                let id = mkdir.id;
                self.spawn(id, move |session| async move {
                    let path = parse_path(&mkdir.path)?;
                    session.ctx.view.mkdir(&path).await?;
                    session.ctx.audit(Event::Mkdir {
                        path: path.to_string(),
                    });
                    Ok(ok(id))
                })
                .await;
            }
            Packet::RmDir(rmdir) => {
                let id = rmdir.id;
                self.spawn(id, move |session| async move {
                    let path = parse_path(&rmdir.path)?;
                    session.ctx.view.rmdir(&path).await?;
                    session.ctx.audit(Event::Rmdir {
                        path: path.to_string(),
                    });
                    Ok(ok(id))
                })
                .await;
            }
            Packet::Remove(remove) => {
                let id = remove.id;
                self.spawn(id, move |session| async move {
                    let path = parse_path(&remove.filename)?;
                    let event = match session.ctx.view.remove(&path).await? {
                        Some(bytes_stored) => Event::PartialDiscarded {
                            path: path.to_string(),
                            bytes_stored,
                            reason: "its owner removed it".into(),
                        },
                        None => Event::Remove {
                            path: path.to_string(),
                        },
                    };
                    session.ctx.audit(event);
                    Ok(ok(id))
                })
                .await;
            }
            Packet::Rename(rename) => {
                let id = rename.id;
                self.spawn(id, move |session| async move {
                    session
                        .rename(id, &rename.oldpath, &rename.newpath, false)
                        .await
                })
                .await;
            }
            Packet::Extended(extended) => {
                self.extended(extended.id, &extended.request, extended.data)
                    .await
            }
            other => {
                let id = other.get_request_id();
                self.send(status(
                    id,
                    StatusCode::BadMessage,
                    "not a request a client may send",
                ))
                .await;
            }
        }
    }

    async fn extended(&mut self, id: u32, request: &str, data: Vec<u8>) {
        match request {
            "limits@openssh.com" => {
                let mut reply = Vec::with_capacity(32);
                for limit in [
                    u64::from(MAX_PACKET),
                    u64::from(MAX_READ_WRITE),
                    u64::from(MAX_READ_WRITE),
                    MAX_HANDLES as u64,
                ] {
                    reply.extend_from_slice(&limit.to_be_bytes());
                }
                self.send(Packet::ExtendedReply(ExtendedReply { id, data: reply }))
                    .await;
            }
            "posix-rename@openssh.com" => match two_strings(&data) {
                Some((from, to)) => {
                    self.spawn(id, move |session| async move {
                        session.rename(id, &from, &to, true).await
                    })
                    .await;
                }
                None => {
                    self.send(status(
                        id,
                        StatusCode::BadMessage,
                        "malformed posix-rename request",
                    ))
                    .await;
                }
            },
            "hardlink@openssh.com" => {
                self.send(status(
                    id,
                    StatusCode::PermissionDenied,
                    "links are not supported",
                ))
                .await;
            }
            other => {
                self.send(status(
                    id,
                    StatusCode::OpUnsupported,
                    format!("the extension `{other}` is not supported"),
                ))
                .await;
            }
        }
    }

    /// Runs a path request concurrently (bounded), replying with its result.
    /// Runs a path request and replies. Path requests run one at a time, in the order received,
    /// so that MKDIR before OPEN, or REMOVE before RENAME, behave as the client expects.
    async fn spawn<F, Fut>(&self, id: u32, request: F)
    where
        F: FnOnce(Arc<Worker>) -> Fut + Send + 'static,
        Fut: Future<Output = Result<Packet, SftpError>> + Send + 'static,
    {
        let worker = Arc::new(Worker {
            ctx: self.ctx.clone(),
            replies: self.replies.clone(),
            handles: self.handles.clone(),
            next_handle: self.next_handle.clone(),
            alive: self.alive.clone(),
        });
        let reply = reply_for(id, request(worker).await);
        self.send(reply).await;
    }

    /// Passes a WRITE to its file's worker once the write budgets have room for it.
    async fn write(&mut self, write: WriteRequest) {
        let kib = u32::try_from(write.data.len().div_ceil(1024))
            .unwrap_or(u32::MAX)
            .clamp(1, SESSION_WRITE_KIB);
        let Ok(own) = self.session_budget.clone().acquire_many_owned(kib).await else {
            return;
        };
        let Ok(shared) = self.ctx.write_budget.clone().acquire_many_owned(kib).await else {
            return;
        };
        let request = FileRequest::Write {
            id: write.id,
            offset: write.offset,
            data: write.data,
            _budget: (own, shared),
        };
        self.to_file(&write.handle, write.id, request).await;
    }

    async fn to_file(&self, handle: &str, id: u32, request: FileRequest) {
        let sender = match self
            .handles
            .lock()
            .ok()
            .and_then(|handles| match handles.get(handle) {
                Some(OpenHandle::File(sender)) => Some(Ok(sender.clone())),
                Some(OpenHandle::Folder(_)) => Some(Err("this handle is a folder, not a file")),
                None => None,
            }) {
            Some(Ok(sender)) => sender,
            Some(Err(message)) => return self.send(status(id, StatusCode::Failure, message)).await,
            None => return self.send(invalid_handle(id)).await,
        };
        if sender.send(request).await.is_err() {
            self.send(status(
                id,
                StatusCode::Failure,
                "the file is no longer open",
            ))
            .await;
        }
    }

    async fn close(&self, handle: &str, id: u32) {
        let removed = self
            .handles
            .lock()
            .ok()
            .and_then(|mut handles| handles.remove(handle));
        match removed {
            Some(OpenHandle::File(sender)) => {
                let (done, closed) = tokio::sync::oneshot::channel();
                if sender.send(FileRequest::Close { id, done }).await.is_err() {
                    self.send(status(
                        id,
                        StatusCode::Failure,
                        "the file is no longer open",
                    ))
                    .await;
                    return;
                }
                // Wait until the upload is complete and recorded (or failed) before reading on.
                let _ = closed.await;
            }
            Some(OpenHandle::Folder(_)) => self.send(ok(id)).await,
            None => self.send(invalid_handle(id)).await,
        }
    }

    fn read_folder(&self, handle: &str, id: u32) -> Packet {
        let Ok(mut handles) = self.handles.lock() else {
            return invalid_handle(id);
        };
        match handles.get_mut(handle) {
            Some(OpenHandle::Folder(entries)) if entries.is_empty() => {
                status(id, StatusCode::Eof, "end of folder")
            }
            Some(OpenHandle::Folder(entries)) => {
                let count = entries.len().min(NAMES_PER_READDIR);
                Packet::Name(Name {
                    id,
                    files: entries.drain(..count).collect(),
                })
            }
            Some(OpenHandle::File(_)) => status(
                id,
                StatusCode::Failure,
                "this handle is a file, not a folder",
            ),
            None => invalid_handle(id),
        }
    }
}

/// Times and modes are accepted and ignored; a size change would silently change the delivered bytes.
fn size_change() -> SftpError {
    SftpError::new(
        StatusCode::OpUnsupported,
        "changing a file's size is not supported; upload the file again with the bytes it should have",
    )
}

fn invalid_handle(id: u32) -> Packet {
    status(
        id,
        StatusCode::Failure,
        "invalid handle: it was never opened or is already closed",
    )
}

/// What `dispatch` makes of a packet body (the bytes after its length).
#[doc(hidden)]
#[derive(Debug)]
pub enum Request {
    /// An SSH_FXP_WRITE read by `parse_write`.
    Write(WriteRequest),
    /// Any other request (or a WRITE `parse_write` refused), as russh-sftp decodes it.
    Packet(Packet),
    /// A packet neither decodes: the status reply it gets.
    Refused(Packet),
}

/// Decodes one packet body as the session does, for every packet `dispatch` receives: the WRITE
/// fast path, then russh-sftp's decoder. Public (through `sftp::fuzzing`) only for the
/// `sftp_request` fuzz target; not an API.
#[doc(hidden)]
pub fn decode_request(raw: Bytes) -> Request {
    let kind = raw.first().copied().unwrap_or(0);
    if kind == SSH_FXP_WRITE
        && let Some(write) = parse_write(&raw)
    {
        return Request::Write(write);
    }
    let id = raw.get(1..5).map_or(0, |mut bytes| bytes.get_u32());
    let mut body = raw;
    match Packet::try_from(&mut body) {
        Ok(packet) => Request::Packet(packet),
        Err(_) => {
            let known = (SSH_FXP_INIT..=20).contains(&kind) || kind == SSH_FXP_EXTENDED;
            Request::Refused(if known {
                status(
                    id,
                    StatusCode::BadMessage,
                    format!("malformed request of type {kind}"),
                )
            } else {
                status(
                    id,
                    StatusCode::OpUnsupported,
                    format!("unknown request type {kind}"),
                )
            })
        }
    }
}

/// Splits `stream` into packets with `read_packet`, as `serve` reads its channel, until the end of
/// the stream or the first error (returned after the packets before it). Public (through
/// `sftp::fuzzing`) only for the `sftp_request` fuzz target; not an API.
#[doc(hidden)]
pub fn read_packets(mut stream: &[u8]) -> (Vec<Bytes>, std::io::Result<()>) {
    futures::executor::block_on(async {
        let mut packets = Vec::new();
        loop {
            match read_packet(&mut stream).await {
                Ok(Some(packet)) => packets.push(packet),
                Ok(None) => return (packets, Ok(())),
                Err(error) => return (packets, Err(error)),
            }
        }
    })
}

/// An SSH_FXP_WRITE whose data is a slice of the packet it came in.
#[doc(hidden)]
#[derive(Debug, PartialEq, Eq)]
pub struct WriteRequest {
    pub id: u32,
    pub handle: String,
    pub offset: u64,
    pub data: Bytes,
}

/// Reads an SSH_FXP_WRITE (type, id, handle, offset, data) without copying its data, which is most
/// of what an upload moves; `None` if it is malformed (russh-sftp's parser then reports it).
fn parse_write(raw: &Bytes) -> Option<WriteRequest> {
    if raw.is_empty() {
        return None;
    }
    let mut body = raw.slice(1..);
    let id = body.try_get_u32().ok()?;
    let handle = utf8(ssh_string(&mut body)?)?;
    let offset = body.try_get_u64().ok()?;
    let data = ssh_string(&mut body)?;
    Some(WriteRequest {
        id,
        handle,
        offset,
        data,
    })
}

/// Takes an SSH string (u32 length, then that many bytes) off the front of `data`, as a slice.
fn ssh_string(data: &mut Bytes) -> Option<Bytes> {
    let length = usize::try_from(data.try_get_u32().ok()?).ok()?;
    (data.len() >= length).then(|| data.split_to(length))
}

fn utf8(bytes: Bytes) -> Option<String> {
    String::from_utf8(bytes.to_vec()).ok()
}

/// Reads two SSH strings (u32 length + UTF-8) from an extended request's data. Public (through
/// `sftp::fuzzing`) only for the `sftp_request` fuzz target; not an API.
#[doc(hidden)]
pub fn two_strings(data: &[u8]) -> Option<(String, String)> {
    let mut data = Bytes::copy_from_slice(data);
    let first = utf8(ssh_string(&mut data)?)?;
    Some((first, utf8(ssh_string(&mut data)?)?))
}

/// What a concurrent request task holds.
struct Worker {
    ctx: Arc<SessionContext>,
    replies: mpsc::Sender<Reply>,
    handles: Arc<Mutex<HashMap<String, OpenHandle>>>,
    next_handle: Arc<AtomicU64>,
    alive: mpsc::Sender<()>,
}

impl Worker {
    fn handle_count(&self) -> usize {
        self.handles
            .lock()
            .map_or(usize::MAX, |handles| handles.len())
    }

    fn too_many_handles() -> SftpError {
        SftpError::failure(format!(
            "too many open files and folders in this session (at most {MAX_HANDLES}); close some first"
        ))
    }

    fn register(&self, handle: OpenHandle) -> Result<String, SftpError> {
        let name = self.next_handle.fetch_add(1, Ordering::Relaxed).to_string();
        let mut handles = self
            .handles
            .lock()
            .map_err(|_| SftpError::failure("internal error"))?;
        if handles.len() >= MAX_HANDLES {
            return Err(Self::too_many_handles());
        }
        handles.insert(name.clone(), handle);
        Ok(name)
    }

    async fn stat(&self, id: u32, raw: &str) -> Result<Packet, SftpError> {
        self.stat_path(id, &parse_path(raw)?).await
    }

    async fn stat_path(&self, id: u32, path: &VirtualPath) -> Result<Packet, SftpError> {
        let entry = self.ctx.view.stat(path).await?;
        let uploaded = !in_read_only_area(&self.ctx.view, path);
        Ok(Packet::Attrs(Attrs {
            id,
            attrs: file_attrs(&entry, uploaded),
        }))
    }

    async fn rename(
        &self,
        id: u32,
        from: &str,
        to: &str,
        overwrite: bool,
    ) -> Result<Packet, SftpError> {
        let (from, to) = (parse_path(from)?, parse_path(to)?);
        self.ctx.view.rename(&from, &to, overwrite).await?;
        self.ctx.audit(Event::Rename {
            from: from.to_string(),
            to: to.to_string(),
        });
        Ok(ok(id))
    }

    async fn open_folder(&self, id: u32, raw: &str) -> Result<Packet, SftpError> {
        if self.handle_count() >= MAX_HANDLES {
            return Err(Self::too_many_handles());
        }
        let folders = self.handles.lock().map_or(usize::MAX, |handles| {
            handles
                .values()
                .filter(|handle| matches!(handle, OpenHandle::Folder(_)))
                .count()
        });
        if folders >= MAX_FOLDER_HANDLES {
            return Err(SftpError::failure(format!(
                "too many open folder listings in this session (at most {MAX_FOLDER_HANDLES}); close some first"
            )));
        }
        let path = parse_path(raw)?;
        let entries = self.ctx.view.list(&path).await?;
        let handle = self.register(OpenHandle::Folder(entries.into()))?;
        Ok(Packet::Handle(Handle { id, handle }))
    }

    async fn open(&self, id: u32, raw: &str, flags: OpenFlags) -> Result<Packet, SftpError> {
        if self.handle_count() >= MAX_HANDLES {
            return Err(Self::too_many_handles());
        }
        let path = parse_path(raw)?;
        let uploads = self.handles.lock().map_or(usize::MAX, |handles| {
            handles
                .values()
                .filter(|handle| matches!(handle, OpenHandle::File(_)))
                .count()
        });
        if uploads >= MAX_UPLOADS
            && flags.intersects(OpenFlags::WRITE | OpenFlags::CREATE | OpenFlags::TRUNCATE)
        {
            return Err(SftpError::failure(format!(
                "too many files open for upload in this session (at most {MAX_UPLOADS}); close some first"
            )));
        }
        let opened = self.ctx.view.open(&path, flags).await?;
        let (sender, queue) = mpsc::channel(FILE_QUEUE);
        let handle = self.register(OpenHandle::File(sender))?;
        let ctx = self.ctx.clone();
        let replies = self.replies.clone();
        let alive = self.alive.clone();
        match opened {
            Opened::Upload {
                upload,
                replaced_partial,
            } => {
                ctx.audit(Event::Open {
                    path: path.to_string(),
                    mode: "write",
                });
                if let Some(bytes_stored) = replaced_partial {
                    ctx.audit(Event::PartialDiscarded {
                        path: path.to_string(),
                        bytes_stored,
                        reason: "the file was opened again with truncation".into(),
                    });
                }
                if let Some(from) = upload.resumed_from() {
                    ctx.audit(Event::UploadResumed {
                        path: path.to_string(),
                        from,
                    });
                }
                tokio::spawn(async move {
                    run_upload(&ctx, &path, *upload, queue, &replies).await;
                    drop(alive);
                });
            }
            Opened::Download(download) => {
                start_read(ctx, path, Source::Stored(download), queue, replies, alive);
            }
            Opened::Receipt(text) => {
                start_read(ctx, path, Source::Text(text), queue, replies, alive);
            }
        }
        Ok(Packet::Handle(Handle { id, handle }))
    }
}

/// Serves one file opened for upload until CLOSE (the upload completes) or the session ends (what
/// is stored is kept as an interrupted upload, for a resume).
async fn run_upload(
    ctx: &SessionContext,
    path: &VirtualPath,
    upload: LandingUpload,
    mut queue: mpsc::Receiver<FileRequest>,
    replies: &mpsc::Sender<Reply>,
) {
    let mut upload = Some(upload);
    let mut failure: Option<String> = None;
    let mut received: u64 = 0;
    while let Some(request) = queue.recv().await {
        let reply = match request {
            FileRequest::Write {
                id, offset, data, ..
            } => {
                received = received.max(offset.saturating_add(data.len() as u64));
                crate::telemetry::bytes_received(data.len() as u64);
                match (&mut upload, &failure) {
                    (Some(current), None) => match current.write(offset, data).await {
                        Ok(()) => {
                            if let Some(bytes_stored) = current.take_restart() {
                                ctx.audit(Event::PartialDiscarded {
                                    path: path.to_string(),
                                    bytes_stored,
                                    reason: "the client wrote the file again from its first byte"
                                        .into(),
                                });
                            }
                            ok(id)
                        }
                        Err(WriteError::Refused(reason)) => status(id, StatusCode::Failure, reason),
                        Err(WriteError::Interrupted(reason)) => {
                            if let Some(current) = upload.take() {
                                suspend(ctx, path, current, received).await;
                            }
                            failure = Some(reason.clone());
                            status(id, StatusCode::Failure, reason)
                        }
                        Err(WriteError::Failed(reason)) => {
                            if let Some(current) = upload.take() {
                                current.discard().await;
                            }
                            ctx.audit(Event::UploadAborted {
                                path: path.to_string(),
                                bytes_received: received,
                                reason: reason.clone(),
                            });
                            failure = Some(reason.clone());
                            status(id, StatusCode::Failure, reason)
                        }
                    },
                    (_, Some(reason)) => status(id, StatusCode::Failure, reason.clone()),
                    (None, None) => status(id, StatusCode::Failure, "the upload is closed"),
                }
            }
            FileRequest::Read { id, .. } => status(
                id,
                StatusCode::PermissionDenied,
                "uploaded files cannot be read back (this account is upload-only)",
            ),
            FileRequest::Stat { id } => Packet::Attrs(Attrs {
                id,
                attrs: file_attrs(
                    &Entry::File {
                        size: upload.as_ref().map_or(0, LandingUpload::len),
                        modified: 0,
                    },
                    true,
                ),
            }),
            FileRequest::SetStat { id, size } => match size {
                Some(size) if Some(size) != upload.as_ref().map(LandingUpload::len) => {
                    error_reply(id, size_change())
                }
                _ => ok(id),
            },
            FileRequest::Close { id, done } => {
                let reply = match (upload.take(), failure.take()) {
                    (Some(current), None) => match current.refused().map(str::to_string) {
                        // A resume that wrote at the wrong offset: the partial stays as it was.
                        Some(reason) => {
                            suspend(ctx, path, current, received).await;
                            status(id, StatusCode::Failure, reason)
                        }
                        None => finish_upload(ctx, path, current, received, id).await,
                    },
                    (_, Some(reason)) => status(id, StatusCode::Failure, reason),
                    (None, None) => status(id, StatusCode::Failure, "the upload is closed"),
                };
                let _ = replies.send(reply.into()).await;
                let _ = done.send(());
                return;
            }
        };
        let _ = replies.send(reply.into()).await;
    }
    if let Some(current) = upload.take() {
        suspend(ctx, path, current, received).await;
    }
}

/// Keeps an upload that was not closed as an interrupted upload, and audits it.
async fn suspend(ctx: &SessionContext, path: &VirtualPath, upload: LandingUpload, received: u64) {
    let bytes_stored = upload.suspend().await;
    ctx.audit(Event::UploadInterrupted {
        path: path.to_string(),
        bytes_received: received,
        bytes_stored,
    });
}

/// How long a CLOSE waits for the pipeline to finish with an earlier upload of the same path.
const BUSY_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// Holds the path so that the pipeline does not process an older upload of it while this one
/// replaces it; waits (bounded) while it is being processed.
async fn hold_for_replacement(ctx: &SessionContext, relative: &str) -> Result<Held, String> {
    match ctx.view.hold_waiting(relative, BUSY_WAIT).await {
        Ok(Ok(held)) => Ok(held),
        Ok(Err(_busy)) => Err(
            "an earlier upload of this file is still being scanned and delivered; \
                               upload it again in a moment"
                .into(),
        ),
        Err(error) => {
            tracing::error!(%error, "cannot hold a path before completing an upload");
            Err("the server could not record this upload; upload it again".into())
        }
    }
}

/// Completes the object, records the job, and only then acknowledges the CLOSE.
async fn finish_upload(
    ctx: &SessionContext,
    path: &VirtualPath,
    upload: LandingUpload,
    received: u64,
    id: u32,
) -> Packet {
    let relative = ctx.view.home_relative(path);
    let held = match hold_for_replacement(ctx, &relative).await {
        Ok(held) => held,
        Err(reason) => {
            // What is stored stays, so the client can close it again with a resume later.
            suspend(ctx, path, upload, received).await;
            return status(id, StatusCode::Failure, reason);
        }
    };
    let release = || async {
        if held == Held::Jobs {
            ctx.view.release(&relative).await;
        }
    };
    let (uploaded, partial_writer) = match upload.finish().await {
        Ok(finished) => finished,
        Err(reason) => {
            release().await;
            ctx.audit(Event::UploadAborted {
                path: path.to_string(),
                bytes_received: received,
                reason: reason.clone(),
            });
            return status(id, StatusCode::Failure, reason);
        }
    };
    let session = ctx.subject.session.clone().unwrap_or_default();
    let job = NewJob {
        username: ctx.view.username(),
        path: &relative,
        size: uploaded.size,
        sha256: &uploaded.sha256,
        session: &session,
        held: ctx.view.is_temporary(&relative),
        partial_writer: partial_writer.as_deref(),
    };
    let recorded = ctx
        .state
        .record_upload_with_alerts(&job, ctx.view.holder(), |id| {
            let facts = crate::notify::Facts::new(
                "received",
                job.username,
                format!("/{relative}"),
                job.size,
                job.sha256,
                Some(id),
            );
            if job.held {
                // A temporary name: the file is not complete in the supplier's eyes yet.
                return Vec::new();
            }
            crate::notify::alerts_for(Some(ctx.view.user()), &ctx.operators, &facts)
        })
        .await;
    release().await;
    match recorded {
        Ok(job) => {
            ctx.landed.notify_one();
            ctx.audit(Event::Close {
                path: path.to_string(),
                bytes: uploaded.size,
                sha256: uploaded.sha256,
                job,
            });
            ok(id)
        }
        Err(error) => {
            tracing::error!(%error, path = %path, "the upload is stored but its job could not be recorded");
            status(
                id,
                StatusCode::Failure,
                "the file was stored but could not be recorded; upload it again",
            )
        }
    }
}

/// What a file opened for reading serves.
enum Source {
    /// An object, from `/download`.
    Stored(Download),
    /// A text made when the file was opened: a receipt.
    Text(Bytes),
}

impl Source {
    fn size(&self) -> u64 {
        match self {
            Source::Stored(download) => download.size(),
            Source::Text(text) => text.len() as u64,
        }
    }

    /// Up to `len` bytes at `offset`; empty at the end of the file.
    async fn read(&mut self, offset: u64, len: usize) -> Result<Bytes, SftpError> {
        match self {
            Source::Stored(download) => Ok(download.read(offset, len).await?),
            Source::Text(text) => {
                let start = usize::try_from(offset)
                    .unwrap_or(usize::MAX)
                    .min(text.len());
                let end = start.saturating_add(len).min(text.len());
                Ok(text.slice(start..end))
            }
        }
    }
}

/// Audits the opening of a file for reading and starts serving it.
fn start_read(
    ctx: Arc<SessionContext>,
    path: VirtualPath,
    source: Source,
    queue: mpsc::Receiver<FileRequest>,
    replies: mpsc::Sender<Reply>,
    alive: mpsc::Sender<()>,
) {
    ctx.audit(Event::Open {
        path: path.to_string(),
        mode: "read",
    });
    tokio::spawn(async move {
        run_read(&ctx, &path, source, queue, &replies).await;
        drop(alive);
    });
}

/// Serves one file opened for reading until CLOSE or the end of the session.
async fn run_read(
    ctx: &SessionContext,
    path: &VirtualPath,
    mut source: Source,
    mut queue: mpsc::Receiver<FileRequest>,
    replies: &mpsc::Sender<Reply>,
) {
    let mut sent: u64 = 0;
    while let Some(request) = queue.recv().await {
        let reply = match request {
            FileRequest::Read { id, offset, len } => {
                match source.read(offset, len.min(MAX_READ_WRITE) as usize).await {
                    Ok(data) if data.is_empty() => status(id, StatusCode::Eof, "end of file"),
                    Ok(data) => {
                        sent += data.len() as u64;
                        crate::telemetry::bytes_sent(data.len() as u64);
                        let _ = replies.send(Reply::Data { id, data }).await;
                        continue;
                    }
                    Err(error) => error_reply(id, error),
                }
            }
            FileRequest::Write { id, .. } => error_reply(id, ctx.view.read_only(path)),
            FileRequest::Stat { id } => Packet::Attrs(Attrs {
                id,
                attrs: file_attrs(
                    &Entry::File {
                        size: source.size(),
                        modified: 0,
                    },
                    false,
                ),
            }),
            FileRequest::SetStat { id, .. } => match ctx.view.check_setstat(path) {
                Ok(()) => ok(id),
                Err(error) => error_reply(id, error),
            },
            FileRequest::Close { id, done } => {
                ctx.audit(Event::Download {
                    path: path.to_string(),
                    bytes: sent,
                });
                let _ = replies.send(ok(id).into()).await;
                let _ = done.send(());
                return;
            }
        };
        let _ = replies.send(reply.into()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_data_reply_is_encoded_as_russh_sftp_encodes_it() {
        for data in [&b""[..], b"x", &[7u8; 70_000][..]] {
            let mut ours = BytesMut::new();
            encode_into(
                &mut ours,
                Reply::Data {
                    id: 42,
                    data: Bytes::copy_from_slice(data),
                },
            );
            let theirs = Bytes::try_from(Packet::Data(russh_sftp::protocol::Data {
                id: 42,
                data: data.to_vec(),
            }))
            .unwrap();
            assert_eq!(ours.freeze(), theirs);
        }
    }

    #[test]
    fn a_write_is_read_as_russh_sftp_reads_it_and_a_truncated_one_is_refused() {
        let packet = Bytes::try_from(Packet::Write(russh_sftp::protocol::Write {
            id: 9,
            handle: "17".into(),
            offset: 1 << 33,
            data: vec![5; 40_000],
        }))
        .unwrap();
        // What dispatch sees: the packet without its length.
        let raw = packet.slice(4..);
        assert_eq!(
            parse_write(&raw),
            Some(WriteRequest {
                id: 9,
                handle: "17".into(),
                offset: 1 << 33,
                data: Bytes::from(vec![5; 40_000]),
            })
        );
        for cut in [0, 1, 5, 9, 11, 19, 23, raw.len() - 1] {
            assert_eq!(parse_write(&raw.slice(..cut)), None, "cut at {cut}");
        }
    }

    #[test]
    fn two_strings_parses_and_refuses_truncation() {
        let mut data = Vec::new();
        for s in ["/a", "/b c"] {
            data.extend_from_slice(&(s.len() as u32).to_be_bytes());
            data.extend_from_slice(s.as_bytes());
        }
        assert_eq!(two_strings(&data), Some(("/a".into(), "/b c".into())));
        assert_eq!(two_strings(&data[..data.len() - 1]), None);
        assert_eq!(two_strings(&[0, 0, 0]), None);
    }
}

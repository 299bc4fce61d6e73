//! The front door: SSH (russh) with public-key authentication and per-user IP allow-lists, and the
//! SFTP subsystem that lands uploads in each user's home.
//!
//! Architecture invariants: `sftp` never decides where a file is delivered (it only records a job);
//! every peer path passes through `paths::normalise` once, and storage keys are built only from its
//! output; nothing but the `sftp` subsystem is served (no shell, no exec, no forwarding).

pub mod fs;
pub mod guard;
pub mod partial;
pub mod paths;
mod proxy;
mod receipts;
mod server;
mod session;

pub use server::{FrontDoor, ssh_config};

/// The session's decoders of what a client sends, exactly as the session runs them, public only
/// for the `sftp_request` fuzz target (fuzz/fuzz_targets/sftp_request.rs); not an API.
#[doc(hidden)]
pub mod fuzzing {
    pub use super::session::{
        MAX_PACKET, Request, WriteRequest, decode_request, read_packets, two_strings,
    };
}

//! `ingestion`: a secure file-ingestion service. Suppliers upload over SFTP into a per-user home in a
//! landing bucket; every upload is recorded as a job for scanning and delivery.
//!
//! See ARCHITECTURE.md for the map of modules and the invariants they keep.

#![forbid(unsafe_code)]

pub mod admin;
pub mod audit;
pub mod cli;
pub mod config;
pub mod hostkey;
pub mod notify;
pub mod onboarding;
pub mod pipeline;
pub mod scan;
pub mod sftp;
pub mod state;
pub mod storage;
pub mod telemetry;

//! The command line: `serve`, `check` and `quickstart`.
//!
//! The only layer that uses `anyhow`: it turns every module's typed error into a message for the
//! operator. It wires modules together and holds no logic of its own beyond that.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, anyhow};
use clap::{Parser, Subcommand};
use object_store::ObjectStore;
use tokio::net::TcpListener;

use crate::audit::{Audit, Event, Subject};
use crate::config::{Config, Users};
use crate::hostkey;
use crate::sftp::{FrontDoor, ssh_config};
use crate::state::State;
use crate::storage::Bucket;

#[derive(Debug, Parser)]
#[command(name = "ingestion", version, about = "Secure file ingestion over SFTP")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Log filter (tracing syntax), e.g. `info` or `ingestion=debug`.
    #[arg(long, global = true, env = "INGESTION_LOG", default_value = "info")]
    pub log: String,
    /// Write logs as JSON lines instead of text.
    #[arg(long, global = true)]
    pub log_json: bool,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the service.
    Serve {
        /// The configuration file.
        #[arg(long, short, default_value = "ingestion.toml")]
        config: PathBuf,
    },
    /// Validate the configuration and every user file, then exit.
    Check {
        /// The configuration file.
        #[arg(long, short, default_value = "ingestion.toml")]
        config: PathBuf,
    },
    /// Create a ready-to-run local setup (folders as buckets, a demo user with a fresh key) and run it.
    Quickstart {
        /// Where to put the setup; reused if it exists.
        #[arg(long, default_value = "ingestion-quickstart")]
        dir: PathBuf,
        /// Port to listen on (loopback only).
        #[arg(long, default_value_t = 2222)]
        port: u16,
    },
}

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve { config } => serve(&config).await,
        Command::Check { config } => check(&config),
        Command::Quickstart { dir, port } => quickstart(&dir, port).await,
    }
}

fn load(config: &Path) -> anyhow::Result<(Config, Users)> {
    Config::load(config).map_err(|problems| anyhow!("{problems}"))
}

fn check(config: &Path) -> anyhow::Result<()> {
    let (config, users) = load(config)?;
    println!(
        "{}: valid ({} user{})",
        config.file.display(),
        users.len(),
        if users.len() == 1 { "" } else { "s" }
    );
    Ok(())
}

/// Starts the service. Everything is checked before the port is opened, so a bad configuration or an
/// unreachable bucket stops the start with a message instead of half-starting.
pub async fn serve(config_path: &Path) -> anyhow::Result<()> {
    let (config, users) = load(config_path)?;
    if users.is_empty() {
        tracing::warn!(dir = %config.users_dir.display(), "no users are configured: nobody can log in");
    }
    let host_key = hostkey::load_or_generate(&config.server.host_key_dir)?;
    let fingerprint = hostkey::fingerprint(&host_key);
    let audit = Arc::new(Audit::open(&config.server.audit_log)?);
    let state = State::open(&config.state.database).await?;
    let landing = open_bucket("landing", &config.buckets.landing).await?;
    open_bucket("quarantine", &config.buckets.quarantine).await?;
    let listener = TcpListener::bind(config.server.listen)
        .await
        .with_context(|| format!("cannot listen on {} (server.listen)", config.server.listen))?;
    let listen = listener.local_addr()?;
    audit.record(
        &Subject::default(),
        Event::ServiceStarted {
            listen: listen.to_string(),
            host_key_fingerprint: fingerprint.clone(),
            users: users.len(),
        },
    );
    tracing::info!(%listen, host_key = %fingerprint, users = users.len(), "ingestion is listening");
    let door = Arc::new(FrontDoor::new(
        users,
        landing,
        state,
        audit,
        config.server.max_file_size,
        ssh_config(host_key),
    ));
    tokio::select! {
        result = door.run(listener) => result.context("the SFTP listener failed"),
        () = shutdown_signal() => {
            tracing::info!("shutting down");
            Ok(())
        }
    }
}

/// Opens a bucket and checks it answers, so that a wrong bucket name or credentials stop the start.
async fn open_bucket(role: &str, location: &crate::storage::Location) -> anyhow::Result<Bucket> {
    let bucket = Bucket::open(location)
        .with_context(|| format!("cannot open the {role} bucket {location}"))?;
    bucket
        .store()
        .list_with_delimiter(None)
        .await
        .with_context(|| format!("the {role} bucket {location} does not answer; check its name and the AWS_* settings"))?;
    Ok(bucket)
}

async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut terminate) => {
            tokio::select! {
                _ = interrupt => {}
                _ = terminate.recv() => {}
            }
        }
        Err(_) => {
            let _ = interrupt.await;
        }
    }
}

/// Writes a local setup (unless it exists) and serves it.
async fn quickstart(dir: &Path, port: u16) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir.join("users"))
        .with_context(|| format!("cannot create {}", dir.display()))?;
    let config_path = dir.join("ingestion.toml");
    if !config_path.exists() {
        std::fs::write(
            &config_path,
            format!(
                "# Written by `ingestion quickstart`: local folders as buckets, SQLite state.\n\
                 [server]\nlisten = \"127.0.0.1:{port}\"\nhost_key_dir = \"state/host_keys\"\n\
                 max_file_size = \"5 GiB\"\naudit_log = \"state/audit.jsonl\"\n\n\
                 [buckets]\nlanding = \"buckets/landing\"\nquarantine = \"buckets/quarantine\"\n\n\
                 [state]\ndatabase = \"sqlite://state/ingestion.db\"\n\n[users]\ndir = \"users\"\n"
            ),
        )?;
    }
    let key_path = dir.join("demo_key");
    if !key_path.exists() {
        let key = hostkey::generate_ed25519()?;
        hostkey::write_private_key(&key_path, &key)?;
        let public = key.public_key().to_openssh().map_err(|e| anyhow!("{e}"))?;
        std::fs::write(
            dir.join("users/demo.toml"),
            format!(
                "username = \"demo\"\nname = \"Demo Supplier\"\nemail = \"demo.supplier@example.org\"\n\
                 ssh_keys = [\"{public} demo@quickstart\"]\nallowed_ips = [\"127.0.0.1/32\", \"::1/128\"]\n\
                 destination = \"buckets/delivered/demo\"\n"
            ),
        )?;
    }
    let (config, _) = load(&config_path)?;
    let host_key = hostkey::load_or_generate(&config.server.host_key_dir)?;
    let host_public = host_key
        .public_key()
        .to_openssh()
        .map_err(|e| anyhow!("{e}"))?;
    let listen = config.server.listen;
    let known_hosts = dir.join("known_hosts");
    std::fs::write(
        &known_hosts,
        format!("[{}]:{} {host_public}\n", listen.ip(), listen.port()),
    )?;
    println!(
        "\nQuickstart ready in {dir}. Upload a file with:\n\n  sftp -P {port} -i {key} -o UserKnownHostsFile={known} demo@{ip}\n\n\
         Uploads land in {dir}/buckets/landing/demo; the audit log is {dir}/state/audit.jsonl.\n",
        dir = dir.display(),
        port = listen.port(),
        key = key_path.display(),
        known = known_hosts.display(),
        ip = listen.ip(),
    );
    serve(&config_path).await
}

//! The command line: `serve`, `check`, `quickstart` and `transfers`.
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
use crate::config::{self, Config, SharedUsers, Users};
use crate::hostkey;
use crate::pipeline::Pipeline;
use crate::scan::{Builtin, Clamd, Scanner};
use crate::sftp::{FrontDoor, ssh_config};
use crate::state::{Job, JobFilter, JobState, State};
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
    /// See and retry transfers (jobs).
    Transfers {
        /// The configuration file.
        #[arg(long, short, default_value = "ingestion.toml", global = true)]
        config: PathBuf,
        #[command(subcommand)]
        command: TransfersCommand,
    },
}

#[derive(Debug, Subcommand)]
pub enum TransfersCommand {
    /// List transfers, newest first.
    List {
        /// Only this user's transfers.
        #[arg(long)]
        user: Option<String>,
        /// Only transfers in this state (landed, clean, infected, unscannable, delivered, quarantined,
        /// failed, superseded, removed).
        #[arg(long, value_parser = parse_state)]
        state: Option<JobState>,
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
    /// Show everything known of one transfer.
    Show { id: i64 },
    /// Try a failed (or waiting) transfer again now; it resumes from its recorded verdict.
    Retry { id: i64 },
}

fn parse_state(text: &str) -> Result<JobState, String> {
    JobState::parse(text).ok_or_else(|| {
        let names: Vec<&str> = JobState::ALL.iter().map(|state| state.as_str()).collect();
        format!("`{text}` is not a state; use one of {}", names.join(", "))
    })
}

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve { config } => serve(&config).await,
        Command::Check { config } => check(&config),
        Command::Quickstart { dir, port } => quickstart(&dir, port).await,
        Command::Transfers { config, command } => transfers(&config, command).await,
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
    let quarantine = open_bucket("quarantine", &config.buckets.quarantine).await?;
    let scanner = scanner(&config.scanner).await;
    let users = Arc::new(SharedUsers::new(users));
    let landed = Arc::new(tokio::sync::Notify::new());
    let pipeline = Arc::new(Pipeline::new(
        state.clone(),
        landing.clone(),
        quarantine,
        users.clone(),
        scanner,
        audit.clone(),
        config.pipeline.clone(),
        landed.clone(),
    ));
    let adopted = pipeline
        .reconcile()
        .await
        .context("cannot reconcile landing with the jobs")?;
    if adopted > 0 {
        tracing::warn!(
            adopted,
            "files in landing had no job (a crash before recording?); they were given one"
        );
    }
    let listener = TcpListener::bind(config.server.listen)
        .await
        .with_context(|| format!("cannot listen on {} (server.listen)", config.server.listen))?;
    let listen = listener.local_addr()?;
    audit.record(
        &Subject::default(),
        Event::ServiceStarted {
            listen: listen.to_string(),
            host_key_fingerprint: fingerprint.clone(),
            users: users.current().len(),
        },
    );
    tracing::info!(%listen, host_key = %fingerprint, users = users.current().len(), "ingestion is listening");
    let door = Arc::new(FrontDoor::new(
        users,
        landed,
        landing,
        state,
        audit,
        config.server.max_file_size,
        ssh_config(host_key),
    ));
    let pipeline = tokio::spawn(pipeline.run());
    tokio::select! {
        result = door.run(listener) => result.context("the SFTP listener failed"),
        _ = pipeline => Err(anyhow!("the pipeline stopped")),
        () = shutdown_signal() => {
            tracing::info!("shutting down");
            Ok(())
        }
    }
}

/// Builds the scanner; an unreachable clamd is reported but does not stop the start: files wait in
/// landing (never delivered unscanned) until it answers.
async fn scanner(settings: &config::Scanner) -> Scanner {
    match settings {
        config::Scanner::Clamd { address, timeout } => {
            let clamd = Clamd::new(address.clone(), *timeout);
            match clamd.ping().await {
                Ok(()) => tracing::info!(%address, "clamd answers"),
                Err(error) => tracing::error!(
                    %address, %error,
                    "clamd does not answer: uploads are accepted but stay in landing until it does"
                ),
            }
            Scanner::Clamd(clamd)
        }
        config::Scanner::Builtin { blocklist } => {
            tracing::warn!(
                "scanner.engine = \"builtin\" only detects the EICAR test file and the configured \
                 blocklist: it is NOT an antivirus; use clamd in production"
            );
            Scanner::Builtin(Builtin::new(blocklist.clone()))
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
    let debian_clamd = Path::new("/run/clamav/clamd.ctl");
    let scanner = if debian_clamd.exists() {
        "[scanner]\nengine = \"clamd\"\nclamd = \"unix:///run/clamav/clamd.ctl\"\n".to_string()
    } else {
        "# clamd was not found at /run/clamav/clamd.ctl: the builtin engine only knows the EICAR test\n\
         # file and is NOT an antivirus. Install clamav-daemon and switch to engine = \"clamd\".\n\
         [scanner]\nengine = \"builtin\"\n"
            .to_string()
    };
    if !config_path.exists() {
        std::fs::write(
            &config_path,
            format!(
                "# Written by `ingestion quickstart`: local folders as buckets, SQLite state.\n\
                 [server]\nlisten = \"127.0.0.1:{port}\"\nhost_key_dir = \"state/host_keys\"\n\
                 max_file_size = \"5 GiB\"\naudit_log = \"state/audit.jsonl\"\n\n\
                 [buckets]\nlanding = \"buckets/landing\"\nquarantine = \"buckets/quarantine\"\n\n\
                 [state]\ndatabase = \"sqlite://state/ingestion.db\"\n\n[users]\ndir = \"users\"\n\n{scanner}"
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
         Clean files are delivered to {dir}/buckets/delivered/demo, infected ones to {dir}/buckets/quarantine;\n\
         `ingestion transfers list --config {dir}/ingestion.toml` shows each transfer; the audit log is \
         {dir}/state/audit.jsonl.\n",
        dir = dir.display(),
        port = listen.port(),
        key = key_path.display(),
        known = known_hosts.display(),
        ip = listen.ip(),
    );
    serve(&config_path).await
}

async fn transfers(config_path: &Path, command: TransfersCommand) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(config_path)
        .with_context(|| format!("cannot read {}", config_path.display()))?;
    let config = Config::parse(config_path, &text).map_err(|problems| anyhow!("{problems}"))?;
    let state = State::open(&config.state.database).await?;
    match command {
        TransfersCommand::List {
            user,
            state: wanted,
            limit,
        } => {
            let filter = JobFilter {
                username: user,
                state: wanted,
                limit: Some(limit),
            };
            let jobs = state.jobs(&filter).await?;
            println!(
                "{:>6}  {:<11}  {:<16}  {:>12}  {:<24}  PATH",
                "ID", "STATE", "USER", "BYTES", "RECEIVED"
            );
            for job in &jobs {
                println!(
                    "{:>6}  {:<11}  {:<16}  {:>12}  {:<24}  /{}",
                    job.id, job.state, job.username, job.size, job.received_at, job.path
                );
            }
            if jobs.is_empty() {
                println!("(no transfers)");
            }
        }
        TransfersCommand::Show { id } => {
            let job = state.job(id).await?.ok_or_else(|| {
                anyhow!("there is no transfer {id}; see `ingestion transfers list`")
            })?;
            print!("{}", describe(&job));
        }
        TransfersCommand::Retry { id } => {
            if !state.retry(id).await? {
                let known = state.job(id).await?;
                return Err(match known {
                    None => anyhow!("there is no transfer {id}"),
                    Some(job) => anyhow!(
                        "transfer {id} is {}; only failed or waiting transfers can be retried",
                        job.state
                    ),
                });
            }
            let audit = Audit::open(&config.server.audit_log)?;
            audit.record(&Subject::default(), Event::JobRetryRequested { job: id });
            println!("transfer {id} will be tried again by the running service");
        }
    }
    Ok(())
}

fn describe(job: &Job) -> String {
    let verdict = job.verdict.as_ref().map_or_else(
        || "-".to_string(),
        |verdict| match verdict.detail() {
            Some(detail) => format!("{} ({detail})", verdict.state()),
            None => verdict.state().to_string(),
        },
    );
    let optional = |value: &Option<String>| value.clone().unwrap_or_else(|| "-".into());
    let lines = [
        ("id", job.id.to_string()),
        ("user", job.username.clone()),
        ("path", format!("/{}", job.path)),
        ("bytes", job.size.to_string()),
        ("sha256", job.sha256.clone()),
        ("state", job.state.to_string()),
        ("verdict", verdict),
        ("engine", optional(&job.engine)),
        ("received", job.received_at.clone()),
        ("scanned", optional(&job.scanned_at)),
        (
            "scan time",
            job.scan_ms
                .map_or_else(|| "-".into(), |ms| format!("{ms} ms")),
        ),
        ("routed to", optional(&job.routed_to)),
        ("finished", optional(&job.finished_at)),
        ("attempts", job.attempts.to_string()),
        ("last error", optional(&job.last_error)),
        ("session", job.session.clone()),
    ];
    lines
        .iter()
        .map(|(name, value)| format!("{name:>10}: {value}\n"))
        .collect()
}

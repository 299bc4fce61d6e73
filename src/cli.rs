//! The command line: `serve`, `check`, `quickstart`, `transfers`, `user`, `policy` and `reload`.
//!
//! The only layer that uses `anyhow`: it turns every module's typed error into a message for the
//! operator. It wires modules together and holds no logic of its own beyond that.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, anyhow};
use clap::{Parser, Subcommand};
use tokio::net::TcpListener;

use crate::audit::{Audit, Event, Subject};
use crate::config::{self, Config, SharedUsers, Users};
use crate::hostkey;
use crate::notify::Notifier;
use crate::onboarding::{self, Environment, NewUser};
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

// Parsed once at start: the size of the enum does not matter.
#[allow(clippy::large_enum_variant)]
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
        /// Port to listen on for SFTP (loopback only).
        #[arg(long, default_value_t = 2222)]
        port: u16,
        /// Port of the dashboard, metrics and health checks (loopback only).
        #[arg(long, default_value_t = 9090)]
        admin_port: u16,
    },
    /// Onboard, list, show and remove supplier accounts.
    User {
        /// The configuration file.
        #[arg(long, short, default_value = "ingestion.toml", global = true)]
        config: PathBuf,
        #[command(subcommand)]
        command: UserCommand,
    },
    /// Print the policy statements a team adds to its destination bucket or KMS key.
    Policy {
        /// The configuration file ([onboarding] account ids); the guide's values if absent.
        #[arg(long, short, global = true)]
        config: Option<PathBuf>,
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// Make the running service read the users again (sends SIGHUP to the pid in server.pid_file).
    Reload {
        /// The configuration file.
        #[arg(long, short, default_value = "ingestion.toml")]
        config: PathBuf,
    },
    /// Alerts: send a test alert to each of a user's targets.
    Notify {
        /// The configuration file.
        #[arg(long, short, default_value = "ingestion.toml", global = true)]
        config: PathBuf,
        #[command(subcommand)]
        command: NotifyCommand,
    },
    /// Check or export the audit trail.
    Audit {
        /// The configuration file.
        #[arg(long, short, default_value = "ingestion.toml", global = true)]
        config: PathBuf,
        #[command(subcommand)]
        command: AuditCommand,
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
        /// Only transfers in this state (held, landed, clean, infected, unscannable, delivered,
        /// quarantined, failed, superseded, removed), or `partial` for interrupted uploads waiting
        /// for a resume.
        #[arg(long, value_parser = parse_state)]
        state: Option<Listed>,
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
    /// Show everything known of one transfer.
    Show { id: i64 },
    /// Try a failed (or waiting) transfer again now; it resumes from its recorded verdict.
    Retry { id: i64 },
}

// Parsed once at start: the size of the enum does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum UserCommand {
    /// Write users/<username>.toml from an onboarding request, after every check, and print what to do next.
    Add {
        #[command(flatten)]
        request: NewUser,
        /// Which service account the printed policy statements name.
        #[arg(long = "env", value_enum, default_value = "production")]
        environment: Environment,
    },
    /// A table of every user.
    List,
    /// Everything about one user.
    Show { username: String },
    /// Delete a user's file (run `ingestion reload` to apply it to the running service).
    Remove { username: String },
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Check the hash chain: exits non-zero naming the first edited, removed or reordered line.
    Verify,
    /// Print the lines from a time on (RFC 3339, e.g. 2026-12-04T00:00:00Z), for a SIEM.
    Export {
        #[arg(long)]
        since: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum NotifyCommand {
    /// Send a test alert to each of the user's targets now and report each result.
    Test {
        #[arg(long)]
        user: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// The destination bucket policy statement.
    Bucket {
        #[arg(long)]
        bucket: String,
        #[arg(long = "env", value_enum)]
        environment: Environment,
        /// Print a whole policy document instead of the statement.
        #[arg(long)]
        document: bool,
    },
    /// The KMS key policy statement.
    Kms {
        #[arg(long = "env", value_enum)]
        environment: Environment,
        /// Print a whole policy document instead of the statement.
        #[arg(long)]
        document: bool,
    },
}

/// What `transfers list --state` selects: jobs in one state, or interrupted uploads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listed {
    Job(JobState),
    Partial,
}

fn parse_state(text: &str) -> Result<Listed, String> {
    if text == "partial" {
        return Ok(Listed::Partial);
    }
    JobState::parse(text).map(Listed::Job).ok_or_else(|| {
        let names: Vec<&str> = JobState::ALL.iter().map(|state| state.as_str()).collect();
        format!(
            "`{text}` is not a state; use one of {}, or partial",
            names.join(", ")
        )
    })
}

/// Lists interrupted uploads: owner, bytes stored, age (since the upload started) and time since
/// the last write (what `server.partial_retention` counts).
async fn list_partials(state: &State, user: Option<&str>, limit: u32) -> anyhow::Result<()> {
    let partials = state.partials(user).await?;
    println!(
        "{:>6}  {:<16}  {:>12}  {:>10}  {:>10}  {:<24}  PATH",
        "ID", "USER", "BYTES", "AGE", "IDLE", "STARTED"
    );
    let now = std::time::SystemTime::now();
    let since = |then: std::time::SystemTime| {
        // Whole seconds: milliseconds would only make the column wider.
        let elapsed = now.duration_since(then).unwrap_or_default().as_secs();
        humantime::format_duration(std::time::Duration::from_secs(elapsed)).to_string()
    };
    for partial in partials.iter().take(limit as usize) {
        let last_write = std::time::UNIX_EPOCH
            + std::time::Duration::from_millis(u64::try_from(partial.updated_ms).unwrap_or(0));
        let age =
            humantime::parse_rfc3339(&partial.started_at).map_or_else(|_| "?".to_string(), since);
        println!(
            "{:>6}  {:<16}  {:>12}  {:>10}  {:>10}  {:<24}  /{}",
            partial.id,
            partial.username,
            partial.size,
            age,
            since(last_write),
            partial.started_at,
            partial.path
        );
    }
    if partials.is_empty() {
        println!("(no interrupted uploads)");
    }
    Ok(())
}

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve { config } => serve(&config).await,
        Command::Check { config } => check(&config),
        Command::Quickstart {
            dir,
            port,
            admin_port,
        } => quickstart(&dir, port, admin_port).await,
        Command::Transfers { config, command } => transfers(&config, command).await,
        Command::User { config, command } => user(&config, command).await,
        Command::Policy { config, command } => policy(config.as_deref(), command),
        Command::Reload { config } => reload(&config),
        Command::Notify { config, command } => notify(&config, command).await,
        Command::Audit { config, command } => audit(&config, command),
    }
}

/// The configuration file alone (see `Config::read`).
fn read_config(config: &Path) -> anyhow::Result<Config> {
    Config::read(config).map_err(|problems| anyhow!("{problems}"))
}

fn load(config: &Path) -> anyhow::Result<(Config, Users)> {
    Config::load(config).map_err(|problems| anyhow!("{problems}"))
}

fn check(config: &Path) -> anyhow::Result<()> {
    let (config, users) = load(config)?;
    for user in users.iter() {
        for warning in config::warnings(user) {
            println!("warning: {warning}");
        }
    }
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
    let metrics = crate::telemetry::install()?;
    let admin_token = admin_token(&config.admin)?;
    let host_key = hostkey::load_or_generate(&config.server.host_key_dir)?;
    let fingerprint = hostkey::fingerprint(&host_key);
    let audit = Arc::new(Audit::open(&config.server.audit_log)?);
    let state = State::open(&config.state.database).await?;
    audit.copy_to_database(state.clone());
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
        scanner.clone(),
        audit.clone(),
        config.pipeline.clone(),
        landed.clone(),
        config.notify.operators.clone(),
        config.server.temporary_names.clone(),
        config.on_conflict,
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
    let admin_listener = match config.admin.listen {
        Some(address) => Some(TcpListener::bind(address).await.with_context(|| {
            format!("cannot listen on {address} (admin.listen); pick another port, or write listen = \"off\"")
        })?),
        None => None,
    };
    let admin_address = admin_listener
        .as_ref()
        .map(TcpListener::local_addr)
        .transpose()?;
    audit.record(
        &Subject::default(),
        Event::ServiceStarted {
            listen: listen.to_string(),
            host_key_fingerprint: fingerprint.clone(),
            users: users.current().len(),
            admin: admin_address.map(|address| address.to_string()),
        },
    );
    tracing::info!(%listen, host_key = %fingerprint, users = users.current().len(), "ingestion is listening");
    let users_handle = users.clone();
    let audit_handle = audit.clone();
    let notifier = Arc::new(Notifier::new(
        state.clone(),
        config.notify.clone(),
        users.clone(),
        audit.clone(),
    ));
    let notifier_task = tokio::spawn(notifier.clone().run());
    tokio::spawn(crate::audit::trim_database_copy(
        state.clone(),
        config.admin.audit_retention,
    ));
    tokio::spawn(crate::sftp::partial::expire_partials(
        state.clone(),
        landing.clone(),
        config.server.partial_retention,
        audit.clone(),
    ));
    let (stop_state, stop_audit) = (state.clone(), audit.clone());
    let guard = crate::sftp::guard::Guard::new(config.limits.clone());
    let admin = crate::admin::Admin::new(crate::admin::Parts {
        state: state.clone(),
        landing: landing.clone(),
        scanner: scanner.clone(),
        notify: config.notify.clone(),
        guard: guard.clone(),
        users: users.clone(),
        audit: audit.clone(),
        metrics,
        token: admin_token,
    });
    if let Some(listener) = admin_listener {
        tokio::spawn(admin.clone().serve(listener));
    }
    let door = Arc::new(FrontDoor::new(
        guard,
        users,
        config.server.temporary_names.clone(),
        config.notify.operators.clone(),
        landed,
        landing,
        state,
        audit,
        config.server.max_file_size,
        config.receipts,
        ssh_config(host_key, config.server.algorithms),
        config.server.proxy_protocol_from.clone(),
    ));
    let mut pipeline_task = tokio::spawn(pipeline.clone().run());
    // Listen for SIGHUP before publishing the pid, so an early `ingestion reload` cannot kill us.
    let hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .context("cannot listen for SIGHUP")?;
    tokio::spawn(reload_on_hangup(
        hangups,
        config_path.to_path_buf(),
        users_handle,
        audit_handle,
    ));
    let _pid_file = PidFile::write(&config.server.pid_file)?;
    tokio::select! {
        () = door.clone().run(listener, shutdown_signal()) => {}
        _ = &mut pipeline_task => return Err(anyhow!("the pipeline stopped")),
    }
    // SIGTERM or SIGINT: no new logins; uploads under way may finish within the drain time.
    let drain = config.server.drain_time;
    tracing::info!(drain = %humantime::format_duration(drain), "shutting down: draining connections");
    admin.stopping();
    stop_audit.record(
        &Subject::default(),
        Event::ServiceStopping {
            drain: humantime::format_duration(drain).to_string(),
        },
    );
    let cut = door.drain(drain).await;
    // Jobs and alerts this process was working on go back to the other nodes (or the next start)
    // at once, instead of after their leases expire. Every step checks its lease, so a step cut
    // short here changes nothing.
    pipeline_task.abort();
    notifier_task.abort();
    let released = stop_state
        .release_leases(&[pipeline.node(), notifier.owner()])
        .await
        .unwrap_or_else(|error| {
            tracing::warn!(%error, "cannot release this node's leases; they expire by themselves");
            0
        });
    stop_audit.record(
        &Subject::default(),
        Event::ServiceStopped {
            connections_cut: cut,
            leases_released: released,
        },
    );
    tracing::info!(connections_cut = cut, leases_released = released, "stopped");
    stop_audit.finish_copying(Duration::from_secs(5)).await;
    Ok(())
}

/// The admin token's value, read once from the environment variable `[admin] token_env` names.
fn admin_token(settings: &config::Admin) -> anyhow::Result<Option<String>> {
    let Some(secret) = &settings.token else {
        return Ok(None);
    };
    let token = secret.read().map_err(|error| {
        anyhow!("[admin] token: {error}; provide it, or remove the token setting")
    })?;
    if token.chars().count() < crate::admin::MIN_TOKEN_LENGTH {
        return Err(anyhow!(
            "[admin] token: the token in {} is shorter than {} characters; use a long random one \
             (e.g. `openssl rand -hex 32`)",
            secret.describe(),
            crate::admin::MIN_TOKEN_LENGTH
        ));
    }
    Ok(Some(token))
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
    bucket.reachable().await.with_context(|| {
        format!(
            "the {role} bucket {location} does not answer; check its name and the AWS_* settings"
        )
    })?;
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

/// Refuses a port something else already listens on, before a new quickstart folder is written,
/// naming the option that picks another (9090 is Prometheus's default port, for one).
fn quickstart_port_free(port: u16, what: &str, option: &str) -> anyhow::Result<()> {
    std::net::TcpListener::bind(("127.0.0.1", port))
        .map(drop)
        .map_err(|error| {
            anyhow!(
                "port {port} ({what}) cannot be used: {error}; pick another with \
                 `ingestion quickstart {option} PORT`"
            )
        })
}

/// Whether a clamd answers on Debian's socket (a socket file alone may be stale).
async fn quickstart_clamd_answers() -> bool {
    if !Path::new(crate::scan::clamd::DEBIAN_SOCKET).exists() {
        return false;
    }
    let clamd = Clamd::new(crate::scan::ClamdAddress::debian(), Duration::from_secs(5));
    matches!(
        tokio::time::timeout(Duration::from_secs(5), clamd.ping()).await,
        Ok(Ok(()))
    )
}

/// Writes a local setup (unless it exists) and serves it.
async fn quickstart(dir: &Path, port: u16, admin_port: u16) -> anyhow::Result<()> {
    let config_path = dir.join("ingestion.toml");
    if !config_path.exists() {
        quickstart_port_free(port, "SFTP", "--port")?;
        quickstart_port_free(admin_port, "the dashboard", "--admin-port")?;
    }
    std::fs::create_dir_all(dir.join("users"))
        .with_context(|| format!("cannot create {}", dir.display()))?;
    if !config_path.exists() {
        let scanner = if quickstart_clamd_answers().await {
            format!(
                "[scanner]\nengine = \"clamd\"\nclamd = \"unix://{}\"\n",
                crate::scan::clamd::DEBIAN_SOCKET
            )
        } else {
            "# No clamd answered at /run/clamav/clamd.ctl: the builtin engine only knows the EICAR test\n\
             # file and is NOT an antivirus. Install clamav-daemon and switch to engine = \"clamd\".\n\
             [scanner]\nengine = \"builtin\"\n"
                .to_string()
        };
        std::fs::write(
            &config_path,
            format!(
                "# Written by `ingestion quickstart`: local folders as buckets, SQLite state.\n\
                 [server]\nlisten = \"127.0.0.1:{port}\"\nhost_key_dir = \"state/host_keys\"\n\
                 max_file_size = \"5 GiB\"\naudit_log = \"state/audit.jsonl\"\n\n\
                 [buckets]\nlanding = \"buckets/landing\"\nquarantine = \"buckets/quarantine\"\n\n\
                 [state]\ndatabase = \"sqlite://state/ingestion.db\"\n\n[users]\ndir = \"users\"\n\n\
                 [admin]\nlisten = \"127.0.0.1:{admin_port}\"\ntoken_file = \"state/admin_token\"\n\n{scanner}"
            ),
        )?;
    }
    // The token of the dashboard this quickstart's configuration names (an older quickstart
    // folder keeps its configuration, and its closed dashboard).
    let token_path = dir.join("state/admin_token");
    if !token_path.exists() && std::fs::read_to_string(&config_path)?.contains("state/admin_token")
    {
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        std::fs::create_dir_all(dir.join("state"))?;
        let token = crate::storage::hex(&rand::random::<[u8; 32]>());
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&token_path)?
            .write_all(format!("{token}\n").as_bytes())?;
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
         {dir}/state/audit.jsonl.\n\
         {dashboard}",
        dashboard = match config.admin.listen {
            Some(admin) => format!(
                "The status dashboard is at http://{admin}/ (sign in with the token in {dir}/state/admin_token);\n\
                 metrics at http://{admin}/metrics, readiness at http://{admin}/readyz.\n",
                dir = dir.display()
            ),
            None => "The dashboard is off in this configuration ([admin] listen).\n".to_string(),
        },
        dir = dir.display(),
        port = listen.port(),
        key = key_path.display(),
        known = known_hosts.display(),
        ip = listen.ip(),
    );
    serve(&config_path).await
}

async fn transfers(config_path: &Path, command: TransfersCommand) -> anyhow::Result<()> {
    let config = read_config(config_path)?;
    let state = State::open(&config.state.database).await?;
    match command {
        TransfersCommand::List {
            user,
            state: Some(Listed::Partial),
            limit,
        } => list_partials(&state, user.as_deref(), limit).await?,
        TransfersCommand::List {
            user,
            state: wanted,
            limit,
        } => {
            let filter = JobFilter {
                username: user,
                state: wanted.and_then(|wanted| match wanted {
                    Listed::Job(state) => Some(state),
                    Listed::Partial => None,
                }),
                limit: Some(limit),
                ..JobFilter::default()
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
            audit
                .record_from_cli(
                    &config.state.database,
                    &Subject::default(),
                    Event::JobRetryRequested { job: id },
                )
                .await;
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

/// The pid file of a running `serve`, removed when it stops.
struct PidFile(PathBuf);

impl PidFile {
    fn write(path: &Path) -> anyhow::Result<PidFile> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(path, format!("{}\n", std::process::id())).with_context(|| {
            format!(
                "cannot write the pid file {} (server.pid_file)",
                path.display()
            )
        })?;
        Ok(PidFile(path.to_path_buf()))
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// On SIGHUP, reads the configuration and users again and swaps the users in whole; an invalid
/// configuration is rejected whole (the previous users stay), logged and audited.
async fn reload_on_hangup(
    mut hangups: tokio::signal::unix::Signal,
    config_path: PathBuf,
    users: Arc<SharedUsers>,
    audit: Arc<Audit>,
) {
    while hangups.recv().await.is_some() {
        match Config::load(&config_path) {
            Ok((_, loaded)) => {
                let count = loaded.len();
                users.replace(loaded);
                tracing::info!(users = count, "users reloaded");
                audit.record(&Subject::default(), Event::UsersReloaded { users: count });
            }
            Err(problems) => {
                let error = problems.to_string();
                tracing::error!("reload rejected, the previous users stay in force: {error}");
                audit.record(&Subject::default(), Event::ReloadRejected { error });
            }
        }
    }
}

fn reload(config_path: &Path) -> anyhow::Result<()> {
    let (config, users) = load(config_path)?;
    let text = std::fs::read_to_string(&config.server.pid_file).with_context(|| {
        format!(
            "cannot read {}: is the service running with this configuration?",
            config.server.pid_file.display()
        )
    })?;
    let pid: i32 = text.trim().parse().map_err(|_| {
        anyhow!(
            "{} does not hold a process id",
            config.server.pid_file.display()
        )
    })?;
    // A stale pid file (after a crash) may name an unrelated process, which SIGHUP would kill:
    // signal only a process running this program with `serve`.
    let command_line = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let arguments: Vec<&[u8]> = command_line.split(|&b| b == 0).collect();
    let ours = arguments
        .first()
        .is_some_and(|program| program.ends_with(b"ingestion"))
        && arguments
            .iter()
            .any(|argument| *argument == b"serve" || *argument == b"quickstart");
    if !ours {
        return Err(anyhow!(
            "process {pid} (from {}) is not a running `ingestion serve`; the service is not running \
             or the pid file is stale",
            config.server.pid_file.display()
        ));
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGHUP,
    )
    .with_context(|| format!("cannot signal process {pid} (is the service still running?)"))?;
    println!(
        "asked the service (pid {pid}) to reload: {} user(s) configured",
        users.len()
    );
    Ok(())
}

async fn user(config_path: &Path, command: UserCommand) -> anyhow::Result<()> {
    if let UserCommand::Remove { username } = &command {
        // Works even when some user file is broken, so a bad file can always be removed.
        let config = read_config(config_path)?;
        config::check_username(username).map_err(|message| anyhow!(message))?;
        let file = config.users_dir.join(format!("{username}.toml"));
        if !file.exists() {
            return Err(anyhow!(
                "there is no user `{username}` ({} does not exist)",
                file.display()
            ));
        }
        std::fs::remove_file(&file).with_context(|| format!("cannot remove {}", file.display()))?;
        let audit = Audit::open(&config.server.audit_log)?;
        audit
            .record_from_cli(
                &config.state.database,
                &Subject::default(),
                Event::UserRemoved {
                    username: username.clone(),
                },
            )
            .await;
        println!(
            "removed {}; run `ingestion reload --config {}` so that the running service refuses new logins",
            file.display(),
            config.file.display()
        );
        return Ok(());
    }
    let (config, users) = load(config_path)?;
    match command {
        UserCommand::Add {
            request,
            environment,
        } => {
            let added = onboarding::add_user(&config, &users, &request)
                .map_err(|error| anyhow!("{error}"))?;
            for warning in &added.warnings {
                println!("warning: {warning}");
            }
            let audit = Audit::open(&config.server.audit_log)?;
            audit
                .record_from_cli(
                    &config.state.database,
                    &Subject::default(),
                    Event::UserAdded {
                        username: added.user.username.clone(),
                        key_fingerprints: onboarding::fingerprints(&added.user),
                    },
                )
                .await;
            print!(
                "{}",
                next_steps(&config, &added.user, environment, &added.file)?
            );
        }
        UserCommand::List => {
            println!(
                "{:<20}  {:<32}  {:<8}  {:<36}  {:<36}  KEYS",
                "USERNAME", "CONTACT", "EGRESS", "IPS", "DESTINATION"
            );
            for user in users.iter() {
                let ips: Vec<String> = user.allowed_ips.iter().map(ToString::to_string).collect();
                println!(
                    "{:<20}  {:<32}  {:<8}  {:<36}  {:<36}  {}",
                    user.username,
                    format!("{} <{}>", user.name, user.email),
                    if user.egress.is_some() { "yes" } else { "no" },
                    ips.join(","),
                    user.destination.to_string(),
                    onboarding::fingerprints(user).join(",")
                );
            }
        }
        UserCommand::Show { username } => {
            let user = users.get(&username).ok_or_else(|| {
                anyhow!("there is no user `{username}`; see `ingestion user list`")
            })?;
            println!("username: {}", user.username);
            println!("contact: {} <{}>", user.name, user.email);
            println!("file: {}", user.file.display());
            for key in &user.ssh_keys {
                println!(
                    "key: {} {}",
                    key.algorithm().as_str(),
                    key.fingerprint(russh::keys::HashAlg::Sha256)
                );
            }
            for net in &user.allowed_ips {
                println!("allowed ip: {net}");
            }
            println!("destination: {}", user.destination);
            if let Some(kms) = &user.destination_kms_key {
                println!("destination kms key: {kms}");
            }
            if let Some(egress) = &user.egress {
                println!("egress: {}", egress.location);
            }
            for target in &user.notify {
                println!(
                    "alerts: {} [{}]",
                    target.channel.describe(),
                    target.events.join(", ")
                );
            }
            println!(
                "connect: {}",
                onboarding::connection_command(&config, &user.username)
            );
            for warning in config::warnings(&user) {
                println!("warning: {warning}");
            }
        }
        UserCommand::Remove { .. } => {}
    }
    Ok(())
}

/// What an operator does after `user add`: policies for the team, reload, the supplier's command.
fn next_steps(
    config: &Config,
    user: &crate::config::User,
    environment: Environment,
    file: &Path,
) -> anyhow::Result<String> {
    let mut out = format!("wrote {}\n\nNext steps:\n", file.display());
    let mut step = 1;
    if let Some(bucket) = onboarding::s3_bucket(&user.destination) {
        let statement = config
            .onboarding
            .bucket_statement(bucket, environment)
            .map_err(|e| anyhow!(e))?;
        out.push_str(&format!(
            "{step}. The destination bucket's owner adds this statement to the policy of {bucket}:\n{}\n",
            serde_json::to_string_pretty(&statement)?
        ));
        step += 1;
    }
    if user.destination_kms_key.is_some() {
        let statement = config.onboarding.kms_statement(environment);
        out.push_str(&format!(
            "{step}. The KMS key's owner adds this statement to the key policy:\n{}\n",
            serde_json::to_string_pretty(&statement)?
        ));
        step += 1;
    }
    out.push_str(&format!(
        "{step}. Apply it to the running service: ingestion reload --config {}\n",
        config.file.display()
    ));
    step += 1;
    out.push_str(&format!(
        "{step}. Send the supplier their connection command:\n   {}\n",
        onboarding::connection_command(config, &user.username)
    ));
    if let Ok(host_key) = hostkey::load_existing(&config.server.host_key_dir) {
        out.push_str(&format!(
            "   (the server's host key fingerprint is {})\n",
            hostkey::fingerprint(&host_key)
        ));
    }
    Ok(out)
}

fn policy(config_path: Option<&Path>, command: PolicyCommand) -> anyhow::Result<()> {
    let onboarding = match config_path {
        Some(path) => read_config(path)?.onboarding,
        None => crate::config::Onboarding::default(),
    };
    let (statement, document) = match command {
        PolicyCommand::Bucket {
            bucket,
            environment,
            document,
        } => (
            onboarding
                .bucket_statement(&bucket, environment)
                .map_err(|e| anyhow!(e))?,
            document,
        ),
        PolicyCommand::Kms {
            environment,
            document,
        } => (onboarding.kms_statement(environment), document),
    };
    let value = if document {
        onboarding::policy_document(vec![statement])
    } else {
        statement
    };
    println!("{}", serde_json::to_string_pretty(&value)?);
    Ok(())
}

async fn notify(config_path: &Path, command: NotifyCommand) -> anyhow::Result<()> {
    let (config, users) = load(config_path)?;
    match command {
        NotifyCommand::Test { user } => {
            let found = users
                .get(&user)
                .ok_or_else(|| anyhow!("there is no user `{user}`; see `ingestion user list`"))?;
            if found.notify.is_empty() {
                return Err(anyhow!(
                    "user `{user}` has no alert targets (notify_emails, notify_slack_webhook_env, notify_webhook)"
                ));
            }
            let sender = crate::notify::Sender::new(
                config.notify.smtp.as_ref(),
                config.notify.email_from.clone(),
            );
            let mut failed = 0;
            for (target, result) in crate::notify::test_targets(&sender, &found).await {
                match result {
                    Ok(()) => println!("ok      {target}"),
                    Err(error) => {
                        failed += 1;
                        println!("FAILED  {target}: {error}");
                    }
                }
            }
            if failed > 0 {
                return Err(anyhow!("{failed} target(s) did not accept the test alert"));
            }
        }
    }
    Ok(())
}

fn audit(config_path: &Path, command: AuditCommand) -> anyhow::Result<()> {
    let config = read_config(config_path)?;
    let path = &config.server.audit_log;
    match command {
        AuditCommand::Verify => match crate::audit::verify(path)
            .with_context(|| format!("cannot read {}", path.display()))?
        {
            crate::audit::Verdict::Intact { lines } => {
                println!("{}: {lines} lines, the chain is intact", path.display());
                Ok(())
            }
            crate::audit::Verdict::Broken { line, reason } => {
                Err(anyhow!("{}: line {line}: {reason}", path.display()))
            }
        },
        AuditCommand::Export { since } => {
            let since = humantime::parse_rfc3339_weak(&since)
                .map_err(|_| anyhow!("`{since}` is not a time; write e.g. 2026-12-04T00:00:00Z"))?;
            let since = humantime::format_rfc3339_millis(since).to_string();
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            for line in text.lines() {
                let time = serde_json::from_str::<serde_json::Value>(line)
                    .ok()
                    .and_then(|value| {
                        value
                            .get("time")
                            .and_then(|t| t.as_str())
                            .map(str::to_string)
                    });
                if time.is_some_and(|time| time >= since) {
                    println!("{line}");
                }
            }
            Ok(())
        }
    }
}

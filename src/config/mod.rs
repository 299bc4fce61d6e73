//! The service configuration: `ingestion.toml` plus one TOML file per user.
//!
//! Two phases, as in vector and ripgrep: serde reads raw structs (`deny_unknown_fields`, spans kept),
//! then validation turns them into the typed [`Config`] and [`Users`] or a list of every [`Problem`]
//! with file, line, field and a fix. This module reads files but never creates, opens stores or
//! listens: building running things from a `Config` is the job of `storage`, `state` and `sftp`.

mod problem;
mod user;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::pipeline::Settings as PipelineSettings;
use crate::scan::ClamdAddress;
use crate::storage::Location;
pub use problem::{FileReporter, Problem, Problems};
pub use user::{
    Channel, DEFAULT_EVENTS, Egress, NotifyTarget, Secret, SharedUsers, User, Users, canonical_ip,
    check_email, check_username, is_this_machine, parse_cidr, parse_public_keys, parse_user,
    url_allowed, warnings,
};

/// The validated service configuration.
///
/// # Defaults
/// `server.listen` 0.0.0.0:2222, `server.host_key_dir` state/host_keys, `server.max_file_size` 5 GiB,
/// `server.audit_log` state/audit.jsonl, `server.partial_retention` 24h, `server.drain_time` 30s, `state.database` sqlite://state/ingestion.db, `users.dir` users.
/// Relative paths are relative to the folder holding the configuration file.
#[derive(Debug, Clone)]
pub struct Config {
    /// The configuration file this was read from.
    pub file: PathBuf,
    pub server: Server,
    pub buckets: Buckets,
    pub state: State,
    /// The folder holding one TOML file per user.
    pub users_dir: PathBuf,
    pub scanner: Scanner,
    pub pipeline: PipelineSettings,
    pub onboarding: Onboarding,
    pub notify: Notify,
    /// Defences against what an unauthenticated peer can do.
    ///
    /// # Defaults
    /// 64 unauthenticated connections, 8 per address, 30 s to log in; an address whose connections end
    /// without a login 5 times is banned for 30 s, doubling with each further failure up to 1 h; 16
    /// sessions per user.
    pub limits: crate::sftp::guard::Limits,
    /// What happens when a routed file's name is already taken at its destination.
    pub on_conflict: OnConflict,
    pub admin: Admin,
    pub receipts: Receipts,
}

/// What suppliers' receipts show: the read-only `/.receipts` folder of their SFTP view, one text
/// per upload with when it was received, its size, SHA-256 and outcome.
///
/// # Defaults
/// No scanner signature names: a quarantined file's receipt says only whether it was infected or
/// unscannable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Receipts {
    /// A receipt of a file quarantined as infected names the signature the scanner found.
    pub show_signature: bool,
}

/// The admin plane: health checks, Prometheus metrics, the transfers API and the dashboard.
///
/// # Defaults
/// Listens on 127.0.0.1:9090. Without `token_env`, the API and the dashboard are closed (health and
/// metrics stay open); listening beyond loopback needs `token_env`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admin {
    /// Where it listens; `None` when turned off (`listen = "off"`).
    pub listen: Option<SocketAddr>,
    /// The bearer token for the API and the dashboard.
    pub token: Option<Secret>,
    /// How long audit lines copied to the state database are kept there (the file keeps them all).
    pub audit_retention: Duration,
}

/// How long copied audit lines stay in the state database unless configured.
pub const DEFAULT_AUDIT_RETENTION: Duration = Duration::from_secs(90 * 24 * 3600);

/// The admin plane's address unless configured.
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9090";

/// What happens when a file is routed to a name that already holds an object (the same name
/// uploaded twice, after the first was delivered).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnConflict {
    /// The later file replaces the earlier one (the default).
    #[default]
    Overwrite,
    /// The later file gets a free name: `report (2).csv`, `report (3).csv`, …
    Suffix,
}

/// How alerts are sent, and the operators' own targets.
///
/// # Defaults
/// No SMTP (email targets are then an error), `stuck` alerts for jobs failing for 15 minutes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notify {
    pub smtp: Option<Smtp>,
    pub email_from: Option<String>,
    pub stuck_after: Duration,
    pub operators: Vec<NotifyTarget>,
}

/// An SMTP relay: `smtp://host:587` (STARTTLS, required unless the host is this machine) or
/// `smtps://host:465` (TLS from the start), with credentials read from the environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Smtp {
    pub url: String,
    pub username: Option<Secret>,
    pub password: Option<Secret>,
}

/// What onboarding commands need: the AWS accounts and role of the service, per environment.
///
/// # Defaults
/// The accounts from the onboarding guide: production 471112983409, development 730335344807; role
/// `transfer`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Onboarding {
    pub production_account_id: String,
    pub development_account_id: String,
    pub role_name: String,
}

impl Default for Onboarding {
    fn default() -> Onboarding {
        Onboarding {
            production_account_id: "471112983409".into(),
            development_account_id: "730335344807".into(),
            role_name: "transfer".into(),
        }
    }
}

/// Which malware scanner runs.
///
/// # Defaults
/// `clamd` at `unix:///run/clamav/clamd.ctl` (Debian's socket) with a 120 s timeout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scanner {
    Clamd {
        address: ClamdAddress,
        timeout: Duration,
    },
    /// EICAR and a SHA-256 blocklist only: not an antivirus.
    Builtin { blocklist: Vec<String> },
}

/// How long a stopping server waits for uploads under way by default.
const DEFAULT_DRAIN_TIME: Duration = Duration::from_secs(30);

/// How long interrupted uploads are kept by default: a day to reconnect.
const DEFAULT_PARTIAL_RETENTION: Duration = Duration::from_secs(24 * 3600);

#[derive(Debug, Clone)]
pub struct Server {
    pub listen: SocketAddr,
    pub host_key_dir: PathBuf,
    /// Largest accepted upload in bytes, enforced while bytes arrive.
    pub max_file_size: u64,
    /// JSON-lines audit file.
    pub audit_log: PathBuf,
    /// The host name suppliers connect to, shown in their connection command.
    pub public_host: Option<String>,
    /// The port suppliers connect to, when it is not `listen`'s (a load balancer in front).
    pub public_port: Option<u16>,
    /// Where `serve` writes its process id, for `ingestion reload`.
    pub pid_file: PathBuf,
    /// Names clients upload to before renaming (WinSCP's `*.filepart`, …).
    pub temporary_names: TemporaryNames,
    pub algorithms: Algorithms,
    /// How long an interrupted upload is kept for its owner to resume it.
    pub partial_retention: Duration,
    /// On SIGTERM, how long open connections may go on before the process exits.
    pub drain_time: Duration,
    /// Load balancers that send a PROXY protocol header with the client's address.
    pub proxy_protocol_from: Vec<ipnet::IpNet>,
}

/// Which SSH algorithms are offered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Algorithms {
    /// Post-quantum key exchange first, plus classical curve25519 and non-ETM SHA-2 MACs for clients
    /// that have nothing newer (curl's libssh2 1.10, rclone 1.60, OpenSSH before 9.9). The default.
    #[default]
    Compatible,
    /// mlkem768x25519-sha256 and ETM MACs only: a clean ssh-audit report, but only OpenSSH 9.9 and
    /// later clients can connect.
    PostQuantumOnly,
}

/// File names that clients use while uploading and rename when done (`report.csv.filepart` →
/// `report.csv`). A file with such a name is not scanned or delivered until it is renamed, or until
/// it has sat untouched for `timeout` (a client that never renamed it).
///
/// # Defaults
/// `*.filepart` (WinSCP), `*.partial`, `*.part`; one hour.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemporaryNames {
    patterns: Vec<String>,
    pub timeout: Duration,
}

impl Default for TemporaryNames {
    fn default() -> TemporaryNames {
        TemporaryNames {
            patterns: vec!["*.filepart".into(), "*.partial".into(), "*.part".into()],
            timeout: Duration::from_secs(3600),
        }
    }
}

impl TemporaryNames {
    /// Whether the last part of `path` (a file name) is a temporary name.
    pub fn matches(&self, path: &str) -> bool {
        let name = path.rsplit('/').next().unwrap_or(path);
        self.patterns.iter().any(|pattern| glob(pattern, name))
    }
}

/// `*` matches any run of characters (also none); everything else matches itself.
fn glob(pattern: &str, name: &str) -> bool {
    let mut pieces = pattern.split('*');
    let first = pieces.next().unwrap_or_default();
    let Some(mut rest) = name.strip_prefix(first) else {
        return false;
    };
    let pieces: Vec<&str> = pieces.collect();
    let Some((last, middle)) = pieces.split_last() else {
        return rest.is_empty();
    };
    for piece in middle {
        match rest.find(piece) {
            Some(at) => rest = rest.get(at + piece.len()..).unwrap_or_default(),
            None => return false,
        }
    }
    rest.ends_with(last)
}

#[derive(Debug, Clone)]
pub struct Buckets {
    pub landing: Location,
    pub quarantine: Location,
}

#[derive(Debug, Clone)]
pub struct State {
    pub database: Database,
}

/// Which database holds jobs and directories.
#[derive(Clone, PartialEq, Eq)]
pub enum Database {
    /// One file, for one node.
    Sqlite { path: PathBuf },
    /// A PostgreSQL server shared by every node: `postgres://user:password@host:port/database`.
    Postgres { url: String },
}

impl std::fmt::Debug for Database {
    /// Never shows a password.
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Database::Sqlite { path } => write!(formatter, "sqlite://{}", path.display()),
            Database::Postgres { url } => match url::Url::parse(url) {
                Ok(mut parsed) => {
                    if parsed.password().is_some() {
                        let _ = parsed.set_password(Some("***"));
                    }
                    write!(formatter, "{parsed}")
                }
                Err(_) => formatter.write_str("postgres://(unparsable)"),
            },
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    server: RawServer,
    buckets: RawBuckets,
    #[serde(default)]
    state: RawState,
    #[serde(default)]
    users: RawUsers,
    #[serde(default)]
    scanner: RawScanner,
    #[serde(default)]
    pipeline: RawPipeline,
    #[serde(default)]
    onboarding: RawOnboarding,
    #[serde(default)]
    notify: RawNotify,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default)]
    delivery: RawDelivery,
    #[serde(default)]
    admin: RawAdmin,
    #[serde(default)]
    receipts: RawReceipts,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    /// `host:port`, or "off".
    listen: Option<Spanned<String>>,
    /// NAME of the environment variable holding the API and dashboard token.
    token_env: Option<Spanned<String>>,
    /// Or a file holding it (relative to this file), e.g. a systemd credential.
    token_file: Option<Spanned<String>>,
    /// How long audit lines copied to the state database are kept there, e.g. "90d".
    audit_retention: Option<Spanned<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawReceipts {
    /// Whether the receipt of a file quarantined as infected names the scanner's signature.
    show_signature: Option<Spanned<bool>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawDelivery {
    /// "overwrite" (default) or "suffix".
    on_conflict: Option<Spanned<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    /// Connections that may be waiting to log in at once.
    max_unauthenticated: Option<Spanned<i64>>,
    /// Of those, from one address.
    max_unauthenticated_per_ip: Option<Spanned<i64>>,
    /// How long a connection may take to log in, e.g. "30s".
    auth_timeout: Option<Spanned<String>>,
    /// Connections ending without a login before the address is banned.
    penalty_after: Option<Spanned<i64>>,
    /// The first ban; doubled with each further failure.
    penalty_base: Option<Spanned<String>>,
    /// The longest ban.
    penalty_max: Option<Spanned<String>>,
    /// Sessions one user may have open at once.
    max_sessions_per_user: Option<Spanned<i64>>,
    /// Interrupted uploads one user may keep waiting to be resumed.
    max_partials_per_user: Option<Spanned<i64>>,
    /// Networks never banned, e.g. a load balancer's health checkers: ["10.0.0.0/24"].
    #[serde(default)]
    penalty_exempt: Vec<Spanned<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawNotify {
    /// `smtp://host:587` (STARTTLS) or `smtps://host:465`.
    smtp_url: Option<Spanned<String>>,
    /// NAME of the environment variable holding the SMTP user name.
    smtp_username_env: Option<Spanned<String>>,
    /// NAME of the environment variable holding the SMTP password.
    smtp_password_env: Option<Spanned<String>>,
    /// The sender address of alert emails.
    email_from: Option<Spanned<String>>,
    /// A job failing for this long is reported as stuck, e.g. "15m".
    stuck_after: Option<Spanned<String>>,
    /// Operators' addresses, told about every user's files.
    #[serde(default)]
    operator_emails: Vec<Spanned<String>>,
    /// NAME of the environment variable holding the operators' Slack webhook URL.
    operator_slack_webhook_env: Option<Spanned<String>>,
    /// Which events operators get (default delivered, quarantined, stuck).
    operator_events: Option<Vec<Spanned<String>>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawOnboarding {
    /// The service's AWS account in production (12 digits).
    production_account_id: Option<Spanned<String>>,
    /// The service's AWS account in development (12 digits).
    development_account_id: Option<Spanned<String>>,
    /// The IAM role the service runs as.
    role_name: Option<Spanned<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawScanner {
    /// `clamd` (production) or `builtin` (EICAR + blocklist; not an antivirus).
    engine: Option<Spanned<String>>,
    /// `tcp://host:port` or `unix:///path`.
    clamd: Option<Spanned<String>>,
    /// Longest a scan may take, e.g. "120s".
    timeout: Option<Spanned<String>>,
    /// SHA-256 digests the builtin engine treats as infected.
    #[serde(default)]
    blocklist_sha256: Vec<Spanned<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawPipeline {
    /// Jobs processed at once.
    workers: Option<Spanned<i64>>,
    /// How long a worker owns a job before another may take it over (renewed while working).
    lease: Option<Spanned<String>>,
    /// First wait before retrying a failed step; doubles each time.
    retry_base: Option<Spanned<String>>,
    /// Longest wait between retries.
    retry_cap: Option<Spanned<String>>,
    /// Failed attempts before a job is marked failed.
    max_attempts: Option<Spanned<i64>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawServer {
    /// Address and port the SFTP listener binds to.
    listen: Option<Spanned<String>>,
    /// Folder holding the Ed25519 host key (generated on first start, mode 0600).
    host_key_dir: Option<String>,
    /// Human size such as "5 GiB"; uploads beyond it fail while bytes arrive.
    max_file_size: Option<Spanned<String>>,
    /// JSON-lines audit file.
    audit_log: Option<String>,
    /// Host name suppliers connect to (for the connection command printed by `user add`).
    public_host: Option<String>,
    /// The port suppliers connect to, when a load balancer listens on another one than the nodes.
    public_port: Option<Spanned<i64>>,
    /// Process id file for `ingestion reload`.
    pid_file: Option<String>,
    /// Temporary upload names (globs with `*`), held until renamed.
    temporary_names: Option<Vec<Spanned<String>>>,
    /// How long a file with a temporary name may sit before it is processed anyway, e.g. "1h".
    temporary_name_timeout: Option<Spanned<String>>,
    /// "compatible" (default) or "post-quantum-only".
    algorithms: Option<Spanned<String>>,
    /// How long an interrupted upload is kept for a resume after its last write, e.g. "24h".
    partial_retention: Option<Spanned<String>>,
    /// On SIGTERM, how long uploads under way may go on before the process exits, e.g. "30s".
    drain_time: Option<Spanned<String>>,
    /// Networks of load balancers whose connections start with a PROXY protocol header.
    #[serde(default)]
    proxy_protocol_from: Vec<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBuckets {
    /// Where uploads land, one home folder per user.
    landing: Spanned<String>,
    /// Where infected and unscannable files go; nobody can read it.
    quarantine: Spanned<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawState {
    /// `sqlite://PATH` (relative to the config file).
    database: Option<Spanned<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawUsers {
    /// Folder of user files, relative to the config file.
    dir: Option<String>,
}

impl Config {
    /// The folder relative paths are taken from: the configuration file's.
    pub fn base_dir(&self) -> PathBuf {
        match self.file.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
            _ => PathBuf::from("."),
        }
    }

    /// Reads and validates the configuration file and every user file, reporting all problems at once.
    pub fn load(file: &Path) -> Result<(Config, Users), Problems> {
        let config = Config::read(file)?;
        let users = Users::load_dir(&config.users_dir, &config.base_dir())?;
        config.check_users_against_buckets(&users)?;
        Ok((config, users))
    }

    /// Checks users against the rest of the configuration: a destination or egress area inside
    /// landing or quarantine (or the other way round) would let files loop, or let a user read what
    /// they must not; email alerts need the SMTP settings.
    pub fn check_users_against_buckets(&self, users: &Users) -> Result<(), Problems> {
        let mut problems = Problems::default();
        for user in users.iter() {
            let emails = user
                .notify
                .iter()
                .any(|target| matches!(target.channel, Channel::Email { .. }));
            if emails && (self.notify.smtp.is_none() || self.notify.email_from.is_none()) {
                problems.0.push(Problem {
                    file: user.file.clone(),
                    position: None,
                    field: "notify_emails".into(),
                    message: format!(
                        "email alerts need [notify] smtp_url and email_from in {}",
                        self.file.display()
                    ),
                });
            }
            if let Some(egress) = &user.egress {
                for other in users.iter().filter(|other| other.username != user.username) {
                    let theirs = std::iter::once(&other.destination)
                        .chain(other.egress.as_ref().map(|egress| &egress.location));
                    for area in theirs {
                        if egress.location.overlaps(area) {
                            problems.0.push(Problem {
                                file: user.file.clone(),
                                position: None,
                                field: "egress.location".into(),
                                message: format!(
                                    "{} overlaps {area} of user `{}`: it would let this user read the other's files",
                                    egress.location, other.username
                                ),
                            });
                        }
                    }
                }
            }
            let mut areas = vec![("destination", &user.destination)];
            if let Some(egress) = &user.egress {
                areas.push(("egress.location", &egress.location));
            }
            for (field, area) in areas {
                for (bucket, location) in [
                    ("buckets.landing", &self.buckets.landing),
                    ("buckets.quarantine", &self.buckets.quarantine),
                ] {
                    if area.overlaps(location) {
                        problems.0.push(Problem {
                            file: user.file.clone(),
                            position: None,
                            field: field.to_string(),
                            message: format!(
                                "{area} overlaps {bucket} ({location}); give it a bucket or folder of its own"
                            ),
                        });
                    }
                }
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems)
        }
    }

    /// Reads and validates the configuration file alone, without the users (for commands that must
    /// work even when a user file is broken, or need no users).
    pub fn read(file: &Path) -> Result<Config, Problems> {
        let text = std::fs::read_to_string(file).map_err(|error| {
            let mut problems = Problems::default();
            problems.file(
                file,
                format!("cannot read the configuration file: {error}; pass its path with --config"),
            );
            problems
        })?;
        Config::parse(file, &text)
    }

    /// Validates the text of a configuration file (no I/O).
    pub fn parse(file: &Path, text: &str) -> Result<Config, Problems> {
        let mut report = FileReporter::new(file, text);
        let raw: RawConfig = match toml::from_str(text) {
            Ok(raw) => raw,
            Err(error) => {
                report.toml(&error);
                return Err(report.finish());
            }
        };
        let base = file
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        let base = if base.as_os_str().is_empty() {
            PathBuf::from(".")
        } else {
            base
        };

        let listen = match &raw.server.listen {
            None => Some(SocketAddr::from(([0, 0, 0, 0], 2222))),
            Some(listen) => match listen.get_ref().parse::<SocketAddr>() {
                Ok(address) => Some(address),
                Err(_) => {
                    report.at(
                        Some(listen.span()),
                        "server.listen",
                        format!(
                            "`{}` is not an address:port; write e.g. \"0.0.0.0:2222\"",
                            listen.get_ref()
                        ),
                    );
                    None
                }
            },
        };
        let max_file_size = match &raw.server.max_file_size {
            None => Some(5 * 1024 * 1024 * 1024),
            Some(size) => match parse_size(size.get_ref()) {
                Ok(bytes) => Some(bytes),
                Err(message) => {
                    report.at(Some(size.span()), "server.max_file_size", message);
                    None
                }
            },
        };
        let mut location =
            |field: &str, value: &Spanned<String>| match Location::parse(value.get_ref(), &base) {
                Ok(location) => Some(location),
                Err(message) => {
                    report.at(Some(value.span()), field, message);
                    None
                }
            };
        let landing = location("buckets.landing", &raw.buckets.landing);
        let quarantine = location("buckets.quarantine", &raw.buckets.quarantine);
        if let (Some(landing), Some(quarantine)) = (&landing, &quarantine)
            && landing.overlaps(quarantine)
        {
            report.at(
                Some(raw.buckets.quarantine.span()),
                "buckets.quarantine",
                "the quarantine must not be inside the landing bucket or contain it; give it its own bucket or folder",
            );
        }
        let database = match &raw.state.database {
            None => Some(Database::Sqlite {
                path: base.join("state/ingestion.db"),
            }),
            Some(url) => match parse_database(url.get_ref(), &base) {
                Ok(database) => Some(database),
                Err(message) => {
                    report.at(Some(url.span()), "state.database", message);
                    None
                }
            },
        };
        let temporary_names = parse_temporary_names(&raw.server, &mut report);
        let partial_retention = duration_field(
            &mut report,
            "server.partial_retention",
            &raw.server.partial_retention,
            DEFAULT_PARTIAL_RETENTION,
        );
        let public_port = raw.server.public_port.as_ref().and_then(|port| {
            u16::try_from(*port.get_ref())
                .ok()
                .filter(|port| *port > 0)
                .or_else(|| {
                    report.at(
                        Some(port.span()),
                        "server.public_port",
                        "a TCP port, from 1 to 65535",
                    );
                    None
                })
        });
        let proxy_protocol_from = cidr_list(
            &mut report,
            "server.proxy_protocol_from",
            &raw.server.proxy_protocol_from,
        );
        for (index, net) in raw.server.proxy_protocol_from.iter().enumerate() {
            if user::parse_cidr(net.get_ref()).is_ok_and(|net| net.prefix_len() == 0) {
                report.at(
                    Some(net.span()),
                    &format!("server.proxy_protocol_from[{index}]"),
                    "this would let anyone on the internet claim any address; list only your load balancers' networks",
                );
            }
        }
        let drain_time = duration_field(
            &mut report,
            "server.drain_time",
            &raw.server.drain_time,
            DEFAULT_DRAIN_TIME,
        );
        if let Some(value) = &raw.server.partial_retention
            && partial_retention < Duration::from_secs(1)
        {
            report.at(
                Some(value.span()),
                "server.partial_retention",
                "keep interrupted uploads for at least 1s, e.g. \"24h\"",
            );
        }
        let algorithms = match raw.server.algorithms.as_ref() {
            None => Algorithms::Compatible,
            Some(value) => {
                match value.get_ref().as_str() {
                    "compatible" => Algorithms::Compatible,
                    "post-quantum-only" => Algorithms::PostQuantumOnly,
                    other => {
                        report.at(
                        Some(value.span()),
                        "server.algorithms",
                        format!("`{other}` is not a choice; use \"compatible\" or \"post-quantum-only\""),
                    );
                        Algorithms::Compatible
                    }
                }
            }
        };
        let scanner = parse_scanner(&raw.scanner, &mut report);
        let pipeline = parse_pipeline(&raw.pipeline, &mut report);
        let onboarding = parse_onboarding(&raw.onboarding, &mut report);
        let notify = parse_notify(&raw.notify, &mut report);
        let limits = parse_limits(&raw.limits, &mut report);
        let admin = parse_admin(&raw.admin, &base, &mut report);
        let on_conflict = match raw.delivery.on_conflict.as_ref() {
            None => OnConflict::Overwrite,
            Some(value) => match value.get_ref().as_str() {
                "overwrite" => OnConflict::Overwrite,
                "suffix" => OnConflict::Suffix,
                other => {
                    report.at(
                        Some(value.span()),
                        "delivery.on_conflict",
                        format!("`{other}` is not a choice; use \"overwrite\" or \"suffix\""),
                    );
                    OnConflict::Overwrite
                }
            },
        };

        let receipts = Receipts {
            show_signature: raw
                .receipts
                .show_signature
                .as_ref()
                .is_some_and(|show| *show.get_ref()),
        };

        let problems = report.finish();
        match (listen, max_file_size, landing, quarantine, database) {
            (
                Some(listen),
                Some(max_file_size),
                Some(landing),
                Some(quarantine),
                Some(database),
            ) if problems.is_empty() => {
                let relative = |value: &Option<String>, default: &str| {
                    base.join(value.as_deref().unwrap_or(default))
                };
                Ok(Config {
                    file: file.to_path_buf(),
                    server: Server {
                        listen,
                        host_key_dir: relative(&raw.server.host_key_dir, "state/host_keys"),
                        max_file_size,
                        audit_log: relative(&raw.server.audit_log, "state/audit.jsonl"),
                        public_host: raw.server.public_host.clone(),
                        public_port,
                        pid_file: relative(&raw.server.pid_file, "state/ingestion.pid"),
                        temporary_names,
                        algorithms,
                        partial_retention,
                        drain_time,
                        proxy_protocol_from,
                    },
                    buckets: Buckets {
                        landing,
                        quarantine,
                    },
                    state: State { database },
                    users_dir: relative(&raw.users.dir, "users"),
                    scanner,
                    pipeline,
                    onboarding,
                    notify,
                    limits,
                    on_conflict,
                    admin,
                    receipts,
                })
            }
            _ => Err(problems),
        }
    }
}

/// Parses a human size ("5 GiB", "200MiB", "1000000") into bytes.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let size: bytesize::ByteSize = text
        .trim()
        .parse()
        .map_err(|_| format!("`{text}` is not a size; write e.g. \"5 GiB\" or \"500 MB\""))?;
    if size.as_u64() == 0 {
        return Err("a size of zero would refuse every upload; write e.g. \"5 GiB\"".into());
    }
    Ok(size.as_u64())
}

/// Parses a human duration ("120s", "5m", "1h 30m").
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text.trim())
        .map_err(|_| format!("`{text}` is not a duration; write e.g. \"120s\", \"5m\" or \"1h\""))
}

/// A list of networks (`"10.0.0.0/8"`, `"2001:db8::/32"`, or single addresses).
fn cidr_list(
    report: &mut FileReporter,
    field: &str,
    values: &[Spanned<String>],
) -> Vec<ipnet::IpNet> {
    values
        .iter()
        .enumerate()
        .filter_map(|(index, cidr)| {
            user::parse_cidr(cidr.get_ref())
                .map_err(|message| {
                    report.at(Some(cidr.span()), &format!("{field}[{index}]"), message);
                })
                .ok()
        })
        .collect()
}

fn duration_field(
    report: &mut FileReporter,
    field: &str,
    value: &Option<Spanned<String>>,
    default: Duration,
) -> Duration {
    match value {
        None => default,
        Some(value) => parse_duration(value.get_ref()).unwrap_or_else(|message| {
            report.at(Some(value.span()), field, message);
            default
        }),
    }
}

fn count_field(
    report: &mut FileReporter,
    field: &str,
    value: &Option<Spanned<i64>>,
    default: u32,
    max: u32,
) -> u32 {
    match value {
        None => default,
        Some(value) => match u32::try_from(*value.get_ref()) {
            Ok(count) if (1..=max).contains(&count) => count,
            _ => {
                report.at(
                    Some(value.span()),
                    field,
                    format!("must be a whole number from 1 to {max}"),
                );
                default
            }
        },
    }
}

fn parse_scanner(raw: &RawScanner, report: &mut FileReporter) -> Scanner {
    let engine = raw
        .engine
        .as_ref()
        .map_or("clamd", |engine| engine.get_ref().as_str());
    let timeout = duration_field(
        report,
        "scanner.timeout",
        &raw.timeout,
        Duration::from_secs(120),
    );
    match engine {
        "clamd" => {
            let address = match &raw.clamd {
                None => ClamdAddress::debian(),
                Some(text) => ClamdAddress::parse(text.get_ref()).unwrap_or_else(|message| {
                    report.at(Some(text.span()), "scanner.clamd", message);
                    ClamdAddress::debian()
                }),
            };
            if let Some(first) = raw.blocklist_sha256.first() {
                report.at(
                    Some(first.span()),
                    "scanner.blocklist_sha256",
                    "the blocklist is used by the builtin engine only; remove it or set engine = \"builtin\"",
                );
            }
            Scanner::Clamd { address, timeout }
        }
        "builtin" => {
            let mut blocklist = Vec::new();
            for (index, digest) in raw.blocklist_sha256.iter().enumerate() {
                let text = digest.get_ref().trim().to_ascii_lowercase();
                if text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit()) {
                    blocklist.push(text);
                } else {
                    report.at(
                        Some(digest.span()),
                        &format!("scanner.blocklist_sha256[{index}]"),
                        "not a SHA-256 digest (64 hex digits)",
                    );
                }
            }
            Scanner::Builtin { blocklist }
        }
        other => {
            let span = raw.engine.as_ref().map(Spanned::span);
            report.at(
                span,
                "scanner.engine",
                format!("`{other}` is not an engine; use \"clamd\" or \"builtin\""),
            );
            Scanner::Builtin {
                blocklist: Vec::new(),
            }
        }
    }
}

fn parse_pipeline(raw: &RawPipeline, report: &mut FileReporter) -> PipelineSettings {
    let defaults = PipelineSettings::default();
    let settings = PipelineSettings {
        workers: count_field(report, "pipeline.workers", &raw.workers, 2, 256) as usize,
        lease: duration_field(report, "pipeline.lease", &raw.lease, defaults.lease),
        retry_base: duration_field(
            report,
            "pipeline.retry_base",
            &raw.retry_base,
            defaults.retry_base,
        ),
        retry_cap: duration_field(
            report,
            "pipeline.retry_cap",
            &raw.retry_cap,
            defaults.retry_cap,
        ),
        max_attempts: count_field(
            report,
            "pipeline.max_attempts",
            &raw.max_attempts,
            defaults.max_attempts,
            1000,
        ),
    };
    if settings.lease < Duration::from_secs(1)
        && let Some(lease) = &raw.lease
    {
        report.at(
            Some(lease.span()),
            "pipeline.lease",
            "a lease shorter than 1s would be lost while working",
        );
    }
    if settings.retry_cap < settings.retry_base
        && let Some(cap) = &raw.retry_cap
    {
        report.at(
            Some(cap.span()),
            "pipeline.retry_cap",
            "must not be shorter than pipeline.retry_base",
        );
    }
    settings
}

fn parse_limits(raw: &RawLimits, report: &mut FileReporter) -> crate::sftp::guard::Limits {
    let defaults = crate::sftp::guard::Limits::default();
    let count =
        |report: &mut FileReporter, field: &str, value: &Option<Spanned<i64>>, default: usize| {
            count_field(
                report,
                field,
                value,
                u32::try_from(default).unwrap_or(u32::MAX),
                1_000_000,
            ) as usize
        };
    let limits = crate::sftp::guard::Limits {
        max_unauthenticated: count(
            report,
            "limits.max_unauthenticated",
            &raw.max_unauthenticated,
            defaults.max_unauthenticated,
        ),
        max_unauthenticated_per_ip: count(
            report,
            "limits.max_unauthenticated_per_ip",
            &raw.max_unauthenticated_per_ip,
            defaults.max_unauthenticated_per_ip,
        ),
        auth_timeout: duration_field(
            report,
            "limits.auth_timeout",
            &raw.auth_timeout,
            defaults.auth_timeout,
        ),
        penalty_after: count_field(
            report,
            "limits.penalty_after",
            &raw.penalty_after,
            defaults.penalty_after,
            1000,
        ),
        penalty_base: duration_field(
            report,
            "limits.penalty_base",
            &raw.penalty_base,
            defaults.penalty_base,
        ),
        penalty_max: duration_field(
            report,
            "limits.penalty_max",
            &raw.penalty_max,
            defaults.penalty_max,
        ),
        max_sessions_per_user: count(
            report,
            "limits.max_sessions_per_user",
            &raw.max_sessions_per_user,
            defaults.max_sessions_per_user,
        ),
        max_partials_per_user: count(
            report,
            "limits.max_partials_per_user",
            &raw.max_partials_per_user,
            defaults.max_partials_per_user,
        ),
        penalty_exempt: cidr_list(report, "limits.penalty_exempt", &raw.penalty_exempt),
    };
    if limits.auth_timeout < Duration::from_secs(1)
        && let Some(value) = &raw.auth_timeout
    {
        report.at(
            Some(value.span()),
            "limits.auth_timeout",
            "at least 1s, or nobody could log in",
        );
    }
    if (limits.penalty_base.is_zero() || limits.penalty_base > limits.penalty_max)
        && let Some(value) = raw.penalty_base.as_ref().or(raw.penalty_max.as_ref())
    {
        report.at(
            Some(value.span()),
            "limits.penalty_base",
            "penalty_base must be more than 0 and not more than penalty_max",
        );
    }
    limits
}

fn parse_temporary_names(raw: &RawServer, report: &mut FileReporter) -> TemporaryNames {
    let defaults = TemporaryNames::default();
    let timeout = duration_field(
        report,
        "server.temporary_name_timeout",
        &raw.temporary_name_timeout,
        defaults.timeout,
    );
    let patterns = match &raw.temporary_names {
        None => defaults.patterns,
        Some(patterns) => {
            let mut valid = Vec::new();
            for (index, pattern) in patterns.iter().enumerate() {
                let text = pattern.get_ref();
                if text.is_empty() || text.contains('/') || text.chars().all(|c| c == '*') {
                    report.at(
                        Some(pattern.span()),
                        &format!("server.temporary_names[{index}]"),
                        "a pattern is a file name with `*` wildcards, like \"*.filepart\" (not empty, no `/`, not only `*`)",
                    );
                } else {
                    valid.push(text.clone());
                }
            }
            valid
        }
    };
    TemporaryNames { patterns, timeout }
}

fn parse_admin(raw: &RawAdmin, base: &Path, report: &mut FileReporter) -> Admin {
    let token = match (&raw.token_env, &raw.token_file) {
        (Some(name), None) => user::parse_env_name("admin.token_env", name, report),
        (None, Some(file)) => Some(Secret::File(base.join(file.get_ref()))),
        (Some(name), Some(_)) => {
            report.at(
                Some(name.span()),
                "admin.token_env",
                "give token_env or token_file, not both",
            );
            None
        }
        (None, None) => None,
    };
    let listen = match raw.listen.as_ref() {
        Some(value) if value.get_ref() == "off" => None,
        Some(value) => match value.get_ref().parse::<SocketAddr>() {
            Ok(address) => {
                if !address.ip().is_loopback()
                    && raw.token_env.is_none()
                    && raw.token_file.is_none()
                {
                    report.at(
                        Some(value.span()),
                        "admin.listen",
                        "listening beyond loopback needs admin.token_env (the NAME of an environment \
                         variable holding a long random token) or admin.token_file, or keep 127.0.0.1",
                    );
                }
                Some(address)
            }
            Err(_) => {
                report.at(
                    Some(value.span()),
                    "admin.listen",
                    format!(
                        "write an address and port such as \"{DEFAULT_ADMIN_LISTEN}\", or \"off\""
                    ),
                );
                None
            }
        },
        None => DEFAULT_ADMIN_LISTEN.parse().ok(),
    };
    let audit_retention = duration_field(
        report,
        "admin.audit_retention",
        &raw.audit_retention,
        DEFAULT_AUDIT_RETENTION,
    );
    if audit_retention < Duration::from_secs(3600) {
        report.at(
            raw.audit_retention.as_ref().map(Spanned::span),
            "admin.audit_retention",
            "keep copied audit lines at least an hour, such as \"90d\" (the audit file keeps every line)",
        );
    }
    Admin {
        listen,
        token,
        audit_retention,
    }
}

fn parse_notify(raw: &RawNotify, report: &mut FileReporter) -> Notify {
    if raw.smtp_url.is_none()
        && let Some(name) = raw
            .smtp_username_env
            .as_ref()
            .or(raw.smtp_password_env.as_ref())
    {
        report.at(
            Some(name.span()),
            "notify.smtp_url",
            "SMTP credentials are given but no notify.smtp_url",
        );
    }
    if let (Some(name), None) | (None, Some(name)) =
        (&raw.smtp_username_env, &raw.smtp_password_env)
    {
        report.at(
            Some(name.span()),
            "notify.smtp_username_env",
            "give both smtp_username_env and smtp_password_env, or neither",
        );
    }
    let smtp = raw.smtp_url.as_ref().and_then(|url| {
        let text = url.get_ref();
        let valid = (text.starts_with("smtp://") || text.starts_with("smtps://"))
            && url::Url::parse(text).is_ok_and(|parsed| parsed.host_str().is_some());
        if !valid {
            report.at(
                Some(url.span()),
                "notify.smtp_url",
                "write smtp://host:587 (STARTTLS) or smtps://host:465 (TLS); credentials go in smtp_username_env and smtp_password_env",
            );
            return None;
        }
        if url::Url::parse(text).is_ok_and(|parsed| parsed.password().is_some()) {
            report.at(
                Some(url.span()),
                "notify.smtp_url",
                "the URL holds a password: move it to an environment variable named by smtp_password_env",
            );
            return None;
        }
        Some(Smtp {
            url: text.clone(),
            username: raw
                .smtp_username_env
                .as_ref()
                .and_then(|name| user::parse_env_name("notify.smtp_username_env", name, report)),
            password: raw
                .smtp_password_env
                .as_ref()
                .and_then(|name| user::parse_env_name("notify.smtp_password_env", name, report)),
        })
    });
    let email_from = raw
        .email_from
        .as_ref()
        .and_then(|from| match check_email(from.get_ref()) {
            Ok(()) => Some(from.get_ref().clone()),
            Err(message) => {
                report.at(Some(from.span()), "notify.email_from", message);
                None
            }
        });
    let stuck_after = duration_field(
        report,
        "notify.stuck_after",
        &raw.stuck_after,
        Duration::from_secs(15 * 60),
    );
    let events = user::parse_events("notify.operator_events", &raw.operator_events, report);
    let mut operators = Vec::new();
    for (index, email) in raw.operator_emails.iter().enumerate() {
        match check_email(email.get_ref()) {
            Ok(()) => operators.push(NotifyTarget {
                channel: Channel::Email {
                    to: email.get_ref().clone(),
                },
                events: events.clone(),
            }),
            Err(message) => report.at(
                Some(email.span()),
                &format!("notify.operator_emails[{index}]"),
                message,
            ),
        }
    }
    if let Some(name) = &raw.operator_slack_webhook_env
        && let Some(webhook) =
            user::parse_env_name("notify.operator_slack_webhook_env", name, report)
    {
        operators.push(NotifyTarget {
            channel: Channel::Slack { webhook },
            events: events.clone(),
        });
    }
    let wants_email = operators
        .iter()
        .any(|target| matches!(target.channel, Channel::Email { .. }));
    if wants_email && (smtp.is_none() || email_from.is_none()) {
        report.at(
            raw.operator_emails.first().map(Spanned::span),
            "notify.operator_emails",
            "email alerts need notify.smtp_url and notify.email_from",
        );
    }
    Notify {
        smtp,
        email_from,
        stuck_after,
        operators,
    }
}

fn parse_onboarding(raw: &RawOnboarding, report: &mut FileReporter) -> Onboarding {
    let defaults = Onboarding::default();
    let mut account = |field: &str, value: &Option<Spanned<String>>, default: String| match value {
        None => default,
        Some(value)
            if value.get_ref().len() == 12
                && value.get_ref().bytes().all(|b| b.is_ascii_digit()) =>
        {
            value.get_ref().clone()
        }
        Some(value) => {
            report.at(Some(value.span()), field, "an AWS account id is 12 digits");
            default
        }
    };
    let production_account_id = account(
        "onboarding.production_account_id",
        &raw.production_account_id,
        defaults.production_account_id,
    );
    let development_account_id = account(
        "onboarding.development_account_id",
        &raw.development_account_id,
        defaults.development_account_id,
    );
    let role_name = match &raw.role_name {
        None => defaults.role_name,
        Some(role)
            if !role.get_ref().is_empty()
                && role
                    .get_ref()
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"+=,.@_-".contains(&b)) =>
        {
            role.get_ref().clone()
        }
        Some(role) => {
            report.at(
                Some(role.span()),
                "onboarding.role_name",
                "not an IAM role name (letters, digits and +=,.@_-)",
            );
            defaults.role_name
        }
    };
    Onboarding {
        production_account_id,
        development_account_id,
        role_name,
    }
}

fn parse_database(url: &str, base: &Path) -> Result<Database, String> {
    if let Some(path) = url.strip_prefix("sqlite://") {
        let path = path.split('?').next().unwrap_or(path);
        if path.is_empty() {
            return Err("`sqlite://` needs a file path, e.g. sqlite://state/ingestion.db".into());
        }
        return Ok(Database::Sqlite {
            path: base.join(path),
        });
    }
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let parsed = url::Url::parse(url).map_err(|error| {
            format!(
                "not a PostgreSQL URL ({error}); write postgres://user:password@host:5432/database"
            )
        })?;
        if parsed.host_str().is_none_or(str::is_empty) || parsed.path().trim_matches('/').is_empty()
        {
            return Err(
                "a PostgreSQL URL needs a host and a database: postgres://user:password@host:5432/database"
                    .into(),
            );
        }
        return Ok(Database::Postgres {
            url: url.to_string(),
        });
    }
    Err(format!(
        "`{url}` is not a database URL; write sqlite://state/ingestion.db or postgres://user:password@host/database"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[buckets]
landing = "file:///srv/landing"
quarantine = "file:///srv/quarantine"
"#;

    #[test]
    fn minimal_config_takes_defaults() {
        let config = Config::parse(Path::new("/etc/ingestion/ingestion.toml"), MINIMAL).unwrap();
        assert_eq!(config.server.listen.to_string(), "0.0.0.0:2222");
        assert_eq!(config.server.max_file_size, 5 << 30);
        assert_eq!(
            config.server.host_key_dir,
            PathBuf::from("/etc/ingestion/state/host_keys")
        );
        assert_eq!(config.users_dir, PathBuf::from("/etc/ingestion/users"));
        assert_eq!(
            config.state.database,
            Database::Sqlite {
                path: "/etc/ingestion/state/ingestion.db".into()
            }
        );
    }

    #[test]
    fn reports_every_problem_with_line_and_field() {
        let text = r#"[server]
listen = "nowhere"
max_file_size = "lots"
[buckets]
landing = "gs://x"
quarantine = "s3://ok-bucket"
[state]
database = "mysql://x"
"#;
        let problems = Config::parse(Path::new("ingestion.toml"), text).unwrap_err();
        let fields: Vec<_> = problems.0.iter().map(|p| p.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "server.listen",
                "server.max_file_size",
                "buckets.landing",
                "state.database"
            ]
        );
        assert_eq!(problems.0[0].position, Some((2, 10)));
        assert!(problems.to_string().contains("ingestion.toml:3:17"));
    }

    #[test]
    fn unknown_field_is_refused_with_its_place() {
        let text = format!("{MINIMAL}\n[server]\nlisten_port = 22\n");
        let problems = Config::parse(Path::new("c.toml"), &text).unwrap_err();
        assert_eq!(problems.0.len(), 1);
        assert!(problems.0[0].message.contains("listen_port"), "{problems}");
        assert!(problems.0[0].position.is_some());
    }

    #[test]
    fn admin_listens_on_loopback_and_needs_a_token_beyond_it() {
        let config = Config::parse(Path::new("/etc/i/c.toml"), MINIMAL).unwrap();
        assert_eq!(
            config.admin,
            Admin {
                listen: Some("127.0.0.1:9090".parse().unwrap()),
                token: None,
                audit_retention: DEFAULT_AUDIT_RETENTION,
            }
        );
        let kept = format!("{MINIMAL}[admin]\naudit_retention = \"30d\"\n");
        assert_eq!(
            Config::parse(Path::new("c.toml"), &kept)
                .unwrap()
                .admin
                .audit_retention,
            Duration::from_secs(30 * 24 * 3600)
        );
        let short = format!("{MINIMAL}[admin]\naudit_retention = \"10m\"\n");
        let problems = Config::parse(Path::new("c.toml"), &short).unwrap_err();
        assert!(
            problems.to_string().contains("admin.audit_retention"),
            "{problems}"
        );
        let off = format!("{MINIMAL}[admin]\nlisten = \"off\"\n");
        assert_eq!(
            Config::parse(Path::new("c.toml"), &off)
                .unwrap()
                .admin
                .listen,
            None
        );
        let file = format!("{MINIMAL}[admin]\nlisten = \"0.0.0.0:9090\"\ntoken_file = \"t\"\n");
        assert_eq!(
            Config::parse(Path::new("/etc/i/c.toml"), &file)
                .unwrap()
                .admin
                .token,
            Some(Secret::File("/etc/i/t".into()))
        );
        for (text, field, words) in [
            ("listen = \"0.0.0.0:9090\"", "admin.listen", "token_env"),
            ("listen = \"localhost\"", "admin.listen", "127.0.0.1:9090"),
            (
                "token_env = \"abc\"",
                "admin.token_env",
                "environment variable name",
            ),
            (
                "token_env = \"T\"\ntoken_file = \"t\"",
                "admin.token_env",
                "not both",
            ),
        ] {
            let problems =
                Config::parse(Path::new("c.toml"), &format!("{MINIMAL}[admin]\n{text}\n"))
                    .unwrap_err();
            assert_eq!(problems.0[0].field, field, "{text}: {problems}");
            assert!(problems.0[0].message.contains(words), "{text}: {problems}");
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("5 GiB"), Ok(5 << 30));
        assert_eq!(parse_size("1 MiB"), Ok(1 << 20));
        assert_eq!(parse_size("1000"), Ok(1000));
        assert!(parse_size("0").is_err());
        assert!(parse_size("five").is_err());
    }

    #[test]
    fn scanner_and_pipeline_sections() {
        let config = Config::parse(Path::new("c.toml"), MINIMAL).unwrap();
        assert_eq!(
            config.scanner,
            Scanner::Clamd {
                address: ClamdAddress::Unix("/run/clamav/clamd.ctl".into()),
                timeout: Duration::from_secs(120)
            }
        );
        assert_eq!(config.pipeline.workers, 2);
        let text = format!(
            "{MINIMAL}[scanner]\nengine = \"builtin\"\nblocklist_sha256 = [\"{}\"]\n[pipeline]\nlease = \"2s\"\nworkers = 4\n",
            "AB".repeat(32)
        );
        let config = Config::parse(Path::new("c.toml"), &text).unwrap();
        assert_eq!(
            config.scanner,
            Scanner::Builtin {
                blocklist: vec!["ab".repeat(32)]
            }
        );
        assert_eq!(
            (config.pipeline.lease, config.pipeline.workers),
            (Duration::from_secs(2), 4)
        );
        let text = format!(
            "{MINIMAL}[scanner]\nengine = \"clamav\"\ntimeout = \"soon\"\n[pipeline]\nworkers = 0\n"
        );
        let problems = Config::parse(Path::new("c.toml"), &text).unwrap_err();
        let fields: Vec<_> = problems.0.iter().map(|p| p.field.as_str()).collect();
        assert_eq!(
            fields,
            ["scanner.timeout", "scanner.engine", "pipeline.workers"]
        );
    }

    #[test]
    fn user_areas_must_not_overlap_landing_or_quarantine() {
        let config = Config::parse(Path::new("/etc/ingestion/ingestion.toml"), MINIMAL).unwrap();
        let key =
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIMvPbXlmoH1N5LmRUBXOfT0Mb2fcJM2wGwz1DC1EmnJ1";
        let user = |destination: &str, egress: &str| {
            let text = format!(
                "username = \"acme\"\nname = \"J\"\nemail = \"j@acme.example\"\nssh_keys = [\"{key}\"]\n\
                 destination = \"{destination}\"\n[egress]\nlocation = \"{egress}\"\n"
            );
            let user = user::parse_user(
                Path::new("/etc/ingestion/users/acme.toml"),
                &text,
                Path::new("/etc"),
            )
            .unwrap();
            let mut problems = Problems::default();
            let users = Users::from_users(vec![user], &mut problems);
            config.check_users_against_buckets(&users)
        };
        assert!(user("/srv/delivered", "/srv/egress").is_ok());
        let problems = user("/srv/landing/acme", "/srv").unwrap_err();
        let fields: Vec<_> = problems.0.iter().map(|p| p.field.as_str()).collect();
        assert_eq!(
            fields,
            ["destination", "egress.location", "egress.location"]
        );
    }

    #[test]
    fn temporary_name_patterns() {
        let names = TemporaryNames::default();
        for (name, temporary) in [
            ("data.csv.filepart", true),
            ("in/data.csv.partial", true),
            ("x.part", true),
            ("data.csv", false),
            ("archive.part1.rar", false),
            ("filepart", false),
        ] {
            assert_eq!(names.matches(name), temporary, "{name}");
        }
        assert!(glob(".in.*.", ".in.report.csv."));
        assert!(glob("~*.tmp", "~abc.tmp"));
        assert!(!glob("~*.tmp", "abc.tmp"));
        assert!(glob("a*b*c", "aXbYc") && !glob("a*b*c", "aXcYb"));
        let text = format!("{MINIMAL}[server]\ntemporary_names = [\"*\", \"a/b\"]\n");
        assert_eq!(
            Config::parse(Path::new("c.toml"), &text)
                .unwrap_err()
                .0
                .len(),
            2
        );
    }

    #[test]
    fn receipts_section() {
        let config = Config::parse(Path::new("c.toml"), MINIMAL).unwrap();
        assert_eq!(config.receipts, Receipts::default());
        assert!(!config.receipts.show_signature);
        let text = format!("{MINIMAL}[receipts]\nshow_signature = true\n");
        let config = Config::parse(Path::new("c.toml"), &text).unwrap();
        assert!(config.receipts.show_signature);
        for (section, wrong) in [
            ("[receipts]\nshow_signatures = true\n", "show_signatures"),
            (
                "[receipts]\nshow_signature = \"yes\"\n",
                "expected a boolean",
            ),
        ] {
            let text = format!("{MINIMAL}{section}");
            let problems = Config::parse(Path::new("c.toml"), &text).unwrap_err();
            assert_eq!(problems.0.len(), 1, "{problems}");
            assert!(problems.to_string().contains(wrong), "{problems}");
            assert_eq!(
                problems.0[0].position.map(|(line, _)| line),
                Some(6),
                "{problems}"
            );
        }
    }

    #[test]
    fn quarantine_must_differ_from_landing() {
        let text = "[buckets]\nlanding = \"/srv/a\"\nquarantine = \"/srv/a\"\n";
        let problems = Config::parse(Path::new("c.toml"), text).unwrap_err();
        assert_eq!(problems.0[0].field, "buckets.quarantine");
    }

    #[test]
    fn balancers_and_exemptions_are_networks_and_never_everyone() {
        let text = format!(
            "[server]\nproxy_protocol_from = [\"10.0.1.0/24\", \"0.0.0.0/0\"]\n\
             [limits]\npenalty_exempt = [\"10.0.2.7\", \"ten\"]\n{MINIMAL}"
        );
        let problems = Config::parse(Path::new("c.toml"), &text).unwrap_err();
        let fields: Vec<&str> = problems.0.iter().map(|p| p.field.as_str()).collect();
        assert_eq!(
            fields,
            ["server.proxy_protocol_from[1]", "limits.penalty_exempt[1]"],
            "{problems:?}"
        );
        let text = format!("[server]\nproxy_protocol_from = [\"10.0.1.0/24\"]\n{MINIMAL}");
        let config = Config::parse(Path::new("c.toml"), &text).unwrap();
        assert_eq!(config.server.proxy_protocol_from.len(), 1);
    }
}

//! User files: `users/<username>.toml`, one supplier account each.
//!
//! Owns the rules a user file must follow (name, keys, allow-list, destination, egress) and the
//! lookup the SSH front door uses. It never touches storage and never decides delivery.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ipnet::IpNet;
use russh::keys::{HashAlg, PublicKey, ssh_key::public::KeyData};
use serde::Deserialize;
use toml::Spanned;

use super::{FileReporter, Problems};
use crate::storage::Location;

/// A validated supplier account.
#[derive(Debug, Clone)]
pub struct User {
    pub username: String,
    /// The supplier's named contact.
    pub name: String,
    pub email: String,
    pub ssh_keys: Vec<PublicKey>,
    /// Addresses allowed to log in; empty means nobody can (deny by default).
    pub allowed_ips: Vec<IpNet>,
    /// Where clean files are delivered.
    pub destination: Location,
    pub destination_kms_key: Option<String>,
    pub egress: Option<Egress>,
    /// Who is told what happened to this user's files.
    pub notify: Vec<NotifyTarget>,
    /// The file this user was read from.
    pub file: PathBuf,
}

/// Where an alert goes. Secrets (webhook URLs, signing keys) are never held here: only the name of
/// the environment variable or the path of the file that holds them.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Channel {
    Email { to: String },
    Slack { webhook: Secret },
    Webhook { url: String, secret: Option<Secret> },
}

impl Channel {
    /// How a target is named to people: the address, or where its secret lives, never a secret (a
    /// webhook URL is shown without its query, which may carry a token).
    pub fn describe(&self) -> String {
        match self {
            Channel::Email { to } => format!("email {to}"),
            Channel::Slack { webhook } => format!("slack ({})", webhook.describe()),
            Channel::Webhook { url, .. } => {
                format!("webhook {}", url.split('?').next().unwrap_or(url))
            }
        }
    }
}

/// Where a secret is read from, at the moment it is needed.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Secret {
    Env(String),
    File(PathBuf),
}

impl Secret {
    pub fn read(&self) -> Result<String, String> {
        match self {
            Secret::Env(name) => std::env::var(name)
                .map(|value| value.trim().to_string())
                .map_err(|_| format!("the environment variable {name} is not set")),
            Secret::File(path) => std::fs::read_to_string(path)
                .map(|value| value.trim().to_string())
                .map_err(|error| format!("cannot read {}: {error}", path.display())),
        }
    }

    /// How the secret is referred to in records (never its value).
    pub fn describe(&self) -> String {
        match self {
            Secret::Env(name) => format!("env:{name}"),
            Secret::File(path) => format!("file:{}", path.display()),
        }
    }
}

/// The kinds of alert.
pub const EVENT_KINDS: [&str; 4] = ["delivered", "quarantined", "stuck", "received"];
/// What a target receives unless it says otherwise.
pub const DEFAULT_EVENTS: [&str; 3] = ["delivered", "quarantined", "stuck"];

/// One alert target and the events it wants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotifyTarget {
    pub channel: Channel,
    pub events: Vec<String>,
}

impl NotifyTarget {
    pub fn wants(&self, kind: &str) -> bool {
        self.events.iter().any(|event| event == kind)
    }
}

/// A read-only download area shown as `/download`.
#[derive(Debug, Clone)]
pub struct Egress {
    pub location: Location,
    pub kms_key: Option<String>,
}

impl User {
    /// Whether `address` is inside one of the user's allowed networks.
    pub fn ip_allowed(&self, address: IpAddr) -> bool {
        let address = canonical_ip(address);
        self.allowed_ips.iter().any(|net| net.contains(&address))
    }

    /// Whether `key` is one of the user's keys.
    pub fn has_key(&self, key: &PublicKey) -> bool {
        self.ssh_keys
            .iter()
            .any(|known| known.key_data() == key.key_data())
    }
}

/// An IPv4 address that arrives as an IPv4-mapped IPv6 address is matched as IPv4.
pub fn canonical_ip(address: IpAddr) -> IpAddr {
    match address {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

/// The current users, shared by the front door and the pipeline; read through [`SharedUsers::current`]
/// so that replacing the whole set at once is possible.
#[derive(Debug, Default)]
pub struct SharedUsers {
    current: std::sync::RwLock<Arc<Users>>,
}

impl SharedUsers {
    pub fn new(users: Users) -> SharedUsers {
        SharedUsers {
            current: std::sync::RwLock::new(Arc::new(users)),
        }
    }

    pub fn current(&self) -> Arc<Users> {
        match self.current.read() {
            Ok(users) => users.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Replaces every user at once; sessions already open keep the user they logged in as.
    pub fn replace(&self, users: Users) {
        let users = Arc::new(users);
        match self.current.write() {
            Ok(mut current) => *current = users,
            Err(poisoned) => *poisoned.into_inner() = users,
        }
    }
}

/// All users, by username.
#[derive(Debug, Clone, Default)]
pub struct Users {
    by_name: BTreeMap<String, Arc<User>>,
}

impl Users {
    pub fn get(&self, username: &str) -> Option<Arc<User>> {
        self.by_name.get(username).cloned()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<User>> {
        self.by_name.values()
    }

    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }

    /// Reads every `*.toml` file of `dir`, reporting every problem in every file. Relative local
    /// locations in user files are relative to `base`, the folder of the main configuration file.
    pub fn load_dir(dir: &Path, base: &Path) -> Result<Users, Problems> {
        let mut problems = Problems::default();
        let entries = match std::fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(error) => {
                problems.file(
                    dir,
                    format!("cannot read the users folder: {error}; create it or set [users] dir"),
                );
                return Err(problems);
            }
        };
        let mut files: Vec<PathBuf> = entries
            .filter_map(Result::ok)
            .map(|entry| entry.path())
            .filter(|path| path.extension().is_some_and(|ext| ext == "toml"))
            .collect();
        files.sort();
        let mut users = Vec::new();
        for file in files {
            match std::fs::read_to_string(&file) {
                Ok(text) => match parse_user(&file, &text, base) {
                    Ok(user) => users.push(user),
                    Err(found) => problems.extend(found),
                },
                Err(error) => problems.file(&file, format!("cannot read the user file: {error}")),
            }
        }
        let users = Users::from_users(users, &mut problems);
        if problems.is_empty() {
            Ok(users)
        } else {
            Err(problems)
        }
    }

    /// Builds the directory from validated users, refusing an SSH key shared by two users.
    pub fn from_users(users: Vec<User>, problems: &mut Problems) -> Users {
        let mut owner_of_key: HashMap<KeyData, String> = HashMap::new();
        let mut by_name = BTreeMap::new();
        for user in users {
            for key in &user.ssh_keys {
                if let Some(owner) = owner_of_key.get(key.key_data()) {
                    problems.file(
                        &user.file,
                        format!(
                            "the SSH key {} is already used by user `{owner}`; each supplier needs \
                             their own key",
                            key.fingerprint(HashAlg::Sha256)
                        ),
                    );
                } else {
                    owner_of_key.insert(key.key_data().clone(), user.username.clone());
                }
            }
            by_name.insert(user.username.clone(), Arc::new(user));
        }
        Users { by_name }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUser {
    /// Login name; must equal the file name stem.
    username: Spanned<String>,
    /// The supplier's named contact person.
    name: Spanned<String>,
    /// The contact's email address.
    email: Spanned<String>,
    /// OpenSSH public key lines.
    #[serde(default)]
    ssh_keys: Vec<Spanned<String>>,
    /// CIDRs allowed to log in; none means nobody.
    #[serde(default)]
    allowed_ips: Vec<Spanned<String>>,
    /// `s3://bucket[/prefix]` or `file:///path` where clean files go.
    destination: Spanned<String>,
    /// KMS key ARN for the destination, when it is encrypted with one.
    destination_kms_key: Option<Spanned<String>>,
    /// Optional read-only download area.
    egress: Option<RawEgress>,
    /// Email addresses told about this user's files.
    #[serde(default)]
    notify_emails: Vec<Spanned<String>>,
    /// Which events the emails get (default delivered, quarantined, stuck).
    notify_email_events: Option<Vec<Spanned<String>>>,
    /// NAME of the environment variable holding the Slack webhook URL.
    notify_slack_webhook_env: Option<Spanned<String>>,
    /// Path of a file holding the Slack webhook URL.
    notify_slack_webhook_file: Option<Spanned<String>>,
    /// Which events Slack gets.
    notify_slack_events: Option<Vec<Spanned<String>>>,
    /// A signed JSON webhook.
    notify_webhook: Option<RawWebhook>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWebhook {
    url: Spanned<String>,
    /// NAME of the environment variable holding the HMAC key.
    secret_env: Option<Spanned<String>>,
    events: Option<Vec<Spanned<String>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEgress {
    location: Spanned<String>,
    kms_key: Option<Spanned<String>>,
}

/// Validates one user file's text (no I/O); relative local locations are taken relative to `base`.
pub fn parse_user(file: &Path, text: &str, base: &Path) -> Result<User, Problems> {
    let mut report = FileReporter::new(file, text);
    let raw: RawUser = match toml::from_str(text) {
        Ok(raw) => raw,
        Err(error) => {
            report.toml(&error);
            return Err(report.finish());
        }
    };

    let username = raw.username.get_ref().clone();
    if let Err(message) = check_username(&username) {
        report.at(Some(raw.username.span()), "username", message);
    }
    let stem = file.file_stem().and_then(|s| s.to_str()).unwrap_or("");
    if stem != username {
        report.at(
            Some(raw.username.span()),
            "username",
            format!(
                "the file is named `{stem}.toml` but username is `{username}`; they must match"
            ),
        );
    }
    if raw.name.get_ref().trim().is_empty() {
        report.at(
            Some(raw.name.span()),
            "name",
            "give the supplier's named contact person",
        );
    }
    if let Err(message) = check_email(raw.email.get_ref()) {
        report.at(Some(raw.email.span()), "email", message);
    }

    let mut ssh_keys = Vec::new();
    for (index, line) in raw.ssh_keys.iter().enumerate() {
        match parse_public_key(line.get_ref()) {
            Ok(key) => ssh_keys.push(key),
            Err(message) => report.at(Some(line.span()), &format!("ssh_keys[{index}]"), message),
        }
    }
    if raw.ssh_keys.is_empty() {
        report.at(
            Some(raw.username.span()),
            "ssh_keys",
            "the user has no SSH public key, so nobody could log in; add the supplier's key",
        );
    }

    let mut allowed_ips = Vec::new();
    for (index, cidr) in raw.allowed_ips.iter().enumerate() {
        match parse_cidr(cidr.get_ref()) {
            Ok(net) => allowed_ips.push(net),
            Err(message) => report.at(Some(cidr.span()), &format!("allowed_ips[{index}]"), message),
        }
    }

    let destination = match Location::parse(raw.destination.get_ref(), base) {
        Ok(location) => Some(location),
        Err(message) => {
            report.at(Some(raw.destination.span()), "destination", message);
            None
        }
    };
    let mut kms = |field: &str, value: &Option<Spanned<String>>| {
        value
            .as_ref()
            .and_then(|key| match check_kms_key(key.get_ref()) {
                Ok(()) => Some(key.get_ref().clone()),
                Err(message) => {
                    report.at(Some(key.span()), field, message);
                    None
                }
            })
    };
    let destination_kms_key = kms("destination_kms_key", &raw.destination_kms_key);
    let egress_kms = raw
        .egress
        .as_ref()
        .and_then(|egress| kms("egress.kms_key", &egress.kms_key));
    let egress = raw.egress.as_ref().and_then(|egress| {
        match Location::parse(egress.location.get_ref(), base) {
            Ok(location) => Some(Egress {
                location,
                kms_key: egress_kms,
            }),
            Err(message) => {
                report.at(Some(egress.location.span()), "egress.location", message);
                None
            }
        }
    });

    let notify = parse_notify(&raw, base, &mut report);

    let problems = report.finish();
    match destination {
        Some(destination) if problems.is_empty() => Ok(User {
            username,
            name: raw.name.into_inner(),
            email: raw.email.into_inner(),
            ssh_keys,
            allowed_ips,
            destination,
            destination_kms_key,
            egress,
            notify,
            file: file.to_path_buf(),
        }),
        _ => Err(problems),
    }
}

/// Whether an alert URL is acceptable: https anywhere, plain http only to this machine.
pub fn url_allowed(url: &str) -> bool {
    let Ok(parsed) = url::Url::parse(url) else {
        return false;
    };
    match parsed.scheme() {
        "https" => parsed.host().is_some(),
        "http" => is_this_machine(&parsed),
        _ => false,
    }
}

/// Whether a URL's host is a loopback address or `localhost` (parsed, not matched as text).
pub fn is_this_machine(url: &url::Url) -> bool {
    match url.host() {
        Some(url::Host::Domain(domain)) => domain == "localhost",
        Some(url::Host::Ipv4(address)) => address.is_loopback(),
        Some(url::Host::Ipv6(address)) => address.is_loopback(),
        None => false,
    }
}

/// Parses an events list (default: delivered, quarantined, stuck).
pub(super) fn parse_events(
    field: &str,
    events: &Option<Vec<Spanned<String>>>,
    report: &mut FileReporter,
) -> Vec<String> {
    let Some(events) = events else {
        return DEFAULT_EVENTS
            .iter()
            .map(|event| event.to_string())
            .collect();
    };
    let mut parsed = Vec::new();
    for event in events {
        if EVENT_KINDS.contains(&event.get_ref().as_str()) {
            parsed.push(event.get_ref().clone());
        } else {
            report.at(
                Some(event.span()),
                field,
                format!(
                    "`{}` is not an event; use {}",
                    event.get_ref(),
                    EVENT_KINDS.join(", ")
                ),
            );
        }
    }
    parsed
}

/// A secret reference must be a NAME, never the secret itself.
pub(super) fn parse_env_name(
    field: &str,
    name: &Spanned<String>,
    report: &mut FileReporter,
) -> Option<Secret> {
    let text = name.get_ref();
    if text.contains("://") || text.contains("hooks.slack.com") {
        report.at(
            Some(name.span()),
            field,
            "this looks like the secret itself: put the URL in an environment variable and write its NAME \
             here (secrets never live in configuration files)",
        );
        return None;
    }
    let valid = text
        .bytes()
        .next()
        .is_some_and(|b| b.is_ascii_uppercase() || b == b'_')
        && text
            .bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_');
    if !valid {
        report.at(
            Some(name.span()),
            field,
            format!("`{text}` is not an environment variable name (A-Z, 0-9 and _, e.g. ACME_SLACK_WEBHOOK)"),
        );
        return None;
    }
    Some(Secret::Env(text.clone()))
}

fn parse_notify(raw: &RawUser, base: &Path, report: &mut FileReporter) -> Vec<NotifyTarget> {
    let mut targets = Vec::new();
    let email_events = parse_events("notify_email_events", &raw.notify_email_events, report);
    for (index, email) in raw.notify_emails.iter().enumerate() {
        match check_email(email.get_ref()) {
            Ok(()) => targets.push(NotifyTarget {
                channel: Channel::Email {
                    to: email.get_ref().clone(),
                },
                events: email_events.clone(),
            }),
            Err(message) => report.at(
                Some(email.span()),
                &format!("notify_emails[{index}]"),
                message,
            ),
        }
    }
    let slack = match (
        &raw.notify_slack_webhook_env,
        &raw.notify_slack_webhook_file,
    ) {
        (Some(_), Some(file)) => {
            report.at(
                Some(file.span()),
                "notify_slack_webhook_file",
                "give either notify_slack_webhook_env or notify_slack_webhook_file, not both",
            );
            None
        }
        (Some(name), None) => parse_env_name("notify_slack_webhook_env", name, report),
        (None, Some(file)) => {
            if file.get_ref().contains("://") {
                report.at(
                    Some(file.span()),
                    "notify_slack_webhook_file",
                    "this looks like the webhook URL itself: write it into a file and give the file's path here",
                );
                None
            } else {
                Some(Secret::File(base.join(file.get_ref())))
            }
        }
        (None, None) => None,
    };
    if let Some(webhook) = slack {
        targets.push(NotifyTarget {
            channel: Channel::Slack { webhook },
            events: parse_events("notify_slack_events", &raw.notify_slack_events, report),
        });
    }
    if let Some(webhook) = &raw.notify_webhook {
        let url = webhook.url.get_ref();
        if !url_allowed(url) {
            report.at(
                Some(webhook.url.span()),
                "notify_webhook.url",
                "the webhook URL must be https:// (plain http only to this machine)",
            );
        }
        let secret = webhook
            .secret_env
            .as_ref()
            .and_then(|name| parse_env_name("notify_webhook.secret_env", name, report));
        targets.push(NotifyTarget {
            channel: Channel::Webhook {
                url: url.clone(),
                secret,
            },
            events: parse_events("notify_webhook.events", &webhook.events, report),
        });
    }
    targets
}

/// Lowercase letters, digits and hyphens, 3–32 characters, starting with a letter or digit.
pub fn check_username(username: &str) -> Result<(), String> {
    let chars_ok = username
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if !(3..=32).contains(&username.len()) || !chars_ok || username.starts_with('-') {
        return Err(format!(
            "`{username}` is not a valid username: use 3-32 lowercase letters, digits and hyphens, \
             starting with a letter or digit"
        ));
    }
    Ok(())
}

pub fn check_email(email: &str) -> Result<(), String> {
    let valid = email.split_once('@').is_some_and(|(local, domain)| {
        !local.is_empty()
            && !domain.contains('@')
            && domain.contains('.')
            && !domain.starts_with('.')
            && !domain.ends_with('.')
            && !email.chars().any(|c| c.is_whitespace() || c.is_control())
    });
    if valid {
        Ok(())
    } else {
        Err(format!(
            "`{email}` is not an email address; write e.g. jane.doe@supplier.example"
        ))
    }
}

fn check_kms_key(arn: &str) -> Result<(), String> {
    let parts: Vec<&str> = arn.split(':').collect();
    let valid = parts.len() == 6
        && parts.first() == Some(&"arn")
        && parts.get(1).is_some_and(|p| p.starts_with("aws"))
        && parts.get(2) == Some(&"kms")
        && parts.get(4).is_some_and(|account| {
            account.len() == 12 && account.bytes().all(|b| b.is_ascii_digit())
        })
        && parts
            .get(5)
            .is_some_and(|resource| resource.starts_with("key/") || resource.starts_with("alias/"));
    if valid {
        Ok(())
    } else {
        Err(format!(
            "`{arn}` is not a KMS key ARN; write arn:aws:kms:REGION:ACCOUNT_ID:key/KEY_ID"
        ))
    }
}

/// Parses every public key in `text`: OpenSSH lines (one a line, `#` comments skipped, as in a `.pub`
/// or authorized_keys file) or RFC 4716 blocks (`---- BEGIN SSH2 PUBLIC KEY ----`). Private keys and
/// weak algorithms are refused, as in [`parse_public_key`].
pub fn parse_public_keys(text: &str) -> Result<Vec<PublicKey>, String> {
    if text.contains("PRIVATE KEY") {
        return parse_public_key(text).map(|key| vec![key]);
    }
    if text.contains("---- BEGIN SSH2 PUBLIC KEY ----") {
        return parse_rfc4716(text);
    }
    let keys: Vec<PublicKey> = text
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .map(parse_public_key)
        .collect::<Result<_, _>>()?;
    if keys.is_empty() {
        return Err(
            "no public key found; expected a line like `ssh-ed25519 AAAA... comment`".into(),
        );
    }
    Ok(keys)
}

/// Parses RFC 4716 ("SSH2") public key blocks, keeping a `Comment:` header as the key's comment.
fn parse_rfc4716(text: &str) -> Result<Vec<PublicKey>, String> {
    use base64::Engine as _;
    let mut keys = Vec::new();
    let mut lines = text.lines().map(str::trim);
    while let Some(line) = lines.next() {
        if line != "---- BEGIN SSH2 PUBLIC KEY ----" {
            continue;
        }
        let mut body = String::new();
        let mut comment = String::new();
        let mut continued = false;
        let mut ended = false;
        for line in lines.by_ref() {
            if line == "---- END SSH2 PUBLIC KEY ----" {
                ended = true;
                break;
            }
            if continued || line.contains(':') {
                // A header; a trailing backslash continues it on the next line.
                if let Some(value) = line.strip_prefix("Comment:") {
                    comment = value.trim().trim_matches('"').to_string();
                }
                continued = line.ends_with('\\');
                continue;
            }
            body.push_str(line);
        }
        if !ended {
            return Err("an RFC 4716 key block has no `---- END SSH2 PUBLIC KEY ----` line".into());
        }
        let blob = base64::engine::general_purpose::STANDARD
            .decode(body.as_bytes())
            .map_err(|error| format!("the RFC 4716 key body is not valid base64 ({error})"))?;
        let mut key = PublicKey::from_bytes(&blob)
            .map_err(|error| format!("the RFC 4716 block does not hold a public key ({error})"))?;
        key.set_comment(comment.as_str());
        let line = key
            .to_openssh()
            .map_err(|error| format!("cannot re-encode the RFC 4716 key ({error})"))?;
        keys.push(parse_public_key(&line)?);
    }
    Ok(keys)
}

/// Inboxes that are not a person: the guide asks for a named contact.
const GENERIC_INBOXES: &[&str] = &[
    "info",
    "admin",
    "support",
    "noreply",
    "no-reply",
    "contact",
    "office",
    "enquiries",
    "hello",
    "sales",
    "team",
    "help",
];

/// Things that are allowed but probably mistakes, for `check` and `user add` to print.
pub fn warnings(user: &User) -> Vec<String> {
    let mut warnings = Vec::new();
    let local = user
        .email
        .split('@')
        .next()
        .unwrap_or_default()
        .to_ascii_lowercase();
    if GENERIC_INBOXES.contains(&local.as_str()) {
        warnings.push(format!(
            "{}: `{}` looks like a shared inbox; the guide asks for a named person's address",
            user.file.display(),
            user.email
        ));
    }
    for net in &user.allowed_ips {
        if net.prefix_len() == 0 {
            warnings.push(format!(
                "{}: {net} allows every address on the internet to try this user's key",
                user.file.display()
            ));
        } else if is_private(net) {
            warnings.push(format!(
                "{}: {net} is a private or local range; a supplier normally connects from a public address",
                user.file.display()
            ));
        }
    }
    warnings
}

fn is_private(net: &IpNet) -> bool {
    match net {
        IpNet::V4(v4) => {
            let address = v4.network();
            address.is_private() || address.is_loopback() || address.is_link_local()
        }
        IpNet::V6(v6) => {
            let address = v6.network();
            address.is_loopback()
                || (address.segments()[0] & 0xfe00) == 0xfc00
                || (address.segments()[0] & 0xffc0) == 0xfe80
        }
    }
}

/// Parses an OpenSSH public key line, refusing private keys and weak algorithms.
pub fn parse_public_key(line: &str) -> Result<PublicKey, String> {
    let line = line.trim();
    if line.contains("PRIVATE KEY") {
        return Err(
            "this is a PRIVATE key: never share it; give the .pub public key instead, and \
             regenerate the key pair since the private half has been exposed"
                .into(),
        );
    }
    let key = PublicKey::from_openssh(line).map_err(|error| {
        format!(
            "not an OpenSSH public key ({error}); expected a line like `ssh-ed25519 AAAA... comment`"
        )
    })?;
    match key.key_data() {
        KeyData::Dsa(_) => Err("DSA keys are insecure and refused; use an Ed25519 key".into()),
        KeyData::Rsa(rsa) => {
            let bits = rsa.key_size();
            if bits < 2048 {
                Err(format!(
                    "this RSA key has {bits} bits; at least 2048 are required (Ed25519 is better)"
                ))
            } else {
                Ok(key)
            }
        }
        _ => Ok(key),
    }
}

/// Parses `a.b.c.d/n` (or a bare address, taken as a single host), refusing host bits.
pub fn parse_cidr(text: &str) -> Result<IpNet, String> {
    let text = text.trim();
    let net: IpNet = match text.parse::<IpNet>() {
        Ok(net) => net,
        Err(_) => match text.parse::<IpAddr>() {
            Ok(address) => IpNet::from(address),
            Err(_) => {
                return Err(format!(
                    "`{text}` is not an IP network; write e.g. \"203.0.113.7/32\" or \"198.51.100.0/24\""
                ));
            }
        },
    };
    if net.trunc() != net {
        return Err(format!(
            "`{text}` has host bits set; did you mean \"{}\"? (or \"{}/{}\" for the single host)",
            net.trunc(),
            net.addr(),
            net.max_prefix_len()
        ));
    }
    Ok(net)
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIMvPbXlmoH1N5LmRUBXOfT0Mb2fcJM2wGwz1DC1EmnJ1 jane@laptop";

    fn user_text(extra: &str) -> String {
        format!(
            "username = \"acme\"\nname = \"Jane Doe\"\nemail = \"jane.doe@acme.example\"\n\
             ssh_keys = [\"{KEY}\"]\nallowed_ips = [\"203.0.113.7/32\"]\n\
             destination = \"s3://mojap-land/acme\"\n{extra}"
        )
    }

    #[test]
    fn valid_user_parses() {
        let user = parse_user(
            Path::new("/u/acme.toml"),
            &user_text(""),
            Path::new("/etc/ingestion"),
        )
        .unwrap();
        assert_eq!(user.username, "acme");
        assert!(user.ip_allowed("203.0.113.7".parse().unwrap()));
        assert!(user.ip_allowed("::ffff:203.0.113.7".parse().unwrap()));
        assert!(!user.ip_allowed("203.0.113.8".parse().unwrap()));
        assert!(user.egress.is_none());
    }

    #[test]
    fn stem_must_match_username() {
        let problems = parse_user(
            Path::new("/u/other.toml"),
            &user_text(""),
            Path::new("/etc/ingestion"),
        )
        .unwrap_err();
        assert_eq!(problems.0[0].field, "username");
        assert!(problems.0[0].message.contains("other.toml"));
    }

    #[test]
    fn egress_parses() {
        let text = user_text("[egress]\nlocation = \"s3://egress-bucket/acme\"\n");
        let user = parse_user(
            Path::new("/u/acme.toml"),
            &text,
            Path::new("/etc/ingestion"),
        )
        .unwrap();
        assert!(user.egress.is_some());
    }

    #[test]
    fn bad_fields_are_all_reported() {
        let text = "username = \"Acme!\"\nname = \"\"\nemail = \"nope\"\nssh_keys = [\"ssh-ed25519 garbage\"]\n\
                    allowed_ips = [\"10.0.0.1/8\"]\ndestination = \"ftp://x\"\n\
                    destination_kms_key = \"key\"\n";
        let problems = parse_user(
            Path::new("/u/Acme!.toml"),
            text,
            Path::new("/etc/ingestion"),
        )
        .unwrap_err();
        let fields: Vec<_> = problems.0.iter().map(|p| p.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "username",
                "name",
                "email",
                "ssh_keys[0]",
                "allowed_ips[0]",
                "destination",
                "destination_kms_key"
            ]
        );
        assert!(problems.0[4].message.contains("10.0.0.0/8"));
    }

    #[test]
    fn cidrs() {
        assert_eq!(
            parse_cidr("198.51.100.0/24").unwrap().to_string(),
            "198.51.100.0/24"
        );
        assert_eq!(parse_cidr("127.0.0.1").unwrap().to_string(), "127.0.0.1/32");
        assert_eq!(parse_cidr("::1").unwrap().to_string(), "::1/128");
        assert!(parse_cidr("10.0.0.1/8").is_err());
        assert!(parse_cidr("300.0.0.1/32").is_err());
    }

    #[test]
    fn private_key_is_refused_with_advice() {
        let error = parse_public_key("-----BEGIN OPENSSH PRIVATE KEY-----").unwrap_err();
        assert!(error.contains("regenerate"));
    }

    #[test]
    fn rfc4716_blocks_and_key_files() {
        let openssh =
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIMvPbXlmoH1N5LmRUBXOfT0Mb2fcJM2wGwz1DC1EmnJ1";
        let block = "---- BEGIN SSH2 PUBLIC KEY ----\nComment: \"256-bit ED25519, converted by \\\njane@laptop\"\n\
                     AAAAC3NzaC1lZDI1NTE5AAAAIMvPbXlmoH1N5LmRUBXOfT0Mb2fcJM2wGwz1DC1EmnJ1\n\
                     ---- END SSH2 PUBLIC KEY ----\n";
        let keys = parse_public_keys(block).unwrap();
        assert_eq!(keys.len(), 1);
        assert_eq!(
            keys[0].key_data(),
            parse_public_key(openssh).unwrap().key_data()
        );
        let file = format!("# keys of jane\n{openssh} jane@laptop\n\n");
        assert_eq!(parse_public_keys(&file).unwrap().len(), 1);
        assert!(parse_public_keys("---- BEGIN SSH2 PUBLIC KEY ----\nAAAA\n").is_err());
        assert!(parse_public_keys("# nothing\n").is_err());
        let private = "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjE=\n-----END OPENSSH PRIVATE KEY-----";
        assert!(parse_public_keys(private).unwrap_err().contains("PRIVATE"));
    }

    #[test]
    fn weak_keys_are_refused() {
        let dsa = "ssh-dss AAAAB3NzaC1kc3MAAACBAP1/U4EddRIpUt9KnC7s5Of2EbdSPO9EAMMeP4C2USZpRV1AIlH7WT2NWPq/xfW6MPbLm1Vs14E7gB00b/JmYLdrmVClpJ+f6AR7ECLCT7up1/63xhv4O1fnxqimFQ8E+4P208UewwI1VBNaFpEy9nXzrith1yrv8iIDGZ3RSAHHAAAAFQCXYFCPFSMLzLKSuYKi64QL8Fgc9QAAAIEA9+GghdabPd7LvKtcNrhXuXmUr7v6OuqC+VdMCz0HgmdRWVeOutRZT+ZxBxCBgLRJFnEj6EwoFhO3zwkyjMim4TwWeotUfI0o4KOuHiuzpnWRbqN/C/ohNWLx+2J6ASQ7zKTxvqhRkImog9/hWuWfBpKLZl6Ae1UlZAFMO/7PSSoAAACBAJZpAuRW1g5XpXt5yd4d5mWIdRk5xYHP9qR3MVhhAEFCqfMe7RLYxbNbRbGjkSBlbXe+3VAoFaHCkxoyCR1h/bnfOpzwdSnzaX8i85LAkZiwhQ9t5KlyGcmqNV3+Jvvvt1Ip0UyQnnTgzkYE7bGOVkAJt7rLNVdN+ccImFgaMyhc test";
        match parse_public_key(dsa) {
            Err(message) => assert!(
                message.contains("DSA") || message.contains("not an OpenSSH"),
                "{message}"
            ),
            Ok(_) => panic!("a DSA key was accepted"),
        }
    }

    #[test]
    fn warnings_for_shared_inboxes_and_private_ranges() {
        let text = "username = \"acme\"\nname = \"Jane Doe\"\nemail = \"info@acme.example\"\n\
                    ssh_keys = [\"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIMvPbXlmoH1N5LmRUBXOfT0Mb2fcJM2wGwz1DC1EmnJ1\"]\n\
                    allowed_ips = [\"10.1.0.0/16\", \"0.0.0.0/0\", \"203.0.113.7/32\"]\ndestination = \"s3://mojap-land\"\n";
        let user =
            parse_user(Path::new("/u/acme.toml"), text, Path::new("/etc/ingestion")).unwrap();
        let found = warnings(&user);
        assert_eq!(found.len(), 3, "{found:?}");
        assert!(found[0].contains("shared inbox"));
        assert!(found[1].contains("private"));
        assert!(found[2].contains("every address"));
    }

    #[test]
    fn notify_targets_and_secret_rules() {
        let text = user_text(
            "notify_emails = [\"team@acme.example\"]\nnotify_email_events = [\"quarantined\"]\n\
             notify_slack_webhook_env = \"ACME_SLACK\"\n\
             notify_webhook = { url = \"https://hooks.acme.example/x\", secret_env = \"ACME_HMAC\" }\n",
        );
        let user = parse_user(
            Path::new("/u/acme.toml"),
            &text,
            Path::new("/etc/ingestion"),
        )
        .unwrap();
        assert_eq!(user.notify.len(), 3);
        assert!(user.notify[0].wants("quarantined") && !user.notify[0].wants("delivered"));
        assert_eq!(
            user.notify[1].channel,
            Channel::Slack {
                webhook: Secret::Env("ACME_SLACK".into())
            }
        );
        assert!(user.notify[2].wants("stuck") && !user.notify[2].wants("received"));

        let pasted =
            user_text("notify_slack_webhook_env = \"https://hooks.slack.com/services/T/B/X\"\n");
        let problems = parse_user(Path::new("/u/acme.toml"), &pasted, Path::new("/")).unwrap_err();
        assert!(
            problems.0[0].message.contains("secret itself"),
            "{problems}"
        );
        let bad = user_text(
            "notify_email_events = [\"exploded\"]\nnotify_webhook = { url = \"http://example.org\" }\n",
        );
        let problems = parse_user(Path::new("/u/acme.toml"), &bad, Path::new("/")).unwrap_err();
        let fields: Vec<_> = problems.0.iter().map(|p| p.field.as_str()).collect();
        assert_eq!(fields, ["notify_email_events", "notify_webhook.url"]);
        for (url, allowed) in [
            ("https://hooks.example.org/x", true),
            ("http://127.0.0.1:8080/x", true),
            ("http://[::1]/x", true),
            ("http://localhost/x", true),
            ("http://localhost@evil.example/x", false),
            ("http://localhost.evil.example/x", false),
            ("http://127.0.0.1.evil.example/", false),
            ("ftp://example.org", false),
        ] {
            assert_eq!(url_allowed(url), allowed, "{url}");
        }
    }

    #[test]
    fn kms_arns() {
        assert!(check_kms_key("arn:aws:kms:eu-west-2:123456789012:key/abcd-ef").is_ok());
        assert!(check_kms_key("arn:aws:kms:eu-west-2:123456789012:alias/team").is_ok());
        assert!(check_kms_key("arn:aws:s3:::bucket").is_err());
    }

    #[test]
    fn usernames() {
        assert!(check_username("acme").is_ok());
        assert!(check_username("analytical-platform").is_ok());
        assert!(check_username("ab").is_err());
        assert!(check_username("-abc").is_err());
        assert!(check_username("ACME").is_err());
        assert!(check_username("a.b.c").is_err());
    }

    #[test]
    fn shared_key_is_refused() {
        let a = parse_user(
            Path::new("/u/acme.toml"),
            &user_text(""),
            Path::new("/etc/ingestion"),
        )
        .unwrap();
        let mut b = a.clone();
        b.username = "other".into();
        let mut problems = Problems::default();
        let users = Users::from_users(vec![a, b], &mut problems);
        assert_eq!(users.len(), 2);
        assert_eq!(problems.0.len(), 1);
        assert!(
            problems.0[0]
                .message
                .contains("already used by user `acme`")
        );
    }
}

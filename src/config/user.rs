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
    /// The file this user was read from.
    pub file: PathBuf,
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

    /// Builds the directory, refusing an SSH key shared by two users.
    pub(super) fn from_users(users: Vec<User>, problems: &mut Problems) -> Users {
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
            file: file.to_path_buf(),
        }),
        _ => Err(problems),
    }
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

fn check_email(email: &str) -> Result<(), String> {
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

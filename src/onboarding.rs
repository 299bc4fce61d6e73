//! Onboarding: turning a team's request into a user file, and the policy statements the team adds to
//! its bucket and KMS key so that the service may deliver there.
//!
//! Owns the user-file writer (always validated by the same rules as `check` before anything is
//! written, never overwriting without `force`) and the JSON of the onboarding guide. It does not run
//! the service and does not reload it (that is `ingestion reload`).

use std::io::Write;
use std::path::{Path, PathBuf};

use russh::keys::{HashAlg, PublicKey};
use serde::Serialize;
use serde_json::{Value, json};

use crate::config::{self, Config, Onboarding, Problems, User, Users};
use crate::storage::{Location, check_bucket_name};

/// Which of the service's AWS accounts a statement names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Environment {
    Production,
    Development,
}

impl Onboarding {
    fn principal(&self, environment: Environment) -> String {
        let account = match environment {
            Environment::Production => &self.production_account_id,
            Environment::Development => &self.development_account_id,
        };
        format!("arn:aws:iam::{account}:role/{}", self.role_name)
    }

    /// The statement a destination bucket's policy needs (onboarding guide, "Destination bucket
    /// permissions").
    pub fn bucket_statement(
        &self,
        bucket: &str,
        environment: Environment,
    ) -> Result<Value, String> {
        check_bucket_name(bucket)?;
        Ok(json!({
            "Sid": "AllowAnalyticalPlatformIngestionService",
            "Effect": "Allow",
            "Principal": { "AWS": self.principal(environment) },
            // Beyond the managed service's six: AbortMultipartUpload to discard a copy a crashed node
            // left unfinished, ListBucket so that a missing object is a 404 and not a 403 (checked
            // before delivering under a suffixed name).
            "Action": [
                "s3:AbortMultipartUpload",
                "s3:DeleteObject",
                "s3:GetObject",
                "s3:GetObjectAcl",
                "s3:ListBucket",
                "s3:PutObject",
                "s3:PutObjectAcl",
                "s3:PutObjectTagging"
            ],
            "Resource": [format!("arn:aws:s3:::{bucket}"), format!("arn:aws:s3:::{bucket}/*")]
        }))
    }

    /// The statement a destination bucket's KMS key policy needs ("Destination bucket KMS key").
    pub fn kms_statement(&self, environment: Environment) -> Value {
        json!({
            "Sid": "AllowAnalyticalPlatformIngestionService",
            "Effect": "Allow",
            "Principal": { "AWS": self.principal(environment) },
            // kms:Decrypt: S3 needs it for multipart uploads under SSE-KMS (files of 16 MiB or more).
            "Action": ["kms:GenerateDataKey", "kms:Encrypt", "kms:Decrypt"],
            "Resource": "*"
        })
    }
}

/// A whole policy document holding `statements`.
pub fn policy_document(statements: Vec<Value>) -> Value {
    json!({ "Version": "2012-10-17", "Statement": statements })
}

/// A request to onboard a supplier, as given on the command line (`ingestion user add`).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct NewUser {
    #[arg(long)]
    pub username: String,
    /// The supplier's named contact.
    #[arg(long)]
    pub name: String,
    #[arg(long)]
    pub email: String,
    /// A .pub file or the key text (OpenSSH or RFC 4716); repeat for several keys.
    #[arg(long = "ssh-key", required = true, allow_hyphen_values = true)]
    pub ssh_keys: Vec<String>,
    /// An address or CIDR the supplier connects from; repeat for several.
    #[arg(long = "ip", required = true)]
    pub ips: Vec<String>,
    /// s3://bucket[/prefix] or a local folder.
    #[arg(long)]
    pub destination: String,
    /// KMS key ARN of the destination bucket.
    #[arg(long)]
    pub kms_key: Option<String>,
    /// s3://bucket[/prefix] of a read-only /download area.
    #[arg(long)]
    pub egress_location: Option<String>,
    #[arg(long)]
    pub egress_kms_key: Option<String>,
    /// An address told about this user's files; repeat for several.
    #[arg(long = "notify-email")]
    pub notify_emails: Vec<String>,
    /// NAME of the environment variable holding the Slack webhook URL (never the URL itself).
    #[arg(long)]
    pub notify_slack_webhook_env: Option<String>,
    /// Accept 0.0.0.0/0 or ::/0 as an allowed network.
    #[arg(long)]
    pub allow_any_ip: bool,
    /// Replace an existing user file.
    #[arg(long)]
    pub force: bool,
}

#[derive(Serialize)]
struct UserFile<'a> {
    username: &'a str,
    name: &'a str,
    email: &'a str,
    ssh_keys: Vec<String>,
    allowed_ips: Vec<String>,
    destination: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    destination_kms_key: Option<&'a str>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    notify_emails: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    notify_slack_webhook_env: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    egress: Option<EgressFile<'a>>,
}

#[derive(Serialize)]
struct EgressFile<'a> {
    location: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    kms_key: Option<&'a str>,
}

#[derive(Debug, thiserror::Error)]
pub enum AddError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Problems(Problems),
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// What `add_user` wrote.
#[derive(Debug)]
pub struct Added {
    pub file: PathBuf,
    pub user: User,
    pub warnings: Vec<String>,
}

/// Reads `--ssh-key` values: a path to an existing file is read, anything else is key text.
fn read_keys(inputs: &[String]) -> Result<Vec<PublicKey>, String> {
    let mut keys = Vec::new();
    for input in inputs {
        let path = Path::new(input.trim());
        let (text, origin) = if !input.contains('\n') && path.is_file() {
            let text = std::fs::read_to_string(path)
                .map_err(|error| format!("cannot read {input}: {error}"))?;
            (text, input.clone())
        } else {
            (input.clone(), "the key given".to_string())
        };
        let found =
            config::parse_public_keys(&text).map_err(|message| format!("{origin}: {message}"))?;
        keys.extend(found);
    }
    if keys.is_empty() {
        return Err(
            "give the supplier's SSH public key with --ssh-key (a .pub file or the key text)"
                .into(),
        );
    }
    Ok(keys)
}

fn check_ips(ips: &[String], allow_any_ip: bool) -> Result<Vec<String>, String> {
    if ips.is_empty() {
        return Err(
            "give the supplier's IP addresses with --ip (nobody can log in without one)".into(),
        );
    }
    let mut nets = Vec::new();
    for ip in ips {
        let net = config::parse_cidr(ip)?;
        if net.prefix_len() == 0 && !allow_any_ip {
            return Err(format!(
                "{net} would let every address on the internet try this user's key; ask the supplier for \
                 their addresses, or pass --allow-any-ip if that is really intended"
            ));
        }
        nets.push(net.to_string());
    }
    Ok(nets)
}

/// Validates the request with every rule `check` applies, then writes `users/<username>.toml`
/// (atomically; never over an existing file unless `force`).
pub fn add_user(config: &Config, existing: &Users, request: &NewUser) -> Result<Added, AddError> {
    config::check_username(&request.username).map_err(AddError::Invalid)?;
    let keys = read_keys(&request.ssh_keys).map_err(AddError::Invalid)?;
    let allowed_ips = check_ips(&request.ips, request.allow_any_ip).map_err(AddError::Invalid)?;
    let file = config.users_dir.join(format!("{}.toml", request.username));
    if file.exists() && !request.force {
        return Err(AddError::Invalid(format!(
            "{} already exists; pass --force to replace it",
            file.display()
        )));
    }
    for key in &keys {
        if let Some(owner) = existing
            .iter()
            .find(|user| user.username != request.username && user.has_key(key))
        {
            return Err(AddError::Invalid(format!(
                "the SSH key {} is already used by user `{}`; each supplier needs their own key",
                key.fingerprint(HashAlg::Sha256),
                owner.username
            )));
        }
    }
    let ssh_keys = keys
        .iter()
        .map(|key| {
            key.to_openssh()
                .map_err(|error| AddError::Invalid(error.to_string()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let contents = UserFile {
        username: &request.username,
        name: &request.name,
        email: &request.email,
        ssh_keys,
        allowed_ips,
        destination: &request.destination,
        destination_kms_key: request.kms_key.as_deref(),
        notify_emails: request.notify_emails.clone(),
        notify_slack_webhook_env: request.notify_slack_webhook_env.as_deref(),
        egress: request
            .egress_location
            .as_deref()
            .map(|location| EgressFile {
                location,
                kms_key: request.egress_kms_key.as_deref(),
            }),
    };
    if request.egress_kms_key.is_some() && request.egress_location.is_none() {
        return Err(AddError::Invalid(
            "--egress-kms-key needs --egress-location".into(),
        ));
    }
    let text = toml::to_string(&contents).map_err(|error| AddError::Invalid(error.to_string()))?;
    let text = format!(
        "# Supplier account, written by `ingestion user add` on {}.\n{text}",
        humantime::format_rfc3339_seconds(std::time::SystemTime::now())
    );
    // The same validation as `check`, on exactly the text about to be written.
    let user = config::parse_user(&file, &text, &config.base_dir()).map_err(AddError::Problems)?;
    let mut others: Vec<User> = existing
        .iter()
        .filter(|other| other.username != user.username)
        .map(|other| other.as_ref().clone())
        .collect();
    others.push(user.clone());
    let mut problems = Problems::default();
    let all = Users::from_users(others, &mut problems);
    config
        .check_users_against_buckets(&all)
        .map_err(AddError::Problems)?;
    write_atomically(&file, &text, request.force).map_err(|source| AddError::Write {
        path: file.clone(),
        source,
    })?;
    let warnings = config::warnings(&user);
    Ok(Added {
        file,
        user,
        warnings,
    })
}

/// Writes beside the target and renames, so a reader never sees half a file.
fn write_atomically(path: &Path, text: &str, replace: bool) -> std::io::Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let temporary = path.with_extension("toml.tmp");
    let mut file = std::fs::File::create(&temporary)?;
    file.write_all(text.as_bytes())?;
    file.sync_all()?;
    if replace {
        std::fs::rename(&temporary, path)
    } else {
        // Refuse to replace a file that appeared meanwhile.
        let linked = std::fs::hard_link(&temporary, path);
        let _ = std::fs::remove_file(&temporary);
        linked
    }
}

/// The bucket of an S3 location (policies only apply to S3).
pub fn s3_bucket(location: &Location) -> Option<&str> {
    match location {
        Location::S3 { bucket, .. } => Some(bucket),
        Location::Local { .. } => None,
    }
}

/// The command a supplier runs to connect.
pub fn connection_command(config: &Config, username: &str) -> String {
    let host = config.server.public_host.clone().unwrap_or_else(|| {
        let ip = config.server.listen.ip();
        if ip.is_unspecified() {
            "<server.public_host>".to_string()
        } else {
            ip.to_string()
        }
    });
    match config
        .server
        .public_port
        .unwrap_or(config.server.listen.port())
    {
        22 => format!("sftp {username}@{host}"),
        port => format!("sftp -P {port} {username}@{host}"),
    }
}

/// Fingerprints of a user's keys, for tables.
pub fn fingerprints(user: &User) -> Vec<String> {
    user.ssh_keys
        .iter()
        .map(|key| key.fingerprint(HashAlg::Sha256).to_string())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_connection_command_names_the_public_host_and_port() {
        let config = |server: &str| {
            crate::config::Config::parse(
                std::path::Path::new("c.toml"),
                &format!(
                    "[server]\nlisten = \"0.0.0.0:2222\"\n{server}\n[buckets]\nlanding = \"file:///l\"\nquarantine = \"file:///q\"\n"
                ),
            )
            .unwrap()
        };
        assert_eq!(
            connection_command(&config("public_host = \"sftp.example.org\""), "acme"),
            "sftp -P 2222 acme@sftp.example.org"
        );
        assert_eq!(
            connection_command(
                &config("public_host = \"sftp.example.org\"\npublic_port = 22"),
                "acme"
            ),
            "sftp acme@sftp.example.org"
        );
        assert!(crate::config::Config::parse(
            std::path::Path::new("c.toml"),
            "[server]\npublic_port = 70000\n[buckets]\nlanding = \"file:///l\"\nquarantine = \"file:///q\"\n"
        )
        .is_err());
    }

    #[test]
    fn statements_follow_the_guide() {
        let onboarding = Onboarding::default();
        let bucket = onboarding
            .bucket_statement("mojap-land", Environment::Production)
            .unwrap();
        assert_eq!(
            bucket["Principal"]["AWS"],
            "arn:aws:iam::471112983409:role/transfer"
        );
        assert_eq!(bucket["Resource"][1], "arn:aws:s3:::mojap-land/*");
        assert_eq!(bucket["Action"].as_array().unwrap().len(), 8);
        assert!(
            onboarding
                .bucket_statement("Bad_Bucket", Environment::Production)
                .is_err()
        );
        let kms = onboarding.kms_statement(Environment::Development);
        assert_eq!(
            kms["Principal"]["AWS"],
            "arn:aws:iam::730335344807:role/transfer"
        );
        assert_eq!(kms["Resource"], "*");
        let document = policy_document(vec![kms]);
        assert_eq!(document["Version"], "2012-10-17");
    }

    #[test]
    fn ip_rules() {
        assert!(check_ips(&[], false).is_err());
        assert!(
            check_ips(&["0.0.0.0/0".into()], false)
                .unwrap_err()
                .contains("--allow-any-ip")
        );
        assert!(check_ips(&["::/0".into()], false).is_err());
        assert_eq!(check_ips(&["::/0".into()], true).unwrap(), ["::/0"]);
        assert!(
            check_ips(&["10.0.0.1/8".into()], false)
                .unwrap_err()
                .contains("10.0.0.0/8")
        );
        assert_eq!(
            check_ips(&["203.0.113.7".into()], false).unwrap(),
            ["203.0.113.7/32"]
        );
    }
}

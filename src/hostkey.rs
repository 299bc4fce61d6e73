//! The server's Ed25519 host key: generated (mode 0600) on first start, reused after.
//!
//! Owns only the key file. Several nodes show the same fingerprint when they share the folder.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use russh::keys::ssh_key::LineEnding;
use russh::keys::{Algorithm, HashAlg, PrivateKey};

const FILE_NAME: &str = "ssh_host_ed25519_key";

#[derive(Debug, thiserror::Error)]
pub enum HostKeyError {
    #[error("cannot create the host key folder {path}: {source}")]
    Folder {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read the host key {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the host key {path} is not a valid unencrypted OpenSSH private key: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("cannot write the new host key {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot generate a host key: {0}")]
    Generate(String),
}

/// Loads `dir/ssh_host_ed25519_key`, generating it first if it does not exist.
pub fn load_or_generate(dir: &Path) -> Result<PrivateKey, HostKeyError> {
    let path = dir.join(FILE_NAME);
    if path.exists() {
        return load(&path);
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| HostKeyError::Folder {
            path: dir.to_path_buf(),
            source,
        })?;
    let key = generate_ed25519()?;
    match write_private_key(&path, &key) {
        Ok(()) => {}
        // Another node sharing the folder generated one first: everyone uses that one.
        Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => return load(&path),
        Err(source) => {
            return Err(HostKeyError::Write {
                path: path.clone(),
                source,
            });
        }
    }
    tracing::info!(path = %path.display(), fingerprint = %fingerprint(&key), "generated a new host key");
    Ok(key)
}

/// Loads the host key if it exists, without generating one.
pub fn load_existing(dir: &Path) -> Result<PrivateKey, HostKeyError> {
    load(&dir.join(FILE_NAME))
}

fn load(path: &Path) -> Result<PrivateKey, HostKeyError> {
    let text = std::fs::read_to_string(path).map_err(|source| HostKeyError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    if let Ok(metadata) = std::fs::metadata(path)
        && metadata.permissions().mode() & 0o077 != 0
    {
        tracing::warn!(
            path = %path.display(),
            "the host key is readable by other users; run chmod 600 on it"
        );
    }
    let key = PrivateKey::from_openssh(&text).map_err(|error| HostKeyError::Invalid {
        path: path.to_path_buf(),
        reason: error.to_string(),
    })?;
    if key.is_encrypted() {
        return Err(HostKeyError::Invalid {
            path: path.to_path_buf(),
            reason: "it is encrypted with a passphrase".into(),
        });
    }
    Ok(key)
}

/// A fresh Ed25519 key pair.
pub fn generate_ed25519() -> Result<PrivateKey, HostKeyError> {
    PrivateKey::random(&mut rand::rng(), Algorithm::Ed25519)
        .map_err(|error| HostKeyError::Generate(error.to_string()))
}

/// Writes a new private key file in OpenSSH format (mode 0600, never wider, not even briefly) and
/// its `.pub`. The file appears whole or not at all
/// (written aside, then linked into place), and never replaces one that exists: that fails with
/// `AlreadyExists`, so nodes starting together on a shared folder agree on one key.
pub fn write_private_key(path: &Path, key: &PrivateKey) -> std::io::Result<()> {
    let text = key
        .to_openssh(LineEnding::LF)
        .map_err(|error| std::io::Error::other(error.to_string()))?;
    let mut aside = path.as_os_str().to_owned();
    aside.push(format!(
        ".new-{}",
        crate::storage::hex(&rand::random::<[u8; 6]>())
    ));
    let aside = PathBuf::from(aside);
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&aside)?;
    let linked = file
        .write_all(text.as_bytes())
        .and_then(|()| file.sync_all())
        .and_then(|()| std::fs::hard_link(&aside, path));
    let _ = std::fs::remove_file(&aside);
    linked?;
    let public = key
        .public_key()
        .to_openssh()
        .map_err(|error| std::io::Error::other(error.to_string()))?;
    let mut pub_path = path.as_os_str().to_owned();
    pub_path.push(".pub");
    std::fs::write(PathBuf::from(pub_path), format!("{public}\n"))
}

pub fn fingerprint(key: &PrivateKey) -> String {
    key.public_key().fingerprint(HashAlg::Sha256).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_once_then_reused_with_mode_0600() {
        let dir = tempfile::tempdir().unwrap();
        let keys = dir.path().join("state/host_keys");
        let first = load_or_generate(&keys).unwrap();
        let second = load_or_generate(&keys).unwrap();
        assert_eq!(fingerprint(&first), fingerprint(&second));
        let mode = std::fs::metadata(keys.join(FILE_NAME))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(keys.join("ssh_host_ed25519_key.pub").exists());
    }

    #[test]
    fn nodes_starting_together_on_a_shared_folder_agree_on_one_key() {
        let dir = tempfile::tempdir().unwrap();
        let keys = dir.path().join("shared/host_keys");
        let fingerprints: Vec<String> = std::thread::scope(|scope| {
            let nodes: Vec<_> = (0..8)
                .map(|_| scope.spawn(|| fingerprint(&load_or_generate(&keys).unwrap())))
                .collect();
            nodes.into_iter().map(|node| node.join().unwrap()).collect()
        });
        assert!(
            fingerprints.iter().all(|f| *f == fingerprints[0]),
            "{fingerprints:?}"
        );
        let left: Vec<_> = std::fs::read_dir(&keys)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left.len(), 2, "{left:?}");
    }

    #[test]
    fn garbage_key_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(FILE_NAME), "not a key").unwrap();
        let error = load_or_generate(dir.path()).unwrap_err();
        assert!(error.to_string().contains("not a valid"), "{error}");
    }
}

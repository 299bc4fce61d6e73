//! Where a bucket or folder is: `s3://bucket[/prefix]`, `file:///absolute/path`, or a plain local path.
//!
//! Parsing is pure (no I/O): a [`Location`] only says where things go. `storage::open` turns it into a
//! store. Prefixes are kept as object-store path parts, never as strings that could smuggle `..`.

use std::fmt;
use std::path::{Component, Path, PathBuf};

/// A validated bucket location.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Location {
    /// A folder on this machine acting as a bucket.
    Local { root: PathBuf },
    /// An S3 bucket (or S3-compatible server, through `AWS_ENDPOINT_URL`) and an optional key prefix.
    S3 { bucket: String, prefix: Vec<String> },
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Location::Local { root } => write!(f, "file://{}", root.display()),
            Location::S3 { bucket, prefix } if prefix.is_empty() => write!(f, "s3://{bucket}"),
            Location::S3 { bucket, prefix } => write!(f, "s3://{bucket}/{}", prefix.join("/")),
        }
    }
}

impl Location {
    /// Whether one location is inside the other (or they are the same).
    pub fn overlaps(&self, other: &Location) -> bool {
        match (self, other) {
            (Location::Local { root: a }, Location::Local { root: b }) => {
                a.starts_with(b) || b.starts_with(a)
            }
            (
                Location::S3 {
                    bucket: a,
                    prefix: p,
                },
                Location::S3 {
                    bucket: b,
                    prefix: q,
                },
            ) => a == b && (p.starts_with(q) || q.starts_with(p)),
            _ => false,
        }
    }

    /// Parses a location. Relative local paths are taken relative to `base` (the config file's folder).
    pub fn parse(text: &str, base: &Path) -> Result<Location, String> {
        let text = text.trim();
        if let Some(rest) = text.strip_prefix("s3://") {
            return parse_s3(rest);
        }
        if let Some(rest) = text.strip_prefix("file://") {
            if !rest.starts_with('/') {
                return Err(format!(
                    "`{text}` is not an absolute file URL; write file:///absolute/path \
                     (three slashes), or a plain path relative to the config file"
                ));
            }
            return parse_local(Path::new(rest));
        }
        if text.contains("://") {
            return Err(format!(
                "`{text}` has an unsupported scheme; use s3://bucket[/prefix], \
                 file:///absolute/path or a plain local path"
            ));
        }
        if text.is_empty() {
            return Err("the location is empty; use s3://bucket[/prefix] or a local path".into());
        }
        parse_local(&base.join(text))
    }
}

fn parse_local(path: &Path) -> Result<Location, String> {
    let mut root = PathBuf::new();
    for component in path.components() {
        match component {
            Component::ParentDir => {
                if !root.pop() {
                    return Err(format!("`{}` climbs above /", path.display()));
                }
            }
            Component::CurDir => {}
            other => root.push(other),
        }
    }
    Ok(Location::Local { root })
}

fn parse_s3(rest: &str) -> Result<Location, String> {
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    check_bucket_name(bucket)?;
    let mut parts = Vec::new();
    for part in prefix.split('/').filter(|part| !part.is_empty()) {
        if part == "." || part == ".." {
            return Err(format!("the prefix of `s3://{rest}` contains `{part}`"));
        }
        if part.chars().any(char::is_control) {
            return Err(format!(
                "the prefix of `s3://{rest}` contains a control character"
            ));
        }
        parts.push(part.to_string());
    }
    Ok(Location::S3 {
        bucket: bucket.to_string(),
        prefix: parts,
    })
}

/// S3 bucket naming rules: 3–63 characters of lowercase letters, digits, dots and hyphens, starting and
/// ending with a letter or digit, and not shaped like an IP address.
pub fn check_bucket_name(bucket: &str) -> Result<(), String> {
    let valid_chars = bucket
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-');
    let edges_ok = bucket
        .bytes()
        .next()
        .zip(bucket.bytes().last())
        .is_some_and(|(first, last)| first.is_ascii_alphanumeric() && last.is_ascii_alphanumeric());
    if !(3..=63).contains(&bucket.len()) || !valid_chars || !edges_ok || bucket.contains("..") {
        return Err(format!(
            "`{bucket}` is not a valid S3 bucket name (3-63 lowercase letters, digits, dots or \
             hyphens, starting and ending with a letter or digit)"
        ));
    }
    if bucket.parse::<std::net::Ipv4Addr>().is_ok() {
        return Err(format!(
            "`{bucket}` looks like an IP address, which S3 does not allow as a bucket name"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(input: &str, expected: Result<Location, ()>) {
        let got = Location::parse(input, Path::new("/etc/ingestion"));
        match expected {
            Ok(location) => assert_eq!(got, Ok(location), "{input}"),
            Err(()) => assert!(got.is_err(), "{input} should be refused, got {got:?}"),
        }
    }

    fn s3(bucket: &str, prefix: &[&str]) -> Result<Location, ()> {
        Ok(Location::S3 {
            bucket: bucket.into(),
            prefix: prefix.iter().map(|s| s.to_string()).collect(),
        })
    }

    fn local(root: &str) -> Result<Location, ()> {
        Ok(Location::Local { root: root.into() })
    }

    #[test]
    fn parses_locations() {
        check("s3://mojap-land", s3("mojap-land", &[]));
        check("s3://mojap-land/", s3("mojap-land", &[]));
        check(
            "s3://mojap-land/acme/deliveries",
            s3("mojap-land", &["acme", "deliveries"]),
        );
        check("s3://mojap-land//acme/", s3("mojap-land", &["acme"]));
        check(
            "file:///var/lib/ingestion/landing",
            local("/var/lib/ingestion/landing"),
        );
        check("data/landing", local("/etc/ingestion/data/landing"));
        check("../data", local("/etc/data"));
        check("/srv/x/../y", local("/srv/y"));
    }

    #[test]
    fn refuses_bad_locations() {
        check("s3://Bad_Bucket", Err(()));
        check("s3://ab", Err(()));
        check("s3://-abc", Err(()));
        check("s3://192.168.1.1", Err(()));
        check("s3://bucket/../other", Err(()));
        check("file://relative/path", Err(()));
        check("gs://bucket", Err(()));
        check("", Err(()));
    }

    #[test]
    fn overlaps() {
        let at = |text: &str| Location::parse(text, Path::new("/srv")).unwrap();
        assert!(at("s3://bkt/landing").overlaps(&at("s3://bkt/landing/acme")));
        assert!(at("s3://bkt").overlaps(&at("s3://bkt/x")));
        assert!(!at("s3://bkt/landing").overlaps(&at("s3://bkt/landing-2")));
        assert!(!at("s3://bkt/x").overlaps(&at("s3://ckt/x")));
        assert!(at("/srv/a").overlaps(&at("/srv/a/b")));
        assert!(!at("/srv/a").overlaps(&at("/srv/ab")));
        assert!(!at("/srv/a").overlaps(&at("s3://bkt/srv/a")));
    }

    #[test]
    fn displays_as_url() {
        let location = Location::parse("s3://b-1/p/q", Path::new("/")).unwrap();
        assert_eq!(location.to_string(), "s3://b-1/p/q");
    }
}

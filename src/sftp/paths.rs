//! The one path normaliser: every path a peer sends passes through [`normalise`] exactly once.
//!
//! A peer path is read as relative to the user's own root `/` (absolute or not: there is no other
//! root to refer to). `.` and empty parts are dropped, `..` goes up one level and is refused when it
//! would climb above the root. NUL and control characters and over-long paths are refused. What comes
//! out is a list of plain names that cannot escape: storage keys are built from it and nothing else.

use std::fmt;

/// Longest accepted path, in bytes, as sent by the client.
pub const MAX_PATH_BYTES: usize = 1024;

/// A normalised path inside the user's view: plain names only.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct VirtualPath {
    parts: Vec<String>,
}

/// Why a peer path was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathError {
    /// `..` would leave the user's root.
    Escapes,
    /// NUL or another control character.
    ControlCharacter,
    /// Longer than [`MAX_PATH_BYTES`].
    TooLong,
}

impl fmt::Display for PathError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PathError::Escapes => write!(f, "the path leads outside your home directory"),
            PathError::ControlCharacter => write!(
                f,
                "the path contains a NUL or control character, which file names may not contain"
            ),
            PathError::TooLong => write!(
                f,
                "the path is longer than {MAX_PATH_BYTES} bytes; use a shorter name"
            ),
        }
    }
}

/// What `..` at the root means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AboveRoot {
    /// Refuse the path: for every operation on files and folders.
    Refuse,
    /// Stay at the root, as `/..` is `/` in a chroot: only for REALPATH, which names a place and
    /// touches nothing (OpenSSH's `cd ..` at the root asks for it).
    StayAtRoot,
}

/// Normalises a peer path. See the module documentation for the rules.
pub fn normalise(raw: &str, above_root: AboveRoot) -> Result<VirtualPath, PathError> {
    if raw.len() > MAX_PATH_BYTES {
        return Err(PathError::TooLong);
    }
    if raw.chars().any(char::is_control) {
        return Err(PathError::ControlCharacter);
    }
    let mut parts: Vec<String> = Vec::new();
    for part in raw.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                if parts.pop().is_none() && above_root == AboveRoot::Refuse {
                    return Err(PathError::Escapes);
                }
            }
            name => parts.push(name.to_string()),
        }
    }
    Ok(VirtualPath { parts })
}

impl VirtualPath {
    pub fn root() -> VirtualPath {
        VirtualPath::default()
    }

    pub fn parts(&self) -> &[String] {
        &self.parts
    }

    pub fn is_root(&self) -> bool {
        self.parts.is_empty()
    }

    /// The last name, or `None` for the root.
    pub fn name(&self) -> Option<&str> {
        self.parts.last().map(String::as_str)
    }

    /// The containing folder (the root's parent is the root).
    pub fn parent(&self) -> VirtualPath {
        let mut parts = self.parts.clone();
        parts.pop();
        VirtualPath { parts }
    }

    /// This path below `prefix`, if it is inside it.
    pub fn strip_prefix(&self, prefix: &str) -> Option<VirtualPath> {
        match self.parts.split_first() {
            Some((first, rest)) if first == prefix => Some(VirtualPath {
                parts: rest.to_vec(),
            }),
            _ => None,
        }
    }

    /// `a/b/c` (no leading slash): how paths are stored in the state database.
    pub fn relative(&self) -> String {
        self.parts.join("/")
    }

    pub fn join(&self, name: &str) -> VirtualPath {
        let mut parts = self.parts.clone();
        parts.push(name.to_string());
        VirtualPath { parts }
    }

    pub fn is_inside(&self, other: &VirtualPath) -> bool {
        self.parts.len() > other.parts.len() && self.parts.starts_with(&other.parts)
    }
}

impl fmt::Display for VirtualPath {
    /// `/a/b/c`: how paths are shown to the client and in the audit log.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "/{}", self.parts.join("/"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(raw: &str, expected: Result<&str, PathError>) {
        let got = normalise(raw, AboveRoot::Refuse).map(|path| path.to_string());
        assert_eq!(got, expected.map(str::to_string), "normalise({raw:?})");
    }

    #[test]
    fn plain_paths() {
        check("", Ok("/"));
        check("/", Ok("/"));
        check(".", Ok("/"));
        check("a", Ok("/a"));
        check("/a/b.csv", Ok("/a/b.csv"));
        check("a//b///c/", Ok("/a/b/c"));
        check("./a/./b", Ok("/a/b"));
    }

    #[test]
    fn dot_dot_inside_the_root_is_resolved() {
        check("a/../b", Ok("/b"));
        check("/a/b/../../c", Ok("/c"));
        check("a/..", Ok("/"));
    }

    #[test]
    fn dot_dot_above_the_root_is_refused_in_every_position() {
        for raw in [
            "..",
            "/..",
            "../",
            "../etc/passwd",
            "/../other-user/file",
            "a/../..",
            "a/../../b",
            "/a/b/../../../c",
            "./..",
            "//..//..",
        ] {
            check(raw, Err(PathError::Escapes));
            let clamped = normalise(raw, AboveRoot::StayAtRoot).unwrap().to_string();
            assert!(!clamped.contains(".."), "{raw} -> {clamped}");
        }
        assert_eq!(
            normalise("/../..", AboveRoot::StayAtRoot).unwrap(),
            VirtualPath::root()
        );
        assert_eq!(
            normalise("a/../../b", AboveRoot::StayAtRoot)
                .unwrap()
                .to_string(),
            "/b"
        );
        assert_eq!(
            normalise("a\u{0}", AboveRoot::StayAtRoot),
            Err(PathError::ControlCharacter)
        );
    }

    #[test]
    fn absolute_paths_stay_inside_the_home() {
        check("/etc/passwd", Ok("/etc/passwd"));
        check(
            "/var/lib/ingestion/landing/other",
            Ok("/var/lib/ingestion/landing/other"),
        );
    }

    #[test]
    fn names_are_kept_exactly() {
        check("/my file (1).csv", Ok("/my file (1).csv"));
        check("/données €.csv", Ok("/données €.csv"));
        check("/a;rm -rf $HOME`x`|&.csv", Ok("/a;rm -rf $HOME`x`|&.csv"));
        check("/back\\slash", Ok("/back\\slash"));
        check("/...", Ok("/..."));
        check("/..a", Ok("/..a"));
        check("/%2e%2e", Ok("/%2e%2e"));
    }

    #[test]
    fn control_characters_are_refused() {
        check("a\0b", Err(PathError::ControlCharacter));
        check("a\nb", Err(PathError::ControlCharacter));
        check("\u{7f}", Err(PathError::ControlCharacter));
        check("a\u{85}b", Err(PathError::ControlCharacter));
    }

    #[test]
    fn length_limit() {
        let long = "a".repeat(MAX_PATH_BYTES);
        assert!(normalise(&long, AboveRoot::Refuse).is_ok());
        check(&format!("{long}b"), Err(PathError::TooLong));
    }

    #[test]
    fn helpers() {
        let path = normalise("/upload/in/a.csv", AboveRoot::Refuse).unwrap();
        assert_eq!(path.name(), Some("a.csv"));
        assert_eq!(path.parent().to_string(), "/upload/in");
        assert_eq!(path.strip_prefix("upload").unwrap().relative(), "in/a.csv");
        assert!(path.strip_prefix("download").is_none());
        assert!(path.is_inside(&normalise("/upload", AboveRoot::Refuse).unwrap()));
        assert!(!path.is_inside(&path));
        assert_eq!(VirtualPath::root().join("x").to_string(), "/x");
    }
}

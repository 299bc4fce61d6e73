//! Configuration problems: what is wrong, where (file, line, column, field) and how to fix it.
//!
//! Every check in `config` reports into a [`Problems`] list so that an operator sees all the mistakes at
//! once instead of fixing them one start at a time. This module only formats; it never reads files.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// One mistake in one configuration file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The file the mistake is in.
    pub file: PathBuf,
    /// 1-based line and column, when the mistake can be pinned to a place in the file.
    pub position: Option<(usize, usize)>,
    /// Dotted field name (`server.max_file_size`), or empty when the whole file is at fault.
    pub field: String,
    /// What is wrong and how to fix it.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some((line, column)) = self.position {
            write!(f, ":{line}:{column}")?;
        }
        if !self.field.is_empty() {
            write!(f, ": field `{}`", self.field)?;
        }
        write!(f, ": {}", self.message)
    }
}

/// All mistakes found in a configuration; empty means valid.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Problems(pub Vec<Problem>);

impl Problems {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn extend(&mut self, other: Problems) {
        self.0.extend(other.0);
    }

    /// A problem about a whole file (unreadable, missing, misnamed).
    pub fn file(&mut self, file: &Path, message: impl Into<String>) {
        self.0.push(Problem {
            file: file.to_path_buf(),
            position: None,
            field: String::new(),
            message: message.into(),
        });
    }
}

impl fmt::Display for Problems {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let count = self.0.len();
        writeln!(
            f,
            "the configuration has {count} problem{}:",
            if count == 1 { "" } else { "s" }
        )?;
        for problem in &self.0 {
            writeln!(f, "  - {problem}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Problems {}

/// Reports problems found in one file, turning byte spans into line and column.
pub struct FileReporter<'a> {
    file: &'a Path,
    text: &'a str,
    problems: Problems,
}

impl<'a> FileReporter<'a> {
    pub fn new(file: &'a Path, text: &'a str) -> Self {
        Self {
            file,
            text,
            problems: Problems::default(),
        }
    }

    /// Records a mistake in `field`, located at `span` of the file's text.
    pub fn at(&mut self, span: Option<Range<usize>>, field: &str, message: impl Into<String>) {
        let position = span.map(|span| line_and_column(self.text, span.start));
        self.problems.0.push(Problem {
            file: self.file.to_path_buf(),
            position,
            field: field.to_string(),
            message: message.into(),
        });
    }

    /// Records a TOML syntax or type error.
    pub fn toml(&mut self, error: &toml::de::Error) {
        self.at(error.span(), "", error.message().trim().to_string());
    }

    pub fn finish(self) -> Problems {
        self.problems
    }
}

/// 1-based line and column (in characters) of a byte offset.
pub fn line_and_column(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |index| index + 1);
    let column = before.get(line_start..).map_or(0, |s| s.chars().count()) + 1;
    (line, column)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_and_column_counts_from_one() {
        let text = "a = 1\nbb = \"é\"\n";
        assert_eq!(line_and_column(text, 0), (1, 1));
        assert_eq!(line_and_column(text, 6), (2, 1));
        assert_eq!(line_and_column(text, 11), (2, 6));
        assert_eq!(line_and_column(text, 1000), (3, 1));
    }

    #[test]
    fn display_names_file_line_field() {
        let problem = Problem {
            file: PathBuf::from("users/acme.toml"),
            position: Some((3, 5)),
            field: "allowed_ips".into(),
            message: "bad".into(),
        };
        assert_eq!(
            problem.to_string(),
            "users/acme.toml:3:5: field `allowed_ips`: bad"
        );
    }
}

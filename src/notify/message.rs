//! What an alert says: the facts of one event, and how they read in Slack, in an email and as a
//! webhook's JSON. Short, readable, no secrets, no internal paths beyond the bucket URL.

use serde::{Deserialize, Serialize};

/// The facts of one event, stored in the outbox and rendered when sent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Facts {
    /// Stable across retries and targets: receivers deduplicate on it.
    pub event_id: String,
    /// `delivered`, `quarantined`, `stuck`, `received` or `test`.
    pub event: String,
    pub username: String,
    /// The file's path inside the supplier's home, with a leading `/`.
    pub path: String,
    pub bytes: u64,
    pub sha256: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub job: Option<i64>,
    /// Where a delivered file went (bucket URL).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub destination: Option<String>,
    /// `infected` or `unscannable`, for a quarantined file.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The signature (infected) or why it could not be scanned.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signature: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scan_engine: Option<String>,
    pub received_at: String,
    /// When the event happened.
    pub at: String,
    /// For `stuck`: the last error.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

impl Facts {
    /// The facts of a file happening now, with a new event id; the outcome fields start empty.
    pub fn new(
        event: &str,
        username: &str,
        path: String,
        bytes: u64,
        sha256: &str,
        job: Option<i64>,
    ) -> Facts {
        let now = humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string();
        Facts {
            event_id: super::event_id(),
            event: event.into(),
            username: username.into(),
            path,
            bytes,
            sha256: sha256.into(),
            job,
            destination: None,
            reason: None,
            signature: None,
            scan_engine: None,
            received_at: now.clone(),
            at: now,
            last_error: None,
        }
    }

    fn file_name(&self) -> &str {
        self.path.rsplit('/').next().unwrap_or(&self.path)
    }

    fn outcome(&self) -> String {
        match (self.event.as_str(), &self.signature) {
            ("quarantined", Some(signature)) => format!("quarantined ({signature})"),
            ("delivered", _) => "delivered".into(),
            ("stuck", _) => "stuck".into(),
            ("received", _) => "received".into(),
            ("test", _) => "test alert".into(),
            (other, _) => other.into(),
        }
    }

    /// The Slack message; its first line says who, which file and what happened. Everything a
    /// supplier chose (the path) is escaped so that it cannot add links, mentions or formatting.
    pub fn slack_text(&self) -> String {
        let mut escaped = self.clone();
        escaped.path = slack_escape(&self.path);
        escaped.slack_text_unescaped()
    }

    fn slack_text_unescaped(&self) -> String {
        let first = match self.event.as_str() {
            "delivered" => format!(
                "A file uploaded by `{}` has been transferred to `{}`. • `{}`",
                self.username,
                self.destination.as_deref().unwrap_or("its destination"),
                self.path
            ),
            "quarantined" => format!(
                "A file uploaded by `{}` has been quarantined{}. • `{}`",
                self.username,
                self.signature
                    .as_ref()
                    .map(|s| format!(" ({s})"))
                    .unwrap_or_default(),
                self.path
            ),
            "stuck" => format!(
                "A file uploaded by `{}` is stuck and has not been delivered. • `{}`",
                self.username, self.path
            ),
            "received" => format!(
                "A file uploaded by `{}` has been received. • `{}`",
                self.username, self.path
            ),
            _ => format!(
                "Test alert for `{}` from the ingestion service.",
                self.username
            ),
        };
        format!("{first}\n{}", self.details())
    }

    /// `[ingestion] acme: data.csv quarantined (Eicar-Test-Signature)`
    pub fn email_subject(&self) -> String {
        if self.event == "test" {
            return format!("[ingestion] {}: test alert", self.username);
        }
        format!(
            "[ingestion] {}: {} {}",
            self.username,
            self.file_name(),
            self.outcome()
        )
    }

    pub fn email_body(&self) -> String {
        let headline = match self.event.as_str() {
            "delivered" => "was scanned, found clean and delivered.",
            "quarantined" => "was quarantined: it will not be delivered. Speak to your supplier.",
            "stuck" => {
                "has not been delivered yet; the service keeps retrying and operators are told."
            }
            "received" => "was received and is being scanned.",
            _ => "is a test alert: no file was involved.",
        };
        format!(
            "The file {} uploaded by {} {headline}\n\n{}\n\nEvent id: {}\n",
            self.path,
            self.username,
            self.details(),
            self.event_id
        )
    }

    fn details(&self) -> String {
        let mut lines = vec![
            format!("File: {}", self.path),
            format!("Size: {} bytes", self.bytes),
            format!("SHA-256: {}", self.sha256),
            format!("Received: {}", self.received_at),
        ];
        if let Some(destination) = &self.destination {
            lines.push(format!("Delivered to: {destination}"));
        }
        if let Some(reason) = &self.reason {
            lines.push(format!("Reason: {reason}"));
        }
        if let Some(signature) = &self.signature {
            lines.push(format!("Signature: {signature}"));
        }
        if let Some(engine) = &self.scan_engine {
            lines.push(format!("Scanned by: {engine}"));
        }
        if let Some(error) = &self.last_error {
            lines.push(format!("Last error: {error}"));
        }
        lines.join("\n")
    }
}

/// Slack's control characters (`&`, `<`, `>`) as entities; backticks, which would end a code span,
/// as a look-alike quote.
fn slack_escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('`', "\u{2032}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(event: &str) -> Facts {
        Facts {
            event_id: "e1".into(),
            event: event.into(),
            username: "acme".into(),
            path: "/in/data.csv".into(),
            bytes: 12,
            sha256: "ab".into(),
            job: Some(3),
            destination: Some("s3://team/acme/in/data.csv".into()),
            reason: None,
            signature: None,
            scan_engine: Some("clamd".into()),
            received_at: "2026-12-04T17:00:00.000Z".into(),
            at: "2026-12-04T17:00:01.000Z".into(),
            last_error: None,
        }
    }

    #[test]
    fn messages_name_supplier_file_and_outcome_first() {
        let mut quarantined = facts("quarantined");
        quarantined.destination = None;
        quarantined.reason = Some("infected".into());
        quarantined.signature = Some("Eicar-Test-Signature".into());
        assert_eq!(
            quarantined.email_subject(),
            "[ingestion] acme: data.csv quarantined (Eicar-Test-Signature)"
        );
        assert!(quarantined
            .slack_text()
            .starts_with("A file uploaded by `acme` has been quarantined (Eicar-Test-Signature). • `/in/data.csv`"));
        let delivered = facts("delivered");
        assert_eq!(
            delivered.email_subject(),
            "[ingestion] acme: data.csv delivered"
        );
        assert!(
            delivered
                .slack_text()
                .contains("transferred to `s3://team/acme/in/data.csv`")
        );
        assert!(delivered.email_body().contains("Event id: e1"));
    }

    #[test]
    fn slack_text_cannot_be_injected_through_a_file_name() {
        let mut hostile = facts("delivered");
        hostile.path = "/x` <!channel> <https://evil.example|click> & more.csv".into();
        let text = hostile.slack_text();
        assert!(
            !text.contains("<!channel>") && !text.contains("<https://"),
            "{text}"
        );
        assert!(
            text.contains("&lt;!channel&gt;") && text.contains("&amp;"),
            "{text}"
        );
        assert_eq!(
            text.lines().next().unwrap().matches('`').count(),
            6,
            "{text}"
        );
    }
}

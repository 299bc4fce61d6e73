//! Sending one alert: email through lettre (SMTP with STARTTLS or TLS), Slack and webhooks through
//! reqwest (rustls). Every outcome is sent, retryable or permanent; nothing here retries or records.

use std::time::Duration;

use aws_lc_rs::hmac;
use lettre::message::header::ContentType;
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Tls, TlsParameters};
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};

use super::message::Facts;
use crate::config::{Channel, Secret, Smtp};

const HTTP_TIMEOUT: Duration = Duration::from_secs(15);
const SMTP_TIMEOUT: Duration = Duration::from_secs(20);
/// The longest one alert's sending may take, all steps included; the notifier gives up after it.
pub const SEND_DEADLINE: Duration = Duration::from_secs(25);

/// Why an alert was not sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SendError {
    /// Worth trying again later (receiver down, 5xx, 429, timeouts).
    Retry(String),
    /// Trying again cannot help (4xx other than 429, a permanent SMTP rejection).
    Permanent(String),
}

impl std::fmt::Display for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SendError::Retry(message) | SendError::Permanent(message) => f.write_str(message),
        }
    }
}

/// The transports, built once.
pub struct Sender {
    http: reqwest::Client,
    mailer: Result<AsyncSmtpTransport<Tokio1Executor>, String>,
    from: Option<String>,
}

impl Sender {
    pub fn new(smtp: Option<&Smtp>, from: Option<String>) -> Sender {
        let http = reqwest::Client::builder()
            .timeout(HTTP_TIMEOUT)
            // A redirect must not carry a signed body (or a Slack message) somewhere else.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("ingestion/", env!("CARGO_PKG_VERSION")))
            .build()
            .unwrap_or_else(|_| reqwest::Client::new());
        let mailer = match smtp {
            Some(smtp) => mailer(smtp),
            None => Err("no SMTP relay is configured ([notify] smtp_url)".to_string()),
        };
        Sender { http, mailer, from }
    }

    /// Whether the SMTP relay answers (connects and greets), without sending anything.
    pub async fn check_smtp(&self) -> Result<(), String> {
        let mailer = self.mailer.as_ref().map_err(Clone::clone)?;
        match mailer.test_connection().await {
            Ok(true) => Ok(()),
            Ok(false) => Err("the SMTP relay did not accept a connection".into()),
            Err(error) => Err(format!("the SMTP relay does not answer: {error}")),
        }
    }

    pub async fn send(&self, channel: &Channel, facts: &Facts) -> Result<(), SendError> {
        match channel {
            Channel::Email { to } => self.email(to, facts).await,
            Channel::Slack { webhook } => {
                let url = webhook.read().map_err(SendError::Retry)?;
                if !crate::config::url_allowed(&url) {
                    return Err(SendError::Permanent(format!(
                        "the Slack webhook in {} is not an https URL",
                        webhook.describe()
                    )));
                }
                let body = serde_json::json!({ "text": facts.slack_text() });
                self.post(
                    &url,
                    serde_json::to_vec(&body).unwrap_or_default(),
                    facts,
                    None,
                )
                .await
            }
            Channel::Webhook { url, secret } => {
                let body =
                    serde_json::to_vec(facts).map_err(|e| SendError::Permanent(e.to_string()))?;
                let signature = match secret {
                    Some(secret) => Some(sign(&secret.read().map_err(SendError::Retry)?, &body)),
                    None => None,
                };
                self.post(url, body, facts, signature).await
            }
        }
    }

    async fn post(
        &self,
        url: &str,
        body: Vec<u8>,
        facts: &Facts,
        signature: Option<String>,
    ) -> Result<(), SendError> {
        let mut request = self
            .http
            .post(url)
            .header("Content-Type", "application/json")
            .header("X-Ingestion-Event-Id", &facts.event_id)
            .header("Idempotency-Key", &facts.event_id)
            .body(body);
        if let Some(signature) = signature {
            request = request.header("X-Ingestion-Signature", format!("sha256={signature}"));
        }
        // The URL may hold a secret token: errors name the host only.
        let host = url::Url::parse(url)
            .ok()
            .and_then(|url| url.host_str().map(str::to_string))
            .unwrap_or_default();
        let response = request.send().await.map_err(|error| {
            SendError::Retry(format!("cannot reach {host}: {}", error.without_url()))
        })?;
        let status = response.status();
        if status.is_success() {
            Ok(())
        } else if status.as_u16() == 429 || status.is_server_error() {
            Err(SendError::Retry(format!("{host} answered {status}")))
        } else {
            Err(SendError::Permanent(format!(
                "{host} answered {status}; not retried"
            )))
        }
    }

    async fn email(&self, to: &str, facts: &Facts) -> Result<(), SendError> {
        let mailer = self
            .mailer
            .as_ref()
            .map_err(|error| SendError::Retry(error.clone()))?;
        let from = self.from.as_deref().ok_or_else(|| {
            SendError::Permanent("no sender address ([notify] email_from)".into())
        })?;
        let message = Message::builder()
            .from(
                from.parse()
                    .map_err(|e| SendError::Permanent(format!("email_from: {e}")))?,
            )
            .to(to
                .parse()
                .map_err(|e| SendError::Permanent(format!("{to}: {e}")))?)
            .subject(facts.email_subject())
            .message_id(Some(format!("<{}@ingestion>", facts.event_id)))
            .header(ContentType::TEXT_PLAIN)
            .body(facts.email_body())
            .map_err(|e| SendError::Permanent(e.to_string()))?;
        match mailer.send(message).await {
            Ok(_) => Ok(()),
            Err(error) if error.is_permanent() => {
                Err(SendError::Permanent(format!("SMTP refused: {error}")))
            }
            Err(error) => Err(SendError::Retry(format!("SMTP: {error}"))),
        }
    }
}

fn mailer(smtp: &Smtp) -> Result<AsyncSmtpTransport<Tokio1Executor>, String> {
    let url = url::Url::parse(&smtp.url).map_err(|e| format!("notify.smtp_url: {e}"))?;
    let host = url.host_str().unwrap_or_default().to_string();
    let loopback = host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    let builder = match url.scheme() {
        "smtps" => AsyncSmtpTransport::<Tokio1Executor>::relay(&host)
            .map_err(|e| format!("notify.smtp_url: {e}"))?
            .port(url.port().unwrap_or(465)),
        _ if loopback => {
            // A relay on this machine: STARTTLS when it offers it.
            let parameters = TlsParameters::new(host.clone()).map_err(|e| e.to_string())?;
            AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(&host)
                .port(url.port().unwrap_or(25))
                .tls(Tls::Opportunistic(parameters))
        }
        _ => AsyncSmtpTransport::<Tokio1Executor>::starttls_relay(&host)
            .map_err(|e| format!("notify.smtp_url: {e}"))?
            .port(url.port().unwrap_or(587)),
    };
    let builder = builder.timeout(Some(SMTP_TIMEOUT));
    let builder = match (&smtp.username, &smtp.password) {
        (Some(username), Some(password)) => {
            builder.credentials(Credentials::new(read(username)?, read(password)?))
        }
        _ => builder,
    };
    Ok(builder.build())
}

fn read(secret: &Secret) -> Result<String, String> {
    secret.read()
}

/// Lowercase hex HMAC-SHA256 of `body` under `key`.
pub fn sign(key: &str, body: &[u8]) -> String {
    let key = hmac::Key::new(hmac::HMAC_SHA256, key.as_bytes());
    crate::storage::hex(hmac::sign(&key, body).as_ref())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hmac_matches_a_known_vector() {
        // RFC 4231 test case 2.
        assert_eq!(
            sign("Jefe", b"what do ya want for nothing?"),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}

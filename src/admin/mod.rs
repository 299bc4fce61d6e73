//! The admin plane, served with axum on its own listener (loopback by default): `/healthz`,
//! `/readyz`, `/metrics`, the read-only transfers API under `/api`, and the dashboard at `/`.
//!
//! Owns who may see what: health and metrics are open (they hold no file names or user data); the
//! API and the dashboard need the token named by `[admin] token_env`, compared in constant time,
//! given as `Authorization: Bearer …` or, for the dashboard, as a signed, expiring HttpOnly cookie
//! set by its login form. Without a token they are closed. Everything here only reads; nothing
//! changes a transfer, a user or a setting. Refused attempts and dashboard logins are audited.

mod api;
mod dashboard;
mod health;
mod listener;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_lc_rs::{constant_time, hmac};
use axum::Router;
use axum::extract::{ConnectInfo, State as Extract};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;

use crate::audit::{Audit, Event, Subject};
use crate::config::{Notify, SharedUsers};
use crate::scan::Scanner;
use crate::sftp::guard::Guard;
use crate::state::State;
use crate::storage::Bucket;

/// What the admin handlers read.
pub struct Admin {
    state: State,
    landing: Bucket,
    scanner: Scanner,
    mailer: Option<crate::notify::Sender>,
    guard: Arc<Guard>,
    users: Arc<SharedUsers>,
    audit: Arc<Audit>,
    metrics: PrometheusHandle,
    token: Option<String>,
    stuck_after: Duration,
    /// Set when the service starts stopping: `/readyz` then answers 503 so balancers move on.
    stopping: AtomicBool,
}

/// What [`Admin::new`] needs.
pub struct Parts {
    pub state: State,
    pub landing: Bucket,
    pub scanner: Scanner,
    pub notify: Notify,
    pub guard: Arc<Guard>,
    pub users: Arc<SharedUsers>,
    pub audit: Arc<Audit>,
    pub metrics: PrometheusHandle,
    /// The token's value, read from its environment variable at start.
    pub token: Option<String>,
}

/// Tokens shorter than this are refused at start.
pub const MIN_TOKEN_LENGTH: usize = 16;
/// How long a dashboard login lasts.
const SESSION_LIFETIME: Duration = Duration::from_secs(12 * 3600);
const COOKIE: &str = "ingestion_admin";

impl Admin {
    pub fn new(parts: Parts) -> Arc<Admin> {
        let mailer =
            parts.notify.smtp.as_ref().map(|smtp| {
                crate::notify::Sender::new(Some(smtp), parts.notify.email_from.clone())
            });
        Arc::new(Admin {
            state: parts.state,
            landing: parts.landing,
            scanner: parts.scanner,
            mailer,
            guard: parts.guard,
            users: parts.users,
            audit: parts.audit,
            metrics: parts.metrics,
            token: parts.token,
            stuck_after: parts.notify.stuck_after,
            stopping: AtomicBool::new(false),
        })
    }

    /// From now on `/readyz` says the service is stopping.
    pub fn stopping(&self) {
        self.stopping.store(true, Ordering::SeqCst);
    }

    /// Serves the admin plane on `listener` until the process ends.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        let router = Router::new()
            .route("/healthz", get(health::alive))
            .route("/readyz", get(health::ready))
            .route("/metrics", get(health::metrics))
            .route("/api/openapi.json", get(api::openapi))
            .route("/api/transfers", get(api::transfers))
            .route("/api/transfers/{id}", get(api::transfer))
            .route("/api/users", get(api::users))
            .route("/", get(dashboard::page))
            .route("/login", post(dashboard::login))
            .route("/logout", post(dashboard::logout))
            .route("/dashboard.css", get(dashboard::stylesheet))
            .with_state(self);
        let service = router.into_make_service_with_connect_info::<listener::PeerAddress>();
        let listener =
            listener::CappedListener::new(listener, listener::MAX_CONNECTIONS, listener::IDLE);
        if let Err(error) = axum::serve(listener, service).await {
            tracing::error!(%error, "the admin listener stopped");
        }
    }

    /// Whether `offered` is the token, in constant time.
    fn token_matches(&self, offered: &str) -> bool {
        self.token.as_deref().is_some_and(|token| {
            constant_time::verify_slices_are_equal(token.as_bytes(), offered.as_bytes()).is_ok()
        })
    }

    /// A dashboard session cookie value, valid for [`SESSION_LIFETIME`].
    fn new_session(&self) -> Option<String> {
        let token = self.token.as_deref()?;
        Some(sign_session(
            token,
            unix_now().saturating_add(SESSION_LIFETIME.as_secs()),
        ))
    }

    /// Whether the request carries a valid, unexpired dashboard session cookie.
    fn session_valid(&self, headers: &HeaderMap) -> bool {
        match (self.token.as_deref(), cookie(headers, COOKIE)) {
            (Some(token), Some(value)) => session_ok(token, value, unix_now()),
            _ => false,
        }
    }

    fn audit_refusal(&self, peer: SocketAddr, path: &str, reason: &str) {
        self.audit.record(
            &peer_subject(peer),
            Event::AdminRefused {
                path: path.to_string(),
                reason: reason.to_string(),
            },
        );
    }
}

/// Why a request for the API or the dashboard is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    /// No token is configured: the API and dashboard are closed.
    Closed,
    Missing,
    Wrong,
}

impl Refusal {
    fn message(self) -> &'static str {
        match self {
            Refusal::Closed => {
                "the API and the dashboard are closed: set [admin] token_env to the NAME of an \
                 environment variable holding a long random token, and restart"
            }
            Refusal::Missing => "send the admin token as `Authorization: Bearer <token>`",
            Refusal::Wrong => "the token is wrong",
        }
    }
}

/// Checks the bearer token of an API request: the answer to send when it is refused (audited).
fn refusal(admin: &Admin, peer: SocketAddr, headers: &HeaderMap, path: &str) -> Option<Response> {
    let refusal = if admin.token.is_none() {
        Refusal::Closed
    } else {
        match headers
            .get(header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Bearer "))
        {
            None => Refusal::Missing,
            Some(offered) if admin.token_matches(offered.trim()) => return None,
            Some(_) => Refusal::Wrong,
        }
    };
    if refusal != Refusal::Closed {
        admin.audit_refusal(peer, path, refusal.message());
    }
    let status = if refusal == Refusal::Closed {
        StatusCode::FORBIDDEN
    } else {
        StatusCode::UNAUTHORIZED
    };
    Some(
        (
            status,
            [(header::WWW_AUTHENTICATE, "Bearer")],
            axum::Json(serde_json::json!({ "error": refusal.message() })),
        )
            .into_response(),
    )
}

fn peer_subject(peer: SocketAddr) -> Subject {
    Subject {
        ip: Some(crate::config::canonical_ip(peer.ip()).to_string()),
        ..Subject::default()
    }
}

/// A session value `<expires>.<hex HMAC-SHA256 of "dashboard:<expires>" under the token>`: any
/// node with the same token accepts it, and changing the token ends every session.
fn sign_session(token: &str, expires: u64) -> String {
    let key = hmac::Key::new(hmac::HMAC_SHA256, token.as_bytes());
    let tag = hmac::sign(&key, format!("dashboard:{expires}").as_bytes());
    format!("{expires}.{}", crate::storage::hex(tag.as_ref()))
}

/// Whether `value` is a session signed under `token` that has not expired at `now`.
fn session_ok(token: &str, value: &str, now: u64) -> bool {
    let Some((expires, tag)) = value.split_once('.') else {
        return false;
    };
    let (Ok(expires), Some(tag)) = (expires.parse::<u64>(), unhex(tag)) else {
        return false;
    };
    let key = hmac::Key::new(hmac::HMAC_SHA256, token.as_bytes());
    expires > now && hmac::verify(&key, format!("dashboard:{expires}").as_bytes(), &tag).is_ok()
}

/// The value of cookie `name` in the request's Cookie headers.
fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(key, _)| *key == name)
        .map(|(_, value)| value)
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|at| {
            text.get(at..at + 2)
                .and_then(|pair| u8::from_str_radix(pair, 16).ok())
        })
        .collect()
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_secs())
}

type Shared = Extract<Arc<Admin>>;
/// The client's address.
type Peer = ConnectInfo<listener::PeerAddress>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookies_are_found_among_others() {
        let mut headers = HeaderMap::new();
        headers.append(header::COOKIE, "a=1; ingestion_admin=5.ab".parse().unwrap());
        headers.append(header::COOKIE, "b=2".parse().unwrap());
        assert_eq!(cookie(&headers, COOKIE), Some("5.ab"));
        assert_eq!(cookie(&headers, "b"), Some("2"));
        assert_eq!(cookie(&headers, "c"), None);
    }

    #[test]
    fn sessions_expire_and_are_bound_to_the_token() {
        let value = sign_session("a-long-admin-token", 1_000);
        assert!(session_ok("a-long-admin-token", &value, 999));
        assert!(!session_ok("a-long-admin-token", &value, 1_000), "expired");
        assert!(!session_ok("another-admin-token", &value, 999));
        let forged = value.replacen("1000.", "9999.", 1);
        assert!(!session_ok("a-long-admin-token", &forged, 999));
        assert!(!session_ok("a-long-admin-token", "garbage", 0));
    }

    #[test]
    fn hex_decoding_refuses_odd_and_non_hex_text() {
        assert_eq!(unhex("00ff"), Some(vec![0, 255]));
        assert_eq!(unhex("0"), None);
        assert_eq!(unhex("zz"), None);
    }
}

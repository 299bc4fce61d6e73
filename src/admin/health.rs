//! `/healthz` (the process answers), `/readyz` (every dependency answers, checked concurrently with
//! a time limit each) and `/metrics` (Prometheus text, with the scrape-time figures refreshed).
//!
//! Readiness: the state database, the landing bucket and the scanner are required (without them no
//! upload can be recorded, stored or scanned); the SMTP relay is reported but not required, since
//! alerts wait in the outbox. A stopping node is not ready, so balancers move on during the drain.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use axum::Json;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use super::{Admin, Shared};

/// How long one dependency gets to answer.
const CHECK_TIME: Duration = Duration::from_secs(3);

/// One dependency's answer.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub name: &'static str,
    pub required: bool,
    pub ok: bool,
    pub latency_ms: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// What `/readyz` answers.
#[derive(Debug, Clone, Serialize)]
pub struct Readiness {
    pub ready: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<&'static str>,
    pub checks: Vec<Check>,
}

pub async fn alive() -> &'static str {
    "ok\n"
}

pub async fn ready(admin: Shared) -> Response {
    let readiness = readiness(&admin.0).await;
    let status = if readiness.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        [(header::CACHE_CONTROL, "no-store")],
        Json(readiness),
    )
        .into_response()
}

/// Checks every dependency, at once.
pub async fn readiness(admin: &Arc<Admin>) -> Readiness {
    let (state, landing, scanner, smtp) = tokio::join!(
        timed("state_database", true, async {
            admin.state.ping().await.map_err(|error| error.to_string())
        }),
        timed("landing_bucket", true, async {
            admin
                .landing
                .reachable()
                .await
                .map_err(|error| error.to_string())
        }),
        timed("scanner", true, async {
            admin
                .scanner
                .ping()
                .await
                .map_err(|error| error.to_string())
        }),
        async {
            match &admin.mailer {
                Some(mailer) => Some(timed("smtp", false, mailer.check_smtp()).await),
                None => None,
            }
        },
    );
    let checks: Vec<Check> = [state, landing, scanner].into_iter().chain(smtp).collect();
    let stopping = admin.stopping.load(Ordering::SeqCst);
    let failing = checks.iter().any(|check| check.required && !check.ok);
    Readiness {
        ready: !stopping && !failing,
        reason: if stopping {
            Some("the service is stopping")
        } else if failing {
            Some("a required dependency does not answer")
        } else {
            None
        },
        checks,
    }
}

async fn timed(
    name: &'static str,
    required: bool,
    check: impl Future<Output = Result<(), String>>,
) -> Check {
    let started = Instant::now();
    let result = tokio::time::timeout(CHECK_TIME, check)
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {}s", CHECK_TIME.as_secs())));
    Check {
        name,
        required,
        ok: result.is_ok(),
        latency_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        error: result.err(),
    }
}

pub async fn metrics(admin: Shared) -> Response {
    let admin = admin.0;
    let mut scraped = crate::telemetry::Scraped {
        bans: admin.guard.bans_in_force(Instant::now()),
        ..Default::default()
    };
    match admin.state.job_totals(None).await {
        Ok(totals) => {
            scraped.jobs = Some(
                totals
                    .into_iter()
                    .map(|total| (total.state, total.jobs))
                    .collect(),
            );
        }
        Err(error) => tracing::warn!(%error, "metrics: cannot count jobs"),
    }
    match admin.state.oldest_unfinished().await {
        Ok(oldest) => {
            scraped.oldest_unfinished = Some(
                oldest
                    .and_then(|at| humantime::parse_rfc3339(&at).ok())
                    .and_then(|at| at.elapsed().ok()),
            );
        }
        Err(error) => tracing::warn!(%error, "metrics: cannot read the oldest job"),
    }
    scraped.publish();
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        admin.metrics.render(),
    )
        .into_response()
}

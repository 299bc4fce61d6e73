//! The read-only JSON API: transfers (filtered and paginated newest first, with a cursor), one
//! transfer with its audit events, and users with their keys' fingerprints (public keys only ever
//! exist here; there is no private material to leak). Its OpenAPI document is served as written here.

use std::time::SystemTime;

use axum::Json;
use axum::extract::{Path, Query};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use russh::keys::HashAlg;
use serde::{Deserialize, Serialize};

use super::{Peer, Shared, refusal};
use crate::state::{Job, JobFilter, JobState};

/// Transfers per page unless `limit` says otherwise, and the most one page holds.
const DEFAULT_PAGE: u32 = 50;
const MAX_PAGE: u32 = 500;

/// One transfer as the API shows it.
#[derive(Debug, Serialize)]
pub struct Transfer {
    pub id: i64,
    pub user: String,
    pub path: String,
    pub size: u64,
    pub sha256: String,
    pub state: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verdict: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signature: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub engine: Option<String>,
    pub received_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scanned_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delivered_to: Option<String>,
    pub attempts: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

impl From<Job> for Transfer {
    fn from(job: Job) -> Transfer {
        Transfer {
            id: job.id,
            user: job.username,
            path: format!("/{}", job.path),
            size: job.size,
            sha256: job.sha256,
            state: job.state.to_string(),
            verdict: job
                .verdict
                .as_ref()
                .map(|verdict| verdict.state().to_string()),
            signature: job
                .verdict
                .as_ref()
                .and_then(|verdict| verdict.detail())
                .map(str::to_string),
            engine: job.engine,
            received_at: job.received_at,
            scanned_at: job.scanned_at,
            finished_at: job.finished_at,
            delivered_to: job.routed_to,
            attempts: job.attempts,
            last_error: job.last_error,
        }
    }
}

#[derive(Debug, Deserialize)]
pub struct TransfersQuery {
    user: Option<String>,
    state: Option<String>,
    since: Option<String>,
    limit: Option<u32>,
    cursor: Option<String>,
}

fn bad_request(message: String) -> Response {
    (
        StatusCode::BAD_REQUEST,
        Json(serde_json::json!({ "error": message })),
    )
        .into_response()
}

fn unavailable(error: impl std::fmt::Display) -> Response {
    tracing::error!(%error, "admin API: the state database failed");
    (
        StatusCode::SERVICE_UNAVAILABLE,
        Json(serde_json::json!({ "error": "the state database does not answer; see the service log" })),
    )
        .into_response()
}

/// `since`: an RFC 3339 time, or a duration back from now such as `24h`.
fn parse_since(text: &str) -> Result<String, String> {
    let at = match humantime::parse_rfc3339_weak(text) {
        Ok(at) => at,
        Err(_) => {
            let ago = humantime::parse_duration(text).map_err(|_| {
                format!(
                    "since={text:?} is neither a time (2026-12-04T10:00:00Z) nor a duration (24h)"
                )
            })?;
            SystemTime::now()
                .checked_sub(ago)
                .ok_or_else(|| format!("since={text:?} reaches back too far"))?
        }
    };
    Ok(humantime::format_rfc3339_millis(at).to_string())
}

/// Builds the job filter of a transfers query (one more than the page, to see if another follows).
fn job_filter(query: &TransfersQuery) -> Result<(JobFilter, u32), String> {
    let state = match query.state.as_deref() {
        None | Some("") => None,
        Some(text) => Some(JobState::parse(text).ok_or_else(|| {
            let states: Vec<_> = JobState::ALL.iter().map(|state| state.as_str()).collect();
            format!(
                "state={text:?} is not a state; use one of {}",
                states.join(", ")
            )
        })?),
    };
    let since = query
        .since
        .as_deref()
        .filter(|text| !text.is_empty())
        .map(parse_since)
        .transpose()?;
    let before_id = query
        .cursor
        .as_deref()
        .filter(|text| !text.is_empty())
        .map(|text| {
            text.parse::<i64>()
                .map_err(|_| format!("cursor={text:?} is not a cursor this API gave"))
        })
        .transpose()?;
    let page = query.limit.unwrap_or(DEFAULT_PAGE);
    if !(1..=MAX_PAGE).contains(&page) {
        return Err(format!("limit={page} is outside 1..={MAX_PAGE}"));
    }
    Ok((
        JobFilter {
            username: query.user.clone().filter(|user| !user.is_empty()),
            state,
            since,
            before_id,
            limit: Some(page + 1),
        },
        page,
    ))
}

pub async fn transfers(
    admin: Shared,
    peer: Peer,
    headers: HeaderMap,
    Query(query): Query<TransfersQuery>,
) -> Response {
    if let Some(refused) = refusal(&admin.0, peer.0.0, &headers, "/api/transfers") {
        return refused;
    }
    let (filter, page) = match job_filter(&query) {
        Ok(parsed) => parsed,
        Err(message) => return bad_request(message),
    };
    let mut jobs = match admin.0.state.jobs(&filter).await {
        Ok(jobs) => jobs,
        Err(error) => return unavailable(error),
    };
    let more = jobs.len() > page as usize;
    jobs.truncate(page as usize);
    let next_cursor = more
        .then(|| jobs.last().map(|job| job.id.to_string()))
        .flatten();
    let transfers: Vec<Transfer> = jobs.into_iter().map(Transfer::from).collect();
    Json(serde_json::json!({ "transfers": transfers, "next_cursor": next_cursor })).into_response()
}

pub async fn transfer(
    admin: Shared,
    peer: Peer,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    if let Some(refused) = refusal(&admin.0, peer.0.0, &headers, "/api/transfers/{id}") {
        return refused;
    }
    let Ok(id) = id.parse::<i64>() else {
        return bad_request(format!("{id:?} is not a transfer id (a number)"));
    };
    let job = match admin.0.state.job(id).await {
        Ok(Some(job)) => job,
        Ok(None) => {
            return (
                StatusCode::NOT_FOUND,
                Json(serde_json::json!({ "error": format!("there is no transfer {id}") })),
            )
                .into_response();
        }
        Err(error) => return unavailable(error),
    };
    let events: Vec<serde_json::Value> = match admin.0.state.job_events(id).await {
        Ok(events) => events
            .iter()
            .filter_map(|event| serde_json::from_str(&event.line).ok())
            .collect(),
        Err(error) => return unavailable(error),
    };
    Json(serde_json::json!({ "transfer": Transfer::from(job), "events": events })).into_response()
}

/// One user as the API shows it.
#[derive(Debug, Serialize)]
struct UserSummary {
    username: String,
    name: String,
    email: String,
    key_fingerprints: Vec<String>,
    allowed_ips: Vec<String>,
    destination: String,
    download_area: bool,
    alert_targets: Vec<String>,
}

pub async fn users(admin: Shared, peer: Peer, headers: HeaderMap) -> Response {
    if let Some(refused) = refusal(&admin.0, peer.0.0, &headers, "/api/users") {
        return refused;
    }
    let users: Vec<UserSummary> = admin
        .0
        .users
        .current()
        .iter()
        .map(|user| UserSummary {
            username: user.username.clone(),
            name: user.name.clone(),
            email: user.email.clone(),
            key_fingerprints: user
                .ssh_keys
                .iter()
                .map(|key| key.fingerprint(HashAlg::Sha256).to_string())
                .collect(),
            allowed_ips: user.allowed_ips.iter().map(ToString::to_string).collect(),
            destination: user.destination.to_string(),
            download_area: user.egress.is_some(),
            alert_targets: user
                .notify
                .iter()
                .map(|target| target.channel.describe())
                .collect(),
        })
        .collect();
    Json(serde_json::json!({ "users": users })).into_response()
}

/// The OpenAPI 3.1 description of this API.
pub async fn openapi() -> Json<serde_json::Value> {
    let error = serde_json::json!({ "$ref": "#/components/schemas/Error" });
    let refused = serde_json::json!({
        "401": { "description": "missing or wrong token", "content": { "application/json": { "schema": error } } },
        "403": { "description": "no token is configured: the API is closed", "content": { "application/json": { "schema": error } } },
    });
    let mut list_responses = refused.clone();
    list_responses["200"] = serde_json::json!({
        "description": "a page of transfers, newest first",
        "content": { "application/json": { "schema": {
            "type": "object",
            "properties": {
                "transfers": { "type": "array", "items": { "$ref": "#/components/schemas/Transfer" } },
                "next_cursor": { "type": ["string", "null"], "description": "pass as `cursor` for the next page; null on the last" }
            }
        } } }
    });
    list_responses["400"] =
        serde_json::json!({ "description": "a parameter is invalid; `error` says which and why" });
    let mut one_responses = refused.clone();
    one_responses["200"] = serde_json::json!({
        "description": "the transfer and its audit events, oldest first",
        "content": { "application/json": { "schema": {
            "type": "object",
            "properties": {
                "transfer": { "$ref": "#/components/schemas/Transfer" },
                "events": { "type": "array", "items": { "type": "object" } }
            }
        } } }
    });
    one_responses["404"] = serde_json::json!({ "description": "no such transfer" });
    let mut users_responses = refused;
    users_responses["200"] = serde_json::json!({
        "description": "the configured users; public-key fingerprints only",
        "content": { "application/json": { "schema": {
            "type": "object",
            "properties": { "users": { "type": "array", "items": { "$ref": "#/components/schemas/User" } } }
        } } }
    });
    let states: Vec<_> = JobState::ALL.iter().map(|state| state.as_str()).collect();
    Json(serde_json::json!({
        "openapi": "3.1.0",
        "info": {
            "title": "ingestion admin API",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Read-only view of transfers and users. Send `Authorization: Bearer <token>`, the token held by the environment variable named in [admin] token_env."
        },
        "components": {
            "securitySchemes": { "token": { "type": "http", "scheme": "bearer" } },
            "schemas": {
                "Error": { "type": "object", "properties": { "error": { "type": "string" } } },
                "Transfer": {
                    "type": "object",
                    "required": ["id", "user", "path", "size", "sha256", "state", "received_at", "attempts"],
                    "properties": {
                        "id": { "type": "integer" },
                        "user": { "type": "string" },
                        "path": { "type": "string", "description": "inside the user's home, starting with /" },
                        "size": { "type": "integer" },
                        "sha256": { "type": "string" },
                        "state": { "type": "string", "enum": states },
                        "verdict": { "type": "string", "enum": ["clean", "infected", "unscannable"] },
                        "signature": { "type": "string", "description": "what the scanner found (infected) or why it could not scan" },
                        "engine": { "type": "string" },
                        "received_at": { "type": "string", "format": "date-time" },
                        "scanned_at": { "type": "string", "format": "date-time" },
                        "finished_at": { "type": "string", "format": "date-time" },
                        "delivered_to": { "type": "string" },
                        "attempts": { "type": "integer" },
                        "last_error": { "type": "string" }
                    }
                },
                "User": {
                    "type": "object",
                    "properties": {
                        "username": { "type": "string" },
                        "name": { "type": "string" },
                        "email": { "type": "string" },
                        "key_fingerprints": { "type": "array", "items": { "type": "string" } },
                        "allowed_ips": { "type": "array", "items": { "type": "string" } },
                        "destination": { "type": "string" },
                        "download_area": { "type": "boolean" },
                        "alert_targets": { "type": "array", "items": { "type": "string" } }
                    }
                }
            }
        },
        "security": [{ "token": [] }],
        "paths": {
            "/api/transfers": { "get": {
                "summary": "List transfers, newest first",
                "parameters": [
                    { "name": "user", "in": "query", "schema": { "type": "string" } },
                    { "name": "state", "in": "query", "schema": { "type": "string", "enum": states } },
                    { "name": "since", "in": "query", "description": "an RFC 3339 time, or a duration back from now such as 24h", "schema": { "type": "string" } },
                    { "name": "limit", "in": "query", "schema": { "type": "integer", "minimum": 1, "maximum": MAX_PAGE, "default": DEFAULT_PAGE } },
                    { "name": "cursor", "in": "query", "description": "next_cursor of the previous page", "schema": { "type": "string" } }
                ],
                "responses": list_responses
            } },
            "/api/transfers/{id}": { "get": {
                "summary": "One transfer and its audit events",
                "parameters": [ { "name": "id", "in": "path", "required": true, "schema": { "type": "integer" } } ],
                "responses": one_responses
            } },
            "/api/users": { "get": { "summary": "The configured users", "responses": users_responses } }
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(state: Option<&str>, since: Option<&str>, limit: Option<u32>) -> TransfersQuery {
        TransfersQuery {
            user: None,
            state: state.map(str::to_string),
            since: since.map(str::to_string),
            limit,
            cursor: Some("40".into()),
        }
    }

    #[test]
    fn queries_are_checked_and_turned_into_filters() {
        let (filter, page) = job_filter(&query(
            Some("delivered"),
            Some("2026-12-04T10:00:00Z"),
            None,
        ))
        .unwrap();
        assert_eq!(page, DEFAULT_PAGE);
        assert_eq!(filter.limit, Some(DEFAULT_PAGE + 1));
        assert_eq!(filter.state, Some(JobState::Delivered));
        assert_eq!(filter.since.as_deref(), Some("2026-12-04T10:00:00.000Z"));
        assert_eq!(filter.before_id, Some(40));
        assert!(filter_error(query(Some("lost"), None, None)).contains("delivered"));
        assert!(filter_error(query(None, Some("yesterday"), None)).contains("24h"));
        assert!(filter_error(query(None, None, Some(0))).contains("1..=500"));
        assert!(
            job_filter(&query(None, Some("24h"), None))
                .unwrap()
                .0
                .since
                .is_some()
        );
    }

    fn filter_error(query: TransfersQuery) -> String {
        job_filter(&query).err().unwrap()
    }
}

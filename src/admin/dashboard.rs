//! The status dashboard: server-rendered HTML, no JavaScript at all. A login form exchanges the admin
//! token for a signed HttpOnly, SameSite=Strict cookie; the page shows the last 24 hours' totals,
//! recent transfers, the quarantine, stuck jobs and each dependency's health.
//!
//! Every user-controlled string (file names, user names, signatures, errors) goes through
//! [`escape`]; every page is sent with a Content-Security-Policy that allows no scripts, no inline
//! styles and nothing from elsewhere, so even a missed escape could not run anything.

use std::fmt::Write as _;
use std::time::Duration;

use axum::Form;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::health::readiness;
use super::{Admin, COOKIE, Peer, Refusal, SESSION_LIFETIME, Shared, peer_subject};
use crate::audit::Event;
use crate::state::{Job, JobFilter, JobState};

const CSP: &str = "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; \
                   frame-ancestors 'none'; base-uri 'none'";
const ROWS: u32 = 50;

/// HTML-escapes text for element content and quoted attribute values.
pub fn escape(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => escaped.push_str("&amp;"),
            '<' => escaped.push_str("&lt;"),
            '>' => escaped.push_str("&gt;"),
            '"' => escaped.push_str("&quot;"),
            '\'' => escaped.push_str("&#39;"),
            _ => escaped.push(c),
        }
    }
    escaped
}

/// An HTML page with the dashboard's security headers.
fn html(status: StatusCode, title: &str, body: &str) -> Response {
    let page = format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{}</title><link rel=\"stylesheet\" href=\"/dashboard.css\"></head>\
         <body>{body}</body></html>\n",
        escape(title)
    );
    (
        status,
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CONTENT_SECURITY_POLICY, CSP),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
            (header::CACHE_CONTROL, "no-store"),
            (header::X_FRAME_OPTIONS, "DENY"),
        ],
        page,
    )
        .into_response()
}

fn login_page(status: StatusCode, message: Option<&str>) -> Response {
    let notice = message.map_or(String::new(), |message| {
        format!("<p class=\"error\">{}</p>", escape(message))
    });
    html(
        status,
        "ingestion: sign in",
        &format!(
            "<main class=\"login\"><h1>ingestion</h1>{notice}\
             <form method=\"post\" action=\"/login\">\
             <label for=\"token\">Admin token</label>\
             <input type=\"password\" id=\"token\" name=\"token\" autocomplete=\"current-password\" required>\
             <button type=\"submit\">Sign in</button></form></main>"
        ),
    )
}

#[derive(Deserialize)]
pub struct Login {
    token: String,
}

pub async fn login(admin: Shared, peer: Peer, Form(login): Form<Login>) -> Response {
    let admin = admin.0;
    if admin.token.is_none() {
        return login_page(StatusCode::FORBIDDEN, Some(Refusal::Closed.message()));
    }
    if !admin.token_matches(login.token.trim()) {
        admin.audit_refusal(peer.0.0, "/login", Refusal::Wrong.message());
        return login_page(StatusCode::UNAUTHORIZED, Some("That token is wrong."));
    }
    let Some(session) = admin.new_session() else {
        return login_page(StatusCode::FORBIDDEN, Some(Refusal::Closed.message()));
    };
    admin
        .audit
        .record(&peer_subject(peer.0.0), Event::AdminLogin {});
    let cookie = format!(
        "{COOKIE}={session}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}",
        SESSION_LIFETIME.as_secs()
    );
    (
        StatusCode::SEE_OTHER,
        [
            (header::LOCATION, "/".to_string()),
            (header::SET_COOKIE, cookie),
        ],
    )
        .into_response()
}

pub async fn logout() -> Response {
    (
        StatusCode::SEE_OTHER,
        [
            (header::LOCATION, "/".to_string()),
            (
                header::SET_COOKIE,
                format!("{COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0"),
            ),
        ],
    )
        .into_response()
}

pub async fn stylesheet() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "max-age=3600"),
        ],
        STYLE,
    )
        .into_response()
}

pub async fn page(admin: Shared, headers: HeaderMap) -> Response {
    let admin = admin.0;
    if admin.token.is_none() {
        return login_page(StatusCode::FORBIDDEN, Some(Refusal::Closed.message()));
    }
    if !admin.session_valid(&headers) {
        return login_page(StatusCode::OK, None);
    }
    match render(&admin).await {
        Ok(body) => html(StatusCode::OK, "ingestion: status", &body),
        Err(error) => {
            tracing::error!(%error, "dashboard: the state database failed");
            html(
                StatusCode::SERVICE_UNAVAILABLE,
                "ingestion: status",
                "<main><h1>ingestion</h1><p class=\"error\">The state database does not answer; \
                 see the service log and <a href=\"/readyz\">/readyz</a>.</p></main>",
            )
        }
    }
}

async fn render(admin: &std::sync::Arc<Admin>) -> Result<String, crate::state::StateError> {
    let since = crate::state::time_ago(Duration::from_secs(24 * 3600));
    let latest = |state: Option<JobState>| JobFilter {
        state,
        limit: Some(ROWS),
        ..JobFilter::default()
    };
    let (recent, quarantined) = (latest(None), latest(Some(JobState::Quarantined)));
    let stuck_before = crate::state::time_ago(admin.stuck_after);
    let (health, totals, recent, quarantined, stuck) = tokio::join!(
        readiness(admin),
        admin.state.job_totals(Some(&since)),
        admin.state.jobs(&recent),
        admin.state.jobs(&quarantined),
        admin.state.stuck_jobs(&stuck_before, ROWS),
    );
    let (totals, recent, quarantined, stuck) = (totals?, recent?, quarantined?, stuck?);
    let mut body = String::from(
        "<header><h1>ingestion</h1><form method=\"post\" action=\"/logout\">\
         <button type=\"submit\">Sign out</button></form></header><main>",
    );

    let received: i64 = totals.iter().map(|total| total.jobs).sum();
    let bytes: i64 = totals.iter().map(|total| total.bytes).sum();
    let count = |state: JobState| {
        totals
            .iter()
            .filter(|total| total.state == state.as_str())
            .map(|total| total.jobs)
            .sum::<i64>()
    };
    let _ = write!(
        body,
        "<section><h2>Last 24 hours</h2><dl class=\"totals\" id=\"totals\">\
         <div><dt>Received</dt><dd>{received}</dd></div>\
         <div><dt>Bytes</dt><dd>{}</dd></div>\
         <div><dt>Delivered</dt><dd>{}</dd></div>\
         <div><dt>Quarantined</dt><dd>{}</dd></div>\
         <div><dt>Failing</dt><dd>{}</dd></div></dl></section>",
        escape(&bytesize::ByteSize(u64::try_from(bytes).unwrap_or(0)).to_string()),
        count(JobState::Delivered),
        count(JobState::Quarantined),
        count(JobState::Failed),
    );

    let _ = write!(
        body,
        "<section><h2>Health</h2><p class=\"{}\">{}</p><table id=\"health\"><thead><tr>\
         <th>Dependency</th><th>Required</th><th>Status</th><th>Latency</th><th>Error</th>\
         </tr></thead><tbody>",
        if health.ready { "ok" } else { "error" },
        if health.ready { "Ready" } else { "Not ready" },
    );
    for check in &health.checks {
        let _ = write!(
            body,
            "<tr><td>{}</td><td>{}</td><td class=\"{}\">{}</td><td>{} ms</td><td>{}</td></tr>",
            escape(check.name),
            if check.required { "yes" } else { "no" },
            if check.ok { "ok" } else { "error" },
            if check.ok { "ok" } else { "failing" },
            check.latency_ms,
            escape(check.error.as_deref().unwrap_or("")),
        );
    }
    body.push_str("</tbody></table></section>");

    transfers_table(&mut body, "Recent transfers", "transfers", &recent);
    transfers_table(&mut body, "Quarantine", "quarantine", &quarantined);
    transfers_table(&mut body, "Stuck jobs", "stuck", &stuck);
    body.push_str("</main>");
    Ok(body)
}

fn transfers_table(body: &mut String, title: &str, id: &str, jobs: &[Job]) {
    let _ = write!(
        body,
        "<section><h2>{}</h2><table id=\"{}\"><thead><tr><th>#</th><th>Received</th><th>User</th>\
         <th>File</th><th>Size</th><th>State</th><th>Verdict</th></tr></thead><tbody>",
        escape(title),
        escape(id),
    );
    for job in jobs {
        let verdict =
            job.verdict
                .as_ref()
                .map_or(String::new(), |verdict| match verdict.detail() {
                    Some(detail) => format!("{} ({detail})", verdict.state()),
                    None => verdict.state().to_string(),
                });
        let _ = write!(
            body,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td class=\"path\">/{}</td><td>{}</td>\
             <td class=\"state-{}\">{}</td><td>{}</td></tr>",
            job.id,
            escape(&job.received_at),
            escape(&job.username),
            escape(&job.path),
            escape(&bytesize::ByteSize(job.size).to_string()),
            job.state.as_str(),
            job.state.as_str(),
            escape(&verdict),
        );
    }
    if jobs.is_empty() {
        body.push_str("<tr><td colspan=\"7\" class=\"empty\">None</td></tr>");
    }
    body.push_str("</tbody></table></section>");
}

const STYLE: &str = "\
body{font-family:system-ui,sans-serif;margin:0;color:#1b1f24;background:#f6f7f9}\
header{display:flex;justify-content:space-between;align-items:center;padding:0 1.5rem;background:#1b1f24;color:#fff}\
header h1{font-size:1.2rem}\
main{padding:1rem 1.5rem}\
main.login{max-width:22rem;margin:4rem auto;background:#fff;border-radius:8px;padding:2rem}\
main.login input{display:block;width:100%;margin:.5rem 0 1rem;padding:.5rem;box-sizing:border-box}\
section{margin-bottom:2rem}\
h2{font-size:1rem;text-transform:uppercase;letter-spacing:.05em;color:#555}\
table{border-collapse:collapse;width:100%;background:#fff}\
th,td{text-align:left;padding:.35rem .6rem;border-bottom:1px solid #e3e6ea;font-size:.9rem}\
td.path{font-family:ui-monospace,monospace;word-break:break-all}\
.totals{display:flex;gap:1rem;margin:0}\
.totals div{background:#fff;border-radius:6px;padding:.8rem 1.2rem}\
.totals dt{color:#555;font-size:.8rem}.totals dd{margin:0;font-size:1.4rem}\
.ok{color:#1a7f37}.error{color:#cf222e}.empty{color:#888}\
.state-quarantined,.state-failed{color:#cf222e}.state-delivered{color:#1a7f37}\
button{padding:.4rem 1rem}\
";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markup_in_names_becomes_text() {
        assert_eq!(
            escape("<img src=x onerror=alert(1)>.csv"),
            "&lt;img src=x onerror=alert(1)&gt;.csv"
        );
        assert_eq!(escape("a\"b'c&d"), "a&quot;b&#39;c&amp;d");
    }

    #[test]
    fn a_transfer_row_escapes_every_field() {
        let job = Job {
            username: "<u>".into(),
            path: "<script>x</script>.csv".into(),
            received_at: "<t>".into(),
            verdict: Some(crate::state::Verdict::Infected {
                signature: "<sig>".into(),
            }),
            ..Job::example(JobState::Quarantined)
        };
        let mut body = String::new();
        transfers_table(&mut body, "T", "t", &[job]);
        assert!(!body.contains("<script>") && !body.contains("<u>") && !body.contains("<sig>"));
        assert!(body.contains("&lt;script&gt;x&lt;/script&gt;.csv"));
    }
}

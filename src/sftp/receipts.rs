//! Receipts: the read-only `/.receipts` folder at the root of every user's SFTP view, with one small
//! text file per upload of theirs telling what became of it.
//!
//! The folder mirrors the home: the upload `/sub/data.csv` has the receipt `/.receipts/sub/data.csv.txt`,
//! made from the latest job of that path (`State::receipt_job`). This module names receipts and
//! writes their text; `fs` decides what a path inside `/.receipts` is and refuses every change there.
//! A receipt says when the file was received, its size and SHA-256, and its outcome: never where it
//! was delivered, never an internal error, and the scanner's signature name only when the operator
//! allows it (`[receipts] show_signature`).

use std::fmt::Write as _;

use crate::state::{Job, JobState, Verdict};

/// The folder's name at the root of the view.
pub const RECEIPTS_DIR: &str = ".receipts";

/// What a receipt's name adds to the name of the upload it tells about.
pub const SUFFIX: &str = ".txt";

/// Why nothing inside `/.receipts` can be changed.
pub const READ_ONLY: &str = "/.receipts is read-only: it holds receipts of your uploads";

/// The name of the receipt of an upload named `upload`.
pub fn receipt_name(upload: &str) -> String {
    format!("{upload}{SUFFIX}")
}

/// The name of the upload a receipt named `receipt` tells about, if it is a receipt's name.
pub fn upload_name(receipt: &str) -> Option<&str> {
    receipt
        .strip_suffix(SUFFIX)
        .filter(|upload| !upload.is_empty())
}

/// The text of the receipt of `job`, whose file the user sees as `shown` (`/sub/data.csv`, or
/// `/upload/sub/data.csv` for a user with a download area). UTF-8 `key: value` lines, each ending in
/// a newline; values are kept on their line (control characters become `?`).
pub fn render(job: &Job, shown: &str, show_signature: bool) -> String {
    let mut text = String::new();
    let mut line = |key: &str, value: &str| {
        let _ = writeln!(text, "{key}: {}", one_line(value));
    };
    line("file", shown);
    line("received", &job.received_at);
    line("size", &format!("{} bytes", job.size));
    // A file adopted from landing without a job has its SHA-256 only once it is scanned.
    if !job.sha256.is_empty() {
        line("sha256", &job.sha256);
    }
    line("outcome", &outcome(job));
    if show_signature
        && job.state == JobState::Quarantined
        && let Some(Verdict::Infected { signature }) = &job.verdict
        && !signature.is_empty()
    {
        line("signature", signature);
    }
    text
}

/// What became of the job, for its owner: the final state and when, or why it is still waiting.
fn outcome(job: &Job) -> String {
    let at = |time: &Option<String>| {
        time.as_deref()
            .map(|time| format!(" at {time}"))
            .unwrap_or_default()
    };
    match job.state {
        JobState::Delivered => format!("delivered{}", at(&job.finished_at)),
        JobState::Quarantined => {
            let reason = match job.verdict {
                Some(Verdict::Infected { .. }) => " (infected)",
                Some(Verdict::Unscannable { .. }) => " (unscannable)",
                Some(Verdict::Clean) | None => "",
            };
            format!("quarantined{}{reason}", at(&job.finished_at))
        }
        JobState::Failed => "failed (the operator has been alerted)".into(),
        JobState::Held
        | JobState::Landed
        | JobState::Clean
        | JobState::Infected
        | JobState::Unscannable
            if job.attempts > 0 =>
        {
            "pending (being retried after an error)".into()
        }
        JobState::Held | JobState::Landed => "pending (waiting to be scanned)".into(),
        // Scanned, and about to be delivered or quarantined: which one is told once it is done.
        JobState::Clean | JobState::Infected | JobState::Unscannable => {
            "pending (scanned, being processed)".into()
        }
        // Never shown (`State::receipt_job` skips them), but named truthfully all the same.
        JobState::Superseded => "replaced by a later upload before it was scanned".into(),
        JobState::Removed => "removed before it was scanned".into(),
    }
}

/// `value` with control characters (a newline would start a line of its own) replaced by `?`.
fn one_line(value: &str) -> String {
    value
        .chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

/// When the receipt last changed, in Unix seconds, for its listing (0 if unknown).
pub fn modified(job: &Job) -> u32 {
    humantime::parse_rfc3339(&job.updated_at)
        .ok()
        .and_then(|time| time.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |since| {
            u32::try_from(since.as_secs()).unwrap_or(u32::MAX)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(state: JobState) -> Job {
        Job::example(state)
    }

    fn delivered() -> Job {
        let mut job = job(JobState::Delivered);
        job.verdict = Some(Verdict::Clean);
        job.engine = Some("clamd".into());
        job.routed_to = Some("s3://team-bucket/acme/sub/data.csv".into());
        job.route_key = Some("acme/sub/data.csv".into());
        job.finished_at = Some("2026-12-04T21:00:01.456Z".into());
        job
    }

    fn quarantined(verdict: Verdict) -> Job {
        let mut job = job(JobState::Quarantined);
        job.verdict = Some(verdict);
        job.routed_to = Some("s3://landing-bucket-quarantine/acme/sub/data.csv".into());
        job.finished_at = Some("2026-12-04T21:00:02.000Z".into());
        job
    }

    fn outcome_line(text: &str) -> &str {
        text.lines()
            .find_map(|line| line.strip_prefix("outcome: "))
            .unwrap()
    }

    #[test]
    fn a_delivered_receipt_in_full() {
        let text = render(&delivered(), "/sub/data.csv", true);
        assert_eq!(
            text,
            format!(
                "file: /sub/data.csv\nreceived: 2026-12-04T21:00:00.123Z\nsize: 1234 bytes\n\
                 sha256: {}\noutcome: delivered at 2026-12-04T21:00:01.456Z\n",
                "ab".repeat(32)
            )
        );
        assert!(!text.contains("team-bucket") && !text.contains("clamd"));
    }

    #[test]
    fn quarantined_receipts_name_the_reason_and_the_signature_only_when_allowed() {
        let infected = quarantined(Verdict::Infected {
            signature: "Eicar-Test-Signature".into(),
        });
        let hidden = render(&infected, "/sub/data.csv", false);
        assert_eq!(
            outcome_line(&hidden),
            "quarantined at 2026-12-04T21:00:02.000Z (infected)"
        );
        assert!(!hidden.contains("signature") && !hidden.contains("Eicar"));
        assert!(!hidden.contains("quarantine/") && !hidden.contains("s3://"));
        let shown = render(&infected, "/sub/data.csv", true);
        assert!(
            shown.ends_with("(infected)\nsignature: Eicar-Test-Signature\n"),
            "{shown}"
        );

        let unscannable = quarantined(Verdict::Unscannable {
            reason: "clamd: INSTREAM size limit exceeded at 10.0.0.7".into(),
        });
        for show_signature in [false, true] {
            let text = render(&unscannable, "/sub/data.csv", show_signature);
            assert_eq!(
                outcome_line(&text),
                "quarantined at 2026-12-04T21:00:02.000Z (unscannable)"
            );
            assert!(
                !text.contains("signature") && !text.contains("clamd"),
                "{text}"
            );
        }
    }

    #[test]
    fn waiting_and_failed_jobs_say_so_without_the_error() {
        let cases = [
            (JobState::Held, 0, "pending (waiting to be scanned)"),
            (JobState::Landed, 0, "pending (waiting to be scanned)"),
            (
                JobState::Landed,
                3,
                "pending (being retried after an error)",
            ),
            (JobState::Clean, 1, "pending (being retried after an error)"),
            (JobState::Clean, 0, "pending (scanned, being processed)"),
            (JobState::Infected, 0, "pending (scanned, being processed)"),
            (
                JobState::Failed,
                20,
                "failed (the operator has been alerted)",
            ),
        ];
        for (state, attempts, expected) in cases {
            let mut job = job(state);
            job.attempts = attempts;
            job.last_error = Some("PUT s3://team-bucket/acme: AccessDenied".into());
            let text = render(&job, "/sub/data.csv", true);
            assert_eq!(outcome_line(&text), expected, "{state} after {attempts}");
            assert!(
                !text.contains("AccessDenied") && !text.contains("team-bucket"),
                "{text}"
            );
        }
    }

    #[test]
    fn a_time_or_digest_the_job_lacks_is_left_out() {
        let mut job = delivered();
        job.finished_at = None;
        job.sha256 = String::new();
        let text = render(&job, "/data.csv", false);
        assert_eq!(outcome_line(&text), "delivered");
        assert!(!text.contains("sha256"), "{text}");
        assert!(text.ends_with('\n'));
    }

    #[test]
    fn values_stay_on_their_line() {
        let mut job = quarantined(Verdict::Infected {
            signature: "Evil\noutcome: delivered".into(),
        });
        job.received_at = "2026\r\n".into();
        let text = render(&job, "/a\nb.csv", true);
        assert_eq!(text.lines().count(), 6, "{text}");
        assert!(text.contains("file: /a?b.csv\n"), "{text}");
        assert!(
            text.contains("signature: Evil?outcome: delivered\n"),
            "{text}"
        );
    }

    #[test]
    fn names() {
        assert_eq!(receipt_name("data.csv"), "data.csv.txt");
        assert_eq!(upload_name("data.csv.txt"), Some("data.csv"));
        assert_eq!(upload_name("notes.txt.txt"), Some("notes.txt"));
        assert_eq!(upload_name(".txt"), None);
        assert_eq!(upload_name("data.csv"), None);
        assert_eq!(modified(&delivered()), 1_796_418_001);
        let mut unknown = delivered();
        unknown.updated_at = "yesterday".into();
        assert_eq!(modified(&unknown), 0);
    }
}

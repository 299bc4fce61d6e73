//! Alerts: who is told what happened to a file (delivered, quarantined, stuck, received), through
//! the outbox, never blocking delivery and never lost.
//!
//! Alerts are built here ([`alerts_for`]) and written by `state` in the same transaction as the
//! outcome they report. The [`Notifier`] sends them in the background with leases and retries
//! (capped backoff, no limit while the failure is temporary; a permanent refusal stops and is
//! audited), and reports jobs that keep failing as `stuck`, once each.
//!
//! Invariant: a down Slack, webhook or SMTP relay never delays a delivery: the pipeline only writes
//! rows; this module alone talks to receivers.

mod message;
mod send;

use std::sync::Arc;
use std::time::Duration;

pub use message::Facts;
pub use send::{SendError, Sender, sign};

use crate::audit::{Audit, Event, Subject};
use crate::config::{Channel, Notify, NotifyTarget, SharedUsers, User};
use crate::state::{Alert, Job, NewAlert, State};

/// A new, random event id.
pub fn event_id() -> String {
    let bytes: [u8; 16] = rand::random();
    crate::storage::hex(&bytes)
}

/// The alerts for `facts`: one per target (the user's and the operators') that wants the event.
pub fn alerts_for(user: Option<&User>, operators: &[NotifyTarget], facts: &Facts) -> Vec<NewAlert> {
    let payload = serde_json::to_string(facts).unwrap_or_default();
    user.map(|user| user.notify.as_slice())
        .unwrap_or_default()
        .iter()
        .chain(operators)
        .filter(|target| target.wants(&facts.event))
        .filter_map(|target| {
            Some(NewAlert {
                event_id: facts.event_id.clone(),
                channel: channel_name(&target.channel).into(),
                target: serde_json::to_string(&target.channel).ok()?,
                kind: facts.event.clone(),
                payload: payload.clone(),
                job: facts.job,
            })
        })
        .collect()
}

fn channel_name(channel: &Channel) -> &'static str {
    match channel {
        Channel::Email { .. } => "email",
        Channel::Slack { .. } => "slack",
        Channel::Webhook { .. } => "webhook",
    }
}

/// The facts of a job at `event`.
pub fn job_facts(job: &Job, event: &str) -> Facts {
    let verdict = job.verdict.as_ref();
    Facts {
        reason: verdict
            .filter(|verdict| verdict.detail().is_some())
            .map(|verdict| verdict.state().to_string()),
        signature: verdict
            .and_then(|verdict| verdict.detail())
            .map(str::to_string),
        scan_engine: job.engine.clone(),
        received_at: job.received_at.clone(),
        last_error: job.last_error.clone(),
        ..Facts::new(
            event,
            &job.username,
            format!("/{}", job.path),
            job.size,
            &job.sha256,
            Some(job.id),
        )
    }
}

/// How long a claimed alert stays with its notifier: a batch is sent concurrently and each send
/// gives up at [`send::SEND_DEADLINE`], so a live notifier is done well within it, and the alerts
/// of a node that died are taken over by another soon after.
const ALERT_LEASE: Duration = Duration::from_secs(send::SEND_DEADLINE.as_secs() + 5);

/// Sends the outbox.
pub struct Notifier {
    state: State,
    settings: Notify,
    users: Arc<SharedUsers>,
    audit: Arc<Audit>,
    sender: Sender,
    owner: String,
}

impl Notifier {
    pub fn new(
        state: State,
        settings: Notify,
        users: Arc<SharedUsers>,
        audit: Arc<Audit>,
    ) -> Notifier {
        let sender = Sender::new(settings.smtp.as_ref(), settings.email_from.clone());
        let node: [u8; 4] = rand::random();
        Notifier {
            state,
            settings,
            users,
            audit,
            sender,
            owner: format!("notifier-{}", crate::storage::hex(&node)),
        }
    }

    /// The lease owner name of this process's notifier.
    pub fn owner(&self) -> &str {
        &self.owner
    }

    /// Sends due alerts and reports stuck jobs, forever.
    pub async fn run(self: Arc<Self>) {
        let stuck = tokio::spawn(self.clone().report_stuck_forever());
        loop {
            let alerts = match self.state.claim_alerts(&self.owner, ALERT_LEASE, 16).await {
                Ok(alerts) => alerts,
                Err(error) => {
                    tracing::error!(%error, "cannot read the outbox");
                    Vec::new()
                }
            };
            if alerts.is_empty() {
                tokio::time::sleep(Duration::from_millis(250)).await;
                continue;
            }
            let mut sending = tokio::task::JoinSet::new();
            for alert in alerts {
                sending.spawn(self.clone().deliver(alert));
            }
            while sending.join_next().await.is_some() {}
            if stuck.is_finished() {
                tracing::error!("the stuck-job reporter stopped");
            }
        }
    }

    async fn deliver(self: Arc<Self>, alert: Alert) {
        let result = match (
            serde_json::from_str::<Channel>(&alert.target),
            serde_json::from_str::<Facts>(&alert.payload),
        ) {
            (Ok(channel), Ok(facts)) => {
                tokio::time::timeout(send::SEND_DEADLINE, self.sender.send(&channel, &facts))
                    .await
                    .unwrap_or_else(|_| {
                        Err(SendError::Retry(format!(
                            "no answer within {}s",
                            send::SEND_DEADLINE.as_secs()
                        )))
                    })
            }
            _ => Err(SendError::Permanent("the outbox row cannot be read".into())),
        };
        let recorded = match &result {
            Ok(()) => {
                crate::telemetry::notification(&alert.channel, "sent");
                self.state.alert_sent(alert.id, &self.owner).await
            }
            Err(error) => {
                let permanent = matches!(error, SendError::Permanent(_));
                crate::telemetry::notification(
                    &alert.channel,
                    if permanent { "failed" } else { "retry" },
                );
                let backoff = Duration::from_secs(1)
                    .saturating_mul(2u32.saturating_pow(alert.attempts.min(12)))
                    .min(Duration::from_secs(300));
                if permanent {
                    self.audit.record(
                        &Subject::default(),
                        Event::AlertFailed {
                            event_id: alert.event_id.clone(),
                            channel: alert.channel.clone(),
                            kind: alert.kind.clone(),
                            error: error.to_string(),
                        },
                    );
                } else {
                    tracing::warn!(event = %alert.event_id, channel = %alert.channel, %error, ?backoff, "alert not sent; will retry");
                }
                self.state
                    .alert_failed(
                        alert.id,
                        &self.owner,
                        &error.to_string(),
                        backoff,
                        permanent,
                    )
                    .await
            }
        };
        if let Err(error) = recorded {
            tracing::error!(%error, "cannot record an alert's outcome; it will be sent again");
        }
    }

    async fn report_stuck_forever(self: Arc<Self>) {
        loop {
            let cutoff = crate::state::time_ago(self.settings.stuck_after);
            let users = self.users.current();
            let operators = self.settings.operators.clone();
            let reported = self
                .state
                .report_stuck(&cutoff, |job| {
                    alerts_for(
                        users.get(&job.username).as_deref(),
                        &operators,
                        &job_facts(job, "stuck"),
                    )
                })
                .await;
            match reported {
                Ok(jobs) => {
                    for job in jobs {
                        self.audit.record(
                            &Subject::of_user(&job.username),
                            Event::JobStuck {
                                job: job.id,
                                path: format!("/{}", job.path),
                                error: job.last_error.clone().unwrap_or_default(),
                            },
                        );
                    }
                }
                Err(error) => tracing::error!(%error, "cannot look for stuck jobs"),
            }
            let period = (self.settings.stuck_after / 4)
                .clamp(Duration::from_secs(1), Duration::from_secs(60));
            tokio::time::sleep(period).await;
        }
    }
}

/// Sends a test alert to each of `user`'s targets now (not through the outbox) and returns each
/// target with its result.
pub async fn test_targets(sender: &Sender, user: &User) -> Vec<(String, Result<(), SendError>)> {
    let facts = Facts::new("test", &user.username, "/".into(), 0, "", None);
    let mut results = Vec::new();
    for target in &user.notify {
        results.push((
            target.channel.describe(),
            sender.send(&target.channel, &facts).await,
        ));
    }
    results
}

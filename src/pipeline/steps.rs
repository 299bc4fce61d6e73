//! The two steps of a job: scan (landing bytes → recorded verdict) and route (copy to the place the
//! verdict names, verify, record, delete from landing, finish). Each step is idempotent: repeating it
//! after a crash at any point converges on the file being in exactly one final place.

use std::time::Instant;

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::ObjectStoreExt;
use object_store::path::Path as ObjectPath;
use sha2::{Digest, Sha256};

use super::Failpoint;

use super::{Pipeline, StepError};
use crate::audit::{Event, Subject};
use crate::state::{Job, JobState, Verdict};
use crate::storage::{Bucket, hex};

/// Characters S3 accepts in tag values (metadata is kept to the same safe set).
fn tag_safe(value: &str) -> String {
    value
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || " +-=._:/@".contains(c) {
                c
            } else {
                '_'
            }
        })
        .take(256)
        .collect()
}

fn verdict_name(verdict: &Verdict) -> &'static str {
    verdict.state().as_str()
}

impl Pipeline {
    fn landing_key(&self, job: &Job) -> ObjectPath {
        let parts: Vec<&str> = std::iter::once(job.username.as_str())
            .chain(job.path.split('/'))
            .collect();
        self.landing.key(&parts)
    }

    /// Scans a `landed` job, then routes it.
    pub(super) async fn work(&self, owner: &str, job: &Job) -> Result<(), StepError> {
        let job = if job.state == JobState::Landed {
            self.scan(owner, job).await?;
            self.state.job(job.id).await?.ok_or(StepError::LeaseLost)?
        } else {
            job.clone()
        };
        self.route(owner, &job).await
    }

    async fn scan(&self, owner: &str, job: &Job) -> Result<(), StepError> {
        let started = Instant::now();
        let object = match self.landing.store().get(&self.landing_key(job)).await {
            Ok(object) => object,
            Err(object_store::Error::NotFound { .. }) => {
                return Err(StepError::Other(format!(
                    "/{} is not in landing, so it cannot be scanned",
                    job.path
                )));
            }
            Err(error) => return Err(error.into()),
        };
        let mut hasher = Sha256::new();
        let mut size: u64 = 0;
        let mut bytes = crate::storage::byte_stream(object).inspect_ok(|chunk: &Bytes| {
            hasher.update(chunk);
            size += chunk.len() as u64;
        });
        let verdict = self.scanner.scan(&mut bytes).await?;
        drop(bytes);
        let whole = size == job.size;
        let sha256 = if whole {
            hex(&hasher.finalize())
        } else {
            String::new()
        };
        if verdict == Verdict::Clean && (!whole || (!job.sha256.is_empty() && sha256 != job.sha256))
        {
            return Err(StepError::Other(format!(
                "the scanner read {size} bytes with SHA-256 {sha256:?} but the upload recorded {} bytes with \
                 {:?}; the file is not delivered",
                job.size, job.sha256
            )));
        }
        let elapsed = i64::try_from(started.elapsed().as_millis()).unwrap_or(i64::MAX);
        let engine = self.scanner.name();
        if !self
            .state
            .record_verdict(job.id, owner, &verdict, engine, elapsed, &sha256)
            .await?
        {
            return Err(StepError::LeaseLost);
        }
        self.audit.record(
            &Subject::of_user(&job.username),
            Event::Scanned {
                job: job.id,
                path: format!("/{}", job.path),
                verdict: verdict_name(&verdict).into(),
                signature: verdict.detail().map(str::to_string),
                engine: engine.into(),
                scan_ms: elapsed,
            },
        );
        Ok(())
    }

    async fn route(&self, owner: &str, job: &Job) -> Result<(), StepError> {
        let verdict = job.verdict.clone().ok_or_else(|| {
            StepError::Other("the job has no verdict; it cannot be routed".into())
        })?;
        let (target, key, final_state) = match verdict {
            Verdict::Clean => {
                let users = self.users.current();
                let user = users.get(&job.username).ok_or_else(|| {
                    StepError::Other(format!(
                        "the user `{}` is not configured any more, so the file has no destination",
                        job.username
                    ))
                })?;
                let bucket =
                    self.destination(&user.destination, user.destination_kms_key.as_deref())?;
                let parts: Vec<&str> = job.path.split('/').collect();
                let key = bucket.key(&parts);
                (bucket, key, JobState::Delivered)
            }
            Verdict::Infected { .. } | Verdict::Unscannable { .. } => {
                let parts: Vec<&str> = std::iter::once(job.username.as_str())
                    .chain(job.path.split('/'))
                    .collect();
                let key = self.quarantine.key(&parts);
                (self.quarantine.clone(), key, JobState::Quarantined)
            }
        };
        let landing_key = self.landing_key(job);
        let key = match job.route_key.as_deref().map(ObjectPath::parse) {
            // A retry goes exactly where the first attempt was going.
            Some(Ok(planned)) => planned,
            _ => {
                let key = match self.on_conflict {
                    crate::config::OnConflict::Overwrite => key,
                    crate::config::OnConflict::Suffix => free_key(&target, key).await?,
                };
                if !self
                    .state
                    .record_route_key(job.id, owner, key.as_ref())
                    .await?
                {
                    return Err(StepError::LeaseLost);
                }
                key
            }
        };
        let url = object_url(&target, &key);
        if let Some(abandoned) = &job.copy_upload {
            // A copy cut short by a crash (or a lost lease): discard its parts before starting over.
            if let Err(error) = target.abort_multipart(&key, abandoned).await {
                tracing::warn!(job = job.id, %error, "cannot abort the multipart upload of an abandoned copy");
            }
            if !self.state.record_copy_upload(job.id, owner, None).await? {
                return Err(StepError::LeaseLost);
            }
        }
        match self.landing.store().get(&landing_key).await {
            Ok(object) => {
                let copied = object.meta.clone();
                self.copy(job, owner, object, &target, key.clone()).await?;
                if !self.state.record_copied(job.id, owner, &url).await? {
                    return Err(StepError::LeaseLost);
                }
                if self.failpoint == Failpoint::PauseAfterCopy {
                    tracing::warn!(
                        job = job.id,
                        "failpoint pause-after-copy: stopping before the delete"
                    );
                    std::future::pending::<()>().await;
                }
                // Remove the landing copy only if it is still the object that was copied: a newer
                // upload of the same name may have replaced it meanwhile, and has a job of its own.
                match self.landing.store().head(&landing_key).await {
                    Ok(now)
                        if now.e_tag == copied.e_tag
                            && now.size == copied.size
                            && now.last_modified == copied.last_modified =>
                    {
                        match self.landing.store().delete(&landing_key).await {
                            Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                            Err(error) => return Err(error.into()),
                        }
                    }
                    Ok(_) => tracing::warn!(
                        job = job.id,
                        "landing object replaced during routing; left for its own job"
                    ),
                    Err(object_store::Error::NotFound { .. }) => {}
                    Err(error) => return Err(error.into()),
                }
            }
            Err(object_store::Error::NotFound { .. }) => {
                // Gone from landing: a crash after the copy. Finish only if the copy is known to be
                // complete (recorded), or the target holds exactly the uploaded bytes.
                let recorded =
                    job.copied_at.is_some() && job.routed_to.as_deref() == Some(url.as_str());
                if !recorded && !holds_bytes(&target, &key, &job.sha256).await? {
                    return Err(StepError::Other(format!(
                        "/{} is gone from landing and {url} does not hold its bytes",
                        job.path
                    )));
                }
            }
            Err(error) => return Err(error.into()),
        }
        let mut facts = crate::notify::job_facts(job, final_state.as_str());
        if final_state == JobState::Delivered {
            facts.destination = Some(url.clone());
        }
        let users = self.users.current();
        let alerts =
            crate::notify::alerts_for(users.get(&job.username).as_deref(), &self.operators, &facts);
        if !self
            .state
            .finish_with_alerts(job.id, owner, final_state, None, &alerts)
            .await?
        {
            return Err(StepError::LeaseLost);
        }
        let path = format!("/{}", job.path);
        if job.verdict == Some(Verdict::Clean) {
            crate::telemetry::delivered(&job.received_at);
        }
        let event = match &job.verdict {
            Some(Verdict::Clean) => Event::Delivered {
                job: job.id,
                path,
                bytes: job.size,
                sha256: job.sha256.clone(),
                destination: url,
            },
            other => Event::Quarantined {
                job: job.id,
                path,
                bytes: job.size,
                sha256: job.sha256.clone(),
                reason: other
                    .as_ref()
                    .map(|verdict| verdict_name(verdict).to_string())
                    .unwrap_or_default(),
                signature: other.as_ref().and_then(Verdict::detail).map(str::to_string),
            },
        };
        self.audit.record(&Subject::of_user(&job.username), event);
        Ok(())
    }

    /// Streams the landing object into the target with bounded memory, publishing it only if its
    /// SHA-256 is the one taken at upload.
    async fn copy(
        &self,
        job: &Job,
        owner: &str,
        object: object_store::GetResult,
        target: &Bucket,
        key: ObjectPath,
    ) -> Result<(), StepError> {
        let verdict = job.verdict.as_ref();
        let mut metadata = vec![
            (
                "ingestion-scan-result",
                verdict.map(verdict_name).unwrap_or_default().to_string(),
            ),
            (
                "ingestion-scan-time",
                job.scanned_at.clone().unwrap_or_default(),
            ),
            (
                "ingestion-scan-engine",
                job.engine.clone().unwrap_or_default(),
            ),
            ("ingestion-sha256", job.sha256.clone()),
            ("ingestion-uploader", job.username.clone()),
            ("ingestion-job", job.id.to_string()),
        ];
        if let Some(detail) = verdict.and_then(Verdict::detail) {
            metadata.push(("ingestion-signature", detail.to_string()));
        }
        let metadata: Vec<(&str, String)> = metadata
            .into_iter()
            .map(|(name, value)| (name, tag_safe(&value)))
            .collect();
        let mut upload = target.upload_with_metadata(key, u64::MAX, &metadata);
        if !job.sha256.is_empty() {
            upload = upload.expect_sha256(&job.sha256);
        }
        let mut stream = crate::storage::byte_stream(object);
        let mut offset = 0u64;
        let mut recorded: Option<String> = None;
        loop {
            let chunk = match stream.try_next().await {
                Ok(Some(chunk)) => chunk,
                Ok(None) => break,
                Err(error) => {
                    upload.abort().await;
                    return Err(error.into());
                }
            };
            let length = chunk.len() as u64;
            if let Err(error) = upload.write(offset, chunk).await {
                upload.abort().await;
                return Err(error.into());
            }
            offset += length;
            // A multipart upload is recorded the moment it exists, so that a node that dies mid-copy
            // leaves a record for whoever takes the job over (see `route`).
            if let Some(progress) = upload.take_progress()
                && recorded.as_deref() != Some(progress.multipart_id.as_str())
            {
                if !self
                    .state
                    .record_copy_upload(job.id, owner, Some(&progress.multipart_id))
                    .await?
                {
                    upload.abort().await;
                    return Err(StepError::LeaseLost);
                }
                recorded = Some(progress.multipart_id);
                if self.failpoint == Failpoint::PauseMidCopy {
                    tracing::warn!(job = job.id, "failpoint pause-mid-copy: stopping mid-copy");
                    std::future::pending::<()>().await;
                }
            }
        }
        upload.finish().await?;
        Ok(())
    }
}

/// `key` if nothing is stored there, else the first of `name (2).ext`, `name (3).ext`, … that is free.
async fn free_key(bucket: &Bucket, key: ObjectPath) -> Result<ObjectPath, StepError> {
    let name = key.filename().unwrap_or_default().to_string();
    let parent: Vec<String> = key.parts().map(|part| part.as_ref().to_string()).collect();
    let parent = parent
        .split_last()
        .map(|(_, rest)| rest.to_vec())
        .unwrap_or_default();
    let mut candidate = key;
    for n in 2..=10_000u32 {
        match bucket.store().head(&candidate).await {
            Err(object_store::Error::NotFound { .. }) => return Ok(candidate),
            Err(error) => return Err(error.into()),
            Ok(_) => {}
        }
        let next = suffixed(&name, n);
        candidate = parent
            .iter()
            .map(String::as_str)
            .chain(std::iter::once(next.as_str()))
            .map(|part| {
                object_store::path::PathPart::parse(part)
                    .unwrap_or_else(|_| object_store::path::PathPart::from(part))
            })
            .collect();
    }
    Err(StepError::Other(format!(
        "no free name for {name} after 10000 tries"
    )))
}

/// `report.csv` → `report (2).csv`; `README` → `README (2)`; `.env` → `.env (2)`.
fn suffixed(name: &str, n: u32) -> String {
    match name.rfind('.') {
        Some(dot) if dot > 0 => format!("{} ({n}){}", &name[..dot], &name[dot..]),
        _ => format!("{name} ({n})"),
    }
}

/// Whether `key` in `bucket` holds bytes with this SHA-256 (never true for an unknown hash).
async fn holds_bytes(bucket: &Bucket, key: &ObjectPath, sha256: &str) -> Result<bool, StepError> {
    if sha256.is_empty() {
        return Ok(false);
    }
    let object = match bucket.store().get(key).await {
        Ok(object) => object,
        Err(object_store::Error::NotFound { .. }) => return Ok(false),
        Err(error) => return Err(error.into()),
    };
    let mut hasher = Sha256::new();
    let mut stream = crate::storage::byte_stream(object);
    while let Some(chunk) = stream.try_next().await? {
        hasher.update(&chunk);
    }
    Ok(hex(&hasher.finalize()) == sha256)
}

/// `s3://bucket/key` or `file:///path` of an object, for records and alerts.
fn object_url(bucket: &Bucket, key: &ObjectPath) -> String {
    match bucket.location() {
        crate::storage::Location::S3 { bucket, .. } => format!("s3://{bucket}/{key}"),
        crate::storage::Location::Local { root } => format!("file://{}/{key}", root.display()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suffixed_names() {
        assert_eq!(suffixed("report.csv", 2), "report (2).csv");
        assert_eq!(suffixed("archive.tar.gz", 3), "archive.tar (3).gz");
        assert_eq!(suffixed("README", 2), "README (2)");
        assert_eq!(suffixed(".env", 2), ".env (2)");
    }

    #[test]
    fn tag_values_are_made_safe() {
        assert_eq!(tag_safe("Eicar-Test-Signature"), "Eicar-Test-Signature");
        assert_eq!(tag_safe("clamd's limit (25M)"), "clamd_s limit _25M_");
        assert_eq!(
            tag_safe("2026-12-04T16:37:03.527Z"),
            "2026-12-04T16:37:03.527Z"
        );
        assert_eq!(tag_safe(&"x".repeat(300)).len(), 256);
    }
}

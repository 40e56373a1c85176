//! Backups the control plane takes of itself: `POST /api/v1/backups`
//! (admin) and the schedule of `--backup-to/--backup-every/--backup-keep`.
//! One backup runs at a time per control plane; the work is
//! `shoal_backup::create`, on this control plane's registry and artifact
//! store, to a destination as this process sees it.

use std::sync::Arc;
use std::time::Duration;

use axum::Extension;
use axum::body::Body;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::Response;
use bytes::Bytes;
use shoal_api::backup::{BackupEvent, BackupRecord, BackupRequest};
use shoal_backup::Destination;
use shoal_http::ApiError;
use shoal_http::extract::Json;

use crate::Control;
use crate::auth::Caller;
use crate::metrics::ResultLabels;

/// When and where a control plane backs itself up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupSchedule {
    /// Destination: a directory or `s3://bucket/prefix`.
    pub to: String,
    /// Time between backups.
    pub every: Duration,
    /// Backups kept at the destination (older ones are pruned).
    pub keep: usize,
}

impl Control {
    /// Takes a backup to `dest`, waiting for one in progress to finish.
    pub async fn backup(
        &self,
        dest: &Destination,
        progress: shoal_backup::Progress<'_>,
    ) -> Result<BackupRecord, shoal_backup::BackupError> {
        let _one_at_a_time = self.backup_lock.lock().await;
        let outcome =
            shoal_backup::create(self.store.as_ref(), &self.artifacts, dest, progress).await;
        let result = if outcome.is_ok() { "ok" } else { "failed" };
        self.metrics
            .backups
            .get_or_create(&ResultLabels { result })
            .inc();
        if outcome.is_ok() {
            self.metrics.last_backup.set(shoal_api::now_millis() / 1000);
        }
        outcome
    }
}

/// Take a backup: the registry at one revision and the artifacts it needs,
/// written to `to` as the control plane sees it. The answer is
/// newline-delimited JSON [`BackupEvent`]s: progress, then the record (or
/// the error). The backup completes even if the caller leaves.
#[utoipa::path(post, path = "/api/v1/backups", request_body = BackupRequest, responses((status = 200, description = "newline-delimited BackupEvent lines", content_type = "application/x-ndjson", body = BackupEvent), (status = 400, description = "no usable destination"), (status = 401, description = "no valid token"), (status = 403, description = "not an admin token")), security(("bearer" = [])))]
pub(crate) async fn create_backup(
    State(control): State<Arc<Control>>,
    Extension(caller): Extension<Caller>,
    Json(request): Json<BackupRequest>,
) -> Result<Response, ApiError> {
    let dest = Destination::open(&request.to).map_err(|e| {
        ApiError::bad_request(format!(
            "cannot use {:?} as a backup destination: {e}",
            request.to
        ))
    })?;
    let (tx, rx) = tokio::sync::mpsc::channel::<BackupEvent>(64);
    tokio::spawn(async move {
        tracing::info!(by = %caller.name, to = %dest.url(), "backup requested");
        let progress_tx = tx.clone();
        let outcome = control
            .backup(&dest, &move |p| {
                // Progress is best effort: a slow reader misses some lines.
                let _ = progress_tx.try_send(BackupEvent::Progress(p));
            })
            .await;
        let last = match outcome {
            Ok(record) => BackupEvent::Done(Box::new(record)),
            Err(e) => {
                tracing::error!(to = %dest.url(), error = %e, "backup failed");
                BackupEvent::Error(e.to_string())
            }
        };
        let _ = tx.send(last).await;
    });
    let lines = futures::stream::unfold(rx, |mut rx| async move {
        let event = rx.recv().await?;
        let mut line = serde_json::to_vec(&event).unwrap_or_default();
        line.push(b'\n');
        Some((Ok::<_, std::io::Error>(Bytes::from(line)), rx))
    });
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/x-ndjson")
        .body(Body::from_stream(lines))
        .map_err(|e| ApiError::internal(e.to_string()))
}

/// Backs up on `schedule` for as long as the control plane runs: the
/// first backup one interval after start, then every interval, each
/// followed by pruning to the newest `keep`.
pub(crate) async fn run_schedule(control: Arc<Control>, schedule: BackupSchedule) {
    let dest = match Destination::open(&schedule.to) {
        Ok(dest) => dest,
        Err(e) => {
            tracing::error!(to = %schedule.to, error = %e, "scheduled backups cannot start");
            return;
        }
    };
    let mut ticks =
        tokio::time::interval_at(tokio::time::Instant::now() + schedule.every, schedule.every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        match control.backup(&dest, &shoal_backup::quiet).await {
            Ok(record) => {
                tracing::info!(backup = %record.id, to = %dest.url(), "scheduled backup taken");
                let _one_at_a_time = control.backup_lock.lock().await;
                match shoal_backup::prune(&dest, schedule.keep).await {
                    Ok(pruned) if !pruned.backups.is_empty() => tracing::info!(
                        removed = pruned.backups.len(),
                        chunks = pruned.chunks,
                        "old backups pruned"
                    ),
                    Ok(_) => {}
                    Err(e) => tracing::error!(error = %e, "pruning old backups failed"),
                }
            }
            Err(e) => tracing::error!(to = %dest.url(), error = %e, "scheduled backup failed"),
        }
    }
}

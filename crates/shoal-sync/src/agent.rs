//! The agent: triggers, the reconcile worker, heartbeats, and the HTTP
//! endpoints it adds to the replica (`/peer/chunks/{id}`, `/sync/nudge`,
//! `/sync/status`).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures::StreamExt;
use shoal_api::fleet::{DesiredState, FailureKind, Heartbeat, Registration, ServingVersion};
use shoal_artifacts::{AsyncCache, ChunkId};
use shoal_client::{ApiClient, ClientError, Conditional, reconnect_backoff as backoff};
use shoal_core::{ModelName, Version, VersionKey};
use shoal_http::extract::Path;
use shoal_http::{ApiError, json_response};
use shoal_replica::store::InstallPolicy;
use shoal_replica::{ArtifactSource, LoadSpec, Replica};

use crate::fetch::{FetchError, Fetcher, Served};
use crate::reconcile::{self, Loaded, Step};

/// Settings of the sync agent.
#[derive(Debug, Clone)]
pub struct SyncConfig {
    /// Control plane base URL.
    pub control: String,
    /// Bearer token for the control plane.
    pub token: Option<String>,
    /// This replica's id.
    pub id: String,
    /// Its region.
    pub region: String,
    /// The address others reach it at (`host:port`).
    pub advertise: String,
    /// Data directory (artifact cache, last desired state).
    pub data_dir: PathBuf,
    /// Polling interval (±10 % jitter); the fallback trigger.
    pub poll_interval: Duration,
    /// Labels to register with.
    pub labels: BTreeMap<String, String>,
    /// Register as a standby (see [`Registration::standby`]).
    pub standby: bool,
    /// What kind of capacity it runs on (see [`Registration::tier`]).
    pub tier: shoal_api::scale::Tier,
    /// NATS server (`nats://HOST:PORT`) whose JetStream carries this
    /// replica's desired states, instead of a watch stream to the control
    /// plane; polling stays the fallback either way.
    pub events: Option<String>,
}

/// How a reconcile ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Everything desired is served.
    Converged,
    /// Some step failed and may succeed if tried again: retry with backoff.
    Retry,
    /// What is missing failed for good (see [`LoadFailureReport::gave_up`]);
    /// wait for a new desired state.
    ///
    /// [`LoadFailureReport::gave_up`]: shoal_api::fleet::LoadFailureReport::gave_up
    GaveUp,
}

/// What a reload tried: the artifact's SHA-256 and the options (`None`:
/// they did not parse).
type Reload = (String, Option<shoal_runtime::LoadOptions>);

/// The sync agent of one replica.
pub struct Agent {
    config: SyncConfig,
    replica: Arc<Replica>,
    fetcher: Arc<Fetcher>,
    client: ApiClient,
    latest: tokio::sync::watch::Sender<Option<DesiredState>>,
    nudge: tokio::sync::Notify,
    /// Highest revision received from the control plane (or the cache).
    seen: AtomicU64,
    /// Revision fully applied.
    applied: AtomicU64,
    heartbeat_ms: AtomicU64,
    /// How long each loaded `model:version` took to fetch, load and warm
    /// (ms), for the heartbeat: the predictive autoscaler leads by it.
    load_ms: std::sync::Mutex<BTreeMap<VersionKey, u64>>,
    /// Served versions that could not be loaded again, with what was
    /// tried (bytes; options, `None` when they did not parse): not tried
    /// again until that changes (the old instance keeps serving).
    failed_reloads: std::sync::Mutex<BTreeMap<VersionKey, Reload>>,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("id", &self.config.id)
            .finish_non_exhaustive()
    }
}

impl Agent {
    /// The artifact cache in `config`'s data directory, opened (creating it)
    /// off the runtime, for [`Agent::new`].
    pub async fn open_cache(config: &SyncConfig) -> Result<AsyncCache, String> {
        AsyncCache::open(&config.data_dir.join("cache"))
            .await
            .map_err(|e| e.to_string())
    }

    /// An agent for `replica`, keeping artifacts in `cache`.
    pub fn new(config: SyncConfig, replica: Arc<Replica>, cache: AsyncCache) -> Arc<Agent> {
        let client = ApiClient::control(&config.control, config.token.clone());
        let fetcher = Fetcher::new(
            cache,
            client.clone(),
            config.id.clone(),
            replica.metrics_registry(),
        );
        Arc::new(Agent {
            config,
            replica,
            fetcher: Arc::new(fetcher),
            client,
            latest: tokio::sync::watch::Sender::new(None),
            nudge: tokio::sync::Notify::new(),
            seen: AtomicU64::new(0),
            applied: AtomicU64::new(0),
            load_ms: std::sync::Mutex::new(BTreeMap::new()),
            failed_reloads: std::sync::Mutex::new(BTreeMap::new()),
            heartbeat_ms: AtomicU64::new(2000),
        })
    }

    /// The endpoints the agent adds to the replica's server.
    /// Chunks (model weights) and the agent's status need one of the
    /// replica's admin tokens, as its admin API does; a nudge only makes
    /// the agent poll sooner, so it stays open for the control plane's push.
    pub fn routes(self: &Arc<Self>) -> Router {
        let guarded = Router::new()
            .route("/peer/chunks/{id}", get(serve_chunk))
            .route("/sync/status", get(status))
            .route_layer(axum::middleware::from_fn_with_state(
                self.replica.clone(),
                shoal_replica::http::require_admin,
            ))
            .with_state(self.clone());
        Router::new()
            .route("/sync/nudge", post(nudge))
            .with_state(self.clone())
            .merge(guarded)
    }

    fn desired_path(&self) -> PathBuf {
        self.config.data_dir.join("desired.json")
    }

    /// Starts every task: restart from the cached desired state, then
    /// register, heartbeat, watch and poll.
    pub fn spawn(self: &Arc<Self>) {
        if let Ok(bytes) = std::fs::read(self.desired_path())
            && let Ok(desired) = serde_json::from_slice::<DesiredState>(&bytes)
        {
            tracing::info!(
                revision = desired.revision,
                "resuming from the last desired state in the data directory"
            );
            self.submit(desired);
        }
        let agent = self.clone();
        shoal_http::supervise("reconcile worker", move || agent.clone().reconcile_worker());
        let agent = self.clone();
        shoal_http::supervise("control-plane link", move || agent.clone().control_loop());
        let agent = self.clone();
        shoal_http::supervise("poll loop", move || agent.clone().poll_loop());
    }

    /// Tells the replica what it must serve to be ready: every version of
    /// `desired` that is not optional.
    fn require(&self, desired: &DesiredState) {
        let named: std::collections::BTreeSet<VersionKey> = desired
            .models
            .iter()
            .flat_map(|m| {
                m.versions
                    .iter()
                    .filter_map(|v| VersionKey::parse(&m.model, &v.version).ok())
            })
            .collect();
        self.replica.forget_failures_except(&named);
        self.failed_reloads
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .retain(|k, _| named.contains(k));
        let required: Vec<(ModelName, Version)> = desired
            .required()
            .filter_map(|(model, version)| {
                Some((ModelName::new(model).ok()?, Version::new(version).ok()?))
            })
            .collect();
        self.replica.require(required);
    }

    /// Offers a desired state; older revisions than one already seen are
    /// ignored, so triggers can race freely. An accepted one sets what the
    /// replica needs to be ready at once: a replica resuming from its data
    /// directory must not answer ready before it has loaded what it had.
    fn submit(&self, desired: DesiredState) {
        let revision = desired.revision;
        let accepted = self.latest.send_if_modified(|latest| {
            let newer = latest
                .as_ref()
                .is_none_or(|l| revision > l.revision || (revision == l.revision && l != &desired));
            if newer {
                *latest = Some(desired.clone());
            }
            newer
        });
        self.seen.fetch_max(revision, Ordering::SeqCst);
        if accepted {
            self.require(&desired);
        }
        if accepted && let Ok(bytes) = serde_json::to_vec(&desired) {
            let tmp = self.desired_path().with_extension("json.tmp");
            let _ = std::fs::write(&tmp, bytes)
                .and_then(|()| std::fs::rename(&tmp, self.desired_path()));
        }
    }

    async fn reconcile_worker(self: Arc<Self>) {
        let mut rx = self.latest.subscribe();
        let mut attempt = 0;
        loop {
            let desired = rx.borrow_and_update().clone();
            if let Some(desired) = desired {
                match self.reconcile(&desired).await {
                    Outcome::Converged | Outcome::GaveUp => attempt = 0,
                    Outcome::Retry => {
                        // Retry failed steps after a backoff, or at once
                        // when a new desired state arrives.
                        attempt += 1;
                        tokio::select! {
                            _ = rx.changed() => {}
                            () = tokio::time::sleep(backoff(attempt + 3)) => {}
                        }
                        continue;
                    }
                }
            }
            if rx.changed().await.is_err() {
                return;
            }
        }
    }

    fn loaded(&self) -> Vec<Loaded> {
        let table = self.replica.store().snapshot();
        table
            .models
            .iter()
            .flat_map(|(name, entry)| {
                entry.versions.values().map(move |v| Loaded {
                    model: name.to_string(),
                    version: v.version.to_string(),
                    sha256: v.sha256.clone(),
                    default: v.version == entry.default,
                    options: v.options.clone(),
                })
            })
            .collect()
    }

    /// Converges on `desired`: the one path every trigger ends in. A
    /// version the replica has given up on (a definite failure, or
    /// transient ones up to the bound) is not tried again until it leaves
    /// the desired state: the rollout that wants it rolls back.
    pub async fn reconcile(&self, desired: &DesiredState) -> Outcome {
        self.require(desired);
        let (mut ok, mut retry) = (true, false);
        for step in reconcile::plan(desired, &self.loaded()) {
            match step {
                Step::Load {
                    model,
                    version,
                    default,
                    reload,
                } => {
                    if self
                        .replica
                        .failure(&model, &version.version)
                        .is_some_and(|f| f.gave_up() && f.sha256 == version.sha256)
                    {
                        ok = false;
                        continue;
                    }
                    // A served version loaded again (new options or bytes):
                    // what is tried, remembered if it fails.
                    let reload = VersionKey::parse(&model, &version.version)
                        .ok()
                        .filter(|_| reload)
                        .map(|key| {
                            let tried = (
                                version.sha256.clone(),
                                reconcile::load_options(&version).ok(),
                            );
                            (key, tried)
                        });
                    if let Some((key, tried)) = &reload
                        && self
                            .failed_reloads
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner)
                            .get(key)
                            == Some(tried)
                    {
                        ok = false;
                        continue;
                    }
                    match self.load(&model, &version, default, desired).await {
                        Ok(()) => {
                            if let Some((key, _)) = &reload {
                                self.failed_reloads
                                    .lock()
                                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                                    .remove(key);
                            }
                        }
                        Err(reason) if reload.is_some() => {
                            tracing::warn!(%model, version = %version.version, %reason, "cannot load it again; the instance loaded before keeps serving until its options or bytes change again");
                            ok = false;
                            if let Some((key, tried)) = reload {
                                self.failed_reloads
                                    .lock()
                                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                                    .insert(key, tried);
                            }
                        }
                        Err(reason) => {
                            tracing::warn!(%model, version = %version.version, %reason, "cannot load; the serving version keeps serving");
                            ok = false;
                            retry |= self
                                .replica
                                .failure(&model, &version.version)
                                .is_none_or(|f| !f.gave_up());
                        }
                    }
                }
                Step::SetDefault { model, version } => {
                    if let Err(e) = self.replica.store().set_default(&model, &version) {
                        tracing::warn!(%model, %version, error = %e, "cannot switch the default version");
                        ok = false;
                        retry = true;
                    }
                }
                Step::Unload { model, version } => {
                    // Retire only when every load succeeded, so a failed
                    // update never leaves fewer versions serving.
                    if ok {
                        let _ = self.replica.store().remove(&model, &version);
                        tracing::info!(%model, %version, "retired; draining requests in flight");
                    }
                }
            }
        }
        if ok {
            self.applied.fetch_max(desired.revision, Ordering::SeqCst);
            Outcome::Converged
        } else if retry {
            Outcome::Retry
        } else {
            Outcome::GaveUp
        }
    }

    /// Fetches, verifies, loads and warms one version. Every failure is
    /// recorded on the replica (by [`Replica::load`] for its own steps).
    async fn load(
        &self,
        model: &str,
        version: &shoal_api::fleet::DesiredVersion,
        default: bool,
        desired: &DesiredState,
    ) -> Result<(), String> {
        let failed = |reason: String, kind: FailureKind| {
            self.replica
                .record_failure(model, &version.version, &version.sha256, &reason, kind);
            reason
        };
        let started = tokio::time::Instant::now();
        let bytes = self
            .fetcher
            .artifact(&version.sha256, &desired.peers)
            .await
            .map_err(|e| match e {
                // Every source was tried: the origin's own bytes are bad.
                FetchError::Corrupt(m) => failed(
                    format!("integrity check failed: {m}"),
                    FailureKind::Definite,
                ),
                // The store (or the way to it) is down: waited for.
                FetchError::Origin(e) => failed(
                    format!("cannot fetch the artifact (the control plane's artifact store and the peers do not have it now): {e}"),
                    FailureKind::Unavailable,
                ),
                FetchError::Cache(e) => failed(
                    format!("cannot keep the artifact in the local cache: {e}"),
                    FailureKind::Transient,
                ),
            })?;
        let fetched = started.elapsed();
        let size = bytes.len();
        let options = crate::reconcile::load_options(version)
            .map_err(|e| failed(e, FailureKind::Definite))?;
        let spec = LoadSpec {
            model: ModelName::new(model)
                .map_err(|e| failed(e.to_string(), FailureKind::Definite))?,
            version: Version::new(version.version.as_str())
                .map_err(|e| failed(e.to_string(), FailureKind::Definite))?,
            source: ArtifactSource::Verified {
                bytes,
                sha256: version.sha256.clone(),
            },
            sha256: Some(version.sha256.clone()),
            options,
        };
        let policy = InstallPolicy {
            make_default: default,
            retire_others: false,
        };
        let key = VersionKey::new(spec.model.clone(), spec.version.clone());
        let report = self
            .replica
            .load(spec, policy)
            .await
            .map_err(|e| e.to_string())?;
        tracing::info!(
            %model,
            version = %version.version,
            bytes = size,
            fetch_ms = fetched.as_millis() as u64,
            load_ms = report.load_ms.round() as u64,
            warm_ms = report.warm_ms.round() as u64,
            memory_bytes = report.memory_bytes,
            "fetched, verified, loaded and warmed"
        );
        self.load_ms
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(
                key,
                u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            );
        Ok(())
    }

    fn registration(&self) -> Registration {
        Registration {
            tier: self.config.tier,
            id: self.config.id.clone(),
            address: self.config.advertise.clone(),
            region: self.config.region.clone(),
            labels: self.config.labels.clone(),
            pid: Some(std::process::id()),
            standby: self.config.standby,
        }
    }

    fn heartbeat_report(&self) -> Heartbeat {
        let loaded = self.loaded();
        let stats = self.replica.pool().stats();
        let memory: BTreeMap<VersionKey, u64> = self
            .replica
            .store()
            .snapshot()
            .models
            .values()
            .flat_map(|entry| entry.versions.values())
            .map(|v| {
                (
                    VersionKey::new(v.model.clone(), v.version.clone()),
                    v.memory_bytes,
                )
            })
            .collect();
        let load_ms = {
            let mut times = self
                .load_ms
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            // Forget what is no longer loaded.
            times.retain(|key, _| memory.contains_key(key));
            times.clone()
        };
        Heartbeat {
            load_ms,
            memory,
            serving: loaded
                .into_iter()
                .map(|l| ServingVersion {
                    model: l.model,
                    version: l.version,
                    sha256: l.sha256,
                })
                .collect(),
            applied_revision: self.applied.load(Ordering::SeqCst),
            seen_revision: self.seen.load(Ordering::SeqCst),
            failures: self.replica.failures(),
            in_flight: (stats.running + stats.queued) as u64,
            ready: self.replica.ready_state().ready,
            faults: self.replica.faults(),
            stats: self
                .replica
                .store()
                .snapshot()
                .models
                .iter()
                .flat_map(|(m, e)| {
                    e.versions
                        .values()
                        .map(move |v| (VersionKey::new(m.clone(), v.version.clone()), v.stats()))
                })
                .collect(),
        }
    }

    async fn register(&self) {
        let mut attempt = 0;
        loop {
            match self.client.register(&self.registration()).await {
                Ok(registered) => {
                    self.heartbeat_ms
                        .store(registered.heartbeat_interval_ms.max(100), Ordering::SeqCst);
                    tracing::info!(id = %self.config.id, control = %self.config.control, "registered with the control plane");
                    return;
                }
                Err(e) => {
                    if attempt == 0 {
                        tracing::warn!(error = %e, "cannot register yet; serving from the local cache meanwhile");
                    }
                    attempt += 1;
                    tokio::time::sleep(backoff(attempt)).await;
                }
            }
        }
    }

    /// Registers, then heartbeats and follows the watch stream; both
    /// restart after failures without ever blocking serving.
    async fn control_loop(self: Arc<Self>) {
        self.register().await;
        // Heartbeats end with this loop, however it ends (a panic too: the
        // supervisor starts a new loop with heartbeats of its own).
        struct Abort(tokio::task::JoinHandle<()>);
        impl Drop for Abort {
            fn drop(&mut self) {
                self.0.abort();
            }
        }
        let _heartbeats = Abort(tokio::spawn(self.clone().heartbeat_loop()));
        match shoal_events::connect_or_warn(self.config.events.as_deref()).await {
            Some(events) => self.events_loop(&events).await,
            None => self.watch_loop().await,
        }
    }

    /// Follows this replica's desired states on NATS JetStream, from the
    /// latest on; starts over after a pause whenever the consumer gives up
    /// (NATS restarting, say). What arrives takes the same path as the
    /// watch stream's and polls' (`submit`: only newer revisions count).
    async fn events_loop(&self, events: &shoal_events::Events) {
        let mut attempt = 0;
        loop {
            match events.follow_desired(&self.config.id).await {
                Ok(stream) => {
                    let mut stream = std::pin::pin!(stream);
                    while let Some(item) = stream.next().await {
                        match item {
                            Ok(desired) => {
                                attempt = 0;
                                self.submit(desired);
                            }
                            Err(e @ shoal_events::EventError::Decode { .. }) => {
                                tracing::warn!(error = %e, "skipped");
                            }
                            Err(e) => {
                                tracing::debug!(error = %e, "event stream broke");
                                break;
                            }
                        }
                    }
                }
                Err(e) => tracing::debug!(error = %e, "cannot follow the event stream"),
            }
            attempt += 1;
            tokio::time::sleep(backoff(attempt)).await;
        }
    }

    async fn heartbeat_loop(self: Arc<Self>) {
        let mut changes = self.latest.subscribe();
        loop {
            match self
                .client
                .heartbeat(&self.config.id, &self.heartbeat_report())
                .await
            {
                Err(e) if e.status() == Some(StatusCode::NOT_FOUND) => self.register().await,
                Err(e) => tracing::debug!(error = %e, "heartbeat failed"),
                Ok(()) => {}
            }
            let interval = Duration::from_millis(self.heartbeat_ms.load(Ordering::SeqCst));
            // Report promptly after a change, or at the interval.
            tokio::select! {
                () = tokio::time::sleep(interval) => {}
                () = self.replica.changed() => {}
                _ = changes.changed() => {}
            }
        }
    }

    async fn watch_loop(&self) {
        let mut attempt = 0;
        loop {
            match self
                .client
                .watch(&self.config.id, self.seen.load(Ordering::SeqCst))
                .await
            {
                Ok(stream) => {
                    let mut stream = std::pin::pin!(stream);
                    while let Some(item) = stream.next().await {
                        match item {
                            Ok(desired) => {
                                attempt = 0;
                                self.submit(desired);
                            }
                            Err(e) => {
                                tracing::debug!(error = %e, "watch stream broke");
                                break;
                            }
                        }
                    }
                }
                Err(ClientError::Status { status, .. }) if status == StatusCode::NOT_FOUND => {
                    self.register().await
                }
                Err(e) => tracing::debug!(error = %e, "cannot open the watch stream"),
            }
            attempt += 1;
            tokio::time::sleep(backoff(attempt)).await;
        }
    }

    async fn poll_loop(self: Arc<Self>) {
        let interval = self.config.poll_interval;
        let mut delay = crate::poll::first_delay(&mut rand::rng(), interval);
        loop {
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = self.nudge.notified() => {}
            }
            delay = crate::poll::next_delay(&mut rand::rng(), interval);
            let seen = self.seen.load(Ordering::SeqCst);
            match self
                .client
                .desired(&self.config.id, (seen > 0).then_some(seen))
                .await
            {
                Ok(Conditional::Fresh(desired)) => self.submit(desired),
                Ok(Conditional::NotModified) => {}
                Err(e) => tracing::debug!(error = %e, "poll failed"),
            }
        }
    }
}

async fn serve_chunk(
    State(agent): State<Arc<Agent>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = ChunkId::parse(&id).map_err(|e| ApiError::bad_request(e.to_string()))?;
    match agent
        .fetcher
        .serve(&id)
        .await
        .map_err(|e| ApiError::unavailable(e.to_string(), 1))?
    {
        Served::Whole(bytes) => Ok(bytes.into_response()),
        // An error mid-stream cuts the answer short: the peer sees a
        // broken body and asks the origin instead.
        Served::Arriving(pieces) => Ok(axum::body::Body::from_stream(pieces).into_response()),
    }
}

async fn nudge(State(agent): State<Arc<Agent>>) -> Response {
    agent.nudge.notify_one();
    json_response(StatusCode::ACCEPTED, &serde_json::json!({"nudged": true}))
}

async fn status(State(agent): State<Arc<Agent>>) -> Response {
    json_response(
        StatusCode::OK,
        &serde_json::json!({
            "id": agent.config.id,
            "region": agent.config.region,
            "control": agent.config.control,
            "seen_revision": agent.seen.load(Ordering::SeqCst),
            "applied_revision": agent.applied.load(Ordering::SeqCst),
            "cache_bytes": agent.fetcher.cache.chunk_bytes(),
        }),
    )
}

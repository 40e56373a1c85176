//! A Shoal replica: serves ONNX models in-process over the Open Inference
//! Protocol v2 and swaps versions without failing a request.
//!
//! - [`Replica`] is the state: the [`store::ModelStore`] of serving
//!   versions, the inference pool, metrics, and what must be loaded before
//!   the replica is ready.
//! - [`Replica::load`] is the one path by which a version starts serving:
//!   read, verify the SHA-256, prepare, warm, then switch atomically (see
//!   [`loader`] and [`store`]).
//! - [`http::router`] exposes OIP v2, `/health`, `/ready`, `/metrics` and
//!   the replica's admin API; [`ReplicaServer`] binds and runs it.
//!
//! Architecture invariant: a replica serves from its own memory. Nothing on
//! the request path talks to another process.

pub mod grpc;
pub mod http;
mod inference;
pub mod loader;
mod metrics;
pub mod sequences;
pub mod session_store;
pub mod store;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

use sha2::Digest;
use shoal_api::fleet::{FailureKind, LoadFailureReport};
use shoal_core::{ModelName, Version, VersionKey};
use shoal_oip::Limits;
use shoal_runtime::{Backend, InferencePool, LoadOptions};
use shoal_telemetry::MetricsRegistry;

pub use crate::loader::{ArtifactSource, LoadFailure, LoadReport, LoadSpec, sha256_hex};
pub use crate::metrics::ReplicaMetrics;
use crate::metrics::{VersionLoadFailed, VersionLoaded, VersionSwitched};
use crate::store::{InstallPolicy, ModelStore, ServingVersion};

/// Default request body limit: 16 MiB.
pub const DEFAULT_BODY_LIMIT: usize = 16 << 20;

/// A model to serve from a file, as given on the command line
/// (`NAME=PATH[@VERSION]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelSpec {
    /// The model name.
    pub name: ModelName,
    /// The version (default `1`).
    pub version: Version,
    /// The ONNX file.
    pub path: PathBuf,
}

impl std::str::FromStr for ModelSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (name, rest) = s
            .split_once('=')
            .ok_or_else(|| format!("expected NAME=PATH[@VERSION], got {s:?}"))?;
        let name = ModelName::new(name).map_err(|e| e.to_string())?;
        // A version suffix is only taken when it is a valid version; paths
        // may contain '@' too.
        let (path, version) = match rest.rsplit_once('@') {
            Some((path, v)) if !path.is_empty() && Version::new(v).is_ok() => {
                (path, Version::new(v).map_err(|e| e.to_string())?)
            }
            _ => (rest, Version::new("1").map_err(|e| e.to_string())?),
        };
        if path.is_empty() {
            return Err(format!("model {name} has an empty path"));
        }
        Ok(ModelSpec {
            name,
            version,
            path: PathBuf::from(path),
        })
    }
}

/// Settings of a replica.
#[derive(Debug, Clone)]
pub struct ReplicaConfig {
    /// Replica id in metrics and the `x-shoal-replica` header; defaults to
    /// `replica-<port>` once bound.
    pub id: Option<String>,
    /// Address to listen on (port 0 picks a free one).
    pub addr: SocketAddr,
    /// Address to serve the Open Inference Protocol's gRPC service on
    /// (port 0 picks a free one); none: REST only.
    pub grpc_addr: Option<SocketAddr>,
    /// Models to load at start; the replica is ready once all are loaded.
    pub models: Vec<ModelSpec>,
    /// Input shape overrides per model name.
    pub load_options: BTreeMap<ModelName, LoadOptions>,
    /// Largest request body accepted.
    pub body_limit: usize,
    /// Per-request tensor limits.
    pub limits: Limits,
    /// Inferences run at once (default: the number of cores).
    pub threads: Option<usize>,
    /// Inferences allowed to wait for a thread before requests are shed.
    pub max_queue: Option<usize>,
    /// Tokens the admin API (`/admin/…`, and the sync agent's peer routes)
    /// accepts: the fleet token the replica itself holds, and those of
    /// `--admin-token-file`. Without any, only the model listing is open.
    pub admin_tokens: Vec<String>,
    /// Serve `/admin/faults` (latency, errors, hangs on demand): for
    /// drills, tests and benchmarks only.
    pub allow_fault_injection: bool,
    /// Serve over TLS.
    pub tls: Option<shoal_http::tls::ServerTls>,
    /// Longest an inference may wait for a thread and run: past it the
    /// request is answered 503 (never started) or 504 (abandoned).
    pub inference_timeout: std::time::Duration,
    /// Requests a model runs in at most this long (its cost measured at
    /// load) run on the calling task instead of a blocking thread; zero:
    /// never.
    pub inline_max: std::time::Duration,
    /// Live sequences of stateful models: how many, how long idle.
    pub sequences: sequences::SequenceLimits,
    /// Where sequences' state is shared beyond this replica's memory:
    /// Redis (`--session-store redis://…`), or none (memory only).
    pub session_store: Option<Arc<session_store::RedisStore>>,
}

/// Default of [`ReplicaConfig::inference_timeout`].
pub const DEFAULT_INFERENCE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

impl Default for ReplicaConfig {
    fn default() -> Self {
        ReplicaConfig {
            id: None,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            grpc_addr: None,
            models: Vec::new(),
            load_options: BTreeMap::new(),
            body_limit: DEFAULT_BODY_LIMIT,
            limits: Limits::default(),
            threads: None,
            max_queue: None,
            admin_tokens: Vec::new(),
            allow_fault_injection: false,
            tls: None,
            inference_timeout: DEFAULT_INFERENCE_TIMEOUT,
            inline_max: shoal_runtime::INLINE_MAX,
            sequences: sequences::SequenceLimits::default(),
            session_store: None,
        }
    }
}

/// What a replica must have loaded to be ready, and the last failure of
/// each version that is not loaded.
#[derive(Debug, Default)]
struct Readiness {
    required: Vec<(ModelName, Version)>,
    failures: BTreeMap<VersionKey, LoadFailureReport>,
}

/// A replica's state, shared by its HTTP handlers.
pub struct Replica {
    id: String,
    /// The id as a header value (`x-shoal-replica` on every answer).
    id_header: Option<::http::HeaderValue>,
    store: ModelStore,
    pool: InferencePool,
    backend: Arc<dyn Backend>,
    registry: MetricsRegistry,
    metrics: ReplicaMetrics,
    limits: Limits,
    body_limit: usize,
    readiness: Mutex<Readiness>,
    load_lock: tokio::sync::Mutex<()>,
    shutting_down: AtomicBool,
    started_at: SystemTime,
    /// Bumped whenever a load finishes (either way), so waiters can
    /// re-check readiness without polling.
    changes: tokio::sync::watch::Sender<u64>,
    /// Injected faults by `model:version`.
    faults: std::sync::RwLock<BTreeMap<VersionKey, shoal_api::fleet::Fault>>,
    /// SHA-256 of each token the admin API accepts.
    admin_hashes: Vec<[u8; 32]>,
    allow_fault_injection: bool,
    inference_timeout: std::time::Duration,
    inline_max: std::time::Duration,
    sequences: sequences::Sequences,
    session_store: Option<Arc<session_store::RedisStore>>,
}

impl std::fmt::Debug for Replica {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replica")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

/// The replica's readiness, with reasons when not ready.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ReadyState {
    /// True when every required version is loaded and the replica is not
    /// shutting down.
    pub ready: bool,
    /// Required versions not loaded.
    pub missing: Vec<VersionKey>,
    /// Why each missing version failed to load, when it did.
    pub failures: BTreeMap<VersionKey, String>,
    /// True after a shutdown signal: finishing requests, taking no new ones.
    pub shutting_down: bool,
    /// What works less well than it should without making the replica
    /// unready (the session store unreachable: sequences go on from
    /// memory, and cannot move to another replica meanwhile).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub degraded: Vec<String>,
}

impl Replica {
    /// A replica with no models loaded.
    pub fn new(id: String, backend: Arc<dyn Backend>, config: &ReplicaConfig) -> Replica {
        let registry = MetricsRegistry::new();
        let metrics = ReplicaMetrics::new(&registry, &id);
        shoal_http::limit::connections().register(&registry);
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        let threads = config.threads.unwrap_or(cores);
        let pool = InferencePool::new(threads, config.max_queue.unwrap_or(threads * 64));
        Replica {
            id_header: ::http::HeaderValue::from_str(&id).ok(),
            id,
            store: ModelStore::new(),
            pool,
            backend,
            registry,
            metrics,
            limits: config.limits,
            body_limit: config.body_limit,
            readiness: Mutex::new(Readiness::default()),
            load_lock: tokio::sync::Mutex::new(()),
            shutting_down: AtomicBool::new(false),
            started_at: SystemTime::now(),
            changes: tokio::sync::watch::Sender::new(0),
            faults: std::sync::RwLock::new(BTreeMap::new()),
            admin_hashes: config
                .admin_tokens
                .iter()
                .map(|t| sha2::Sha256::digest(t.as_bytes()).into())
                .collect(),
            allow_fault_injection: config.allow_fault_injection,
            inference_timeout: config.inference_timeout,
            inline_max: config.inline_max,
            sequences: sequences::Sequences::new(config.sequences),
            session_store: config.session_store.clone(),
        }
    }

    /// The shared session store, if there is one.
    pub fn session_store(&self) -> Option<&session_store::RedisStore> {
        self.session_store.as_deref()
    }

    /// The live sequences of stateful models.
    pub fn sequences(&self) -> &sequences::Sequences {
        &self.sequences
    }

    /// Longest an inference may take, waiting and running.
    pub fn inference_timeout(&self) -> std::time::Duration {
        self.inference_timeout
    }

    /// Whether `token` opens the admin API (compared in constant time).
    pub fn admits(&self, token: &str) -> bool {
        use subtle::ConstantTimeEq;
        let hash: [u8; 32] = sha2::Sha256::digest(token.as_bytes()).into();
        self.admin_hashes
            .iter()
            .fold(subtle::Choice::from(0), |found, h| found | h.ct_eq(&hash))
            .into()
    }

    /// True when some token opens the admin API.
    pub fn admin_enabled(&self) -> bool {
        !self.admin_hashes.is_empty()
    }

    /// True when `/admin/faults` is served.
    pub fn fault_injection_allowed(&self) -> bool {
        self.allow_fault_injection
    }

    /// The replica id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The id as a header value, when it can be one.
    pub(crate) fn id_header(&self) -> Option<&::http::HeaderValue> {
        self.id_header.as_ref()
    }

    /// The serving table.
    pub fn store(&self) -> &ModelStore {
        &self.store
    }

    /// The metrics registry, for components that add their own families.
    pub fn metrics_registry(&self) -> &MetricsRegistry {
        &self.registry
    }

    /// The inference pool.
    pub fn pool(&self) -> &InferencePool {
        &self.pool
    }

    /// When the replica started.
    pub fn started_at(&self) -> SystemTime {
        self.started_at
    }

    /// Declares the versions the replica must serve to be ready.
    pub fn require(&self, versions: Vec<(ModelName, Version)>) {
        self.readiness
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .required = versions;
    }

    /// Marks the replica as shutting down: not ready, still serving.
    pub fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
    }

    /// Readiness and its reasons.
    pub fn ready_state(&self) -> ReadyState {
        let readiness = self
            .readiness
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let missing: Vec<VersionKey> = readiness
            .required
            .iter()
            .filter(|(m, v)| !self.store.has(m.as_str(), v.as_str()))
            .map(|(m, v)| VersionKey::new(m.clone(), v.clone()))
            .collect();
        let failures = readiness
            .failures
            .iter()
            .filter(|(k, _)| missing.contains(k))
            .map(|(k, v)| (k.clone(), v.reason.clone()))
            .collect();
        let shutting_down = self.shutting_down.load(Ordering::SeqCst);
        let degraded = self
            .session_store()
            .filter(|s| s.degraded())
            .map(|s| {
                format!(
                    "session store {} unreachable: sequences held here go on from memory; others cannot continue here",
                    shoal_core::redact_url(s.url())
                )
            })
            .into_iter()
            .collect();
        ReadyState {
            ready: missing.is_empty() && !shutting_down,
            missing,
            failures,
            shutting_down,
            degraded,
        }
    }

    /// Records why `model:version` could not be made ready (every load
    /// failure, and failures outside [`Replica::load`] such as fetching its
    /// artifact): logged, counted, shown by `/ready` and reported in
    /// heartbeats. Attempts count up while the artifact stays the same.
    pub fn record_failure(
        &self,
        model: &str,
        version: &str,
        sha256: &str,
        reason: &str,
        kind: FailureKind,
    ) {
        let Ok(key) = VersionKey::parse(model, version) else {
            // Desired states and load specs carry checked names.
            tracing::warn!(model, version, reason, "load failure of an invalid name");
            return;
        };
        let mut readiness = self
            .readiness
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let attempts = readiness
            .failures
            .get(&key)
            .filter(|f| f.sha256 == sha256)
            .map_or(0, |f| f.attempts)
            + 1;
        readiness.failures.insert(
            key,
            LoadFailureReport {
                reason: reason.to_owned(),
                kind,
                attempts,
                sha256: sha256.to_owned(),
            },
        );
        drop(readiness);
        VersionLoadFailed {
            model,
            version,
            reason,
            kind,
            attempts,
        }
        .emit(&self.metrics);
        self.bump();
    }

    /// The recorded failure of `model:version`, if it is not loaded.
    pub fn failure(&self, model: &str, version: &str) -> Option<LoadFailureReport> {
        if self.store.has(model, version) {
            return None;
        }
        self.readiness
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .failures
            .get(&VersionKey::parse(model, version).ok()?)
            .cloned()
    }

    /// Forgets the failures of versions `keep` does not name: a version
    /// that left the desired state is tried afresh if it comes back.
    pub fn forget_failures_except(&self, keep: &std::collections::BTreeSet<VersionKey>) {
        self.readiness
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .failures
            .retain(|k, _| keep.contains(k));
    }

    /// Every recorded failure of a version not loaded now.
    pub fn failures(&self) -> BTreeMap<VersionKey, LoadFailureReport> {
        let readiness = self
            .readiness
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        readiness
            .failures
            .iter()
            .filter(|(k, _)| !self.store.has(k.model.as_str(), k.version.as_str()))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// Injects (or, with `None`, clears) a fault for a version.
    pub fn set_fault(&self, key: &VersionKey, fault: Option<shoal_api::fleet::Fault>) {
        let mut faults = self.faults.write().unwrap_or_else(PoisonError::into_inner);
        match fault {
            Some(f) => {
                tracing::warn!(version = %key, fault = ?f, "fault injected");
                faults.insert(key.clone(), f);
            }
            None => {
                faults.remove(key);
            }
        }
        drop(faults);
        self.bump();
    }

    /// The injected faults.
    pub fn faults(&self) -> BTreeMap<VersionKey, shoal_api::fleet::Fault> {
        self.faults
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub(crate) fn fault_for(&self, model: &str, version: &str) -> Option<shoal_api::fleet::Fault> {
        let faults = self.faults.read().unwrap_or_else(PoisonError::into_inner);
        if faults.is_empty() {
            return None;
        }
        faults
            .get(&VersionKey::parse(model, version).ok()?)
            .cloned()
    }

    /// Waits until the replica is ready. Returns at once if it is.
    pub async fn wait_ready(&self) {
        let mut changes = self.changes.subscribe();
        while !self.ready_state().ready {
            if changes.changed().await.is_err() {
                return;
            }
        }
    }

    /// Completes on the next load, failure or table change.
    pub async fn changed(&self) {
        let mut rx = self.changes.subscribe();
        let _ = rx.changed().await;
    }

    fn bump(&self) {
        self.changes.send_modify(|n| *n += 1);
    }

    /// Loads, verifies and warms a version, then installs it per `policy`.
    /// On failure nothing changes: the serving version keeps serving.
    /// Loads run one at a time.
    pub async fn load(
        &self,
        spec: LoadSpec,
        policy: InstallPolicy,
    ) -> Result<LoadReport, LoadFailure> {
        let _one_at_a_time = self.load_lock.lock().await;
        let key = VersionKey::new(spec.model.clone(), spec.version.clone());
        let prepared = match loader::prepare(self.backend.clone(), &spec, self.inline_max).await {
            Ok(p) => p,
            Err(failure) => {
                self.record_failure(
                    spec.model.as_str(),
                    spec.version.as_str(),
                    spec.sha256.as_deref().unwrap_or_default(),
                    &failure.to_string(),
                    failure.kind(),
                );
                return Err(failure);
            }
        };
        let version_metrics = self.metrics.version(&spec.model, &spec.version);
        VersionLoaded {
            model: &spec.model,
            version: &spec.version,
            sha256: &prepared.sha256,
            load: prepared.load,
            warm: prepared.warm,
        }
        .emit(&self.metrics, &version_metrics);
        // Batched versions queue their requests for the pool; dropping
        // the version (once its last request is answered) stops the queue.
        let pays = match prepared.batch_costs {
            Some((alone, batched)) => {
                let pays = shoal_core::batch::pays(alone, batched);
                if !pays {
                    tracing::warn!(
                        model = %spec.model,
                        version = %spec.version,
                        alone_us_per_row = alone.as_secs_f64() * 1e6,
                        batched_us_per_row = batched.as_secs_f64() * 1e6,
                        "batching does not pay on this engine (a row costs more in a batch than \
                         alone): serving each request alone"
                    );
                }
                pays
            }
            None => true,
        };
        let batcher = prepared
            .loaded
            .batching()
            .cloned()
            .filter(|_| pays)
            .map(|policy| {
                shoal_runtime::batcher::Batcher::start(
                    prepared.loaded.clone(),
                    policy,
                    shoal_runtime::batcher::BatchRunner {
                        pool: self.pool.clone(),
                        key: spec.model.to_string(),
                        cap: self.pool.stats().threads,
                        deadline: self.inference_timeout,
                        queue: self.pool.queue_bound(),
                        on_batch: Some({
                            let histogram = version_metrics.batch_rows.clone();
                            #[allow(clippy::cast_precision_loss)]
                            Arc::new(move |rows: usize| histogram.observe(rows as f64))
                        }),
                    },
                )
            });
        let serving = Arc::new(ServingVersion {
            options: spec.options.clone(),
            model: spec.model.clone(),
            version: spec.version.clone(),
            sha256: prepared.sha256.clone(),
            loaded: prepared.loaded,
            loaded_at: SystemTime::now(),
            memory_bytes: prepared.memory,
            batcher,
            metrics: version_metrics,
        });
        let retired = self.store.install(serving, policy);
        VersionSwitched {
            model: &spec.model,
            version: &spec.version,
            retired: &retired,
        }
        .emit();
        self.readiness
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .failures
            .remove(&key);
        self.bump();
        Ok(LoadReport {
            model: spec.model.to_string(),
            version: spec.version.to_string(),
            sha256: prepared.sha256,
            bytes: prepared.bytes,
            load_ms: prepared.load.as_secs_f64() * 1e3,
            warm_ms: prepared.warm.as_secs_f64() * 1e3,
            memory_bytes: prepared.memory,
            retired: retired.iter().map(ToString::to_string).collect(),
        })
    }

    /// The metrics in Prometheus text format.
    pub fn encode_metrics(&self) -> String {
        let stats = self.pool.stats();
        self.metrics
            .pool_running
            .set(i64::try_from(stats.running).unwrap_or(i64::MAX));
        self.metrics
            .pool_queued
            .set(i64::try_from(stats.queued).unwrap_or(i64::MAX));
        self.metrics
            .sequences_live
            .set(i64::try_from(self.sequences.len()).unwrap_or(i64::MAX));
        self.metrics.session_store_up.set(
            self.session_store()
                .map_or(-1, |s| i64::from(!s.degraded())),
        );
        self.registry.encode()
    }
}

/// A running replica server.
#[derive(Debug)]
pub struct ReplicaServer {
    /// The address it listens on.
    pub addr: SocketAddr,
    /// The address its gRPC service listens on, when it has one.
    pub grpc_addr: Option<SocketAddr>,
    /// Its state.
    pub replica: Arc<Replica>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl ReplicaServer {
    /// Binds, starts serving at once (live, not yet ready), and loads the
    /// configured models in the background.
    pub async fn start(
        config: ReplicaConfig,
        backend: Arc<dyn Backend>,
    ) -> std::io::Result<ReplicaServer> {
        ReplicaServer::start_with(config, backend, |_, _| axum::Router::new()).await
    }

    /// Like [`ReplicaServer::start`], with more routes on the same port:
    /// `extend` gets the replica and the bound address and returns them
    /// (the sync agent adds its peer and nudge endpoints this way).
    pub async fn start_with(
        config: ReplicaConfig,
        backend: Arc<dyn Backend>,
        extend: impl FnOnce(Arc<Replica>, SocketAddr) -> axum::Router,
    ) -> std::io::Result<ReplicaServer> {
        let tls = config
            .tls
            .as_ref()
            .map(shoal_http::tls::ServerTls::config)
            .transpose()
            .map_err(std::io::Error::other)?;
        let listener = shoal_http::bind(config.addr).await?;
        let addr = listener.local_addr()?;
        let id = config
            .id
            .clone()
            .unwrap_or_else(|| format!("replica-{}", addr.port()));
        let replica = Arc::new(Replica::new(id, backend, &config));
        replica.require(
            config
                .models
                .iter()
                .map(|m| (m.name.clone(), m.version.clone()))
                .collect(),
        );
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let router = http::router(replica.clone()).merge(extend(replica.clone(), addr));
        let server_replica = replica.clone();
        // Both protocols stop together: REST when told, gRPC once REST has
        // begun shutting down.
        let (grpc, stop_grpc) = match config.grpc_addr {
            None => (None, None),
            Some(grpc_addr) => {
                let (grpc, stop) = shoal_grpc::Beside::start(
                    shoal_http::bind(grpc_addr).await?,
                    config.tls.as_ref(),
                    grpc::GrpcReplica::service(replica.clone()),
                )?;
                (Some(grpc), Some(stop))
            }
        };
        let grpc_addr = grpc.as_ref().map(|g| g.addr);
        let served = shoal_http::serve(
            listener,
            router,
            Some(http::front(replica.clone())),
            async move {
                let _ = rx.await;
                server_replica.begin_shutdown();
                if let Some(stop) = stop_grpc {
                    stop.stop();
                }
            },
            tls,
        );
        let task = tokio::spawn(async move {
            let rest = served.await;
            if let Some(grpc) = grpc {
                grpc.join().await?;
            }
            rest
        });
        let loader = replica.clone();
        tokio::spawn(async move {
            for m in config.models {
                let spec = LoadSpec {
                    options: config
                        .load_options
                        .get(&m.name)
                        .cloned()
                        .unwrap_or_default(),
                    model: m.name,
                    version: m.version,
                    source: ArtifactSource::Path(m.path),
                    sha256: None,
                };
                // Failures are logged, counted and shown by /ready.
                let _ = loader.load(spec, InstallPolicy::default()).await;
            }
        });
        Ok(ReplicaServer {
            addr,
            grpc_addr,
            replica,
            shutdown: Some(tx),
            task,
        })
    }

    /// Stops taking connections, lets requests in flight finish, and waits.
    pub async fn stop(mut self) -> std::io::Result<()> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        self.join().await
    }

    /// Waits until the server task ends. Call at most once, and not after
    /// [`ReplicaServer::stop`].
    pub async fn join(&mut self) -> std::io::Result<()> {
        (&mut self.task)
            .await
            .map_err(|e| std::io::Error::other(e.to_string()))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_specs_parse() {
        let m: ModelSpec = "digits=models/digits-v1.onnx".parse().unwrap();
        assert_eq!(
            (m.name.as_str(), m.version.as_str(), m.path.to_str()),
            ("digits", "1", Some("models/digits-v1.onnx"))
        );
        let m: ModelSpec = "digits=models/digits-v2.onnx@2".parse().unwrap();
        assert_eq!(
            (m.version.as_str(), m.path.to_str()),
            ("2", Some("models/digits-v2.onnx"))
        );
        let m: ModelSpec = "x=/a@b/c.onnx".parse().unwrap();
        assert_eq!(
            (m.version.as_str(), m.path.to_str()),
            ("1", Some("/a@b/c.onnx"))
        );
        assert_eq!(
            "digits".parse::<ModelSpec>().unwrap_err(),
            "expected NAME=PATH[@VERSION], got \"digits\""
        );
        assert!("a b=x.onnx".parse::<ModelSpec>().is_err());
        assert!("digits=".parse::<ModelSpec>().is_err());
    }

    #[tokio::test]
    async fn failures_say_whether_to_retry_and_count_attempts_per_artifact() {
        let replica = Replica::new(
            "r".into(),
            Arc::new(shoal_runtime::tract::TractBackend::default()),
            &ReplicaConfig::default(),
        );
        let garbage = bytes::Bytes::from_static(b"not a model at all");
        let sha = sha256_hex(&garbage);
        let spec = |bytes: bytes::Bytes| {
            let sha256 = sha256_hex(&bytes);
            LoadSpec {
                model: ModelName::new("m").unwrap(),
                version: Version::new("2").unwrap(),
                source: ArtifactSource::Bytes(bytes),
                sha256: Some(sha256),
                options: LoadOptions::default(),
            }
        };
        let policy = InstallPolicy {
            make_default: true,
            retire_others: false,
        };
        for attempt in 1..=2 {
            let e = replica
                .load(spec(garbage.clone()), policy)
                .await
                .unwrap_err();
            assert_eq!(e.kind(), FailureKind::Definite);
            let f = replica.failure("m", "2").unwrap();
            assert_eq!(
                (f.attempts, f.kind, f.sha256.as_str()),
                (attempt, FailureKind::Definite, sha.as_str())
            );
            assert!(f.gave_up());
            assert!(f.reason.contains("cannot parse the model"), "{f:?}");
        }
        // Other bytes under the same name start counting afresh.
        let other = bytes::Bytes::from_static(b"other garbage");
        replica.load(spec(other), policy).await.unwrap_err();
        assert_eq!(replica.failure("m", "2").unwrap().attempts, 1);
        // A fetch that failed is transient; the count goes on for the
        // same artifact.
        replica.record_failure("m", "3", "abc", "connection reset", FailureKind::Transient);
        replica.record_failure("m", "3", "abc", "connection reset", FailureKind::Transient);
        let f = replica.failure("m", "3").unwrap();
        assert_eq!((f.attempts, f.gave_up()), (2, false));
        assert_eq!(replica.failures().len(), 2);
        // Versions that left the desired state are forgotten.
        replica.forget_failures_except(&["m:3".parse().unwrap()].into());
        assert_eq!(replica.failure("m", "2"), None);
        assert!(replica.encode_metrics().contains(
            "model_load_failures_total{model=\"m\",model_version=\"2\",kind=\"definite\"} 3"
        ));
    }
}

//! Shoal's control plane.
//!
//! - [`Control`] holds the registry store, the artifact store (the origin),
//!   what replicas report (heartbeats, kept in memory: they change every
//!   few seconds and are worthless after a restart), and the fleet revision
//!   that watchers follow.
//! - [`api`] is the REST API under `/api/v1/` (OpenAPI at
//!   `/api/v1/openapi.json`), including the per-replica watch stream and
//!   the conditional `desired` endpoint that polling replicas call.
//! - [`auth`] checks every API call's bearer token against the registry
//!   and the route's permission; the caller's token name is the audit log's
//!   actor.
//! - [`backups`] takes backups of this control plane on request
//!   (`POST /api/v1/backups`) and on a schedule.
//! - [`dashboard`] is the page at `/`, its sign-in (sessions standing for
//!   tokens), its live stream and the time series it charts
//!   ([`history`]).
//! - [`controller`] drives rollouts: it feeds the pure state machines of
//!   `shoal-rollout` with what replicas report and persists their decisions.
//! - [`capacity`] places scaled models on replicas and runs their
//!   autoscalers (`shoal-scale`), in the controller's passes.
//!
//! Architecture invariant: the control plane is never on the inference
//! path. Replicas and gateways keep serving their last known state when it
//! is down; nothing here is called per prediction.

pub mod api;
pub mod auth;
pub mod backups;
pub mod capacity;
pub mod controller;
pub mod dashboard;
mod events;
mod fleet;
pub mod history;
pub mod leader;
mod metrics;
mod openapi;
mod tokens;
mod traffic;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::Context;
use shoal_api::fleet::DesiredState;
use shoal_artifacts::ArtifactStore;
use shoal_registry::RegistryStore;
use shoal_registry::sqlite::SqliteRegistry;
use shoal_rollout::FleetFacts;
use shoal_telemetry::MetricsRegistry;

pub use crate::fleet::LiveFleet;
use crate::metrics::ControlMetrics;

/// Settings of a control plane.
#[derive(Debug, Clone)]
pub struct ControlConfig {
    /// Address to listen on.
    pub addr: SocketAddr,
    /// Directory for the registry database, the local artifact store and
    /// upload spooling.
    pub data_dir: PathBuf,
    /// Artifact store URL (`s3://…`, `file:///…`); default
    /// `<data-dir>/artifacts`.
    pub artifact_store: Option<String>,
    /// How often replicas heartbeat.
    pub heartbeat_interval: Duration,
    /// A replica silent this long is treated as down.
    pub dead_after: Duration,
    /// A replica skewed (serving ≠ desired) this long is flagged as behind.
    pub skew_threshold: Duration,
    /// Largest artifact accepted.
    pub upload_limit: u64,
    /// How often the rollout controller re-evaluates without a trigger.
    pub controller_interval: Duration,
    /// Require tokens on the API (on unless turned off on purpose).
    pub auth: bool,
    /// Serve over TLS.
    pub tls: Option<shoal_http::tls::ServerTls>,
    /// The registry: `sqlite` (default: `DATA_DIR/registry.db`),
    /// `sqlite:///path/to/registry.db`, or `postgres://…` (what several
    /// control planes share).
    pub registry: Option<String>,
    /// Scheduled backups, if any.
    pub backup: Option<backups::BackupSchedule>,
    /// This member's id among control planes sharing a registry; default:
    /// generated once and kept in `DATA_DIR/member.id`.
    pub id: Option<String>,
    /// The `HOST:PORT` other members and clients reach this one at;
    /// default: the address it listens on.
    pub advertise: Option<String>,
    /// How long a leader's lease lasts unrenewed: after a leader dies,
    /// another member leads within about this long.
    pub lease_ttl: Duration,
    /// NATS server (`nats://HOST:PORT`) to publish desired states and
    /// routing tables on, while this member leads.
    pub events: Option<String>,
    /// How the autoscalers behave (the HPA's defaults, a 24-hour day).
    pub capacity: capacity::CapacityConfig,
}

/// Opens the registry `url` names (see [`ControlConfig::registry`]).
pub async fn open_registry(
    url: Option<&str>,
    data_dir: &std::path::Path,
) -> anyhow::Result<Arc<dyn RegistryStore>> {
    match url {
        None | Some("sqlite") => Ok(Arc::new(
            SqliteRegistry::open(&data_dir.join("registry.db")).await?,
        )),
        Some(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => Ok(
            Arc::new(shoal_registry::postgres::PostgresRegistry::open(url).await?),
        ),
        Some(url) if url.starts_with("sqlite://") => Ok(Arc::new(
            SqliteRegistry::open(std::path::Path::new(url.trim_start_matches("sqlite://"))).await?,
        )),
        Some(other) => anyhow::bail!(
            "--registry {other:?}: expected sqlite (the default), sqlite:///path/registry.db or postgres://user@host/database"
        ),
    }
}

/// Opens the artifact store `url` names (see
/// [`ControlConfig::artifact_store`]), checking that it can be read.
pub async fn open_artifacts(
    url: Option<&str>,
    data_dir: &std::path::Path,
) -> anyhow::Result<ArtifactStore> {
    Ok(match url {
        Some(url) => {
            let store = ArtifactStore::from_url(url)?;
            store.check().await.with_context(|| {
                format!(
                    "cannot read the artifact store {url}; check that the bucket exists and \
                     that AWS_ENDPOINT, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and \
                     AWS_REGION are set for it"
                )
            })?;
            store
        }
        None => ArtifactStore::local(&data_dir.join("artifacts"))?,
    })
}

impl Default for ControlConfig {
    fn default() -> Self {
        ControlConfig {
            addr: SocketAddr::from(([127, 0, 0, 1], 8081)),
            data_dir: PathBuf::from(".shoal/control"),
            artifact_store: None,
            heartbeat_interval: Duration::from_secs(2),
            dead_after: Duration::from_secs(6),
            skew_threshold: Duration::from_secs(60),
            upload_limit: 8 << 30,
            controller_interval: Duration::from_millis(500),
            auth: true,
            tls: None,
            registry: None,
            backup: None,
            id: None,
            advertise: None,
            lease_ttl: Duration::from_millis(1500),
            events: None,
            capacity: capacity::CapacityConfig::default(),
        }
    }
}

/// The registry data the planner needs, re-read after every change.
#[derive(Debug, Clone, Default)]
struct Snapshot {
    facts: FleetFacts,
    registrations: Vec<shoal_registry::ReplicaRecord>,
}

/// The control plane's state, shared by its handlers and tasks.
pub struct Control {
    config: ControlConfig,
    store: Arc<dyn RegistryStore>,
    artifacts: ArtifactStore,
    live: LiveFleet,
    snapshot: RwLock<Arc<Snapshot>>,
    revision: tokio::sync::watch::Sender<u64>,
    kick: tokio::sync::Notify,
    /// Serialises changes to deployments (deploy, rollback, controller
    /// steps), so two of them never interleave on one model.
    deploy_lock: tokio::sync::Mutex<()>,
    /// Serialises snapshot refreshes: a slow one started earlier must not
    /// publish an older snapshot over a newer one.
    refresh_lock: tokio::sync::Mutex<()>,
    registry: MetricsRegistry,
    metrics: ControlMetrics,
    /// Set on shutdown: watch streams end so connections can close.
    stopping: tokio::sync::watch::Sender<bool>,
    /// Bumped when what replicas serve or their liveness changes (not a
    /// registry revision: nothing is written), for routing watchers.
    fleet_changes: tokio::sync::watch::Sender<u64>,
    /// What gateways report.
    traffic: traffic::TrafficTotals,
    /// One backup at a time (and no pruning during one).
    backup_lock: tokio::sync::Mutex<()>,
    /// Times the revision was moved past what a replica had seen (after a
    /// restore from an older backup); watch streams resend on a change.
    fast_forwards: std::sync::atomic::AtomicU64,
    /// Who this member is among those sharing the registry.
    member: Me,
    /// Whether (and until when) this member leads.
    leader: tokio::sync::watch::Sender<leader::LeaderState>,
    /// The dashboard's sign-ins.
    sessions: dashboard::Sessions,
    /// What the dashboard charts.
    history: std::sync::Mutex<history::History>,
    /// Placement and the autoscalers.
    capacity: capacity::Capacity,
}

/// This member's identity.
#[derive(Debug, Clone)]
struct Me {
    id: String,
    /// This process among the member's starts: a restarted member is a
    /// new holder, so it takes the lease in a new term.
    incarnation: String,
    address: String,
}

/// `config.id`, else the id kept in the data directory (made on first
/// start).
fn member_id(config: &ControlConfig) -> anyhow::Result<String> {
    if let Some(id) = &config.id {
        shoal_core::ModelName::new(id).map_err(|e| anyhow::anyhow!("--id {id:?}: {e}"))?;
        return Ok(id.clone());
    }
    let path = config.data_dir.join("member.id");
    if let Ok(id) = std::fs::read_to_string(&path) {
        let id = id.trim();
        if !id.is_empty() {
            return Ok(id.to_owned());
        }
    }
    let id = format!("control-{:08x}", rand::random::<u32>());
    std::fs::write(&path, format!("{id}\n"))
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(id)
}

impl std::fmt::Debug for Control {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Control").finish_non_exhaustive()
    }
}

impl Control {
    /// Opens the registry and artifact store under `config.data_dir`.
    pub async fn open(config: ControlConfig) -> anyhow::Result<Arc<Control>> {
        std::fs::create_dir_all(config.data_dir.join("tmp")).with_context(|| {
            format!("cannot create data directory {}", config.data_dir.display())
        })?;
        let store = open_registry(config.registry.as_deref(), &config.data_dir).await?;
        let artifacts = open_artifacts(config.artifact_store.as_deref(), &config.data_dir).await?;
        Control::with_stores(config, store, artifacts).await
    }

    /// A control plane on the given stores.
    pub async fn with_stores(
        config: ControlConfig,
        store: Arc<dyn RegistryStore>,
        artifacts: ArtifactStore,
    ) -> anyhow::Result<Arc<Control>> {
        if config.auth {
            auth::ensure_admin_token(store.as_ref(), &config.data_dir).await?;
        } else {
            tracing::warn!(
                "authentication is OFF (--no-auth): anyone who can reach this control plane can \
                 change what the fleet serves and download model weights"
            );
        }
        let registry = MetricsRegistry::new();
        let metrics = ControlMetrics::new(&registry);
        shoal_http::limit::connections().register(&registry);
        let revision = store.revision().await?;
        let member = Me {
            id: member_id(&config)?,
            incarnation: format!("{:016x}", rand::random::<u64>()),
            address: config
                .advertise
                .clone()
                .unwrap_or_else(|| config.addr.to_string()),
        };
        let control = Arc::new(Control {
            member,
            leader: tokio::sync::watch::Sender::new(leader::LeaderState::default()),
            live: LiveFleet::new(config.dead_after, config.skew_threshold),
            capacity: capacity::Capacity::new(config.capacity),
            config,
            store,
            artifacts,
            snapshot: RwLock::new(Arc::new(Snapshot::default())),
            revision: tokio::sync::watch::Sender::new(revision),
            kick: tokio::sync::Notify::new(),
            deploy_lock: tokio::sync::Mutex::new(()),
            refresh_lock: tokio::sync::Mutex::new(()),
            registry,
            metrics,
            stopping: tokio::sync::watch::Sender::new(false),
            fleet_changes: tokio::sync::watch::Sender::new(0),
            traffic: traffic::TrafficTotals::default(),
            backup_lock: tokio::sync::Mutex::new(()),
            fast_forwards: std::sync::atomic::AtomicU64::new(0),
            sessions: dashboard::Sessions::default(),
            history: std::sync::Mutex::new(history::History::new(
                dashboard::HISTORY_POINTS,
                dashboard::HISTORY_WINDOW_MS,
            )),
        });
        control.refresh().await?;
        Ok(control)
    }

    /// The registry store.
    pub fn store(&self) -> &Arc<dyn RegistryStore> {
        &self.store
    }

    /// The artifact store.
    pub fn artifacts(&self) -> &ArtifactStore {
        &self.artifacts
    }

    /// The current fleet revision.
    pub fn revision(&self) -> u64 {
        *self.revision.borrow()
    }

    /// Re-reads what planning needs from the registry and publishes the
    /// revision to watchers. Refreshes run one at a time, and the revision
    /// watchers see only ever goes forward.
    pub async fn refresh(&self) -> anyhow::Result<()> {
        let _one_at_a_time = self.refresh_lock.lock().await;
        let revision = self.store.revision().await?;
        let registrations = self.store.list_replicas().await?;
        let mut deployments = Vec::new();
        let mut versions = std::collections::BTreeMap::new();
        for stored in self.store.list_deployments().await? {
            // An unreadable controller is left out of planning (the
            // deployment's own targets keep serving) and refused by every
            // action on the model, which says why.
            let rolling = match shoal_rollout::Controller::from_json(&stored.controller) {
                Ok(c) => c,
                Err(why) => {
                    tracing::error!(model = %stored.deployment.model, %why, "rollout state unreadable; the model keeps its targets and takes no action");
                    None
                }
            };
            if let Some(detail) = self.store.get_model(&stored.deployment.model).await? {
                for v in detail.versions {
                    versions.insert((v.model.clone(), v.version.clone()), v);
                }
            }
            deployments.push((stored.deployment, rolling));
        }
        let facts = FleetFacts {
            revision,
            now: 0,
            deployments: Arc::new(deployments),
            replicas: Vec::new(),
            versions: Arc::new(versions),
            stats: std::collections::BTreeMap::new(),
            shadow: std::collections::BTreeMap::new(),
            rewards: std::collections::BTreeMap::new(),
        };
        *self
            .snapshot
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(Snapshot {
            facts,
            registrations,
        });
        self.revision.send_if_modified(|r| {
            let newer = revision > *r;
            if newer {
                *r = revision;
            }
            newer
        });
        self.metrics
            .revision
            .set(i64::try_from(revision).unwrap_or(i64::MAX));
        Ok(())
    }

    fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Planning facts: the registry snapshot plus what replicas and
    /// gateways report now (inference counts, shadow comparisons, rewards),
    /// which rollout decisions and views read.
    pub fn facts(&self) -> FleetFacts {
        let mut facts = self.placement_facts();
        facts.stats = self.live.totals();
        facts.shadow = self.traffic.shadow();
        facts.rewards = self.traffic.rewards();
        facts
    }

    /// The facts that say what runs where — the snapshot, the live replicas
    /// and the time — without the reported counts: enough for desired
    /// states and routing, which every replica poll and gateway asks for.
    fn placement_facts(&self) -> FleetFacts {
        let snapshot = self.snapshot();
        let mut facts = snapshot.facts.clone();
        facts.replicas = self.live.facts(&snapshot.registrations);
        facts.now = shoal_api::now_millis();
        facts
    }

    /// What replica `id` should serve now.
    pub fn desired_for(&self, id: &str) -> DesiredState {
        shoal_rollout::plan::desired_state(&self.placement_facts(), id)
    }

    /// Wakes the rollout controller.
    pub fn kick(&self) {
        self.kick.notify_one();
    }

    /// Tells routing watchers that the live fleet changed.
    pub(crate) fn fleet_changed(&self) {
        self.fleet_changes.send_modify(|n| *n += 1);
    }

    /// The routing table gateways follow.
    pub fn routing_table(&self) -> shoal_api::fleet::RoutingTable {
        shoal_rollout::plan::routing_table(&self.placement_facts())
    }

    /// Tells every live replica to reconcile now (the push trigger). Fire
    /// and forget: the watch stream and polling cover failures.
    pub fn push_to_replicas(self: &Arc<Self>) {
        let snapshot = self.snapshot();
        for r in &snapshot.registrations {
            if !self.live.is_alive(&r.registration.id) {
                continue;
            }
            let client = shoal_client::ApiClient::replica(
                &shoal_api::member_url(&r.registration.address, ""),
                None,
            )
            .with_timeout(Duration::from_secs(2));
            tokio::spawn(async move {
                let _ = client.post_empty("/sync/nudge").await;
            });
        }
    }

    /// The fleet as `shoal status` shows it; also refreshes skew tracking
    /// and the fleet gauges.
    pub fn fleet_status(&self) -> shoal_api::fleet::FleetStatus {
        let facts = self.facts();
        let views = self.live.views(&self.snapshot().registrations, &facts);
        self.metrics.update_fleet(&facts);
        self.metrics.update_skew(&views);
        let now = shoal_api::now_millis();
        let rollouts = facts
            .deployments
            .iter()
            .filter_map(|(d, _)| Some((d.model.clone(), d.rollout.clone()?)))
            .filter(|(_, r)| {
                !r.state.is_terminal() || now - r.updated_at < shoal_api::fleet::RECENT_ROLLOUT_MS
            })
            .collect();
        shoal_api::fleet::FleetStatus {
            revision: facts.revision,
            replicas: views,
            rollouts,
            control: None,
            gateways: self.traffic.gateways(),
            placements: facts
                .deployments
                .iter()
                .filter_map(|(d, _)| Some((d.model.clone(), d.placement.clone()?)))
                .collect(),
        }
    }

    /// [`Control::fleet_status`] with the control plane's members and leader
    /// (read from the registry): what `GET /api/v1/status` answers.
    pub async fn status(&self) -> anyhow::Result<shoal_api::fleet::FleetStatus> {
        let mut status = self.fleet_status();
        status.control = Some(self.leadership().await?);
        Ok(status)
    }

    /// Artifact bytes (chunks and manifests) the origin has served since
    /// start: what replicas pulled from it rather than from peers.
    pub fn origin_egress_bytes(&self) -> u64 {
        self.metrics.egress_total()
    }

    /// Metrics in Prometheus text format.
    pub fn encode_metrics(&self) -> String {
        self.fleet_status();
        self.registry.encode()
    }
}

/// A running control plane.
#[derive(Debug)]
pub struct ControlServer {
    /// The address it listens on.
    pub addr: SocketAddr,
    /// Its state.
    pub control: Arc<Control>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
    /// The controller, the campaign and (on a shared registry) the
    /// followers of the other members.
    tasks: Vec<tokio::task::JoinHandle<()>>,
    schedule: Option<tokio::task::JoinHandle<()>>,
}

impl ControlServer {
    /// Opens the stores, binds, and starts serving and the controller.
    pub async fn start(config: ControlConfig) -> anyhow::Result<ControlServer> {
        let tls = config
            .tls
            .as_ref()
            .map(shoal_http::tls::ServerTls::config)
            .transpose()?;
        let listener = shoal_http::bind(config.addr).await?;
        let addr = listener.local_addr()?;
        let mut config = config;
        config.addr = addr;
        let control = Control::open(config).await?;
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let router = api::router(control.clone());
        let stopping = control.clone();
        let task = tokio::spawn(shoal_http::serve(
            listener,
            router,
            None,
            async move {
                let _ = rx.await;
                stopping.stopping.send_replace(true);
            },
            tls,
        ));
        let supervised = control.clone();
        let mut tasks = vec![shoal_http::supervise("rollout controller", move || {
            controller::run(supervised.clone())
        })];
        let sampler = control.clone();
        tasks.push(shoal_http::supervise("dashboard history", move || {
            dashboard::sample(sampler.clone())
        }));
        let campaigner = control.clone();
        tasks.push(shoal_http::supervise("leader campaign", move || {
            leader::run(campaigner.clone())
        }));
        if let Some(url) = &control.config.events {
            let events = shoal_events::Events::connect(url).await?;
            let publisher = control.clone();
            tasks.push(shoal_http::supervise("event publisher", move || {
                events::run(publisher.clone(), events.clone())
            }));
        }
        if control.store.shared() {
            let follower = control.clone();
            tasks.push(shoal_http::supervise("registry follower", move || {
                leader::follow(follower.clone(), Duration::from_secs(2))
            }));
            let sharer = control.clone();
            let every = (control.config.heartbeat_interval / 4).max(Duration::from_millis(100));
            tasks.push(shoal_http::supervise("shared heartbeats", move || {
                leader::share_heartbeats(sharer.clone(), every)
            }));
        }
        let schedule = control.config.backup.clone().map(|schedule| {
            let control = control.clone();
            shoal_http::supervise("scheduled backups", move || {
                backups::run_schedule(control.clone(), schedule.clone())
            })
        });
        Ok(ControlServer {
            addr,
            control,
            shutdown: Some(tx),
            task,
            tasks,
            schedule,
        })
    }

    /// Stops serving and waits.
    pub async fn stop(mut self) -> std::io::Result<()> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        for task in &self.tasks {
            task.abort();
        }
        self.control.resign().await;
        if let Some(schedule) = &self.schedule {
            schedule.abort();
        }
        self.join().await
    }

    /// Waits for the server task to end. Call at most once.
    pub async fn join(&mut self) -> std::io::Result<()> {
        (&mut self.task)
            .await
            .map_err(|e| std::io::Error::other(e.to_string()))?
    }
}

//! The registry: what Shoal knows and must never lose.
//!
//! Models and their versions (SHA-256, size, labels, metrics, lineage,
//! status), deployments (the desired state of each model, including the
//! rollout controller's persisted state), registered replicas, an
//! append-only audit log, and the fleet revision — a counter bumped on every
//! change to desired state, which watchers resume from.
//!
//! [`RegistryStore`] is the seam; [`sqlite::SqliteRegistry`] is the embedded
//! default (WAL, `synchronous=FULL`: a write that returned success survives
//! a crash of the process); [`postgres::PostgresRegistry`] is what several
//! control planes share. [`suite`] is the conformance suite every
//! implementation must pass.
//!
//! Architecture invariant: every mutation writes its audit entry in the same
//! transaction, so the log and the state never disagree.

pub mod dump;
pub mod postgres;
pub mod sqlite;
pub mod suite;

use async_trait::async_trait;
use shoal_api::UnixMillis;
use shoal_api::auth::{Role, TokenInfo};
use shoal_api::deploy::Deployment;
use shoal_api::fleet::Registration;
use shoal_api::registry::{AuditEntry, ModelDetail, ModelSummary, VersionRecord, VersionStatus};

/// Why a registry operation failed.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// No such model or version.
    #[error("{0}")]
    NotFound(String),
    /// The request conflicts with what is stored (e.g. a version that
    /// already exists).
    #[error("{0}")]
    Conflict(String),
    /// The request is invalid.
    #[error("{0}")]
    Invalid(String),
    /// A conditional write found the deployment changed since it was read
    /// (another member wrote it): read again and decide again.
    #[error("{0}")]
    Stale(String),
    /// A write made as leader under a term that is no longer the lease's:
    /// this member was deposed, and its write is refused.
    #[error("{0}")]
    Fenced(String),
    /// The database failed.
    #[error("registry database: {0}")]
    Database(String),
}

/// A version's engine as its column holds it.
pub(crate) fn engine(text: &str) -> Result<shoal_core::Engine> {
    text.parse()
        .map_err(|e| RegistryError::Database(format!("corrupt engine column: {e}")))
}

impl From<sqlx::Error> for RegistryError {
    fn from(e: sqlx::Error) -> Self {
        RegistryError::Database(e.to_string())
    }
}

/// Result alias.
pub type Result<T> = std::result::Result<T, RegistryError>;

/// A version to register (the artifact is already stored).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct VersionDraft {
    /// Version name; the next number when absent.
    pub version: Option<String>,
    /// Artifact SHA-256.
    pub sha256: String,
    /// Artifact size.
    pub size: u64,
    /// Labels.
    pub labels: std::collections::BTreeMap<String, String>,
    /// Metrics.
    pub metrics: std::collections::BTreeMap<String, f64>,
    /// Parent version.
    pub lineage: Option<String>,
    /// Input shape overrides.
    pub input_shapes: std::collections::BTreeMap<String, Vec<i64>>,
    /// Bounds on request shapes.
    pub max_shapes: std::collections::BTreeMap<String, Vec<i64>>,
    /// State inputs and the outputs feeding them.
    pub state: std::collections::BTreeMap<String, String>,
    /// Dynamic batching.
    pub batching: Option<shoal_api::registry::Batching>,
    /// The engine replicas run it on.
    pub engine: shoal_core::Engine,
}

/// A deployment with the rollout controller's own persisted state.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredDeployment {
    /// What users see.
    pub deployment: Deployment,
    /// The controller's snapshot (opaque to the store).
    pub controller: serde_json::Value,
}

/// Who did something, for the audit log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Audit {
    /// Actor.
    pub actor: String,
    /// Why, free text.
    pub detail: String,
}

impl Audit {
    /// An audit note by `actor`.
    pub fn by(actor: impl Into<String>, detail: impl Into<String>) -> Audit {
        Audit {
            actor: actor.into(),
            detail: detail.into(),
        }
    }
}

/// A replica the registry knows.
#[derive(Debug, Clone, PartialEq)]
pub struct ReplicaRecord {
    /// As registered.
    pub registration: Registration,
    /// First registration.
    pub registered_at: UnixMillis,
}

/// A token as stored: its hash, never the secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRecord {
    /// Name, role and provenance.
    pub info: TokenInfo,
    /// SHA-256 of the secret (hex).
    pub hash: String,
}

impl TokenRecord {
    /// A record for a token named `name` with `role`, created now by
    /// `created_by`, whose secret hashes to `hash`.
    pub fn new(name: &str, role: Role, hash: String, created_by: &str) -> TokenRecord {
        TokenRecord {
            info: TokenInfo {
                name: name.to_owned(),
                role,
                created_at: shoal_api::now_millis(),
                created_by: created_by.to_owned(),
            },
            hash,
        }
    }
}

/// What must still hold for a deployment write to be applied; checked in
/// the write's own transaction.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Precondition {
    /// The deployment's revision as it was read (`Some(0)`: there was
    /// none); `None` writes whatever is stored.
    pub revision: Option<u64>,
    /// The leader's lease this write is made under, for the controller's
    /// own writes: refused unless that lease is still the current one.
    pub fence: Option<Fence>,
}

/// A leader's claim: the lease holder and the term it holds it in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    /// Holder id.
    pub holder: String,
    /// Its term.
    pub term: u64,
}

/// The leader lease as a campaign left it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// The holder's id (empty: never held).
    pub holder: String,
    /// Which process of that member holds it (each start is a new one).
    pub incarnation: String,
    /// The holder's advertised address.
    pub address: String,
    /// Fencing term: grows by one each time the lease changes hands.
    pub term: u64,
    /// Milliseconds until it lapses by the database's clock (≤ 0: lapsed).
    pub expires_in_ms: i64,
}

impl Lease {
    /// True when incarnation `incarnation` of member `id` holds a live
    /// lease.
    pub fn held_by(&self, id: &str, incarnation: &str) -> bool {
        self.holder == id && self.incarnation == incarnation && self.expires_in_ms > 0
    }
}

/// A replica's heartbeat as one member of the control plane stored it for
/// the others.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedHeartbeat {
    /// Replica id.
    pub replica: String,
    /// The heartbeat document (JSON).
    pub body: String,
    /// How long ago it was stored, by the database's clock.
    pub age_ms: i64,
    /// Its position: ask for those after the highest seen.
    pub seq: i64,
}

/// Storage for the registry. Implementations must be durable: a call that
/// returned `Ok` survives a crash of the process.
#[async_trait]
pub trait RegistryStore: Send + Sync + 'static {
    /// Registers a new version of `model` (creating the model on its first
    /// version). Versions are numbered 1, 2, … when not named.
    async fn create_version(
        &self,
        model: &str,
        draft: VersionDraft,
        audit: Audit,
    ) -> Result<VersionRecord>;

    /// All models.
    async fn list_models(&self) -> Result<Vec<ModelSummary>>;

    /// One model with all its versions; `None` if unknown.
    async fn get_model(&self, model: &str) -> Result<Option<ModelDetail>>;

    /// One version; `None` if unknown.
    async fn get_version(&self, model: &str, version: &str) -> Result<Option<VersionRecord>>;

    /// Sets a version's status. Reaching `Production` is remembered; a
    /// `rolled_back` version is never "last known good" again.
    async fn set_status(
        &self,
        model: &str,
        version: &str,
        status: VersionStatus,
        rolled_back: bool,
        audit: Audit,
    ) -> Result<VersionRecord> {
        self.set_status_if(model, version, status, rolled_back, None, audit)
            .await
    }

    /// [`RegistryStore::set_status`] made under a leader's `fence`:
    /// `Fenced`, and nothing written, unless that lease is the current one.
    async fn set_status_if(
        &self,
        model: &str,
        version: &str,
        status: VersionStatus,
        rolled_back: bool,
        fence: Option<&Fence>,
        audit: Audit,
    ) -> Result<VersionRecord>;

    /// Replaces how replicas serve a version (batching, engine) and bumps
    /// the fleet revision, so replicas serving it load it again with them;
    /// returns the record and the new revision. The artifact and the name
    /// stay as they were: those are what is immutable about a version.
    async fn set_options(
        &self,
        model: &str,
        version: &str,
        options: &shoal_api::registry::VersionOptions,
        audit: Audit,
    ) -> Result<(VersionRecord, u64)>;

    /// Stores a deployment and bumps the fleet revision; returns the new
    /// revision (also written into the stored deployment).
    async fn put_deployment(
        &self,
        deployment: StoredDeployment,
        action: &str,
        audit: Audit,
    ) -> Result<u64> {
        self.put_deployment_if(deployment, &Precondition::default(), action, audit)
            .await
    }

    /// [`RegistryStore::put_deployment`] if `precondition` holds: `Stale`
    /// when the deployment's revision is not the one read, `Fenced` when
    /// the fence is not the current lease. Nothing is written then.
    async fn put_deployment_if(
        &self,
        deployment: StoredDeployment,
        precondition: &Precondition,
        action: &str,
        audit: Audit,
    ) -> Result<u64>;

    /// One model's deployment.
    async fn get_deployment(&self, model: &str) -> Result<Option<StoredDeployment>>;

    /// Every deployment.
    async fn list_deployments(&self) -> Result<Vec<StoredDeployment>>;

    /// Registers or updates a replica; bumps the revision when it is new or
    /// its address or region changed (peers and placement depend on them).
    async fn register_replica(&self, registration: &Registration) -> Result<u64>;

    /// Every registered replica.
    async fn list_replicas(&self) -> Result<Vec<ReplicaRecord>>;

    /// Forgets a replica; bumps the revision. `false` if it was unknown.
    async fn remove_replica(&self, id: &str, audit: Audit) -> Result<bool>;

    /// The audit log, newest last: entries after `after_seq`, at most `limit`.
    async fn audit_log(&self, after_seq: i64, limit: u32) -> Result<Vec<AuditEntry>>;

    /// The newest `limit` entries of the audit log, newest last.
    async fn audit_tail(&self, limit: u32) -> Result<Vec<AuditEntry>>;

    /// The fleet revision.
    async fn revision(&self) -> Result<u64>;

    /// Stores a new token; `Conflict` when the name or hash is taken.
    async fn create_token(&self, token: TokenRecord, audit: Audit) -> Result<()>;

    /// Every token, by name.
    async fn list_tokens(&self) -> Result<Vec<TokenInfo>>;

    /// The token whose secret hashes to `hash`, if any. Asked on every
    /// authenticated request, so a revoked token stops working at once on
    /// every control plane sharing the registry.
    async fn token_by_hash(&self, hash: &str) -> Result<Option<TokenInfo>>;

    /// Deletes the token named `name`; `false` if there was none.
    async fn revoke_token(&self, name: &str, audit: Audit) -> Result<bool>;

    /// Moves the fleet revision up to `at_least` if it is below (never
    /// down), with an audit entry saying why; returns the revision.
    async fn advance_revision(&self, at_least: u64, audit: Audit) -> Result<u64>;

    /// Records member `id` (reachable at `address`) as seen now, and
    /// campaigns for the leader lease on behalf of its process
    /// `incarnation`: renews it (same term) when that process holds it,
    /// takes it (next term) when it lapsed, else leaves it — a restarted
    /// member waits for its previous process's lease to lapse like anyone
    /// else. Returns the lease as it is afterwards.
    async fn campaign(
        &self,
        id: &str,
        incarnation: &str,
        address: &str,
        ttl: std::time::Duration,
    ) -> Result<Lease>;

    /// Appends an audit entry that changes nothing else (who took the
    /// lead, and when), under `fence` when given: `Fenced` unless that
    /// lease is the current one.
    async fn note(
        &self,
        action: &str,
        target: &str,
        fence: Option<&Fence>,
        audit: Audit,
    ) -> Result<()>;

    /// Lets the lease lapse now if process `incarnation` of `id` holds it
    /// (a clean shutdown hands over at once).
    async fn resign(&self, id: &str, incarnation: &str) -> Result<()>;

    /// The lease and the members seen within `seen_within`.
    async fn leadership(
        &self,
        seen_within: std::time::Duration,
    ) -> Result<(Lease, Vec<shoal_api::fleet::Member>)>;

    /// Stores replica `replica`'s latest heartbeat (JSON) for the other
    /// members.
    async fn put_heartbeat(&self, replica: &str, body: &str) -> Result<()>;

    /// Heartbeats stored after position `seq`, oldest first.
    async fn heartbeats_after(&self, seq: i64) -> Result<Vec<SharedHeartbeat>>;

    /// True when other processes may share this registry and write to it
    /// (several control planes): they then exchange heartbeats through it
    /// and follow its [`RegistryStore::changes`].
    fn shared(&self) -> bool {
        false
    }

    /// New fleet revisions as other processes commit them, if the store
    /// can announce them (PostgreSQL `LISTEN/NOTIFY`); `None` otherwise.
    async fn changes(&self) -> Result<Option<futures::stream::BoxStream<'static, Result<u64>>>> {
        Ok(None)
    }

    /// Every row, read in one transaction: the registry at one revision.
    async fn dump(&self) -> Result<dump::RegistryDump>;

    /// Loads `dump` into this registry, which must be empty (`Conflict`
    /// otherwise), in one transaction; the revision and audit positions
    /// are the dump's. Nothing is written when the dump is invalid.
    async fn load_dump(&self, dump: &dump::RegistryDump) -> Result<()>;
}

/// `Fenced` unless `fence` is the lease as the write's transaction read
/// it (holder and term).
pub(crate) fn check_fence(fence: &Fence, lease: (&str, u64)) -> Result<()> {
    if fence.holder == lease.0 && fence.term == lease.1 {
        return Ok(());
    }
    Err(RegistryError::Fenced(format!(
        "{} is no longer the leader (its term {} ended; the lease is {}'s, term {})",
        fence.holder,
        fence.term,
        if lease.0.is_empty() {
            "nobody"
        } else {
            lease.0
        },
        lease.1
    )))
}

/// `Stale` unless the deployment of `model` is still at `expected` (0: none)
/// — `stored` is its revision as the write's transaction read it.
pub(crate) fn check_revision(
    model: &str,
    expected: Option<u64>,
    stored: Option<u64>,
) -> Result<()> {
    let stored = stored.unwrap_or(0);
    match expected {
        Some(expected) if expected != stored => Err(RegistryError::Stale(format!(
            "the deployment of {model} changed meanwhile (revision {expected} → {stored}); try again"
        ))),
        _ => Ok(()),
    }
}

/// True for 64 lowercase or uppercase hex digits.
pub(crate) fn is_sha256(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The newest version that reached production and was not rolled back;
/// `versions` are oldest first, as [`RegistryStore::get_model`] returns them.
pub fn last_known_good(versions: &[VersionRecord]) -> Option<&VersionRecord> {
    versions
        .iter()
        .rev()
        .find(|v| v.reached_production && !v.rolled_back)
}

//! The whole registry as one value: what a backup stores and a restore
//! loads.
//!
//! A [`RegistryDump`] holds every row of every table as stored (JSON
//! columns as their text), read in one transaction, so it is the registry at
//! exactly one revision. It is engine-neutral: a dump of a SQLite registry
//! loads into PostgreSQL and back, and dumping a restored registry gives the
//! same value — which is how a restore is checked.
//!
//! The row reading and binding here are generic over the sqlx database;
//! each store supplies its transaction and placeholder style.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};
use shoal_api::registry::{AuditEntry, VersionStatus};
use sqlx::{ColumnIndex, Database, Decode, Encode, Row, Type};

use crate::{RegistryError, Result};

/// The dump format this build writes and reads.
pub const DUMP_FORMAT: u32 = 1;

/// Every row of the registry at one revision.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryDump {
    /// [`DUMP_FORMAT`] of the writer.
    pub format: u32,
    /// The fleet revision the dump is of.
    pub revision: u64,
    /// Models, by name.
    pub models: Vec<ModelRow>,
    /// Versions, by model and sequence.
    pub versions: Vec<VersionRow>,
    /// Deployments with their controller snapshots, by model.
    pub deployments: Vec<DeploymentRow>,
    /// Registered replicas, by id.
    pub replicas: Vec<ReplicaRow>,
    /// Tokens (hashes only), by name.
    pub tokens: Vec<TokenRow>,
    /// The audit log, oldest first.
    pub audit: Vec<AuditEntry>,
}

/// A `models` row.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelRow {
    /// Name.
    pub name: String,
    /// Creation time (Unix ms).
    pub created_at: i64,
    /// The next version number.
    pub next_number: i64,
}

/// A `versions` row, JSON columns as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionRow {
    /// Model.
    pub model: String,
    /// Version.
    pub version: String,
    /// Order within the model.
    pub seq: i64,
    /// Artifact SHA-256.
    pub sha256: String,
    /// Artifact size.
    pub size: i64,
    /// Creation time (Unix ms).
    pub created_at: i64,
    /// Labels (JSON).
    pub labels: String,
    /// Metrics (JSON).
    pub metrics: String,
    /// Parent version.
    pub lineage: Option<String>,
    /// Input shape overrides (JSON).
    pub input_shapes: String,
    /// Request bounds (JSON).
    pub max_shapes: String,
    /// State inputs and their outputs (JSON; absent from older dumps).
    #[serde(default = "empty_object")]
    pub state: String,
    /// Dynamic batching (JSON, `null` when none; absent from older dumps).
    #[serde(default = "json_null")]
    pub batching: String,
    /// The engine (`tract` in dumps older than the column).
    #[serde(default = "default_engine")]
    pub engine: String,
    /// Status name.
    pub status: String,
    /// Reached production once.
    pub reached_production: bool,
    /// Was rolled back.
    pub rolled_back: bool,
}

/// A `deployments` row.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeploymentRow {
    /// Model.
    pub model: String,
    /// The deployment (JSON).
    pub deployment: String,
    /// The rollout controller's snapshot (JSON).
    pub controller: String,
}

/// A `replicas` row.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaRow {
    /// Replica id.
    pub id: String,
    /// Its registration (JSON).
    pub registration: String,
    /// First registration (Unix ms).
    pub registered_at: i64,
}

/// A `tokens` row: the hash, never the secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRow {
    /// Name.
    pub name: String,
    /// Role name.
    pub role: String,
    /// SHA-256 of the secret.
    pub hash: String,
    /// Creation time (Unix ms).
    pub created_at: i64,
    /// Creator.
    pub created_by: String,
}

impl RegistryDump {
    /// The artifacts (SHA-256) the dump's versions need.
    pub fn artifacts(&self) -> BTreeSet<String> {
        self.versions.iter().map(|v| v.sha256.clone()).collect()
    }

    /// Checks that the dump can be loaded as it is: a known format, rows
    /// that reference what exists, readable JSON columns, known statuses
    /// and roles. A restore refuses a dump that fails, before writing.
    pub fn validate(&self) -> Result<()> {
        let bad = |what: String| Err(RegistryError::Invalid(format!("registry dump: {what}")));
        if self.format != DUMP_FORMAT {
            return bad(format!(
                "format {} is not {DUMP_FORMAT}, the one this Shoal reads",
                self.format
            ));
        }
        let models: BTreeSet<&str> = self.models.iter().map(|m| m.name.as_str()).collect();
        for v in &self.versions {
            let at = format!("{}:{}", v.model, v.version);
            if !models.contains(v.model.as_str()) {
                return bad(format!("version {at} belongs to no model"));
            }
            if !crate::is_sha256(&v.sha256) {
                return bad(format!("version {at} has no SHA-256"));
            }
            if VersionStatus::parse(&v.status).is_none() {
                return bad(format!("version {at} has unknown status {:?}", v.status));
            }
            if let Err(e) = v.engine.parse::<shoal_core::Engine>() {
                return bad(format!("version {at}: {e}"));
            }
            for (column, text) in [
                ("labels", &v.labels),
                ("metrics", &v.metrics),
                ("input_shapes", &v.input_shapes),
                ("max_shapes", &v.max_shapes),
                ("state", &v.state),
                ("batching", &v.batching),
            ] {
                if serde_json::from_str::<serde_json::Value>(text).is_err() {
                    return bad(format!("version {at}: {column} is not JSON"));
                }
            }
        }
        for d in &self.deployments {
            if let Err(e) = serde_json::from_str::<shoal_api::deploy::Deployment>(&d.deployment) {
                return bad(format!("deployment of {}: {e}", d.model));
            }
            if serde_json::from_str::<serde_json::Value>(&d.controller).is_err() {
                return bad(format!("deployment of {}: controller is not JSON", d.model));
            }
        }
        for r in &self.replicas {
            if let Err(e) = serde_json::from_str::<shoal_api::fleet::Registration>(&r.registration)
            {
                return bad(format!("replica {}: {e}", r.id));
            }
        }
        for t in &self.tokens {
            if t.role.parse::<shoal_api::auth::Role>().is_err() {
                return bad(format!("token {} has unknown role {:?}", t.name, t.role));
            }
        }
        Ok(())
    }
}

/// The queries that read a dump, each ordered so two dumps of the same
/// registry are equal.
pub(crate) const SELECTS: [&str; 6] = [
    "SELECT name, created_at, next_number FROM models ORDER BY name",
    "SELECT model, version, seq, sha256, size, created_at, labels, metrics, lineage, input_shapes, max_shapes, state, batching, engine, status, reached_production, rolled_back FROM versions ORDER BY model, seq",
    "SELECT model, deployment, controller FROM deployments ORDER BY model",
    "SELECT id, registration, registered_at FROM replicas ORDER BY id",
    "SELECT name, role, hash, created_at, created_by FROM tokens ORDER BY name",
    "SELECT seq, at, actor, action, target, detail FROM audit ORDER BY seq",
];

/// Counts rows a restore target must not have.
pub(crate) const OCCUPIED: &str = "SELECT (SELECT COUNT(*) FROM models) + (SELECT COUNT(*) FROM tokens) + (SELECT COUNT(*) FROM replicas) + (SELECT COUNT(*) FROM deployments) + (SELECT COUNT(*) FROM audit)";

/// Builds a dump from the rows of [`SELECTS`], in that order.
pub(crate) fn decode<R>(revision: u64, tables: [Vec<R>; 6]) -> Result<RegistryDump>
where
    R: Row,
    for<'a> &'a str: ColumnIndex<R>,
    for<'r> String: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> Option<String>: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> i64: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> bool: Decode<'r, R::Database> + Type<R::Database>,
{
    let [models, versions, deployments, replicas, tokens, audit] = tables;
    let each = |rows: Vec<R>| rows.into_iter();
    Ok(RegistryDump {
        format: DUMP_FORMAT,
        revision,
        models: each(models)
            .map(|r| {
                Ok(ModelRow {
                    name: r.try_get("name")?,
                    created_at: r.try_get("created_at")?,
                    next_number: r.try_get("next_number")?,
                })
            })
            .collect::<std::result::Result<_, sqlx::Error>>()?,
        versions: each(versions)
            .map(|r| {
                Ok(VersionRow {
                    model: r.try_get("model")?,
                    version: r.try_get("version")?,
                    seq: r.try_get("seq")?,
                    sha256: r.try_get("sha256")?,
                    size: r.try_get("size")?,
                    created_at: r.try_get("created_at")?,
                    labels: r.try_get("labels")?,
                    metrics: r.try_get("metrics")?,
                    lineage: r.try_get("lineage")?,
                    input_shapes: r.try_get("input_shapes")?,
                    max_shapes: r.try_get("max_shapes")?,
                    state: r.try_get("state")?,
                    batching: r.try_get("batching")?,
                    engine: r.try_get("engine")?,
                    status: r.try_get("status")?,
                    reached_production: r.try_get("reached_production")?,
                    rolled_back: r.try_get("rolled_back")?,
                })
            })
            .collect::<std::result::Result<_, sqlx::Error>>()?,
        deployments: each(deployments)
            .map(|r| {
                Ok(DeploymentRow {
                    model: r.try_get("model")?,
                    deployment: r.try_get("deployment")?,
                    controller: r.try_get("controller")?,
                })
            })
            .collect::<std::result::Result<_, sqlx::Error>>()?,
        replicas: each(replicas)
            .map(|r| {
                Ok(ReplicaRow {
                    id: r.try_get("id")?,
                    registration: r.try_get("registration")?,
                    registered_at: r.try_get("registered_at")?,
                })
            })
            .collect::<std::result::Result<_, sqlx::Error>>()?,
        tokens: each(tokens)
            .map(|r| {
                Ok(TokenRow {
                    name: r.try_get("name")?,
                    role: r.try_get("role")?,
                    hash: r.try_get("hash")?,
                    created_at: r.try_get("created_at")?,
                    created_by: r.try_get("created_by")?,
                })
            })
            .collect::<std::result::Result<_, sqlx::Error>>()?,
        audit: each(audit)
            .map(|r| {
                Ok(AuditEntry {
                    seq: r.try_get("seq")?,
                    at: r.try_get("at")?,
                    actor: r.try_get("actor")?,
                    action: r.try_get("action")?,
                    target: r.try_get("target")?,
                    detail: r.try_get("detail")?,
                })
            })
            .collect::<std::result::Result<_, sqlx::Error>>()?,
    })
}

type Insert<DB> = sqlx::query::Query<'static, DB, <DB as Database>::Arguments>;

/// The inserts that load `dump` into empty tables; `placeholders(n)` is
/// the engine's parameter list for `n` values (`?1, ?2` or `$1, $2`).
pub(crate) fn inserts<DB>(dump: &RegistryDump, placeholders: fn(usize) -> String) -> Vec<Insert<DB>>
where
    DB: Database,
    for<'t> String: Encode<'t, DB> + Type<DB>,
    for<'t> Option<String>: Encode<'t, DB> + Type<DB>,
    for<'t> i64: Encode<'t, DB> + Type<DB>,
    for<'t> bool: Encode<'t, DB> + Type<DB>,
{
    let statement = |table: &str, columns: &str| -> Insert<DB> {
        let n = columns.split(',').count();
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "INSERT INTO {table} ({columns}) VALUES ({})",
            placeholders(n)
        )))
    };
    let mut out = Vec::new();
    for m in &dump.models {
        out.push(
            statement("models", "name, created_at, next_number")
                .bind(m.name.clone())
                .bind(m.created_at)
                .bind(m.next_number),
        );
    }
    for v in &dump.versions {
        out.push(
            statement(
                "versions",
                "model, version, seq, sha256, size, created_at, labels, metrics, lineage, input_shapes, max_shapes, state, batching, engine, status, reached_production, rolled_back",
            )
            .bind(v.model.clone())
            .bind(v.version.clone())
            .bind(v.seq)
            .bind(v.sha256.clone())
            .bind(v.size)
            .bind(v.created_at)
            .bind(v.labels.clone())
            .bind(v.metrics.clone())
            .bind(v.lineage.clone())
            .bind(v.input_shapes.clone())
            .bind(v.max_shapes.clone())
            .bind(v.state.clone())
            .bind(v.batching.clone())
            .bind(v.engine.clone())
            .bind(v.status.clone())
            .bind(v.reached_production)
            .bind(v.rolled_back),
        );
    }
    for d in &dump.deployments {
        out.push(
            statement("deployments", "model, deployment, controller")
                .bind(d.model.clone())
                .bind(d.deployment.clone())
                .bind(d.controller.clone()),
        );
    }
    for r in &dump.replicas {
        out.push(
            statement("replicas", "id, registration, registered_at")
                .bind(r.id.clone())
                .bind(r.registration.clone())
                .bind(r.registered_at),
        );
    }
    for t in &dump.tokens {
        out.push(
            statement("tokens", "name, role, hash, created_at, created_by")
                .bind(t.name.clone())
                .bind(t.role.clone())
                .bind(t.hash.clone())
                .bind(t.created_at)
                .bind(t.created_by.clone()),
        );
    }
    for a in &dump.audit {
        out.push(
            statement("audit", "seq, at, actor, action, target, detail")
                .bind(a.seq)
                .bind(a.at)
                .bind(a.actor.clone())
                .bind(a.action.clone())
                .bind(a.target.clone())
                .bind(a.detail.clone()),
        );
    }
    out
}

/// The refusal for a restore into a registry that has data.
pub(crate) fn occupied(rows: i64, revision: u64) -> Result<()> {
    if rows > 0 || revision > 0 {
        return Err(RegistryError::Conflict(format!(
            "the registry is not empty ({rows} rows, revision {revision}); restore into an empty \
             data directory or a new database"
        )));
    }
    Ok(())
}

/// `{}`: what a column added later holds in rows dumped before it.
fn empty_object() -> String {
    "{}".to_owned()
}

/// `tract`: the engine of versions dumped before the column.
fn default_engine() -> String {
    shoal_core::Engine::default().to_string()
}

/// `null`: what the batching column holds in rows dumped before it.
fn json_null() -> String {
    "null".to_owned()
}

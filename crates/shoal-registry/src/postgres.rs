//! The registry on PostgreSQL: what several control planes share.
//!
//! The same semantics as the SQLite store (the conformance suite runs
//! against both), with PostgreSQL's concurrency in mind: every write is one
//! transaction; the fleet revision and the audit sequence are counter rows
//! updated in that transaction, so their row locks order concurrent writers
//! and a number is visible only once its transaction commits — readers that
//! follow `revision` or `audit_log(after)` never skip an entry that commits
//! late. A model's row is locked (`FOR UPDATE`) while a version is numbered.
//!
//! The schema is versioned with sqlx migrations (`migrations/postgres`),
//! applied at open: a newer control plane upgrades an older database.

use async_trait::async_trait;
use shoal_api::auth::TokenInfo;
use shoal_api::deploy::Deployment;
use shoal_api::fleet::Registration;
use shoal_api::registry::{AuditEntry, ModelDetail, ModelSummary, VersionRecord, VersionStatus};
use shoal_api::{UnixMillis, now_millis};
use shoal_core::{ModelName, Version};
use sqlx::postgres::{PgPool, PgPoolOptions, PgRow};
use sqlx::{Postgres, Row, Transaction};

use crate::dump::{self, RegistryDump};
use crate::{
    Audit, Fence, Lease, Precondition, RegistryError, RegistryStore, ReplicaRecord, Result,
    SharedHeartbeat, StoredDeployment, TokenRecord, VersionDraft, last_known_good,
};
use futures::StreamExt;
use futures::stream::BoxStream;
use shoal_api::fleet::Member;
use std::time::Duration;

/// The schema's migrations, compiled in.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("migrations/postgres");

/// The `LISTEN/NOTIFY` channel new revisions are announced on.
const CHANNEL: &str = "shoal_revision";

/// The PostgreSQL registry.
#[derive(Debug, Clone)]
pub struct PostgresRegistry {
    pool: PgPool,
}

fn json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_else(|_| "null".into())
}

fn parse<T: serde::de::DeserializeOwned>(s: &str) -> Result<T> {
    serde_json::from_str(s)
        .map_err(|e| RegistryError::Database(format!("corrupt JSON column: {e}")))
}

fn unsigned(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

impl PostgresRegistry {
    async fn lease(tx: &mut Transaction<'_, Postgres>) -> Result<Lease> {
        let row = sqlx::query(
            "SELECT holder, incarnation, address, term,
                    (EXTRACT(EPOCH FROM (expires_at - now())) * 1000)::BIGINT
             FROM leader_lease WHERE id = 1",
        )
        .fetch_one(&mut **tx)
        .await?;
        Ok(Lease {
            holder: row.get(0),
            incarnation: row.get(1),
            address: row.get(2),
            term: unsigned(row.get(3)),
            expires_in_ms: row.get(4),
        })
    }

    /// Connects to `url` (`postgres://…`) and brings the schema up to date.
    pub async fn open(url: &str) -> Result<PostgresRegistry> {
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .acquire_timeout(std::time::Duration::from_secs(10))
            .connect(url)
            .await
            .map_err(|e| {
                RegistryError::Database(format!("cannot connect to {}: {e}", redact(url)))
            })?;
        MIGRATOR.run(&pool).await.map_err(|e| {
            RegistryError::Database(format!("cannot migrate the registry schema: {e}"))
        })?;
        Ok(PostgresRegistry { pool })
    }

    /// The connection pool (for leadership, which lives beside the
    /// registry in the same database).
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    async fn append_audit(
        tx: &mut Transaction<'_, Postgres>,
        action: &str,
        target: &str,
        audit: &Audit,
    ) -> Result<()> {
        let seq: i64 =
            sqlx::query("UPDATE meta SET value = value + 1 WHERE key = 'audit' RETURNING value")
                .fetch_one(&mut **tx)
                .await?
                .get(0);
        sqlx::query(
            "INSERT INTO audit (seq, at, actor, action, target, detail) VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(seq)
        .bind(now_millis())
        .bind(&audit.actor)
        .bind(action)
        .bind(target)
        .bind(&audit.detail)
        .execute(&mut **tx)
        .await?;
        Ok(())
    }

    /// Refuses (`Fenced`) unless `fence`, when given, is the current
    /// lease; the lease row stays locked against a takeover until `tx` ends.
    async fn check_fence(tx: &mut Transaction<'_, Postgres>, fence: Option<&Fence>) -> Result<()> {
        let Some(fence) = fence else {
            return Ok(());
        };
        let lease = sqlx::query("SELECT holder, term FROM leader_lease WHERE id = 1 FOR SHARE")
            .fetch_one(&mut **tx)
            .await?;
        crate::check_fence(
            fence,
            (
                lease.get::<&str, _>(0),
                u64::try_from(lease.get::<i64, _>(1)).unwrap_or(0),
            ),
        )
    }

    async fn bump(tx: &mut Transaction<'_, Postgres>) -> Result<u64> {
        let row =
            sqlx::query("UPDATE meta SET value = value + 1 WHERE key = 'revision' RETURNING value")
                .fetch_one(&mut **tx)
                .await?;
        let revision = row.get::<i64, _>(0);
        Self::announce(tx, revision).await?;
        Ok(unsigned(revision))
    }

    /// Tells every listening member of the new revision when `tx` commits
    /// (notifications are transactional).
    async fn announce(tx: &mut Transaction<'_, Postgres>, revision: i64) -> Result<()> {
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(CHANNEL)
            .bind(revision.to_string())
            .execute(&mut **tx)
            .await?;
        Ok(())
    }

    fn version_from_row(row: &PgRow) -> Result<VersionRecord> {
        let status: String = row.get("status");
        Ok(VersionRecord {
            model: row.get("model"),
            version: row.get("version"),
            sha256: row.get("sha256"),
            size: unsigned(row.get::<i64, _>("size")),
            created_at: row.get("created_at"),
            labels: parse(row.get::<&str, _>("labels"))?,
            metrics: parse(row.get::<&str, _>("metrics"))?,
            lineage: row.get("lineage"),
            status: VersionStatus::parse(&status)
                .ok_or_else(|| RegistryError::Database(format!("unknown status {status:?}")))?,
            reached_production: row.get("reached_production"),
            rolled_back: row.get("rolled_back"),
            input_shapes: parse(row.get::<&str, _>("input_shapes"))?,
            max_shapes: parse(row.get::<&str, _>("max_shapes"))?,
            state: parse(row.get::<&str, _>("state"))?,
            batching: parse(row.get::<&str, _>("batching"))?,
            engine: crate::engine(row.get::<&str, _>("engine"))?,
        })
    }

    fn token_from_row(row: &PgRow) -> Result<TokenInfo> {
        let role: String = row.get("role");
        Ok(TokenInfo {
            name: row.get("name"),
            role: role
                .parse()
                .map_err(|e| RegistryError::Database(format!("tokens.role: {e}")))?,
            created_at: row.get("created_at"),
            created_by: row.get("created_by"),
        })
    }

    async fn versions_of(&self, model: &str) -> Result<Vec<VersionRecord>> {
        let rows = sqlx::query("SELECT * FROM versions WHERE model = $1 ORDER BY seq")
            .bind(model)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(Self::version_from_row).collect()
    }

    fn summary(name: String, created_at: UnixMillis, versions: &[VersionRecord]) -> ModelSummary {
        ModelSummary {
            name,
            created_at,
            versions: versions.len() as u64,
            latest: versions.last().map(|v| v.version.clone()),
            production: versions
                .iter()
                .rev()
                .find(|v| v.status == VersionStatus::Production)
                .map(|v| v.version.clone()),
            last_known_good: last_known_good(versions).map(|v| v.version.clone()),
        }
    }
}

use shoal_core::redact_url as redact;

#[async_trait]
impl RegistryStore for PostgresRegistry {
    async fn create_version(
        &self,
        model: &str,
        draft: VersionDraft,
        audit: Audit,
    ) -> Result<VersionRecord> {
        ModelName::new(model).map_err(|e| RegistryError::Invalid(e.to_string()))?;
        if let Some(v) = &draft.version {
            Version::new(v.as_str()).map_err(|e| RegistryError::Invalid(e.to_string()))?;
        }
        let now = now_millis();
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO models (name, created_at, next_number) VALUES ($1, $2, 1) ON CONFLICT (name) DO NOTHING",
        )
        .bind(model)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        // Numbering is per model: lock its row until the version is in.
        let next: i64 = sqlx::query("SELECT next_number FROM models WHERE name = $1 FOR UPDATE")
            .bind(model)
            .fetch_one(&mut *tx)
            .await?
            .get(0);
        let seq: i64 =
            sqlx::query("SELECT COALESCE(MAX(seq), 0) + 1 FROM versions WHERE model = $1")
                .bind(model)
                .fetch_one(&mut *tx)
                .await?
                .get(0);
        let mut number = next;
        let version = match draft.version.clone() {
            Some(v) => v,
            None => loop {
                let taken: i64 =
                    sqlx::query("SELECT COUNT(*) FROM versions WHERE model = $1 AND version = $2")
                        .bind(model)
                        .bind(number.to_string())
                        .fetch_one(&mut *tx)
                        .await?
                        .get(0);
                if taken == 0 {
                    break number.to_string();
                }
                number += 1;
            },
        };
        if let Some(lineage) = &draft.lineage {
            let exists: i64 =
                sqlx::query("SELECT COUNT(*) FROM versions WHERE model = $1 AND version = $2")
                    .bind(model)
                    .bind(lineage)
                    .fetch_one(&mut *tx)
                    .await?
                    .get(0);
            if exists == 0 {
                return Err(RegistryError::Invalid(format!(
                    "lineage names {model}:{lineage}, which does not exist"
                )));
            }
        }
        let inserted = sqlx::query(
            "INSERT INTO versions (model, version, seq, sha256, size, created_at, labels, metrics, lineage, input_shapes, max_shapes, state, batching, engine, status)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, 'registered')",
        )
        .bind(model)
        .bind(&version)
        .bind(seq)
        .bind(&draft.sha256)
        .bind(i64::try_from(draft.size).unwrap_or(i64::MAX))
        .bind(now)
        .bind(json(&draft.labels))
        .bind(json(&draft.metrics))
        .bind(&draft.lineage)
        .bind(json(&draft.input_shapes))
        .bind(json(&draft.max_shapes))
        .bind(json(&draft.state))
        .bind(json(&draft.batching))
        .bind(draft.engine.as_str())
        .execute(&mut *tx)
        .await;
        if let Err(sqlx::Error::Database(e)) = &inserted
            && e.is_unique_violation()
        {
            return Err(RegistryError::Conflict(format!(
                "{model}:{version} already exists; versions are immutable, push a new one"
            )));
        }
        inserted?;
        if let Ok(n) = version.parse::<i64>() {
            sqlx::query(
                "UPDATE models SET next_number = GREATEST(next_number, $1) WHERE name = $2",
            )
            .bind(n + 1)
            .bind(model)
            .execute(&mut *tx)
            .await?;
        }
        let target = format!("{model}:{version}");
        Self::append_audit(&mut tx, "version.create", &target, &audit).await?;
        tx.commit().await?;
        self.get_version(model, &version)
            .await?
            .ok_or_else(|| RegistryError::Database(format!("{target} vanished after insert")))
    }

    async fn list_models(&self) -> Result<Vec<ModelSummary>> {
        let rows = sqlx::query("SELECT name, created_at FROM models ORDER BY name")
            .fetch_all(&self.pool)
            .await?;
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            let name: String = row.get(0);
            let versions = self.versions_of(&name).await?;
            out.push(Self::summary(name, row.get(1), &versions));
        }
        Ok(out)
    }

    async fn get_model(&self, model: &str) -> Result<Option<ModelDetail>> {
        let Some(row) = sqlx::query("SELECT name, created_at FROM models WHERE name = $1")
            .bind(model)
            .fetch_optional(&self.pool)
            .await?
        else {
            return Ok(None);
        };
        let versions = self.versions_of(model).await?;
        Ok(Some(ModelDetail {
            model: Self::summary(row.get(0), row.get(1), &versions),
            versions,
        }))
    }

    async fn get_version(&self, model: &str, version: &str) -> Result<Option<VersionRecord>> {
        let row = sqlx::query("SELECT * FROM versions WHERE model = $1 AND version = $2")
            .bind(model)
            .bind(version)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(Self::version_from_row).transpose()
    }

    async fn set_status_if(
        &self,
        model: &str,
        version: &str,
        status: VersionStatus,
        rolled_back: bool,
        fence: Option<&Fence>,
        audit: Audit,
    ) -> Result<VersionRecord> {
        let mut tx = self.pool.begin().await?;
        Self::check_fence(&mut tx, fence).await?;
        let updated = sqlx::query(
            "UPDATE versions SET status = $1,
                reached_production = reached_production OR $2,
                rolled_back = rolled_back OR $3
             WHERE model = $4 AND version = $5",
        )
        .bind(status.as_str())
        .bind(status == VersionStatus::Production)
        .bind(rolled_back)
        .bind(model)
        .bind(version)
        .execute(&mut *tx)
        .await?;
        if updated.rows_affected() == 0 {
            return Err(RegistryError::NotFound(format!(
                "no version {model}:{version}"
            )));
        }
        let action = if rolled_back {
            "version.rolled_back"
        } else {
            "version.status"
        };
        let audit = Audit {
            detail: format!("{} ({})", status.as_str(), audit.detail),
            ..audit
        };
        Self::append_audit(&mut tx, action, &format!("{model}:{version}"), &audit).await?;
        tx.commit().await?;
        self.get_version(model, version)
            .await?
            .ok_or_else(|| RegistryError::NotFound(format!("no version {model}:{version}")))
    }

    async fn set_options(
        &self,
        model: &str,
        version: &str,
        options: &shoal_api::registry::VersionOptions,
        audit: Audit,
    ) -> Result<(VersionRecord, u64)> {
        let mut tx = self.pool.begin().await?;
        let revision = Self::bump(&mut tx).await?;
        let updated = sqlx::query(
            "UPDATE versions SET batching = $1, engine = $2 WHERE model = $3 AND version = $4",
        )
        .bind(json(&options.batching))
        .bind(options.engine.as_str())
        .bind(model)
        .bind(version)
        .execute(&mut *tx)
        .await?;
        if updated.rows_affected() == 0 {
            return Err(RegistryError::NotFound(format!(
                "no version {model}:{version}"
            )));
        }
        Self::append_audit(
            &mut tx,
            "version.options",
            &format!("{model}:{version}"),
            &audit,
        )
        .await?;
        tx.commit().await?;
        let record = self
            .get_version(model, version)
            .await?
            .ok_or_else(|| RegistryError::NotFound(format!("no version {model}:{version}")))?;
        Ok((record, revision))
    }

    async fn put_deployment_if(
        &self,
        mut stored: StoredDeployment,
        precondition: &Precondition,
        action: &str,
        audit: Audit,
    ) -> Result<u64> {
        let mut tx = self.pool.begin().await?;
        // The lease row is read-locked (a takeover, which updates it, waits
        // for this write to commit, or this write sees the new term).
        Self::check_fence(&mut tx, precondition.fence.as_ref()).await?;
        // Bumping first takes the revision row's lock, which orders every
        // deployment write: the deployment read below is the latest.
        let revision = Self::bump(&mut tx).await?;
        let model = stored.deployment.model.clone();
        let current = sqlx::query("SELECT deployment FROM deployments WHERE model = $1")
            .bind(&model)
            .fetch_optional(&mut *tx)
            .await?
            .map(|r| parse::<Deployment>(r.get::<&str, _>(0)))
            .transpose()?;
        crate::check_revision(&model, precondition.revision, current.map(|d| d.revision))?;
        stored.deployment.revision = revision;
        stored.deployment.updated_at = now_millis();
        sqlx::query(
            "INSERT INTO deployments (model, deployment, controller) VALUES ($1, $2, $3)
             ON CONFLICT (model) DO UPDATE SET deployment = excluded.deployment, controller = excluded.controller",
        )
        .bind(&model)
        .bind(json(&stored.deployment))
        .bind(json(&stored.controller))
        .execute(&mut *tx)
        .await?;
        Self::append_audit(&mut tx, action, &model, &audit).await?;
        tx.commit().await?;
        Ok(revision)
    }

    async fn get_deployment(&self, model: &str) -> Result<Option<StoredDeployment>> {
        let row = sqlx::query("SELECT deployment, controller FROM deployments WHERE model = $1")
            .bind(model)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| {
            Ok(StoredDeployment {
                deployment: parse::<Deployment>(r.get::<&str, _>(0))?,
                controller: parse(r.get::<&str, _>(1))?,
            })
        })
        .transpose()
    }

    async fn list_deployments(&self) -> Result<Vec<StoredDeployment>> {
        let rows = sqlx::query("SELECT deployment, controller FROM deployments ORDER BY model")
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| {
                Ok(StoredDeployment {
                    deployment: parse(r.get::<&str, _>(0))?,
                    controller: parse(r.get::<&str, _>(1))?,
                })
            })
            .collect()
    }

    async fn register_replica(&self, registration: &Registration) -> Result<u64> {
        let mut tx = self.pool.begin().await?;
        let existing = sqlx::query("SELECT registration FROM replicas WHERE id = $1 FOR UPDATE")
            .bind(&registration.id)
            .fetch_optional(&mut *tx)
            .await?
            .map(|r| parse::<Registration>(r.get::<&str, _>(0)))
            .transpose()?;
        let changed = existing.as_ref().is_none_or(|old| {
            old.address != registration.address
                || old.region != registration.region
                || old.standby != registration.standby
                || old.tier != registration.tier
        });
        sqlx::query(
            "INSERT INTO replicas (id, registration, registered_at) VALUES ($1, $2, $3)
             ON CONFLICT (id) DO UPDATE SET registration = excluded.registration",
        )
        .bind(&registration.id)
        .bind(json(registration))
        .bind(now_millis())
        .execute(&mut *tx)
        .await?;
        let revision = if changed {
            let audit = Audit::by(
                "replica",
                format!("{} in {}", registration.address, registration.region),
            );
            Self::append_audit(&mut tx, "replica.register", &registration.id, &audit).await?;
            Self::bump(&mut tx).await?
        } else {
            let row = sqlx::query("SELECT value FROM meta WHERE key = 'revision'")
                .fetch_one(&mut *tx)
                .await?;
            unsigned(row.get::<i64, _>(0))
        };
        tx.commit().await?;
        Ok(revision)
    }

    async fn list_replicas(&self) -> Result<Vec<ReplicaRecord>> {
        let rows = sqlx::query("SELECT registration, registered_at FROM replicas ORDER BY id")
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| {
                Ok(ReplicaRecord {
                    registration: parse(r.get::<&str, _>(0))?,
                    registered_at: r.get(1),
                })
            })
            .collect()
    }

    async fn remove_replica(&self, id: &str, audit: Audit) -> Result<bool> {
        let mut tx = self.pool.begin().await?;
        let removed = sqlx::query("DELETE FROM replicas WHERE id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?
            .rows_affected()
            > 0;
        sqlx::query("DELETE FROM heartbeats WHERE replica = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        if removed {
            Self::append_audit(&mut tx, "replica.remove", id, &audit).await?;
            Self::bump(&mut tx).await?;
        }
        tx.commit().await?;
        Ok(removed)
    }

    async fn audit_log(&self, after_seq: i64, limit: u32) -> Result<Vec<AuditEntry>> {
        let rows = sqlx::query(
            "SELECT seq, at, actor, action, target, detail FROM audit WHERE seq > $1 ORDER BY seq LIMIT $2",
        )
        .bind(after_seq)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(audit_entry).collect())
    }

    async fn audit_tail(&self, limit: u32) -> Result<Vec<AuditEntry>> {
        let rows = sqlx::query(
            "SELECT seq, at, actor, action, target, detail FROM \
             (SELECT seq, at, actor, action, target, detail FROM audit ORDER BY seq DESC LIMIT $1) AS tail \
             ORDER BY seq",
        )
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(audit_entry).collect())
    }

    async fn revision(&self) -> Result<u64> {
        let row = sqlx::query("SELECT value FROM meta WHERE key = 'revision'")
            .fetch_one(&self.pool)
            .await?;
        Ok(unsigned(row.get::<i64, _>(0)))
    }

    async fn create_token(&self, token: TokenRecord, audit: Audit) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        let inserted = sqlx::query(
            "INSERT INTO tokens (name, role, hash, created_at, created_by) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(&token.info.name)
        .bind(token.info.role.as_str())
        .bind(&token.hash)
        .bind(token.info.created_at)
        .bind(&token.info.created_by)
        .execute(&mut *tx)
        .await;
        if let Err(sqlx::Error::Database(e)) = &inserted
            && e.is_unique_violation()
        {
            return Err(RegistryError::Conflict(format!(
                "a token named {:?} exists; revoke it first or pick another name",
                token.info.name
            )));
        }
        inserted?;
        let audit = Audit {
            detail: format!("role {} ({})", token.info.role, audit.detail),
            ..audit
        };
        Self::append_audit(&mut tx, "token.create", &token.info.name, &audit).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn list_tokens(&self) -> Result<Vec<TokenInfo>> {
        let rows =
            sqlx::query("SELECT name, role, created_at, created_by FROM tokens ORDER BY name")
                .fetch_all(&self.pool)
                .await?;
        rows.iter().map(Self::token_from_row).collect()
    }

    async fn token_by_hash(&self, hash: &str) -> Result<Option<TokenInfo>> {
        sqlx::query("SELECT name, role, created_at, created_by FROM tokens WHERE hash = $1")
            .bind(hash)
            .fetch_optional(&self.pool)
            .await?
            .as_ref()
            .map(Self::token_from_row)
            .transpose()
    }

    async fn revoke_token(&self, name: &str, audit: Audit) -> Result<bool> {
        let mut tx = self.pool.begin().await?;
        let removed = sqlx::query("DELETE FROM tokens WHERE name = $1")
            .bind(name)
            .execute(&mut *tx)
            .await?
            .rows_affected()
            > 0;
        if removed {
            Self::append_audit(&mut tx, "token.revoke", name, &audit).await?;
        }
        tx.commit().await?;
        Ok(removed)
    }

    async fn advance_revision(&self, at_least: u64, audit: Audit) -> Result<u64> {
        let mut tx = self.pool.begin().await?;
        let before: i64 = sqlx::query("SELECT value FROM meta WHERE key = 'revision'")
            .fetch_one(&mut *tx)
            .await?
            .get(0);
        let target = i64::try_from(at_least).unwrap_or(i64::MAX);
        if before >= target {
            return Ok(u64::try_from(before).unwrap_or(0));
        }
        sqlx::query("UPDATE meta SET value = GREATEST(value, $1) WHERE key = 'revision'")
            .bind(target)
            .execute(&mut *tx)
            .await?;
        Self::announce(&mut tx, target).await?;
        Self::append_audit(&mut tx, "revision.advance", &at_least.to_string(), &audit).await?;
        tx.commit().await?;
        Ok(at_least)
    }

    async fn campaign(
        &self,
        id: &str,
        incarnation: &str,
        address: &str,
        ttl: Duration,
    ) -> Result<Lease> {
        let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO members (id, address, last_seen) VALUES ($1, $2, now())
             ON CONFLICT (id) DO UPDATE SET address = excluded.address, last_seen = now()",
        )
        .bind(id)
        .bind(address)
        .execute(&mut *tx)
        .await?;
        // Renew when held, take (next term) when lapsed; the row lock
        // orders campaigns, and the database's clock alone judges expiry.
        sqlx::query(
            "UPDATE leader_lease SET
                 term = CASE WHEN holder = $1 AND incarnation = $4 THEN term ELSE term + 1 END,
                 holder = $1, incarnation = $4, address = $2,
                 expires_at = now() + make_interval(secs => $3::double precision / 1000)
             WHERE id = 1 AND ((holder = $1 AND incarnation = $4) OR expires_at <= now())",
        )
        .bind(id)
        .bind(address)
        .bind(ttl_ms as f64)
        .bind(incarnation)
        .execute(&mut *tx)
        .await?;
        let lease = Self::lease(&mut tx).await?;
        tx.commit().await?;
        Ok(lease)
    }

    async fn note(
        &self,
        action: &str,
        target: &str,
        fence: Option<&Fence>,
        audit: Audit,
    ) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        Self::check_fence(&mut tx, fence).await?;
        Self::append_audit(&mut tx, action, target, &audit).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn resign(&self, id: &str, incarnation: &str) -> Result<()> {
        sqlx::query(
            "UPDATE leader_lease SET expires_at = now() WHERE id = 1 AND holder = $1 AND incarnation = $2",
        )
        .bind(id)
        .bind(incarnation)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn leadership(&self, seen_within: Duration) -> Result<(Lease, Vec<Member>)> {
        let mut tx = self.pool.begin().await?;
        let lease = Self::lease(&mut tx).await?;
        let within = i64::try_from(seen_within.as_millis()).unwrap_or(i64::MAX);
        let members = sqlx::query(
            "SELECT id, address, (EXTRACT(EPOCH FROM last_seen) * 1000)::BIGINT FROM members
             WHERE last_seen > now() - make_interval(secs => $1::double precision / 1000)
             ORDER BY id",
        )
        .bind(within as f64)
        .fetch_all(&mut *tx)
        .await?
        .iter()
        .map(|r| Member {
            id: r.get(0),
            address: r.get(1),
            last_seen: r.get(2),
        })
        .collect();
        tx.commit().await?;
        Ok((lease, members))
    }

    async fn put_heartbeat(&self, replica: &str, body: &str) -> Result<()> {
        sqlx::query(
            "INSERT INTO heartbeats (replica, body, at, seq) VALUES ($1, $2, now(), nextval('heartbeat_seq'))
             ON CONFLICT (replica) DO UPDATE SET body = excluded.body, at = excluded.at, seq = excluded.seq",
        )
        .bind(replica)
        .bind(body)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn heartbeats_after(&self, seq: i64) -> Result<Vec<SharedHeartbeat>> {
        let rows = sqlx::query(
            "SELECT replica, body, (EXTRACT(EPOCH FROM (now() - at)) * 1000)::BIGINT, seq
             FROM heartbeats WHERE seq > $1 ORDER BY seq",
        )
        .bind(seq)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .iter()
            .map(|r| SharedHeartbeat {
                replica: r.get(0),
                body: r.get(1),
                age_ms: r.get(2),
                seq: r.get(3),
            })
            .collect())
    }

    fn shared(&self) -> bool {
        true
    }

    async fn changes(&self) -> Result<Option<BoxStream<'static, Result<u64>>>> {
        let mut listener = sqlx::postgres::PgListener::connect_with(&self.pool).await?;
        listener.listen(CHANNEL).await?;
        Ok(Some(
            listener
                .into_stream()
                .map(|n| {
                    let n = n?;
                    n.payload().parse::<u64>().map_err(|e| {
                        RegistryError::Database(format!("bad revision notification: {e}"))
                    })
                })
                .boxed(),
        ))
    }

    async fn dump(&self) -> Result<RegistryDump> {
        let mut tx = self
            .pool
            .begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .await?;
        let revision = sqlx::query("SELECT value FROM meta WHERE key = 'revision'")
            .fetch_one(&mut *tx)
            .await?
            .get::<i64, _>(0);
        let mut tables: [Vec<PgRow>; 6] = Default::default();
        for (rows, select) in tables.iter_mut().zip(dump::SELECTS) {
            *rows = sqlx::query(select).fetch_all(&mut *tx).await?;
        }
        tx.commit().await?;
        dump::decode(unsigned(revision), tables)
    }

    async fn load_dump(&self, dump: &RegistryDump) -> Result<()> {
        dump.validate()?;
        let mut tx = self.pool.begin().await?;
        // The counter rows are locked first, as every writer locks them.
        let revision: i64 = sqlx::query("SELECT value FROM meta WHERE key = 'revision' FOR UPDATE")
            .fetch_one(&mut *tx)
            .await?
            .get(0);
        let rows: i64 = sqlx::query(dump::OCCUPIED)
            .fetch_one(&mut *tx)
            .await?
            .get(0);
        dump::occupied(rows, unsigned(revision))?;
        for insert in dump::inserts::<Postgres>(dump, |n| {
            (1..=n)
                .map(|i| format!("${i}"))
                .collect::<Vec<_>>()
                .join(", ")
        }) {
            insert.execute(&mut *tx).await?;
        }
        let audit = dump.audit.iter().map(|a| a.seq).max().unwrap_or(0);
        for (key, value) in [
            ("revision", i64::try_from(dump.revision).unwrap_or(i64::MAX)),
            ("audit", audit),
        ] {
            sqlx::query("UPDATE meta SET value = $1 WHERE key = $2")
                .bind(value)
                .bind(key)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }
}

/// An audit log row (`seq, at, actor, action, target, detail`).
fn audit_entry(r: &sqlx::postgres::PgRow) -> AuditEntry {
    AuditEntry {
        seq: r.get(0),
        at: r.get(1),
        actor: r.get(2),
        action: r.get(3),
        target: r.get(4),
        detail: r.get(5),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn urls_lose_their_password_in_errors() {
        assert_eq!(
            super::redact("postgres://shoal:secret@db:5432/registry"),
            "postgres://shoal@db:5432/registry"
        );
        assert_eq!(
            super::redact("postgres://db/registry"),
            "postgres://db/registry"
        );
    }
}

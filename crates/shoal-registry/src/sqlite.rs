//! The embedded registry on SQLite.
//!
//! WAL journal with `synchronous=FULL`: every committed transaction is on
//! disk before the call returns, so an acknowledged write survives `kill -9`
//! (and power loss). One writer at a time, which is plenty for a registry.

use std::path::Path;
use std::str::FromStr;

use async_trait::async_trait;
use shoal_api::auth::TokenInfo;
use shoal_api::deploy::Deployment;
use shoal_api::fleet::Registration;
use shoal_api::registry::{AuditEntry, ModelDetail, ModelSummary, VersionRecord, VersionStatus};
use shoal_api::{UnixMillis, now_millis};
use shoal_core::{ModelName, Version};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Row, Sqlite, SqlitePool, Transaction};

use crate::dump::{self, RegistryDump};
use crate::{
    Audit, Fence, Lease, Precondition, RegistryError, RegistryStore, ReplicaRecord, Result,
    SharedHeartbeat, StoredDeployment, TokenRecord, VersionDraft, last_known_good,
};
use shoal_api::fleet::Member;
use std::time::Duration;

const SCHEMA: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL)",
    "INSERT OR IGNORE INTO meta (key, value) VALUES ('revision', 0)",
    "CREATE TABLE IF NOT EXISTS models (
        name TEXT PRIMARY KEY,
        created_at INTEGER NOT NULL,
        next_number INTEGER NOT NULL
    )",
    "CREATE TABLE IF NOT EXISTS versions (
        model TEXT NOT NULL REFERENCES models(name),
        version TEXT NOT NULL,
        seq INTEGER NOT NULL,
        sha256 TEXT NOT NULL,
        size INTEGER NOT NULL,
        created_at INTEGER NOT NULL,
        labels TEXT NOT NULL,
        metrics TEXT NOT NULL,
        lineage TEXT,
        input_shapes TEXT NOT NULL,
        max_shapes TEXT NOT NULL DEFAULT '{}',
        state TEXT NOT NULL DEFAULT '{}',
        batching TEXT NOT NULL DEFAULT 'null',
        engine TEXT NOT NULL DEFAULT 'tract',
        status TEXT NOT NULL,
        reached_production INTEGER NOT NULL DEFAULT 0,
        rolled_back INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (model, version)
    )",
    "CREATE TABLE IF NOT EXISTS deployments (
        model TEXT PRIMARY KEY,
        deployment TEXT NOT NULL,
        controller TEXT NOT NULL
    )",
    "CREATE TABLE IF NOT EXISTS replicas (
        id TEXT PRIMARY KEY,
        registration TEXT NOT NULL,
        registered_at INTEGER NOT NULL
    )",
    "CREATE TABLE IF NOT EXISTS tokens (
        name TEXT PRIMARY KEY,
        role TEXT NOT NULL,
        hash TEXT NOT NULL UNIQUE,
        created_at INTEGER NOT NULL,
        created_by TEXT NOT NULL
    )",
    "CREATE TABLE IF NOT EXISTS leader_lease (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        holder TEXT NOT NULL,
        incarnation TEXT NOT NULL,
        address TEXT NOT NULL,
        term INTEGER NOT NULL,
        expires_at INTEGER NOT NULL
    )",
    "INSERT OR IGNORE INTO leader_lease (id, holder, incarnation, address, term, expires_at) VALUES (1, '', '', '', 0, 0)",
    "CREATE TABLE IF NOT EXISTS members (
        id TEXT PRIMARY KEY,
        address TEXT NOT NULL,
        last_seen INTEGER NOT NULL
    )",
    "CREATE TABLE IF NOT EXISTS heartbeats (
        replica TEXT PRIMARY KEY,
        body TEXT NOT NULL,
        at INTEGER NOT NULL,
        seq INTEGER NOT NULL
    )",
    "INSERT OR IGNORE INTO meta (key, value) VALUES ('heartbeat', 0)",
    "CREATE TABLE IF NOT EXISTS audit (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        at INTEGER NOT NULL,
        actor TEXT NOT NULL,
        action TEXT NOT NULL,
        target TEXT NOT NULL,
        detail TEXT NOT NULL
    )",
];

/// The SQLite registry.
#[derive(Debug, Clone)]
pub struct SqliteRegistry {
    pool: SqlitePool,
}

fn json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_else(|_| "null".into())
}

fn parse<T: serde::de::DeserializeOwned>(s: &str) -> Result<T> {
    serde_json::from_str(s)
        .map_err(|e| RegistryError::Database(format!("corrupt JSON column: {e}")))
}

impl SqliteRegistry {
    /// Opens (creating) the registry database at `path`.
    pub async fn open(path: &Path) -> Result<SqliteRegistry> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| {
                RegistryError::Database(format!("cannot create {}: {e}", dir.display()))
            })?;
        }
        let options = SqliteConnectOptions::from_str(&format!("sqlite://{}", path.display()))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(std::time::Duration::from_secs(10));
        // Schema and upgrades on one connection, closed before the pool
        // opens: no pooled connection ever prepared a statement against
        // the schema as it was before an upgrade.
        {
            use sqlx::Connection;
            let mut setup = sqlx::SqliteConnection::connect_with(&options).await?;
            for statement in SCHEMA {
                sqlx::query(*statement).execute(&mut setup).await?;
            }
            Self::upgrade(&mut setup).await?;
            setup.close().await?;
        }
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await?;
        Ok(SqliteRegistry { pool })
    }

    /// Brings a registry written by an older Shoal up to this schema:
    /// columns added since are added with their defaults.
    async fn upgrade(db: &mut sqlx::SqliteConnection) -> Result<()> {
        const ADDED: &[(&str, &str, &str)] = &[
            ("versions", "max_shapes", "TEXT NOT NULL DEFAULT '{}'"),
            ("versions", "state", "TEXT NOT NULL DEFAULT '{}'"),
            ("versions", "batching", "TEXT NOT NULL DEFAULT 'null'"),
            ("versions", "engine", "TEXT NOT NULL DEFAULT 'tract'"),
        ];
        for (table, column, definition) in ADDED {
            let present = sqlx::query("SELECT 1 FROM pragma_table_info(?) WHERE name = ?")
                .bind(table)
                .bind(column)
                .fetch_optional(&mut *db)
                .await?
                .is_some();
            if !present {
                // Names from the constant list above, never from input.
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "ALTER TABLE {table} ADD COLUMN {column} {definition}"
                )))
                .execute(&mut *db)
                .await?;
                tracing::info!(table, column, "registry upgraded: column added");
            }
        }
        Ok(())
    }

    /// A write transaction that takes the write lock up front (`BEGIN
    /// IMMEDIATE`), so concurrent writers queue on the busy timeout instead
    /// of failing with "database is locked" when a read upgrades to a write.
    async fn begin_write(&self) -> Result<Transaction<'static, Sqlite>> {
        Ok(self.pool.begin_with("BEGIN IMMEDIATE").await?)
    }

    async fn append_audit(
        tx: &mut Transaction<'_, Sqlite>,
        action: &str,
        target: &str,
        audit: &Audit,
    ) -> Result<()> {
        sqlx::query("INSERT INTO audit (at, actor, action, target, detail) VALUES (?, ?, ?, ?, ?)")
            .bind(now_millis())
            .bind(&audit.actor)
            .bind(action)
            .bind(target)
            .bind(&audit.detail)
            .execute(&mut **tx)
            .await?;
        Ok(())
    }

    async fn lease(tx: &mut Transaction<'_, Sqlite>, now: UnixMillis) -> Result<Lease> {
        let row = sqlx::query(
            "SELECT holder, incarnation, address, term, expires_at FROM leader_lease WHERE id = 1",
        )
        .fetch_one(&mut **tx)
        .await?;
        Ok(Lease {
            holder: row.get(0),
            incarnation: row.get(1),
            address: row.get(2),
            term: u64::try_from(row.get::<i64, _>(3)).unwrap_or(0),
            expires_in_ms: row.get::<i64, _>(4) - now,
        })
    }

    /// Refuses (`Fenced`) unless `fence`, when given, is the current
    /// lease; the lease row stays locked against a takeover until `tx` ends.
    async fn check_fence(tx: &mut Transaction<'_, Sqlite>, fence: Option<&Fence>) -> Result<()> {
        let Some(fence) = fence else {
            return Ok(());
        };
        let lease = sqlx::query("SELECT holder, term FROM leader_lease WHERE id = 1")
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

    async fn bump(tx: &mut Transaction<'_, Sqlite>) -> Result<u64> {
        let row =
            sqlx::query("UPDATE meta SET value = value + 1 WHERE key = 'revision' RETURNING value")
                .fetch_one(&mut **tx)
                .await?;
        Ok(u64::try_from(row.get::<i64, _>(0)).unwrap_or(0))
    }

    fn version_from_row(row: &sqlx::sqlite::SqliteRow) -> Result<VersionRecord> {
        let status: String = row.get("status");
        Ok(VersionRecord {
            model: row.get("model"),
            version: row.get("version"),
            sha256: row.get("sha256"),
            size: u64::try_from(row.get::<i64, _>("size")).unwrap_or(0),
            created_at: row.get("created_at"),
            labels: parse(row.get::<&str, _>("labels"))?,
            metrics: parse(row.get::<&str, _>("metrics"))?,
            lineage: row.get("lineage"),
            status: VersionStatus::parse(&status)
                .ok_or_else(|| RegistryError::Database(format!("unknown status {status:?}")))?,
            reached_production: row.get::<i64, _>("reached_production") != 0,
            rolled_back: row.get::<i64, _>("rolled_back") != 0,
            input_shapes: parse(row.get::<&str, _>("input_shapes"))?,
            max_shapes: parse(row.get::<&str, _>("max_shapes"))?,
            state: parse(row.get::<&str, _>("state"))?,
            batching: parse(row.get::<&str, _>("batching"))?,
            engine: crate::engine(row.get::<&str, _>("engine"))?,
        })
    }

    fn token_from_row(row: &sqlx::sqlite::SqliteRow) -> Result<TokenInfo> {
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
        let rows = sqlx::query("SELECT * FROM versions WHERE model = ? ORDER BY seq")
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

#[async_trait]
impl RegistryStore for SqliteRegistry {
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
        let mut tx = self.begin_write().await?;
        sqlx::query(
            "INSERT OR IGNORE INTO models (name, created_at, next_number) VALUES (?, ?, 1)",
        )
        .bind(model)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        let next: i64 = sqlx::query("SELECT next_number FROM models WHERE name = ?")
            .bind(model)
            .fetch_one(&mut *tx)
            .await?
            .get(0);
        let seq: i64 =
            sqlx::query("SELECT COALESCE(MAX(seq), 0) + 1 FROM versions WHERE model = ?")
                .bind(model)
                .fetch_one(&mut *tx)
                .await?
                .get(0);
        // Numbered versions skip names already taken by explicit versions.
        let mut number = next;
        let version = match draft.version.clone() {
            Some(v) => v,
            None => loop {
                let taken: i64 =
                    sqlx::query("SELECT COUNT(*) FROM versions WHERE model = ? AND version = ?")
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
                sqlx::query("SELECT COUNT(*) FROM versions WHERE model = ? AND version = ?")
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
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'registered')",
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
            sqlx::query("UPDATE models SET next_number = MAX(next_number, ?) WHERE name = ?")
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
        let Some(row) = sqlx::query("SELECT name, created_at FROM models WHERE name = ?")
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
        let row = sqlx::query("SELECT * FROM versions WHERE model = ? AND version = ?")
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
        let mut tx = self.begin_write().await?;
        Self::check_fence(&mut tx, fence).await?;
        let updated = sqlx::query(
            "UPDATE versions SET status = ?,
                reached_production = reached_production OR ?,
                rolled_back = rolled_back OR ?
             WHERE model = ? AND version = ?",
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
        let mut tx = self.begin_write().await?;
        let revision = Self::bump(&mut tx).await?;
        let updated = sqlx::query(
            "UPDATE versions SET batching = ?, engine = ? WHERE model = ? AND version = ?",
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
        let mut tx = self.begin_write().await?;
        Self::check_fence(&mut tx, precondition.fence.as_ref()).await?;
        let model = stored.deployment.model.clone();
        let current = sqlx::query("SELECT deployment FROM deployments WHERE model = ?")
            .bind(&model)
            .fetch_optional(&mut *tx)
            .await?
            .map(|r| parse::<Deployment>(r.get::<&str, _>(0)))
            .transpose()?;
        crate::check_revision(&model, precondition.revision, current.map(|d| d.revision))?;
        let revision = Self::bump(&mut tx).await?;
        stored.deployment.revision = revision;
        stored.deployment.updated_at = now_millis();
        sqlx::query(
            "INSERT INTO deployments (model, deployment, controller) VALUES (?, ?, ?)
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
        let row = sqlx::query("SELECT deployment, controller FROM deployments WHERE model = ?")
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
        let mut tx = self.begin_write().await?;
        let existing = sqlx::query("SELECT registration FROM replicas WHERE id = ?")
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
            "INSERT INTO replicas (id, registration, registered_at) VALUES (?, ?, ?)
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
            u64::try_from(row.get::<i64, _>(0)).unwrap_or(0)
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
        let mut tx = self.begin_write().await?;
        let removed = sqlx::query("DELETE FROM replicas WHERE id = ?")
            .bind(id)
            .execute(&mut *tx)
            .await?
            .rows_affected()
            > 0;
        sqlx::query("DELETE FROM heartbeats WHERE replica = ?")
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
            "SELECT seq, at, actor, action, target, detail FROM audit WHERE seq > ? ORDER BY seq LIMIT ?",
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
             (SELECT seq, at, actor, action, target, detail FROM audit ORDER BY seq DESC LIMIT ?) AS tail \
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
        Ok(u64::try_from(row.get::<i64, _>(0)).unwrap_or(0))
    }

    async fn create_token(&self, token: TokenRecord, audit: Audit) -> Result<()> {
        let mut tx = self.begin_write().await?;
        let taken = sqlx::query("SELECT name FROM tokens WHERE name = ? OR hash = ?")
            .bind(&token.info.name)
            .bind(&token.hash)
            .fetch_optional(&mut *tx)
            .await?;
        if taken.is_some() {
            return Err(RegistryError::Conflict(format!(
                "a token named {:?} exists; revoke it first or pick another name",
                token.info.name
            )));
        }
        sqlx::query(
            "INSERT INTO tokens (name, role, hash, created_at, created_by) VALUES (?, ?, ?, ?, ?)",
        )
        .bind(&token.info.name)
        .bind(token.info.role.as_str())
        .bind(&token.hash)
        .bind(token.info.created_at)
        .bind(&token.info.created_by)
        .execute(&mut *tx)
        .await?;
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
        sqlx::query("SELECT name, role, created_at, created_by FROM tokens WHERE hash = ?")
            .bind(hash)
            .fetch_optional(&self.pool)
            .await?
            .as_ref()
            .map(Self::token_from_row)
            .transpose()
    }

    async fn revoke_token(&self, name: &str, audit: Audit) -> Result<bool> {
        let mut tx = self.begin_write().await?;
        let removed = sqlx::query("DELETE FROM tokens WHERE name = ?")
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
        let mut tx = self.begin_write().await?;
        let before: i64 = sqlx::query("SELECT value FROM meta WHERE key = 'revision'")
            .fetch_one(&mut *tx)
            .await?
            .get(0);
        let target = i64::try_from(at_least).unwrap_or(i64::MAX);
        if before >= target {
            return Ok(u64::try_from(before).unwrap_or(0));
        }
        sqlx::query("UPDATE meta SET value = MAX(value, ?) WHERE key = 'revision'")
            .bind(target)
            .execute(&mut *tx)
            .await?;
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
        let now = now_millis();
        let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
        let mut tx = self.begin_write().await?;
        sqlx::query(
            "INSERT INTO members (id, address, last_seen) VALUES (?1, ?2, ?3)
             ON CONFLICT (id) DO UPDATE SET address = excluded.address, last_seen = excluded.last_seen",
        )
        .bind(id)
        .bind(address)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "UPDATE leader_lease SET
                 term = CASE WHEN holder = ?1 AND incarnation = ?5 THEN term ELSE term + 1 END,
                 holder = ?1, incarnation = ?5, address = ?2, expires_at = ?3 + ?4
             WHERE id = 1 AND ((holder = ?1 AND incarnation = ?5) OR expires_at <= ?3)",
        )
        .bind(id)
        .bind(address)
        .bind(now)
        .bind(ttl_ms)
        .bind(incarnation)
        .execute(&mut *tx)
        .await?;
        let lease = Self::lease(&mut tx, now).await?;
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
        let mut tx = self.begin_write().await?;
        Self::check_fence(&mut tx, fence).await?;
        Self::append_audit(&mut tx, action, target, &audit).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn resign(&self, id: &str, incarnation: &str) -> Result<()> {
        sqlx::query(
            "UPDATE leader_lease SET expires_at = ? WHERE id = 1 AND holder = ? AND incarnation = ?",
        )
        .bind(now_millis())
        .bind(id)
        .bind(incarnation)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn leadership(&self, seen_within: Duration) -> Result<(Lease, Vec<Member>)> {
        let now = now_millis();
        let mut tx = self.pool.begin().await?;
        let lease = Self::lease(&mut tx, now).await?;
        let within = i64::try_from(seen_within.as_millis()).unwrap_or(i64::MAX);
        let members = sqlx::query(
            "SELECT id, address, last_seen FROM members WHERE last_seen > ? ORDER BY id",
        )
        .bind(now.saturating_sub(within))
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
        let mut tx = self.begin_write().await?;
        let seq: i64 = sqlx::query(
            "UPDATE meta SET value = value + 1 WHERE key = 'heartbeat' RETURNING value",
        )
        .fetch_one(&mut *tx)
        .await?
        .get(0);
        sqlx::query(
            "INSERT INTO heartbeats (replica, body, at, seq) VALUES (?, ?, ?, ?)
             ON CONFLICT (replica) DO UPDATE SET body = excluded.body, at = excluded.at, seq = excluded.seq",
        )
        .bind(replica)
        .bind(body)
        .bind(now_millis())
        .bind(seq)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn heartbeats_after(&self, seq: i64) -> Result<Vec<SharedHeartbeat>> {
        let now = now_millis();
        let rows =
            sqlx::query("SELECT replica, body, at, seq FROM heartbeats WHERE seq > ? ORDER BY seq")
                .bind(seq)
                .fetch_all(&self.pool)
                .await?;
        Ok(rows
            .iter()
            .map(|r| SharedHeartbeat {
                replica: r.get(0),
                body: r.get(1),
                age_ms: now - r.get::<i64, _>(2),
                seq: r.get(3),
            })
            .collect())
    }

    async fn dump(&self) -> Result<RegistryDump> {
        // A deferred transaction in WAL mode reads one snapshot throughout.
        let mut tx = self.pool.begin().await?;
        let revision = sqlx::query("SELECT value FROM meta WHERE key = 'revision'")
            .fetch_one(&mut *tx)
            .await?
            .get::<i64, _>(0);
        let mut tables: [Vec<sqlx::sqlite::SqliteRow>; 6] = Default::default();
        for (rows, select) in tables.iter_mut().zip(dump::SELECTS) {
            *rows = sqlx::query(select).fetch_all(&mut *tx).await?;
        }
        tx.commit().await?;
        dump::decode(u64::try_from(revision).unwrap_or(0), tables)
    }

    async fn load_dump(&self, dump: &RegistryDump) -> Result<()> {
        dump.validate()?;
        let mut tx = self.begin_write().await?;
        let rows: i64 = sqlx::query(dump::OCCUPIED)
            .fetch_one(&mut *tx)
            .await?
            .get(0);
        let revision: i64 = sqlx::query("SELECT value FROM meta WHERE key = 'revision'")
            .fetch_one(&mut *tx)
            .await?
            .get(0);
        dump::occupied(rows, u64::try_from(revision).unwrap_or(0))?;
        for insert in dump::inserts::<Sqlite>(dump, |n| {
            (1..=n)
                .map(|i| format!("?{i}"))
                .collect::<Vec<_>>()
                .join(", ")
        }) {
            insert.execute(&mut *tx).await?;
        }
        sqlx::query("UPDATE meta SET value = ? WHERE key = 'revision'")
            .bind(i64::try_from(dump.revision).unwrap_or(i64::MAX))
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }
}

/// An audit log row (`seq, at, actor, action, target, detail`).
fn audit_entry(r: &sqlx::sqlite::SqliteRow) -> AuditEntry {
    AuditEntry {
        seq: r.get(0),
        at: r.get(1),
        actor: r.get(2),
        action: r.get(3),
        target: r.get(4),
        detail: r.get(5),
    }
}

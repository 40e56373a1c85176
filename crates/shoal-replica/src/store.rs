//! The table of model versions a replica serves, swapped atomically.
//!
//! Readers (every inference request) load the current table without taking
//! a lock and hold an `Arc` to the version they use. A writer builds a new
//! table and publishes it in one step. A retired version leaves the table at
//! once, so new requests stop reaching it, but it is only freed when the
//! last request holding it finishes: requests in flight finish on the old
//! version, and the old one is dropped only when drained.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::SystemTime;

use arc_swap::ArcSwap;
use shoal_core::{ModelName, Version};
use shoal_runtime::LoadedModel;

use crate::metrics::{VersionMetrics, VersionUnloaded};

/// One loaded, verified, warmed version of a model.
#[derive(Debug)]
pub struct ServingVersion {
    /// The model.
    pub model: ModelName,
    /// The version.
    pub version: Version,
    /// SHA-256 of the artifact it was loaded from (hex).
    pub sha256: String,
    /// The prepared model.
    pub loaded: LoadedModel,
    /// When it was loaded.
    pub loaded_at: SystemTime,
    /// Memory it took to load and warm, bytes (reported for placement).
    pub memory_bytes: u64,
    /// Its batching queue, when its requests are batched.
    pub batcher: Option<shoal_runtime::batcher::Batcher>,
    /// The options it was asked to load with: a version whose options
    /// change is loaded again with the new ones.
    pub options: shoal_runtime::LoadOptions,
    pub(crate) metrics: VersionMetrics,
}

impl ServingVersion {
    /// Inference counts since this version was loaded.
    pub fn stats(&self) -> shoal_api::fleet::VersionStats {
        self.metrics.counts.snapshot()
    }
}

impl Drop for ServingVersion {
    fn drop(&mut self) {
        VersionUnloaded {
            model: &self.model,
            version: &self.version,
        }
        .emit(&self.metrics);
    }
}

/// The versions of one model, and which one unversioned requests get.
#[derive(Debug, Clone)]
pub struct ModelEntry {
    /// Loaded versions.
    pub versions: BTreeMap<Version, Arc<ServingVersion>>,
    /// The version that serves requests naming no version.
    pub default: Version,
}

impl ModelEntry {
    /// Loaded versions, oldest first (numeric versions numerically).
    pub fn version_names(&self) -> Vec<String> {
        let mut v: Vec<&Version> = self.versions.keys().collect();
        v.sort_by(|a, b| a.sort_key().cmp(&b.sort_key()));
        v.into_iter().map(ToString::to_string).collect()
    }
}

/// Everything a replica serves at one moment.
#[derive(Debug, Clone, Default)]
pub struct ModelTable {
    /// Models by name.
    pub models: BTreeMap<ModelName, ModelEntry>,
}

/// Why a model or version could not be found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LookupError {
    /// No such model.
    #[error("unknown model {model:?}; this replica serves {}", list(available))]
    UnknownModel {
        /// The requested model.
        model: String,
        /// Models served.
        available: Vec<String>,
    },
    /// No such version.
    #[error(
        "model {model:?} has no version {version:?} loaded; loaded versions: {}",
        list(available)
    )]
    UnknownVersion {
        /// The model.
        model: String,
        /// The requested version.
        version: String,
        /// Versions loaded.
        available: Vec<String>,
    },
}

fn list(items: &[String]) -> String {
    if items.is_empty() {
        "none".to_owned()
    } else {
        items.join(", ")
    }
}

/// How a newly loaded version joins the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InstallPolicy {
    /// Make it the version unversioned requests get.
    pub make_default: bool,
    /// Retire every other version of the model.
    pub retire_others: bool,
}

impl Default for InstallPolicy {
    /// A plain swap: the new version takes over and the others drain.
    fn default() -> Self {
        InstallPolicy {
            make_default: true,
            retire_others: true,
        }
    }
}

/// A version that has left the table but still serves requests in flight.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Draining {
    /// The model.
    pub model: String,
    /// The version.
    pub version: String,
    /// Requests still holding it.
    pub in_flight: usize,
}

/// The atomically swapped table plus the writers' bookkeeping.
#[derive(Debug, Default)]
pub struct ModelStore {
    table: ArcSwap<ModelTable>,
    /// Serialises writers; holds the versions retired but not yet freed.
    retired: Mutex<Vec<Weak<ServingVersion>>>,
}

impl ModelStore {
    /// An empty store.
    pub fn new() -> ModelStore {
        ModelStore::default()
    }

    /// The current table.
    pub fn snapshot(&self) -> Arc<ModelTable> {
        self.table.load_full()
    }

    /// The version serving `model` (the default when `version` is `None`).
    pub fn lookup(
        &self,
        model: &str,
        version: Option<&str>,
    ) -> Result<Arc<ServingVersion>, LookupError> {
        let table = self.table.load();
        let entry = table
            .models
            .get(model)
            .ok_or_else(|| LookupError::UnknownModel {
                model: model.to_owned(),
                available: table.models.keys().map(ToString::to_string).collect(),
            })?;
        let version = version.unwrap_or(entry.default.as_str());
        entry
            .versions
            .get(version)
            .cloned()
            .ok_or_else(|| LookupError::UnknownVersion {
                model: model.to_owned(),
                version: version.to_owned(),
                available: entry.version_names(),
            })
    }

    /// Adds `version` to the table per `policy`, in one atomic step.
    /// Returns the versions it retired.
    pub fn install(&self, version: Arc<ServingVersion>, policy: InstallPolicy) -> Vec<Version> {
        let mut retired = self.retired.lock().unwrap_or_else(PoisonError::into_inner);
        let mut table = ModelTable::clone(&self.table.load());
        let name = version.model.clone();
        let new = version.version.clone();
        let mut gone = Vec::new();
        match table.models.get_mut(&name) {
            Some(entry) => {
                if policy.retire_others {
                    for (v, old) in std::mem::take(&mut entry.versions) {
                        if v != new {
                            retired.push(Arc::downgrade(&old));
                            gone.push(v);
                        }
                    }
                }
                if let Some(replaced) = entry.versions.insert(new.clone(), version) {
                    // Reloading the same version: the old copy drains too.
                    retired.push(Arc::downgrade(&replaced));
                }
                if policy.make_default || policy.retire_others {
                    entry.default = new;
                }
            }
            None => {
                table.models.insert(
                    name,
                    ModelEntry {
                        versions: BTreeMap::from([(new.clone(), version)]),
                        default: new,
                    },
                );
            }
        }
        self.table.store(Arc::new(table));
        retired.retain(|w| w.strong_count() > 0);
        gone
    }

    /// Makes `version`, already loaded, the default of `model`.
    pub fn set_default(&self, model: &str, version: &str) -> Result<(), LookupError> {
        let _writer = self.retired.lock().unwrap_or_else(PoisonError::into_inner);
        let serving = self.lookup(model, Some(version))?;
        let mut table = ModelTable::clone(&self.table.load());
        if let Some(entry) = table.models.get_mut(model) {
            entry.default = serving.version.clone();
        }
        self.table.store(Arc::new(table));
        Ok(())
    }

    /// Removes `version` of `model`; it drains like a retired version. If it
    /// was the default, the newest remaining version becomes the default.
    pub fn remove(&self, model: &str, version: &str) -> Result<(), LookupError> {
        let mut retired = self.retired.lock().unwrap_or_else(PoisonError::into_inner);
        let serving = self.lookup(model, Some(version))?;
        let mut table = ModelTable::clone(&self.table.load());
        if let Some(entry) = table.models.get_mut(model) {
            entry.versions.remove(version);
            if entry.versions.is_empty() {
                table.models.remove(model);
            } else if entry.default.as_str() == version
                && let Some(newest) = entry
                    .versions
                    .keys()
                    .max_by(|a, b| a.sort_key().cmp(&b.sort_key()))
            {
                entry.default = newest.clone();
            }
        }
        self.table.store(Arc::new(table));
        retired.push(Arc::downgrade(&serving));
        drop(serving);
        retired.retain(|w| w.strong_count() > 0);
        Ok(())
    }

    /// Versions that left the table but still serve requests in flight.
    pub fn draining(&self) -> Vec<Draining> {
        let mut retired = self.retired.lock().unwrap_or_else(PoisonError::into_inner);
        retired.retain(|w| w.strong_count() > 0);
        retired
            .iter()
            .filter_map(Weak::upgrade)
            .map(|v| Draining {
                model: v.model.to_string(),
                version: v.version.to_string(),
                // Minus the reference this function holds.
                in_flight: Arc::strong_count(&v) - 1,
            })
            .collect()
    }

    /// True when `model` has `version` loaded.
    pub fn has(&self, model: &str, version: &str) -> bool {
        self.lookup(model, Some(version)).is_ok()
    }
}

//! What a replica tells gateways directly, without the control plane: the
//! admin listing of what it has loaded (`GET /admin/models`, the gateway's
//! health check) and the response headers that name who answered.

use serde::{Deserialize, Serialize};

/// Response header naming the replica that answered.
pub const REPLICA_HEADER: &str = "x-shoal-replica";

/// Added by a gateway to a step of a sequence whose last step another
/// replica answered (that replica's id): a replica without the sequence's
/// state then answers 410, naming where the state was.
pub const SEQUENCE_FROM_HEADER: &str = "x-shoal-sequence-from";
/// Response header naming the model version that answered.
pub const VERSION_HEADER: &str = "x-shoal-model-version";

/// One loaded version in the admin listing.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct LoadedVersion {
    /// The version.
    pub version: String,
    /// SHA-256 of its artifact.
    pub sha256: String,
    /// Requests using it right now.
    pub in_flight: usize,
}

/// One model in the admin listing.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct LoadedModel {
    /// The model.
    pub model: String,
    /// The version unversioned requests get.
    pub default: String,
    /// Loaded versions.
    pub versions: Vec<LoadedVersion>,
}

/// `GET /admin/models`. Every field has a default, so a gateway reads the
/// listing of a replica older or newer than itself (a fleet mid-upgrade):
/// only `models[].model` and `versions[].version` route.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct AdminListing {
    /// The replica id.
    pub replica_id: String,
    /// Ready (every required version loaded, not shutting down).
    pub ready: bool,
    /// Shutting down: finishing requests, take no new ones.
    pub shutting_down: bool,
    /// Loaded models.
    pub models: Vec<LoadedModel>,
    /// Retired versions still finishing requests (`model:version`).
    pub draining: Vec<LoadedVersion>,
}

impl AdminListing {
    /// Every loaded version (draining ones left out).
    pub fn serving_keys(&self) -> impl Iterator<Item = shoal_core::VersionKey> + '_ {
        self.models.iter().flat_map(|m| {
            m.versions
                .iter()
                .filter_map(move |v| shoal_core::VersionKey::parse(&m.model, &v.version).ok())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listing_from_an_older_replica_still_routes() {
        // What replicas sent before `ready` and `shutting_down` existed.
        let old = r#"{"replica_id": "r1", "models": [
            {"model": "digits", "versions": [{"version": "1"}, {"version": "2"}]}
        ]}"#;
        let listing: AdminListing = serde_json::from_str(old).unwrap();
        assert!(!listing.shutting_down);
        assert_eq!(
            listing.serving_keys().collect::<Vec<_>>(),
            ["digits:1", "digits:2"]
        );
    }
}

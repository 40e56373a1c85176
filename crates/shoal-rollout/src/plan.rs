//! Who serves what: desired state per replica.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use shoal_api::deploy::Deployment;
use shoal_api::fleet::{DesiredModel, DesiredState, DesiredVersion, LoadFailureReport, Peer};
use shoal_api::registry::VersionRecord;

use crate::controller::Controller;

/// What the control plane knows about one replica when planning.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplicaFacts {
    /// Id.
    pub id: String,
    /// `host:port`.
    pub address: String,
    /// Region.
    pub region: String,
    /// Heartbeating recently.
    pub alive: bool,
    /// What it reports serving.
    pub serving: BTreeSet<shoal_api::VersionKey>,
    /// Versions it could not load, and why (as its heartbeat reports them).
    pub failures: BTreeMap<shoal_api::VersionKey, LoadFailureReport>,
    /// A standby: loads like the others, routed to only while its region
    /// is short of active replicas (gateways decide).
    pub standby: bool,
}

impl ReplicaFacts {
    /// True when it reports serving `model:version`.
    pub fn serves(&self, model: &str, version: &str) -> bool {
        self.serving.iter().any(|k| k.is(model, version))
    }

    /// Why it could not load `model:version`, when it reports that it
    /// could not and does not serve it.
    pub fn failure(&self, model: &str, version: &str) -> Option<&LoadFailureReport> {
        if self.serves(model, version) {
            return None;
        }
        self.failures
            .iter()
            .find_map(|(k, f)| k.is(model, version).then_some(f))
    }
}

/// How far the live replicas among some eligible ones have got with
/// loading one version: what controllers wait on before moving traffic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Loading<'a> {
    /// Live replicas.
    pub live: usize,
    /// Ids of the live ones not serving the version yet.
    pub waiting: Vec<&'a str>,
}

impl<'a> Loading<'a> {
    /// Where loading `model:version` stands on `replicas`.
    pub fn of(model: &str, replicas: &[&'a ReplicaFacts], version: &str) -> Loading<'a> {
        let live: Vec<&&ReplicaFacts> = replicas.iter().filter(|r| r.alive).collect();
        Loading {
            live: live.len(),
            waiting: live
                .iter()
                .filter(|r| !r.serves(model, version))
                .map(|r| r.id.as_str())
                .collect(),
        }
    }

    /// Live replicas serving it.
    pub fn done(&self) -> usize {
        self.live - self.waiting.len()
    }

    /// Every live replica serves it, and there is at least one.
    pub fn complete(&self) -> bool {
        self.live > 0 && self.waiting.is_empty()
    }

    /// Why traffic does not move yet; `what` names the version to users
    /// ("the canary").
    pub fn holding_reason(&self, what: &str, version: &str) -> String {
        if self.live == 0 {
            format!("holding: no live replica to load {what}")
        } else {
            format!("waiting for {} to load {version}", self.waiting.join(", "))
        }
    }
}

/// Everything planning needs.
#[derive(Debug, Clone, Default)]
pub struct FleetFacts {
    /// Revision being planned.
    pub revision: u64,
    /// Now (ms since the epoch): warm versions expire.
    pub now: i64,
    /// Deployments with their rollout controller, if any. Shared: the
    /// control plane hands the same registry snapshot to every poll.
    pub deployments: Arc<Vec<(Deployment, Option<Controller>)>>,
    /// Inference counts per `model:version` over the fleet.
    pub stats: BTreeMap<shoal_api::VersionKey, shoal_api::fleet::VersionStats>,
    /// Shadow comparisons per model, as gateways reported them.
    pub shadow: BTreeMap<String, shoal_api::traffic::ShadowStats>,
    /// Rewards per `model:version`, as gateways reported them.
    pub rewards: BTreeMap<shoal_api::VersionKey, shoal_api::traffic::RewardStats>,
    /// Registered replicas.
    pub replicas: Vec<ReplicaFacts>,
    /// Version records by `(model, version)`. Shared, like `deployments`.
    pub versions: Arc<BTreeMap<(String, String), VersionRecord>>,
}

impl FleetFacts {
    /// Rewards of `model`'s versions, by version.
    pub fn rewards_of(&self, model: &str) -> BTreeMap<String, shoal_api::traffic::RewardStats> {
        self.rewards
            .iter()
            .filter(|(k, _)| k.is_of(model))
            .map(|(k, r)| (k.version.to_string(), r.clone()))
            .collect()
    }
}

/// True when `replica` may serve `deployment`: in one of its regions
/// (data residency) and, when the model is placed, among its placement.
/// Rollouts move only these replicas.
pub fn eligible(deployment: &Deployment, replica: &ReplicaFacts) -> bool {
    deployment
        .regions
        .as_ref()
        .is_none_or(|regions| regions.iter().any(|r| r == &replica.region))
        && deployment
            .placement
            .as_ref()
            .is_none_or(|placed| placed.iter().any(|id| id == &replica.id))
}

/// The versions `replica` should have loaded for `deployment`, with the
/// default first; empty when it should not serve the model.
pub fn versions_for(
    deployment: &Deployment,
    controller: Option<&Controller>,
    replica: &ReplicaFacts,
    now: i64,
) -> Vec<String> {
    if !eligible(deployment, replica) {
        return Vec::new();
    }
    if let Some(c) = controller.filter(|c| c.is_active()) {
        return c.versions_for(replica);
    }
    // Every version with traffic (the heaviest is the default), and the
    // shadow version, which receives mirrored copies.
    let mut targets: Vec<_> = deployment.targets.iter().filter(|t| t.weight > 0).collect();
    targets.sort_by(|a, b| b.weight.cmp(&a.weight).then(a.version.cmp(&b.version)));
    let mut versions: Vec<String> = targets.into_iter().map(|t| t.version.clone()).collect();
    if let Some(shadow) = deployment.shadow.as_ref().filter(|s| s.percent > 0)
        && !versions.contains(&shadow.version)
    {
        versions.push(shadow.version.clone());
    }
    // Recently replaced versions stay loaded, without traffic, so that
    // switching back is instant.
    for warm in deployment.warm.iter().filter(|w| w.until > now) {
        if !versions.contains(&warm.version) {
            versions.push(warm.version.clone());
        }
    }
    versions
}

/// The desired state of `replica_id`.
pub fn desired_state(facts: &FleetFacts, replica_id: &str) -> DesiredState {
    let Some(replica) = facts.replicas.iter().find(|r| r.id == replica_id) else {
        return DesiredState {
            revision: facts.revision,
            ..DesiredState::default()
        };
    };
    let mut models = Vec::new();
    for (deployment, controller) in facts.deployments.iter() {
        let versions = versions_for(deployment, controller.as_ref(), replica, facts.now);
        let Some(default) = versions.first().cloned() else {
            continue;
        };
        let active = controller.as_ref().is_some_and(Controller::is_active);
        let optional = |v: &str| {
            !active
                && !deployment
                    .targets
                    .iter()
                    .any(|t| t.weight > 0 && t.version == v)
                && deployment.shadow.as_ref().is_none_or(|s| s.version != v)
        };
        let versions: Vec<DesiredVersion> = versions
            .iter()
            .filter_map(|v| facts.versions.get(&(deployment.model.clone(), v.clone())))
            .map(|record| DesiredVersion {
                version: record.version.clone(),
                sha256: record.sha256.clone(),
                size: record.size,
                input_shapes: record.input_shapes.clone(),
                max_shapes: record.max_shapes.clone(),
                state: record.state.clone(),
                batching: record.batching.clone(),
                engine: record.engine,
                optional: optional(&record.version),
            })
            .collect();
        if versions.is_empty() {
            continue;
        }
        models.push(DesiredModel {
            model: deployment.model.clone(),
            default,
            versions,
        });
    }
    let peers = facts
        .replicas
        .iter()
        .filter(|r| r.region == replica.region && (r.alive || r.id == replica.id))
        .map(|r| Peer {
            id: r.id.clone(),
            address: r.address.clone(),
        })
        .collect();
    DesiredState {
        revision: facts.revision,
        models,
        peers,
    }
}

/// The routing table gateways follow: every replica with what it serves,
/// and each model's traffic split. During a rolling update the split
/// follows the share of replicas on each version, so traffic moves with
/// the rollout instead of piling onto the first replicas moved.
pub fn routing_table(facts: &FleetFacts) -> shoal_api::fleet::RoutingTable {
    use shoal_api::deploy::TrafficTarget;
    use shoal_api::fleet::{ModelPolicy, RouteEndpoint, RoutingTable};
    let endpoints = facts
        .replicas
        .iter()
        .map(|r| RouteEndpoint {
            id: r.id.clone(),
            address: r.address.clone(),
            region: r.region.clone(),
            alive: r.alive,
            serving: r.serving.iter().cloned().collect(),
            standby: r.standby,
        })
        .collect();
    let models = facts
        .deployments
        .iter()
        .map(|(deployment, controller)| {
            let (targets, shadow) = match controller.as_ref().filter(|c| c.is_active()) {
                Some(c) => {
                    let eligible: Vec<&ReplicaFacts> = facts
                        .replicas
                        .iter()
                        .filter(|rep| eligible(deployment, rep))
                        .collect();
                    let (weights, shadow) = c.traffic(&eligible);
                    let targets = weights
                        .into_iter()
                        .map(|(version, weight)| TrafficTarget { version, weight })
                        .collect();
                    let shadow = shadow
                        .map(|(version, percent)| shoal_api::deploy::Shadow { version, percent });
                    (targets, shadow)
                }
                None => (deployment.targets.clone(), deployment.shadow.clone()),
            };
            ModelPolicy {
                model: deployment.model.clone(),
                targets,
                regions: deployment.regions.clone(),
                shadow,
                split_header: deployment.split_header.clone(),
            }
        })
        .collect();
    RoutingTable {
        revision: facts.revision,
        endpoints,
        models,
    }
}

#[cfg(test)]
mod tests {
    use shoal_api::deploy::TrafficTarget;
    use shoal_api::registry::VersionStatus;

    use super::*;

    fn replica(id: &str, region: &str) -> ReplicaFacts {
        ReplicaFacts {
            failures: Default::default(),
            standby: false,
            id: id.into(),
            address: format!("{id}:1"),
            region: region.into(),
            alive: true,
            serving: BTreeSet::new(),
        }
    }

    fn record(model: &str, version: &str) -> VersionRecord {
        VersionRecord {
            model: model.into(),
            version: version.into(),
            sha256: format!("sha-{version}"),
            size: 10,
            created_at: 0,
            labels: Default::default(),
            metrics: Default::default(),
            lineage: None,
            status: VersionStatus::Production,
            reached_production: true,
            rolled_back: false,
            input_shapes: Default::default(),
            max_shapes: Default::default(),
            state: Default::default(),
            batching: None,
            engine: Default::default(),
        }
    }

    fn deployment(model: &str, targets: &[(&str, u32)], regions: Option<&[&str]>) -> Deployment {
        Deployment {
            placement: None,
            scale: None,
            model: model.into(),
            targets: targets
                .iter()
                .map(|(v, w)| TrafficTarget {
                    version: (*v).into(),
                    weight: *w,
                })
                .collect(),
            regions: regions.map(|r| r.iter().map(|s| (*s).to_owned()).collect()),
            shadow: None,
            split_header: None,
            warm: Vec::new(),
            rollout: None,
            revision: 0,
            updated_at: 0,
        }
    }

    fn facts() -> FleetFacts {
        FleetFacts {
            revision: 7,
            now: 0,
            stats: BTreeMap::new(),
            shadow: BTreeMap::new(),
            rewards: BTreeMap::new(),
            deployments: Arc::new(vec![
                (deployment("digits", &[("1", 90), ("2", 10)], None), None),
                (
                    deployment("eu-only", &[("1", 100)], Some(&["eu-west"])),
                    None,
                ),
            ]),
            replicas: vec![
                replica("a", "us-east"),
                replica("b", "eu-west"),
                replica("c", "us-east"),
            ],
            versions: [
                record("digits", "1"),
                record("digits", "2"),
                record("eu-only", "1"),
            ]
            .into_iter()
            .map(|r| ((r.model.clone(), r.version.clone()), r))
            .collect::<BTreeMap<_, _>>()
            .into(),
        }
    }

    #[test]
    fn every_weighted_version_is_loaded_and_the_heaviest_is_default() {
        let d = desired_state(&facts(), "a");
        assert_eq!(d.revision, 7);
        assert_eq!(d.version_keys(), ["digits:1", "digits:2"]);
        assert_eq!(d.models[0].default, "1");
        assert_eq!(d.models[0].versions[1].sha256, "sha-2");
    }

    #[test]
    fn region_pinned_models_stay_in_their_regions() {
        assert_eq!(
            desired_state(&facts(), "b").version_keys(),
            ["digits:1", "digits:2", "eu-only:1"]
        );
        assert!(
            !desired_state(&facts(), "c")
                .version_keys()
                .contains(&"eu-only:1".parse().unwrap())
        );
    }

    #[test]
    fn a_placed_model_is_loaded_and_routed_only_on_its_replicas() {
        let mut f = facts();
        Arc::make_mut(&mut f.deployments)[0].0.placement = Some(vec!["c".into()]);
        assert!(desired_state(&f, "a").version_keys().is_empty());
        assert_eq!(
            desired_state(&f, "c").version_keys(),
            ["digits:1", "digits:2"]
        );
        // Placement and residency both hold: eu-only is untouched.
        assert_eq!(desired_state(&f, "b").version_keys(), ["eu-only:1"]);
        // A rolling update moves the placed replicas only.
        let (deployment, _) = &f.deployments[0];
        let moved: Vec<&str> = f
            .replicas
            .iter()
            .filter(|r| eligible(deployment, r))
            .map(|r| r.id.as_str())
            .collect();
        assert_eq!(moved, ["c"]);
    }

    #[test]
    fn peers_are_live_replicas_of_the_same_region() {
        let mut f = facts();
        let peers: Vec<String> = desired_state(&f, "a")
            .peers
            .into_iter()
            .map(|p| p.id)
            .collect();
        assert_eq!(peers, ["a", "c"]);
        f.replicas[2].alive = false;
        let peers: Vec<String> = desired_state(&f, "a")
            .peers
            .into_iter()
            .map(|p| p.id)
            .collect();
        assert_eq!(peers, ["a"]);
    }

    #[test]
    fn warm_versions_stay_loaded_until_they_expire() {
        let mut f = facts();
        f.now = 1000;
        Arc::make_mut(&mut f.deployments)[1].0.warm = vec![shoal_api::deploy::WarmVersion {
            version: "0".into(),
            until: 2000,
        }];
        Arc::make_mut(&mut f.versions)
            .insert(("eu-only".into(), "0".into()), record("eu-only", "0"));
        let d = desired_state(&f, "b");
        let versions: Vec<(&str, bool)> = d.models[1]
            .versions
            .iter()
            .map(|v| (v.version.as_str(), v.optional))
            .collect();
        assert_eq!(
            versions,
            [("1", false), ("0", true)],
            "kept if loaded, never awaited"
        );
        assert_eq!(d.version_keys(), ["digits:1", "digits:2", "eu-only:1"]);
        assert_eq!(d.models[1].default, "1", "warm versions take no traffic");
        f.now = 2000;
        assert_eq!(
            desired_state(&f, "b").version_keys(),
            ["digits:1", "digits:2", "eu-only:1"]
        );
    }

    #[test]
    fn a_canary_loads_both_versions_everywhere() {
        let mut f = facts();
        let canary = crate::canary::Canary::start(
            "1".into(),
            "2".into(),
            crate::canary::CanaryConfig::default(),
            0,
        );
        Arc::make_mut(&mut f.deployments)[0] = (
            deployment("digits", &[("2", 100)], None),
            Some(Controller::Canary(Box::new(canary))),
        );
        let d = desired_state(&f, "a");
        assert_eq!(d.version_keys(), ["digits:1", "digits:2"]);
        assert_eq!(d.models[0].default, "1");
        let table = routing_table(&f);
        assert_eq!(
            table.models[0]
                .targets
                .iter()
                .map(|t| (t.version.as_str(), t.weight))
                .collect::<Vec<_>>(),
            [("1", 100), ("2", 0)]
        );
    }

    #[test]
    fn unknown_replicas_get_nothing() {
        assert!(desired_state(&facts(), "zz").models.is_empty());
    }

    #[test]
    fn a_rolling_update_assigns_one_version_per_replica() {
        let mut f = facts();
        let mut rolling = crate::rolling::Rolling::start(Some("1".into()), "2".into(), 1, 0);
        rolling.moved.insert("a".into());
        Arc::make_mut(&mut f.deployments)[0] = (
            deployment("digits", &[("2", 100)], None),
            Some(Controller::Rolling(rolling)),
        );
        assert_eq!(desired_state(&f, "a").version_keys()[0], "digits:2");
        assert_eq!(desired_state(&f, "c").version_keys()[0], "digits:1");
    }
}

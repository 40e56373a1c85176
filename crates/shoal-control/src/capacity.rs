//! The I/O shell of capacity decisions (`shoal-scale`): each controller
//! pass feeds every scaled model's autoscaler with the fleet's counters
//! and the replicas' reports, places the models, and (on the leader)
//! writes placements that changed. Every member runs the autoscalers (they
//! read the heartbeats all members share), so `shoal scale status` answers
//! on any of them; only the leader's placements are written.
//!
//! `shoal scale` itself (`Control::set_scale`) only records the spec; the
//! next pass places.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Mutex, PoisonError};

use shoal_api::UnixMillis;
use shoal_api::counters::Counters;
use shoal_api::deploy::Deployment;
use shoal_api::fleet::VersionStats;
use shoal_api::scale::{FleetScale, ScaleSpec, ScaleStatus, ScaleTarget};
use shoal_registry::ReplicaRecord;
use shoal_rollout::FleetFacts;
use shoal_scale::placement::{self, Candidate, Need};
use shoal_scale::predict::SeasonConfig;
use shoal_scale::recommend::{Autoscaler, Facts, SAFETY_FACTOR};
use shoal_scale::signals::LoadWindow;

use crate::fleet::CapacityReport;

/// How the autoscalers of this control plane behave (by default the HPA's
/// behaviour and a 24-hour day).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CapacityConfig {
    /// The reactive part (HPA behaviour).
    pub reactive: shoal_scale::reactive::Config,
    /// The predictive part (slot, day length).
    pub season: SeasonConfig,
    /// Act on predictions (otherwise they are shown, not acted on).
    pub reactive_only: bool,
    /// The window load signals (rps, p99) are measured over, ms; 0 means
    /// the default (10 s).
    pub signal_window_ms: i64,
}

/// A placement that changed, to be written.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct PlacementChange {
    pub(crate) model: String,
    pub(crate) placement: Option<Vec<String>>,
    pub(crate) reason: String,
}

#[derive(Debug)]
struct Scaler {
    spec: ScaleSpec,
    autoscaler: Option<Autoscaler>,
    /// The count the autoscaler last set.
    set: Option<u32>,
    /// Since when fewer placed replicas serve the model than it wants.
    short_since: Option<UnixMillis>,
    /// How long the last shortfall took to close (ms): the time from
    /// wanting another replica to its serving, process start included
    /// when an autoscaler starts one.
    provision_ms: Option<u64>,
    window: LoadWindow,
    status: Option<ScaleStatus>,
}

/// Every scaled model's autoscaler and last status.
#[derive(Debug)]
pub(crate) struct Capacity {
    config: CapacityConfig,
    models: Mutex<BTreeMap<String, Scaler>>,
}

/// The model's cumulative counters over all its versions.
fn model_totals(facts: &FleetFacts, model: &str) -> VersionStats {
    let mut total = VersionStats::default();
    for (key, stats) in &facts.stats {
        if key.is_of(model) {
            total.add(stats);
        }
    }
    total
}

/// The largest of a per-`model:version` figure over a model's versions on
/// every replica.
fn model_figure(
    reports: &BTreeMap<String, CapacityReport>,
    model: &str,
    figure: impl Fn(&CapacityReport) -> &BTreeMap<shoal_core::VersionKey, u64>,
) -> Option<u64> {
    reports
        .values()
        .flat_map(|r| figure(r).iter())
        .filter(|(key, _)| key.is_of(model))
        .map(|(_, v)| *v)
        .max()
}

impl Capacity {
    pub(crate) fn new(config: CapacityConfig) -> Capacity {
        Capacity {
            config,
            models: Mutex::new(BTreeMap::new()),
        }
    }

    /// One pass over every deployment: autoscalers ticked, models placed.
    /// Answers the placements that differ from the stored ones.
    pub(crate) fn pass(
        &self,
        facts: &FleetFacts,
        registrations: &[ReplicaRecord],
        reports: &BTreeMap<String, CapacityReport>,
        now: UnixMillis,
    ) -> Vec<PlacementChange> {
        let mut models = self.models.lock().unwrap_or_else(PoisonError::into_inner);
        let mut changes = Vec::new();
        let candidates: Vec<Candidate> = facts
            .replicas
            .iter()
            .map(|r| {
                let record = registrations.iter().find(|g| g.registration.id == r.id);
                (r, record)
            })
            .map(|(r, record)| Candidate {
                id: r.id.clone(),
                region: r.region.clone(),
                tier: record.map(|g| g.registration.tier).unwrap_or_default(),
                registered_at: record.map_or(0, |g| g.registered_at),
                standby: r.standby,
                available: r.alive,
                serving: r.serving.iter().map(|k| k.model.to_string()).collect(),
            })
            .collect();
        let mut needs = Vec::new();
        let mut scaled: BTreeSet<String> = BTreeSet::new();
        for (deployment, _) in facts.deployments.iter() {
            let model = deployment.model.clone();
            let spec = deployment
                .scale
                .clone()
                .unwrap_or_else(ScaleSpec::everywhere);
            if spec.is_everywhere() {
                if deployment.placement.is_some() {
                    changes.push(PlacementChange {
                        model: model.clone(),
                        placement: None,
                        reason: "served by every replica again".into(),
                    });
                }
                continue;
            }
            scaled.insert(model.clone());
            let scaler = models.entry(model.clone()).or_insert_with(|| Scaler {
                spec: spec.clone(),
                autoscaler: None,
                set: None,
                short_since: None,
                provision_ms: None,
                window: if self.config.signal_window_ms > 0 {
                    LoadWindow::new(self.config.signal_window_ms)
                } else {
                    LoadWindow::default()
                },
                status: None,
            });
            if scaler.spec != spec {
                scaler.spec = spec.clone();
                scaler.autoscaler = None;
                scaler.set = None;
            }
            scaler.window.push(now, model_totals(facts, &model));
            let placed = current_placement(deployment, &candidates);
            let live_placed: Vec<&Candidate> = candidates
                .iter()
                .filter(|c| c.available && placed.contains(&c.id))
                .collect();
            let serving = live_placed
                .iter()
                .filter(|c| c.serving.contains(&model))
                .count();
            let current = u32::try_from(live_placed.len()).unwrap_or(u32::MAX);
            let rps = scaler.window.rps();
            // What a replica takes to join: its own report of fetch, load
            // and warm-up, or the last shortfall measured here (which also
            // counts starting the process), whichever is longer.
            let load_ms = model_figure(reports, &model, |r| &r.load_ms).max(scaler.provision_ms);
            let mut status = ScaleStatus {
                model: model.clone(),
                spec: spec.clone(),
                placement: deployment.placement.clone(),
                current: u32::try_from(serving).unwrap_or(u32::MAX),
                desired: 0,
                reactive: None,
                predicted: None,
                rps: rps.unwrap_or(0.0),
                peak_rps: 0.0,
                rps_per_replica: None,
                right_size: None,
                safety_factor: SAFETY_FACTOR,
                load_ms,
                next_change: None,
            };
            let wanted = match (spec.replicas, spec.min, spec.max) {
                (Some(n), _, _) => n,
                (None, Some(min), Some(max)) => {
                    let target = spec.target_or_default();
                    let per_serving = |total: f64| total / serving.max(1) as f64;
                    let signal = match target {
                        ScaleTarget::Rps(_) => rps.map(per_serving),
                        ScaleTarget::InFlight(_) => Some(per_serving(
                            live_placed
                                .iter()
                                .filter_map(|c| reports.get(&c.id))
                                .map(|r| r.in_flight as f64)
                                .sum(),
                        )),
                        ScaleTarget::P99Ms(_) => scaler.window.p99_ms(),
                    };
                    let season = self.config.season;
                    let reactive = self.config.reactive;
                    let set = scaler.set.unwrap_or(current).clamp(min, max.max(min));
                    let reactive_only = self.config.reactive_only;
                    let autoscaler = scaler.autoscaler.get_or_insert_with(|| {
                        let a = Autoscaler::new(now, set, reactive, season);
                        if reactive_only { a.reactive_only() } else { a }
                    });
                    let outcome = autoscaler.tick(Facts {
                        now,
                        current: set,
                        ready: u32::try_from(serving).unwrap_or(u32::MAX),
                        min,
                        max,
                        target,
                        signal,
                        rps,
                        load_ms,
                    });
                    status.reactive = Some(outcome.reactive);
                    status.predicted = outcome.predicted;
                    status.peak_rps = outcome.peak_rps;
                    status.rps_per_replica = outcome.rps_per_replica;
                    status.right_size = outcome.right_size;
                    status.next_change = outcome.next_change;
                    scaler.set = Some(outcome.desired);
                    outcome.desired
                }
                _ => continue,
            };
            status.desired = wanted;
            // A shortfall opens when fewer serve than are wanted and
            // closes when enough serve: its length is a measured
            // provisioning time.
            let served = u32::try_from(serving).unwrap_or(u32::MAX);
            match (scaler.short_since, served < wanted) {
                (None, true) => scaler.short_since = Some(now),
                (Some(since), false) => {
                    scaler.short_since = None;
                    scaler.provision_ms = Some(u64::try_from(now - since).unwrap_or(0));
                }
                _ => {}
            }
            scaler.status = Some(status);
            needs.push(Need {
                model: model.clone(),
                replicas: wanted,
                min_on_demand: spec.min_on_demand,
                bytes: model_figure(reports, &model, |r| &r.memory).unwrap_or(0),
                regions: deployment.regions.clone(),
                current: placed,
            });
        }
        models.retain(|m, _| scaled.contains(m));
        let placed = placement::place(&needs, &candidates);
        for (deployment, _) in facts.deployments.iter() {
            let Some(new) = placed.get(&deployment.model) else {
                continue;
            };
            if deployment.placement.as_ref() == Some(new) {
                continue;
            }
            let reason = explain(deployment.placement.as_deref(), new, &candidates);
            if let Some(status) = models
                .get_mut(&deployment.model)
                .and_then(|s| s.status.as_mut())
            {
                status.placement = Some(new.clone());
            }
            changes.push(PlacementChange {
                model: deployment.model.clone(),
                placement: Some(new.clone()),
                reason,
            });
        }
        changes
    }

    /// The last status of `model`'s scaling, if it is scaled.
    pub(crate) fn status(&self, model: &str) -> Option<ScaleStatus> {
        self.models
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(model)
            .and_then(|s| s.status.clone())
    }

    /// What the fleet's replica count should be: the most any scaled model
    /// wants, and never fewer than run now when nothing is scaled.
    pub(crate) fn fleet(&self, live: u32) -> FleetScale {
        let models: Vec<ScaleStatus> = self
            .models
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .filter_map(|s| s.status.clone())
            .collect();
        let desired = models
            .iter()
            .map(|s| s.desired)
            .max()
            .unwrap_or(live)
            .max(1);
        FleetScale {
            desired_replicas: desired,
            current_replicas: live,
            models,
        }
    }
}

impl crate::Control {
    /// `GET /api/v1/deployments/{model}/scale`: the spec, the placement
    /// and the autoscaler's recommendations; for a model not scaled, every
    /// eligible replica.
    pub async fn scale_status(
        &self,
        model: &str,
    ) -> Result<ScaleStatus, crate::controller::DeployError> {
        let stored = self.deployed(model).await?;
        let deployment = stored.deployment;
        if let Some(mut status) = self.capacity.status(model)
            && deployment.scale.as_ref() == Some(&status.spec)
        {
            status.placement = deployment.placement;
            return Ok(status);
        }
        let facts = self.facts();
        let eligible: Vec<_> = facts
            .replicas
            .iter()
            .filter(|r| r.alive && shoal_rollout::plan::eligible(&deployment, r))
            .collect();
        let serving = eligible
            .iter()
            .filter(|r| r.serving.iter().any(|k| k.is_of(model)))
            .count();
        Ok(ScaleStatus {
            model: model.to_owned(),
            spec: deployment.scale.unwrap_or_else(ScaleSpec::everywhere),
            placement: deployment.placement,
            current: u32::try_from(serving).unwrap_or(u32::MAX),
            desired: u32::try_from(eligible.len()).unwrap_or(u32::MAX),
            reactive: None,
            predicted: None,
            rps: 0.0,
            peak_rps: 0.0,
            rps_per_replica: None,
            right_size: None,
            safety_factor: SAFETY_FACTOR,
            load_ms: None,
            next_change: None,
        })
    }

    /// `GET /api/v1/scale`: the replica count the fleet should run, what
    /// Kubernetes' scaler (KEDA's metrics-api) and `shoal up --autoscale`
    /// follow.
    pub fn fleet_scale(&self) -> FleetScale {
        let live = self
            .facts()
            .replicas
            .iter()
            .filter(|r| r.alive && !r.standby)
            .count();
        self.capacity.fleet(u32::try_from(live).unwrap_or(u32::MAX))
    }
}

/// Where `deployment` is placed now: its stored placement, or, the first
/// time it is scaled, the replicas that serve it (so they keep it).
fn current_placement(deployment: &Deployment, candidates: &[Candidate]) -> Vec<String> {
    match &deployment.placement {
        Some(ids) => ids.clone(),
        None => candidates
            .iter()
            .filter(|c| c.serving.contains(&deployment.model))
            .map(|c| c.id.clone())
            .collect(),
    }
}

/// "placed on r0, r2 (r1 left: down)" for the audit log.
fn explain(old: Option<&[String]>, new: &[String], candidates: &[Candidate]) -> String {
    let mut reason = format!(
        "placed on {}",
        if new.is_empty() {
            "no replica".to_owned()
        } else {
            new.join(", ")
        }
    );
    let Some(old) = old else {
        return format!("{reason} (was on every replica)");
    };
    let added: Vec<&String> = new.iter().filter(|id| !old.contains(id)).collect();
    let left: Vec<String> = old
        .iter()
        .filter(|id| !new.contains(id))
        .map(|id| {
            let down = candidates
                .iter()
                .find(|c| &c.id == id)
                .is_none_or(|c| !c.available);
            if down {
                format!("{id} (down)")
            } else {
                id.clone()
            }
        })
        .collect();
    let mut parts = Vec::new();
    if !added.is_empty() {
        parts.push(format!(
            "added {}",
            added
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    if !left.is_empty() {
        parts.push(format!("left {}", left.join(", ")));
    }
    if !parts.is_empty() {
        reason.push_str(&format!(" ({})", parts.join("; ")));
    }
    reason
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn explanations_name_what_moved_and_why() {
        let candidates = vec![
            Candidate {
                id: "r0".into(),
                available: true,
                ..Candidate::default()
            },
            Candidate {
                id: "r1".into(),
                available: false,
                ..Candidate::default()
            },
        ];
        assert_eq!(
            explain(None, &["r0".into()], &candidates),
            "placed on r0 (was on every replica)"
        );
        assert_eq!(
            explain(Some(&["r1".into()]), &["r0".into()], &candidates),
            "placed on r0 (added r0; left r1 (down))"
        );
    }
}

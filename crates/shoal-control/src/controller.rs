//! The rollout controller's I/O shell: deploy and rollback requests, and
//! the loop that feeds the pure state machines (`shoal-rollout`) with what
//! replicas report and persists what they decide.
//!
//! Every change goes through the registry first (audit entry in the same
//! transaction, revision bumped), then the snapshot is refreshed, watchers
//! see the new revision, and replicas are nudged.

use std::sync::Arc;
use std::time::Duration;

use shoal_api::deploy::{
    DeployRequest, Deployment, RolloutState, Strategy, TrafficTarget, WarmVersion,
};
use shoal_api::now_millis;
use shoal_api::registry::VersionStatus;
use shoal_registry::{Audit, Fence, Precondition, RegistryError, StoredDeployment};
use shoal_rollout::bluegreen::BlueGreen;
use shoal_rollout::canary::{Canary, CanaryConfig};
use shoal_rollout::controller::Step;
use shoal_rollout::experiment::{Experiment, Kind as ExperimentKind};
use shoal_rollout::rolling::Rolling;
use shoal_rollout::shadow::Shadow;
use shoal_rollout::{Controller, ReplicaFacts, plan};

use crate::Control;

/// Why a deploy or rollback was refused.
#[derive(Debug)]
pub enum DeployError {
    /// Unknown model or version.
    NotFound(String),
    /// Conflicts with the current state (a rollout in progress, nothing to
    /// roll back to).
    Conflict(String),
    /// Invalid request.
    Invalid(String),
    /// Another member changed the deployment between this one's read and
    /// its write (the write was refused): read again and decide again.
    Stale(String),
    /// This member was deposed as leader; its controller write was refused.
    Deposed(String),
    /// The registry failed.
    Internal(String),
}

impl std::fmt::Display for DeployError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeployError::NotFound(m)
            | DeployError::Conflict(m)
            | DeployError::Invalid(m)
            | DeployError::Stale(m)
            | DeployError::Deposed(m)
            | DeployError::Internal(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for DeployError {}

impl From<RegistryError> for DeployError {
    fn from(e: RegistryError) -> Self {
        match e {
            RegistryError::NotFound(m) => DeployError::NotFound(m),
            RegistryError::Conflict(m) => DeployError::Conflict(m),
            RegistryError::Invalid(m) => DeployError::Invalid(m),
            RegistryError::Stale(m) => DeployError::Stale(m),
            RegistryError::Fenced(m) => DeployError::Deposed(m),
            RegistryError::Database(m) => DeployError::Internal(m),
        }
    }
}

impl From<anyhow::Error> for DeployError {
    fn from(e: anyhow::Error) -> Self {
        DeployError::Internal(format!("{e:#}"))
    }
}

/// `model`'s stored controller, or a refusal that says why it cannot be
/// read: nothing changes on a model whose rollout state is unreadable.
fn readable(model: &str, stored: &serde_json::Value) -> Result<Option<Controller>, DeployError> {
    Controller::from_json(stored).map_err(|why| {
        DeployError::Conflict(format!(
            "{why}; no deploy, traffic change, promote, abort or rollback of {model} is possible \
             until it is repaired (was the registry written by a newer Shoal?)"
        ))
    })
}

fn eligible<'a>(deployment: &Deployment, replicas: &'a [ReplicaFacts]) -> Vec<&'a ReplicaFacts> {
    replicas
        .iter()
        .filter(|r| plan::eligible(deployment, r))
        .collect()
}

/// A controller as the registry stores it (null when there is none).
fn stored_controller(controller: Option<&Controller>) -> serde_json::Value {
    controller
        .map(|c| serde_json::to_value(c).unwrap_or_default())
        .unwrap_or_default()
}

/// The version serving most of a deployment's traffic.
fn primary(deployment: &Deployment) -> Option<String> {
    deployment.primary().map(str::to_owned)
}

/// Keep-warm period when a deploy does not say.
const DEFAULT_KEEP_WARM: Duration = Duration::from_secs(300);

/// A version traffic has just left stays loaded this long, so gateways
/// that have not heard yet still find it: drained, not cut.
const DRAIN: Duration = Duration::from_secs(30);

/// A request's seconds as a duration, `default` when it gives none; a 400
/// naming the field when they are negative or not a number.
fn secs_or(what: &str, secs: Option<f64>, default: Duration) -> Result<Duration, DeployError> {
    secs.map_or(Ok(default), |s| {
        shoal_api::duration::from_secs(what, s).map_err(DeployError::Invalid)
    })
}

impl Control {
    /// Writes `deployment` with the stored `controller` state, conditional
    /// on the revision it was read at (and on `fence`, for the leader's
    /// own writes); answers the new revision.
    async fn write_deployment(
        &self,
        deployment: Deployment,
        controller: serde_json::Value,
        action: &str,
        audit: Audit,
        fence: Option<&Fence>,
    ) -> Result<u64, DeployError> {
        let precondition = Precondition {
            revision: Some(deployment.revision),
            fence: fence.cloned(),
        };
        let stored = StoredDeployment {
            controller,
            deployment,
        };
        Ok(self
            .store
            .put_deployment_if(stored, &precondition, action, audit)
            .await?)
    }

    /// Writes `deployment` (as read: its revision is the precondition) with
    /// `controller`'s state; `fence` for the controller's own writes.
    async fn persist(
        &self,
        mut deployment: Deployment,
        controller: &Controller,
        action: &str,
        audit: Audit,
        fence: Option<&Fence>,
    ) -> Result<Deployment, DeployError> {
        let facts = self.facts();
        deployment.rollout = Some(controller.view(
            &deployment.model,
            &eligible(&deployment, &facts.replicas),
            &facts,
        ));
        deployment.revision = self
            .write_deployment(
                deployment.clone(),
                serde_json::to_value(controller).unwrap_or_default(),
                action,
                audit,
                fence,
            )
            .await?;
        self.refresh().await?;
        Ok(deployment)
    }

    async fn controller_of(
        &self,
        model: &str,
    ) -> Result<(Deployment, Option<Controller>), DeployError> {
        let stored = self
            .store
            .get_deployment(model)
            .await?
            .ok_or_else(|| DeployError::NotFound(format!("model {model} is not deployed")))?;
        let controller = readable(model, &stored.controller)?;
        Ok((stored.deployment, controller))
    }

    /// Starts rolling `model` out to `request.version` with the requested strategy.
    pub async fn deploy(
        self: &Arc<Self>,
        model: &str,
        request: DeployRequest,
        actor: &str,
    ) -> Result<Deployment, DeployError> {
        retrying(|| self.deploy_once(model, request.clone(), actor)).await
    }

    async fn deploy_once(
        self: &Arc<Self>,
        model: &str,
        request: DeployRequest,
        actor: &str,
    ) -> Result<Deployment, DeployError> {
        let _guard = self.deploy_lock.lock().await;
        let version = self
            .store
            .get_version(model, &request.version)
            .await?
            .ok_or_else(|| {
                DeployError::NotFound(format!(
                    "model {model} has no version {:?}; push it first (shoal model push)",
                    request.version
                ))
            })?;
        let current = self.store.get_deployment(model).await?;
        let current_controller = match &current {
            Some(c) => readable(model, &c.controller)?,
            None => None,
        };
        if let Some(c) = current_controller.filter(Controller::is_active) {
            return Err(DeployError::Conflict(format!(
                "a rollout of {model} to version {} is in progress; wait for it, or abort it with `shoal rollout abort {model}`",
                c.to()
            )));
        }
        let from = current.as_ref().and_then(|c| primary(&c.deployment));
        if from.as_deref() == Some(version.version.as_str()) {
            return Err(DeployError::Conflict(format!(
                "{model}:{} is already deployed",
                version.version
            )));
        }
        if let Some(regions) = &request.regions
            && regions.is_empty()
        {
            return Err(DeployError::Invalid(
                "regions, when given, must name at least one region".into(),
            ));
        }
        let now = now_millis();
        let regions = request
            .regions
            .clone()
            .or_else(|| current.as_ref().and_then(|c| c.deployment.regions.clone()));
        let deployment = Deployment {
            placement: None,
            scale: None,
            model: model.to_owned(),
            targets: vec![TrafficTarget {
                version: version.version.clone(),
                weight: 100,
            }],
            regions,
            shadow: None,
            split_header: current
                .as_ref()
                .and_then(|c| c.deployment.split_header.clone()),
            warm: current
                .as_ref()
                .map(|c| c.deployment.warm.clone())
                .unwrap_or_default(),
            rollout: None,
            // What was read: the write is refused if it changed meanwhile.
            revision: current.as_ref().map_or(0, |c| c.deployment.revision),
            updated_at: 0,
        };
        let controller = match request.strategy {
            Strategy::Rolling => {
                let fleet = eligible(&deployment, &self.facts().replicas).len();
                let surge = request
                    .max_surge
                    .unwrap_or_else(|| u32::try_from(fleet.div_ceil(4)).unwrap_or(1).max(1));
                Controller::Rolling(
                    Rolling::start(from.clone(), version.version.clone(), surge, now)
                        .with_max_unavailable(request.max_unavailable),
                )
            }
            Strategy::Canary => {
                let Some(from) = from.clone() else {
                    return Err(DeployError::Conflict(format!(
                        "a canary needs a baseline, and {model} serves nothing yet; deploy the first version with the rolling or blue-green strategy"
                    )));
                };
                let defaults = CanaryConfig::default();
                let steps = request.steps.clone().unwrap_or(defaults.steps.clone());
                if steps.is_empty()
                    || steps.iter().any(|&s| s == 0 || s > 100)
                    || steps.windows(2).any(|w| w[0] >= w[1])
                {
                    return Err(DeployError::Invalid(
                        "steps must be increasing percentages between 1 and 100, e.g. 1,10,50,100"
                            .into(),
                    ));
                }
                let judged = steps.iter().filter(|&&s| s < 100).count();
                let bakes = match &request.bakes_secs {
                    None => Vec::new(),
                    Some(b) => b
                        .iter()
                        .map(|&s| shoal_api::duration::from_secs("each bake", s))
                        .collect::<Result<Vec<Duration>, String>>()
                        .ok()
                        .filter(|b| b.len() == judged)
                        .ok_or_else(|| DeployError::Invalid(format!(
                            "give one bake time per step before 100% ({judged} for steps {steps:?}), each a non-negative number of seconds"
                        )))?,
                };
                if request
                    .min_reward_ratio
                    .is_some_and(|r| !r.is_finite() || r <= 0.0)
                {
                    return Err(DeployError::Invalid(
                        "min_reward_ratio must be a positive number, e.g. 0.95".into(),
                    ));
                }
                let config = CanaryConfig {
                    min_reward_ratio: request.min_reward_ratio,
                    bakes,
                    steps,
                    bake: secs_or("bake_secs", request.bake_secs, defaults.bake)?,
                    max_error_ratio: request.max_error_ratio.unwrap_or(defaults.max_error_ratio),
                    max_p99_ratio: request.max_p99_ratio.unwrap_or(defaults.max_p99_ratio),
                    min_requests: request.min_requests.unwrap_or(defaults.min_requests),
                    min_error_rate: defaults.min_error_rate,
                    min_p99_increase_ms: request
                        .min_p99_increase_ms
                        .unwrap_or(defaults.min_p99_increase_ms),
                };
                Controller::Canary(Box::new(Canary::start(
                    from,
                    version.version.clone(),
                    config,
                    now,
                )))
            }
            Strategy::BlueGreen => Controller::BlueGreen(BlueGreen::start(
                from.clone(),
                version.version.clone(),
                secs_or("keep_warm_secs", request.keep_warm_secs, DEFAULT_KEEP_WARM)?,
                now,
            )),
            Strategy::Shadow => {
                let Some(primary) = from.clone() else {
                    return Err(DeployError::Conflict(format!(
                        "a shadow needs a primary, and {model} serves nothing yet; deploy the first version with the rolling or blue-green strategy"
                    )));
                };
                let percent = request.percent.unwrap_or(100);
                if percent == 0 || percent > 100 {
                    return Err(DeployError::Invalid(
                        "percent must be between 1 and 100".into(),
                    ));
                }
                let baseline = self.facts().shadow.get(model).cloned().unwrap_or_default();
                Controller::Shadow(Shadow::start(
                    primary,
                    version.version.clone(),
                    percent,
                    baseline,
                    now,
                ))
            }
            Strategy::Ab | Strategy::Bandit => {
                let mut arms: Vec<String> = match &request.against {
                    Some(others) => others.clone(),
                    None => from.clone().into_iter().collect(),
                };
                if arms.is_empty() {
                    return Err(DeployError::Conflict(format!(
                        "an experiment needs at least two versions; {model} serves nothing yet, so name the others with `against`"
                    )));
                }
                for other in &arms {
                    if self.store.get_version(model, other).await?.is_none() {
                        return Err(DeployError::NotFound(format!(
                            "model {model} has no version {other:?}"
                        )));
                    }
                }
                arms.retain(|a| a != &version.version);
                arms.push(version.version.clone());
                let kind = if request.strategy == Strategy::Ab {
                    ExperimentKind::Ab
                } else {
                    ExperimentKind::Bandit
                };
                let facts = self.facts();
                let baseline = arms
                    .iter()
                    .filter_map(|a| {
                        let key = shoal_core::VersionKey::parse(model, a).ok()?;
                        facts.rewards.get(&key).map(|r| (a.clone(), r.clone()))
                    })
                    .collect();
                Controller::Experiment(Experiment::start(
                    kind,
                    arms,
                    request.floor.unwrap_or(5),
                    baseline,
                    now,
                ))
            }
        };
        let reason = request.reason.clone().unwrap_or_else(|| "deploy".into());
        let status = if matches!(
            request.strategy,
            Strategy::Canary | Strategy::Shadow | Strategy::Ab | Strategy::Bandit
        ) {
            VersionStatus::Canary
        } else {
            version.status
        };
        if status != version.status {
            self.store
                .set_status(
                    model,
                    &version.version,
                    status,
                    false,
                    Audit::by(actor, format!("canary: {reason}")),
                )
                .await?;
        }
        let deployment = self
            .persist(
                deployment,
                &controller,
                "deploy",
                Audit::by(
                    actor,
                    format!(
                        "{} from {} to {}: {reason}",
                        request.strategy.as_str(),
                        from.as_deref().unwrap_or("nothing"),
                        version.version
                    ),
                ),
                None,
            )
            .await?;
        self.after_change();
        Ok(deployment)
    }

    /// Marks the outcome of a finished rollout in the registry and the
    /// deployment: promoted versions go to production and the replaced one
    /// stays warm; failed ones are rolled back and traffic returns.
    async fn conclude(
        &self,
        mut deployment: Deployment,
        controller: &Controller,
        actor: &str,
        keep_warm: Duration,
        fence: Option<&Fence>,
    ) -> Result<Deployment, DeployError> {
        let model = deployment.model.clone();
        let to = controller.to().to_owned();
        let from = controller.from().map(str::to_owned);
        let reason = controller.view(&model, &[], &self.facts()).reason;
        let audit = || Audit::by(actor, reason.clone());
        let now = now_millis();
        match controller.state() {
            RolloutState::Promoted => {
                self.store
                    .set_status_if(
                        &model,
                        &to,
                        VersionStatus::Production,
                        false,
                        fence,
                        audit(),
                    )
                    .await?;
                deployment.targets = vec![TrafficTarget {
                    version: to.clone(),
                    weight: 100,
                }];
                if let Some(from) = from.as_ref().filter(|f| **f != to) {
                    let old = self.store.get_version(&model, from).await?;
                    if old.is_some_and(|v| !v.rolled_back) {
                        self.store
                            .set_status_if(
                                &model,
                                from,
                                VersionStatus::Deprecated,
                                false,
                                fence,
                                audit(),
                            )
                            .await?;
                    }
                    deployment
                        .warm
                        .retain(|w| &w.version != from && w.version != to);
                    if !keep_warm.is_zero() {
                        deployment.warm.push(WarmVersion {
                            version: from.clone(),
                            until: shoal_api::duration::after(now, keep_warm),
                        });
                    }
                }
                self.persist(deployment, controller, "deploy.promoted", audit(), fence)
                    .await
            }
            _ => {
                self.store
                    .set_status_if(&model, &to, VersionStatus::Deprecated, true, fence, audit())
                    .await?;
                // Traffic returns to what served before. A first
                // deployment that was rolled back (its version could not
                // load) leaves the model serving nothing rather than
                // replicas waiting for a version that cannot load.
                match &from {
                    Some(from) => {
                        deployment.targets = vec![TrafficTarget {
                            version: from.clone(),
                            weight: 100,
                        }];
                    }
                    None if controller.state() == RolloutState::RolledBack => {
                        deployment.targets.clear();
                    }
                    None => {}
                }
                deployment.warm.retain(|w| w.version != to);
                deployment.warm.push(WarmVersion {
                    version: to.clone(),
                    until: shoal_api::duration::after(now, DRAIN),
                });
                let action = if controller.state() == RolloutState::Aborted {
                    "deploy.aborted"
                } else {
                    "deploy.rolled_back"
                };
                self.persist(deployment, controller, action, audit(), fence)
                    .await
            }
        }
    }

    /// An operator's promote: finishes the rollout in progress now.
    pub async fn promote(
        self: &Arc<Self>,
        model: &str,
        actor: &str,
    ) -> Result<Deployment, DeployError> {
        retrying(|| self.promote_once(model, actor)).await
    }

    async fn promote_once(
        self: &Arc<Self>,
        model: &str,
        actor: &str,
    ) -> Result<Deployment, DeployError> {
        let _guard = self.deploy_lock.lock().await;
        let (deployment, controller) = self.controller_of(model).await?;
        let Some(mut controller) = controller.filter(Controller::is_active) else {
            return Err(DeployError::Conflict(format!(
                "no rollout of {model} is in progress"
            )));
        };
        match &mut controller {
            Controller::Canary(c) => c.promote(now_millis()),
            Controller::Shadow(s) => s.promote(now_millis()),
            Controller::Experiment(e) => {
                let facts = self.facts();
                let totals = facts.rewards_of(model);
                e.promote(&totals, now_millis());
            }
            Controller::Rolling(_) | Controller::BlueGreen(_) => {
                return Err(DeployError::Conflict(format!(
                    "a {} rollout promotes itself once every replica is ready; only canaries can be promoted early",
                    controller.view(model, &[], &self.facts()).strategy.as_str()
                )));
            }
        }
        let d = self
            .conclude(deployment, &controller, actor, DEFAULT_KEEP_WARM, None)
            .await?;
        self.after_change();
        Ok(d)
    }

    /// An operator's abort: traffic returns to the version being replaced.
    pub async fn abort(
        self: &Arc<Self>,
        model: &str,
        actor: &str,
    ) -> Result<Deployment, DeployError> {
        self.abort_with(model, actor, format!("aborted by {actor}"))
            .await
    }

    async fn abort_with(
        self: &Arc<Self>,
        model: &str,
        actor: &str,
        reason: String,
    ) -> Result<Deployment, DeployError> {
        retrying(|| async {
            let _guard = self.deploy_lock.lock().await;
            self.abort_locked(model, actor, reason.clone()).await
        })
        .await
    }

    /// [`Control::abort_with`] for a caller that holds the deploy lock.
    async fn abort_locked(
        self: &Arc<Self>,
        model: &str,
        actor: &str,
        reason: String,
    ) -> Result<Deployment, DeployError> {
        let (deployment, controller) = self.controller_of(model).await?;
        let Some(mut controller) = controller.filter(Controller::is_active) else {
            return Err(DeployError::Conflict(format!(
                "no rollout of {model} is in progress"
            )));
        };
        controller.abort(reason, now_millis());
        let d = self
            .conclude(deployment, &controller, actor, Duration::ZERO, None)
            .await?;
        self.after_change();
        Ok(d)
    }

    /// Sends `model` back to its last known good version: aborts a rollout
    /// in progress; otherwise switches at once when that version is still
    /// loaded (warm), or rolls it out to every replica at once.
    pub async fn rollback(
        self: &Arc<Self>,
        model: &str,
        reason: Option<String>,
        actor: &str,
    ) -> Result<Deployment, DeployError> {
        let reason = reason.unwrap_or_else(|| "rollback requested".into());
        retrying(|| self.rollback_once(model, reason.clone(), actor)).await
    }

    async fn rollback_once(
        self: &Arc<Self>,
        model: &str,
        reason: String,
        actor: &str,
    ) -> Result<Deployment, DeployError> {
        // One lock for the whole decision: a deploy landing between "no
        // rollout is active" and the write would otherwise be overwritten.
        let _guard = self.deploy_lock.lock().await;
        let (mut deployment, controller) = self.controller_of(model).await?;
        if controller.filter(Controller::is_active).is_some() {
            return self
                .abort_locked(model, actor, format!("rolled back: {reason}"))
                .await;
        }
        let current = primary(&deployment);
        let detail = self
            .store
            .get_model(model)
            .await?
            .ok_or_else(|| DeployError::NotFound(format!("no model {model}")))?;
        let target = detail
            .versions
            .iter()
            .rev()
            .find(|v| {
                v.reached_production && !v.rolled_back && Some(&v.version) != current.as_ref()
            })
            .ok_or_else(|| {
                DeployError::Conflict(format!(
                    "{model} has no last known good version other than {} to roll back to",
                    current.as_deref().unwrap_or("none")
                ))
            })?
            .version
            .clone();
        if let Some(current) = &current {
            self.store
                .set_status(
                    model,
                    current,
                    VersionStatus::Deprecated,
                    true,
                    Audit::by(actor, reason.clone()),
                )
                .await?;
        }
        let now = now_millis();
        let warm = deployment
            .warm
            .iter()
            .any(|w| w.version == target && w.until > now);
        let controller = if warm {
            // Still loaded everywhere: switch traffic at once, and keep the
            // version we leave warm in case the rollback was the mistake.
            let mut b = BlueGreen::start(current.clone(), target.clone(), DEFAULT_KEEP_WARM, now);
            b.smoke_result(Ok(0), now);
            b.progress.reason = format!(
                "warm rollback: {target} was still loaded; all traffic switched back at once"
            );
            Controller::BlueGreen(b)
        } else {
            let fleet = eligible(&deployment, &self.facts().replicas).len();
            Controller::Rolling(Rolling::start(
                current.clone(),
                target.clone(),
                u32::try_from(fleet).unwrap_or(1).max(1),
                now,
            ))
        };
        deployment.targets = vec![TrafficTarget {
            version: target.clone(),
            weight: 100,
        }];
        let audit = Audit::by(
            actor,
            format!(
                "from {} to last known good {target}{}: {reason}",
                current.as_deref().unwrap_or("nothing"),
                if warm { " (warm)" } else { "" }
            ),
        );
        if warm {
            deployment.warm.retain(|w| w.version != target);
            if let Some(current) = &current {
                deployment.warm.push(WarmVersion {
                    version: current.clone(),
                    until: shoal_api::duration::after(now, DEFAULT_KEEP_WARM),
                });
            }
            self.store
                .set_status(
                    model,
                    &target,
                    VersionStatus::Production,
                    false,
                    audit.clone(),
                )
                .await?;
        }
        let deployment = self
            .persist(deployment, &controller, "rollback", audit, None)
            .await?;
        self.after_change();
        Ok(deployment)
    }

    /// The model's stored deployment, or a 404 that says how to make one.
    pub(crate) async fn deployed(&self, model: &str) -> Result<StoredDeployment, DeployError> {
        self.store.get_deployment(model).await?.ok_or_else(|| {
            DeployError::NotFound(format!(
                "model {model} is not deployed; deploy a version first (shoal deploy {model}:VERSION)"
            ))
        })
    }

    /// Sets a model's traffic policy by hand: weights across versions, a
    /// shadow share, the split header. Refused while a rollout runs.
    pub async fn set_traffic(
        self: &Arc<Self>,
        model: &str,
        request: shoal_api::deploy::TrafficRequest,
        actor: &str,
    ) -> Result<Deployment, DeployError> {
        retrying(|| self.set_traffic_once(model, &request, actor)).await
    }

    async fn set_traffic_once(
        self: &Arc<Self>,
        model: &str,
        request: &shoal_api::deploy::TrafficRequest,
        actor: &str,
    ) -> Result<Deployment, DeployError> {
        let _guard = self.deploy_lock.lock().await;
        let stored = self.deployed(model).await?;
        if let Some(c) = readable(model, &stored.controller)?.filter(Controller::is_active) {
            return Err(DeployError::Conflict(format!(
                "a rollout of {model} to {} is in progress; traffic follows it until it ends",
                c.to()
            )));
        }
        if request.targets.iter().all(|t| t.weight == 0) {
            return Err(DeployError::Invalid(
                "at least one target needs a weight above 0".into(),
            ));
        }
        let mut versions: Vec<&str> = request.targets.iter().map(|t| t.version.as_str()).collect();
        if let Some(shadow) = &request.shadow {
            if shadow.percent > 100 {
                return Err(DeployError::Invalid(
                    "shadow percent must be between 0 and 100".into(),
                ));
            }
            versions.push(&shadow.version);
        }
        for v in versions {
            if self.store.get_version(model, v).await?.is_none() {
                return Err(DeployError::NotFound(format!(
                    "model {model} has no version {v:?}"
                )));
            }
        }
        let mut deployment = stored.deployment;
        deployment.targets = request.targets.clone();
        deployment.shadow = request.shadow.clone();
        if request.split_header.is_some() {
            deployment.split_header = request.split_header.clone();
        }
        let detail = format!(
            "{}{}: {}",
            request
                .targets
                .iter()
                .map(|t| format!("{}={}", t.version, t.weight))
                .collect::<Vec<_>>()
                .join(","),
            request
                .shadow
                .as_ref()
                .map(|s| format!(", shadow {}@{}%", s.version, s.percent))
                .unwrap_or_default(),
            request.reason.as_deref().unwrap_or("traffic set by hand")
        );
        self.write_by_hand(
            deployment,
            stored.controller,
            "traffic",
            Audit::by(actor, detail),
        )
        .await
    }

    /// Records how many replicas serve `model` (`shoal scale`); the next
    /// controller pass places it.
    pub async fn set_scale(
        self: &Arc<Self>,
        model: &str,
        spec: shoal_api::scale::ScaleSpec,
        actor: &str,
    ) -> Result<Deployment, DeployError> {
        spec.check().map_err(DeployError::Invalid)?;
        retrying(|| self.set_scale_once(model, &spec, actor)).await
    }

    async fn set_scale_once(
        self: &Arc<Self>,
        model: &str,
        spec: &shoal_api::scale::ScaleSpec,
        actor: &str,
    ) -> Result<Deployment, DeployError> {
        let _guard = self.deploy_lock.lock().await;
        let stored = self.deployed(model).await?;
        let mut deployment = stored.deployment;
        let detail = match (spec.replicas, spec.min, spec.max) {
            (Some(n), _, _) => format!("{n} replicas"),
            (None, Some(min), Some(max)) => format!(
                "{min} to {max} replicas on {} {}",
                spec.target_or_default().signal(),
                spec.target_or_default().value()
            ),
            _ => "every replica".to_owned(),
        };
        let detail = if spec.min_on_demand > 0 {
            format!("{detail}, at least {} on-demand", spec.min_on_demand)
        } else {
            detail
        };
        if spec.is_everywhere() {
            deployment.scale = None;
            deployment.placement = None;
        } else {
            deployment.scale = Some(spec.clone());
        }
        self.write_by_hand(
            deployment,
            stored.controller,
            "scale",
            Audit::by(actor, detail),
        )
        .await
    }

    /// Writes a deployment changed by hand (under the deploy lock, so no
    /// fence), reloads, tells the replicas, and returns it as stored.
    async fn write_by_hand(
        self: &Arc<Self>,
        mut deployment: Deployment,
        controller: serde_json::Value,
        action: &str,
        audit: Audit,
    ) -> Result<Deployment, DeployError> {
        deployment.revision = self
            .write_deployment(deployment.clone(), controller, action, audit, None)
            .await?;
        self.refresh().await?;
        self.after_change();
        Ok(deployment)
    }

    fn after_change(self: &Arc<Self>) {
        self.push_to_replicas();
        self.kick();
    }

    /// Sends one request with zero-valued inputs to `model:version` on
    /// every live replica at once (the shapes its metadata gives, dynamic
    /// dimensions as 1) and expects an answer from each.
    async fn smoke_test(
        &self,
        model: &str,
        version: &str,
        replicas: &[&ReplicaFacts],
    ) -> Result<usize, String> {
        let one = |r: &ReplicaFacts| {
            let (id, address) = (r.id.clone(), r.address.clone());
            async move {
                let client =
                    shoal_client::ApiClient::replica(&shoal_api::member_url(&address, ""), None)
                        .with_timeout(Duration::from_secs(10));
                let meta = client
                    .get_raw(&format!("/v2/models/{model}/versions/{version}"))
                    .await
                    .map_err(|e| format!("replica {id}: metadata: {e}"))?;
                let meta: shoal_oip::ModelMetadata = serde_json::from_slice(&meta)
                    .map_err(|e| format!("replica {id}: metadata: {e}"))?;
                let inputs: Vec<serde_json::Value> = meta
                    .inputs
                    .iter()
                    .map(|input| {
                        let shape: Vec<u64> = input
                            .shape
                            .iter()
                            .map(|&d| u64::try_from(d).ok().filter(|d| *d > 0).unwrap_or(1))
                            .collect();
                        let n = usize::try_from(shape.iter().product::<u64>()).unwrap_or(1);
                        let zero = match input.datatype.as_str() {
                            "BOOL" => serde_json::json!(false),
                            "BYTES" => serde_json::json!(""),
                            _ => serde_json::json!(0),
                        };
                        serde_json::json!({"name": input.name, "shape": shape, "datatype": input.datatype, "data": vec![zero; n]})
                    })
                    .collect();
                let body =
                    serde_json::json!({"id": "shoal-smoke-test", "inputs": inputs}).to_string();
                client
                    .post_json_raw(
                        &format!("/v2/models/{model}/versions/{version}/infer"),
                        body,
                    )
                    .await
                    .map(|_| ())
                    .map_err(|e| format!("replica {id}: {e}"))
            }
        };
        let live: Vec<_> = replicas
            .iter()
            .filter(|r| r.alive)
            .map(|r| one(r))
            .collect();
        let passed = live.len();
        futures::future::try_join_all(live).await?;
        Ok(passed)
    }

    /// One pass of the controller over every active rollout; also lets
    /// warm versions expire.
    pub async fn tick(self: &Arc<Self>) -> Result<(), DeployError> {
        let result = self.tick_as_leader().await;
        match result {
            Err(DeployError::Deposed(why)) => {
                tracing::warn!(%why, "a controller write was fenced off; stepping down");
                self.step_down();
                self.refresh().await?;
                Ok(())
            }
            Err(DeployError::Stale(why)) => {
                // Another member changed a deployment since the snapshot
                // this pass planned with: plan again with a fresh one.
                tracing::info!(%why, "re-reading the registry");
                self.refresh().await?;
                self.kick();
                Ok(())
            }
            other => other,
        }
    }

    async fn tick_as_leader(self: &Arc<Self>) -> Result<(), DeployError> {
        // Every member runs the autoscalers (for `shoal scale status`);
        // only the leader writes placements.
        let placements = self.capacity.pass(
            &self.facts(),
            &self.snapshot().registrations,
            &self.live.capacity_reports(),
            now_millis(),
        );
        let Some(fence) = self.fence() else {
            return Ok(());
        };
        let fence = Some(&fence);
        let guard = self.deploy_lock.lock().await;
        let facts = self.facts();
        let now = now_millis();
        let (mut changed, mut stale) = (false, false);
        // Blue-green rollouts ready for their smoke test: run after the
        // lock is released (HTTP calls with 10 s timeouts must not hold up
        // every deploy, abort and rollback), then re-validated.
        let mut smoke: Vec<SmokeTest> = Vec::new();
        for (deployment, controller) in facts.deployments.iter() {
            let model = deployment.model.clone();
            if deployment.warm.iter().any(|w| w.until <= now) {
                let mut d = deployment.clone();
                d.warm.retain(|w| w.until > now);
                self.write_deployment(
                    d,
                    stored_controller(controller.as_ref()),
                    "warm.expired",
                    Audit::by("controller", "replaced version no longer kept warm"),
                    fence,
                )
                .await?;
                changed = true;
                // Written straight to the store, not through `persist`.
                stale = true;
                continue;
            }
            let Some(mut controller) = controller.clone().filter(Controller::is_active) else {
                continue;
            };
            let replicas = eligible(deployment, &facts.replicas);
            let step = controller.tick(&model, &replicas, &facts, &mut rand::rng(), now);
            match step {
                Step::SmokeTest => {
                    if let Controller::BlueGreen(b) = &controller {
                        smoke.push(SmokeTest {
                            model: model.clone(),
                            version: b.to.clone(),
                            started_at: b.progress.started_at,
                            replicas: replicas.iter().map(|r| (*r).clone()).collect(),
                        });
                    }
                }
                Step::Unchanged => {}
                Step::Changed => {
                    let reason = controller.view(&model, &replicas, &facts).reason;
                    self.persist(
                        deployment.clone(),
                        &controller,
                        "deploy.step",
                        Audit::by("controller", reason),
                        fence,
                    )
                    .await?;
                    changed = true;
                }
                Step::Ended => {
                    let keep = controller.keep_warm(DEFAULT_KEEP_WARM);
                    self.conclude(deployment.clone(), &controller, "controller", keep, fence)
                        .await?;
                    changed = true;
                }
            }
        }
        // Placements, unless a rollout step changed a deployment in this
        // pass (the placement was planned on what it replaced: next pass).
        if !changed {
            for change in placements {
                let Some((deployment, controller)) = facts
                    .deployments
                    .iter()
                    .find(|(d, _)| d.model == change.model)
                else {
                    continue;
                };
                let mut d = deployment.clone();
                d.placement = change.placement;
                tracing::info!(model = %change.model, reason = %change.reason, "placement changed");
                self.write_deployment(
                    d,
                    stored_controller(controller.as_ref()),
                    "scale.placed",
                    Audit::by("controller", format!("{}: {}", change.model, change.reason)),
                    fence,
                )
                .await?;
                changed = true;
                stale = true;
            }
        }
        drop(guard);
        // `persist` (and so `conclude`) has reloaded the snapshot already;
        // only a direct store write leaves it stale.
        if stale {
            self.refresh().await?;
        }
        if !smoke.is_empty() {
            changed |= self.smoke_tests(smoke).await?;
        }
        if changed {
            self.push_to_replicas();
        }
        Ok(())
    }

    /// Runs blue-green smoke tests with no lock held, then, under the
    /// deploy lock, feeds each result to its rollout if that rollout is
    /// still the one tested and still waiting for it (an abort, rollback or
    /// new deploy may have come meanwhile: then the result is dropped).
    /// True when a rollout ended.
    async fn smoke_tests(self: &Arc<Self>, tests: Vec<SmokeTest>) -> Result<bool, DeployError> {
        let results = futures::future::join_all(tests.iter().map(|t| {
            let replicas: Vec<&ReplicaFacts> = t.replicas.iter().collect();
            let this = self.clone();
            async move { this.smoke_test(&t.model, &t.version, &replicas).await }
        }))
        .await;
        let Some(fence) = self.fence() else {
            return Ok(false);
        };
        let _guard = self.deploy_lock.lock().await;
        let mut ended = false;
        for (test, result) in tests.into_iter().zip(results) {
            let (deployment, controller) = self.controller_of(&test.model).await?;
            match controller {
                Some(Controller::BlueGreen(mut b))
                    if !b.progress.state.is_terminal()
                        && b.progress.state != RolloutState::Paused
                        && b.to == test.version
                        && b.progress.started_at == test.started_at =>
                {
                    b.smoke_result(result, now_millis());
                    let controller = Controller::BlueGreen(b);
                    let keep = controller.keep_warm(DEFAULT_KEEP_WARM);
                    self.conclude(deployment, &controller, "controller", keep, Some(&fence))
                        .await?;
                    ended = true;
                }
                _ => tracing::info!(
                    model = %test.model,
                    version = %test.version,
                    "the rollout changed while it was smoke-tested; the result is dropped"
                ),
            }
        }
        Ok(ended)
    }
}

/// Runs a user's action again when another member changed the deployment
/// between its read and its write (the write was refused as stale): the
/// action reads again and decides again, so it is refused for the right
/// reason (a rollout now in progress) or applied to what is there now.
async fn retrying<T, F, Fut>(mut action: F) -> Result<T, DeployError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, DeployError>>,
{
    for _ in 0..4 {
        match action().await {
            Err(DeployError::Stale(why)) => tracing::info!(%why, "trying again"),
            other => return other,
        }
    }
    action().await
}

/// A blue-green smoke test to run outside the deploy lock.
struct SmokeTest {
    model: String,
    version: String,
    started_at: i64,
    replicas: Vec<ReplicaFacts>,
}

/// Runs the controller until the task is aborted: on every kick (a deploy,
/// a heartbeat that changed what a replica serves) and at a steady interval.
pub async fn run(control: Arc<Control>) {
    let mut interval = tokio::time::interval(control.config.controller_interval);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut alive: Vec<String> = Vec::new();
    loop {
        tokio::select! {
            _ = interval.tick() => {}
            () = control.kick.notified() => {}
        }
        if let Err(e) = control.tick().await {
            tracing::warn!(error = %e, "rollout controller pass failed; retrying");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        control.fleet_status();
        // Replicas that fell silent change routing without any heartbeat
        // saying so: notice it here.
        let now_alive: Vec<String> = control
            .facts()
            .replicas
            .into_iter()
            .filter(|r| r.alive)
            .map(|r| r.id)
            .collect();
        if now_alive != alive {
            alive = now_alive;
            control.fleet_changed();
        }
    }
}

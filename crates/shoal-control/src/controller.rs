//! The rollout controller's I/O shell: deploy and rollback requests, and
//! the loop that feeds the pure state machines (`shoal-rollout`) with what
//! replicas report and persists what they decide.
//!
//! Every change goes through the registry first (audit entry in the same
//! transaction, revision bumped), then the snapshot is refreshed, watchers
//! see the new revision, and replicas are nudged.

use std::sync::Arc;
use std::time::Duration;

use shoal_api::deploy::{DeployRequest, Deployment, RolloutState, Strategy, TrafficTarget};
use shoal_api::now_millis;
use shoal_api::registry::VersionStatus;
use shoal_registry::{Audit, RegistryError, StoredDeployment};
use shoal_rollout::rolling::{Decision, Rolling};
use shoal_rollout::{ReplicaFacts, plan};

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
    /// The registry failed.
    Internal(String),
}

impl std::fmt::Display for DeployError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeployError::NotFound(m)
            | DeployError::Conflict(m)
            | DeployError::Invalid(m)
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
            RegistryError::Database(m) => DeployError::Internal(m),
        }
    }
}

impl From<anyhow::Error> for DeployError {
    fn from(e: anyhow::Error) -> Self {
        DeployError::Internal(format!("{e:#}"))
    }
}

fn eligible<'a>(deployment: &Deployment, replicas: &'a [ReplicaFacts]) -> Vec<&'a ReplicaFacts> {
    replicas
        .iter()
        .filter(|r| plan::eligible(deployment, r))
        .collect()
}

/// The version serving most of a deployment's traffic.
fn primary(deployment: &Deployment) -> Option<String> {
    deployment
        .targets
        .iter()
        .filter(|t| t.weight > 0)
        .max_by_key(|t| t.weight)
        .map(|t| t.version.clone())
}

impl Control {
    async fn persist(
        &self,
        mut deployment: Deployment,
        rolling: &Rolling,
        action: &str,
        audit: Audit,
    ) -> Result<Deployment, DeployError> {
        let facts = self.facts();
        deployment.rollout =
            Some(rolling.view(&deployment.model, &eligible(&deployment, &facts.replicas)));
        let stored = StoredDeployment {
            controller: serde_json::to_value(rolling).unwrap_or_default(),
            deployment: deployment.clone(),
        };
        deployment.revision = self.store.put_deployment(stored, action, audit).await?;
        self.refresh().await?;
        Ok(deployment)
    }

    /// Starts rolling `model` to `request.version`.
    pub async fn deploy(
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
        if let Some(current) = &current
            && let Some(rollout) = &current.deployment.rollout
            && !rollout.state.is_terminal()
        {
            return Err(DeployError::Conflict(format!(
                "a rollout of {model} to version {} is in progress ({}); wait for it, or abort it with `shoal rollout abort {model}`",
                rollout.to, rollout.reason
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
        let Strategy::Rolling = request.strategy;
        let regions = request
            .regions
            .clone()
            .or_else(|| current.as_ref().and_then(|c| c.deployment.regions.clone()));
        let deployment = Deployment {
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
            rollout: None,
            revision: 0,
            updated_at: 0,
        };
        let fleet = eligible(&deployment, &self.facts().replicas).len();
        let surge = request
            .max_surge
            .unwrap_or_else(|| u32::try_from(fleet.div_ceil(4)).unwrap_or(1).max(1));
        let rolling = Rolling::start(from.clone(), version.version.clone(), surge, now_millis());
        let reason = request.reason.clone().unwrap_or_else(|| "deploy".into());
        self.store
            .set_status(
                model,
                &version.version,
                VersionStatus::Canary,
                false,
                Audit::by(actor, format!("rolling out: {reason}")),
            )
            .await?;
        let deployment = self
            .persist(
                deployment,
                &rolling,
                "deploy",
                Audit::by(
                    actor,
                    format!(
                        "{} from {} to {}: {reason}",
                        Strategy::Rolling.as_str(),
                        from.as_deref().unwrap_or("nothing"),
                        version.version
                    ),
                ),
            )
            .await?;
        self.after_change();
        Ok(deployment)
    }

    /// Sends `model` back to its last known good version: aborts a rollout
    /// in progress, or rolls the production version back.
    pub async fn rollback(
        self: &Arc<Self>,
        model: &str,
        reason: Option<String>,
        actor: &str,
    ) -> Result<Deployment, DeployError> {
        let _guard = self.deploy_lock.lock().await;
        let reason = reason.unwrap_or_else(|| "rollback requested".into());
        let stored = self
            .store
            .get_deployment(model)
            .await?
            .ok_or_else(|| DeployError::NotFound(format!("model {model} is not deployed")))?;
        let mut rolling: Option<Rolling> = serde_json::from_value(stored.controller.clone()).ok();
        let mut deployment = stored.deployment;
        // A rollout in progress: abort it; everyone goes back to `from`.
        if let Some(r) = rolling.as_mut().filter(|r| !r.state.is_terminal())
            && let Some(from) = r.from.clone()
        {
            r.abort(format!("rolled back: {reason}"), now_millis());
            self.store
                .set_status(
                    model,
                    &r.to,
                    VersionStatus::Deprecated,
                    true,
                    Audit::by(actor, reason.clone()),
                )
                .await?;
            deployment.targets = vec![TrafficTarget {
                version: from.clone(),
                weight: 100,
            }];
            let r = r.clone();
            let deployment = self
                .persist(
                    deployment,
                    &r,
                    "rollback",
                    Audit::by(
                        actor,
                        format!("aborted rollout to {}; back to {from}: {reason}", r.to),
                    ),
                )
                .await?;
            self.after_change();
            return Ok(deployment);
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
        // Everyone at once: the last known good version is small and was
        // serving recently; a rollback should not crawl.
        let fleet = eligible(&deployment, &self.facts().replicas).len();
        let r = Rolling::start(
            current.clone(),
            target.clone(),
            u32::try_from(fleet).unwrap_or(1).max(1),
            now_millis(),
        );
        deployment.targets = vec![TrafficTarget {
            version: target.clone(),
            weight: 100,
        }];
        let deployment = self
            .persist(
                deployment,
                &r,
                "rollback",
                Audit::by(
                    actor,
                    format!(
                        "from {} to last known good {target}: {reason}",
                        current.as_deref().unwrap_or("nothing")
                    ),
                ),
            )
            .await?;
        self.after_change();
        Ok(deployment)
    }

    /// Sets a model's traffic policy by hand: weights across versions, a
    /// shadow share, the split header. Refused while a rollout runs.
    pub async fn set_traffic(
        self: &Arc<Self>,
        model: &str,
        request: shoal_api::deploy::TrafficRequest,
        actor: &str,
    ) -> Result<Deployment, DeployError> {
        let _guard = self.deploy_lock.lock().await;
        let stored = self.store.get_deployment(model).await?.ok_or_else(|| {
            DeployError::NotFound(format!(
                "model {model} is not deployed; deploy a version first"
            ))
        })?;
        let rolling: Option<Rolling> = serde_json::from_value(stored.controller.clone()).ok();
        if let Some(r) = rolling.as_ref().filter(|r| !r.state.is_terminal()) {
            return Err(DeployError::Conflict(format!(
                "a rollout of {model} to {} is in progress; traffic follows it until it ends",
                r.to
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
        let stored = StoredDeployment {
            controller: stored.controller,
            deployment: deployment.clone(),
        };
        deployment.revision = self
            .store
            .put_deployment(stored, "traffic", Audit::by(actor, detail))
            .await?;
        self.refresh().await?;
        self.after_change();
        Ok(deployment)
    }

    fn after_change(self: &Arc<Self>) {
        self.push_to_replicas();
        self.kick();
    }

    /// One pass of the controller over every active rollout.
    pub async fn tick(self: &Arc<Self>) -> Result<(), DeployError> {
        let _guard = self.deploy_lock.lock().await;
        let facts = self.facts();
        let mut changed = false;
        for (deployment, rolling) in &facts.deployments {
            let Some(mut rolling) = rolling
                .clone()
                .filter(|r| !r.state.is_terminal() && r.state != RolloutState::Paused)
            else {
                continue;
            };
            let model = deployment.model.clone();
            let replicas = eligible(deployment, &facts.replicas);
            match rolling.tick(&model, &replicas, now_millis()) {
                Decision::Unchanged => {}
                Decision::Changed => {
                    let reason = rolling.reason.clone();
                    self.persist(
                        deployment.clone(),
                        &rolling,
                        "deploy.step",
                        Audit::by("controller", reason),
                    )
                    .await?;
                    changed = true;
                }
                Decision::Promoted => {
                    let audit = || Audit::by("controller", rolling.reason.clone());
                    self.store
                        .set_status(
                            &model,
                            &rolling.to,
                            VersionStatus::Production,
                            false,
                            audit(),
                        )
                        .await?;
                    if let Some(from) = &rolling.from {
                        let old = self.store.get_version(&model, from).await?;
                        if old.is_some_and(|v| !v.rolled_back) {
                            self.store
                                .set_status(&model, from, VersionStatus::Deprecated, false, audit())
                                .await?;
                        }
                    }
                    self.persist(deployment.clone(), &rolling, "deploy.promoted", audit())
                        .await?;
                    changed = true;
                }
            }
        }
        drop(_guard);
        if changed {
            self.push_to_replicas();
        }
        Ok(())
    }
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

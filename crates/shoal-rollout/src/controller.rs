//! One type for every rollout controller, as the registry persists it, and
//! one pass of whichever it is ([`Controller::tick`]): what the control
//! plane must do next, decided from the fleet's facts.

use std::time::Duration;

use rand::Rng;
use serde::{Deserialize, Serialize};
use shoal_api::deploy::{RolloutState, RolloutView};
use shoal_api::fleet::{FailureKind, LoadFailureReport, TRANSIENT_LOAD_ATTEMPTS};

use crate::bluegreen::{self, BlueGreen};
use crate::canary::{self, Canary};
use crate::experiment::Experiment;
use crate::plan::{FleetFacts, ReplicaFacts};
use crate::progress::Progress;
use crate::rolling::{self, Rolling};
use crate::shadow::Shadow;

/// A bandit re-weighs at most this often (ms): each change is a new
/// revision every gateway follows.
pub const REWEIGH_MS: i64 = 2_000;

/// What one pass of a controller asks of the control plane.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Nothing worth persisting.
    Unchanged,
    /// Traffic, assignments or the reason changed: persist and publish.
    Changed,
    /// It has ended (promoted or rolled back): conclude the deployment.
    Ended,
    /// Blue-green: every live replica has the new version. Smoke-test it
    /// there and feed the outcome to [`BlueGreen::smoke_result`]; the
    /// rollout has then ended either way.
    SmokeTest,
}

/// The controller of a model's rollout.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Controller {
    /// Rolling update.
    Rolling(Rolling),
    /// Canary with analysis (boxed: by far the largest state).
    Canary(Box<Canary>),
    /// Blue-green switch.
    BlueGreen(BlueGreen),
    /// Shadow comparison.
    Shadow(Shadow),
    /// A/B test or bandit.
    Experiment(Experiment),
}

impl Controller {
    /// Where it stands, why, and since when.
    pub fn progress(&self) -> &Progress {
        match self {
            Controller::Rolling(r) => &r.progress,
            Controller::Canary(c) => &c.progress,
            Controller::BlueGreen(b) => &b.progress,
            Controller::Shadow(s) => &s.progress,
            Controller::Experiment(e) => &e.progress,
        }
    }

    fn progress_mut(&mut self) -> &mut Progress {
        match self {
            Controller::Rolling(r) => &mut r.progress,
            Controller::Canary(c) => &mut c.progress,
            Controller::BlueGreen(b) => &mut b.progress,
            Controller::Shadow(s) => &mut s.progress,
            Controller::Experiment(e) => &mut e.progress,
        }
    }

    /// Where it stands.
    pub fn state(&self) -> RolloutState {
        self.progress().state
    }

    /// True until it has ended.
    pub fn is_active(&self) -> bool {
        !self.state().is_terminal()
    }

    /// One pass: `replicas` are those eligible to serve `model`, `facts`
    /// what replicas and gateways reported. Paused and ended rollouts do
    /// not move.
    pub fn tick(
        &mut self,
        model: &str,
        replicas: &[&ReplicaFacts],
        facts: &FleetFacts,
        rng: &mut impl Rng,
        now: i64,
    ) -> Step {
        if !self.is_active() || self.state() == RolloutState::Paused {
            return Step::Unchanged;
        }
        let failures = self.load_failures(model, replicas);
        if let Some(failed) = failures.iter().find(|f| f.report.gave_up()) {
            let reason = format!("rolled back: {}", failed.describe(model));
            self.progress_mut()
                .decide(RolloutState::RolledBack, reason, now);
            return Step::Ended;
        }
        let before = self.progress().reason.clone();
        let step = self.tick_strategy(model, replicas, facts, rng, now);
        if step == Step::Ended || failures.is_empty() || self.state().is_terminal() {
            return step;
        }
        // Replicas retrying a version they could not load: say so, once
        // per attempt (each is worth persisting, and there are few), or
        // once for an artifact nobody can fetch now (retried until the
        // store is back, however long: no count to persist).
        let retrying: Vec<String> = failures
            .iter()
            .map(|f| match f.report.kind {
                FailureKind::Unavailable => {
                    format!("{}; waiting for the artifact store", f.describe(model))
                }
                FailureKind::Definite | FailureKind::Transient => format!(
                    "{} (attempt {} of {}); retrying",
                    f.describe(model),
                    f.report.attempts,
                    TRANSIENT_LOAD_ATTEMPTS
                ),
            })
            .collect();
        let progress = self.progress_mut();
        progress.reason = format!("waiting: {}", retrying.join("; "));
        if progress.reason != before {
            progress.updated_at = now;
            return Step::Changed;
        }
        step
    }

    /// Load failures that concern this rollout: a live replica that should
    /// have a version the rollout brings in (not the one it replaces)
    /// reports it could not load it. Sorted by replica, then version.
    pub fn load_failures<'a>(
        &self,
        model: &str,
        replicas: &[&'a ReplicaFacts],
    ) -> Vec<LoadFailed<'a>> {
        let from = self.from();
        let mut failed = Vec::new();
        for r in replicas.iter().filter(|r| r.alive) {
            for version in self.versions_for(r) {
                if Some(version.as_str()) == from {
                    continue;
                }
                if let Some(report) = r.failure(model, &version) {
                    failed.push(LoadFailed {
                        replica: &r.id,
                        version,
                        report,
                    });
                }
            }
        }
        failed.sort_by(|a, b| (a.replica, &a.version).cmp(&(b.replica, &b.version)));
        failed
    }

    fn tick_strategy(
        &mut self,
        model: &str,
        replicas: &[&ReplicaFacts],
        facts: &FleetFacts,
        rng: &mut impl Rng,
        now: i64,
    ) -> Step {
        match self {
            Controller::Rolling(r) => match r.tick(model, replicas, now) {
                rolling::Decision::Unchanged => Step::Unchanged,
                rolling::Decision::Changed => Step::Changed,
                rolling::Decision::Promoted => Step::Ended,
            },
            Controller::Canary(c) => {
                let key = |v: &str| shoal_api::VersionKey::parse(model, v).ok();
                let (no_stats, no_rewards) = Default::default();
                let stats = |v: &str| {
                    key(v)
                        .and_then(|k| facts.stats.get(&k))
                        .unwrap_or(&no_stats)
                };
                let rewards = |v: &str| {
                    key(v)
                        .and_then(|k| facts.rewards.get(&k))
                        .unwrap_or(&no_rewards)
                };
                let totals = (stats(&c.from), stats(&c.to));
                let feedback = (rewards(&c.from), rewards(&c.to));
                match c.tick_with(model, replicas, totals, feedback, now) {
                    canary::Decision::Unchanged => Step::Unchanged,
                    canary::Decision::Changed => Step::Changed,
                    canary::Decision::Promoted | canary::Decision::RolledBack => Step::Ended,
                }
            }
            Controller::BlueGreen(b) => match b.tick(model, replicas, now) {
                bluegreen::Decision::SmokeTest => Step::SmokeTest,
                _ => Step::Unchanged,
            },
            Controller::Shadow(s) => changed(s.tick(model, replicas, now)),
            Controller::Experiment(e) => {
                if now - e.progress.updated_at < REWEIGH_MS {
                    Step::Unchanged
                } else {
                    changed(e.tick(&facts.rewards_of(model), rng, now))
                }
            }
        }
    }

    /// How long the replaced version stays loaded after a promotion:
    /// blue-green says so itself, a rolling update has already replaced it
    /// everywhere, the others keep it for `default`.
    pub fn keep_warm(&self, default: Duration) -> Duration {
        match self {
            Controller::BlueGreen(b) => b.keep_warm,
            Controller::Rolling(_) => Duration::ZERO,
            _ => default,
        }
    }

    /// The version being replaced.
    pub fn from(&self) -> Option<&str> {
        match self {
            Controller::Rolling(r) => r.from.as_deref(),
            Controller::Canary(c) => Some(&c.from),
            Controller::BlueGreen(b) => b.from.as_deref(),
            Controller::Shadow(s) => Some(&s.primary),
            Controller::Experiment(e) => e.arms.first().map(String::as_str),
        }
    }

    /// The version rolled out.
    pub fn to(&self) -> &str {
        match self {
            Controller::Rolling(r) => &r.to,
            Controller::Canary(c) => &c.to,
            Controller::BlueGreen(b) => &b.to,
            Controller::Shadow(s) => &s.candidate,
            Controller::Experiment(e) => e
                .winner
                .as_deref()
                .or_else(|| e.arms.last().map(String::as_str))
                .unwrap_or_default(),
        }
    }

    /// Versions replica `r` should have loaded while the rollout is
    /// active, the default first.
    pub fn versions_for(&self, r: &ReplicaFacts) -> Vec<String> {
        match self {
            Controller::Rolling(rolling) => vec![rolling.assignment(&r.id).to_owned()],
            Controller::Canary(c) => vec![c.from.clone(), c.to.clone()],
            Controller::BlueGreen(b) => b.from.iter().cloned().chain([b.to.clone()]).collect(),
            Controller::Shadow(s) => vec![s.primary.clone(), s.candidate.clone()],
            Controller::Experiment(e) => e.arms.clone(),
        }
    }

    /// Traffic weights while active (given the replicas eligible to
    /// serve), and the shadow share (version, percent) if any. Asked on
    /// every routing-table request, so it computes only the weights, not
    /// the whole view (intervals, significance).
    pub fn traffic(
        &self,
        replicas: &[&ReplicaFacts],
    ) -> (
        std::collections::BTreeMap<String, u32>,
        Option<(String, u32)>,
    ) {
        let weights = match self {
            Controller::Rolling(r) => r.weights(replicas),
            Controller::Canary(c) => c.weights(),
            Controller::BlueGreen(b) => b.weights(),
            Controller::Shadow(s) => s.weights(),
            Controller::Experiment(e) => e.weights(),
        };
        let shadow = match self {
            Controller::Shadow(s) if s.mirroring && s.is_running() => {
                Some((s.candidate.clone(), s.percent))
            }
            _ => None,
        };
        (weights, shadow)
    }

    /// The rollout as users see it (shadow and experiments read what
    /// gateways reported, in `facts`).
    pub fn view(&self, model: &str, replicas: &[&ReplicaFacts], facts: &FleetFacts) -> RolloutView {
        match self {
            Controller::Rolling(r) => r.view(model, replicas),
            Controller::Canary(c) => c.view(model, replicas),
            Controller::BlueGreen(b) => b.view(model, replicas),
            Controller::Shadow(s) => s.view(
                model,
                replicas,
                facts.shadow.get(model).unwrap_or(&Default::default()),
            ),
            Controller::Experiment(e) => {
                let totals = facts.rewards_of(model);
                e.view(model, replicas, &totals)
            }
        }
    }

    /// Stops it; traffic goes back to the old version.
    pub fn abort(&mut self, reason: String, now: i64) {
        self.progress_mut().abort(reason, now);
    }

    /// Parses a persisted snapshot: `None` when the deployment has none
    /// (`null`); snapshots written before controllers had a kind are
    /// rolling updates. A snapshot that cannot be read (written by another
    /// Shoal, or damaged) is an error that says why: a rollout must never
    /// vanish silently, or a second one could start beside it.
    pub fn from_json(value: &serde_json::Value) -> Result<Option<Controller>, String> {
        if value.is_null() {
            return Ok(None);
        }
        match serde_json::from_value::<Controller>(value.clone()) {
            Ok(c) => Ok(Some(c)),
            Err(tagged) => match serde_json::from_value::<Rolling>(value.clone()) {
                Ok(r) if value.get("kind").is_none() => Ok(Some(Controller::Rolling(r))),
                _ => Err(format!("the stored rollout cannot be read: {tagged}")),
            },
        }
    }
}

/// A replica that could not load a version a rollout brings in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadFailed<'a> {
    /// The replica.
    pub replica: &'a str,
    /// The version.
    pub version: String,
    /// What it reported.
    pub report: &'a LoadFailureReport,
}

impl LoadFailed<'_> {
    /// In words, naming the replica, the version and the error.
    pub fn describe(&self, model: &str) -> String {
        let kind = match self.report.kind {
            FailureKind::Definite => String::new(),
            FailureKind::Transient if self.report.gave_up() => {
                format!(" after {} attempts", self.report.attempts)
            }
            FailureKind::Transient | FailureKind::Unavailable => String::new(),
        };
        format!(
            "{} could not load {model}:{}{kind}: {}",
            self.replica, self.version, self.report.reason
        )
    }
}

fn changed(moved: bool) -> Step {
    if moved {
        Step::Changed
    } else {
        Step::Unchanged
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::experiment::Kind;
    use shoal_api::fleet::{FailureKind, LoadFailureReport, TRANSIENT_LOAD_ATTEMPTS};

    #[test]
    fn every_controller_survives_the_registry() {
        let controllers = [
            Controller::Rolling(Rolling::start(Some("1".into()), "2".into(), 1, 0)),
            Controller::Shadow(Shadow::start(
                "1".into(),
                "2".into(),
                20,
                Default::default(),
                0,
            )),
            Controller::Experiment(Experiment::start(
                Kind::Bandit,
                vec!["1".into(), "2".into()],
                5,
                Default::default(),
                0,
            )),
            Controller::Experiment(Experiment::start(
                Kind::Ab,
                vec!["1".into(), "2".into()],
                5,
                Default::default(),
                0,
            )),
        ];
        for c in controllers {
            let json = serde_json::to_value(&c).unwrap();
            // Progress is flattened: stored snapshots keep these fields at
            // the top, as they were before it existed.
            for field in ["state", "reason", "started_at", "updated_at"] {
                assert!(json.get(field).is_some(), "{field} in {json}");
            }
            assert_eq!(Controller::from_json(&json), Ok(Some(c)), "{json}");
        }
        let stored = serde_json::json!({
            "kind": "blue-green", "from": "1", "to": "2", "keep_warm_ms": 1000,
            "phase": "loading", "state": "progressing", "reason": "loading 2",
            "started_at": 5, "updated_at": 6,
        });
        let parsed = Controller::from_json(&stored)
            .unwrap()
            .expect("a snapshot stored before Progress");
        // No snapshot, and one that cannot be read.
        assert_eq!(Controller::from_json(&serde_json::Value::Null), Ok(None));
        let future = serde_json::json!({"kind": "teleport", "state": "progressing"});
        let err = Controller::from_json(&future).unwrap_err();
        assert!(err.contains("teleport"), "{err}");
        assert_eq!(parsed.progress().reason, "loading 2");
        assert_eq!(parsed.progress().updated_at, 6);
    }

    fn serving_both(id: &str) -> ReplicaFacts {
        ReplicaFacts {
            failures: Default::default(),
            standby: false,
            id: id.into(),
            address: String::new(),
            region: "x".into(),
            alive: true,
            serving: [("m", "1"), ("m", "2")]
                .map(|(m, v)| shoal_api::VersionKey::parse(m, v).unwrap())
                .into(),
        }
    }

    #[test]
    fn a_pass_says_what_the_control_plane_must_do() {
        use rand::SeedableRng;
        let fleet = [serving_both("a"), serving_both("b")];
        let refs: Vec<&ReplicaFacts> = fleet.iter().collect();
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let quiet = FleetFacts::default();

        // Blue-green: every replica has the new version, so smoke-test it;
        // once the outcome is in, it has ended and never moves again.
        let mut b = Controller::BlueGreen(BlueGreen::start(
            Some("1".into()),
            "2".into(),
            Duration::from_millis(1),
            0,
        ));
        assert_eq!(b.tick("m", &refs, &quiet, &mut rng, 1), Step::SmokeTest);
        if let Controller::BlueGreen(b) = &mut b {
            b.smoke_result(Ok(2), 2);
        }
        assert_eq!(b.tick("m", &refs, &quiet, &mut rng, 3), Step::Unchanged);

        // A canary reads the fleet's counts of `model:version`: the canary
        // failing half its requests ends the rollout (rolled back).
        let mut c = Controller::Canary(Box::new(Canary::start(
            "1".into(),
            "2".into(),
            Default::default(),
            0,
        )));
        assert_eq!(c.tick("m", &refs, &quiet, &mut rng, 0), Step::Changed);
        let counts = |requests, errors| shoal_api::fleet::VersionStats {
            requests,
            errors,
            latency: vec![requests],
        };
        let failing = FleetFacts {
            stats: [
                ("m:1".parse().unwrap(), counts(5_000, 0)),
                ("m:2".parse().unwrap(), counts(600, 300)),
            ]
            .into(),
            ..FleetFacts::default()
        };
        assert_eq!(c.tick("m", &refs, &failing, &mut rng, 600_000), Step::Ended);
        assert_eq!(c.state(), RolloutState::RolledBack);

        // A paused rollout does not move, whatever the fleet says.
        let mut paused = Canary::start("1".into(), "2".into(), Default::default(), 0);
        paused.progress.state = RolloutState::Paused;
        let mut paused = Controller::Canary(Box::new(paused));
        assert_eq!(
            paused.tick("m", &refs, &failing, &mut rng, 600_000),
            Step::Unchanged
        );

        // A bandit re-weighs at most every REWEIGH_MS.
        let mut e = Controller::Experiment(Experiment::start(
            Kind::Bandit,
            vec!["1".into(), "2".into()],
            5,
            Default::default(),
            0,
        ));
        assert_eq!(
            e.tick("m", &refs, &quiet, &mut rng, REWEIGH_MS - 1),
            Step::Unchanged
        );

        // A rolling update over replicas that already serve the new
        // version ends without moving traffic by hand.
        let mut r = Controller::Rolling(Rolling::start(Some("1".into()), "2".into(), 2, 0));
        let steps: Vec<Step> = (1..=3)
            .map(|t| r.tick("m", &refs, &quiet, &mut rng, t))
            .collect();
        assert_eq!(steps.last(), Some(&Step::Unchanged), "{steps:?}");
        assert!(steps.contains(&Step::Ended), "{steps:?}");
        assert_eq!(r.keep_warm(Duration::from_secs(9)), Duration::ZERO);
        assert_eq!(c.keep_warm(Duration::from_secs(9)), Duration::from_secs(9));
    }

    #[test]
    fn routing_weights_are_the_weights_users_see() {
        let replicas: Vec<ReplicaFacts> = (0..4)
            .map(|i| ReplicaFacts {
                failures: Default::default(),
                standby: false,
                id: format!("r{i}"),
                address: String::new(),
                region: "x".into(),
                alive: i != 3,
                serving: [shoal_api::VersionKey::parse("m", "1").unwrap()]
                    .into_iter()
                    .chain((i < 2).then(|| shoal_api::VersionKey::parse("m", "2").unwrap()))
                    .collect(),
            })
            .collect();
        let refs: Vec<&ReplicaFacts> = replicas.iter().collect();
        let running = [
            Controller::Rolling(Rolling::start(Some("1".into()), "2".into(), 2, 0)),
            Controller::Canary(Box::new(crate::canary::Canary::start(
                "1".into(),
                "2".into(),
                Default::default(),
                0,
            ))),
            Controller::BlueGreen(crate::bluegreen::BlueGreen::start(
                Some("1".into()),
                "2".into(),
                Duration::from_secs(1),
                0,
            )),
            Controller::Shadow(Shadow::start(
                "1".into(),
                "2".into(),
                20,
                Default::default(),
                0,
            )),
            Controller::Experiment(Experiment::start(
                Kind::Ab,
                vec!["1".into(), "2".into()],
                5,
                Default::default(),
                0,
            )),
        ];
        for c in running {
            let mut aborted = c.clone();
            aborted.abort("stop".into(), 1);
            for c in [c, aborted] {
                let view = c.view("m", &refs, &FleetFacts::default());
                let (weights, _) = c.traffic(&refs);
                assert_eq!(weights, view.weights, "{view:?}");
                assert_eq!(weights.values().sum::<u32>(), 100, "{view:?}");
            }
        }
    }

    /// Every strategy, started from 1 to 2 on three replicas serving 1.
    fn every_strategy() -> Vec<(&'static str, Controller)> {
        let gradual = crate::canary::CanaryConfig {
            steps: vec![5, 10, 25, 50, 100],
            bakes: vec![Duration::from_secs(600); 4],
            ..Default::default()
        };
        vec![
            (
                "rolling",
                Controller::Rolling(Rolling::start(Some("1".into()), "2".into(), 1, 0)),
            ),
            (
                "canary",
                Controller::Canary(Box::new(Canary::start(
                    "1".into(),
                    "2".into(),
                    Default::default(),
                    0,
                ))),
            ),
            (
                "gradual",
                Controller::Canary(Box::new(Canary::start("1".into(), "2".into(), gradual, 0))),
            ),
            (
                "blue-green",
                Controller::BlueGreen(BlueGreen::start(
                    Some("1".into()),
                    "2".into(),
                    Duration::from_secs(1),
                    0,
                )),
            ),
            (
                "shadow",
                Controller::Shadow(Shadow::start(
                    "1".into(),
                    "2".into(),
                    20,
                    Default::default(),
                    0,
                )),
            ),
            (
                "ab",
                Controller::Experiment(Experiment::start(
                    Kind::Ab,
                    vec!["1".into(), "2".into()],
                    5,
                    Default::default(),
                    0,
                )),
            ),
            (
                "bandit",
                Controller::Experiment(Experiment::start(
                    Kind::Bandit,
                    vec!["1".into(), "2".into()],
                    5,
                    Default::default(),
                    0,
                )),
            ),
        ]
    }

    fn serving_one(id: &str) -> ReplicaFacts {
        ReplicaFacts {
            id: id.into(),
            region: "x".into(),
            alive: true,
            serving: [shoal_api::VersionKey::parse("m", "1").unwrap()].into(),
            ..ReplicaFacts::default()
        }
    }

    fn failing(kind: FailureKind, attempts: u32) -> LoadFailureReport {
        LoadFailureReport {
            reason: "cannot parse the model: not an ONNX protobuf".into(),
            kind,
            attempts,
            sha256: "ab".into(),
        }
    }

    /// Starts `c` on a fleet serving 1, then every replica that should load
    /// 2 reports `report` for it.
    fn fail_every_load(
        c: &mut Controller,
        report: &LoadFailureReport,
    ) -> (Vec<ReplicaFacts>, rand::rngs::StdRng) {
        use rand::SeedableRng;
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let mut fleet = vec![serving_one("a"), serving_one("b"), serving_one("c")];
        let refs: Vec<&ReplicaFacts> = fleet.iter().collect();
        c.tick("m", &refs, &FleetFacts::default(), &mut rng, 1);
        for r in &mut fleet {
            if c.versions_for(r).iter().any(|v| v == "2") {
                r.failures.insert("m:2".parse().unwrap(), report.clone());
            }
        }
        (fleet, rng)
    }

    #[test]
    fn every_strategy_rolls_back_when_a_replica_cannot_load_the_new_version() {
        for (name, mut c) in every_strategy() {
            let (fleet, mut rng) = fail_every_load(&mut c, &failing(FailureKind::Definite, 1));
            let refs: Vec<&ReplicaFacts> = fleet.iter().collect();
            let step = c.tick("m", &refs, &FleetFacts::default(), &mut rng, 2);
            assert_eq!(step, Step::Ended, "{name}");
            assert_eq!(c.state(), RolloutState::RolledBack, "{name}");
            assert_eq!(
                c.progress().reason,
                "rolled back: a could not load m:2: cannot parse the model: not an ONNX protobuf",
                "{name}"
            );
            assert_eq!(c.progress().updated_at, 2, "{name}");
            // Traffic is back on the version that was serving.
            let (mut weights, shadow) = c.traffic(&refs);
            weights.retain(|_, w| *w > 0);
            assert_eq!(weights, [("1".to_owned(), 100)].into(), "{name}");
            assert_eq!(shadow, None, "{name}");
            // Ended: it never moves again.
            assert_eq!(
                c.tick("m", &refs, &FleetFacts::default(), &mut rng, 3),
                Step::Unchanged,
                "{name}"
            );
        }
    }

    #[test]
    fn transient_failures_are_retried_up_to_the_bound_then_roll_back() {
        for (name, mut c) in every_strategy() {
            let (mut fleet, mut rng) = fail_every_load(&mut c, &failing(FailureKind::Transient, 1));
            let tick = |c: &mut Controller, fleet: &[ReplicaFacts], rng: &mut _, now| {
                let refs: Vec<&ReplicaFacts> = fleet.iter().collect();
                c.tick("m", &refs, &FleetFacts::default(), rng, now)
            };
            // The first attempt failed: say so once, and keep going.
            assert_eq!(tick(&mut c, &fleet, &mut rng, 2), Step::Changed, "{name}");
            assert!(c.is_active(), "{name}");
            assert!(
                c.progress().reason.starts_with(
                    "waiting: a could not load m:2: cannot parse the model: not an ONNX protobuf (attempt 1 of 5); retrying"
                ),
                "{name}: {}",
                c.progress().reason
            );
            assert_eq!(tick(&mut c, &fleet, &mut rng, 3), Step::Unchanged, "{name}");
            // Nearly at the bound: still retrying.
            for r in &mut fleet {
                for f in r.failures.values_mut() {
                    f.attempts = TRANSIENT_LOAD_ATTEMPTS - 1;
                }
            }
            assert_eq!(tick(&mut c, &fleet, &mut rng, 4), Step::Changed, "{name}");
            assert!(c.is_active(), "{name}");
            // The bound: treated as failed.
            for r in &mut fleet {
                for f in r.failures.values_mut() {
                    f.attempts = TRANSIENT_LOAD_ATTEMPTS;
                }
            }
            assert_eq!(tick(&mut c, &fleet, &mut rng, 5), Step::Ended, "{name}");
            assert_eq!(c.state(), RolloutState::RolledBack, "{name}");
            assert!(
                c.progress()
                    .reason
                    .starts_with("rolled back: a could not load m:2 after 5 attempts: "),
                "{name}: {}",
                c.progress().reason
            );
        }
    }

    #[test]
    fn an_artifact_nobody_can_fetch_is_waited_for_without_rolling_back() {
        for (name, mut c) in every_strategy() {
            let unavailable = LoadFailureReport {
                reason: "cannot fetch the artifact: 503".into(),
                kind: FailureKind::Unavailable,
                attempts: 1,
                sha256: String::new(),
            };
            let (mut fleet, mut rng) = fail_every_load(&mut c, &unavailable);
            let tick = |c: &mut Controller, fleet: &[ReplicaFacts], rng: &mut _, now| {
                let refs: Vec<&ReplicaFacts> = fleet.iter().collect();
                c.tick("m", &refs, &FleetFacts::default(), rng, now)
            };
            assert_eq!(tick(&mut c, &fleet, &mut rng, 2), Step::Changed, "{name}");
            assert!(
                c.progress().reason.starts_with("waiting: a could not load m:2: cannot fetch the artifact: 503; waiting for the artifact store"),
                "{name}: {}",
                c.progress().reason
            );
            // Far past the transient bound, the rollout still waits, and
            // more attempts change nothing worth persisting.
            for r in &mut fleet {
                for f in r.failures.values_mut() {
                    f.attempts = 40 * TRANSIENT_LOAD_ATTEMPTS;
                }
            }
            assert_eq!(tick(&mut c, &fleet, &mut rng, 3), Step::Unchanged, "{name}");
            assert!(c.is_active(), "{name}");
        }
    }

    #[test]
    fn failures_that_do_not_concern_the_rollout_are_ignored() {
        use rand::SeedableRng;
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let mut c = Controller::Rolling(Rolling::start(Some("1".into()), "2".into(), 1, 0));
        let mut fleet = [serving_one("a"), serving_one("b"), serving_one("c")];
        let refs: Vec<&ReplicaFacts> = fleet.iter().collect();
        assert_eq!(
            c.tick("m", &refs, &FleetFacts::default(), &mut rng, 1),
            Step::Changed
        );
        let definite = failing(FailureKind::Definite, 1);
        // c was not moved yet: its failure to load 2 is old news.
        fleet[2]
            .failures
            .insert("m:2".parse().unwrap(), definite.clone());
        // b cannot load the version being replaced: not this rollout's doing.
        fleet[1]
            .failures
            .insert("m:1".parse().unwrap(), definite.clone());
        // a is dead: whatever it said last does not count.
        fleet[0].alive = false;
        fleet[0]
            .failures
            .insert("m:2".parse().unwrap(), definite.clone());
        // Another model's failure.
        fleet[1]
            .failures
            .insert("other:2".parse().unwrap(), definite.clone());
        let refs: Vec<&ReplicaFacts> = fleet.iter().collect();
        c.tick("m", &refs, &FleetFacts::default(), &mut rng, 2);
        assert!(c.is_active(), "{:?}", c.progress());
        // A replica that serves the version after all has no failure.
        let mut served = serving_one("d");
        served
            .serving
            .insert(shoal_api::VersionKey::parse("m", "2").unwrap());
        served.failures.insert("m:2".parse().unwrap(), definite);
        assert_eq!(served.failure("m", "2"), None);
    }
}

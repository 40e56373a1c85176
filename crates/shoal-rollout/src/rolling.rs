//! The rolling-update controller.
//!
//! Replicas move to the new version a batch (`max_surge`) at a time. A moved
//! replica loads and warms the new version before it retires the old one, so
//! serving capacity never drops; the next batch moves only when every moved
//! replica that is alive reports serving the new version. Replicas that stop
//! heartbeating do not block the rollout; when they return they are moved
//! like the others. With nothing to replace (a first deployment), every
//! replica loads the new version at once.
//!
//! `max_unavailable`, when set, bounds how many eligible replicas may be
//! down while the rollout moves on: with more down (a new version that
//! crashes its replicas, a zone outage), no further batch moves until they
//! return or someone aborts.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};
use shoal_api::deploy::{RolloutState, RolloutView, Strategy};

use crate::plan::{Loading, ReplicaFacts};
use crate::progress::Progress;

/// A rolling update in progress (or finished), as persisted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rolling {
    /// The version being replaced.
    pub from: Option<String>,
    /// The version rolled out.
    pub to: String,
    /// Replicas moved per step.
    pub max_surge: u32,
    /// Most eligible replicas that may be down for the next batch to move.
    #[serde(default)]
    pub max_unavailable: Option<u32>,
    /// Replicas assigned the new version.
    pub moved: BTreeSet<String>,
    /// State, reason, when.
    #[serde(flatten)]
    pub progress: Progress,
    /// Steps taken.
    pub step: u32,
}

/// What a tick decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Nothing changed.
    Unchanged,
    /// Assignments or the reason changed: persist and publish.
    Changed,
    /// Every live replica serves the new version: mark it production and
    /// the old one deprecated.
    Promoted,
}

impl Rolling {
    /// A rolling update from `from` to `to`.
    pub fn start(from: Option<String>, to: String, max_surge: u32, now: i64) -> Rolling {
        let reason = match &from {
            Some(f) => format!("replacing {f} with {to}"),
            None => format!("first deployment: every replica loads {to}"),
        };
        Rolling {
            from,
            to,
            max_surge: max_surge.max(1),
            max_unavailable: None,
            moved: BTreeSet::new(),
            progress: Progress::start(reason, now),
            step: 0,
        }
    }

    /// Holds the rollout while more than `max` eligible replicas are down.
    #[must_use]
    pub fn with_max_unavailable(mut self, max: Option<u32>) -> Rolling {
        self.max_unavailable = max;
        self
    }

    /// The version replica `id` should serve.
    pub fn assignment(&self, id: &str) -> &str {
        match &self.from {
            Some(from)
                if matches!(
                    self.progress.state,
                    RolloutState::Aborted | RolloutState::RolledBack
                ) =>
            {
                from
            }
            Some(from)
                if self.progress.state != RolloutState::Promoted && !self.moved.contains(id) =>
            {
                from
            }
            _ => &self.to,
        }
    }

    /// Advances the rollout of `model` given the replicas eligible to serve
    /// it (alive or not).
    pub fn tick(&mut self, model: &str, replicas: &[&ReplicaFacts], now: i64) -> Decision {
        if self.progress.state.is_terminal() || self.progress.state == RolloutState::Paused {
            return Decision::Unchanged;
        }
        let mut live: Vec<&ReplicaFacts> = replicas.iter().copied().filter(|r| r.alive).collect();
        live.sort_by(|a, b| a.id.cmp(&b.id));
        let waiting: Vec<&str> = live
            .iter()
            .filter(|r| self.assignment(&r.id) == self.to && !r.serves(model, &self.to))
            .map(|r| r.id.as_str())
            .collect();
        if !waiting.is_empty() {
            // Waiting changes nothing anyone must act on: the reason is
            // refreshed for whoever looks, but not worth a new revision.
            self.progress.reason = format!(
                "step {}: waiting for {} to load and warm {}",
                self.step,
                waiting.join(", "),
                self.to
            );
            return Decision::Unchanged;
        }
        let remaining: Vec<&str> = live
            .iter()
            .filter(|r| self.assignment(&r.id) != self.to)
            .map(|r| r.id.as_str())
            .collect();
        if remaining.is_empty() {
            self.moved.extend(live.iter().map(|r| r.id.clone()));
            self.progress.decide(
                RolloutState::Promoted,
                if live.is_empty() {
                    format!(
                        "no live replica to wait for; replicas that join load {}",
                        self.to
                    )
                } else {
                    format!("all {} live replicas serve {}", live.len(), self.to)
                },
                now,
            );
            return Decision::Promoted;
        }
        let down: Vec<&str> = replicas
            .iter()
            .filter(|r| !r.alive)
            .map(|r| r.id.as_str())
            .collect();
        if let Some(max) = self.max_unavailable
            && down.len() > max as usize
        {
            let reason = format!(
                "holding at step {}: {} down ({}), more than max unavailable {max}; moving on when they return",
                self.step,
                down.len(),
                down.join(", ")
            );
            let changed =
                self.progress.state != RolloutState::Holding || self.progress.reason != reason;
            self.progress.state = RolloutState::Holding;
            self.progress.reason = reason;
            if changed {
                self.progress.updated_at = now;
                return Decision::Changed;
            }
            return Decision::Unchanged;
        }
        let batch: Vec<&str> = remaining
            .into_iter()
            .take(self.max_surge as usize)
            .collect();
        self.moved.extend(batch.iter().map(|id| (*id).to_owned()));
        self.step += 1;
        self.progress.decide(
            RolloutState::Progressing,
            format!(
                "step {}: moving {} to {}",
                self.step,
                batch.join(", "),
                self.to
            ),
            now,
        );
        Decision::Changed
    }

    /// Traffic weights by version now: each side's share of the live
    /// replicas assigned to it.
    pub fn weights(&self, replicas: &[&ReplicaFacts]) -> std::collections::BTreeMap<String, u32> {
        let live: Vec<&&ReplicaFacts> = replicas.iter().filter(|r| r.alive).collect();
        let mut weights = std::collections::BTreeMap::new();
        let total = live.len().max(1);
        let on_new = live
            .iter()
            .filter(|r| self.assignment(&r.id) == self.to)
            .count();
        let new_share = u32::try_from(on_new * 100 / total).unwrap_or(100);
        let new_share = if live.is_empty() { 100 } else { new_share };
        weights.insert(self.to.clone(), new_share);
        if let Some(from) = &self.from
            && new_share < 100
        {
            weights.insert(from.clone(), 100 - new_share);
        }
        weights
    }

    /// The rollout as users see it, given the replicas eligible to serve.
    pub fn view(&self, model: &str, replicas: &[&ReplicaFacts]) -> RolloutView {
        let loading = Loading::of(model, replicas, &self.to);
        let weights = self.weights(replicas);
        RolloutView {
            step: self.step,
            replicas_done: loading.done(),
            replicas_total: loading.live,
            ..self.progress.view(
                Strategy::Rolling,
                self.from.clone(),
                self.to.clone(),
                weights,
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn replica(id: &str, serving: &[&str]) -> ReplicaFacts {
        ReplicaFacts {
            failures: Default::default(),
            standby: false,
            id: id.into(),
            address: String::new(),
            region: "r".into(),
            alive: true,
            serving: serving
                .iter()
                .map(|v| shoal_api::VersionKey::parse("m", v).unwrap())
                .collect(),
        }
    }

    /// Drives a rollout: after each tick, replicas serve what they are
    /// assigned (as a converged fleet would), and the test checks the
    /// sequence of decisions.
    fn converge(r: &Rolling, fleet: &mut [ReplicaFacts]) {
        for rep in fleet.iter_mut() {
            rep.serving =
                [shoal_api::VersionKey::parse("m", r.assignment(&rep.id)).unwrap()].into();
        }
    }

    #[test]
    fn holds_while_more_replicas_are_down_than_allowed() {
        let mut fleet = vec![
            replica("a", &["1"]),
            replica("b", &["1"]),
            replica("c", &["1"]),
            replica("d", &["1"]),
        ];
        let mut r =
            Rolling::start(Some("1".into()), "2".into(), 1, 0).with_max_unavailable(Some(1));
        let tick = |r: &mut Rolling, fleet: &[ReplicaFacts], now| {
            r.tick("m", &fleet.iter().collect::<Vec<_>>(), now)
        };
        assert_eq!(tick(&mut r, &fleet, 1), Decision::Changed);
        assert_eq!(r.progress.reason, "step 1: moving a to 2");
        converge(&r, &mut fleet);
        // a crashes with the new version; one down is within the budget.
        fleet[0].alive = false;
        assert_eq!(tick(&mut r, &fleet, 2), Decision::Changed);
        assert_eq!(r.progress.reason, "step 2: moving b to 2");
        converge(&r, &mut fleet);
        fleet[1].alive = false;
        // Two down: hold, and say so once.
        assert_eq!(tick(&mut r, &fleet, 3), Decision::Changed);
        assert_eq!(r.progress.state, RolloutState::Holding);
        assert_eq!(
            r.progress.reason,
            "holding at step 2: 2 down (a, b), more than max unavailable 1; moving on when they return"
        );
        assert_eq!(tick(&mut r, &fleet, 4), Decision::Unchanged);
        assert_eq!(r.assignment("c"), "1", "nothing more moves");
        // They come back: the rollout moves on.
        fleet[0].alive = true;
        fleet[1].alive = true;
        assert_eq!(tick(&mut r, &fleet, 5), Decision::Changed);
        assert_eq!(r.progress.state, RolloutState::Progressing);
        assert_eq!(r.progress.reason, "step 3: moving c to 2");
        // Without a budget, dead replicas never block.
        let mut free = Rolling::start(Some("1".into()), "2".into(), 1, 0);
        let mut all_down = fleet.clone();
        all_down.iter_mut().skip(1).for_each(|f| f.alive = false);
        assert_eq!(tick(&mut free, &all_down, 1), Decision::Changed);
        assert_eq!(free.progress.state, RolloutState::Progressing);
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(serde_json::from_value::<Rolling>(json).unwrap(), r);
    }

    #[test]
    fn moves_one_batch_at_a_time_and_waits_for_each() {
        let mut fleet = vec![
            replica("a", &["1"]),
            replica("b", &["1"]),
            replica("c", &["1"]),
        ];
        let mut r = Rolling::start(Some("1".into()), "2".into(), 2, 0);
        let refs = |f: &[ReplicaFacts]| f.to_vec();

        let snapshot = refs(&fleet);
        assert_eq!(
            r.tick("m", &snapshot.iter().collect::<Vec<_>>(), 1),
            Decision::Changed
        );
        assert_eq!(r.progress.reason, "step 1: moving a, b to 2");
        assert_eq!((r.assignment("a"), r.assignment("c")), ("2", "1"));

        // Not converged yet: hold, and say who is awaited.
        assert_eq!(
            r.tick("m", &snapshot.iter().collect::<Vec<_>>(), 2),
            Decision::Unchanged
        );
        assert_eq!(
            r.progress.reason,
            "step 1: waiting for a, b to load and warm 2"
        );
        assert_eq!((r.assignment("a"), r.assignment("c")), ("2", "1"));

        converge(&r, &mut fleet);
        let snapshot = refs(&fleet);
        assert_eq!(
            r.tick("m", &snapshot.iter().collect::<Vec<_>>(), 4),
            Decision::Changed
        );
        assert_eq!(r.progress.reason, "step 2: moving c to 2");
        converge(&r, &mut fleet);
        let snapshot = refs(&fleet);
        assert_eq!(
            r.tick("m", &snapshot.iter().collect::<Vec<_>>(), 5),
            Decision::Promoted
        );
        assert_eq!(r.progress.state, RolloutState::Promoted);
        assert_eq!(r.progress.reason, "all 3 live replicas serve 2");
        assert_eq!(
            r.tick("m", &snapshot.iter().collect::<Vec<_>>(), 6),
            Decision::Unchanged
        );
        let view = r.view("m", &snapshot.iter().collect::<Vec<_>>());
        assert_eq!(
            (view.replicas_done, view.replicas_total, view.step),
            (3, 3, 2)
        );
        assert_eq!(view.weights, [("2".to_owned(), 100)].into());
    }

    #[test]
    fn dead_replicas_do_not_block_and_are_moved_when_back() {
        let mut fleet = vec![replica("a", &["1"]), replica("b", &["1"])];
        fleet[1].alive = false;
        let mut r = Rolling::start(Some("1".into()), "2".into(), 1, 0);
        let all = |f: &[ReplicaFacts]| f.to_vec();
        let s = all(&fleet);
        assert_eq!(
            r.tick("m", &s.iter().collect::<Vec<_>>(), 1),
            Decision::Changed
        );
        converge(&r, &mut fleet[..1]);
        let s = all(&fleet);
        assert_eq!(
            r.tick("m", &s.iter().collect::<Vec<_>>(), 2),
            Decision::Promoted
        );
        // b, back after promotion, is assigned the new version.
        assert_eq!((r.assignment("a"), r.assignment("b")), ("2", "2"));
    }

    #[test]
    fn first_deployment_loads_everywhere_at_once() {
        let fleet = [replica("a", &[]), replica("b", &[])];
        let mut r = Rolling::start(None, "1".into(), 1, 0);
        assert_eq!((r.assignment("a"), r.assignment("b")), ("1", "1"));
        let refs: Vec<&ReplicaFacts> = fleet.iter().collect();
        assert_eq!(r.tick("m", &refs, 1), Decision::Unchanged);
        assert!(r.progress.reason.contains("waiting for a, b"));
    }

    #[test]
    fn an_empty_fleet_promotes_at_once() {
        let mut r = Rolling::start(Some("1".into()), "2".into(), 1, 0);
        assert_eq!(r.tick("m", &[], 1), Decision::Promoted);
        assert!(r.progress.reason.starts_with("no live replica"));
    }

    #[test]
    fn abort_sends_everyone_back_and_survives_a_restart() {
        let fleet = [replica("a", &["1"])];
        let mut r = Rolling::start(Some("1".into()), "2".into(), 1, 0);
        r.tick("m", &fleet.iter().collect::<Vec<_>>(), 1);
        assert_eq!(r.assignment("a"), "2");
        r.progress.abort("operator abort".into(), 2);
        assert_eq!(r.assignment("a"), "1");
        // The snapshot round-trips through the registry unchanged.
        let json = serde_json::to_value(&r).unwrap();
        let back: Rolling = serde_json::from_value(json).unwrap();
        assert_eq!(back, r);
        let mut back = back;
        assert_eq!(
            back.tick("m", &fleet.iter().collect::<Vec<_>>(), 3),
            Decision::Unchanged
        );
    }
}

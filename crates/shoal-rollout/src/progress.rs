//! What every rollout controller records about where it stands — its
//! state, why the last decision was taken, when it started and when it last
//! decided — and the part of the view users see that follows from it.
//! Each controller embeds one [`Progress`] flattened, so the stored JSON
//! keeps these as the controller's own fields.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use shoal_api::deploy::{RolloutState, RolloutView, Strategy};

/// Where a rollout stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    /// Where it stands.
    pub state: RolloutState,
    /// Why the last decision was taken.
    pub reason: String,
    /// Started (ms).
    pub started_at: i64,
    /// Last decision (ms).
    pub updated_at: i64,
}

impl Progress {
    /// A rollout starting now, progressing, for `reason`.
    pub fn start(reason: String, now: i64) -> Progress {
        Progress {
            state: RolloutState::Progressing,
            reason,
            started_at: now,
            updated_at: now,
        }
    }

    /// A decision taken now: the new state and why.
    pub fn decide(&mut self, state: RolloutState, reason: String, now: i64) {
        self.state = state;
        self.reason = reason;
        self.updated_at = now;
    }

    /// An operator's abort.
    pub fn abort(&mut self, reason: String, now: i64) {
        self.decide(RolloutState::Aborted, reason, now);
    }

    /// The view of a rollout from `from` to `to` with these `weights`; the
    /// controller fills in its step, replica counts and evidence.
    pub fn view(
        &self,
        strategy: Strategy,
        from: Option<String>,
        to: String,
        weights: BTreeMap<String, u32>,
    ) -> RolloutView {
        RolloutView {
            strategy,
            state: self.state,
            from,
            to,
            step: 0,
            weights,
            reason: self.reason.clone(),
            replicas_done: 0,
            replicas_total: 0,
            started_at: self.started_at,
            updated_at: self.updated_at,
            shadow: None,
            arms: Vec::new(),
            significant: None,
        }
    }
}

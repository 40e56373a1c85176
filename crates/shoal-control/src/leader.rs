//! Leadership: several control planes on one registry, one leader.
//!
//! Every member campaigns for the registry's leader lease every fifth of
//! its time to live ([`run`]): the holder renews it in the same term, any
//! member takes a lapsed one in the next term. Only the member that holds a
//! live lease runs the rollout controller, and it makes every controller
//! write under its [`Fence`] (holder and term), which the registry checks
//! in the write's own transaction: a deposed leader's late writes are
//! refused, never applied. A member stops acting as leader on its own
//! clock before the lease can lapse on the database's (it counts the time
//! to live from before it asked), so two leaders never act at once even
//! before fencing is needed.
//!
//! Members that share the registry also follow each other: new revisions
//! arrive by the registry's change feed (PostgreSQL `LISTEN/NOTIFY`, with
//! a slow poll beside it), and the heartbeats and gateway reports each
//! member receives are stored for the others ([`share_heartbeats`]), so
//! the leader plans with the whole fleet whichever member a replica or a
//! gateway talks to.

use std::sync::Arc;
use std::time::Duration;

use shoal_api::fleet::{Heartbeat, Leadership};
use shoal_registry::Fence;
use tokio::time::Instant;

use crate::Control;

/// What this member knows of its own leadership.
#[derive(Debug, Clone, Default)]
pub(crate) struct LeaderState {
    /// The term of the lease as last seen.
    pub term: u64,
    /// Until when this member may act as leader; `None`: it may not.
    pub until: Option<Instant>,
}

impl LeaderState {
    /// The fence to write under, while this member may lead.
    pub(crate) fn fence(&self, id: &str) -> Option<Fence> {
        self.until
            .is_some_and(|until| Instant::now() < until)
            .then(|| Fence {
                holder: id.to_owned(),
                term: self.term,
            })
    }
}

impl Control {
    /// This member's id.
    pub fn member_id(&self) -> &str {
        &self.member.id
    }

    /// The fence for controller writes while this member leads; `None`
    /// when it does not.
    pub fn fence(&self) -> Option<Fence> {
        self.leader.borrow().fence(&self.member.id)
    }

    /// True while this member leads.
    pub fn is_leader(&self) -> bool {
        self.fence().is_some()
    }

    /// Stops acting as leader at once (a write was fenced: another member
    /// holds the lease).
    pub(crate) fn step_down(&self) {
        self.leader.send_modify(|s| s.until = None);
    }

    /// Who leads, and the members seen within three lease times.
    pub async fn leadership(&self) -> anyhow::Result<Leadership> {
        let (lease, members) = self.store.leadership(self.config.lease_ttl * 3).await?;
        let live = lease.expires_in_ms > 0 && !lease.holder.is_empty();
        Ok(Leadership {
            leader: live.then(|| lease.holder.clone()),
            address: live.then(|| lease.address.clone()),
            term: lease.term,
            members,
        })
    }

    /// Hands the lease over at once if this member holds it (on a clean
    /// shutdown).
    pub async fn resign(&self) {
        self.step_down();
        if let Err(e) = self
            .store
            .resign(&self.member.id, &self.member.incarnation)
            .await
        {
            tracing::warn!(error = %e, "could not hand the leader lease over; it lapses by itself");
        }
    }
}

/// How often a member campaigns: a fifth of the lease's time to live.
fn campaign_every(ttl: Duration) -> Duration {
    (ttl / 5).max(Duration::from_millis(20))
}

/// Campaigns for the lease until the task is aborted.
pub(crate) async fn run(control: Arc<Control>) {
    let mut interval = tokio::time::interval(campaign_every(control.config.lease_ttl));
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        control.campaign().await;
    }
}

impl Control {
    /// Campaigns for the leader lease once (renewing it when held); true
    /// when this member leads afterwards. The control plane's own task
    /// does this five times per lease; tests driving a `Control` by hand
    /// call it before [`Control::tick`].
    pub async fn campaign(&self) -> bool {
        let ttl = self.config.lease_ttl;
        let asked = Instant::now();
        let member = &self.member;
        let lease = match self
            .store
            .campaign(&member.id, &member.incarnation, &member.address, ttl)
            .await
        {
            Ok(lease) => lease,
            // A lease held runs out on its own: `fence` checks the
            // deadline on every use.
            Err(e) => {
                tracing::warn!(error = %e, "campaign for the leader lease failed");
                return self.is_leader();
            }
        };
        let was = self.leader.borrow().fence(&member.id);
        self.metrics
            .term
            .set(i64::try_from(lease.term).unwrap_or(i64::MAX));
        if !lease.held_by(&member.id, &member.incarnation) {
            self.leader.send_replace(LeaderState {
                term: lease.term,
                until: None,
            });
            self.metrics.leader.set(0);
            if was.is_some() {
                tracing::warn!(id = %member.id, leader = %lease.holder, term = lease.term, "no longer leading the control plane");
            }
            return false;
        }
        // The lease runs from when the database renewed it, which is after
        // `asked`: counting from `asked` ends first.
        let left = Duration::from_millis(u64::try_from(lease.expires_in_ms).unwrap_or(0));
        self.leader.send_replace(LeaderState {
            term: lease.term,
            until: Some(asked + left.min(ttl)),
        });
        self.metrics.leader.set(1);
        if was.is_none_or(|f| f.term != lease.term) {
            tracing::info!(id = %member.id, term = lease.term, "leading the control plane");
            // The leader's first act: on the record, under its fence.
            let fence = self.fence();
            let audit = shoal_registry::Audit::by(
                member.id.clone(),
                format!(
                    "{} leads the control plane in term {}",
                    member.id, lease.term
                ),
            );
            if let Err(e) = self
                .store
                .note("leader.elected", &member.id, fence.as_ref(), audit)
                .await
            {
                tracing::warn!(error = %e, "could not record taking the lead");
                if matches!(e, shoal_registry::RegistryError::Fenced(_)) {
                    self.step_down();
                    return false;
                }
            }
            // Re-read what the previous leader wrote before acting.
            if let Err(e) = self.refresh().await {
                tracing::warn!(error = %e, "refresh on taking the lead failed");
            }
            self.kick();
        }
        true
    }
}

/// Follows revisions other members commit: the registry's change feed when
/// it has one, and a poll every `every` in any case (a notification lost
/// with a dropped connection is caught up).
pub(crate) async fn follow(control: Arc<Control>, every: Duration) {
    use futures::StreamExt;
    let mut changes = None;
    let mut poll = tokio::time::interval(every);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut attempt = 0;
    loop {
        if changes.is_none() {
            match control.store.changes().await {
                Ok(feed) => {
                    changes = feed;
                    attempt = 0;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot listen for registry changes; polling");
                    attempt += 1;
                }
            }
        }
        let heard = match changes.as_mut() {
            Some(feed) => tokio::select! {
                item = feed.next() => match item {
                    Some(Ok(revision)) => revision > control.revision(),
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "registry change feed failed; reconnecting");
                        changes = None;
                        true
                    }
                    None => {
                        changes = None;
                        true
                    }
                },
                _ = poll.tick() => true,
            },
            None => {
                tokio::time::sleep(shoal_client::reconnect_backoff(attempt).min(every)).await;
                true
            }
        };
        if heard {
            let before = control.revision();
            if let Err(e) = control.refresh().await {
                tracing::warn!(error = %e, "cannot re-read the registry");
            } else if control.revision() > before {
                control.kick();
                control.fleet_changed();
            }
        }
    }
}

/// Where a gateway's reports are kept among replicas' heartbeats: names
/// never contain `/`, so the two never meet.
const GATEWAY: &str = "gateway/";

/// Stores replica `id`'s heartbeat for the other members (when the
/// registry is shared).
pub(crate) async fn publish_heartbeat(control: &Control, id: &str, report: &Heartbeat) {
    publish(control, id, report).await;
}

/// Stores gateway `id`'s report for the other members.
pub(crate) async fn publish_gateway_report(
    control: &Control,
    id: &str,
    report: &shoal_api::traffic::GatewayReport,
) {
    publish(control, &format!("{GATEWAY}{id}"), report).await;
}

async fn publish(control: &Control, key: &str, report: &impl serde::Serialize) {
    if !control.store.shared() {
        return;
    }
    let body = serde_json::to_string(report).unwrap_or_default();
    if let Err(e) = control.store.put_heartbeat(key, &body).await {
        tracing::warn!(from = %key, error = %e, "cannot share a report with the other members");
    }
}

/// Merges the heartbeats other members stored into this member's view of
/// the fleet, every `every`.
pub(crate) async fn share_heartbeats(control: Arc<Control>, every: Duration) {
    let mut after = 0;
    let mut interval = tokio::time::interval(every);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        let rows = match control.store.heartbeats_after(after).await {
            Ok(rows) => rows,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the other members' heartbeats");
                continue;
            }
        };
        let mut changed = false;
        for row in rows {
            after = after.max(row.seq);
            let age = Duration::from_millis(u64::try_from(row.age_ms).unwrap_or(0));
            if let Some(gateway) = row.replica.strip_prefix(GATEWAY) {
                match serde_json::from_str(&row.body) {
                    Ok(report) => control.traffic.merge(gateway, report, age),
                    Err(_) => tracing::warn!(%gateway, "unreadable shared gateway report; skipped"),
                }
                continue;
            }
            let Ok(report) = serde_json::from_str::<Heartbeat>(&row.body) else {
                tracing::warn!(replica = %row.replica, "unreadable shared heartbeat; skipped");
                continue;
            };
            changed |= control.live.merge(&row.replica, report, age);
        }
        if changed {
            control.kick();
            control.fleet_changed();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_member_leads_only_until_its_lease_would_lapse() {
        let state = LeaderState {
            term: 7,
            until: Some(Instant::now() + Duration::from_secs(2)),
        };
        assert_eq!(
            state.fence("a"),
            Some(Fence {
                holder: "a".into(),
                term: 7
            })
        );
        tokio::time::advance(Duration::from_millis(1999)).await;
        assert!(state.fence("a").is_some());
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(state.fence("a"), None);
        assert_eq!(LeaderState::default().fence("a"), None);
    }

    #[test]
    fn campaigns_run_five_times_per_lease() {
        assert_eq!(
            campaign_every(Duration::from_secs(2)),
            Duration::from_millis(400)
        );
        assert_eq!(campaign_every(Duration::ZERO), Duration::from_millis(20));
    }
}

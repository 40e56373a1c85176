//! Publishing model-update events on NATS JetStream (`--events
//! nats://…`): while this member leads, every replica's desired state (when
//! what it should serve changed, as its watch stream would send it) and
//! the routing table go out whenever they change — looked at on each new revision,
//! each change of the live fleet, and when this member takes the lead
//! (everything, once). Only the leader publishes, so a deploy made through
//! any member reaches replicas by one path. What failed to go out is tried
//! again on the next change or after two seconds.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use shoal_api::fleet::{DesiredState, RoutingTable};
use shoal_events::Events;

use crate::Control;

/// What this member published last, while it led in `term`.
#[derive(Debug, Default)]
struct Published {
    term: u64,
    desired: BTreeMap<String, DesiredState>,
    routing: Option<RoutingTable>,
}

/// Publishes until the task is aborted.
pub(crate) async fn run(control: Arc<Control>, events: Events) {
    let mut revisions = control.revision.subscribe();
    let mut fleet = control.fleet_changes.subscribe();
    let mut leadership = control.leader.subscribe();
    let mut retry = tokio::time::interval(Duration::from_secs(2));
    retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut published = Published::default();
    let mut stream_ready = false;
    loop {
        tokio::select! {
            _ = revisions.changed() => {}
            _ = fleet.changed() => {}
            _ = leadership.changed() => {}
            _ = retry.tick() => {}
        }
        let Some(fence) = control.fence() else {
            continue;
        };
        if fence.term != published.term {
            // A new term: publish everything once, whatever the last
            // leader did or did not get out.
            published = Published {
                term: fence.term,
                ..Published::default()
            };
        }
        if !stream_ready {
            match events.ensure_stream().await {
                Ok(()) => stream_ready = true,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot set up the event stream; retrying");
                    control.metrics.event(false);
                    continue;
                }
            }
        }
        if let Err(e) = publish_changes(&control, &events, &mut published).await {
            tracing::warn!(error = %e, "publishing events failed; retrying");
            control.metrics.event(false);
            stream_ready = false;
        }
    }
}

/// Publishes what changed since `published`.
async fn publish_changes(
    control: &Control,
    events: &Events,
    published: &mut Published,
) -> Result<(), shoal_events::EventError> {
    let registrations = control.snapshot().registrations.clone();
    // One set of facts for every replica's state (not one per replica).
    let facts = control.placement_facts();
    let changed: Vec<(String, DesiredState)> = registrations
        .iter()
        .map(|r| {
            let id = &r.registration.id;
            (id.clone(), shoal_rollout::plan::desired_state(&facts, id))
        })
        .filter(|(id, state)| {
            // What a replica serves, not the revision, decides whether it
            // hears again (as on its watch stream).
            published
                .desired
                .get(id)
                .is_none_or(|p| p.models != state.models || p.peers != state.peers)
        })
        .collect();
    let (stored, result) = events.publish_desired_all(&changed).await;
    for (id, state) in changed.into_iter().take(stored) {
        control.metrics.event(true);
        published.desired.insert(id, state);
    }
    result?;
    published
        .desired
        .retain(|id, _| registrations.iter().any(|r| &r.registration.id == id));
    let table = control.routing_table();
    if published.routing.as_ref() != Some(&table) {
        events.publish_routing(&table).await?;
        control.metrics.event(true);
        published.routing = Some(table);
    }
    Ok(())
}

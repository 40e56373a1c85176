//! Which replicas load a model that should run on N of them.
//!
//! Placement is sticky: a replica keeps a model while it is available, so
//! placements move only when a replica dies or drains, or the count
//! changes. New placements go to the region with the fewest copies of the
//! model, then to the replica with the least memory taken by placed
//! models (as replicas measured it), standbys last. A model may ask for a
//! minimum on on-demand capacity: spot replicas are then picked only
//! beyond it, and a spot replica holding an on-demand place is swapped
//! out once an on-demand one serves the model.
//!
//! Copies leave newest first (by registration), so the replicas an
//! autoscaler added last are the first freed.
//!
//! A copy that would leave never leaves while another copy of the model
//! is still loading (unless it is itself not serving): the model never has
//! fewer serving copies because placement moved.

use std::collections::{BTreeMap, BTreeSet};

use shoal_api::scale::Tier;

/// A replica as placement sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Candidate {
    /// Id.
    pub id: String,
    /// Region.
    pub region: String,
    /// Capacity kind.
    pub tier: Tier,
    /// A standby replica: placed on last.
    pub standby: bool,
    /// Alive and not draining: may hold placements.
    pub available: bool,
    /// When it first registered (ms): the newest copies leave first, as a
    /// StatefulSet removes its highest ordinals (so an autoscaler that
    /// stops the replicas it added last finds them free).
    pub registered_at: i64,
    /// Models it serves now.
    pub serving: BTreeSet<String>,
}

/// What one model needs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Need {
    /// Model.
    pub model: String,
    /// Replicas wanted.
    pub replicas: u32,
    /// Of them, at least this many on on-demand capacity (when there are).
    pub min_on_demand: u32,
    /// Memory one loaded copy takes, as measured (0: unknown).
    pub bytes: u64,
    /// Regions it may be served in (data residency); `None`: any.
    pub regions: Option<Vec<String>>,
    /// Where it is placed now.
    pub current: Vec<String>,
}

/// Places every model on the candidates; answers each model's placement
/// (replica ids, sorted). Models are placed largest first, each seeing
/// the memory the ones before it took.
pub fn place(needs: &[Need], candidates: &[Candidate]) -> BTreeMap<String, Vec<String>> {
    let mut memory: BTreeMap<&str, u64> = candidates.iter().map(|c| (c.id.as_str(), 0)).collect();
    for need in needs {
        for id in &need.current {
            if let Some(m) = memory.get_mut(id.as_str()) {
                *m += need.bytes;
            }
        }
    }
    let mut order: Vec<&Need> = needs.iter().collect();
    order.sort_by(|a, b| b.bytes.cmp(&a.bytes).then(a.model.cmp(&b.model)));
    let mut placed = BTreeMap::new();
    for need in order {
        for id in &need.current {
            if let Some(m) = memory.get_mut(id.as_str()) {
                *m -= need.bytes;
            }
        }
        let ids = place_one(need, candidates, &memory);
        for id in &ids {
            if let Some(m) = memory.get_mut(id.as_str()) {
                *m += need.bytes;
            }
        }
        placed.insert(need.model.clone(), ids);
    }
    placed
}

fn place_one(need: &Need, candidates: &[Candidate], memory: &BTreeMap<&str, u64>) -> Vec<String> {
    let eligible: Vec<&Candidate> = candidates
        .iter()
        .filter(|c| c.available)
        .filter(|c| {
            need.regions
                .as_ref()
                .is_none_or(|regions| regions.contains(&c.region))
        })
        .collect();
    let target = (need.replicas as usize).min(eligible.len());
    let on_demand_there = eligible.iter().filter(|c| c.tier == Tier::OnDemand).count();
    let want_on_demand = (need.min_on_demand as usize)
        .min(target)
        .min(on_demand_there);
    let mut keep: Vec<&Candidate> = Vec::new();
    for id in &need.current {
        if let Some(c) = eligible.iter().find(|c| &c.id == id)
            && !keep.iter().any(|k| k.id == c.id)
        {
            keep.push(c);
        }
    }
    let on_demand = |keep: &[&Candidate]| keep.iter().filter(|c| c.tier == Tier::OnDemand).count();
    let serves = |c: &Candidate| c.serving.contains(&need.model);
    let per_region =
        |keep: &[&Candidate], region: &str| keep.iter().filter(|c| c.region == region).count();
    let mem = |c: &Candidate| memory.get(c.id.as_str()).copied().unwrap_or(0);

    // The best replica to add: on-demand first while short of the
    // minimum, then the region with the fewest copies, then the least
    // memory, standbys last.
    let best = |keep: &[&Candidate], only_on_demand: bool| -> Option<&Candidate> {
        let short = on_demand(keep) < want_on_demand;
        eligible
            .iter()
            .copied()
            .filter(|c| !keep.iter().any(|k| k.id == c.id))
            .filter(|c| !only_on_demand || c.tier == Tier::OnDemand)
            .min_by_key(|c| {
                (
                    short && c.tier == Tier::Spot,
                    c.standby,
                    per_region(keep, &c.region),
                    mem(c),
                    c.id.as_str(),
                )
            })
    };
    // Grow to the target.
    while keep.len() < target {
        let Some(c) = best(&keep, false) else {
            break;
        };
        keep.push(c);
    }
    // At the target but short of on-demand copies: bring one in beside a
    // spot copy, which leaves once the on-demand one serves.
    while on_demand(&keep) < want_on_demand {
        let Some(c) = best(&keep, true) else {
            break;
        };
        keep.push(c);
    }
    // Shrink to the target: copies not serving go first; a serving copy
    // leaves only once every other copy serves; never below the
    // on-demand minimum.
    while keep.len() > target {
        let removable: Vec<usize> = (0..keep.len())
            .filter(|&i| keep[i].tier == Tier::Spot || on_demand(&keep) > want_on_demand)
            .collect();
        let idle: Option<usize> = removable
            .iter()
            .copied()
            .filter(|&i| !serves(keep[i]))
            .max_by_key(|&i| {
                (
                    keep[i].standby,
                    keep[i].registered_at,
                    mem(keep[i]),
                    keep[i].id.as_str(),
                )
            });
        let victim = match idle {
            Some(i) => i,
            None if keep.iter().any(|c| !serves(c)) => break,
            None => match removable.iter().copied().max_by_key(|&i| {
                (
                    keep[i].standby,
                    keep[i].tier == Tier::Spot,
                    per_region(&keep, &keep[i].region),
                    keep[i].registered_at,
                    mem(keep[i]),
                    keep[i].id.as_str(),
                )
            }) {
                Some(i) => i,
                None => break,
            },
        };
        keep.remove(victim);
    }
    let mut ids: Vec<String> = keep.into_iter().map(|c| c.id.clone()).collect();
    ids.sort();
    ids
}

#[cfg(test)]
mod tests {
    use super::*;

    fn replica(id: &str, region: &str, tier: Tier) -> Candidate {
        Candidate {
            id: id.into(),
            region: region.into(),
            tier,
            standby: false,
            available: true,
            registered_at: 0,
            serving: BTreeSet::new(),
        }
    }

    fn need(model: &str, replicas: u32, current: &[&str]) -> Need {
        Need {
            model: model.into(),
            replicas,
            current: current.iter().map(|s| s.to_string()).collect(),
            ..Need::default()
        }
    }

    impl Need {
        fn with_on_demand(mut self, n: u32) -> Need {
            self.min_on_demand = n;
            self
        }
    }

    fn serving(mut c: Candidate, model: &str) -> Candidate {
        c.serving.insert(model.into());
        c
    }

    fn check(needs: &[Need], fleet: &[Candidate], expected: &[(&str, &[&str])]) {
        let got = place(needs, fleet);
        let expected: BTreeMap<String, Vec<String>> = expected
            .iter()
            .map(|(m, ids)| (m.to_string(), ids.iter().map(|s| s.to_string()).collect()))
            .collect();
        assert_eq!(got, expected);
    }

    #[test]
    fn new_placements_spread_over_regions_first() {
        let fleet = [
            replica("a1", "us", Tier::OnDemand),
            replica("a2", "us", Tier::OnDemand),
            replica("b1", "eu", Tier::OnDemand),
            replica("b2", "eu", Tier::OnDemand),
        ];
        check(
            &[need("digits", 2, &[])],
            &fleet,
            &[("digits", &["a1", "b1"])],
        );
        check(
            &[need("digits", 3, &[])],
            &fleet,
            &[("digits", &["a1", "a2", "b1"])],
        );
        // More than there are: every available replica.
        check(
            &[need("digits", 9, &[])],
            &fleet,
            &[("digits", &["a1", "a2", "b1", "b2"])],
        );
    }

    #[test]
    fn placement_is_sticky_and_moves_only_off_dead_replicas() {
        let mut fleet = vec![
            replica("r0", "us", Tier::OnDemand),
            replica("r1", "us", Tier::OnDemand),
            replica("r2", "us", Tier::OnDemand),
        ];
        check(
            &[need("m", 2, &["r1", "r2"])],
            &fleet,
            &[("m", &["r1", "r2"])],
        );
        fleet[2].available = false;
        check(
            &[need("m", 2, &["r1", "r2"])],
            &fleet,
            &[("m", &["r0", "r1"])],
        );
        // It comes back: the placement stays where it moved.
        fleet[2].available = true;
        check(
            &[need("m", 2, &["r0", "r1"])],
            &fleet,
            &[("m", &["r0", "r1"])],
        );
    }

    #[test]
    fn memory_balances_models_over_replicas() {
        let fleet = [
            replica("r0", "us", Tier::OnDemand),
            replica("r1", "us", Tier::OnDemand),
            replica("r2", "us", Tier::OnDemand),
        ];
        let big = Need {
            bytes: 900,
            ..need("big", 1, &["r0"])
        };
        let small = Need {
            bytes: 10,
            ..need("small", 2, &[])
        };
        // `small` avoids r0, which holds `big`.
        check(
            &[small.clone(), big.clone()],
            &fleet,
            &[("big", &["r0"]), ("small", &["r1", "r2"])],
        );
        // Two new models of one size go to different replicas.
        let a = Need {
            bytes: 100,
            ..need("a", 1, &[])
        };
        let b = Need {
            bytes: 100,
            ..need("b", 1, &[])
        };
        check(
            &[a, b, big],
            &fleet,
            &[("a", &["r1"]), ("b", &["r2"]), ("big", &["r0"])],
        );
    }

    #[test]
    fn scaling_down_keeps_serving_copies_and_one_per_region_longest() {
        let fleet = [
            serving(replica("a1", "us", Tier::OnDemand), "m"),
            serving(replica("a2", "us", Tier::OnDemand), "m"),
            serving(replica("b1", "eu", Tier::OnDemand), "m"),
            replica("b2", "eu", Tier::OnDemand),
        ];
        // b2 has not loaded it yet: it goes first; then the crowded region.
        check(
            &[need("m", 2, &["a1", "a2", "b1", "b2"])],
            &fleet,
            &[("m", &["a1", "b1"])],
        );
    }

    #[test]
    fn the_newest_copies_leave_first() {
        let mut fleet: Vec<Candidate> = ["r0", "r1", "r2", "r3"]
            .iter()
            .map(|id| serving(replica(id, "us", Tier::OnDemand), "m"))
            .collect();
        // r0 registered last (an autoscaler added it), r3 first.
        for (i, c) in fleet.iter_mut().enumerate() {
            c.registered_at = 100 - i as i64;
        }
        check(
            &[need("m", 1, &["r0", "r1", "r2", "r3"])],
            &fleet,
            &[("m", &["r3"])],
        );
    }

    #[test]
    fn a_serving_copy_waits_for_its_replacement_to_load() {
        // r0 serves; r1 was just added by an on-demand swap and loads.
        let fleet = [
            serving(replica("r0", "us", Tier::Spot), "m"),
            replica("r1", "us", Tier::OnDemand),
        ];
        let mut n = need("m", 1, &["r0", "r1"]);
        n.min_on_demand = 1;
        check(&[n.clone()], &fleet, &[("m", &["r0", "r1"])]);
        // Once r1 serves, the spot copy leaves.
        let fleet = [
            serving(replica("r0", "us", Tier::Spot), "m"),
            serving(replica("r1", "us", Tier::OnDemand), "m"),
        ];
        check(&[n], &fleet, &[("m", &["r1"])]);
    }

    #[test]
    fn the_on_demand_minimum_is_honoured_and_spot_fills_the_rest() {
        let fleet = [
            replica("d0", "us", Tier::OnDemand),
            replica("d1", "us", Tier::OnDemand),
            replica("s0", "us", Tier::Spot),
            replica("s1", "us", Tier::Spot),
        ];
        let mut n = need("m", 3, &["s0", "s1"]);
        n.min_on_demand = 1;
        check(&[n.clone()], &fleet, &[("m", &["d0", "s0", "s1"])]);
        // Already full of spot copies: an on-demand one joins them, and
        // one spot copy leaves — at once when it serves nothing yet…
        let mut n = need("m", 2, &["s0", "s1"]);
        n.min_on_demand = 1;
        check(&[n.clone()], &fleet, &[("m", &["d0", "s0"])]);
        // …otherwise once the on-demand copy serves.
        let serving_spot = [
            fleet[0].clone(),
            fleet[1].clone(),
            serving(fleet[2].clone(), "m"),
            serving(fleet[3].clone(), "m"),
        ];
        check(&[n.clone()], &serving_spot, &[("m", &["d0", "s0", "s1"])]);
        let all_serving = serving_spot.clone().map(|c| serving(c, "m"));
        check(
            &[need("m", 2, &["d0", "s0", "s1"]).with_on_demand(1)],
            &all_serving,
            &[("m", &["d0", "s0"])],
        );
        // No on-demand replica at all: spot is better than nothing.
        let spot_only = [replica("s0", "us", Tier::Spot)];
        let mut n = need("m", 1, &[]);
        n.min_on_demand = 1;
        check(&[n], &spot_only, &[("m", &["s0"])]);
    }

    #[test]
    fn data_residency_limits_candidates_and_standbys_come_last() {
        let mut standby = replica("a0", "us", Tier::OnDemand);
        standby.standby = true;
        let fleet = [
            standby,
            replica("a1", "us", Tier::OnDemand),
            replica("b1", "eu", Tier::OnDemand),
        ];
        let mut n = need("m", 2, &[]);
        n.regions = Some(vec!["us".into()]);
        check(&[n.clone()], &fleet, &[("m", &["a0", "a1"])]);
        n.replicas = 1;
        check(&[n], &fleet, &[("m", &["a1"])]);
    }
}

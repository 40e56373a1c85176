//! The routing state and the choice of version and replica per request.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use arc_swap::ArcSwap;
use rand::Rng;
use shoal_api::VersionKey;
use shoal_api::fleet::{ModelPolicy, RoutingTable};
use shoal_balance::ewma::PeakEwma;
use shoal_balance::health::{Failure, Health, HealthPolicy};
use shoal_balance::pick::{Candidate, p2c_by};

/// Latency assumed for an endpoint before it has answered anything.
const INITIAL_LATENCY: Duration = Duration::from_millis(1);
/// How fast latency peaks are forgotten.
const DECAY: Duration = Duration::from_secs(10);

/// One replica as the gateway sees it.
#[derive(Debug)]
pub struct Endpoint {
    /// Replica id.
    pub id: String,
    /// `host:port`.
    pub address: String,
    /// Region.
    pub region: String,
    /// A standby: a candidate only while its region is short of active
    /// replicas (see [`Routes::candidates`]).
    pub standby: bool,
    serving: RwLock<Arc<BTreeSet<VersionKey>>>,
    routable: AtomicBool,
    checked: AtomicBool,
    load: Mutex<PeakEwma>,
    outstanding: AtomicU32,
    health: Mutex<Health>,
    /// Health of each `model:version` on this endpoint: a model version that
    /// answers 5xx is ejected from this endpoint alone, while the endpoint
    /// keeps serving its other versions.
    version_health: Mutex<hashbrown::HashMap<VersionKey, Health>>,
    /// The id as a header value (`x-shoal-replica` on its answers).
    pub(crate) id_header: Option<http::HeaderValue>,
    /// Its address and idle connections, for forwarded requests.
    pub(crate) upstream: crate::upstream::Upstream,
}

impl Endpoint {
    fn new(
        id: String,
        address: String,
        region: String,
        serving: BTreeSet<VersionKey>,
        routable: bool,
        now: Duration,
    ) -> Endpoint {
        Endpoint {
            id_header: http::HeaderValue::from_str(&id).ok(),
            upstream: crate::upstream::Upstream::new(&address),
            id,
            address,
            region,
            standby: false,
            serving: RwLock::new(Arc::new(serving)),
            routable: AtomicBool::new(routable),
            checked: AtomicBool::new(false),
            load: Mutex::new(PeakEwma::new(INITIAL_LATENCY, DECAY, now)),
            outstanding: AtomicU32::new(0),
            health: Mutex::new(Health::new()),
            version_health: Mutex::default(),
        }
    }

    /// True when it serves some version of `model`.
    pub(crate) fn serves_model(&self, model: &str) -> bool {
        self.serves(model, None)
    }

    /// True when it serves `version` of `model`.
    pub(crate) fn serves_version(&self, model: &str, version: &str) -> bool {
        self.serves(model, Some(version))
    }

    /// True when it serves `version` of `model`, or with no version any
    /// version of it. A scan without allocating: a replica serves a few
    /// versions, and this runs for every request.
    fn serves(&self, model: &str, version: Option<&str>) -> bool {
        let serving = self.serving.read().unwrap_or_else(PoisonError::into_inner);
        serving
            .iter()
            .any(|k| version.map_or(k.is_of(model), |v| k.is(model, v)))
    }

    /// Stops believing it serves `version` of `model` until the next health
    /// check or routing update says otherwise.
    pub(crate) fn forget(&self, model: &str, version: &str) {
        let mut serving = self.serving.write().unwrap_or_else(PoisonError::into_inner);
        let gone = |k: &VersionKey| k.is(model, version);
        if serving.iter().any(gone) {
            let mut next = BTreeSet::clone(&serving);
            next.retain(|k| !gone(k));
            *serving = Arc::new(next);
        }
    }

    /// Records what an active health check learnt.
    pub(crate) fn checked(&self, serving: BTreeSet<VersionKey>, routable: bool) {
        *self.serving.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(serving);
        self.routable.store(routable, Ordering::SeqCst);
        self.checked.store(true, Ordering::SeqCst);
    }

    /// True when it may receive traffic now.
    pub fn available(&self, now: Duration) -> bool {
        self.routable.load(Ordering::SeqCst)
            && !self
                .health
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .is_ejected(now)
    }

    /// True when it may receive traffic for `version` of `model` (or, with
    /// none, for any version) now. Versions rarely have a health record
    /// (only after a 5xx), so this scans a map that is almost always empty
    /// rather than build a key per request.
    pub fn available_for(&self, now: Duration, model: &str, version: Option<&str>) -> bool {
        self.available(now)
            && version.is_none_or(|v| {
                !self
                    .version_health
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .iter()
                    .any(|(k, h)| k.is(model, v) && h.is_ejected(now))
            })
    }

    /// Records a 5xx from version `key`; returns true when it ejected that
    /// version from this endpoint.
    pub(crate) fn version_failed(
        &self,
        key: &VersionKey,
        rtt: Duration,
        now: Duration,
        policy: &HealthPolicy,
    ) -> bool {
        self.load
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .observe(rtt, now);
        self.version_health
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(key.clone())
            .or_default()
            .on_failure(Failure::ServerError, now, policy)
    }

    /// Records a good answer from `version` of `model` (a scan of the
    /// versions that have failed here, usually none).
    pub(crate) fn version_succeeded(
        &self,
        model: &str,
        version: &str,
        now: Duration,
        policy: &HealthPolicy,
    ) {
        let mut map = self
            .version_health
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some((_, h)) = map.iter_mut().find(|(k, _)| k.is(model, version)) {
            h.on_success(now, policy);
        }
    }

    /// True while ejected.
    pub fn is_ejected(&self, now: Duration) -> bool {
        self.health
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_ejected(now)
    }

    fn candidate(&self, now: Duration, policy: &HealthPolicy) -> Candidate {
        Candidate {
            latency_ns: self
                .load
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .estimate_ns(now),
            outstanding: self.outstanding.load(Ordering::Relaxed),
            weight: self
                .health
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .weight(now, policy),
        }
    }

    /// Marks a request as started; the guard ends it.
    pub(crate) fn start(self: &Arc<Self>) -> InFlight {
        self.outstanding.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }

    /// Records a good answer after `rtt`.
    pub(crate) fn succeeded(&self, rtt: Duration, now: Duration, policy: &HealthPolicy) {
        self.load
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .observe(rtt, now);
        self.health
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .on_success(now, policy);
    }

    /// Records a failure; returns true when it ejected the endpoint.
    pub(crate) fn failed(
        &self,
        failure: Failure,
        rtt: Duration,
        now: Duration,
        policy: &HealthPolicy,
    ) -> bool {
        self.load
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .observe(rtt, now);
        self.health
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .on_failure(failure, now, policy)
    }
}

/// One request to an endpoint in flight; counted in its load until dropped.
pub(crate) struct InFlight(Arc<Endpoint>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.outstanding.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A consistent view of endpoints and policies.
#[derive(Debug, Default)]
pub struct RoutingState {
    /// Endpoints.
    pub endpoints: Vec<Arc<Endpoint>>,
    /// Policies by model.
    /// By model name (looked up on every request: a fast hasher; the
    /// names come from the control plane, not from callers).
    pub policies: hashbrown::HashMap<String, ModelPolicy>,
}

/// How to choose among healthy replicas.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Balance {
    /// Power of two choices over peak-EWMA latency and outstanding requests.
    #[default]
    PeakEwma,
    /// Each in turn (for comparison; it ignores load).
    RoundRobin,
}

/// The endpoints a request may go to, borrowed from the routing state
/// the request holds: inline for the few a model has (no allocation and
/// no reference counts touched per request).
pub type Candidates<'s> = smallvec::SmallVec<[&'s Arc<Endpoint>; 8]>;

/// The routing state, swapped atomically on every discovery update.
#[derive(Debug)]
pub struct Routes {
    region: String,
    policy: HealthPolicy,
    balance: Balance,
    next: AtomicU32,
    state: ArcSwap<RoutingState>,
    writer: Mutex<()>,
}

/// Regions with fewer active (not standby) replicas available now than
/// registered: where standbys stand in.
fn short_regions(state: &RoutingState, now: Duration) -> BTreeSet<&str> {
    let mut counts: HashMap<&str, (usize, usize)> = HashMap::new();
    for e in state.endpoints.iter().filter(|e| !e.standby) {
        let (registered, up) = counts.entry(e.region.as_str()).or_default();
        *registered += 1;
        *up += usize::from(e.available(now));
    }
    counts
        .into_iter()
        .filter(|(_, (registered, up))| up < registered)
        .map(|(region, _)| region)
        .collect()
}

/// Why no replica could be chosen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NoRoute {
    /// No endpoint serves the model at all.
    UnknownModel,
    /// Some serve it, none is available now.
    NoneAvailable,
}

impl Routes {
    /// Empty routes for a gateway in `region` with health `policy`.
    pub fn new(region: String, policy: HealthPolicy) -> Routes {
        Routes {
            region,
            policy,
            balance: Balance::PeakEwma,
            next: AtomicU32::new(0),
            state: ArcSwap::from_pointee(RoutingState::default()),
            writer: Mutex::new(()),
        }
    }

    /// Uses `balance` to choose among healthy replicas.
    pub(crate) fn with_balance(mut self, balance: Balance) -> Routes {
        self.balance = balance;
        self
    }

    /// The health policy.
    pub fn policy(&self) -> &HealthPolicy {
        &self.policy
    }

    /// The current state.
    pub fn snapshot(&self) -> Arc<RoutingState> {
        self.state.load_full()
    }

    /// Applies a routing table from the control plane, keeping the load and
    /// health history of endpoints that stay.
    pub fn apply(&self, table: &RoutingTable, now: Duration) {
        let _writer = self.writer.lock().unwrap_or_else(PoisonError::into_inner);
        let old = self.state.load();
        let endpoints = table
            .endpoints
            .iter()
            .map(|e| {
                let serving: BTreeSet<VersionKey> = e.serving.iter().cloned().collect();
                match old
                    .endpoints
                    .iter()
                    .find(|o| o.id == e.id && o.address == e.address && o.standby == e.standby)
                {
                    Some(existing) => {
                        // Health checks know better once they have run, but
                        // a version the replica reported loading since the
                        // last check is served already (replicas load before
                        // they report): add it now rather than wait for the
                        // next check. Removals wait for the check; a request
                        // that meets one is retried on another replica.
                        let mut current = existing
                            .serving
                            .write()
                            .unwrap_or_else(PoisonError::into_inner);
                        if !existing.checked.load(Ordering::SeqCst) {
                            *current = Arc::new(serving);
                            existing.routable.store(e.alive, Ordering::SeqCst);
                        } else if !serving.is_subset(&current) {
                            let mut union = (**current).clone();
                            union.extend(serving);
                            *current = Arc::new(union);
                        }
                        drop(current);
                        existing.clone()
                    }
                    None => Arc::new(Endpoint {
                        standby: e.standby,
                        ..Endpoint::new(
                            e.id.clone(),
                            e.address.clone(),
                            e.region.clone(),
                            serving,
                            e.alive,
                            now,
                        )
                    }),
                }
            })
            .collect();
        let policies = table
            .models
            .iter()
            .map(|p| (p.model.clone(), p.clone()))
            .collect();
        self.state.store(Arc::new(RoutingState {
            endpoints,
            policies,
        }));
    }

    /// Routes to a fixed list of replicas (no control plane): each starts
    /// unroutable until its first health check says what it serves.
    pub fn set_static(&self, addresses: &[String], now: Duration) {
        let _writer = self.writer.lock().unwrap_or_else(PoisonError::into_inner);
        let endpoints = addresses
            .iter()
            .map(|a| {
                Arc::new(Endpoint::new(
                    a.clone(),
                    a.clone(),
                    self.region.clone(),
                    BTreeSet::new(),
                    false,
                    now,
                ))
            })
            .collect();
        self.state.store(Arc::new(RoutingState {
            endpoints,
            policies: hashbrown::HashMap::new(),
        }));
    }

    /// The version for a request naming none: by the model's weights,
    /// keeping a user (split key) on one version; `None` when the model has
    /// no policy (static routing: the replica's default answers).
    pub fn choose_version(
        &self,
        state: &RoutingState,
        model: &str,
        split_key: Option<&str>,
        rng: &mut impl Rng,
    ) -> Option<String> {
        let policy = state.policies.get(model)?;
        let targets = policy
            .targets
            .iter()
            .map(|t| (t.version.as_str(), t.weight));
        shoal_balance::hash::split(targets, split_key, rng.random::<f64>()).map(str::to_owned)
    }

    /// Endpoints that may serve `model` (`version`, if given) now, minus
    /// `exclude`: those in this gateway's region when any is available
    /// there, else any region; never outside the model's pinned regions.
    /// Standbys stand in for missing actives: one is a candidate while its
    /// region has fewer active replicas available than registered (one
    /// died or was ejected), or when no active one can serve at all.
    pub fn candidates<'s>(
        &self,
        state: &'s RoutingState,
        model: &str,
        version: Option<&str>,
        exclude: &[String],
        now: Duration,
    ) -> Result<Candidates<'s>, NoRoute> {
        if state.endpoints.is_empty() && state.policies.is_empty() {
            // Nothing known yet (a first start before the control plane
            // answered): unavailable for now, not unknown.
            return Err(NoRoute::NoneAvailable);
        }
        let pinned = state.policies.get(model).and_then(|p| p.regions.as_ref());
        let serves = |e: &&Arc<Endpoint>| {
            e.serves(model, version) && pinned.is_none_or(|regions| regions.contains(&e.region))
        };
        // One list, filtered in place: this runs for every request.
        let mut any_serving = false;
        let mut available = Candidates::new();
        for e in state.endpoints.iter().filter(serves) {
            any_serving = true;
            if !exclude.contains(&e.id) && e.available_for(now, model, version) {
                available.push(e);
            }
        }
        if !any_serving {
            return Err(NoRoute::UnknownModel);
        }
        if available.is_empty() {
            // Panic mode (as Envoy does): when outlier detection has ejected
            // every replica that could serve, trust none of the ejections
            // rather than fail every request; retries still guard each one.
            available.extend(
                state
                    .endpoints
                    .iter()
                    .filter(serves)
                    .filter(|e| !exclude.contains(&e.id) && e.routable.load(Ordering::SeqCst)),
            );
        }
        if available.iter().any(|e| e.standby) {
            let short = short_regions(state, now);
            let standing_in = |e: &Arc<Endpoint>| !e.standby || short.contains(e.region.as_str());
            if available.iter().any(|e| standing_in(e)) {
                available.retain(|e| standing_in(e));
            }
        }
        let local = |e: &Arc<Endpoint>| e.region == self.region;
        if available.iter().any(|e| local(e)) {
            available.retain(|e| local(e));
        }
        if available.is_empty() {
            Err(NoRoute::NoneAvailable)
        } else {
            Ok(available)
        }
    }

    /// Picks one of `candidates`: by session key (rendezvous hashing) when
    /// given, else power of two choices over peak-EWMA cost.
    pub fn pick<'s>(
        &self,
        candidates: &[&'s Arc<Endpoint>],
        session_key: Option<&str>,
        rng: &mut impl Rng,
        now: Duration,
    ) -> Option<&'s Arc<Endpoint>> {
        if let Some(key) = session_key {
            let i = shoal_balance::hash::rendezvous(key, candidates.iter().map(|e| e.id.as_str()))?;
            return candidates.get(i).copied();
        }
        if self.balance == Balance::RoundRobin && !candidates.is_empty() {
            let i = self.next.fetch_add(1, Ordering::Relaxed) as usize % candidates.len();
            return candidates.get(i).copied();
        }
        self.least_loaded(candidates, rng, now)
    }

    /// Power of two choices among `candidates` by peak-EWMA cost, whatever
    /// the balance mode: a hedge goes where it will be answered soonest,
    /// and picking it must not move round robin's turn.
    pub fn least_loaded<'s>(
        &self,
        candidates: &[&'s Arc<Endpoint>],
        rng: &mut impl Rng,
        now: Duration,
    ) -> Option<&'s Arc<Endpoint>> {
        p2c_by(candidates.len(), rng, |i| {
            candidates[i].candidate(now, &self.policy)
        })
        .and_then(|i| candidates.get(i).copied())
    }
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;
    use shoal_api::deploy::TrafficTarget;
    use shoal_api::fleet::RouteEndpoint;

    use super::*;

    fn table(endpoints: &[(&str, &str, &[&str])], regions: Option<Vec<String>>) -> RoutingTable {
        RoutingTable {
            revision: 1,
            endpoints: endpoints
                .iter()
                .map(|(id, region, serving)| RouteEndpoint {
                    id: (*id).into(),
                    address: format!("{id}:1"),
                    region: (*region).into(),
                    alive: true,
                    serving: serving.iter().map(|s| s.parse().unwrap()).collect(),
                    standby: id.starts_with("standby"),
                })
                .collect(),
            models: vec![ModelPolicy {
                model: "m".into(),
                targets: vec![TrafficTarget {
                    version: "1".into(),
                    weight: 100,
                }],
                regions,
                shadow: None,
                split_header: None,
            }],
        }
    }

    fn ids<'s>(v: &[&'s Arc<Endpoint>]) -> Vec<&'s str> {
        v.iter().map(|e| e.id.as_str()).collect()
    }

    #[test]
    fn a_hedge_pick_does_not_take_round_robins_turn() {
        let routes =
            Routes::new("us".into(), HealthPolicy::default()).with_balance(Balance::RoundRobin);
        routes.apply(
            &table(&[("a", "us", &["m:1"]), ("b", "us", &["m:1"])], None),
            Duration::ZERO,
        );
        let s = routes.snapshot();
        let all = routes
            .candidates(&s, "m", Some("1"), &[], Duration::ZERO)
            .unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let mut turns = Vec::new();
        for _ in 0..4 {
            let first = routes.pick(&all, None, &mut rng, Duration::ZERO).unwrap();
            let others: Vec<&Arc<Endpoint>> =
                all.iter().filter(|e| e.id != first.id).copied().collect();
            let hedge = routes
                .least_loaded(&others, &mut rng, Duration::ZERO)
                .unwrap();
            assert_ne!(hedge.id, first.id);
            turns.push(first.id.clone());
        }
        assert_eq!(turns, ["a", "b", "a", "b"], "hedges left the turns alone");
    }

    #[test]
    fn a_standby_stands_in_only_while_its_region_is_short_of_actives() {
        let policy = HealthPolicy::default();
        let routes = Routes::new("us".into(), policy);
        routes.apply(
            &table(
                &[
                    ("a", "us", &["m:1"]),
                    ("b", "us", &["m:1"]),
                    ("standby-us", "us", &["m:1"]),
                    ("e", "eu", &["m:1"]),
                    ("standby-eu", "eu", &["m:1"]),
                ],
                None,
            ),
            Duration::ZERO,
        );
        let s = routes.snapshot();
        let now = Duration::from_secs(1);
        let picked = |exclude: &[String]| {
            let mut v = ids(&routes.candidates(&s, "m", Some("1"), exclude, now).unwrap())
                .into_iter()
                .map(str::to_owned)
                .collect::<Vec<_>>();
            v.sort();
            v
        };
        assert_eq!(picked(&[]), ["a", "b"], "actives only while all are up");
        // One active dies: the standby of its region stands in, at once.
        let a = s.endpoints.iter().find(|e| e.id == "a").unwrap();
        a.failed(Failure::Connect, Duration::ZERO, now, &policy);
        assert_eq!(picked(&[]), ["b", "standby-us"]);
        // The region's last active gone too: its standby, still not eu.
        let b = s.endpoints.iter().find(|e| e.id == "b").unwrap();
        b.failed(Failure::Connect, Duration::ZERO, now, &policy);
        assert_eq!(picked(&[]), ["standby-us"]);
        // Back: the standby steps aside.
        let later = now + Duration::from_secs(600);
        for e in [a, b] {
            e.succeeded(Duration::from_millis(1), later, &policy);
        }
        let back = ids(&routes.candidates(&s, "m", Some("1"), &[], later).unwrap())
            .into_iter()
            .map(str::to_owned)
            .collect::<Vec<_>>();
        assert_eq!(back, ["a", "b"]);
        // A standby serving what no active serves is used rather than none.
        routes.apply(
            &table(
                &[("a", "us", &["m:1"]), ("standby-us", "us", &["m:1", "m:2"])],
                None,
            ),
            Duration::ZERO,
        );
        let s = routes.snapshot();
        assert_eq!(
            ids(&routes.candidates(&s, "m", Some("2"), &[], now).unwrap()),
            ["standby-us"]
        );
    }

    #[test]
    fn prefers_the_local_region_and_fails_over() {
        let routes = Routes::new("us".into(), HealthPolicy::default());
        routes.apply(
            &table(&[("a", "us", &["m:1"]), ("b", "eu", &["m:1"])], None),
            Duration::ZERO,
        );
        let s = routes.snapshot();
        assert_eq!(
            ids(&routes
                .candidates(&s, "m", Some("1"), &[], Duration::ZERO)
                .unwrap()),
            ["a"]
        );
        // a ejected: fail over to eu.
        s.endpoints[0].failed(
            Failure::Connect,
            Duration::ZERO,
            Duration::ZERO,
            routes.policy(),
        );
        assert_eq!(
            ids(&routes
                .candidates(&s, "m", Some("1"), &[], Duration::ZERO)
                .unwrap()),
            ["b"]
        );
        // Excluding the one left (already tried): only the ejected one is
        // left, and panic mode offers it rather than nothing.
        assert_eq!(
            ids(&routes
                .candidates(&s, "m", Some("1"), &["b".into()], Duration::ZERO)
                .unwrap()),
            ["a"]
        );
        // Both tried: none.
        assert_eq!(
            routes
                .candidates(
                    &s,
                    "m",
                    Some("1"),
                    &["a".into(), "b".into()],
                    Duration::ZERO
                )
                .unwrap_err(),
            NoRoute::NoneAvailable
        );
        assert_eq!(
            routes
                .candidates(&s, "other", None, &[], Duration::ZERO)
                .unwrap_err(),
            NoRoute::UnknownModel
        );
    }

    #[test]
    fn pinned_models_never_leave_their_regions() {
        let routes = Routes::new("us".into(), HealthPolicy::default());
        routes.apply(
            &table(
                &[("a", "us", &["m:1"]), ("b", "eu", &["m:1"])],
                Some(vec!["eu".into()]),
            ),
            Duration::ZERO,
        );
        let s = routes.snapshot();
        assert_eq!(
            ids(&routes
                .candidates(&s, "m", Some("1"), &[], Duration::ZERO)
                .unwrap()),
            ["b"]
        );
        s.endpoints[1].failed(
            Failure::Connect,
            Duration::ZERO,
            Duration::ZERO,
            routes.policy(),
        );
        // Even in panic mode, never the replica outside the pinned region.
        assert_eq!(
            ids(&routes
                .candidates(&s, "m", Some("1"), &[], Duration::ZERO)
                .unwrap()),
            ["b"]
        );
        assert_eq!(
            routes
                .candidates(&s, "m", Some("1"), &["b".into()], Duration::ZERO)
                .unwrap_err(),
            NoRoute::NoneAvailable
        );
    }

    #[test]
    fn a_failing_version_is_ejected_from_a_replica_that_keeps_its_others() {
        let routes = Routes::new("us".into(), HealthPolicy::default());
        routes.apply(
            &table(
                &[("a", "us", &["m:1", "m:2"]), ("b", "us", &["m:1", "m:2"])],
                None,
            ),
            Duration::ZERO,
        );
        let s = routes.snapshot();
        for _ in 0..3 {
            s.endpoints[0].version_failed(
                &"m:2".parse().unwrap(),
                Duration::ZERO,
                Duration::ZERO,
                routes.policy(),
            );
        }
        assert_eq!(
            ids(&routes
                .candidates(&s, "m", Some("2"), &[], Duration::ZERO)
                .unwrap()),
            ["b"]
        );
        assert_eq!(
            ids(&routes
                .candidates(&s, "m", Some("1"), &[], Duration::ZERO)
                .unwrap()),
            ["a", "b"]
        );
    }

    #[test]
    fn updates_keep_endpoint_history() {
        let routes = Routes::new("us".into(), HealthPolicy::default());
        routes.apply(&table(&[("a", "us", &["m:1"])], None), Duration::ZERO);
        let before = routes.snapshot().endpoints[0].clone();
        routes.apply(
            &table(&[("a", "us", &["m:1"]), ("b", "us", &["m:1"])], None),
            Duration::ZERO,
        );
        assert!(Arc::ptr_eq(&before, &routes.snapshot().endpoints[0]));
    }

    #[test]
    fn sessions_stick_to_one_endpoint() {
        let routes = Routes::new("us".into(), HealthPolicy::default());
        routes.apply(
            &table(
                &[
                    ("a", "us", &["m:1"]),
                    ("b", "us", &["m:1"]),
                    ("c", "us", &["m:1"]),
                ],
                None,
            ),
            Duration::ZERO,
        );
        let s = routes.snapshot();
        let c = routes
            .candidates(&s, "m", Some("1"), &[], Duration::ZERO)
            .unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let first = routes
            .pick(&c, Some("session-9"), &mut rng, Duration::ZERO)
            .unwrap();
        for _ in 0..20 {
            assert_eq!(
                routes
                    .pick(&c, Some("session-9"), &mut rng, Duration::ZERO)
                    .unwrap()
                    .id,
                first.id
            );
        }
    }

    #[test]
    fn metric_labels_come_from_the_routing_state_not_the_request() {
        let routes = Routes::new("r".into(), HealthPolicy::default());
        routes.apply(
            &table(&[("a", "r", &["m:1", "m:2"]), ("b", "r", &["n:7"])], None),
            Duration::ZERO,
        );
        let state = routes.snapshot();
        let labels = |m, v| crate::proxy::metric_labels(&state, m, v);
        assert_eq!(labels("m", "1"), ("m", "1"));
        // Served though not in the split: a pinned request may ask for it.
        assert_eq!(labels("m", "2"), ("m", "2"));
        // A model only an endpoint serves (static replicas, no policy).
        assert_eq!(labels("n", "7"), ("n", "7"));
        // Whatever a scanner makes up counts under one label.
        assert_eq!(labels("m", "999999"), ("m", "other"));
        assert_eq!(labels("wp-login.php", ""), ("other", "other"));
        assert_eq!(labels("x%00y", "1"), ("other", "other"));
    }
}

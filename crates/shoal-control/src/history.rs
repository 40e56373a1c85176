//! The dashboard's time series: once a second the control plane hands
//! [`History::record`] the fleet's cumulative per-version counters and
//! each deployed model's weights and rewards; it keeps, per model, the
//! last hour of points, each with request rate, error rate and latency
//! quantiles over a sliding window (so a chart is smooth at a few
//! requests per second and still moves within seconds of a change).
//!
//! Pure: no clock and no I/O; the caller passes the time. Memory is
//! bounded: `keep` points per model, models no longer deployed dropped.

use std::collections::{BTreeMap, VecDeque};

use shoal_api::UnixMillis;
use shoal_api::counters::Counters;
use shoal_api::fleet::VersionStats;
use shoal_api::history::{HistoryPoint, VersionPoint};

/// What the control plane knows of one deployed model at a sample.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ModelSample {
    /// Traffic weight per version.
    pub weights: BTreeMap<String, u32>,
    /// Mean reward per version, where feedback exists.
    pub rewards: BTreeMap<String, f64>,
}

#[derive(Debug, Default)]
struct Series {
    points: VecDeque<HistoryPoint>,
    /// Cumulative counters per version at recent samples, oldest first:
    /// the window's start is the oldest one still inside it.
    raw: VecDeque<(UnixMillis, BTreeMap<String, VersionStats>)>,
}

/// Per-model time series.
#[derive(Debug)]
pub struct History {
    keep: usize,
    window_ms: i64,
    models: BTreeMap<String, Series>,
}

impl History {
    /// Keeps `keep` points per model; rates cover `window_ms`.
    pub fn new(keep: usize, window_ms: i64) -> History {
        History {
            keep: keep.max(1),
            window_ms: window_ms.max(1),
            models: BTreeMap::new(),
        }
    }

    /// The sliding window, ms.
    pub fn window_ms(&self) -> i64 {
        self.window_ms
    }

    /// Records one sample at `at`: `totals` are the fleet's cumulative
    /// counters by `model:version`, `models` every deployed model. A model
    /// not in `models` is forgotten.
    pub fn record(
        &mut self,
        at: UnixMillis,
        totals: &BTreeMap<shoal_core::VersionKey, VersionStats>,
        models: &BTreeMap<String, ModelSample>,
    ) {
        self.models.retain(|m, _| models.contains_key(m));
        for (model, sample) in models {
            let now: BTreeMap<String, VersionStats> = totals
                .iter()
                .filter(|(k, _)| k.is_of(model))
                .map(|(k, v)| (k.version.to_string(), v.clone()))
                .collect();
            let series = self.models.entry(model.clone()).or_default();
            if series.raw.back().is_some_and(|(t, _)| *t >= at) {
                continue; // the clock went back or stood still: no sample
            }
            // Keep the newest sample at or before the window's start, so
            // the window is covered whole once there is history.
            while series.raw.len() >= 2 && series.raw[1].0 <= at - self.window_ms {
                series.raw.pop_front();
            }
            let point = match series.raw.front() {
                Some((then, before)) => point(at - then, before, &now, sample),
                None => point(0, &BTreeMap::new(), &BTreeMap::new(), sample),
            };
            series.raw.push_back((at, now));
            series.points.push_back(HistoryPoint {
                at,
                weights: sample.weights.clone(),
                versions: point,
            });
            while series.points.len() > self.keep {
                series.points.pop_front();
            }
        }
    }

    /// The points of `model` after `after`, oldest first.
    pub fn points(&self, model: &str, after: UnixMillis) -> Vec<HistoryPoint> {
        self.models
            .get(model)
            .map(|s| s.points.iter().filter(|p| p.at > after).cloned().collect())
            .unwrap_or_default()
    }
}

/// Per version: what happened between `before` and `now`, `span` ms apart.
/// Versions with traffic in the window, a weight or a reward appear.
fn point(
    span: i64,
    before: &BTreeMap<String, VersionStats>,
    now: &BTreeMap<String, VersionStats>,
    sample: &ModelSample,
) -> BTreeMap<String, VersionPoint> {
    let mut out = BTreeMap::new();
    let versions = now
        .keys()
        .chain(sample.weights.keys())
        .chain(sample.rewards.keys());
    for version in versions {
        if out.contains_key(version) {
            continue;
        }
        let delta = match (now.get(version), before.get(version)) {
            (Some(n), Some(b)) => n.since(b),
            (Some(n), None) if span > 0 => n.clone(),
            _ => VersionStats::default(),
        };
        let weighted = sample.weights.get(version).is_some_and(|w| *w > 0);
        let reward = sample.rewards.get(version).copied();
        if delta.requests == 0 && !weighted && reward.is_none() {
            continue;
        }
        let finite = |q: Option<f64>| q.filter(|v| v.is_finite());
        let rps = if span > 0 {
            delta.requests as f64 * 1000.0 / span as f64
        } else {
            0.0
        };
        out.insert(
            version.clone(),
            VersionPoint {
                rps,
                error_rate: (delta.requests > 0).then(|| delta.error_rate()),
                p50_ms: finite(delta.quantile_ms(0.5)),
                p99_ms: finite(delta.quantile_ms(0.99)),
                reward,
            },
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_api::fleet::LATENCY_BOUNDS_MS;

    /// Cumulative counters: `requests` answered, `errors` of them failed,
    /// all in the latency bucket whose bound is `ms`.
    fn stats(requests: u64, errors: u64, ms: f64) -> VersionStats {
        let mut latency = vec![0; LATENCY_BOUNDS_MS.len() + 1];
        let bucket = LATENCY_BOUNDS_MS
            .iter()
            .position(|b| *b >= ms)
            .unwrap_or(LATENCY_BOUNDS_MS.len());
        latency[bucket] = requests;
        VersionStats {
            requests,
            errors,
            latency,
        }
    }

    fn weights(pairs: &[(&str, u32)]) -> BTreeMap<String, ModelSample> {
        BTreeMap::from([(
            "digits".to_owned(),
            ModelSample {
                weights: pairs.iter().map(|(v, w)| ((*v).to_owned(), *w)).collect(),
                rewards: BTreeMap::new(),
            },
        )])
    }

    #[test]
    fn rates_and_quantiles_cover_the_window_per_version() {
        let mut h = History::new(100, 2_000);
        let models = weights(&[("1", 90), ("2", 10)]);
        let mut totals = BTreeMap::new();
        for s in 0..=4i64 {
            let n = s as u64;
            totals.insert("digits:1".parse().unwrap(), stats(100 * n, 0, 1.0));
            totals.insert("digits:2".parse().unwrap(), stats(10 * n, n, 50.0));
            totals.insert("other:1".parse().unwrap(), stats(999 * n, 0, 1.0));
            h.record(s * 1_000, &totals, &models);
        }
        let points = h.points("digits", -1);
        assert_eq!(points.len(), 5);
        assert_eq!(points[0].versions["1"].rps, 0.0, "no window yet");
        let last = &points[4];
        assert_eq!(last.weights["2"], 10);
        // Window: samples at 2 s and 4 s.
        assert!((last.versions["1"].rps - 100.0).abs() < 1e-9);
        assert!((last.versions["2"].rps - 10.0).abs() < 1e-9);
        assert_eq!(last.versions["2"].error_rate, Some(0.1));
        assert_eq!(last.versions["1"].error_rate, Some(0.0));
        let p99 = |v: &str| last.versions[v].p99_ms.unwrap();
        assert!(p99("2") >= 50.0 && p99("1") <= 1.0, "{last:?}");
        assert!(!last.versions.contains_key("other"));
        assert_eq!(h.points("digits", 3_000).len(), 1, "after is exclusive");
    }

    #[test]
    fn a_version_without_traffic_weight_or_reward_is_left_out() {
        let mut h = History::new(10, 1_000);
        let totals = BTreeMap::from([("digits:old".parse().unwrap(), stats(5, 0, 1.0))]);
        h.record(0, &totals, &weights(&[("new", 100)]));
        h.record(1_000, &totals, &weights(&[("new", 100)]));
        let last = h.points("digits", 0).pop().unwrap();
        assert!(
            last.versions.contains_key("new"),
            "weighted, no traffic yet"
        );
        assert_eq!(last.versions["new"].error_rate, None);
        assert!(!last.versions.contains_key("old"), "idle and unweighted");
    }

    #[test]
    fn memory_is_bounded_and_undeployed_models_are_forgotten() {
        let mut h = History::new(3, 1_000);
        let totals = BTreeMap::new();
        for s in 0..10 {
            h.record(s * 1_000, &totals, &weights(&[("1", 100)]));
        }
        assert_eq!(h.points("digits", -1).len(), 3);
        assert_eq!(h.points("digits", -1)[0].at, 7_000);
        h.record(11_000, &totals, &BTreeMap::new());
        assert!(h.points("digits", -1).is_empty());
    }

    #[test]
    fn a_replica_restart_never_shows_negative_rates_and_a_clock_step_back_is_skipped() {
        let mut h = History::new(10, 1_000);
        let models = weights(&[("1", 100)]);
        let at = |n| BTreeMap::from([("digits:1".parse().unwrap(), stats(n, 0, 1.0))]);
        h.record(0, &at(500), &models);
        h.record(1_000, &at(20), &models);
        h.record(500, &at(40), &models);
        let points = h.points("digits", -1);
        assert_eq!(points.len(), 2);
        assert_eq!(points[1].versions["1"].rps, 0.0);
    }

    #[test]
    fn rewards_appear_for_arms_with_feedback() {
        let mut h = History::new(10, 1_000);
        let mut models = weights(&[("a", 50), ("b", 50)]);
        models.get_mut("digits").unwrap().rewards = BTreeMap::from([("b".to_owned(), 0.25)]);
        h.record(0, &BTreeMap::new(), &models);
        let last = h.points("digits", -1).pop().unwrap();
        assert_eq!(last.versions["b"].reward, Some(0.25));
        assert_eq!(last.versions["a"].reward, None);
    }
}

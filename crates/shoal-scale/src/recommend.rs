//! One model's autoscaler: the reactive and the predictive
//! recommendations together, and the figures `shoal scale status` shows.
//!
//! The recommendation is the larger of the two: prediction only ever adds
//! replicas ahead of load it expects (by the time a replica takes to
//! fetch, load and warm the model, as measured), and the reactive part
//! answers what nobody predicted. Prediction needs the load in requests
//! per second per replica the target means: exact for an `rps` target,
//! otherwise learned as the load now ÷ the replicas the reactive part
//! finds right for it (a moving average, taken only under real load).

use shoal_api::UnixMillis;
use shoal_api::scale::{PredictedChange, Recommendation, ScaleTarget};

use crate::predict::{SeasonConfig, Seasonal};
use crate::reactive::{Config, Observation, Reactive};

/// Right-sizing's margin over the measured peak.
pub const SAFETY_FACTOR: f64 = 1.2;

/// One evaluation's facts about a model.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Facts {
    /// Now.
    pub now: UnixMillis,
    /// The count the autoscaler last set (or found, at the start).
    pub current: u32,
    /// Of them, replicas serving and measured.
    pub ready: u32,
    /// Lower bound.
    pub min: u32,
    /// Upper bound.
    pub max: u32,
    /// What to scale on.
    pub target: ScaleTarget,
    /// The target signal's value now (per replica, or the p99), if known.
    pub signal: Option<f64>,
    /// The model's request rate over the fleet now, if known.
    pub rps: Option<f64>,
    /// How long a replica takes to fetch, load and warm the model.
    pub load_ms: Option<u64>,
}

/// What one evaluation recommends, with its reasons.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// Replicas the model should have: the larger recommendation.
    pub desired: u32,
    /// The reactive recommendation.
    pub reactive: Recommendation,
    /// The predictive one, once a day of load is learned.
    pub predicted: Option<Recommendation>,
    /// Requests per second one replica carries at the target.
    pub rps_per_replica: Option<f64>,
    /// The highest load seen (slot mean).
    pub peak_rps: f64,
    /// Peak ÷ RPS per replica × [`SAFETY_FACTOR`].
    pub right_size: Option<u32>,
    /// The next change the predictor expects within a day.
    pub next_change: Option<PredictedChange>,
}

/// The autoscaler of one model.
#[derive(Debug, Clone)]
pub struct Autoscaler {
    reactive: Reactive,
    seasonal: Seasonal,
    rps_per_replica: Option<f64>,
    predictive: bool,
    tolerance: f64,
}

impl Autoscaler {
    /// A fresh autoscaler for a model served by `current` replicas.
    pub fn new(
        now: UnixMillis,
        current: u32,
        reactive: Config,
        season: SeasonConfig,
    ) -> Autoscaler {
        Autoscaler {
            reactive: Reactive::new(reactive, now, current),
            seasonal: Seasonal::new(season),
            rps_per_replica: None,
            predictive: true,
            tolerance: reactive.tolerance,
        }
    }

    /// Learns and shows the prediction but acts on the reactive part
    /// alone (for comparison: `shoal control --no-predict`).
    pub fn reactive_only(mut self) -> Autoscaler {
        self.predictive = false;
        self
    }

    /// The learned load profile.
    pub fn seasonal(&self) -> &Seasonal {
        &self.seasonal
    }

    /// One evaluation; the answer is taken as carried out.
    pub fn tick(&mut self, f: Facts) -> Outcome {
        if let Some(rps) = f.rps {
            self.seasonal.observe(f.now, rps);
        }
        let reactive = self.reactive.recommend(Observation {
            now: f.now,
            current: f.current,
            ready: f.ready,
            observed: f.signal,
            target: f.target.value(),
            min: f.min,
            max: f.max,
        });
        self.rps_per_replica = match f.target {
            ScaleTarget::Rps(t) => Some(t),
            _ => match f.rps {
                // Learned only under load worth learning from.
                Some(rps) if rps >= 1.0 && reactive.replicas > 0 => {
                    let now = rps / f64::from(reactive.replicas);
                    Some(
                        self.rps_per_replica
                            .map_or(now, |old| 0.8 * old + 0.2 * now),
                    )
                }
                _ => self.rps_per_replica,
            },
        };
        let lead = i64::try_from(f.load_ms.unwrap_or(0)).unwrap_or(i64::MAX / 2);
        let predicted = self.rps_per_replica.and_then(|per| {
            let ahead = self.expected(f.now, lead)?;
            let tol = self.tolerance;
            let absolute = replicas_for(ahead, per, tol, f.min, f.max);
            let within = format!(
                "expects {ahead:.1} req/s within {} (a replica loads in {})",
                shoal_api::duration::human(shoal_api::duration::from_millis(
                    lead + self.seasonal.config().slot_ms,
                )),
                shoal_api::duration::human(shoal_api::duration::from_millis(lead)),
            );
            // The forecast's shape scaled onto what the reactive part
            // finds right now, so forecast noise does not add replicas in
            // steady load; the absolute figure caps it (and is all there
            // is when the forecast for now is near nothing).
            let relative = self
                .seasonal
                .forecast(f.now)
                .filter(|now| *now >= 1.0)
                .map(|now| {
                    let ratio = ahead / now;
                    let n = if (ratio - 1.0).abs() <= tol {
                        reactive.replicas
                    } else {
                        (f64::from(reactive.replicas) * ratio)
                            .ceil()
                            .min(f64::from(f.max)) as u32
                    };
                    (n.clamp(f.min, f.max.max(f.min)), now, ratio)
                })
                .filter(|(n, _, _)| *n < absolute);
            Some(match relative {
                Some((replicas, now, ratio)) => Recommendation {
                    replicas,
                    reason: format!(
                        "{within}, {now:.1} now (×{ratio:.2}): {} × {ratio:.2} → {replicas}",
                        reactive.replicas
                    ),
                },
                None => Recommendation {
                    replicas: absolute,
                    reason: format!(
                        "{within}: ceil({ahead:.1} ÷ ({per:.1} × {:.2})) = {absolute}",
                        1.0 + tol
                    ),
                },
            })
        });
        let next_change = match (&predicted, self.rps_per_replica) {
            (Some(now), Some(per)) => self.next_change(f, lead, per, now.replicas),
            _ => None,
        };
        let desired = predicted
            .as_ref()
            .filter(|_| self.predictive)
            .map_or(reactive.replicas, |p| p.replicas.max(reactive.replicas));
        let peak_rps = self.seasonal.peak();
        let right_size = self
            .rps_per_replica
            .filter(|_| peak_rps > 0.0)
            .map(|per| (peak_rps / per * SAFETY_FACTOR).ceil() as u32);
        Outcome {
            desired,
            reactive,
            predicted,
            rps_per_replica: self.rps_per_replica,
            peak_rps,
            right_size,
            next_change,
        }
    }

    /// The highest load expected from `at` until a replica started then
    /// would be ready, plus one slot.
    fn expected(&self, at: UnixMillis, lead: i64) -> Option<f64> {
        self.seasonal
            .forecast_max(at, at + lead + self.seasonal.config().slot_ms)
    }

    fn next_change(&self, f: Facts, lead: i64, per: f64, now: u32) -> Option<PredictedChange> {
        let c = *self.seasonal.config();
        let first = c.slot_of(f.now) + 1;
        (first..first + c.slots_per_day() as i64).find_map(|slot| {
            let at = c.start_of(slot);
            let replicas =
                replicas_for(self.expected(at, lead)?, per, self.tolerance, f.min, f.max);
            (replicas != now).then_some(PredictedChange { at, replicas })
        })
    }
}

/// Replicas for `rps` at `per_replica` each, counting a replica as full
/// only past the tolerance above its target: no more than the HPA would
/// keep once that load arrives (it leaves a count alone while each replica
/// carries within the tolerance of the target), so a prediction never
/// leaves a replica the reactive part would not have removed.
fn replicas_for(rps: f64, per_replica: f64, tolerance: f64, min: u32, max: u32) -> u32 {
    let n = (rps / (per_replica * (1.0 + tolerance))).ceil();
    (if n.is_finite() {
        n.min(f64::from(u32::MAX)) as u32
    } else {
        max
    })
    .clamp(min, max.max(min))
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: i64 = 3_600_000;
    const DAY: i64 = 24 * HOUR;

    fn daily_load(at: UnixMillis) -> f64 {
        match at.rem_euclid(DAY) / HOUR {
            8..18 => 200.0,
            18..22 => 60.0,
            _ => 10.0,
        }
    }

    /// Runs `days` of the daily load through an autoscaler whose
    /// recommendations are carried out at once, evaluating every 10 s;
    /// answers the autoscaler and the replicas it left.
    fn run(days: i64, load_ms: u64) -> (Autoscaler, u32) {
        let mut a = Autoscaler::new(0, 1, Config::default(), SeasonConfig::default());
        let mut current = 1;
        let mut at = 0;
        while at < days * DAY {
            current = a.tick(facts(at, current, daily_load(at), load_ms)).desired;
            at += 10_000;
        }
        (a, current)
    }

    fn facts(now: UnixMillis, current: u32, rps: f64, load_ms: u64) -> Facts {
        Facts {
            now,
            current,
            ready: current,
            min: 1,
            max: 10,
            target: ScaleTarget::Rps(50.0),
            signal: Some(rps / f64::from(current.max(1))),
            rps: Some(rps),
            load_ms: Some(load_ms),
        }
    }

    #[test]
    fn reactive_only_until_a_day_is_learned() {
        let mut a = Autoscaler::new(0, 1, Config::default(), SeasonConfig::default());
        let out = a.tick(facts(1000, 1, 120.0, 30_000));
        assert_eq!(out.predicted, None);
        assert_eq!(
            out.desired, 3,
            "ceil(1 × 120/50) = 3: {}",
            out.reactive.reason
        );
        assert_eq!(out.next_change, None);
    }

    #[test]
    fn the_morning_ramp_is_met_ahead_by_the_load_time() {
        // Three days learned; a replica takes 10 minutes to be ready.
        let (mut a, _) = run(3, 10 * 60_000);
        let before = 3 * DAY + 7 * HOUR + 45 * 60_000;
        let out = a.tick(facts(before, 1, 10.0, 10 * 60_000));
        // The reactive part sees 10 req/s: one replica. The predictor sees
        // 08:00 coming within the load time: 200 ÷ 50 = 4.
        assert_eq!(out.reactive.replicas, 1);
        let predicted = out.predicted.clone().unwrap();
        assert_eq!(predicted.replicas, 4, "{}", predicted.reason);
        assert_eq!(out.desired, 4);
        // With a 1-minute load time the same moment is too early to act.
        // Told to act on the reactive part alone, it still says what it
        // expects.
        let (a, _) = run(3, 10 * 60_000);
        let out = a.reactive_only().tick(facts(before, 1, 10.0, 10 * 60_000));
        assert_eq!((out.desired, out.predicted.unwrap().replicas), (1, 4));
        let (mut quick, _) = run(3, 60_000);
        let out = quick.tick(facts(before, 1, 10.0, 60_000));
        assert_eq!(out.desired, 1, "{:?}", out.predicted);
        // …and it says when it will.
        let next = out.next_change.unwrap();
        assert_eq!(next.replicas, 4);
        assert!(
            next.at > before && next.at <= 3 * DAY + 8 * HOUR,
            "{}",
            next.at
        );
    }

    #[test]
    fn an_unannounced_spike_is_answered_by_the_reactive_part() {
        let (mut a, current) = run(3, 60_000);
        let night = 3 * DAY + 3 * HOUR;
        assert_eq!(current, 1);
        let out = a.tick(facts(night, current, 400.0, 60_000));
        assert_eq!(out.predicted.unwrap().replicas, 1);
        // ceil(1 × 400/50) = 8, limited to +4 in the first 15 s.
        assert_eq!(out.desired, 5, "{}", out.reactive.reason);
    }

    #[test]
    fn forecast_noise_in_steady_load_adds_no_replica() {
        // Noon of day 4: 200 req/s, 4 replicas at 50; a forecast a little
        // above the load must not make it 5.
        let (mut a, _) = run(3, 60_000);
        let noon = 3 * DAY + 12 * HOUR;
        let out = a.tick(facts(noon, 4, 205.0, 60_000));
        assert_eq!(out.reactive.replicas, 4);
        assert_eq!(out.predicted.unwrap().replicas, 4);
        assert_eq!(out.desired, 4);
        // At night, 10 req/s on one replica stays one.
        let night = 3 * DAY + 3 * HOUR;
        let (mut a, _) = run(3, 60_000);
        assert_eq!(a.tick(facts(night, 1, 11.0, 60_000)).desired, 1);
    }

    #[test]
    fn right_sizing_uses_the_peak_and_the_safety_factor() {
        let (mut a, _) = run(2, 60_000);
        let out = a.tick(facts(2 * DAY, 1, 10.0, 60_000));
        assert_eq!(out.peak_rps, 200.0);
        assert_eq!(out.rps_per_replica, Some(50.0));
        assert_eq!(out.right_size, Some(5), "ceil(200 ÷ 50 × 1.2)");
    }

    #[test]
    fn other_signals_learn_the_rps_a_replica_carries() {
        let mut a = Autoscaler::new(0, 2, Config::default(), SeasonConfig::default());
        // In flight: 2 replicas at 8 each against 4 → 4 replicas for 100 req/s.
        let out = a.tick(Facts {
            target: ScaleTarget::InFlight(4.0),
            signal: Some(8.0),
            ..facts(1000, 2, 100.0, 0)
        });
        assert_eq!(out.desired, 4);
        assert_eq!(out.rps_per_replica, Some(25.0));
        // Idle: nothing to learn from; the estimate stays.
        let out = a.tick(Facts {
            target: ScaleTarget::InFlight(4.0),
            signal: Some(0.0),
            ..facts(2000, 4, 0.0, 0)
        });
        assert_eq!(out.rps_per_replica, Some(25.0));
    }
}

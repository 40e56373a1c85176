//! The reactive autoscaler: the Kubernetes HPA algorithm, on one model.
//!
//! `desired = ceil(ready × observed ÷ target)`, unchanged while the
//! ratio is within the tolerance (10 %). As in Kubernetes, `current` is the
//! count the autoscaler last set (the scale target's), and the formula
//! multiplies by the replicas that are ready and measured, so replicas
//! still loading neither count as capacity nor inflate the rate limits. The raw recommendation then goes
//! through the HPA's behaviour rules, with its defaults:
//! - stabilisation: scale down to the *highest* recommendation of the last
//!   5 minutes, scale up to the lowest of the up window (0: at once), so a
//!   dip does not shed replicas the next minute needs;
//! - rate limits per period (15 s): up by at most max(4 replicas, 100 %),
//!   down by at most 100 %, counted from the count at the period's start;
//! - bounds: never below `min`, never above `max`.
//!
//! A new autoscaler starts with the current count as its only
//! recommendation, so a control plane that just took over the lead does
//! not scale down before it has watched a full window.

use std::collections::VecDeque;

use shoal_api::UnixMillis;
use shoal_api::scale::Recommendation;

/// A rate limit: at most `max(replicas, percent of the count at the
/// period's start)` change per period.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    /// Replicas per period.
    pub replicas: u32,
    /// Percent of the count per period.
    pub percent: u32,
    /// Period, ms.
    pub period_ms: i64,
}

/// How the reactive autoscaler behaves; [`Config::default`] is the HPA's.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Config {
    /// Ratios within 1 ± this change nothing.
    pub tolerance: f64,
    /// Scale-up stabilisation window, ms.
    pub up_window_ms: i64,
    /// Scale-down stabilisation window, ms.
    pub down_window_ms: i64,
    /// Scale-up limit.
    pub up: Rate,
    /// Scale-down limit.
    pub down: Rate,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            tolerance: 0.1,
            up_window_ms: 0,
            down_window_ms: 5 * 60_000,
            up: Rate {
                replicas: 4,
                percent: 100,
                period_ms: 15_000,
            },
            down: Rate {
                replicas: 0,
                percent: 100,
                period_ms: 15_000,
            },
        }
    }
}

/// One evaluation's facts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Observation {
    /// Now.
    pub now: UnixMillis,
    /// The count the autoscaler last set (or found, at the start).
    pub current: u32,
    /// Of them, replicas ready and measured (the per-replica signal is
    /// their average).
    pub ready: u32,
    /// The signal (per ready replica, or the model's p99), if measured.
    pub observed: Option<f64>,
    /// The target value of the signal.
    pub target: f64,
    /// Lower bound.
    pub min: u32,
    /// Upper bound.
    pub max: u32,
}

/// The reactive autoscaler of one model.
#[derive(Debug, Clone)]
pub struct Reactive {
    config: Config,
    recommendations: VecDeque<(UnixMillis, u32)>,
    changes: VecDeque<(UnixMillis, i64)>,
}

impl Reactive {
    /// A new autoscaler for a model served by `current` replicas.
    pub fn new(config: Config, now: UnixMillis, current: u32) -> Reactive {
        Reactive {
            config,
            recommendations: VecDeque::from([(now, current)]),
            changes: VecDeque::new(),
        }
    }

    /// The recommendation now. It is taken as carried out: the change is
    /// remembered for the rate limits.
    pub fn recommend(&mut self, o: Observation) -> Recommendation {
        let c = self.config;
        let (raw, mut reason) = match o.observed {
            None => (
                o.current,
                "no load measured yet: keeping the current count".to_owned(),
            ),
            Some(observed) => {
                let ratio = observed / o.target;
                if (ratio - 1.0).abs() <= c.tolerance {
                    (
                        o.current,
                        format!(
                            "{observed:.1} against a target of {:.1}: within the {:.0} % tolerance",
                            o.target,
                            c.tolerance * 100.0
                        ),
                    )
                } else {
                    let base = o.ready.max(1);
                    let raw = (f64::from(base) * ratio).ceil().min(f64::from(u32::MAX)) as u32;
                    (
                        raw,
                        format!(
                            "{observed:.1} against a target of {:.1}: ceil({base} × {ratio:.2}) = {raw}",
                            o.target
                        ),
                    )
                }
            }
        };
        let raw = raw.clamp(o.min, o.max.max(o.min));
        self.recommendations.push_back((o.now, raw));
        let horizon = c.up_window_ms.max(c.down_window_ms);
        while self
            .recommendations
            .front()
            .is_some_and(|(at, _)| *at < o.now - horizon)
        {
            self.recommendations.pop_front();
        }
        let within = |window: i64| {
            self.recommendations
                .iter()
                .filter(move |(at, _)| *at >= o.now - window)
                .map(|(_, r)| *r)
        };
        let up = within(c.up_window_ms).min().unwrap_or(raw).max(o.min);
        let down = within(c.down_window_ms).max().unwrap_or(raw);
        let mut desired = o.current.max(o.min);
        if desired < up {
            desired = up;
        }
        if desired > down {
            desired = down;
        }
        if desired > raw && desired > o.current {
            // Held up by the scale-up window (not reached: its default is 0).
            reason.push_str(&format!("; held at {desired} by the scale-up window"));
        } else if desired > raw {
            reason.push_str(&format!(
                "; scale-down held at {desired}: the highest recommendation of the last {}",
                minutes_or_seconds(c.down_window_ms)
            ));
        }
        // Rate limits, counted from the count at the period's start.
        let recent = |period: i64| -> Vec<i64> {
            self.changes
                .iter()
                .filter(|(at, _)| *at > o.now - period)
                .map(|(_, d)| *d)
                .collect()
        };
        let current = i64::from(o.current);
        if desired > o.current {
            let ups: i64 = recent(c.up.period_ms).into_iter().filter(|d| *d > 0).sum();
            let start = (current - ups).max(0);
            let limit = (start + i64::from(c.up.replicas))
                .max(start + start * i64::from(c.up.percent) / 100)
                .max(current);
            if i64::from(desired) > limit {
                desired = limit as u32;
                reason.push_str(&format!(
                    "; limited to {desired} (at most +{} or +{} % per {})",
                    c.up.replicas,
                    c.up.percent,
                    minutes_or_seconds(c.up.period_ms)
                ));
            }
        } else if desired < o.current {
            let downs: i64 = recent(c.down.period_ms)
                .into_iter()
                .filter(|d| *d < 0)
                .map(|d| -d)
                .sum();
            let start = current + downs;
            let by_percent = start - start * i64::from(c.down.percent) / 100;
            let limit = (start - i64::from(c.down.replicas)).min(by_percent).max(0);
            if i64::from(desired) < limit {
                desired = limit.min(current) as u32;
                reason.push_str(&format!(
                    "; limited to {desired} (at most -{} % per {})",
                    c.down.percent,
                    minutes_or_seconds(c.down.period_ms)
                ));
            }
        }
        let desired = desired.clamp(o.min, o.max.max(o.min));
        let oldest = c.up.period_ms.max(c.down.period_ms);
        while self
            .changes
            .front()
            .is_some_and(|(at, _)| *at <= o.now - oldest)
        {
            self.changes.pop_front();
        }
        if desired != o.current {
            self.changes
                .push_back((o.now, i64::from(desired) - current));
        }
        Recommendation {
            replicas: desired,
            reason,
        }
    }
}

/// `300000` → `5 min`, for reasons.
fn minutes_or_seconds(ms: i64) -> String {
    if ms % 60_000 == 0 && ms > 0 {
        format!("{} min", ms / 60_000)
    } else {
        format!("{} s", ms / 1000)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: i64 = 60_000;

    fn obs(now: i64, current: u32, observed: f64) -> Observation {
        Observation {
            now,
            current,
            ready: current,
            observed: Some(observed),
            target: 10.0,
            min: 1,
            max: 20,
        }
    }

    #[test]
    fn the_hpa_formula_with_its_tolerance() {
        let mut r = Reactive::new(Config::default(), 0, 2);
        // 2 replicas at 25 per replica against 10: ceil(2 × 2.5) = 5.
        assert_eq!(r.recommend(obs(1000, 2, 25.0)).replicas, 5);
        // Within 10 %: unchanged, up or down.
        let mut r = Reactive::new(Config::default(), 0, 4);
        assert_eq!(r.recommend(obs(1000, 4, 10.9)).replicas, 4);
        assert_eq!(r.recommend(obs(2000, 4, 9.1)).replicas, 4);
        let out = r.recommend(obs(3000, 4, 11.1));
        assert_eq!(out.replicas, 5, "{}", out.reason);
        assert!(out.reason.contains("ceil(4 × 1.11) = 5"), "{}", out.reason);
        // Nothing measured: unchanged.
        let mut r = Reactive::new(Config::default(), 0, 3);
        let out = r.recommend(Observation {
            observed: None,
            ..obs(1000, 3, 0.0)
        });
        assert_eq!(out.replicas, 3);
        assert!(out.reason.contains("no load measured"));
    }

    #[test]
    fn bounds_hold_whatever_the_signal() {
        let mut r = Reactive::new(Config::default(), 0, 3);
        assert_eq!(
            r.recommend(obs(1000, 3, 1000.0)).replicas,
            7,
            "rate-limited first"
        );
        let mut r = Reactive::new(Config::default(), 0, 18);
        assert_eq!(r.recommend(obs(1000, 18, 1000.0)).replicas, 20);
        let mut r = Reactive::new(Config::default(), 0, 1);
        assert_eq!(r.recommend(obs(10 * MIN, 1, 0.0)).replicas, 1);
    }

    #[test]
    fn scale_down_waits_for_the_stabilisation_window() {
        let mut r = Reactive::new(Config::default(), 0, 8);
        // Load drops to a quarter at t = 1 min: 2 replicas would do.
        let out = r.recommend(obs(MIN, 8, 2.5));
        assert_eq!(out.replicas, 8);
        assert!(
            out.reason
                .contains("highest recommendation of the last 5 min"),
            "{}",
            out.reason
        );
        // Still within 5 minutes of the start's 8: held.
        assert_eq!(r.recommend(obs(4 * MIN, 8, 2.5)).replicas, 8);
        // Past the window (the start's 8 is 5 min old), the low load wins.
        assert_eq!(r.recommend(obs(5 * MIN + 1, 8, 2.5)).replicas, 2);
    }

    #[test]
    fn a_dip_inside_the_window_sheds_nothing() {
        let mut r = Reactive::new(Config::default(), 0, 4);
        for minute in 1..=20 {
            // Every fourth minute the load halves for a moment.
            let load = if minute % 4 == 0 { 5.0 } else { 10.0 };
            assert_eq!(
                r.recommend(obs(minute * MIN, 4, load)).replicas,
                4,
                "minute {minute}"
            );
        }
    }

    #[test]
    fn scale_up_is_rate_limited_per_period() {
        let mut r = Reactive::new(Config::default(), 0, 2);
        // 2 → 100 % or +4, whichever is more: 6.
        let out = r.recommend(obs(1000, 2, 100.0));
        assert_eq!(out.replicas, 6);
        assert!(out.reason.contains("limited to 6"), "{}", out.reason);
        // Within the same 15 s, the period started at 2: no further.
        assert_eq!(r.recommend(obs(5000, 6, 100.0 / 3.0)).replicas, 6);
        // Next period: from 6, up to 12.
        assert_eq!(r.recommend(obs(17_000, 6, 100.0 / 3.0)).replicas, 12);
    }

    #[test]
    fn replicas_still_loading_are_not_capacity() {
        // 4 set, 2 ready carrying 30 each against 10: ceil(2 × 3) = 6.
        let mut r = Reactive::new(Config::default(), 0, 4);
        let out = r.recommend(Observation {
            ready: 2,
            ..obs(1000, 4, 30.0)
        });
        assert_eq!(out.replicas, 6, "{}", out.reason);
        // Asked again while they load: the same answer, and the rate
        // limit still counts one change of +2.
        for t in 2..10 {
            let out = r.recommend(Observation {
                ready: 2,
                ..obs(t * 1000, 6, 30.0)
            });
            assert_eq!(out.replicas, 6, "{}", out.reason);
        }
        let out = r.recommend(Observation {
            ready: 2,
            ..obs(11_000, 6, 60.0)
        });
        // 2 × 6 = 12, limited to the period's start (4) + max(4, 100 %) = 8.
        assert_eq!(out.replicas, 8, "{}", out.reason);
    }

    #[test]
    fn scale_down_rate_limit_counts_from_the_period_start() {
        let config = Config {
            down_window_ms: 0,
            down: Rate {
                replicas: 1,
                percent: 50,
                period_ms: 60_000,
            },
            ..Config::default()
        };
        let mut r = Reactive::new(config, 0, 8);
        // Down by the larger of 1 replica or 50 %: to 4.
        assert_eq!(r.recommend(obs(1000, 8, 1.0)).replicas, 4);
        // Same minute: 8 was the count at its start, 4 is the floor.
        assert_eq!(r.recommend(obs(2000, 4, 1.0)).replicas, 4);
        // A minute later: halve again.
        assert_eq!(r.recommend(obs(62_000, 4, 1.0)).replicas, 2);
    }
}

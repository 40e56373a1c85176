//! The predictive part: a model's request rate by time of day and day of
//! week, learned from what the fleet served, forecast ahead.
//!
//! Seasonal Holt-Winters, additive, with two profiles: a slow level (the
//! week's mean, α = 0.002 per slot), a damped trend, a daily profile (one
//! deviation from the level per slot of the day, learned every day) and a
//! weekly one (per slot of the week, learned once a week), each updated by
//! exponential smoothing as every slot closes. A slot of the week seen at
//! least once is forecast from the weekly profile, otherwise from the
//! daily one: the daily shape is right after one day, a quiet weekend
//! after a week or two. The first full day of slots sets the level (its
//! mean) and the daily profile; forecasts exist from then on. (Taylor's
//! double-seasonal form, where both profiles add, let the daily profile
//! and a fast level absorb the weekend: a Saturday forecast three times
//! too high. Hence one profile at a time, and a level that moves slowly.)
//!
//! Slots are aligned to the Unix epoch, so with the default 24-hour day
//! a slot's index is its time of day (UTC). A shorter `day_ms` compresses
//! the calendar (the benchmark replays a day in minutes).

use shoal_api::UnixMillis;

/// Slot size, the day's length and the smoothing factors.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SeasonConfig {
    /// One slot, ms (default 5 min).
    pub slot_ms: i64,
    /// One day, ms (a multiple of `slot_ms`).
    pub day_ms: i64,
    /// Level smoothing.
    pub alpha: f64,
    /// Trend smoothing.
    pub beta: f64,
    /// Daily profile smoothing.
    pub gamma: f64,
    /// Weekly profile smoothing.
    pub delta: f64,
    /// Trend damping per slot.
    pub phi: f64,
}

impl Default for SeasonConfig {
    fn default() -> Self {
        SeasonConfig {
            slot_ms: 5 * 60_000,
            day_ms: 24 * 3_600_000,
            alpha: 0.002,
            beta: 0.01,
            gamma: 0.3,
            delta: 0.3,
            phi: 0.95,
        }
    }
}

impl SeasonConfig {
    /// Slots per day.
    pub fn slots_per_day(&self) -> usize {
        usize::try_from((self.day_ms / self.slot_ms).max(1)).unwrap_or(1)
    }

    /// The slot `at` falls in.
    pub fn slot_of(&self, at: UnixMillis) -> i64 {
        at.div_euclid(self.slot_ms)
    }

    /// When slot `slot` starts.
    pub fn start_of(&self, slot: i64) -> UnixMillis {
        slot * self.slot_ms
    }
}

#[derive(Debug, Clone)]
struct Model {
    level: f64,
    trend: f64,
    daily: Vec<f64>,
    weekly: Vec<f64>,
    /// Slots of the week seen at least once: their weekly value is used.
    seen: Vec<bool>,
    /// The last slot folded in.
    last: i64,
}

/// A learned load profile of one model.
#[derive(Debug, Clone)]
pub struct Seasonal {
    config: SeasonConfig,
    /// The slot being measured and its sum and count.
    open: Option<(i64, f64, u32)>,
    /// Closed slots before the model exists (the first day).
    first: Vec<(i64, f64)>,
    model: Option<Model>,
    peak: f64,
    slots: u64,
}

impl Seasonal {
    /// Nothing learned yet.
    pub fn new(config: SeasonConfig) -> Seasonal {
        Seasonal {
            config,
            open: None,
            first: Vec::new(),
            model: None,
            peak: 0.0,
            slots: 0,
        }
    }

    /// The configuration.
    pub fn config(&self) -> &SeasonConfig {
        &self.config
    }

    /// Takes a measurement of the request rate at `at`. A slot closes (and
    /// is learned from) when the first measurement of a later slot comes.
    pub fn observe(&mut self, at: UnixMillis, rps: f64) {
        if !rps.is_finite() || rps < 0.0 {
            return;
        }
        let slot = self.config.slot_of(at);
        match self.open {
            Some((open, sum, n)) if open == slot => self.open = Some((open, sum + rps, n + 1)),
            Some((open, _, _)) if open > slot => {} // late: ignored
            Some((open, sum, n)) => {
                self.close(open, sum / f64::from(n.max(1)));
                self.open = Some((slot, rps, 1));
            }
            None => self.open = Some((slot, rps, 1)),
        }
    }

    fn close(&mut self, slot: i64, y: f64) {
        self.slots += 1;
        self.peak = self.peak.max(y);
        let c = self.config;
        let per_day = c.slots_per_day();
        let Some(m) = self.model.as_mut() else {
            self.first.push((slot, y));
            let span = slot - self.first[0].0 + 1;
            if span >= per_day as i64 {
                let mean = self.first.iter().map(|(_, y)| y).sum::<f64>() / self.first.len() as f64;
                let mut daily = vec![0.0; per_day];
                for (s, y) in &self.first {
                    daily[index(*s, per_day)] = y - mean;
                }
                self.model = Some(Model {
                    level: mean,
                    trend: 0.0,
                    daily,
                    weekly: vec![0.0; per_day * 7],
                    seen: vec![false; per_day * 7],
                    last: slot,
                });
                self.first.clear();
            }
            return;
        };
        let (di, wi) = (index(slot, per_day), index(slot, per_day * 7));
        let seasonal = if m.seen[wi] {
            m.weekly[wi]
        } else {
            m.daily[di]
        };
        let previous = m.level;
        // Slots with no measurement in between: carry the level forward
        // along the (damped) trend.
        let gap = (slot - m.last).max(1);
        let carried = previous + damped(m.trend, c.phi, gap);
        m.level = c.alpha * (y - seasonal) + (1.0 - c.alpha) * carried;
        m.trend = c.beta * (m.level - previous) / gap as f64 + (1.0 - c.beta) * m.trend * c.phi;
        let deviation = y - m.level;
        m.daily[di] = c.gamma * deviation + (1.0 - c.gamma) * m.daily[di];
        m.weekly[wi] = if m.seen[wi] {
            c.delta * deviation + (1.0 - c.delta) * m.weekly[wi]
        } else {
            // First sight of this slot of the week: half what it showed,
            // half what the days say.
            0.5 * deviation + 0.5 * m.daily[di]
        };
        m.seen[wi] = true;
        m.last = slot;
    }

    /// True once a full day has been learned.
    pub fn ready(&self) -> bool {
        self.model.is_some()
    }

    /// Days of load seen.
    pub fn days_learned(&self) -> f64 {
        self.slots as f64 / self.config.slots_per_day() as f64
    }

    /// The highest slot mean seen.
    pub fn peak(&self) -> f64 {
        self.peak
    }

    /// The expected request rate in the slot `at` falls in (never
    /// negative); `None` before a day is learned.
    pub fn forecast(&self, at: UnixMillis) -> Option<f64> {
        let m = self.model.as_ref()?;
        let c = self.config;
        let per_day = c.slots_per_day();
        let slot = c.slot_of(at);
        let ahead = (slot - m.last).max(0);
        let (di, wi) = (index(slot, per_day), index(slot, per_day * 7));
        let seasonal = if m.seen[wi] {
            m.weekly[wi]
        } else {
            m.daily[di]
        };
        let value = m.level + damped(m.trend, c.phi, ahead) + seasonal;
        Some(value.max(0.0))
    }

    /// The highest forecast over the slots from `from` to `to` inclusive.
    pub fn forecast_max(&self, from: UnixMillis, to: UnixMillis) -> Option<f64> {
        let c = self.config;
        let (first, last) = (c.slot_of(from), c.slot_of(to.max(from)));
        (first..=last)
            .filter_map(|s| self.forecast(c.start_of(s)))
            .reduce(f64::max)
    }
}

fn index(slot: i64, period: usize) -> usize {
    usize::try_from(slot.rem_euclid(period as i64)).unwrap_or(0)
}

/// The trend's contribution `ahead` slots on: `trend × (φ + φ² + … + φ^ahead)`.
fn damped(trend: f64, phi: f64, ahead: i64) -> f64 {
    if ahead <= 0 {
        return 0.0;
    }
    if (phi - 1.0).abs() < f64::EPSILON {
        return trend * ahead as f64;
    }
    trend * phi * (1.0 - phi.powi(i32::try_from(ahead).unwrap_or(i32::MAX))) / (1.0 - phi)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: i64 = 3_600_000;
    const DAY: i64 = 24 * HOUR;

    /// Quiet nights (10/s), a sharp ramp at 08:00 to 200/s, evening 60/s.
    pub(crate) fn daily_load(at: UnixMillis) -> f64 {
        let hour = at.rem_euclid(DAY) / HOUR;
        match hour {
            0..8 => 10.0,
            8..18 => 200.0,
            18..22 => 60.0,
            _ => 10.0,
        }
    }

    fn learn(days: i64, load: impl Fn(UnixMillis) -> f64) -> Seasonal {
        let mut s = Seasonal::new(SeasonConfig::default());
        // A measurement every 10 s, as the control plane samples.
        let mut at = 0;
        while at < days * DAY {
            s.observe(at, load(at));
            at += 10_000;
        }
        s
    }

    #[test]
    fn nothing_is_forecast_before_a_day_is_learned() {
        let s = learn(0, daily_load);
        assert!(!s.ready());
        let mut s = Seasonal::new(SeasonConfig::default());
        for i in 0..(DAY / 10_000 - 100) {
            s.observe(i * 10_000, 5.0);
        }
        assert!(!s.ready());
        assert_eq!(s.forecast(DAY), None);
    }

    #[test]
    fn a_daily_pattern_is_forecast_after_days_of_it() {
        let s = learn(3, daily_load);
        assert!(s.ready());
        assert!(
            (s.days_learned() - 3.0).abs() < 0.01,
            "{}",
            s.days_learned()
        );
        assert_eq!(s.peak(), 200.0);
        // Day 4: each hour forecast within 10 % of what will come.
        for hour in 0..24 {
            let at = 3 * DAY + hour * HOUR + 30 * 60_000;
            let want = daily_load(at);
            let got = s.forecast(at).unwrap();
            assert!(
                (got - want).abs() <= want * 0.1,
                "{hour}:30 forecast {got}, load {want}"
            );
        }
        // At 07:50 the ramp is 10 minutes away: the next quarter hour's
        // maximum already sees it.
        let now = 3 * DAY + 7 * HOUR + 50 * 60_000;
        assert!(s.forecast(now).unwrap() < 20.0);
        assert!(s.forecast_max(now, now + 15 * 60_000).unwrap() > 180.0);
    }

    #[test]
    fn the_week_profile_learns_a_quiet_weekend() {
        // Epoch day 0 is a Thursday; days 2 and 3 are the weekend.
        let weekly = |at: UnixMillis| {
            let day = at.div_euclid(DAY).rem_euclid(7);
            if day == 2 || day == 3 {
                daily_load(at) * 0.3
            } else {
                daily_load(at)
            }
        };
        let s = learn(7 * 5, weekly);
        let noon_saturday = 7 * 5 * DAY + 2 * DAY + 12 * HOUR;
        let noon_monday = 7 * 5 * DAY + 4 * DAY + 12 * HOUR;
        let (sat, mon) = (
            s.forecast(noon_saturday).unwrap(),
            s.forecast(noon_monday).unwrap(),
        );
        assert!(
            (sat - 60.0).abs() < 10.0 && (mon - 200.0).abs() < 15.0,
            "saturday {sat}, monday {mon}"
        );
    }

    #[test]
    fn a_growing_load_is_followed_by_the_trend_without_running_away() {
        // 5 more requests per second each day.
        let growing = |at: UnixMillis| daily_load(at) + 5.0 * at as f64 / DAY as f64;
        let s = learn(6, growing);
        let at = 6 * DAY + 12 * HOUR;
        let got = s.forecast(at).unwrap();
        let want = growing(at);
        assert!(
            (got - want).abs() < want * 0.05,
            "forecast {got}, load {want}"
        );
        // Damped: a week ahead stays within reason.
        assert!(s.forecast(13 * DAY + 12 * HOUR).unwrap() < want * 2.0);
    }

    #[test]
    fn bad_and_late_measurements_change_nothing() {
        let mut a = learn(2, daily_load);
        let b = a.clone();
        a.observe(2 * DAY - 10 * 60_000, 1e9); // late: its slot is closed
        a.observe(2 * DAY, f64::NAN);
        a.observe(2 * DAY, -3.0);
        assert_eq!(a.forecast(2 * DAY + HOUR), b.forecast(2 * DAY + HOUR));
    }
}

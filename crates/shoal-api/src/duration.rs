//! Durations at the edges: documents carry timestamps as [`UnixMillis`]
//! and durations as numbers (seconds in requests, milliseconds in stored
//! rollout state); code in between holds a [`Duration`]. This module is the
//! one place those meet: checked conversion from request seconds, serde for
//! stored milliseconds, and timestamp arithmetic.

use std::time::Duration;

use crate::UnixMillis;

/// `secs` from a request as a [`Duration`], or a message naming `what`
/// when it is negative, not a number or too large.
pub fn from_secs(what: &str, secs: f64) -> Result<Duration, String> {
    Duration::try_from_secs_f64(secs).map_err(|_| {
        format!("{what} must be a non-negative number of seconds, e.g. 30 (got {secs})")
    })
}

/// A duration as whole milliseconds, saturating.
pub fn as_millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// Whole milliseconds (negative counts as zero) as a duration.
pub fn from_millis(ms: i64) -> Duration {
    Duration::from_millis(u64::try_from(ms).unwrap_or(0))
}

/// `d` after `at`, saturating.
pub fn after(at: UnixMillis, d: Duration) -> UnixMillis {
    at.saturating_add(as_millis(d))
}

/// A timestamp as a [`std::time::SystemTime`] (before the epoch: the epoch).
pub fn as_system_time(at: UnixMillis) -> std::time::SystemTime {
    std::time::UNIX_EPOCH + from_millis(at)
}

/// `d` as people say it in messages: 500ms, 30s, 10m, 1m30s, 1h, 1h30m.
pub fn human(d: Duration) -> String {
    let ms = d.as_millis();
    let s = d.as_secs();
    match s {
        _ if ms < 1000 => format!("{ms}ms"),
        0..60 => format!("{s}s"),
        60..3600 if s.is_multiple_of(60) => format!("{}m", s / 60),
        60..3600 => format!("{}m{}s", s / 60, s % 60),
        _ if s.is_multiple_of(3600) => format!("{}h", s / 3600),
        _ => format!("{}h{}m", s / 3600, (s % 3600) / 60),
    }
}

/// Time from `since` to `now`; zero if the clock went back.
pub fn between(since: UnixMillis, now: UnixMillis) -> Duration {
    from_millis(now.saturating_sub(since))
}

/// Serde for a [`Duration`] stored as whole milliseconds (the encoding
/// persisted rollouts already use): `#[serde(with = "shoal_api::duration::millis")]`.
pub mod millis {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    /// Writes whole milliseconds.
    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_i64(super::as_millis(*d))
    }

    /// Reads whole milliseconds (negative as zero).
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        i64::deserialize(d).map(super::from_millis)
    }
}

/// Serde for a list of durations stored as whole milliseconds.
pub mod millis_vec {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    /// Writes whole milliseconds.
    pub fn serialize<S: Serializer>(ds: &[Duration], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(ds.iter().map(|d| super::as_millis(*d)))
    }

    /// Reads whole milliseconds (negative as zero).
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Duration>, D::Error> {
        Vec::<i64>::deserialize(d).map(|v| v.into_iter().map(super::from_millis).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_seconds_are_checked() {
        assert_eq!(from_secs("bake", 1.5), Ok(Duration::from_millis(1500)));
        assert_eq!(from_secs("bake", 0.0), Ok(Duration::ZERO));
        for bad in [-1.0, f64::NAN, f64::INFINITY, 1e300] {
            let err = from_secs("bake_secs", bad).unwrap_err();
            assert!(
                err.starts_with("bake_secs must be a non-negative number of seconds"),
                "{err}"
            );
        }
    }

    #[test]
    fn stored_milliseconds_round_trip() {
        #[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug)]
        struct Stored {
            #[serde(with = "millis")]
            bake_ms: Duration,
            #[serde(with = "millis_vec")]
            bakes_ms: Vec<Duration>,
        }
        let s = Stored {
            bake_ms: Duration::from_secs(30),
            bakes_ms: vec![Duration::from_secs(1), Duration::from_millis(5)],
        };
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(json, r#"{"bake_ms":30000,"bakes_ms":[1000,5]}"#);
        assert_eq!(serde_json::from_str::<Stored>(&json).unwrap(), s);
    }

    #[test]
    fn durations_read_naturally() {
        for (ms, text) in [
            (500, "500ms"),
            (30_000, "30s"),
            (600_000, "10m"),
            (90_000, "1m30s"),
            (3_600_000, "1h"),
            (5_400_000, "1h30m"),
        ] {
            assert_eq!(human(Duration::from_millis(ms)), text);
        }
    }

    #[test]
    fn timestamp_arithmetic_saturates() {
        assert_eq!(after(1_000, Duration::from_secs(2)), 3_000);
        assert_eq!(between(1_000, 3_500), Duration::from_millis(2_500));
        assert_eq!(between(3_500, 1_000), Duration::ZERO);
        assert_eq!(after(i64::MAX - 1, Duration::from_secs(1)), i64::MAX);
    }
}

//! Protection: API keys for inference, a token bucket per key (the defence
//! against extracting a model by mass querying), and payload logging with
//! personal data redacted.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use regex::Regex;
use shoal_http::{Headers, header_str};

/// Settings of protection.
#[derive(Debug, Clone, Default)]
pub struct ProtectionConfig {
    /// API keys: secret → name. Empty means no keys required.
    pub api_keys: HashMap<String, String>,
    /// Requests per second allowed per key (per client address when keys
    /// are off); `None` for no limit.
    pub rate_per_sec: Option<u32>,
    /// Burst above the rate.
    pub burst: Option<u32>,
    /// Log request bodies (redacted, truncated).
    pub log_payloads: bool,
}

/// Checks keys and limits.
pub(crate) struct Protection {
    keys: HashMap<String, String>,
    limiter: Option<DefaultKeyedRateLimiter<String>>,
    /// Present when payload logging is on.
    redactor: Option<Redactor>,
}

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// No key, or an unknown one.
    Unauthorized(String),
    /// Over the rate; retry after this many seconds. `label` is what
    /// metrics count it under: the API key's name, or `anonymous` when
    /// callers are told apart only by address.
    RateLimited {
        key: String,
        label: String,
        retry_after: u64,
    },
}

impl Protection {
    pub(crate) fn new(config: &ProtectionConfig) -> Result<Protection, String> {
        let limiter = match config.rate_per_sec {
            None => None,
            Some(rate) => {
                let rate = NonZeroU32::new(rate)
                    .ok_or("the rate limit must be at least 1 request per second")?;
                let burst = NonZeroU32::new(config.burst.unwrap_or(rate.get())).unwrap_or(rate);
                Some(RateLimiter::keyed(
                    Quota::per_second(rate).allow_burst(burst),
                ))
            }
        };
        Ok(Protection {
            keys: config.api_keys.clone(),
            limiter,
            redactor: config.log_payloads.then(Redactor::new),
        })
    }

    /// Identifies the caller and applies its rate limit. Returns the name
    /// to account the request to (empty when nothing would read it: no
    /// keys, no rate limit, no payload logging).
    pub(crate) fn admit(
        &self,
        headers: &impl Headers,
        peer: Option<std::net::SocketAddr>,
    ) -> Result<String, Refusal> {
        let who = if self.keys.is_empty() {
            if self.limiter.is_none() && self.redactor.is_none() {
                // Nobody reads the caller's name: not worth formatting.
                return Ok(String::new());
            }
            // Without API keys, each client address has its own limit;
            // the address is never a metric label (see `Refusal::label`).
            peer.map_or_else(|| "anonymous".to_owned(), |p| p.ip().to_string())
        } else {
            const API_KEY: http::HeaderName = http::HeaderName::from_static("x-api-key");
            let [key, authorization] = headers.find([&API_KEY, &http::header::AUTHORIZATION]);
            let presented = key.and_then(header_str).or_else(|| {
                authorization
                    .and_then(header_str)
                    .and_then(|v| v.strip_prefix("Bearer "))
            });
            let key = presented.ok_or_else(|| {
                Refusal::Unauthorized("an API key is required: send it as `x-api-key: KEY` or `Authorization: Bearer KEY`".into())
            })?;
            self.keys
                .get(key)
                .cloned()
                .ok_or_else(|| Refusal::Unauthorized("unknown API key".into()))?
        };
        if let Some(limiter) = &self.limiter
            && let Err(not_until) = limiter.check_key(&who)
        {
            let wait = not_until.wait_time_from(DefaultClock::default().now());
            let label = if self.keys.is_empty() {
                "anonymous".to_owned()
            } else {
                who.clone()
            };
            return Err(Refusal::RateLimited {
                key: who,
                label,
                retry_after: wait.max(Duration::from_secs(1)).as_secs_f64().ceil() as u64,
            });
        }
        Ok(who)
    }

    /// Logs a request body, redacted, when payload logging is on.
    pub(crate) fn log_payload(&self, model: &str, who: &str, body: &[u8]) {
        let Some(redactor) = &self.redactor else {
            return;
        };
        let text = String::from_utf8_lossy(&body[..body.len().min(2048)]);
        tracing::info!(model, caller = who, payload = %redactor.redact(&text), "request payload");
    }
}

/// Replaces e-mail addresses, phone numbers and card-like digit runs.
pub struct Redactor {
    patterns: Vec<(Regex, &'static str)>,
}

impl Default for Redactor {
    fn default() -> Self {
        Redactor::new()
    }
}

impl Redactor {
    /// The standard patterns.
    pub fn new() -> Redactor {
        let patterns = [
            (r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}", "[email]"),
            (r"\b(?:\d[ -]?){13,19}\b", "[card]"),
            (
                r"\+?\d{1,3}?[ .-]?\(?\d{2,4}\)?[ .-]?\d{3,4}[ .-]?\d{3,4}\b",
                "[phone]",
            ),
        ];
        Redactor {
            patterns: patterns
                .into_iter()
                .filter_map(|(p, r)| Regex::new(p).ok().map(|re| (re, r)))
                .collect(),
        }
    }

    /// `text` with personal data replaced.
    pub fn redact(&self, text: &str) -> String {
        let mut out = text.to_owned();
        for (re, replacement) in &self.patterns {
            out = re.replace_all(&out, *replacement).into_owned();
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use http::HeaderMap;

    use super::*;

    #[test]
    fn personal_data_is_redacted() {
        let r = Redactor::new();
        let text = r#"{"note": "mail jane.doe@example.com or call +44 20 7946 0958, card 4111 1111 1111 1111", "data": [0.5, 16.0]}"#;
        let out = r.redact(text);
        assert!(!out.contains("jane.doe"), "{out}");
        assert!(!out.contains("7946"), "{out}");
        assert!(!out.contains("4111"), "{out}");
        assert!(
            out.contains("[email]") && out.contains("[phone]") && out.contains("[card]"),
            "{out}"
        );
        assert!(out.contains("[0.5, 16.0]"), "tensor data survives: {out}");
    }

    #[test]
    fn keys_and_rates() {
        let config = ProtectionConfig {
            api_keys: [("s3cret".to_owned(), "team-a".to_owned())].into(),
            rate_per_sec: Some(2),
            burst: Some(2),
            log_payloads: false,
        };
        let p = Protection::new(&config).unwrap();
        let mut h = HeaderMap::new();
        assert!(matches!(p.admit(&h, None), Err(Refusal::Unauthorized(_))));
        h.insert("x-api-key", "wrong".parse().unwrap());
        assert_eq!(
            p.admit(&h, None),
            Err(Refusal::Unauthorized("unknown API key".into()))
        );
        h.insert("x-api-key", "s3cret".parse().unwrap());
        assert_eq!(p.admit(&h, None), Ok("team-a".into()));
        assert_eq!(p.admit(&h, None), Ok("team-a".into()));
        assert!(matches!(
            p.admit(&h, None),
            Err(Refusal::RateLimited { retry_after: 1, .. })
        ));
        let mut bearer = HeaderMap::new();
        bearer.insert(
            http::header::AUTHORIZATION,
            "Bearer s3cret".parse().unwrap(),
        );
        assert!(
            matches!(p.admit(&bearer, None), Err(Refusal::RateLimited { .. })),
            "same key, same bucket"
        );
    }
}

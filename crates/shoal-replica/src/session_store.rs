//! Sequences' state in Redis (`--session-store redis://HOST:PORT[/DB]`),
//! so that any replica can continue a sequence whose replica died.
//!
//! Each sequence is a hash at `shoal:seq:{model}:{id}`: `steps` (how many
//! steps it has taken), `version` and `data` (its state, packed), expiring
//! after the idle limit. Memory stays the fast path; Redis is the truth:
//! - after every step the replica writes the new state with a check-and-set
//!   (a Lua script) that succeeds only if Redis is not ahead of the state
//!   the step started from. If another replica advanced the sequence
//!   meanwhile (the gateway rerouted it while this one was ejected), the
//!   write is refused, the answer is not sent, and the step runs again on
//!   the state Redis has;
//! - a step for a sequence this replica does not hold reads it from Redis.
//!
//! With Redis unreachable, steps a replica holds in memory go on (the
//! replica reports itself degraded in `/ready` and a metric), and their
//! state reaches Redis again with the first write after it is back;
//! sequences it does not hold cannot continue and say so. What is
//! guaranteed is in ARCHITECTURE.md.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use shoal_core::Tensor;
use shoal_oip::sequence::SequenceId;

/// Why the store could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("session store: {0}")]
pub struct StoreError(pub String);

fn store_error(e: impl std::fmt::Display) -> StoreError {
    StoreError(e.to_string())
}

/// A sequence as the store keeps it.
#[derive(Debug, Clone, PartialEq)]
pub struct Saved {
    /// The version it started on.
    pub version: String,
    /// Which start of the sequence id this is (random per start): a copy
    /// of another run is stale, however many steps it has.
    pub run: u64,
    /// Steps taken.
    pub steps: u64,
    /// The state the next step takes.
    pub state: Vec<Tensor>,
}

/// What a write found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Written {
    /// Stored.
    Saved,
    /// The store is ahead: another replica took steps this one did not
    /// see, or started the sequence again.
    Behind,
    /// The sequence was ended (on another replica).
    Ended,
}

/// Writes the new state unless the store is ahead of the state the step
/// started from: more steps, another run of the id, or ended. A start
/// (ARGV[6] = 1) writes whatever is there. Returns -1 when written, -2
/// when ended, else the steps held.
const SAVE: &str = r"
local held = redis.call('HMGET', KEYS[1], 'steps', 'run', 'ended')
if ARGV[6] ~= '1' then
  if held[3] then return -2 end
  if held[2] and held[2] ~= ARGV[7] then return tonumber(held[1]) end
  if held[1] and tonumber(held[1]) > tonumber(ARGV[1]) then return tonumber(held[1]) end
end
if held[3] then redis.call('HDEL', KEYS[1], 'ended') end
redis.call('HSET', KEYS[1], 'steps', ARGV[2], 'version', ARGV[3], 'data', ARGV[4], 'run', ARGV[7])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
return -1
";

/// Marks a sequence ended (kept, so a replica still holding an older
/// copy cannot bring it back, until the idle limit passes).
const END: &str = r"
redis.call('HSET', KEYS[1], 'ended', '1')
redis.call('HDEL', KEYS[1], 'data')
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return 1
";

/// A connection to Redis for sequences' state.
pub struct RedisStore {
    url: String,
    manager: tokio::sync::OnceCell<ConnectionManager>,
    client: redis::Client,
    ttl: Duration,
    save: redis::Script,
    end: redis::Script,
    degraded: AtomicBool,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

/// The key of `model`'s sequence `id`.
fn key(model: &str, id: &SequenceId) -> String {
    format!("shoal:seq:{model}:{}", id.key())
}

impl RedisStore {
    /// A store at `url` (`redis://HOST:PORT[/DB]`), keeping sequences for
    /// `ttl` after their last step. Connects on first use, and again after
    /// failures, so a replica starts while Redis is down.
    pub fn new(url: &str, ttl: Duration) -> Result<RedisStore, StoreError> {
        if !url.starts_with("redis://") {
            return Err(StoreError(format!(
                "{url:?}: expected redis://HOST:PORT[/DB] (or memory)"
            )));
        }
        let client = redis::Client::open(url).map_err(store_error)?;
        Ok(RedisStore {
            url: url.to_owned(),
            manager: tokio::sync::OnceCell::new(),
            client,
            ttl,
            save: redis::Script::new(SAVE),
            end: redis::Script::new(END),
            degraded: AtomicBool::new(false),
        })
    }

    /// The URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// True while the last operation failed.
    pub fn degraded(&self) -> bool {
        self.degraded.load(Ordering::SeqCst)
    }

    fn noted<T>(&self, result: Result<T, StoreError>) -> Result<T, StoreError> {
        self.degraded.store(result.is_err(), Ordering::SeqCst);
        if let Err(e) = &result {
            tracing::warn!(error = %e, "session store unavailable; sequences continue from memory where they can");
        }
        result
    }

    async fn connection(&self) -> Result<ConnectionManager, StoreError> {
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_millis(500)))
            .set_response_timeout(Some(Duration::from_millis(500)))
            .set_number_of_retries(1);
        self.manager
            .get_or_try_init(|| ConnectionManager::new_with_config(self.client.clone(), config))
            .await
            .cloned()
            .map_err(store_error)
    }

    /// `model`'s sequence `id`, if the store has it.
    pub async fn load(&self, model: &str, id: &SequenceId) -> Result<Option<Saved>, StoreError> {
        let result = async {
            let mut conn = self.connection().await?;
            type Fields = (Option<u64>, Option<String>, Option<Vec<u8>>, Option<u64>);
            let (steps, version, data, run): Fields = redis::cmd("HMGET")
                .arg(key(model, id))
                .arg("steps")
                .arg("version")
                .arg("data")
                .arg("run")
                .query_async(&mut conn)
                .await
                .map_err(store_error)?;
            // An ended sequence has no data.
            let (Some(steps), Some(version), Some(data), Some(run)) = (steps, version, data, run)
            else {
                return Ok(None);
            };
            let state = shoal_oip::binary::unpack(&data).map_err(store_error)?;
            Ok(Some(Saved {
                version,
                run,
                steps,
                state,
            }))
        }
        .await;
        self.noted(result)
    }

    /// Writes `saved` (taken from a state of `from` steps of the same run)
    /// unless the store is ahead of it; a `start` writes regardless.
    pub async fn save(
        &self,
        model: &str,
        id: &SequenceId,
        from: u64,
        start: bool,
        saved: &Saved,
    ) -> Result<Written, StoreError> {
        let result = async {
            let mut conn = self.connection().await?;
            let ttl_ms = u64::try_from(self.ttl.as_millis())
                .unwrap_or(u64::MAX)
                .max(1);
            let held: i64 = self
                .save
                .key(key(model, id))
                .arg(from)
                .arg(saved.steps)
                .arg(&saved.version)
                .arg(shoal_oip::binary::pack(&saved.state))
                .arg(ttl_ms)
                .arg(if start { "1" } else { "0" })
                .arg(saved.run)
                .invoke_async(&mut conn)
                .await
                .map_err(store_error)?;
            Ok(match held {
                -1 => Written::Saved,
                -2 => Written::Ended,
                _ => Written::Behind,
            })
        }
        .await;
        self.noted(result)
    }

    /// Marks `model`'s sequence `id` ended.
    pub async fn end(&self, model: &str, id: &SequenceId) -> Result<(), StoreError> {
        let result = async {
            let mut conn = self.connection().await?;
            let ttl_ms = u64::try_from(self.ttl.as_millis())
                .unwrap_or(u64::MAX)
                .max(1);
            self.end
                .key(key(model, id))
                .arg(ttl_ms)
                .invoke_async::<i64>(&mut conn)
                .await
                .map(|_| ())
                .map_err(store_error)
        }
        .await;
        self.noted(result)
    }
}

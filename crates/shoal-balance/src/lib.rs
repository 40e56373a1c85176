//! The gateway's decisions, kept pure so they can be tested exactly.
//!
//! - [`ewma::PeakEwma`]: a latency estimate that jumps up at once on a slow
//!   response and decays back slowly (Finagle/Linkerd's peak-EWMA).
//! - [`pick::p2c`]: power of two choices over cost = latency estimate ×
//!   (outstanding + 1) ÷ slow-start weight.
//! - [`health::Health`]: outlier ejection. Refused or reset connections and
//!   timeouts eject at once; repeated 5xx eject; re-admission after an
//!   exponential backoff, then a slow start.
//! - [`hash`]: rendezvous hashing for sticky sessions (a replica leaving
//!   moves only its own sessions) and stable version splits by user key.
//!
//! Why not tower's `balance`: a gateway request is routed among the
//! replicas serving one model version in one region, a set that differs per
//! request; tower's `Balance` balances over one fixed set of services.
//! These functions take the candidate set per call instead.
//!
//! Time enters as `Duration`s since an arbitrary origin, so callers can use
//! tokio's (pausable) clock and tests can use plain numbers.

pub mod ewma;
pub mod hash;
pub mod health;
pub mod pick;

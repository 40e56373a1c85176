//! Pure decisions about the fleet, tested without sockets or clocks.
//!
//! - [`plan`]: from deployments, registered replicas and version records to
//!   the [`shoal_api::fleet::DesiredState`] of each replica.
//! - [`rolling`], [`canary`] (with its judge), [`bluegreen`]: the rollout
//!   controllers, state machines fed with what the fleet reports and
//!   answering with what to change; [`shadow`] and [`experiment`] (A/B,
//!   bandit) are judged on what gateways report; [`controller::Controller`]
//!   is the one type the registry persists; [`progress`] is what every
//!   controller records about where it stands.
//!
//! The control plane wraps these with I/O: it persists controller snapshots
//! in the registry, feeds heartbeats in, and publishes desired states.
//! Time enters only as values passed in (`now` in milliseconds).

pub mod bluegreen;
pub mod canary;
pub mod controller;
pub mod experiment;
pub mod plan;
pub mod progress;
pub mod rolling;
pub mod shadow;

pub use controller::Controller;
pub use plan::{FleetFacts, ReplicaFacts};
pub use rolling::Rolling;

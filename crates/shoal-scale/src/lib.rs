//! Capacity decisions, kept pure so they can be tested exactly, like the
//! rollout controllers: the control plane feeds them facts and the time,
//! and carries out what they answer.
//!
//! - [`placement::place`]: which replicas load a model that should run on
//!   N of them — sticky (a placed replica stays placed while it lives),
//!   spread over regions, balanced by measured memory, honouring a
//!   minimum on on-demand capacity.
//! - [`reactive::Reactive`]: the Kubernetes HPA algorithm on a per-model
//!   signal: `ceil(current × observed ÷ target)` with a tolerance, rate
//!   limits and a scale-down stabilisation window.
//! - [`predict::Seasonal`]: double-seasonal Holt-Winters (a level, a
//!   trend, a time-of-day and a day-of-week profile) over the model's
//!   request rate, forecasting ahead by the time a replica takes to load.
//! - [`recommend`]: the two together (the larger wins), the right-sizing
//!   figure and the next predicted change.
//! - [`signals::LoadWindow`]: requests per second and p99 over a sliding
//!   window, from the fleet's cumulative counters.
//!
//! Time is [`shoal_api::UnixMillis`]: the predictor needs the time of day.

pub mod placement;
pub mod predict;
pub mod reactive;
pub mod recommend;
pub mod signals;

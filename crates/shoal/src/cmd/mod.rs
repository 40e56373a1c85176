//! One module per command family; each turns arguments into calls on the
//! library crates and formats what comes back.

pub(crate) mod bench;
pub(crate) mod client;
pub(crate) mod control;
pub(crate) mod gateway;
pub(crate) mod replica;

/// Resolves after SIGINT or SIGTERM, logging that shutdown started.
pub(crate) async fn shutdown_requested() {
    shoal_http::shutdown_signal().await;
    tracing::info!("shutting down: finishing requests in flight");
}

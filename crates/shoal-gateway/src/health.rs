//! Active health checks: every interval, each endpoint is asked what it
//! serves (`GET /admin/models`). An answer updates what the gateway routes
//! to it and whether it is taking traffic (not shutting down); no answer in
//! time ejects it, like a refused connection would.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use shoal_api::VersionKey;
use shoal_api::replica::AdminListing;
use shoal_balance::health::Failure;

use crate::Gateway;
use crate::routes::Endpoint;

async fn check(gateway: &Gateway, endpoint: &Arc<Endpoint>) {
    let timeout = gateway
        .config
        .health_interval
        .max(Duration::from_millis(200));
    let started = tokio::time::Instant::now();
    let mut request = http::Request::get(shoal_api::member_url(&endpoint.address, "/admin/models"));
    // Replicas keep their admin API behind the fleet token.
    if let Some(token) = &gateway.config.token {
        request = request.header(http::header::AUTHORIZATION, format!("Bearer {token}"));
    }
    let request = request.body(Full::new(Bytes::new()));
    let Ok(request) = request else { return };
    let answer = tokio::time::timeout(timeout, async {
        let response = gateway.client.request(request).await.ok()?;
        if !response.status().is_success() {
            return None;
        }
        let body = response.into_body().collect().await.ok()?.to_bytes();
        serde_json::from_slice::<AdminListing>(&body).ok()
    })
    .await
    .ok()
    .flatten();
    let now = gateway.now();
    match answer {
        Some(listing) => {
            let serving: BTreeSet<VersionKey> = listing.serving_keys().collect();
            endpoint.checked(serving, !listing.shutting_down);
        }
        None => {
            if endpoint.failed(
                Failure::HealthCheck,
                started.elapsed(),
                now,
                gateway.routes.policy(),
            ) {
                gateway.metrics.ejected(&endpoint.id, "health_check");
                tracing::warn!(replica = %endpoint.id, "health check failed; ejected");
            }
        }
    }
}

/// Checks every endpoint at the configured interval until aborted.
pub async fn run(gateway: Arc<Gateway>) {
    let mut interval = tokio::time::interval(gateway.config.health_interval);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        let endpoints = gateway.routes.snapshot().endpoints.clone();
        futures::future::join_all(endpoints.iter().map(|e| check(&gateway, e))).await;
    }
}

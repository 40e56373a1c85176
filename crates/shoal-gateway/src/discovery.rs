//! Where endpoints and policies come from.
//!
//! With a control plane: its routing watch stream; every table received is
//! applied and written to `<data-dir>/routing.json`, so a gateway started
//! while the control plane is down routes with the last table it knew. The
//! stream reconnects with backoff; nothing blocks serving meanwhile.
//! With `--events nats://…`: the same tables from NATS JetStream instead
//! of the watch stream (the latest first, then each new one).
//! Without one: a static list of replicas, whose health checks say what
//! each serves.

use std::sync::Arc;

use futures::StreamExt;
use shoal_api::fleet::RoutingTable;
use shoal_client::ApiClient;

use crate::Gateway;

/// Routes by `table` at once, then writes it to the data directory (off
/// the runtime's threads: a slow disk must not stall requests).
async fn apply(gateway: &Gateway, table: &RoutingTable) {
    gateway.routes.apply(table, gateway.now());
    let Ok(bytes) = serde_json::to_vec(table) else {
        return;
    };
    let dir = gateway.config.data_dir.clone();
    let path = dir.join("routing.json");
    let tmp = path.with_extension("json.tmp");
    let written = async {
        tokio::fs::create_dir_all(&dir).await?;
        tokio::fs::write(&tmp, bytes).await?;
        tokio::fs::rename(&tmp, &path).await
    };
    if let Err(e) = written.await {
        tracing::warn!(error = %e, path = %path.display(), "could not keep the routing table for restarts");
    }
}

/// Applies the table kept in `<data-dir>/routing.json` by an earlier run,
/// if any. Called before the gateway serves, so a restarted gateway never
/// answers a request with no table at all.
pub(crate) async fn load_saved(gateway: &Gateway) {
    if gateway.config.control.is_none() {
        return;
    }
    let path = gateway.config.data_dir.join("routing.json");
    if let Ok(bytes) = tokio::fs::read(&path).await
        && let Ok(table) = serde_json::from_slice::<RoutingTable>(&bytes)
    {
        tracing::info!(
            revision = table.revision,
            "routing with the last known table until the control plane answers"
        );
        gateway.routes.apply(&table, gateway.now());
    }
}

/// Follows routing tables on NATS JetStream (`--events`), from the latest
/// on, starting over after a pause whenever the consumer gives up. Tables
/// older than the one routed by are ignored.
async fn follow_events(gateway: &Gateway, events: &shoal_events::Events) {
    let mut attempt = 0;
    let mut newest = 0;
    loop {
        match events.follow_routing().await {
            Ok(stream) => {
                let mut stream = std::pin::pin!(stream);
                while let Some(item) = stream.next().await {
                    match item {
                        Ok(table) if table.revision >= newest => {
                            attempt = 0;
                            newest = table.revision;
                            apply(gateway, &table).await;
                        }
                        Ok(_) => {}
                        Err(e @ shoal_events::EventError::Decode { .. }) => {
                            tracing::warn!(error = %e, "skipped");
                        }
                        Err(e) => {
                            tracing::debug!(error = %e, "routing events broke off");
                            break;
                        }
                    }
                }
            }
            Err(e) => {
                if attempt == 0 {
                    tracing::warn!(error = %e, "event stream unreachable; routing with the last known table");
                }
            }
        }
        attempt += 1;
        tokio::time::sleep(shoal_client::reconnect_backoff(attempt)).await;
    }
}

/// Runs discovery until the task is aborted.
pub async fn run(gateway: Arc<Gateway>) {
    let Some(control) = gateway.config.control.clone() else {
        gateway
            .routes
            .set_static(&gateway.config.static_replicas, gateway.now());
        return;
    };
    if let Some(events) = shoal_events::connect_or_warn(gateway.config.events.as_deref()).await {
        return follow_events(&gateway, &events).await;
    }
    let client = ApiClient::control(&control, gateway.config.token.clone());
    let mut attempt = 0;
    loop {
        match client.watch_routing().await {
            Ok(stream) => {
                let mut stream = std::pin::pin!(stream);
                while let Some(item) = stream.next().await {
                    match item {
                        Ok(table) => {
                            if attempt > 0 {
                                tracing::info!("following the control plane's routing again");
                            }
                            attempt = 0;
                            apply(&gateway, &table).await;
                        }
                        Err(e) => {
                            tracing::debug!(error = %e, "routing stream broke");
                            break;
                        }
                    }
                }
            }
            Err(e) => {
                if attempt == 0 {
                    tracing::warn!(error = %e, "control plane unreachable; routing with the last known table");
                }
            }
        }
        attempt += 1;
        tokio::time::sleep(shoal_client::reconnect_backoff(attempt)).await;
    }
}

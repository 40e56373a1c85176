//! One module per command family; each turns arguments into calls on the
//! library crates and formats what comes back.

/// Serves with `$server` (a role's server: `join` and `stop`) until it
/// ends by itself or SIGINT/SIGTERM asks for a graceful stop; evaluates to
/// the command's result.
macro_rules! run_until_signal {
    ($server:ident) => {{
        let ended = tokio::select! {
            () = $crate::cmd::shutdown_requested() => None,
            result = $server.join() => Some(result),
        };
        match ended {
            Some(result) => result?,
            None => $server.stop().await?,
        }
        Ok(())
    }};
}

pub(crate) mod backup;
#[cfg(feature = "bench")]
pub(crate) mod bench;
#[cfg(not(feature = "bench"))]
#[path = "no_bench.rs"]
pub(crate) mod bench;
pub(crate) mod client;
pub(crate) mod control;
pub(crate) mod drill;
pub(crate) mod gateway;
pub(crate) mod replica;
pub(crate) mod scale;
pub(crate) mod up;

/// A document's timestamp as tables show it: RFC 3339 to the second, UTC.
pub(crate) fn when(millis: shoal_api::UnixMillis) -> String {
    humantime::format_rfc3339_seconds(shoal_api::duration::as_system_time(millis)).to_string()
}

/// Resolves after SIGINT or SIGTERM, logging that shutdown started.
pub(crate) async fn shutdown_requested() {
    shoal_http::shutdown_signal().await;
    tracing::info!("shutting down: finishing requests in flight");
}

/// Prints the lines tools starting a role wait for: the gRPC address first
/// (when served), then `shoal ROLE listening on SCHEME://ADDR`, which
/// `shoal up`, the testkit and scripts read a port-0 address from.
pub(crate) fn announce(
    role: &str,
    scheme: &str,
    addr: std::net::SocketAddr,
    grpc: Option<std::net::SocketAddr>,
) {
    tracing::info!(%addr, "{role} listening");
    if let Some(grpc) = grpc {
        shoal_telemetry::say!("shoal {role} gRPC listening on {grpc}");
    }
    shoal_telemetry::say!("shoal {role} listening on {scheme}://{addr}");
}

/// When started by `shoal up` (which sets [`shoal_fleet::PARENT_ENV`]),
/// exits as soon as that parent is gone, so no child outlives the fleet.
pub(crate) fn exit_with_parent() {
    let Some(parent) = std::env::var(shoal_fleet::PARENT_ENV)
        .ok()
        .and_then(|p| p.parse::<i32>().ok())
    else {
        return;
    };
    tokio::spawn(async move {
        loop {
            if nix::unistd::getppid().as_raw() != parent {
                tracing::warn!("shoal up is gone; exiting");
                std::process::exit(0);
            }
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        }
    });
}

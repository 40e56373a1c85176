//! `shoal control`: run the control plane.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use shoal_control::{ControlConfig, ControlServer};

#[derive(Debug, clap::Args)]
pub(crate) struct ControlArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8081", env = "SHOAL_ADDR")]
    addr: SocketAddr,
    /// Directory for the registry database and the local artifact store.
    #[arg(long, default_value = ".shoal/control", env = "SHOAL_DATA_DIR")]
    data_dir: PathBuf,
    /// Artifact store URL (e.g. s3://bucket/prefix) [default: DATA_DIR/artifacts].
    #[arg(long, env = "SHOAL_ARTIFACT_STORE")]
    artifact_store: Option<String>,
    /// How often replicas heartbeat, in milliseconds.
    #[arg(long, default_value_t = 2000)]
    heartbeat_ms: u64,
    /// Seconds a replica may serve other versions than desired before it is flagged as behind.
    #[arg(long, default_value_t = 60)]
    skew_threshold_secs: u64,
    /// The registry: sqlite (in DATA_DIR), sqlite:///path/registry.db, or
    /// postgres://user@host/database, which several control planes share.
    #[arg(long, env = "SHOAL_REGISTRY")]
    registry: Option<String>,
    /// Turn authentication off: anyone who can reach the API may change
    /// what the fleet serves. For throwaway experiments only.
    #[arg(long)]
    no_auth: bool,

    #[command(flatten)]
    tls: crate::cli::ServeTls,
}

pub(crate) async fn run(args: ControlArgs, global: &crate::cli::Global) -> anyhow::Result<()> {
    let args_scheme = args.tls.scheme();
    let heartbeat = Duration::from_millis(args.heartbeat_ms.max(100));
    let config = ControlConfig {
        addr: args.addr,
        data_dir: args.data_dir,
        artifact_store: args.artifact_store,
        heartbeat_interval: heartbeat,
        dead_after: heartbeat * 3,
        skew_threshold: Duration::from_secs(args.skew_threshold_secs),
        auth: !args.no_auth,
        tls: args.tls.server(global)?,
        registry: args.registry,
        ..ControlConfig::default()
    };
    let mut server = ControlServer::start(config).await?;
    tracing::info!(addr = %server.addr, "control plane listening");
    println!(
        "shoal control listening on {}://{}",
        args_scheme, server.addr
    );
    let ended = tokio::select! {
        () = super::shutdown_requested() => None,
        result = server.join() => Some(result),
    };
    match ended {
        Some(result) => result?,
        None => server.stop().await?,
    }
    Ok(())
}

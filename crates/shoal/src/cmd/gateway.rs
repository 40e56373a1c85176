//! `shoal gateway`: the front door.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use shoal_gateway::protect::ProtectionConfig;
use shoal_gateway::{GatewayConfig, GatewayServer};

use crate::cli::Global;

#[derive(Debug, clap::Args)]
pub(crate) struct GatewayArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8080", env = "SHOAL_ADDR")]
    addr: SocketAddr,
    /// Also serve the Open Inference Protocol over gRPC
    /// (inference.GRPCInferenceService, as tritonclient.grpc speaks it) on
    /// this address (port 0: any free port), routed like REST.
    #[arg(long, env = "SHOAL_GRPC_ADDR")]
    grpc_addr: Option<SocketAddr>,
    /// Directory for the last known routing table.
    #[arg(long, default_value = ".shoal/gateway", env = "SHOAL_DATA_DIR")]
    data_dir: PathBuf,
    /// This gateway's region; replicas there are preferred.
    #[arg(long, default_value = "default", env = "SHOAL_REGION")]
    region: String,
    /// Route to this replica (host:port) without a control plane. Repeat for more.
    #[arg(long = "replica", value_name = "HOST:PORT")]
    replicas: Vec<String>,
    /// Time allowed for one attempt, in milliseconds.
    #[arg(long, default_value_t = 5000)]
    request_timeout_ms: u64,
    /// Interval of active health checks, in milliseconds.
    #[arg(long, default_value_t = 500)]
    health_interval_ms: u64,
    /// Send a second request to another replica after the model's p95.
    #[arg(long)]
    hedge: bool,
    /// How to choose among healthy replicas: peak-ewma (power of two
    /// choices over latency and load) or round-robin (for comparison).
    #[arg(long, default_value = "peak-ewma", value_parser = ["peak-ewma", "round-robin"])]
    balance: String,
    /// Header that keeps a user on one version.
    #[arg(long, default_value = "x-user-id")]
    split_header: String,
    /// Header that keeps a session on one replica.
    #[arg(long, default_value = "x-session-id")]
    session_header: String,
    /// Require an API key: NAME:SECRET. Repeat for more.
    #[arg(long = "api-key", value_name = "NAME:SECRET")]
    api_keys: Vec<String>,
    /// Requests per second per API key (per client address without keys).
    #[arg(long)]
    rate_limit: Option<u32>,
    /// Burst above the rate [default: the rate].
    #[arg(long)]
    burst: Option<u32>,
    /// Log request payloads with e-mail addresses, phone and card numbers redacted.
    #[arg(long)]
    log_payloads: bool,
    /// Largest request body accepted, in bytes.
    #[arg(long, default_value_t = 16 << 20)]
    body_limit: usize,

    /// NATS server with JetStream (nats://HOST:PORT) carrying desired
    /// states and routing tables: followed instead of the control plane's watch stream.
    #[arg(long, env = "SHOAL_EVENTS", value_parser = crate::cli::events_url)]
    events: Option<String>,

    #[command(flatten)]
    tls: crate::cli::ServeTls,

    #[command(flatten)]
    connections: crate::cli::ServeConnections,
}

pub(crate) async fn run(args: GatewayArgs, global: &Global) -> anyhow::Result<()> {
    args.connections.apply()?;
    let args_scheme = args.tls.scheme();
    if global.control.is_none() && args.replicas.is_empty() {
        bail!("nothing to route to: give --control URL, or --replica HOST:PORT for each replica");
    }
    let api_keys = args
        .api_keys
        .iter()
        .map(|k| {
            k.split_once(':')
                .map(|(name, secret)| (secret.to_owned(), name.to_owned()))
                .with_context(|| format!("--api-key {k:?}: expected NAME:SECRET"))
        })
        .collect::<anyhow::Result<HashMap<_, _>>>()?;
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("cannot create data directory {}", args.data_dir.display()))?;
    let config = GatewayConfig {
        addr: args.addr,
        grpc_addr: args.grpc_addr,
        data_dir: args.data_dir,
        region: args.region,
        control: global.control.clone(),
        token: global.role_token()?,
        events: args.events,
        static_replicas: args.replicas,
        request_timeout: Duration::from_millis(args.request_timeout_ms.max(1)),
        health_interval: Duration::from_millis(args.health_interval_ms.max(50)),
        hedge: args.hedge,
        balance: if args.balance == "round-robin" {
            shoal_gateway::routes::Balance::RoundRobin
        } else {
            shoal_gateway::routes::Balance::PeakEwma
        },
        split_header: args.split_header.to_ascii_lowercase(),
        session_header: args.session_header.to_ascii_lowercase(),
        body_limit: args.body_limit,
        protection: ProtectionConfig {
            api_keys,
            rate_per_sec: args.rate_limit,
            burst: args.burst,
            log_payloads: args.log_payloads,
        },
        tls: args.tls.server(global)?,
        ..GatewayConfig::default()
    };
    let mut server = GatewayServer::start(config).await?;
    super::announce("gateway", args_scheme, server.addr, server.grpc_addr);
    run_until_signal!(server)
}

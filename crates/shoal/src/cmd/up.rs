//! `shoal up`: the whole fleet on this machine.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use shoal_fleet::UpConfig;

#[derive(Debug, clap::Args)]
pub(crate) struct UpArgs {
    /// Replicas to run.
    #[arg(long, default_value_t = 3)]
    replicas: usize,
    /// Standby replicas besides them: they load and warm everything but
    /// take traffic only while their region is short of active replicas.
    #[arg(long, default_value_t = 0)]
    standby: usize,
    /// One of the three shapes of the DR study, instead of --replicas and
    /// --standby: single (1 replica), active-standby (2 + 1 standby),
    /// active-active (3).
    #[arg(long, conflicts_with_all = ["replicas", "standby"])]
    topology: Option<Topology>,
    /// Regions to spread replicas over (comma-separated); one gateway each.
    #[arg(long, value_delimiter = ',', default_value = "local")]
    regions: Vec<String>,
    /// Data directory of the fleet: registry, artifacts, replica caches.
    #[arg(long, default_value = ".shoal")]
    data_dir: PathBuf,
    /// Address of the first gateway (later regions take the next ports).
    #[arg(long, default_value = "127.0.0.1:8080")]
    gateway_addr: SocketAddr,
    /// Address of the control plane.
    #[arg(long, default_value = "127.0.0.1:8081")]
    control_addr: SocketAddr,
    /// Also serve the KServe v2 gRPC protocol (tritonclient.grpc) at this
    /// address on the first gateway; later regions take the next ports.
    #[arg(long, value_name = "ADDR")]
    grpc_addr: Option<SocketAddr>,
    /// Chaos monkey: kill a random replica this many times per minute, on average.
    #[arg(long, value_name = "KILLS_PER_MINUTE")]
    chaos: Option<f64>,
    /// Serve everything over https with a local CA made under DATA_DIR/tls.
    #[arg(long)]
    tls: bool,
    /// Control-plane members to run (one leads; the others answer the API
    /// and take over when it dies). More than one needs --registry
    /// postgres://…, which they share.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=9))]
    control_planes: u64,
    /// The registry: sqlite (in DATA_DIR/control, the default) or
    /// postgres://user@host/database.
    #[arg(long, env = "SHOAL_REGISTRY")]
    registry: Option<String>,
    /// NATS server with JetStream (nats://HOST:PORT): desired states and
    /// routing tables travel on it instead of watch streams.
    #[arg(long, env = "SHOAL_EVENTS", value_parser = crate::cli::events_url)]
    events: Option<String>,
    /// Where replicas keep sequences' state: memory (each replica its own:
    /// a sequence dies with its replica) or redis://HOST:PORT[/DB] (shared:
    /// any replica continues a sequence).
    #[arg(long, default_value = "memory", env = "SHOAL_SESSION_STORE", value_parser = crate::cli::session_store_url)]
    session_store: String,
    /// Of the replicas, run this many as spot capacity (`--tier spot`):
    /// models keep their `shoal scale --min-on-demand` copies off them.
    #[arg(long, default_value_t = 0)]
    spot: usize,
    /// Start and stop replicas to follow the control plane's desired count
    /// (`shoal scale NAME --min N --max M`), from --replicas up to
    /// --max-replicas.
    #[arg(long, requires = "max_replicas")]
    autoscale: bool,
    /// The most replicas --autoscale runs.
    #[arg(long, requires = "autoscale")]
    max_replicas: Option<usize>,
    #[command(flatten)]
    tuning: super::control::AutoscaleArgs,
    /// An extra flag for every replica, repeated per flag (e.g.
    /// --replica-arg=--threads=1); benchmarks shape replicas with it.
    #[arg(long, allow_hyphen_values = true)]
    replica_arg: Vec<String>,
}

/// The fleet shapes `--topology` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Topology {
    /// One replica.
    Single,
    /// Two active replicas and one standby.
    ActiveStandby,
    /// Three active replicas.
    ActiveActive,
}

impl Topology {
    /// (active replicas, standbys).
    fn shape(self) -> (usize, usize) {
        match self {
            Topology::Single => (1, 0),
            Topology::ActiveStandby => (2, 1),
            Topology::ActiveActive => (3, 0),
        }
    }
}

pub(crate) async fn run(args: UpArgs) -> anyhow::Result<()> {
    let exe =
        std::env::current_exe().context("cannot find the shoal binary to start children from")?;
    let (replicas, standby) = args
        .topology
        .map_or((args.replicas, args.standby), Topology::shape);
    let config = UpConfig {
        exe,
        data_dir: args.data_dir,
        replicas,
        standby,
        regions: args.regions,
        gateway_addr: args.gateway_addr,
        grpc_addr: args.grpc_addr,
        control_addr: args.control_addr,
        chaos_per_minute: args.chaos,
        tls: args.tls,
        control_planes: usize::try_from(args.control_planes).unwrap_or(1),
        registry: args.registry,
        events: args.events,
        session_store: (args.session_store != "memory").then_some(args.session_store),
        spot: args.spot,
        autoscale: args.max_replicas.filter(|_| args.autoscale),
        replica_args: args.replica_arg,
        control_args: {
            args.tuning.config()?;
            args.tuning.to_args()
        },
    };
    shoal_fleet::run(config, super::shutdown_requested()).await
}

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

    /// Back up to this destination on a schedule: a directory or
    /// s3://bucket/prefix (see `shoal backup`).
    #[arg(long, value_name = "DIR|s3://BUCKET/PREFIX")]
    backup_to: Option<String>,
    /// Time between scheduled backups (e.g. 5m, 1h).
    #[arg(long, default_value = "1h", value_parser = parse_every)]
    backup_every: Duration,
    /// Scheduled backups kept at the destination; older ones, and chunks
    /// only they needed, are deleted.
    #[arg(long, default_value_t = 24, value_parser = clap::value_parser!(u32).range(1..))]
    backup_keep: u32,

    /// This member's id among control planes sharing a registry
    /// [default: generated once, kept in DATA_DIR/member.id].
    #[arg(long, env = "SHOAL_ID")]
    id: Option<String>,
    /// HOST:PORT other members and clients reach this one at
    /// [default: the address it listens on].
    #[arg(long, env = "SHOAL_ADVERTISE")]
    advertise: Option<String>,
    /// How long the leader's lease lasts unrenewed, in milliseconds: when
    /// a leader dies, another member leads within about this long.
    #[arg(long, default_value_t = 1500, value_parser = clap::value_parser!(u64).range(100..=60_000))]
    lease_ttl_ms: u64,

    /// NATS server with JetStream (nats://HOST:PORT) carrying desired
    /// states and routing tables: published here while this member leads.
    #[arg(long, env = "SHOAL_EVENTS", value_parser = crate::cli::events_url)]
    events: Option<String>,

    #[command(flatten)]
    autoscale: AutoscaleArgs,

    #[command(flatten)]
    tls: crate::cli::ServeTls,

    #[command(flatten)]
    connections: crate::cli::ServeConnections,
}

/// How the autoscalers behave; `shoal up` passes these to its control
/// planes.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct AutoscaleArgs {
    /// Autoscaling: a scale-down takes the highest recommendation of this
    /// window (the HPA's stabilisation window), so a dip sheds nothing.
    #[arg(long, default_value = "5m", value_parser = parse_window)]
    pub(crate) scale_down_window: Duration,
    /// Autoscaling: the day the predictor learns load over (a shorter one
    /// replays a compressed day, as the autoscaling benchmark does).
    #[arg(long, default_value = "24h", value_parser = parse_window)]
    pub(crate) season_day: Duration,
    /// Autoscaling: the predictor's time slot (the day holds whole slots).
    #[arg(long, default_value = "5m", value_parser = parse_window)]
    pub(crate) season_slot: Duration,
    /// Autoscaling: learn and show predictions but scale on the reactive
    /// recommendation alone.
    #[arg(long)]
    pub(crate) no_predict: bool,
    /// Autoscaling: the window request rates and p99 are measured over.
    #[arg(long, default_value = "10s", value_parser = parse_window)]
    pub(crate) signal_window: Duration,
    /// Autoscaling: the period of the HPA's rate limits (up by at most 4
    /// replicas or 100 %, down by at most 100 %, per period).
    #[arg(long, default_value = "15s", value_parser = parse_window)]
    pub(crate) rate_limit_period: Duration,
}

impl AutoscaleArgs {
    /// The control plane's configuration, checked.
    pub(crate) fn config(&self) -> anyhow::Result<shoal_control::capacity::CapacityConfig> {
        let ms = |d: Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
        let (day, slot) = (ms(self.season_day), ms(self.season_slot));
        if slot == 0 || day % slot != 0 || day / slot < 2 {
            anyhow::bail!(
                "--season-day must hold two or more whole --season-slot (got {:?} and {:?})",
                self.season_day,
                self.season_slot
            );
        }
        let mut config = shoal_control::capacity::CapacityConfig::default();
        config.reactive.down_window_ms = ms(self.scale_down_window);
        config.season.day_ms = day;
        config.season.slot_ms = slot;
        config.reactive_only = self.no_predict;
        config.signal_window_ms = ms(self.signal_window).max(1);
        config.reactive.up.period_ms = ms(self.rate_limit_period).max(1);
        config.reactive.down.period_ms = ms(self.rate_limit_period).max(1);
        Ok(config)
    }

    /// The same flags for a child control plane.
    pub(crate) fn to_args(&self) -> Vec<String> {
        let secs = |d: Duration| format!("{}ms", d.as_millis());
        vec![
            "--scale-down-window".into(),
            secs(self.scale_down_window),
            "--season-day".into(),
            secs(self.season_day),
            "--season-slot".into(),
            secs(self.season_slot),
            "--signal-window".into(),
            secs(self.signal_window),
            "--rate-limit-period".into(),
            secs(self.rate_limit_period),
        ]
        .into_iter()
        .chain(self.no_predict.then(|| "--no-predict".to_owned()))
        .collect()
    }
}

fn parse_window(s: &str) -> Result<Duration, String> {
    let seconds = super::client::parse_duration(s)?;
    if seconds < 0.0 {
        return Err(format!("{s:?}: a window cannot be negative"));
    }
    Ok(Duration::from_secs_f64(seconds))
}

fn parse_every(s: &str) -> Result<Duration, String> {
    let seconds = super::client::parse_duration(s)?;
    if seconds < 1.0 {
        return Err(format!("{s:?} is too often; back up at most once a second"));
    }
    Ok(Duration::from_secs_f64(seconds))
}

pub(crate) async fn run(args: ControlArgs, global: &crate::cli::Global) -> anyhow::Result<()> {
    args.connections.apply()?;
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
        id: args.id,
        advertise: args.advertise,
        lease_ttl: Duration::from_millis(args.lease_ttl_ms),
        events: args.events,
        capacity: args.autoscale.config()?,
        backup: args
            .backup_to
            .map(|to| shoal_control::backups::BackupSchedule {
                to,
                every: args.backup_every,
                keep: args.backup_keep as usize,
            }),
        ..ControlConfig::default()
    };
    let mut server = ControlServer::start(config).await?;
    super::announce("control", args_scheme, server.addr, None);
    run_until_signal!(server)
}

//! `shoal drill`: a disaster drill under load, against the `shoal up`
//! fleet in a data directory (the drill finds its processes) or any fleet
//! named by `--control` and `--gateway` (the fault made and undone by
//! `--kill-cmd` and `--restore-cmd`); prints what clients saw, the
//! recovery time and the recovery point.

use shoal_telemetry::say;
use std::path::PathBuf;
use std::time::Duration;

use crate::cli::Global;

#[derive(Debug, clap::Args)]
pub(crate) struct DrillArgs {
    /// What goes wrong: replica-loss, replica-hang, region-loss (with --region),
    /// control-plane-loss, gateway-loss (needs two gateways: shoal up
    /// --regions a,b), leader-loss (needs several control planes: shoal up
    /// --control-planes 3 --registry postgres://…), artifact-store-loss
    /// (moves the fleet's artifact store aside for the middle third and
    /// deploys a new digits version meanwhile; puts it back, also on Ctrl-C).
    scenario: ScenarioName,
    /// The region to lose (region-loss).
    #[arg(long)]
    region: Option<String>,
    /// The data directory of the `shoal up` fleet to drill.
    #[arg(long, default_value = ".shoal")]
    data_dir: PathBuf,
    /// Drill a fleet that `shoal up` did not start: its gateways' URLs
    /// (repeat, or comma-separate; the load goes through the first, or all
    /// for gateway-loss), with --control URL, --token and --kill-cmd.
    #[arg(long, value_delimiter = ',', value_name = "URL")]
    gateway: Vec<String>,
    /// Make the fault with this shell command instead of signals to `shoal
    /// up`'s processes, e.g. "ssh db1 systemctl kill shoal-replica" or
    /// "kubectl delete pod -l app=shoal-replica --wait=false"; must exit 0.
    #[arg(long, value_name = "CMD")]
    kill_cmd: Option<String>,
    /// Undo the fault with this shell command two thirds of the way in (at
    /// the end of the load for replica-hang), and at once if the drill is
    /// interrupted; leave it out when the fleet recovers by itself.
    #[arg(long, value_name = "CMD", requires = "kill_cmd")]
    restore_cmd: Option<String>,
    /// Requests per second through the gateway.
    #[arg(long, default_value_t = 100.0)]
    rate: f64,
    /// How long the load runs (the fault comes a third of the way in), e.g. 15s.
    #[arg(long, default_value = "15s", value_parser = parse_seconds)]
    duration: Duration,
    /// How long to wait after the load for the fleet to be whole again.
    #[arg(long, default_value = "60s", value_parser = parse_seconds)]
    recovery_timeout: Duration,
    /// Also write a markdown record with a latency-over-time chart (PNG)
    /// into this directory, for the drill log.
    #[arg(long, value_name = "DIR")]
    report: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
#[allow(clippy::enum_variant_names)] // the scenarios' names, as users type them
enum ScenarioName {
    ReplicaLoss,
    ReplicaHang,
    RegionLoss,
    ControlPlaneLoss,
    GatewayLoss,
    LeaderLoss,
    ArtifactStoreLoss,
}

fn parse_seconds(s: &str) -> Result<Duration, String> {
    let seconds = super::client::parse_duration(s)?;
    if seconds <= 0.0 {
        return Err(format!("{s:?} must be longer than zero"));
    }
    Ok(Duration::from_secs_f64(seconds))
}

pub(crate) async fn run(args: DrillArgs, global: &Global) -> anyhow::Result<()> {
    use shoal_drill::Scenario;
    let scenario = match (args.scenario, args.region) {
        (ScenarioName::RegionLoss, Some(region)) => Scenario::RegionLoss(region),
        (ScenarioName::RegionLoss, None) => {
            anyhow::bail!("region-loss needs --region REGION (the one to lose)")
        }
        (_, Some(_)) => anyhow::bail!("--region goes with region-loss only"),
        (ScenarioName::ReplicaLoss, None) => Scenario::ReplicaLoss,
        (ScenarioName::ReplicaHang, None) => Scenario::ReplicaHang,
        (ScenarioName::ControlPlaneLoss, None) => Scenario::ControlPlaneLoss,
        (ScenarioName::GatewayLoss, None) => Scenario::GatewayLoss,
        (ScenarioName::LeaderLoss, None) => Scenario::LeaderLoss,
        (ScenarioName::ArtifactStoreLoss, None) => Scenario::ArtifactStoreLoss,
    };
    anyhow::ensure!(
        args.rate > 0.0 && args.rate <= 10_000.0,
        "--rate must be between 0 and 10000 requests per second"
    );
    let target = if args.gateway.is_empty() {
        shoal_drill::Target::Up(args.data_dir)
    } else {
        let control = global.control.clone().ok_or_else(|| {
            anyhow::anyhow!(
                "--gateway drills a remote fleet: name its control plane with --control URL"
            )
        })?;
        anyhow::ensure!(
            args.kill_cmd.is_some(),
            "a remote fleet (--gateway) needs --kill-cmd: the drill cannot reach its processes"
        );
        let token = global.client_token()?.ok_or_else(|| {
            anyhow::anyhow!("a remote fleet needs an admin token: --token or --token-file")
        })?;
        shoal_drill::Target::Remote {
            control,
            gateways: args.gateway,
            token,
        }
    };
    let hooks = args.kill_cmd.map(|kill| shoal_drill::Hooks {
        kill,
        restore: args.restore_cmd,
    });
    if !global.json {
        eprintln!(
            "drill {}: {} rps for {:?}, fault at {:?}…",
            scenario.name(),
            args.rate,
            args.duration,
            args.duration / 3
        );
    }
    let drill = shoal_drill::run(shoal_drill::DrillSpec {
        scenario,
        target,
        hooks,
        rate: args.rate,
        duration: args.duration,
        recovery_timeout: args.recovery_timeout,
    });
    // Ctrl-C drops the drill, which undoes its fault (puts the store back,
    // resumes a hung replica, runs --restore-cmd).
    let report = tokio::select! {
        report = drill => report?,
        _ = tokio::signal::ctrl_c() => anyhow::bail!("interrupted; the drill stopped"),
    };
    if let Some(dir) = &args.report {
        write_report(&report, dir)?;
    }
    if global.json {
        return super::client::print_json(&report);
    }
    let ms =
        |v: Option<f64>| v.map_or_else(|| "not recovered".to_owned(), |v| format!("{v:.0} ms"));
    let mut t = super::client::table(&["drill", &report.scenario]);
    t.add_row(vec!["fault".to_owned(), report.fault.clone()]);
    if report.restored_ms.is_some() {
        t.add_row(vec![
            "  undone".to_owned(),
            format!("{} after the fault", ms(report.restored_ms)),
        ]);
    }
    if let Some(deploy) = &report.deploy {
        t.add_row(vec!["  deploy".to_owned(), deploy.clone()]);
    }
    t.add_row(vec![
        "requests".to_owned(),
        format!(
            "{} sent, {} failed ({:.3} % answered)",
            report.sent, report.failed, report.success_percent
        ),
    ]);
    t.add_row(vec![
        "latency".to_owned(),
        format!("p50 {:.2} ms, p99 {:.2} ms", report.p50_ms, report.p99_ms),
    ]);
    t.add_row(vec!["RTO".to_owned(), ms(report.rto_ms)]);
    t.add_row(vec![
        match report.scenario.as_str() {
            "leader-loss" => "  new leader acts",
            "replica-hang" => "  ejected",
            "artifact-store-loss" => "  deploy done",
            _ => "  members back",
        }
        .to_owned(),
        ms(report.capacity_back_ms),
    ]);
    t.add_row(vec![
        "  failed after".to_owned(),
        format!("{} requests sent after that", report.failed_after_recovery),
    ]);
    t.add_row(vec![
        "  last failure".to_owned(),
        report.last_failure_ms.map_or_else(
            || "none".to_owned(),
            |v| format!("{v:.0} ms after the fault"),
        ),
    ]);
    t.add_row(vec![
        "RPO".to_owned(),
        format!(
            "{} of {} acknowledged writes lost ({} refused while down)",
            report.writes_lost, report.writes_acknowledged, report.writes_refused
        ),
    ]);
    say!("{t}");
    Ok(())
}

/// Writes `DIR/drill-SCENARIO-TIME.md` and its chart beside it.
fn write_report(report: &shoal_drill::DrillReport, dir: &std::path::Path) -> anyhow::Result<()> {
    use anyhow::Context;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let now = std::time::SystemTime::now();
    let stamp = now
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let name = format!("drill-{}-{stamp}", report.scenario);
    let png = dir.join(format!("{name}.png"));
    shoal_drill::chart(report, &png)?;
    let md = dir.join(format!("{name}.md"));
    let when = humantime::format_rfc3339_seconds(now).to_string();
    std::fs::write(
        &md,
        shoal_drill::markdown(report, &format!("{name}.png"), &when),
    )
    .with_context(|| format!("cannot write {}", md.display()))?;
    eprintln!("report: {} (chart {})", md.display(), png.display());
    Ok(())
}

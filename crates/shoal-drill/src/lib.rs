//! Disaster drills against a running `shoal up` fleet: steady open-loop
//! load through a gateway and a stream of acknowledged registry writes,
//! a fault a third of the way in (SIGKILL of a replica, of every replica of
//! a region, of the control plane, or of one of two gateways; or the
//! artifact store moved away for the middle third while a deploy is made),
//! and what the clients and the registry saw: success rate, failed
//! requests, the recovery time (RTO: from the fault until every killed
//! member is back, serving, and no request fails any more; for the
//! artifact store, until the deploy made without it is done) and the
//! recovery point (RPO: acknowledged writes that were lost).
//!
//! [`outcome`] is the pure part: the figures from what was observed.
//! [`run`] observes: it finds the fleet's processes in `fleet.json`, kills,
//! and watches `GET /api/v1/status` and the members' health until the fleet
//! is whole again.

use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use serde::Serialize;
use shoal_client::ApiClient;
use tokio::time::Instant;

use nix::sys::signal::Signal;

use shoal_load::{LoadSpec, run as load};

/// What goes wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scenario {
    /// One active replica is SIGKILLed.
    ReplicaLoss,
    /// One active replica stops (SIGSTOP) without dying: it accepts
    /// connections and answers nothing until it is resumed (SIGCONT) when
    /// the load ends. Recovery is its ejection: from then on no request
    /// may fail.
    ReplicaHang,
    /// Every replica of a region is SIGKILLed (another region must exist).
    RegionLoss(String),
    /// The control plane is SIGKILLed.
    ControlPlaneLoss,
    /// One of two gateways is SIGKILLed; clients hold both.
    GatewayLoss,
    /// The leading control plane of several (`shoal up --control-planes
    /// 3`) is SIGKILLed. Recovery is another member's first act as leader.
    LeaderLoss,
    /// The artifact store (the fleet's local store directory) is moved
    /// away, as a lost disk or mount would take it, for the middle third
    /// of the load; a new version is deployed just after it goes. Replicas
    /// keep serving; the deploy waits for the store and finishes once it
    /// is back. Recovery is the deploy done.
    ArtifactStoreLoss,
}

impl Scenario {
    /// The scenario's name, as the CLI takes it.
    pub fn name(&self) -> &'static str {
        match self {
            Scenario::ReplicaLoss => "replica-loss",
            Scenario::ReplicaHang => "replica-hang",
            Scenario::RegionLoss(_) => "region-loss",
            Scenario::ControlPlaneLoss => "control-plane-loss",
            Scenario::GatewayLoss => "gateway-loss",
            Scenario::LeaderLoss => "leader-loss",
            Scenario::ArtifactStoreLoss => "artifact-store-loss",
        }
    }
}

/// The fleet a drill runs against.
#[derive(Debug, Clone)]
pub enum Target {
    /// A `shoal up` fleet: its data directory (`fleet.json`,
    /// `admin.token`), where the drill finds the processes itself.
    Up(std::path::PathBuf),
    /// Any fleet, named by URL; faults come from [`Hooks`].
    Remote {
        /// The control plane: `URL[,URL…]`.
        control: String,
        /// The gateways' URLs (the load goes through the first, or all
        /// of them for gateway-loss).
        gateways: Vec<String>,
        /// An admin token.
        token: String,
    },
}

/// Shell commands that make the fault and undo it, for fleets the drill
/// cannot reach into (another machine, Kubernetes, a cloud store).
#[derive(Debug, Clone)]
pub struct Hooks {
    /// Makes the fault (`sh -c`); must exit 0.
    pub kill: String,
    /// Undoes it (`sh -c`), two thirds of the way into the load (at the
    /// end of it for replica-hang), or at once if the drill is
    /// interrupted; none when the fleet recovers by itself.
    pub restore: Option<String>,
}

/// How to run a drill.
#[derive(Debug, Clone)]
pub struct DrillSpec {
    /// What goes wrong.
    pub scenario: Scenario,
    /// The fleet.
    pub target: Target,
    /// How the fault is made, when not by the drill itself.
    pub hooks: Option<Hooks>,
    /// Requests per second through the gateway.
    pub rate: f64,
    /// How long the load runs; the fault comes at a third of it.
    pub duration: Duration,
    /// How long to wait for the fleet to be whole again after the load.
    pub recovery_timeout: Duration,
}

/// What a drill measured.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DrillReport {
    /// The scenario.
    pub scenario: String,
    /// The fault, in words.
    pub fault: String,
    /// What was killed (name and pid).
    pub killed: Vec<(String, u32)>,
    /// Requests sent.
    pub sent: u64,
    /// Requests that failed.
    pub failed: u64,
    /// Share answered, in percent.
    pub success_percent: f64,
    /// Median latency of answered requests (ms).
    pub p50_ms: f64,
    /// p99 of answered requests (ms).
    pub p99_ms: f64,
    /// Recovery time: from the fault until every killed member was back and
    /// serving, and no request failed after (ms); `None` if the fleet was
    /// not whole again within the timeout.
    pub rto_ms: Option<f64>,
    /// Of which: until the last failed request (ms after the fault).
    pub last_failure_ms: Option<f64>,
    /// Of which: until every killed member was back (ms after the fault);
    /// for a hang, until the gateways ejected the hung replica.
    pub capacity_back_ms: Option<f64>,
    /// Requests sent after that moment that still failed (must be 0).
    pub failed_after_recovery: u64,
    /// Registry writes acknowledged during the drill.
    pub writes_acknowledged: u64,
    /// Writes attempted but not acknowledged (the control plane was down).
    pub writes_refused: u64,
    /// Recovery point: acknowledged writes missing afterwards.
    pub writes_lost: u64,
    /// What clients saw over time, in 250 ms buckets from the start of
    /// the load (the fault at `fault_ms`).
    pub timeline: Vec<Bucket>,
    /// When the fault came, ms after the start of the load.
    pub fault_ms: f64,
    /// When the drill undid the fault itself (the artifact store put
    /// back), ms after the fault.
    pub restored_ms: Option<f64>,
    /// What became of the deploy made during the fault (artifact-store-loss).
    pub deploy: Option<String>,
}

/// Requests that ended within one slice of a drill.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Bucket {
    /// Start of the slice, ms after the start of the load.
    pub at_ms: f64,
    /// Requests that ended in it.
    pub requests: u64,
    /// Of which failed.
    pub failed: u64,
    /// Median latency of the answered ones (ms).
    pub p50_ms: f64,
    /// p99 of the answered ones (ms).
    pub p99_ms: f64,
}

/// Width of a [`Bucket`].
pub const BUCKET_MS: f64 = 250.0;

/// Buckets `samples` — (ms after the start, latency ms, answered) — into
/// [`BUCKET_MS`] slices from 0 to the last sample.
pub fn buckets(samples: &[(f64, f64, bool)]) -> Vec<Bucket> {
    let end = samples.iter().map(|s| s.0).fold(0.0, f64::max);
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let n = (end / BUCKET_MS).floor() as usize + 1;
    let mut slices: Vec<(Vec<f64>, u64)> = vec![(Vec::new(), 0); n];
    for &(at, latency, ok) in samples {
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let i = ((at.max(0.0) / BUCKET_MS).floor() as usize).min(n - 1);
        if ok {
            slices[i].0.push(latency);
        } else {
            slices[i].1 += 1;
        }
    }
    slices
        .into_iter()
        .enumerate()
        .map(|(i, (mut ok, failed))| {
            ok.sort_by(f64::total_cmp);
            let q = |p: f64| -> f64 {
                if ok.is_empty() {
                    return 0.0;
                }
                #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
                let at = ((ok.len() as f64 - 1.0) * p).round() as usize;
                ok[at]
            };
            #[allow(clippy::cast_precision_loss)]
            Bucket {
                at_ms: i as f64 * BUCKET_MS,
                requests: ok.len() as u64 + failed,
                failed,
                p50_ms: q(0.5),
                p99_ms: q(0.99),
            }
        })
        .collect()
}

/// The drill as a markdown record, naming the chart beside it.
pub fn markdown(report: &DrillReport, chart: &str, when: &str) -> String {
    let ms =
        |v: Option<f64>| v.map_or_else(|| "not recovered".to_owned(), |v| format!("{v:.0} ms"));
    format!(
        "# Drill: {scenario}\n\n\
         Run {when} with `shoal drill {scenario}`.\n\n\
         | | |\n|---|---|\n\
         | fault | {fault} |\n\
         | requests | {sent} sent, {failed} failed ({success:.3} % answered) |\n\
         | latency | p50 {p50:.2} ms, p99 {p99:.2} ms |\n\
         | RTO | {rto} (members back: {back}; last failure: {last}) |\n\
         | RPO | {lost} of {acked} acknowledged writes lost ({refused} refused while down) |\n\
         {deploy}\n\
         ![latency over time]({chart})\n\n\
         The chart shows the median and p99 latency of answered requests per \
         {bucket:.0} ms, failed requests in red, the fault and the moment every \
         killed member was back.\n",
        scenario = report.scenario,
        fault = report.fault,
        sent = report.sent,
        failed = report.failed,
        success = report.success_percent,
        p50 = report.p50_ms,
        p99 = report.p99_ms,
        rto = ms(report.rto_ms),
        back = ms(report.capacity_back_ms),
        last = report.last_failure_ms.map_or_else(
            || "none".to_owned(),
            |v| format!("{v:.0} ms after the fault")
        ),
        lost = report.writes_lost,
        acked = report.writes_acknowledged,
        refused = report.writes_refused,
        deploy = report
            .restored_ms
            .map(|r| format!("| undone | {r:.0} ms after the fault |\n"))
            .into_iter()
            .chain(
                report
                    .deploy
                    .as_ref()
                    .map(|d| format!("| deploy | {d} |\n"))
            )
            .collect::<String>(),
        bucket = BUCKET_MS,
    )
}

/// Draws the drill's latency over time to a PNG at `path`.
pub fn chart(report: &DrillReport, path: &Path) -> anyhow::Result<()> {
    use plotters::prelude::*;
    static FONT: std::sync::Once = std::sync::Once::new();
    FONT.call_once(|| {
        let _ = plotters::style::register_font(
            "sans-serif",
            plotters::style::FontStyle::Normal,
            include_bytes!("../../../assets/fonts/DejaVuSansMono.ttf"),
        );
    });
    let seconds = |ms: f64| ms / 1000.0;
    let end = report
        .timeline
        .last()
        .map_or(1.0, |b| seconds(b.at_ms + BUCKET_MS));
    let top = report.timeline.iter().map(|b| b.p99_ms).fold(1.0, f64::max) * 1.15;
    let root = BitMapBackend::new(path, (960, 480)).into_drawing_area();
    let fail = |e: &dyn std::fmt::Display| anyhow::anyhow!("cannot draw {}: {e}", path.display());
    root.fill(&WHITE).map_err(|e| fail(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("shoal drill {}", report.scenario),
            ("sans-serif", 22),
        )
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(56)
        .build_cartesian_2d(0.0..end, 0.0..top)
        .map_err(|e| fail(&e))?;
    chart
        .configure_mesh()
        .x_desc("seconds since the load started")
        .y_desc("latency (ms)")
        .draw()
        .map_err(|e| fail(&e))?;
    let answered: Vec<&Bucket> = report
        .timeline
        .iter()
        .filter(|b| b.requests > b.failed)
        .collect();
    let mid = |b: &Bucket| seconds(b.at_ms + BUCKET_MS / 2.0);
    chart
        .draw_series(LineSeries::new(
            answered.iter().map(|b| (mid(b), b.p50_ms)),
            &BLUE,
        ))
        .map_err(|e| fail(&e))?
        .label("p50")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], BLUE));
    chart
        .draw_series(LineSeries::new(
            answered.iter().map(|b| (mid(b), b.p99_ms)),
            &MAGENTA,
        ))
        .map_err(|e| fail(&e))?
        .label("p99")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], MAGENTA));
    chart
        .draw_series(
            report
                .timeline
                .iter()
                .filter(|b| b.failed > 0)
                .map(|b| Circle::new((mid(b), top * 0.95), 4, RED.filled())),
        )
        .map_err(|e| fail(&e))?
        .label("failed requests")
        .legend(|(x, y)| Circle::new((x + 8, y), 4, RED.filled()));
    let fault = seconds(report.fault_ms);
    let mut marks = vec![(fault, "fault", BLACK)];
    if let Some(back) = report.capacity_back_ms {
        marks.push((fault + seconds(back), "whole again", GREEN));
    }
    for (x, label, color) in marks {
        chart
            .draw_series(LineSeries::new([(x, 0.0), (x, top)], color.stroke_width(2)))
            .map_err(|e| fail(&e))?
            .label(label)
            .legend(move |(lx, ly)| PathElement::new(vec![(lx, ly), (lx + 16, ly)], color));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| fail(&e))?;
    root.present().map_err(|e| fail(&e))?;
    Ok(())
}

/// The recovery time from what was observed (all times in ms after the
/// fault): the later of the last failure and the moment capacity was back;
/// `None` while capacity never came back.
pub fn rto_ms(capacity_back_ms: Option<f64>, failures_after_fault_ms: &[f64]) -> Option<f64> {
    let back = capacity_back_ms?;
    let last_failure = failures_after_fault_ms.iter().copied().fold(0.0, f64::max);
    Some(back.max(last_failure))
}

/// What a drill saw besides the load's own counts.
#[derive(Debug, Clone, PartialEq)]
pub struct Observed {
    /// The fault, in words.
    pub fault: String,
    /// What was killed (name and pid).
    pub killed: Vec<(String, u32)>,
    /// When requests failed, ms after the fault.
    pub failures_after_fault_ms: Vec<f64>,
    /// When every killed member was back, ms after the fault.
    pub capacity_back_ms: Option<f64>,
    /// Writes acknowledged, refused and lost.
    pub writes: (u64, u64, u64),
    /// Requests over time.
    pub timeline: Vec<Bucket>,
    /// When the fault came, ms after the start of the load.
    pub fault_ms: f64,
    /// When the drill undid the fault, ms after it.
    pub restored_ms: Option<f64>,
    /// What became of the deploy made during the fault.
    pub deploy: Option<String>,
}

/// The figures of a drill from what was observed.
pub fn outcome(
    scenario: &Scenario,
    load: &shoal_load::LoadResult,
    observed: Observed,
) -> DrillReport {
    let Observed {
        fault,
        killed,
        failures_after_fault_ms,
        capacity_back_ms,
        writes,
        timeline,
        fault_ms,
        restored_ms,
        deploy,
    } = observed;
    let failures_after_fault_ms = &failures_after_fault_ms[..];
    let (writes_acknowledged, writes_refused, writes_lost) = writes;
    #[allow(clippy::cast_precision_loss)]
    let success_percent = if load.sent == 0 {
        100.0
    } else {
        100.0 * (load.sent - load.failed.min(load.sent)) as f64 / load.sent as f64
    };
    DrillReport {
        scenario: scenario.name().to_owned(),
        fault,
        killed,
        sent: load.sent,
        failed: load.failed,
        success_percent,
        p50_ms: load.latency.p50_us / 1000.0,
        p99_ms: load.latency.p99_us / 1000.0,
        rto_ms: rto_ms(capacity_back_ms, failures_after_fault_ms),
        failed_after_recovery: capacity_back_ms.map_or(0, |back| {
            failures_after_fault_ms
                .iter()
                .filter(|f| **f > back)
                .count() as u64
        }),
        last_failure_ms: failures_after_fault_ms.iter().copied().reduce(f64::max),
        capacity_back_ms,
        writes_acknowledged,
        writes_refused,
        writes_lost,
        timeline,
        fault_ms,
        restored_ms,
        deploy,
    }
}

/// A `shoal up` fleet as its `fleet.json` describes it.
#[derive(Debug, Clone, serde::Deserialize)]
struct FleetFile {
    control: String,
    gateways: Vec<(String, String)>,
    pids: Vec<(String, u32)>,
    /// The local artifact store (absent from fleets of older versions).
    #[serde(default)]
    artifacts: Option<std::path::PathBuf>,
}

/// The model the drills load and deploy.
const MODEL: &str = "digits";

/// The artifact store's loss, staged: a fresh version to deploy while
/// the store is away, and the version to go back to after.
struct StoreLoss {
    from: String,
    to: String,
}

/// The bundled digits model with `tag` as its doc string: the same model
/// under a digest no replica has cached, so deploying it needs the store.
/// (A later value of a protobuf field replaces an earlier one, so
/// appending `ModelProto.doc_string`, field 6, changes nothing else.)
pub fn tagged_model(tag: &str) -> Vec<u8> {
    let mut bytes = include_bytes!("../../../models/digits-v1.onnx").to_vec();
    let doc = tag.as_bytes();
    bytes.push(6 << 3 | 2);
    let mut len = doc.len();
    while len >= 0x80 {
        #[allow(clippy::cast_possible_truncation)]
        bytes.push((len as u8 & 0x7f) | 0x80);
        len >>= 7;
    }
    #[allow(clippy::cast_possible_truncation)]
    bytes.push(len as u8);
    bytes.extend_from_slice(doc);
    bytes
}

impl StoreLoss {
    /// Registers the version to deploy while the store is away (a push
    /// needs the store).
    async fn prepare(client: &ApiClient, run_id: &str) -> anyhow::Result<StoreLoss> {
        let deployments = client.list_deployments().await?;
        let from = deployments
            .iter()
            .find(|d| d.model == MODEL)
            .and_then(|d| d.targets.iter().max_by_key(|t| t.weight))
            .map(|t| t.version.clone())
            .context("artifact-store-loss deploys a new digits version; digits is not deployed")?;
        let bytes = bytes::Bytes::from(tagged_model(&format!("shoal drill {run_id}")));
        let size = bytes.len() as u64;
        let uploaded = client
            .upload_artifact(size, futures::stream::iter([Ok(bytes)]))
            .await
            .context("cannot push the drill's version before the drill")?;
        let mut new = shoal_api::registry::NewVersion {
            sha256: uploaded.sha256,
            ..Default::default()
        };
        new.labels
            .insert("source".into(), "shoal drill artifact-store-loss".into());
        let to = client.create_version(MODEL, &new).await?.version;
        Ok(StoreLoss { from, to })
    }

    /// The outage: deploys the new version right after the fault, keeps
    /// the store away until `back_at`, puts it back (`undo`) and waits
    /// (until `deadline`) for the deploy to end. When the store came back
    /// and when the deploy was done (ms after the fault), and what became
    /// of the deploy, in words.
    async fn outage(
        &self,
        client: &ApiClient,
        fault: Instant,
        back_at: Instant,
        deadline: Instant,
        undo: &Undo,
    ) -> (Option<f64>, Option<f64>, String) {
        let ms = |since: Instant| since.elapsed().as_secs_f64() * 1000.0;
        let deployed = client
            .deploy(
                MODEL,
                &shoal_api::deploy::DeployRequest {
                    version: self.to.clone(),
                    reason: Some(
                        "shoal drill artifact-store-loss: deployed without the artifact store"
                            .into(),
                    ),
                    ..Default::default()
                },
            )
            .await;
        let mut waited = false;
        while Instant::now() < back_at {
            if let Ok(r) = client.rollout(MODEL).await
                && r.to == self.to
            {
                waited |= r.reason.contains("waiting for the artifact store");
                if r.state.is_terminal() {
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let restored = match undo.now_in_place() {
            Ok(_) => ms(fault),
            Err(e) => {
                return (
                    None,
                    None,
                    format!("{e:#}; the deploy of {MODEL}:{} was not followed", self.to),
                );
            }
        };
        if let Err(e) = deployed {
            return (
                Some(restored),
                None,
                format!("the deploy of {MODEL}:{} was refused: {e}", self.to),
            );
        }
        loop {
            if let Ok(r) = client.rollout(MODEL).await
                && r.to == self.to
                && r.state.is_terminal()
            {
                let how = if waited {
                    "waited for the store"
                } else {
                    "did not need to wait"
                };
                return if r.state == shoal_api::deploy::RolloutState::Promoted {
                    (
                        Some(restored),
                        Some(ms(fault)),
                        format!(
                            "{MODEL}:{} deployed without the store: {how}, done {:.0} ms after it was back",
                            self.to,
                            ms(fault) - restored
                        ),
                    )
                } else {
                    (
                        Some(restored),
                        None,
                        format!("{MODEL}:{} {}: {}", self.to, r.state.as_str(), r.reason),
                    )
                };
            }
            if Instant::now() >= deadline {
                return (
                    Some(restored),
                    None,
                    format!(
                        "{MODEL}:{} was still rolling out when the drill gave up",
                        self.to
                    ),
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Deploys the version served before the drill again, leaving the
    /// fleet as it was found.
    async fn go_back(&self, client: &ApiClient, deadline: Instant) {
        let request = shoal_api::deploy::DeployRequest {
            version: self.from.clone(),
            reason: Some(
                "shoal drill artifact-store-loss: back to the version before the drill".into(),
            ),
            ..Default::default()
        };
        if let Err(e) = client.deploy(MODEL, &request).await {
            tracing::warn!(error = %e, "cannot deploy {MODEL}:{} again after the drill", self.from);
            return;
        }
        while Instant::now() < deadline {
            if let Ok(r) = client.rollout(MODEL).await
                && r.to == self.from
                && r.state.is_terminal()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn read_fleet(data_dir: &Path) -> anyhow::Result<FleetFile> {
    let path = data_dir.join("fleet.json");
    let bytes = std::fs::read(&path).with_context(|| {
        format!(
            "cannot read {}: is `shoal up --data-dir {}` running?",
            path.display(),
            data_dir.display()
        )
    })?;
    serde_json::from_slice(&bytes)
        .with_context(|| format!("{} is not a fleet file", path.display()))
}

fn signal(pid: u32, signal: Signal) {
    if let Ok(pid) = i32::try_from(pid) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal);
    }
}

/// Ejections the gateways have made so far (`gateway_endpoint_ejections`).
async fn ejections(gateways: &[(String, String)]) -> u64 {
    let mut total = 0;
    for (_, url) in gateways {
        let probe = ApiClient::gateway(url, None).with_timeout(Duration::from_secs(1));
        let Ok(text) = probe.get_raw("/metrics").await else {
            continue;
        };
        total += String::from_utf8_lossy(&text)
            .lines()
            .filter(|l| l.starts_with("gateway_endpoint_ejections_total"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>() as u64;
    }
    total
}

/// What must be true for the fleet to be whole again: each killed member
/// back under a new pid, and as many healthy replicas as before.
struct Whole<'a> {
    killed: &'a [(String, u32)],
    healthy_before: usize,
    /// Killed members come back as new processes (not after a hang).
    replaced: bool,
}

impl Whole<'_> {
    /// Polls until the fleet is whole or `deadline` passes.
    async fn wait(&self, data_dir: &Path, client: &ApiClient, deadline: Instant) -> Option<()> {
        while Instant::now() < deadline {
            if self.now(data_dir, client).await {
                return Some(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        None
    }

    async fn now(&self, data_dir: &Path, client: &ApiClient) -> bool {
        let Ok(fleet) = read_fleet(data_dir) else {
            return false;
        };
        let replaced = !self.replaced
            || self
                .killed
                .iter()
                .all(|(name, old)| fleet.pids.iter().any(|(n, pid)| n == name && pid != old));
        if !replaced {
            return false;
        }
        let Ok(status) = client.status().await else {
            return false;
        };
        let killed_pids: Vec<u32> = if self.replaced {
            self.killed.iter().map(|(_, p)| *p).collect()
        } else {
            Vec::new()
        };
        let healthy = status
            .replicas
            .iter()
            .filter(|r| r.healthy && !r.pid.is_some_and(|p| killed_pids.contains(&p)))
            .count();
        if healthy < self.healthy_before {
            return false;
        }
        for (_, url) in &fleet.gateways {
            let probe = ApiClient::gateway(url, None).with_timeout(Duration::from_secs(1));
            if probe.get_raw("/health").await.is_err() {
                return false;
            }
        }
        true
    }
}

/// The leading member of the fleet's control plane, and its pid.
async fn leader_and_pid(client: &ApiClient, fleet: &FleetFile) -> anyhow::Result<(String, u32)> {
    let leadership = client.leader().await.context("GET /api/v1/leader")?;
    anyhow::ensure!(
        leadership.members.len() >= 2,
        "leader-loss needs several control planes: shoal up --control-planes 3 --registry postgres://…"
    );
    let leader = leadership
        .leader
        .context("no member leads now; wait a moment and try again")?;
    let pid = fleet
        .pids
        .iter()
        .find(|(n, _)| *n == leader)
        .map(|(_, p)| *p)
        .with_context(|| format!("the leader {leader} is not one of shoal up's processes"))?;
    Ok((leader, pid))
}

/// The audit log's last position.
async fn last_audit_seq(client: &ApiClient) -> anyhow::Result<i64> {
    let mut after = 0;
    loop {
        let page = client.audit(after, 1000).await.context("the audit log")?;
        match page.last() {
            Some(e) => after = e.seq,
            None => return Ok(after),
        }
    }
}

/// The first member to record taking the lead after audit position
/// `after` (taken before the kill, so by a process alive after it: another
/// member, or the killed one restarted, whichever won the lapsed lease),
/// and when: ms after `fault_at` (Unix ms, this machine's clock, which the
/// members of `shoal up` share). Polls until `deadline`.
async fn new_leader_after(
    client: &ApiClient,
    mut after: i64,
    fault_at: shoal_api::UnixMillis,
    deadline: Instant,
) -> Option<(String, f64)> {
    while Instant::now() < deadline {
        if let Ok(page) = client.audit(after, 1000).await {
            if let Some(e) = page.iter().find(|e| e.action == "leader.elected") {
                return Some((e.target.clone(), (e.at - fault_at) as f64));
            }
            if let Some(last) = page.last() {
                after = last.seq;
                continue;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

/// Leader failovers measured one after another.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FailoverReport {
    /// Control-plane members.
    pub members: usize,
    /// Per trial: SIGKILL of the leader to another member's first act as
    /// leader (its fenced `leader.elected` record), ms.
    pub trials_ms: Vec<f64>,
    /// Median of the trials (ms).
    pub median_ms: f64,
    /// Slowest trial (ms).
    pub max_ms: f64,
    /// Who took over, per trial.
    pub new_leaders: Vec<String>,
}

/// `trials` leader failovers of the `shoal up --control-planes N` fleet in
/// `data_dir`: each SIGKILLs the leader, times the next leader's first act,
/// and waits for `shoal up` to bring the killed member back and for every
/// member to be seen again before the next.
pub async fn failover(data_dir: &Path, trials: usize) -> anyhow::Result<FailoverReport> {
    let fleet = read_fleet(data_dir)?;
    let token = shoal_client::secret::read(&data_dir.join("admin.token"))
        .context("the fleet's admin token (DATA_DIR/admin.token)")?;
    let client =
        ApiClient::control(&fleet.control, Some(token)).with_timeout(Duration::from_secs(2));
    let members = client
        .leader()
        .await
        .context("the control plane does not answer; is the fleet up?")?
        .members
        .len();
    let mut report = FailoverReport {
        members,
        trials_ms: Vec::new(),
        median_ms: 0.0,
        max_ms: 0.0,
        new_leaders: Vec::new(),
    };
    let mut after = last_audit_seq(&client).await?;
    for trial in 0..trials {
        let fleet = read_fleet(data_dir)?;
        let (leader, pid) = leader_and_pid(&client, &fleet).await?;
        let fault_at = shoal_api::now_millis();
        signal(pid, Signal::SIGKILL);
        let deadline = Instant::now() + Duration::from_secs(30);
        let (next, ms) = new_leader_after(&client, after, fault_at, deadline)
            .await
            .with_context(|| format!("trial {}: no member took the lead within 30 s", trial + 1))?;
        report.trials_ms.push(ms);
        report.new_leaders.push(next);
        // Before the next trial: the killed member back under a new pid
        // and every member campaigning again.
        loop {
            anyhow::ensure!(
                Instant::now() < deadline,
                "trial {}: {leader} did not come back within 30 s",
                trial + 1
            );
            let back = read_fleet(data_dir)
                .is_ok_and(|f| f.pids.iter().any(|(n, p)| *n == leader && *p != pid));
            let seen = client.leader().await.ok().is_some_and(|l| {
                let now = shoal_api::now_millis();
                l.leader.is_some()
                    && l.members
                        .iter()
                        .filter(|m| now - m.last_seen < 1000)
                        .count()
                        >= members
            });
            if back && seen {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        after = last_audit_seq(&client).await?;
    }
    report.median_ms = shoal_load::stats::median(&report.trials_ms);
    report.max_ms = report.trials_ms.iter().copied().fold(0.0, f64::max);
    Ok(report)
}

/// The fleet's description, its admin token and its `shoal up` data
/// directory (none for a remote fleet).
fn fleet_of(target: &Target) -> anyhow::Result<(FleetFile, String, Option<&Path>)> {
    match target {
        Target::Up(dir) => {
            let fleet = read_fleet(dir)?;
            let token = shoal_client::secret::read(&dir.join("admin.token"))
                .context("the fleet's admin token (DATA_DIR/admin.token)")?;
            Ok((fleet, token, Some(dir)))
        }
        Target::Remote {
            control,
            gateways,
            token,
        } => {
            anyhow::ensure!(
                !gateways.is_empty(),
                "a remote fleet needs --gateway URL (where the load goes)"
            );
            let fleet = FleetFile {
                control: control.clone(),
                gateways: gateways
                    .iter()
                    .enumerate()
                    .map(|(i, url)| (format!("gateway-{i}"), url.clone()))
                    .collect(),
                pids: Vec::new(),
                artifacts: None,
            };
            Ok((fleet, token.clone(), None))
        }
    }
}

/// How the drill makes the fault.
enum Fault {
    /// Signals to `shoal up`'s processes.
    Signal(Vec<(String, u32)>, Signal),
    /// The artifact store's directory moved aside.
    Move {
        dir: std::path::PathBuf,
        aside: std::path::PathBuf,
    },
    /// The user's hooks.
    Hooks(Hooks),
}

impl Fault {
    fn describe(&self) -> String {
        match self {
            Fault::Signal(victims, sig) => {
                let names: Vec<String> = victims
                    .iter()
                    .map(|(name, pid)| format!("{name} (pid {pid})"))
                    .collect();
                format!("{sig} {}", names.join(", "))
            }
            Fault::Move { dir, .. } => {
                format!("artifact store {} moved aside", dir.display())
            }
            Fault::Hooks(h) => format!("--kill-cmd {:?}", h.kill),
        }
    }

    /// Makes the fault; what undoes it.
    fn inflict(&self) -> anyhow::Result<Undo> {
        let undo = match self {
            Fault::Signal(victims, sig) => {
                for (_, pid) in victims {
                    signal(*pid, *sig);
                }
                (*sig == Signal::SIGSTOP)
                    .then(|| Undoing::Resume(victims.iter().map(|(_, p)| *p).collect()))
            }
            Fault::Move { dir, aside } => {
                std::fs::rename(dir, aside).with_context(|| {
                    format!("cannot move {} aside to {}", dir.display(), aside.display())
                })?;
                Some(Undoing::MoveBack {
                    from: aside.clone(),
                    to: dir.clone(),
                })
            }
            Fault::Hooks(h) => {
                tokio::task::block_in_place(|| sh(&h.kill)).context("--kill-cmd")?;
                h.restore.clone().map(Undoing::Command)
            }
        };
        Ok(Undo(std::sync::Mutex::new(undo)))
    }
}

/// What undoes a fault.
enum Undoing {
    /// SIGCONT to these.
    Resume(Vec<u32>),
    /// A directory moved back.
    MoveBack {
        from: std::path::PathBuf,
        to: std::path::PathBuf,
    },
    /// `--restore-cmd`.
    Command(String),
}

/// A fault's undoing, done once: by the drill when it is time, or when
/// the drill ends early (an error, Ctrl-C), so that no fault outlives it.
struct Undo(std::sync::Mutex<Option<Undoing>>);

impl Undo {
    /// Undoes the fault now, unless that was done (true when there was
    /// something to undo).
    fn now(&self) -> anyhow::Result<bool> {
        let undoing = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        match undoing {
            None => Ok(false),
            Some(Undoing::Resume(pids)) => {
                for pid in pids {
                    signal(pid, Signal::SIGCONT);
                }
                Ok(true)
            }
            Some(Undoing::MoveBack { from, to }) => {
                std::fs::rename(&from, &to).with_context(|| {
                    format!(
                        "cannot put the artifact store back: move {} to {} by hand",
                        from.display(),
                        to.display()
                    )
                })?;
                Ok(true)
            }
            Some(Undoing::Command(cmd)) => sh(&cmd).context("--restore-cmd").map(|()| true),
        }
    }

    /// Whether nothing is left to undo.
    fn is_done(&self) -> bool {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .is_none()
    }

    /// [`Undo::now`] from async code (a hook may take a while).
    fn now_in_place(&self) -> anyhow::Result<bool> {
        tokio::task::block_in_place(|| self.now())
    }
}

impl Drop for Undo {
    fn drop(&mut self) {
        if let Err(e) = self.now() {
            eprintln!("{e:#}");
        }
    }
}

/// Runs `cmd` with `sh -c`; an error carrying its output unless it exits 0.
fn sh(cmd: &str) -> anyhow::Result<()> {
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .output()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    anyhow::ensure!(
        out.status.success(),
        "{cmd:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// The fleet as seen from outside, for a drill that knows no processes
/// (hooks): healthy replicas (id and pid), live control-plane members,
/// gateways answering.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Outside {
    healthy: Vec<(String, Option<u32>)>,
    members: usize,
    gateways_up: bool,
    control_up: bool,
}

impl Outside {
    async fn now(client: &ApiClient, gateways: &[(String, String)]) -> Outside {
        let mut gateways_up = true;
        for (_, url) in gateways {
            let probe = ApiClient::gateway(url, None).with_timeout(Duration::from_secs(1));
            gateways_up &= probe.get_raw("/health").await.is_ok();
        }
        let Ok(status) = client.status().await else {
            return Outside {
                healthy: Vec::new(),
                members: 0,
                gateways_up,
                control_up: false,
            };
        };
        let now = shoal_api::now_millis();
        Outside {
            healthy: status
                .replicas
                .iter()
                .filter(|r| r.healthy)
                .map(|r| (r.id.clone(), r.pid))
                .collect(),
            members: status.control.as_ref().map_or(1, |c| {
                c.members
                    .iter()
                    .filter(|m| now - m.last_seen < 1000)
                    .count()
            }),
            gateways_up,
            control_up: true,
        }
    }

    /// Whether `scenario`'s fault shows, against the fleet `before` it:
    /// a replica healthy before is gone or restarted (another pid), the
    /// control plane does not answer, a member or a gateway is missing.
    fn shows(&self, scenario: &Scenario, before: &Outside) -> bool {
        match scenario {
            Scenario::GatewayLoss => !self.gateways_up,
            Scenario::ControlPlaneLoss => !self.control_up,
            Scenario::LeaderLoss => self.control_up && self.members < before.members,
            _ => self.control_up && before.healthy.iter().any(|r| !self.healthy.contains(r)),
        }
    }

    /// Whether the fleet is as whole as `before`: as many healthy
    /// replicas and live members, every gateway answering.
    fn whole_as(&self, before: &Outside) -> bool {
        self.control_up
            && self.gateways_up
            && self.healthy.len() >= before.healthy.len()
            && self.members >= before.members
    }
}

/// Recovery from a hooked fault: undoes it at `restore_at` (when there is
/// a restore hook), and returns once the fault was seen and then the
/// fleet whole again (ms after the fault), with when it was undone.
#[allow(clippy::too_many_arguments)]
async fn hooked_recovery(
    scenario: &Scenario,
    client: &ApiClient,
    gateways: &[(String, String)],
    before: &Outside,
    undo: &Undo,
    fault: Instant,
    restore_at: Instant,
    deadline: Instant,
) -> (Option<Duration>, Option<f64>) {
    let mut seen_fault = false;
    let mut restored = None;
    while Instant::now() < deadline {
        if restored.is_none() && Instant::now() >= restore_at {
            match undo.now_in_place() {
                Ok(true) => restored = Some(fault.elapsed().as_secs_f64() * 1000.0),
                Ok(false) => {}
                Err(e) => {
                    eprintln!("{e:#}");
                    return (None, None);
                }
            }
        }
        let now = Outside::now(client, gateways).await;
        seen_fault |= now.shows(scenario, before);
        if seen_fault && now.whole_as(before) && (restored.is_some() || undo.is_done()) {
            return (Some(fault.elapsed()), restored);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    (None, restored)
}

/// Runs a drill against `spec.target`.
#[allow(clippy::too_many_lines)]
pub async fn run(spec: DrillSpec) -> anyhow::Result<DrillReport> {
    let (fleet, token, data_dir) = fleet_of(&spec.target)?;
    let client =
        ApiClient::control(&fleet.control, Some(token)).with_timeout(Duration::from_secs(2));
    let status = client
        .status()
        .await
        .context("the control plane does not answer; is the fleet up?")?;
    let healthy_before = status.replicas.iter().filter(|r| r.healthy).count();
    anyhow::ensure!(healthy_before > 0, "no healthy replica to drill against");
    let members_before = status.control.as_ref().map_or(1, |c| c.members.len());
    let outside_before = Outside::now(&client, &fleet.gateways).await;
    let pid_of = |name: &str| fleet.pids.iter().find(|(n, _)| n == name).map(|(_, p)| *p);
    let name_of_pid = |pid: u32| {
        fleet
            .pids
            .iter()
            .find(|(_, p)| *p == pid)
            .map(|(n, _)| n.clone())
    };
    let first_gateway = fleet
        .gateways
        .first()
        .map(|(_, url)| url.clone())
        .context("the fleet has no gateway")?;
    let hooked = spec.hooks.is_some();
    // Who is killed (none with hooks: they decide), where the load goes,
    // and whether clients fail over between gateways.
    let (killed, urls, failover): (Vec<(String, u32)>, Vec<String>, bool) = match &spec.scenario {
        Scenario::ReplicaLoss | Scenario::ReplicaHang if hooked => {
            (Vec::new(), vec![first_gateway], false)
        }
        Scenario::ReplicaLoss | Scenario::ReplicaHang => {
            // A replica the loaded gateway routes to: one in its region.
            let region = fleet.gateways.first().map(|(r, _)| r.as_str());
            let victim = status
                .replicas
                .iter()
                .filter(|r| r.healthy && !r.standby)
                .filter(|r| region.is_none_or(|g| r.region == g))
                .find_map(|r| r.pid)
                .context("no healthy active replica with a known pid in the gateway's region")?;
            let name = name_of_pid(victim).context("the replica is not one of shoal up's")?;
            (vec![(name, victim)], vec![first_gateway], false)
        }
        Scenario::RegionLoss(region) => {
            anyhow::ensure!(
                status
                    .replicas
                    .iter()
                    .any(|r| &r.region != region && r.healthy),
                "region-loss needs another region with healthy replicas (shoal up --regions a,b)"
            );
            let victims: Vec<(String, u32)> = if hooked {
                Vec::new()
            } else {
                status
                    .replicas
                    .iter()
                    .filter(|r| &r.region == region)
                    .filter_map(|r| r.pid)
                    .filter_map(|pid| Some((name_of_pid(pid)?, pid)))
                    .collect()
            };
            anyhow::ensure!(
                hooked || !victims.is_empty(),
                "no replica in region {region:?}"
            );
            // Clients of the lost region keep using its gateway, which must
            // send them elsewhere.
            let gateway = fleet
                .gateways
                .iter()
                .find(|(r, _)| r == region)
                .map_or(first_gateway, |(_, url)| url.clone());
            (victims, vec![gateway], false)
        }
        Scenario::ControlPlaneLoss if hooked => (Vec::new(), vec![first_gateway], false),
        Scenario::ControlPlaneLoss => {
            let pid = pid_of("control").context("no control plane in fleet.json")?;
            (
                vec![("control".to_owned(), pid)],
                vec![first_gateway],
                false,
            )
        }
        Scenario::LeaderLoss => {
            let victims = if hooked {
                anyhow::ensure!(
                    members_before >= 2,
                    "leader-loss needs several control planes"
                );
                Vec::new()
            } else {
                let (leader, pid) = leader_and_pid(&client, &fleet).await?;
                vec![(leader, pid)]
            };
            (victims, vec![first_gateway], false)
        }
        Scenario::GatewayLoss => {
            anyhow::ensure!(
                fleet.gateways.len() >= 2,
                "gateway-loss needs two gateways (shoal up --regions a,b, or --gateway URL twice)"
            );
            let urls = fleet.gateways.iter().map(|(_, url)| url.clone()).collect();
            let victims = if hooked {
                Vec::new()
            } else {
                let (region, _) = &fleet.gateways[0];
                let name = format!("gateway-{region}");
                let pid = pid_of(&name).context("the gateway's pid is not in fleet.json")?;
                vec![(name, pid)]
            };
            (victims, urls, true)
        }
        Scenario::ArtifactStoreLoss => (Vec::new(), vec![first_gateway], false),
    };
    let hang = spec.scenario == Scenario::ReplicaHang;
    let fault_plan = match (&spec.hooks, &spec.scenario) {
        (Some(hooks), _) => Fault::Hooks(hooks.clone()),
        (None, Scenario::ArtifactStoreLoss) => {
            let dir = fleet
                .artifacts
                .clone()
                .filter(|d| d.is_dir())
                .context("artifact-store-loss moves a shoal up fleet's local artifact store aside, and fleet.json names none; for any other store, give --kill-cmd and --restore-cmd")?;
            let aside = dir.with_extension(format!("drill-{:08x}", rand::random::<u32>()));
            Fault::Move { dir, aside }
        }
        (None, _) => Fault::Signal(
            killed.clone(),
            if hang {
                Signal::SIGSTOP
            } else {
                Signal::SIGKILL
            },
        ),
    };
    let run_id = format!("{:08x}", rand::random::<u32>());
    let store_loss = if spec.scenario == Scenario::ArtifactStoreLoss {
        anyhow::ensure!(
            !hooked || spec.hooks.as_ref().is_some_and(|h| h.restore.is_some()),
            "artifact-store-loss needs --restore-cmd too: the deploy made meanwhile waits for the store"
        );
        Some(StoreLoss::prepare(&client, &run_id).await?)
    } else {
        None
    };

    let body = shoal_load::digits_request()?;
    let urls = urls
        .into_iter()
        .map(|u| format!("{u}/v2/models/{MODEL}/infer"))
        .collect();
    let load_spec = LoadSpec {
        schedule: Vec::new(),
        urls,
        body,
        rate: spec.rate,
        duration: spec.duration,
        connections: 32,
        timeout: Duration::from_secs(5),
        upstream_header: None,
        kill: None,
        dead_upstream: None,
        failover,
    };
    let started = Instant::now();
    let traffic = tokio::spawn(load(load_spec));

    // Acknowledged writes, every 200 ms, for as long as the load runs.
    let writer = {
        let client = client.clone();
        let (run_id, until) = (run_id.clone(), started + spec.duration);
        tokio::spawn(async move {
            let (mut acknowledged, mut refused) = (Vec::new(), 0u64);
            let mut n = 0u64;
            let mut tick = tokio::time::interval(Duration::from_millis(200));
            while Instant::now() < until {
                tick.tick().await;
                n += 1;
                let name = format!("drill-{run_id}-{n}");
                let made = client
                    .create_token(&shoal_api::auth::NewToken {
                        name: name.clone(),
                        role: shoal_api::auth::Role::Viewer,
                    })
                    .await;
                match made {
                    Ok(_) => acknowledged.push(name),
                    Err(_) => refused += 1,
                }
            }
            (acknowledged, refused)
        })
    };

    tokio::time::sleep_until(started + spec.duration / 3).await;
    let ejections_before = if hang {
        ejections(&fleet.gateways).await
    } else {
        0
    };
    let audit_before = last_audit_seq(&client).await?;
    let fault = Instant::now();
    let fault_at = shoal_api::now_millis();
    let undo = match fault_plan.inflict() {
        Ok(undo) => undo,
        Err(e) => {
            traffic.abort();
            writer.abort();
            return Err(e);
        }
    };
    let deadline = started + spec.duration + spec.recovery_timeout;
    let restore_at = started + spec.duration * 2 / 3;
    let whole = Whole {
        killed: &killed,
        healthy_before,
        replaced: !hang,
    };
    let mut capacity_back = None;
    let (mut restored_ms, mut deploy) = (None, None);
    if let Some(loss) = &store_loss {
        let (restored, done, what) = loss
            .outage(&client, fault, restore_at, deadline, &undo)
            .await;
        restored_ms = restored;
        capacity_back = done.map(|ms| Duration::from_secs_f64(ms / 1000.0));
        deploy = Some(what);
    } else if hang {
        // Back in service once the gateways have ejected the hung replica;
        // it is resumed when the load ends.
        while Instant::now() < started + spec.duration {
            if ejections(&fleet.gateways).await > ejections_before {
                capacity_back = Some(fault.elapsed());
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    } else if spec.scenario == Scenario::LeaderLoss {
        // Back in service when another member acts as leader; the killed
        // one is then awaited like any other member.
        capacity_back = new_leader_after(&client, audit_before, fault_at, deadline)
            .await
            .map(|(_, ms)| Duration::from_secs_f64(ms.max(0.0) / 1000.0));
        if let Some(dir) = data_dir.filter(|_| !hooked) {
            whole.wait(dir, &client, deadline).await;
        } else {
            restored_ms = hooked_recovery(
                &spec.scenario,
                &client,
                &fleet.gateways,
                &outside_before,
                &undo,
                fault,
                restore_at,
                deadline,
            )
            .await
            .1;
        }
    } else if let Some(dir) = data_dir.filter(|_| !hooked) {
        capacity_back = whole
            .wait(dir, &client, deadline)
            .await
            .map(|()| fault.elapsed());
    } else {
        let (back, restored) = hooked_recovery(
            &spec.scenario,
            &client,
            &fleet.gateways,
            &outside_before,
            &undo,
            fault,
            restore_at,
            deadline,
        )
        .await;
        capacity_back = back;
        restored_ms = restored;
    }
    let result = traffic.await.context("the load generator stopped")??;
    if hang {
        // The hung replica resumes (SIGCONT, or --restore-cmd) now.
        if let Ok(true) = undo.now_in_place() {
            restored_ms = Some(fault.elapsed().as_secs_f64() * 1000.0);
        }
        if let Some(dir) = data_dir.filter(|_| !hooked) {
            anyhow::ensure!(
                whole.wait(dir, &client, deadline).await.is_some(),
                "the hung replica did not come back after SIGCONT"
            );
        }
    }
    undo.now_in_place()?;
    let (acknowledged, refused) = writer.await.context("the writer stopped")?;
    if let Some(loss) = &store_loss {
        loss.go_back(&client, deadline).await;
    }

    // The recovery point: every acknowledged write must still be there.
    let present: std::collections::BTreeSet<String> = loop {
        match client.list_tokens().await {
            Ok(tokens) => break tokens.into_iter().map(|t| t.name).collect(),
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => anyhow::bail!("cannot read the registry back after the drill: {e}"),
        }
    };
    let lost = acknowledged
        .iter()
        .filter(|n| !present.contains(*n))
        .count() as u64;
    for name in present
        .iter()
        .filter(|n| n.starts_with(&format!("drill-{run_id}-")))
    {
        let _ = client.revoke_token(name).await;
    }
    // Failures by when they were sent: a request sent after service was
    // restored must not fail, whenever a hung one times out.
    let sent_at = |done: Instant, latency: Duration| done.checked_sub(latency).unwrap_or(done);
    let failures: Vec<f64> = result
        .timeline
        .iter()
        .filter(|(_, _, ok)| !ok)
        .map(|(done, latency, _)| sent_at(*done, *latency))
        .filter(|t| *t >= fault)
        .map(|t| (t - fault).as_secs_f64() * 1000.0)
        .collect();
    let failed_before_fault = result
        .timeline
        .iter()
        .any(|(done, latency, ok)| !ok && sent_at(*done, *latency) < fault);
    let samples: Vec<(f64, f64, bool)> = result
        .timeline
        .iter()
        .map(|(at, latency, ok)| {
            (
                at.saturating_duration_since(started).as_secs_f64() * 1000.0,
                latency.as_secs_f64() * 1000.0,
                *ok,
            )
        })
        .collect();
    let mut report = outcome(
        &spec.scenario,
        &result,
        Observed {
            fault: fault_plan.describe(),
            killed,
            failures_after_fault_ms: failures,
            capacity_back_ms: capacity_back.map(|d| d.as_secs_f64() * 1000.0),
            writes: (acknowledged.len() as u64, refused, lost),
            timeline: buckets(&samples),
            fault_ms: (fault - started).as_secs_f64() * 1000.0,
            restored_ms,
            deploy,
        },
    );
    if failed_before_fault {
        // Failures before the fault: the fleet was not healthy to begin
        // with, so the recovery time means nothing.
        report.rto_ms = None;
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_bucketed_by_when_they_ended() {
        let samples = [
            (10.0, 1.0, true),
            (20.0, 3.0, true),
            (260.0, 2.0, true),
            (270.0, 9.0, false),
            (760.0, 1.0, true),
        ];
        let b = buckets(&samples);
        assert_eq!(b.len(), 4);
        assert_eq!((b[0].requests, b[0].failed, b[0].p99_ms), (2, 0, 3.0));
        assert_eq!((b[1].requests, b[1].failed, b[1].p50_ms), (2, 1, 2.0));
        assert_eq!(b[2].requests, 0, "an empty slice stays, so time is even");
        assert_eq!(b[3].at_ms, 750.0);
    }

    #[test]
    fn a_report_is_markdown_with_its_chart_and_the_chart_draws() {
        let report = DrillReport {
            scenario: "replica-loss".into(),
            fault: "SIGKILL replica-1 (pid 42)".into(),
            killed: vec![("replica-1".into(), 42)],
            sent: 100,
            failed: 1,
            success_percent: 99.0,
            p50_ms: 1.0,
            p99_ms: 4.0,
            rto_ms: Some(300.0),
            last_failure_ms: Some(12.0),
            capacity_back_ms: Some(300.0),
            failed_after_recovery: 0,
            writes_acknowledged: 10,
            writes_refused: 0,
            writes_lost: 0,
            timeline: buckets(&[(10.0, 1.0, true), (600.0, 9.0, false), (900.0, 2.0, true)]),
            fault_ms: 500.0,
            restored_ms: None,
            deploy: None,
        };
        let md = markdown(&report, "drill.png", "2026-12-03T10:00:00Z");
        assert!(md.starts_with("# Drill: replica-loss"));
        assert!(md.contains("![latency over time](drill.png)"));
        assert!(md.contains("| RTO | 300 ms"));
        assert!(md.contains("| fault | SIGKILL replica-1 (pid 42) |"));
        let dir = std::env::temp_dir().join(format!("shoal-drill-chart-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let png = dir.join("drill.png");
        chart(&report, &png).unwrap();
        let bytes = std::fs::read(&png).unwrap();
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_tagged_model_is_the_same_model_under_a_new_digest() {
        use shoal_runtime::tract::TractBackend;
        use shoal_runtime::{LoadOptions, LoadedModel};
        let original = include_bytes!("../../../models/digits-v1.onnx");
        let tract = TractBackend::default();
        let before = LoadedModel::load(&tract, original, &LoadOptions::default()).unwrap();
        // Long enough for a two-byte length.
        for tag in ["shoal drill 1234abcd", &"x".repeat(300)] {
            let tagged = tagged_model(tag);
            assert_ne!(&tagged[..], &original[..]);
            let after = LoadedModel::load(&tract, &tagged, &LoadOptions::default()).unwrap();
            assert_eq!(after.signature(), before.signature());
            after.warm_up().unwrap();
        }
    }

    #[test]
    fn recovery_ends_with_the_later_of_capacity_and_the_last_failure() {
        assert_eq!(rto_ms(Some(800.0), &[]), Some(800.0));
        assert_eq!(rto_ms(Some(800.0), &[10.0, 1200.0, 30.0]), Some(1200.0));
        assert_eq!(rto_ms(Some(800.0), &[10.0]), Some(800.0));
        assert_eq!(rto_ms(None, &[10.0]), None, "never whole: no RTO");
    }
}

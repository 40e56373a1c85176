//! The disaster-recovery study's three topologies on Shoal: one replica;
//! two active replicas and a standby; three active replicas. Each runs on
//! emulated hosts of a [`crate::lab`] with equal CPU quotas (the control
//! plane and every replica on a host of its own; the gateway, like the
//! study's load balancer, outside them so it is never the limit), serving
//! `digits-slow` (10 ms of CPU per request on a whole core, so a quarter
//! core serves about 25 per second), and load through the gateway is
//! ramped until the fleet fails (more than 1 % errors, or p95
//! over a bound): once with no fault, once with an active replica SIGKILLed
//! at half the load the first ramp reached. Reported per topology: the
//! highest rate sustained, p95 at half of it, and, around the kill, the
//! failed requests and the highest rate sustained afterwards.
//!
//! [`verdict`] is the pure part: whether one step of the ramp held.

use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use serde::Serialize;

use crate::lab::{HostSpec, Lab};
use crate::load::{LoadSpec, run as load};

/// A fleet shape of the study.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Topology {
    /// One replica.
    Single,
    /// Two active replicas and one standby.
    ActiveStandby,
    /// Three active replicas.
    ActiveActive,
}

impl Topology {
    /// Every topology, in the study's order.
    pub const ALL: [Topology; 3] = [
        Topology::Single,
        Topology::ActiveStandby,
        Topology::ActiveActive,
    ];

    /// (active, standby) replicas.
    pub fn shape(self) -> (usize, usize) {
        match self {
            Topology::Single => (1, 0),
            Topology::ActiveStandby => (2, 1),
            Topology::ActiveActive => (3, 0),
        }
    }

    /// Its name.
    pub fn name(self) -> &'static str {
        match self {
            Topology::Single => "single",
            Topology::ActiveStandby => "active-standby",
            Topology::ActiveActive => "active-active",
        }
    }
}

/// When a ramp step counts as failed.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Bounds {
    /// Largest share of failed requests, e.g. 0.01.
    pub max_error_ratio: f64,
    /// Largest p95 latency (ms).
    pub max_p95_ms: f64,
}

/// Whether a step with `sent` requests, `failed` failures and `p95_ms`
/// held within `bounds`.
pub fn verdict(sent: u64, failed: u64, p95_ms: f64, bounds: Bounds) -> bool {
    #[allow(clippy::cast_precision_loss)]
    let errors = if sent == 0 {
        1.0
    } else {
        failed as f64 / sent as f64
    };
    errors <= bounds.max_error_ratio && p95_ms <= bounds.max_p95_ms
}

/// One ramp step.
#[derive(Debug, Clone, Serialize)]
pub struct Step {
    /// Requests per second offered.
    pub rate: f64,
    /// Sent.
    pub sent: u64,
    /// Failed.
    pub failed: u64,
    /// p95 of answered requests (ms).
    pub p95_ms: f64,
    /// Within the bounds.
    pub held: bool,
}

/// What one topology did.
#[derive(Debug, Clone, Serialize)]
pub struct TopologyResult {
    /// The topology.
    pub topology: Topology,
    /// Highest rate that held with no fault.
    pub max_rate: f64,
    /// p95 at the step nearest half of that (ms).
    pub p95_at_half_ms: f64,
    /// The ramp with no fault.
    pub ramp: Vec<Step>,
    /// The rate at which an active replica was killed (half of `max_rate`).
    pub kill_rate: f64,
    /// Failed requests in the step with the kill.
    pub failed_at_kill: u64,
    /// Highest rate that held after the kill.
    pub max_rate_after_kill: f64,
    /// The ramp with the kill.
    pub ramp_with_kill: Vec<Step>,
}

/// The rates a ramp offers, in requests per second.
pub const RAMP: [f64; 12] = [
    5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 80.0, 100.0, 120.0, 160.0,
];

struct Running {
    /// Kept for its drop, which stops the members and removes the hosts.
    _lab: Lab,
    /// The gateway, outside the lab; killed when dropped.
    _gateway: tokio::process::Child,
    gateway: String,
    active_pids: Vec<u32>,
}

async fn start(
    topology: Topology,
    exe: &Path,
    dir: &Path,
    host: HostSpec,
) -> anyhow::Result<Running> {
    let (active, standby) = topology.shape();
    std::fs::create_dir_all(dir)?;
    let mut lab = Lab::create("shtopo", 78, 1 + active + standby, host)?;
    let path = |p: std::path::PathBuf| p.to_string_lossy().into_owned();
    let control = format!("{}:8081", lab.ip(0));
    lab.spawn(
        0,
        exe,
        &[
            "control".into(),
            "--addr".into(),
            control.clone(),
            "--data-dir".into(),
            path(dir.join("control")),
            "--heartbeat-ms".into(),
            "200".into(),
        ],
        &dir.join("control.log"),
    )?;
    let url = format!("http://{control}");
    let admin = crate::fleet::admin_client(&url, &dir.join("control")).await?;
    let token_file = dir.join("fleet.token");
    shoal_client::secret::write(&token_file, &crate::fleet::fleet_token(&admin).await?)?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let gateway = format!("127.0.0.1:{port}");
    let gateway_child = tokio::process::Command::new(exe)
        .args([
            "gateway",
            "--control",
            &url,
            "--addr",
            &gateway,
            "--region",
            "bench",
        ])
        .arg("--data-dir")
        .arg(dir.join("gateway"))
        .arg("--token-file")
        .arg(&token_file)
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(dir.join("gateway.log"))?)
        .kill_on_drop(true)
        .spawn()
        .context("start the gateway")?;
    for i in 0..active + standby {
        let host = 1 + i;
        let mut args: Vec<String> = vec![
            "replica".into(),
            "--control".into(),
            url.clone(),
            "--addr".into(),
            format!("{}:8090", lab.ip(host)),
            "--data-dir".into(),
            path(dir.join(format!("r{i}"))),
            "--region".into(),
            "bench".into(),
            "--threads".into(),
            "1".into(),
            "--token-file".into(),
            path(token_file.clone()),
        ];
        if i >= active {
            args.push("--standby".into());
        }
        lab.spawn(host, exe, &args, &dir.join(format!("r{i}.log")))?;
    }
    // The demo model, everywhere.
    let model = crate::models_dir().join("digits-slow.onnx");
    let bytes = bytes::Bytes::from(std::fs::read(&model)?);
    let size = bytes.len() as u64;
    let uploaded = admin
        .upload_artifact(
            size,
            futures::stream::once(async move { Ok::<_, std::io::Error>(bytes) }),
        )
        .await?;
    let version = admin
        .create_version(
            "digits",
            &shoal_api::registry::NewVersion {
                sha256: uploaded.sha256,
                ..Default::default()
            },
        )
        .await?
        .version;
    admin
        .deploy(
            "digits",
            &shoal_api::deploy::DeployRequest {
                version: version.clone(),
                ..Default::default()
            },
        )
        .await?;
    let want: shoal_api::VersionKey = format!("digits:{version}").parse()?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let status = admin.status().await?;
        let serving = status
            .replicas
            .iter()
            .filter(|r| r.healthy && r.serving == [want.clone()])
            .count();
        if serving == active + standby {
            break;
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "{} replicas did not all serve {want} (logs in {})",
            topology.name(),
            dir.display()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Let the gateway learn every replica.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let active_pids = lab.pids()[1..=active].to_vec();
    Ok(Running {
        _lab: lab,
        _gateway: gateway_child,
        gateway: format!("http://{gateway}/v2/models/digits/infer"),
        active_pids,
    })
}

async fn step(
    url: &str,
    rate: f64,
    seconds: f64,
    kill: Option<u32>,
) -> anyhow::Result<crate::load::LoadResult> {
    load(LoadSpec {
        schedule: Vec::new(),
        urls: vec![url.to_owned()],
        body: crate::digits_request()?,
        rate,
        duration: Duration::from_secs_f64(seconds),
        connections: 64,
        timeout: Duration::from_secs(2),
        upstream_header: None,
        kill: kill.map(|pid| {
            (
                i32::try_from(pid).unwrap_or(0),
                Duration::from_secs_f64(seconds / 2.0),
            )
        }),
        dead_upstream: None,
        failover: false,
    })
    .await
}

fn as_step(rate: f64, r: &crate::load::LoadResult, bounds: Bounds) -> Step {
    let p95_ms = r.latency.p95_us / 1000.0;
    Step {
        rate,
        sent: r.sent,
        failed: r.failed,
        p95_ms,
        held: verdict(r.sent, r.failed, p95_ms, bounds),
    }
}

/// Runs the study's three topologies (needs root for the lab).
pub async fn run(
    exe: &Path,
    dir: &Path,
    host: HostSpec,
    bounds: Bounds,
    step_seconds: f64,
) -> anyhow::Result<Vec<TopologyResult>> {
    let mut results = Vec::new();
    for topology in Topology::ALL {
        // The ramp with no fault.
        let fleet = start(topology, exe, &dir.join(topology.name()), host).await?;
        let mut ramp = Vec::new();
        for rate in RAMP {
            let r = step(&fleet.gateway, rate, step_seconds, None).await?;
            let s = as_step(rate, &r, bounds);
            eprintln!(
                "{:<15} {rate:>6.0} rps: {} failed of {}, p95 {:.1} ms{}",
                topology.name(),
                s.failed,
                s.sent,
                s.p95_ms,
                if s.held { "" } else { "  ← failed" }
            );
            let held = s.held;
            ramp.push(s);
            if !held {
                break;
            }
        }
        drop(fleet);
        let max_rate = ramp
            .iter()
            .filter(|s| s.held)
            .map(|s| s.rate)
            .fold(0.0, f64::max);
        let half = max_rate / 2.0;
        let p95_at_half_ms = ramp
            .iter()
            .filter(|s| s.held)
            .min_by(|a, b| (a.rate - half).abs().total_cmp(&(b.rate - half).abs()))
            .map_or(0.0, |s| s.p95_ms);

        // The same ramp, with an active replica killed at half the load.
        let fleet = start(topology, exe, &dir.join(topology.name()), host).await?;
        let kill_rate = RAMP
            .iter()
            .copied()
            .filter(|r| *r <= half.max(RAMP[0]))
            .fold(RAMP[0], f64::max);
        let mut with_kill = Vec::new();
        let mut failed_at_kill = 0;
        let mut killed = false;
        for rate in RAMP {
            let kill = (!killed && rate >= kill_rate)
                .then(|| fleet.active_pids.first().copied())
                .flatten();
            let r = step(&fleet.gateway, rate, step_seconds, kill).await?;
            if kill.is_some() {
                killed = true;
                failed_at_kill = r.failed;
            }
            let s = as_step(rate, &r, bounds);
            eprintln!(
                "{:<15} {rate:>6.0} rps{}: {} failed of {}, p95 {:.1} ms{}",
                topology.name(),
                if kill.is_some() { " (kill)" } else { "" },
                s.failed,
                s.sent,
                s.p95_ms,
                if s.held { "" } else { "  ← failed" }
            );
            let held = s.held;
            with_kill.push(s);
            if !held && killed {
                break;
            }
        }
        drop(fleet);
        let max_rate_after_kill = with_kill
            .iter()
            .filter(|s| s.held && s.rate > kill_rate)
            .map(|s| s.rate)
            .fold(0.0, f64::max);
        results.push(TopologyResult {
            topology,
            max_rate,
            p95_at_half_ms,
            ramp,
            kill_rate,
            failed_at_kill,
            max_rate_after_kill,
            ramp_with_kill: with_kill,
        });
    }
    let _ = std::fs::remove_dir_all(dir).context("clean up");
    Ok(results)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_step_holds_within_both_bounds_only() {
        let bounds = Bounds {
            max_error_ratio: 0.01,
            max_p95_ms: 50.0,
        };
        assert!(verdict(1000, 10, 49.0, bounds));
        assert!(!verdict(1000, 11, 10.0, bounds), "1.1 % errors");
        assert!(!verdict(1000, 0, 51.0, bounds), "p95 over the bound");
        assert!(!verdict(0, 0, 0.0, bounds), "nothing sent is not a pass");
    }

    #[test]
    fn the_three_shapes_of_the_study() {
        let shapes: Vec<(usize, usize)> = Topology::ALL.iter().map(|t| t.shape()).collect();
        assert_eq!(shapes, [(1, 0), (2, 1), (3, 0)]);
    }
}

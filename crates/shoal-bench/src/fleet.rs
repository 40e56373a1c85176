//! Fleet benchmarks with a real control plane and real replicas (in this
//! process, on loopback sockets, each with its own data directory; or, for
//! convergence, as processes on emulated hosts of a [`crate::lab`]):
//!
//! - convergence: N replicas converging on a new version against one
//!   replica fetching and loading the same kind of artifact, alternating;
//! - origin egress while N replicas fetch (regional fan-out);
//! - delta update: wire bytes for a version that changes one tensor,
//!   against rsync on the same two files.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use serde::Serialize;
use shoal_api::deploy::DeployRequest;
use shoal_api::registry::NewVersion;
use shoal_client::ApiClient;
use shoal_control::{ControlConfig, ControlServer};
use shoal_replica::{ReplicaConfig, ReplicaServer};
use shoal_runtime::tract::TractBackend;
use shoal_sync::SyncConfig;

use crate::lab::{HostSpec, Lab};
use crate::stats::median;

/// Where a fleet's members run.
enum Members {
    /// In this process, on loopback.
    InProcess {
        control: ControlServer,
        replicas: Vec<ReplicaServer>,
    },
    /// As `shoal` processes, one per emulated host of a [`Lab`]; the
    /// replicas' base URLs.
    Lab { lab: Lab, replicas: Vec<String> },
}

/// A control plane and replicas, in this process on loopback or on
/// emulated hosts.
pub struct Fleet {
    members: Members,
    client: ApiClient,
    dir: PathBuf,
}

/// Runs fleet members on emulated hosts with their own link and CPU quota
/// (see [`crate::lab`]) rather than in this process.
#[derive(Debug, Clone)]
pub struct Isolation {
    /// What every host gets.
    pub host: HostSpec,
    /// The `shoal` binary to run on the hosts.
    pub exe: PathBuf,
}

/// A client of the control plane at `url` holding the admin token it
/// wrote to `data_dir` at its first start (waiting up to 30 s for it to
/// start listening).
pub(crate) async fn admin_client(url: &str, data_dir: &Path) -> anyhow::Result<ApiClient> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let probe = ApiClient::control(url, None).with_timeout(Duration::from_secs(1));
        if probe.get_raw("/health").await.is_ok() {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the control plane at {url} did not start"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let token = shoal_client::secret::read(&data_dir.join("admin.token"))?;
    Ok(ApiClient::control(url, Some(token)))
}

/// A new fleet token for the bench's replicas.
pub(crate) async fn fleet_token(admin: &ApiClient) -> anyhow::Result<String> {
    let created = admin
        .create_token(&shoal_api::auth::NewToken {
            name: format!("bench-fleet-{:08x}", rand::random::<u32>()),
            role: shoal_api::auth::Role::Fleet,
        })
        .await?;
    Ok(created.token)
}

impl Fleet {
    /// Starts a control plane and `n` replicas under `dir`.
    pub async fn start(n: usize, dir: &Path) -> anyhow::Result<Fleet> {
        let control = ControlServer::start(ControlConfig {
            addr: "127.0.0.1:0".parse()?,
            data_dir: dir.join("control"),
            heartbeat_interval: Duration::from_millis(200),
            dead_after: Duration::from_secs(2),
            ..ControlConfig::default()
        })
        .await?;
        let url = format!("http://{}", control.addr);
        let client = admin_client(&url, &dir.join("control")).await?;
        let fleet_token = fleet_token(&client).await?;
        let mut replicas = Vec::new();
        for i in 0..n {
            let sync = SyncConfig {
                control: url.clone(),
                token: Some(fleet_token.clone()),
                id: format!("bench-r{i}"),
                region: "bench".into(),
                advertise: String::new(),
                data_dir: dir.join(format!("r{i}")),
                poll_interval: Duration::from_secs(10),
                labels: Default::default(),
                standby: false,
                tier: Default::default(),
                events: None,
            };
            let config = ReplicaConfig {
                id: Some(format!("bench-r{i}")),
                threads: Some(1),
                ..ReplicaConfig::default()
            };
            replicas.push(
                shoal_sync::start_replica(config, sync, Arc::new(TractBackend::default())).await?,
            );
        }
        let fleet = Fleet {
            members: Members::InProcess { control, replicas },
            client,
            dir: dir.to_owned(),
        };
        fleet.until_registered(n).await?;
        Ok(fleet)
    }

    /// Starts a control plane (host 0) and `n` replicas (hosts 1..=n) as
    /// processes on a new lab named `prefix` on subnet `subnet`.
    pub async fn start_isolated(
        n: usize,
        dir: &Path,
        prefix: &str,
        subnet: u8,
        isolation: &Isolation,
    ) -> anyhow::Result<Fleet> {
        std::fs::create_dir_all(dir)?;
        let mut lab = Lab::create(prefix, subnet, n + 1, isolation.host)?;
        let path = |p: PathBuf| p.to_string_lossy().into_owned();
        let control = format!("{}:8081", lab.ip(0));
        lab.spawn(
            0,
            &isolation.exe,
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
        let client = admin_client(&url, &dir.join("control")).await?;
        let token_file = dir.join("fleet.token");
        shoal_client::secret::write(&token_file, &fleet_token(&client).await?)?;
        let mut replicas = Vec::new();
        for i in 1..=n {
            let addr = format!("{}:8080", lab.ip(i));
            lab.spawn(
                i,
                &isolation.exe,
                &[
                    "replica".into(),
                    "--control".into(),
                    url.clone(),
                    "--addr".into(),
                    addr.clone(),
                    "--data-dir".into(),
                    path(dir.join(format!("r{i}"))),
                    "--region".into(),
                    "bench".into(),
                    "--id".into(),
                    format!("bench-r{i}"),
                    "--poll-interval".into(),
                    "10".into(),
                    "--threads".into(),
                    "1".into(),
                    "--token-file".into(),
                    path(token_file.clone()),
                ],
                &dir.join(format!("r{i}.log")),
            )?;
            replicas.push(format!("http://{addr}"));
        }
        let fleet = Fleet {
            members: Members::Lab { lab, replicas },
            client,
            dir: dir.to_owned(),
        };
        fleet.until_registered(n).await?;
        Ok(fleet)
    }

    /// Waits until `n` replicas have registered and heartbeated.
    async fn until_registered(&self, n: usize) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let healthy = match self.client.status().await {
                Ok(status) => status.replicas.iter().filter(|r| r.healthy).count(),
                Err(_) => 0, // not listening yet
            };
            if healthy == n {
                return Ok(());
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "replicas did not all register (logs in {})",
                self.dir.display()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn size(&self) -> usize {
        match &self.members {
            Members::InProcess { replicas, .. } => replicas.len(),
            Members::Lab { replicas, .. } => replicas.len(),
        }
    }

    /// Pushes `file` as a new version of `model`; returns the version.
    pub async fn push(&self, model: &str, file: &Path) -> anyhow::Result<String> {
        let bytes =
            Bytes::from(std::fs::read(file).with_context(|| format!("read {}", file.display()))?);
        let size = bytes.len() as u64;
        let stream = futures::stream::once(async move { Ok::<_, std::io::Error>(bytes) });
        let uploaded = self.client.upload_artifact(size, stream).await?;
        let record = self
            .client
            .create_version(
                model,
                &NewVersion {
                    sha256: uploaded.sha256,
                    ..NewVersion::default()
                },
            )
            .await?;
        Ok(record.version)
    }

    /// Deploys `model:version` to every replica at once and returns the
    /// time until all of them serve it.
    pub async fn deploy_and_wait(&self, model: &str, version: &str) -> anyhow::Result<Duration> {
        let started = Instant::now();
        self.client
            .deploy(
                model,
                &DeployRequest {
                    version: version.to_owned(),
                    max_surge: Some(u32::try_from(self.size()).unwrap_or(1)),
                    ..DeployRequest::default()
                },
            )
            .await?;
        let deadline = started + Duration::from_secs(600);
        match &self.members {
            Members::InProcess { replicas, .. } => {
                for r in replicas {
                    while !r.replica.store().has(model, version) {
                        anyhow::ensure!(
                            Instant::now() < deadline,
                            "replica {} never served {model}:{version}",
                            r.replica.id()
                        );
                        let _ =
                            tokio::time::timeout(Duration::from_millis(50), r.replica.changed())
                                .await;
                    }
                }
            }
            Members::Lab { lab, replicas } => {
                let throttled_before = lab.throttled_ms();
                let machine_before = crate::lab::CpuReading::now();
                let ready = format!("/v2/models/{model}/versions/{version}/ready");
                let times = futures::future::try_join_all(replicas.iter().map(|url| {
                    let ready = ready.clone();
                    async move {
                        let replica = ApiClient::replica(url, None);
                        while replica.get_raw(&ready).await.is_err() {
                            anyhow::ensure!(
                                Instant::now() < deadline,
                                "replica {url} never served {model}:{version}"
                            );
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                        Ok(started.elapsed().as_secs_f64())
                    }
                }))
                .await?;
                if std::env::var_os("SHOAL_BENCH_TRACE").is_some() {
                    let throttled: Vec<u64> = lab
                        .throttled_ms()
                        .iter()
                        .zip(&throttled_before)
                        .map(|(after, before)| after - before)
                        .collect();
                    let machine = machine_before.load_since().map_or(String::new(), |l| {
                        format!(
                            "; machine {:.0} % busy, {:.0} points of it stolen by the hypervisor",
                            l.busy_pct, l.steal_pct
                        )
                    });
                    eprintln!(
                        "ready after {times:.2?} s; ms held back by the CPU quota \
                         (control, replicas…): {throttled:?}{machine}"
                    );
                }
            }
        }
        Ok(started.elapsed())
    }

    /// Bytes the origin has served so far.
    pub async fn egress(&self) -> anyhow::Result<u64> {
        match &self.members {
            Members::InProcess { control, .. } => Ok(control.control.origin_egress_bytes()),
            Members::Lab { .. } => {
                let metrics = self.client.get_raw("/metrics").await?;
                Ok(String::from_utf8_lossy(&metrics)
                    .lines()
                    .filter(|l| l.starts_with("shoal_artifact_egress_bytes_total{"))
                    .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
                    .sum())
            }
        }
    }

    /// The control plane, when it runs in this process.
    pub fn control(&self) -> Option<&std::sync::Arc<shoal_control::Control>> {
        match &self.members {
            Members::InProcess { control, .. } => Some(&control.control),
            Members::Lab { .. } => None,
        }
    }

    /// Stops everything.
    pub async fn stop(self) -> anyhow::Result<()> {
        match self.members {
            Members::InProcess { control, replicas } => {
                for r in replicas {
                    r.stop().await?;
                }
                control.stop().await?;
            }
            // Dropping the lab kills its processes and removes its hosts.
            Members::Lab { .. } => {}
        }
        if std::env::var_os("SHOAL_BENCH_LOG").is_some() {
            eprintln!("logs kept in {}", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
        Ok(())
    }
}

/// Convergence and egress results.
#[derive(Debug, Clone, Serialize)]
pub struct Convergence {
    /// Replicas in the big fleet.
    pub replicas: usize,
    /// Artifact size.
    pub artifact_bytes: u64,
    /// One replica: fetch + load, per round (s).
    pub single_s: Vec<f64>,
    /// N replicas: all serving, per round (s).
    pub fleet_s: Vec<f64>,
    /// Median of per-round fleet ÷ single.
    pub ratio: f64,
    /// The goal per round (s): 1.2 × one replica's time + 100 ms, the
    /// allowance PERF.md gives event-driven convergence (a deploy reaches
    /// replicas through the watch stream).
    pub goal_s: Vec<f64>,
    /// Median of per-round (fleet − goal), s: ≤ 0 when the goal is met.
    pub median_over_goal_s: f64,
    /// Origin egress ÷ artifact size while N replicas fetched, per round.
    pub egress_ratio: Vec<f64>,
    /// Each host's link and CPU when members ran on emulated hosts.
    pub isolation: Option<HostSpec>,
    /// How busy the machine was while N replicas converged, per round.
    pub fleet_load: Vec<Option<crate::lab::MachineLoad>>,
    /// Rounds left out of the verdict: the machine was saturated
    /// ([`crate::lab::MachineLoad::saturated`]), so the emulated hosts
    /// cannot all have had their quotas.
    pub saturated_rounds: Vec<usize>,
    /// False when most rounds were saturated: `ratio` and
    /// `median_over_goal_s` then describe the machine, not Shoal, and no
    /// verdict should be drawn.
    pub verdict: bool,
}

pub(crate) fn make_model(
    out: &Path,
    layers: usize,
    seed: u64,
    perturb: Option<usize>,
) -> anyhow::Result<()> {
    let script = crate::models_dir().join("../tools/make_mlp_model.py");
    let mut cmd = std::process::Command::new("python3");
    cmd.arg(&script)
        .arg(out)
        .args(["--layers", &layers.to_string(), "--seed", &seed.to_string()]);
    if let Some(k) = perturb {
        cmd.args(["--perturb-layer", &k.to_string()]);
    }
    let status = cmd
        .status()
        .context("run tools/make_mlp_model.py (scripts/setup-python installs its packages)")?;
    anyhow::ensure!(status.success(), "make_mlp_model.py failed");
    Ok(())
}

/// PERF.md's convergence goal for a fleet, given one replica's fetch +
/// load time: 1.2 × that, + 100 ms since the deploy travels as an event.
pub fn convergence_goal(single: Duration) -> Duration {
    single.mul_f64(1.2) + Duration::from_millis(100)
}

/// Alternates one replica and `n` replicas converging on fresh artifacts
/// of `layers` MiB, `rounds` times.
///
/// With `isolation`, every member runs as a process on its own emulated
/// host (own link, own CPU quota): the comparison the goal means, replicas
/// on separate machines, which one two-core machine cannot give otherwise.
pub async fn convergence(
    n: usize,
    layers: usize,
    rounds: usize,
    dir: &Path,
    isolation: Option<&Isolation>,
) -> anyhow::Result<Convergence> {
    std::fs::create_dir_all(dir)?;
    let (single, many) = match isolation {
        None => (
            Fleet::start(1, &dir.join("one")).await?,
            Fleet::start(n, &dir.join("many")).await?,
        ),
        Some(iso) => (
            Fleet::start_isolated(1, &dir.join("one"), "shoal1-", 71, iso).await?,
            Fleet::start_isolated(n, &dir.join("many"), "shoaln-", 72, iso).await?,
        ),
    };
    let mut result = Convergence {
        replicas: n,
        artifact_bytes: 0,
        single_s: Vec::new(),
        fleet_s: Vec::new(),
        ratio: 0.0,
        goal_s: Vec::new(),
        median_over_goal_s: 0.0,
        egress_ratio: Vec::new(),
        isolation: isolation.map(|i| i.host),
        fleet_load: Vec::new(),
        saturated_rounds: Vec::new(),
        verdict: true,
    };
    let mut ratios = Vec::new();
    for round in 0..rounds {
        // Fresh weights every time: nothing is in any cache.
        let a = dir.join(format!("a{round}.onnx"));
        let b = dir.join(format!("b{round}.onnx"));
        make_model(&a, layers, 1000 + round as u64, None)?;
        make_model(&b, layers, 2000 + round as u64, None)?;
        let size = std::fs::metadata(&a)?.len();
        result.artifact_bytes = size;
        let va = single.push("m", &a).await?;
        let t1 = single.deploy_and_wait("m", &va).await?;
        let vb = many.push("m", &b).await?;
        let before = many.egress().await?;
        let reading = crate::lab::CpuReading::now();
        let tn = many.deploy_and_wait("m", &vb).await?;
        let load = reading.load_since();
        if load.is_some_and(|l| l.saturated()) {
            result.saturated_rounds.push(round);
        }
        result.fleet_load.push(load);
        #[allow(clippy::cast_precision_loss)]
        result
            .egress_ratio
            .push((many.egress().await? - before) as f64 / size as f64);
        result.single_s.push(t1.as_secs_f64());
        result.fleet_s.push(tn.as_secs_f64());
        ratios.push(tn.as_secs_f64() / t1.as_secs_f64());
        result.goal_s.push(convergence_goal(t1).as_secs_f64());
        let _ = std::fs::remove_file(&a);
        let _ = std::fs::remove_file(&b);
    }
    (result.ratio, result.median_over_goal_s, result.verdict) = judge(
        &ratios,
        &result.fleet_s,
        &result.goal_s,
        &result.saturated_rounds,
    );
    single.stop().await?;
    many.stop().await?;
    Ok(result)
}

/// The medians of fleet ÷ single and of fleet − goal over the rounds the
/// machine could give every host its quota, and whether those were most
/// rounds (the verdict holds); otherwise the medians over all rounds, with
/// no verdict.
fn judge(ratios: &[f64], fleet: &[f64], goal: &[f64], saturated: &[usize]) -> (f64, f64, bool) {
    let rounds = ratios.len();
    let clear: Vec<usize> = (0..rounds).filter(|r| !saturated.contains(r)).collect();
    let verdict = clear.len() * 2 > rounds;
    let judged: Vec<usize> = if verdict {
        clear
    } else {
        (0..rounds).collect()
    };
    let ratio = median(&judged.iter().map(|&r| ratios[r]).collect::<Vec<_>>());
    let over = median(
        &judged
            .iter()
            .map(|&r| fleet[r] - goal[r])
            .collect::<Vec<_>>(),
    );
    (ratio, over, verdict)
}

/// Delta update results.
#[derive(Debug, Clone, Serialize)]
pub struct Delta {
    /// Size of each version.
    pub artifact_bytes: u64,
    /// Bytes of the one tensor that changed.
    pub changed_bytes: u64,
    /// Bytes the origin served for the new version to a replica holding the old.
    pub shoal_wire_bytes: u64,
    /// rsync's total bytes sent + received for the same update.
    pub rsync_wire_bytes: u64,
    /// Shoal ÷ rsync.
    pub ratio: f64,
}

fn rsync_bytes(old: &Path, new: &Path, dir: &Path) -> anyhow::Result<u64> {
    let dest = dir.join("rsync-dest.onnx");
    std::fs::copy(old, &dest)?;
    // Local rsync copies whole files unless told not to; --no-whole-file
    // makes it run its delta algorithm over the pipe between its two ends.
    let out = std::process::Command::new("rsync")
        .args(["--no-whole-file", "--ignore-times", "--stats"])
        .arg(new)
        .arg(&dest)
        .output()
        .context("run rsync (scripts/setup-bench installs it)")?;
    anyhow::ensure!(
        out.status.success(),
        "rsync failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |name: &str| -> anyhow::Result<u64> {
        let line = text
            .lines()
            .find(|l| l.starts_with(name))
            .with_context(|| format!("rsync --stats has no {name:?}"))?;
        let digits: String = line[name.len()..]
            .chars()
            .take_while(|c| *c != 'b')
            .filter(char::is_ascii_digit)
            .collect();
        Ok(digits.parse()?)
    };
    let total = field("Total bytes sent:")? + field("Total bytes received:")?;
    let _ = std::fs::remove_file(&dest);
    Ok(total)
}

/// A replica holding version 1 of a `layers`-MiB model fetches version 2,
/// which changes one tensor.
pub async fn delta(layers: usize, dir: &Path) -> anyhow::Result<Delta> {
    std::fs::create_dir_all(dir)?;
    let old = dir.join("old.onnx");
    let new = dir.join("new.onnx");
    make_model(&old, layers, 7, None)?;
    make_model(&new, layers, 7, Some(layers / 2))?;
    let fleet = Fleet::start(1, &dir.join("fleet")).await?;
    let v1 = fleet.push("big", &old).await?;
    fleet.deploy_and_wait("big", &v1).await?;
    let v2 = fleet.push("big", &new).await?;
    let before = fleet.egress().await?;
    fleet.deploy_and_wait("big", &v2).await?;
    let shoal = fleet.egress().await? - before;
    fleet.stop().await?;
    let rsync = rsync_bytes(&old, &new, dir)?;
    let size = std::fs::metadata(&new)?.len();
    let _ = std::fs::remove_dir_all(dir);
    #[allow(clippy::cast_precision_loss)]
    Ok(Delta {
        artifact_bytes: size,
        changed_bytes: 512 * 512 * 4,
        shoal_wire_bytes: shoal,
        rsync_wire_bytes: rsync,
        ratio: shoal as f64 / rsync as f64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saturated_rounds_are_left_out_of_the_verdict() {
        let ratios = [1.1, 1.5, 1.2];
        let fleet = [2.2, 3.0, 2.4];
        let goal = [2.4, 2.4, 2.5];
        // Round 2 saturated: judged on rounds 1 and 3.
        let (ratio, over, verdict) = judge(&ratios, &fleet, &goal, &[1]);
        assert!(verdict);
        assert!((ratio - 1.15).abs() < 1e-9, "{ratio}");
        assert!((over - (-0.15)).abs() < 1e-9, "{over}");
        // Most rounds saturated: every round, and no verdict.
        let (ratio, _, verdict) = judge(&ratios, &fleet, &goal, &[0, 1]);
        assert!(!verdict);
        assert!((ratio - 1.2).abs() < 1e-9, "{ratio}");
    }
}

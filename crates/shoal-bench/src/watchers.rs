//! What it costs a control plane to keep many replicas up to date: by
//! watch streams (each replica holds an HTTP stream to the control plane)
//! against NATS JetStream (the leader publishes; replicas follow NATS).
//! One `shoal control` process per round, `replicas` simulated followers
//! (registered replicas whose desired states are followed, nothing else:
//! no heartbeats, which cost the same either way), `changes` fleet changes
//! each reaching every follower; rounds alternate between the two. Reports
//! the control plane's CPU seconds over the changes (from `/proc`), the
//! sockets it holds while followed, the NATS server's CPU beside it, and
//! how long each change took to reach every follower.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use futures::StreamExt;
use serde::Serialize;
use shoal_client::ApiClient;
use tokio::time::Instant;

/// How followers learn of changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// One watch stream per follower to the control plane.
    Watch,
    /// Ordered consumers on NATS JetStream; the control plane publishes.
    Nats,
}

/// One mode's figures over every round.
#[derive(Debug, Clone, Serialize)]
pub struct ModeFigures {
    /// The mode.
    pub mode: Mode,
    /// Control-plane CPU seconds per round, over its changes.
    pub control_cpu_s: Vec<f64>,
    /// NATS server CPU seconds per round, over the same (NATS mode only).
    pub nats_cpu_s: Vec<f64>,
    /// Sockets the control plane held while followed (largest seen).
    pub control_sockets: usize,
    /// Per change: until every follower had it (ms), every round.
    pub fanout_ms: Vec<f64>,
    /// Per round: from starting the followers until every one had the
    /// current state (s): connections, streams or consumers set up.
    pub start_s: Vec<f64>,
}

/// The comparison.
#[derive(Debug, Clone, Serialize)]
pub struct WatchersReport {
    /// Simulated followers.
    pub replicas: usize,
    /// Changes per round.
    pub changes: usize,
    /// Watch streams, then NATS.
    pub modes: Vec<ModeFigures>,
}

fn clock_ticks() -> f64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .map_or(100.0, |t| t as f64)
}

/// CPU seconds (user + system) process `pid` has used.
fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) start at ')'.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15: 11 and 12 after the state.
    Ok((ticks(11) + ticks(12)) / clock_ticks())
}

/// Sockets process `pid` holds.
fn sockets(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.filter_map(Result::ok)
                .filter(|e| {
                    std::fs::read_link(e.path())
                        .is_ok_and(|l| l.to_string_lossy().starts_with("socket:"))
                })
                .count()
        })
        .unwrap_or(0)
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// A child killed when dropped.
struct Child(tokio::process::Child);

impl Child {
    fn pid(&self) -> u32 {
        self.0.id().unwrap_or(0)
    }
}

/// `nats-server -js` on a free port with its store under `dir`.
async fn start_nats(dir: &Path) -> anyhow::Result<(Child, String)> {
    let port = free_port()?;
    let child = tokio::process::Command::new("nats-server")
        .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
        .arg(dir.join("nats"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("start nats-server (Debian's nats-server: scripts/setup-bench nats-server)")?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        if Instant::now() > deadline {
            bail!("nats-server did not start");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok((Child(child), format!("nats://127.0.0.1:{port}")))
}

/// `shoal control` (no auth: a benchmark on loopback) on a free port.
async fn start_control(
    exe: &Path,
    dir: &Path,
    events: Option<&str>,
) -> anyhow::Result<(Child, ApiClient)> {
    let addr = format!("127.0.0.1:{}", free_port()?);
    let mut command = tokio::process::Command::new(exe);
    command
        .args(["control", "--no-auth", "--addr", &addr, "--data-dir"])
        .arg(dir)
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(dir.with_extension("log"))?)
        .kill_on_drop(true);
    if let Some(url) = events {
        command.args(["--events", url]);
    }
    let child = Child(command.spawn().context("start shoal control")?);
    let client =
        ApiClient::control(&format!("http://{addr}"), None).with_timeout(Duration::from_secs(10));
    let deadline = Instant::now() + Duration::from_secs(30);
    while client.get_raw("/health").await.is_err() {
        if Instant::now() > deadline {
            bail!(
                "shoal control did not start; see {}",
                dir.with_extension("log").display()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok((child, client))
}

fn registration(id: &str) -> shoal_api::fleet::Registration {
    shoal_api::fleet::Registration {
        tier: Default::default(),
        id: id.to_owned(),
        address: "127.0.0.1:9".into(),
        region: "sim".into(),
        labels: Default::default(),
        pid: None,
        standby: false,
    }
}

/// Pushes the bundled digits model twice and deploys version 1 (with no
/// live replica the rollout ends at once).
async fn deploy_digits(client: &ApiClient) -> anyhow::Result<()> {
    for file in ["digits-v1.onnx", "digits-v2.onnx"] {
        let path = crate::models_dir().join(file);
        let bytes = bytes::Bytes::from(
            std::fs::read(&path).with_context(|| format!("read {}", path.display()))?,
        );
        let size = bytes.len() as u64;
        let uploaded = client
            .upload_artifact(size, futures::stream::iter([Ok(bytes)]))
            .await?;
        client
            .create_version(
                "digits",
                &shoal_api::registry::NewVersion {
                    sha256: uploaded.sha256,
                    ..Default::default()
                },
            )
            .await?;
    }
    client
        .deploy(
            "digits",
            &shoal_api::deploy::DeployRequest {
                version: "1".into(),
                ..Default::default()
            },
        )
        .await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = client.rollout("digits").await?;
        if r.state.is_terminal() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the first deploy did not end: {}", r.reason);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every follower's latest digits version (0: none yet).
type Seen = Arc<Vec<AtomicU64>>;

/// The digits version `state` routes to by default (0: none): what each
/// change moves, so a follower has a change when it has that version.
fn serving(state: &shoal_api::fleet::DesiredState) -> u64 {
    state
        .models
        .iter()
        .find(|m| m.model == "digits")
        .and_then(|m| m.default.parse().ok())
        .unwrap_or(0)
}

/// Starts `n` followers of `mode`; returns their tasks.
async fn followers(
    mode: Mode,
    n: usize,
    client: &ApiClient,
    events_url: Option<&str>,
    seen: &Seen,
) -> anyhow::Result<Vec<tokio::task::JoinHandle<()>>> {
    // Each NATS follower has its own connection, as each replica would.
    let mut connections = Vec::new();
    if let Some(url) = events_url {
        for _ in 0..n {
            connections.push(shoal_events::Events::connect(url).await?);
        }
    }
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let seen = seen.clone();
        let id = format!("sim-{i}");
        let task = match mode {
            Mode::Watch => {
                let client = client.clone();
                tokio::spawn(async move {
                    let mut after = 0;
                    loop {
                        if let Ok(stream) = client.watch(&id, after).await {
                            let mut stream = std::pin::pin!(stream);
                            while let Some(Ok(state)) = stream.next().await {
                                after = after.max(state.revision);
                                seen[i].store(serving(&state), Ordering::Relaxed);
                            }
                        }
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                })
            }
            Mode::Nats => {
                let events = connections[i % connections.len()].clone();
                tokio::spawn(async move {
                    loop {
                        match events.follow_desired(&id).await {
                            Ok(stream) => {
                                let mut stream = std::pin::pin!(stream);
                                loop {
                                    match stream.next().await {
                                        Some(Ok(state)) => {
                                            seen[i].store(serving(&state), Ordering::Relaxed);
                                        }
                                        Some(Err(e)) => {
                                            tracing::warn!(follower = %id, error = %e, "follow broke off");
                                            break;
                                        }
                                        None => {
                                            tracing::warn!(follower = %id, "follow ended");
                                            break;
                                        }
                                    }
                                }
                            }
                            Err(e) => tracing::warn!(follower = %id, error = %e, "cannot follow"),
                        }
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                })
            }
        };
        tasks.push(task);
    }
    Ok(tasks)
}

/// Waits until every follower has digits `version` by default; how long
/// that took.
async fn everyone_has(
    seen: &Seen,
    version: u64,
    since: Instant,
    within: Duration,
) -> anyhow::Result<Duration> {
    let deadline = since + within;
    loop {
        if seen.iter().all(|s| s.load(Ordering::Relaxed) == version) {
            return Ok(since.elapsed());
        }
        if Instant::now() > deadline {
            let behind = seen
                .iter()
                .filter(|s| s.load(Ordering::Relaxed) != version)
                .count();
            bail!("{behind} followers never saw digits:{version}");
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// One round of `mode`.
async fn round(
    mode: Mode,
    exe: &Path,
    dir: &Path,
    replicas: usize,
    changes: usize,
    figures: &mut ModeFigures,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let nats = match mode {
        Mode::Nats => Some(start_nats(dir).await?),
        Mode::Watch => None,
    };
    let events_url = nats.as_ref().map(|(_, url)| url.as_str());
    let (control, client) = start_control(exe, &dir.join("control"), events_url).await?;
    for i in 0..replicas {
        client.register(&registration(&format!("sim-{i}"))).await?;
    }
    // Two versions of a model deployed, so that each change (traffic moved
    // from one to the other) changes every replica's desired state.
    deploy_digits(&client).await?;
    let seen: Seen = Arc::new((0..replicas).map(|_| AtomicU64::new(0)).collect());
    let tasks = followers(mode, replicas, &client, events_url, &seen).await?;
    let started = Instant::now();
    figures.start_s.push(
        everyone_has(&seen, 1, started, Duration::from_secs(600))
            .await
            .with_context(|| format!("{mode:?}: the followers did not all start"))?
            .as_secs_f64(),
    );
    let nats_pid = nats.as_ref().map(|(c, _)| c.pid());
    let (cpu_before, nats_before) = (
        cpu_seconds(control.pid())?,
        nats_pid.map(cpu_seconds).transpose()?,
    );
    let mut held = sockets(control.pid());
    for k in 0..changes {
        let started = Instant::now();
        let to = if k % 2 == 0 { 2 } else { 1 };
        client
            .set_traffic(
                "digits",
                &shoal_api::deploy::TrafficRequest {
                    targets: vec![shoal_api::deploy::TrafficTarget {
                        version: to.to_string(),
                        weight: 100,
                    }],
                    shadow: None,
                    split_header: None,
                    reason: Some("bench".into()),
                },
            )
            .await?;
        let took = everyone_has(&seen, to, started, Duration::from_secs(60)).await?;
        figures.fanout_ms.push(took.as_secs_f64() * 1000.0);
        held = held.max(sockets(control.pid()));
    }
    figures
        .control_cpu_s
        .push(cpu_seconds(control.pid())? - cpu_before);
    if let (Some(pid), Some(before)) = (nats_pid, nats_before) {
        figures.nats_cpu_s.push(cpu_seconds(pid)? - before);
    }
    figures.control_sockets = figures.control_sockets.max(held);
    for t in tasks {
        t.abort();
    }
    drop(control);
    drop(nats);
    Ok(())
}

/// `rounds` alternating rounds of each mode, in scratch directories under
/// `dir`.
pub async fn run(
    exe: &Path,
    dir: &Path,
    replicas: usize,
    changes: usize,
    rounds: usize,
) -> anyhow::Result<WatchersReport> {
    let mut modes: Vec<ModeFigures> = [Mode::Watch, Mode::Nats]
        .into_iter()
        .map(|mode| ModeFigures {
            mode,
            control_cpu_s: Vec::new(),
            nats_cpu_s: Vec::new(),
            control_sockets: 0,
            fanout_ms: Vec::new(),
            start_s: Vec::new(),
        })
        .collect();
    for r in 0..rounds {
        for figures in &mut modes {
            let dir: PathBuf = dir.join(format!("{:?}-{r}", figures.mode).to_lowercase());
            let _ = std::fs::remove_dir_all(&dir);
            round(figures.mode, exe, &dir, replicas, changes, figures).await?;
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
    Ok(WatchersReport {
        replicas,
        changes,
        modes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_has_cpu_time_and_sockets_are_counted() {
        let pid = std::process::id();
        let spent = cpu_seconds(pid).unwrap();
        assert!(spent >= 0.0);
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        assert!(sockets(pid) >= 1);
        drop(listener);
    }
}

//! Disaster drills against a running `shoal up` fleet: steady open-loop
//! load through a gateway and a stream of acknowledged registry writes,
//! a fault a third of the way in (SIGKILL of a replica, of every replica of
//! a region, of the control plane, or of one of two gateways), and what the
//! clients and the registry saw: success rate, failed requests, the
//! recovery time (RTO: from the fault until every killed member is back,
//! serving, and no request fails any more) and the recovery point (RPO:
//! acknowledged writes that were lost).
//!
//! [`outcome`] is the pure part: the figures from what was observed.
//! [`run`] observes: it finds the fleet's processes in `fleet.json`, kills,
//! and watches `GET /api/v1/status` and the members' health until the fleet
//! is whole again.

use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use serde::Serialize;
use shoal_client::ControlClient;
use tokio::time::Instant;

use crate::load::{LoadSpec, run as load};

/// What goes wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scenario {
    /// One active replica is SIGKILLed.
    ReplicaLoss,
    /// Every replica of a region is SIGKILLed (another region must exist).
    RegionLoss(String),
    /// The control plane is SIGKILLed.
    ControlPlaneLoss,
    /// One of two gateways is SIGKILLed; clients hold both.
    GatewayLoss,
}

impl Scenario {
    /// The scenario's name, as the CLI takes it.
    pub fn name(&self) -> &'static str {
        match self {
            Scenario::ReplicaLoss => "replica-loss",
            Scenario::RegionLoss(_) => "region-loss",
            Scenario::ControlPlaneLoss => "control-plane-loss",
            Scenario::GatewayLoss => "gateway-loss",
        }
    }
}

/// How to run a drill.
#[derive(Debug, Clone)]
pub struct DrillSpec {
    /// What goes wrong.
    pub scenario: Scenario,
    /// The `shoal up` data directory (`fleet.json`, `admin.token`).
    pub data_dir: std::path::PathBuf,
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
    /// Of which: until every killed member was back (ms after the fault).
    pub capacity_back_ms: Option<f64>,
    /// Registry writes acknowledged during the drill.
    pub writes_acknowledged: u64,
    /// Writes attempted but not acknowledged (the control plane was down).
    pub writes_refused: u64,
    /// Recovery point: acknowledged writes missing afterwards.
    pub writes_lost: u64,
}

/// The recovery time from what was observed (all times in ms after the
/// fault): the later of the last failure and the moment capacity was back;
/// `None` while capacity never came back.
pub fn rto_ms(capacity_back_ms: Option<f64>, failures_after_fault_ms: &[f64]) -> Option<f64> {
    let back = capacity_back_ms?;
    let last_failure = failures_after_fault_ms.iter().copied().fold(0.0, f64::max);
    Some(back.max(last_failure))
}

/// The figures of a drill from what was observed.
pub fn outcome(
    scenario: &Scenario,
    killed: Vec<(String, u32)>,
    load: &crate::load::LoadResult,
    failures_after_fault_ms: &[f64],
    capacity_back_ms: Option<f64>,
    writes: (u64, u64, u64),
) -> DrillReport {
    let (writes_acknowledged, writes_refused, writes_lost) = writes;
    #[allow(clippy::cast_precision_loss)]
    let success_percent = if load.sent == 0 {
        100.0
    } else {
        100.0 * (load.sent - load.failed.min(load.sent)) as f64 / load.sent as f64
    };
    DrillReport {
        scenario: scenario.name().to_owned(),
        killed,
        sent: load.sent,
        failed: load.failed,
        success_percent,
        p50_ms: load.latency.p50_us / 1000.0,
        p99_ms: load.latency.p99_us / 1000.0,
        rto_ms: rto_ms(capacity_back_ms, failures_after_fault_ms),
        last_failure_ms: failures_after_fault_ms.iter().copied().reduce(f64::max),
        capacity_back_ms,
        writes_acknowledged,
        writes_refused,
        writes_lost,
    }
}

/// A `shoal up` fleet as its `fleet.json` describes it.
#[derive(Debug, Clone, serde::Deserialize)]
struct FleetFile {
    control: String,
    gateways: Vec<(String, String)>,
    pids: Vec<(String, u32)>,
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

fn sigkill(pid: u32) {
    if let Ok(pid) = i32::try_from(pid) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

/// What must be true for the fleet to be whole again: each killed member
/// back under a new pid, and as many healthy replicas as before.
struct Whole<'a> {
    killed: &'a [(String, u32)],
    healthy_before: usize,
}

impl Whole<'_> {
    async fn now(&self, data_dir: &Path, client: &ControlClient) -> bool {
        let Ok(fleet) = read_fleet(data_dir) else {
            return false;
        };
        let replaced = self
            .killed
            .iter()
            .all(|(name, old)| fleet.pids.iter().any(|(n, pid)| n == name && pid != old));
        if !replaced {
            return false;
        }
        let Ok(status) = client.status().await else {
            return false;
        };
        let killed_pids: Vec<u32> = self.killed.iter().map(|(_, p)| *p).collect();
        let healthy = status
            .replicas
            .iter()
            .filter(|r| r.healthy && !r.pid.is_some_and(|p| killed_pids.contains(&p)))
            .count();
        if healthy < self.healthy_before {
            return false;
        }
        for (_, url) in &fleet.gateways {
            let probe = ControlClient::new(url, None).with_timeout(Duration::from_secs(1));
            if probe.get_raw("/health").await.is_err() {
                return false;
            }
        }
        true
    }
}

/// Runs a drill against the `shoal up` fleet in `spec.data_dir`.
pub async fn run(spec: DrillSpec) -> anyhow::Result<DrillReport> {
    let fleet = read_fleet(&spec.data_dir)?;
    let token = shoal_client::secret::read(&spec.data_dir.join("admin.token"))
        .context("the fleet's admin token (DATA_DIR/admin.token)")?;
    let client =
        ControlClient::new(&fleet.control, Some(token)).with_timeout(Duration::from_secs(2));
    let status = client
        .status()
        .await
        .context("the control plane does not answer; is the fleet up?")?;
    let healthy_before = status.replicas.iter().filter(|r| r.healthy).count();
    anyhow::ensure!(healthy_before > 0, "no healthy replica to drill against");
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
    let (killed, urls, failover): (Vec<(String, u32)>, Vec<String>, bool) = match &spec.scenario {
        Scenario::ReplicaLoss => {
            let victim = status
                .replicas
                .iter()
                .filter(|r| r.healthy && !r.standby)
                .find_map(|r| r.pid)
                .context("no healthy active replica with a known pid")?;
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
            let victims: Vec<(String, u32)> = status
                .replicas
                .iter()
                .filter(|r| &r.region == region)
                .filter_map(|r| r.pid)
                .filter_map(|pid| Some((name_of_pid(pid)?, pid)))
                .collect();
            anyhow::ensure!(!victims.is_empty(), "no replica in region {region:?}");
            // Clients of the lost region keep using its gateway, which must
            // send them elsewhere.
            let gateway = fleet
                .gateways
                .iter()
                .find(|(r, _)| r == region)
                .map_or(first_gateway, |(_, url)| url.clone());
            (victims, vec![gateway], false)
        }
        Scenario::ControlPlaneLoss => {
            let pid = pid_of("control").context("no control plane in fleet.json")?;
            (
                vec![("control".to_owned(), pid)],
                vec![first_gateway],
                false,
            )
        }
        Scenario::GatewayLoss => {
            anyhow::ensure!(
                fleet.gateways.len() >= 2,
                "gateway-loss needs two gateways (shoal up --regions a,b)"
            );
            let (region, _) = &fleet.gateways[0];
            let name = format!("gateway-{region}");
            let pid = pid_of(&name).context("the gateway's pid is not in fleet.json")?;
            let urls = fleet.gateways.iter().map(|(_, url)| url.clone()).collect();
            (vec![(name, pid)], urls, true)
        }
    };

    let body = crate::digits_request()?;
    let urls = urls
        .into_iter()
        .map(|u| format!("{u}/v2/models/digits/infer"))
        .collect();
    let load_spec = LoadSpec {
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
    let run_id = format!("{:08x}", rand::random::<u32>());
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
    let fault = Instant::now();
    for (_, pid) in &killed {
        sigkill(*pid);
    }
    let whole = Whole {
        killed: &killed,
        healthy_before,
    };
    let mut capacity_back = None;
    let deadline = started + spec.duration + spec.recovery_timeout;
    while Instant::now() < deadline {
        if whole.now(&spec.data_dir, &client).await {
            capacity_back = Some(fault.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let result = traffic.await.context("the load generator stopped")??;
    let (acknowledged, refused) = writer.await.context("the writer stopped")?;

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
    let failures: Vec<f64> = result
        .failure_times
        .iter()
        .filter(|t| **t >= fault)
        .map(|t| (*t - fault).as_secs_f64() * 1000.0)
        .collect();
    let mut report = outcome(
        &spec.scenario,
        killed,
        &result,
        &failures,
        capacity_back.map(|d| d.as_secs_f64() * 1000.0),
        (acknowledged.len() as u64, refused, lost),
    );
    if report.failed > 0 && failures.is_empty() {
        // Failures before the fault: the fleet was not healthy to begin with.
        report.rto_ms = None;
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recovery_ends_with_the_later_of_capacity_and_the_last_failure() {
        assert_eq!(rto_ms(Some(800.0), &[]), Some(800.0));
        assert_eq!(rto_ms(Some(800.0), &[10.0, 1200.0, 30.0]), Some(1200.0));
        assert_eq!(rto_ms(Some(800.0), &[10.0]), Some(800.0));
        assert_eq!(rto_ms(None, &[10.0]), None, "never whole: no RTO");
    }
}

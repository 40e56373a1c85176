//! An emulated cluster on one machine, for benchmarks whose question is
//! "what if every replica had its own machine": each host is a network
//! namespace with its own address, joined to the others by a veth pair on a
//! bridge, with its link rate-limited in both directions (tc token bucket),
//! and its processes confined to a CPU quota (a cgroup). Every host gets the
//! same link and the same CPU, so one replica and eight replicas can be
//! compared on equal terms even though the machine has two cores.
//!
//! Needs root (network namespaces, tc, cgroups) and iproute2. Everything it
//! creates carries the lab's prefix and is removed when the lab is dropped;
//! traffic stays inside the namespaces and the bridge it made.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use anyhow::{Context, bail};

/// What every host gets.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct HostSpec {
    /// Link rate each way, Mbit/s.
    pub link_mbit: u32,
    /// CPU quota in cores (e.g. 0.2).
    pub cpu: f64,
}

/// A set of emulated hosts on one bridge.
#[derive(Debug)]
pub struct Lab {
    prefix: String,
    subnet: u8,
    hosts: usize,
    cgroups: Vec<PathBuf>,
    children: Vec<Child>,
}

fn run(program: &str, args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("run {program} (iproute2 is needed for isolated benchmarks)"))?;
    if !out.status.success() {
        bail!(
            "{program} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// A cgroup with `cpu` cores of quota: cgroup v1's cpu controller when it
/// is mounted, else cgroup v2's `cpu.max`.
/// The CFS period: short, so a host that spends its quota waits
/// milliseconds, not tens of them, to run again. A slow machine, rather
/// than a fast one that stalls for most of every 100 ms.
const CFS_PERIOD_US: u64 = 10_000;

fn make_cgroup(name: &str, cpu: f64) -> anyhow::Result<PathBuf> {
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss
    )]
    let quota = (cpu * CFS_PERIOD_US as f64).round().max(1_000.0) as u64;
    let v1 = Path::new("/sys/fs/cgroup/cpu");
    if v1.join("cpu.cfs_quota_us").is_file() {
        let dir = v1.join(name);
        std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        std::fs::write(dir.join("cpu.cfs_period_us"), CFS_PERIOD_US.to_string())?;
        std::fs::write(dir.join("cpu.cfs_quota_us"), quota.to_string())?;
        return Ok(dir);
    }
    let dir = Path::new("/sys/fs/cgroup").join(name);
    std::fs::create_dir_all(&dir).with_context(|| {
        format!(
            "create {} (cgroups are needed for isolated benchmarks)",
            dir.display()
        )
    })?;
    std::fs::write(dir.join("cpu.max"), format!("{quota} {CFS_PERIOD_US}"))
        .context("set cpu.max (enable the cpu controller in the parent cgroup)")?;
    Ok(dir)
}

impl Lab {
    /// Creates `hosts` hosts named `PREFIX0…`, addressed `10.77.SUBNET.10+i`.
    /// Leftovers of an earlier lab with the same prefix are removed first.
    pub fn create(prefix: &str, subnet: u8, hosts: usize, spec: HostSpec) -> anyhow::Result<Lab> {
        anyhow::ensure!(
            prefix.len() <= 8,
            "lab prefix {prefix:?} too long for interface names"
        );
        anyhow::ensure!(
            nix::unistd::geteuid().is_root(),
            "emulated hosts need root (network namespaces, tc, cgroups): run the benchmark \
             with sudo, or without --isolate"
        );
        let mut lab = Lab {
            prefix: prefix.to_owned(),
            subnet,
            hosts,
            cgroups: Vec::new(),
            children: Vec::new(),
        };
        lab.teardown();
        let bridge = format!("{prefix}br");
        run("ip", &["link", "add", &bridge, "type", "bridge"])?;
        run(
            "ip",
            &[
                "addr",
                "add",
                &format!("10.77.{subnet}.1/24"),
                "dev",
                &bridge,
            ],
        )?;
        run("ip", &["link", "set", &bridge, "up"])?;
        let rate = format!("{}mbit", spec.link_mbit);
        for i in 0..hosts {
            let ns = format!("{prefix}{i}");
            let veth = format!("{prefix}v{i}");
            run("ip", &["netns", "add", &ns])?;
            run(
                "ip",
                &[
                    "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns,
                ],
            )?;
            run("ip", &["link", "set", &veth, "master", &bridge])?;
            run("ip", &["link", "set", &veth, "up"])?;
            let addr = format!("{}/24", lab.ip(i));
            run("ip", &["-n", &ns, "addr", "add", &addr, "dev", "eth0"])?;
            run("ip", &["-n", &ns, "link", "set", "eth0", "up"])?;
            run("ip", &["-n", &ns, "link", "set", "lo", "up"])?;
            // Into the host (its download) on the bridge side, out of it
            // (its upload) inside the namespace.
            let tbf = [
                "root", "tbf", "rate", &rate, "burst", "128kb", "latency", "100ms",
            ];
            let mut args = vec!["qdisc", "add", "dev", &veth];
            args.extend(tbf);
            run("tc", &args)?;
            let mut args = vec!["netns", "exec", &ns, "tc", "qdisc", "add", "dev", "eth0"];
            args.extend(tbf);
            run("ip", &args)?;
            lab.cgroups.push(make_cgroup(&ns, spec.cpu)?);
        }
        Ok(lab)
    }

    /// Address of host `i`.
    pub fn ip(&self, i: usize) -> Ipv4Addr {
        Ipv4Addr::new(10, 77, self.subnet, u8::try_from(10 + i).unwrap_or(255))
    }

    /// Starts `program ARGS` on host `i`, inside its CPU quota, logging to
    /// `log`. The lab kills it when dropped.
    pub fn spawn(
        &mut self,
        i: usize,
        program: &Path,
        args: &[String],
        log: &Path,
    ) -> anyhow::Result<()> {
        anyhow::ensure!(i < self.hosts, "no host {i}");
        let log =
            std::fs::File::create(log).with_context(|| format!("create {}", log.display()))?;
        let ns = format!("{}{i}", self.prefix);
        let child = Command::new("ip")
            .args(["netns", "exec", &ns])
            .arg(program)
            .args(args)
            .env(
                "RUST_LOG",
                std::env::var("SHOAL_BENCH_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("start {} on {ns}", program.display()))?;
        // `ip netns exec` execs the program, so this pid is the program's;
        // moving it moves all its threads.
        std::fs::write(self.cgroups[i].join("cgroup.procs"), child.id().to_string())
            .context("move the process into its host's cgroup")?;
        self.children.push(child);
        Ok(())
    }

    /// The pids of the processes started, in the order they were.
    pub fn pids(&self) -> Vec<u32> {
        self.children.iter().map(Child::id).collect()
    }

    /// How long each host has been held back by its CPU quota so far
    /// (cgroup `cpu.stat`), in milliseconds.
    pub fn throttled_ms(&self) -> Vec<u64> {
        self.cgroups
            .iter()
            .map(|dir| {
                let stat = std::fs::read_to_string(dir.join("cpu.stat")).unwrap_or_default();
                stat.lines()
                    .find_map(|l| {
                        let (key, value) = l.split_once(' ')?;
                        let value: u64 = value.trim().parse().ok()?;
                        match key {
                            "throttled_time" => Some(value / 1_000_000), // v1: ns
                            "throttled_usec" => Some(value / 1_000),     // v2: µs
                            _ => None,
                        }
                    })
                    .unwrap_or(0)
            })
            .collect()
    }

    fn teardown(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.children.clear();
        for i in 0..self.hosts {
            // Deleting a namespace frees its veth pair only later, in the
            // background; deleting the pair first makes the names reusable
            // at once.
            let _ = run("ip", &["link", "del", &format!("{}v{i}", self.prefix)]);
            let _ = run("ip", &["netns", "del", &format!("{}{i}", self.prefix)]);
        }
        let _ = run("ip", &["link", "del", &format!("{}br", self.prefix)]);
        for dir in self.cgroups.drain(..) {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.teardown();
    }
}

/// The whole machine's CPU time so far, from `/proc/stat`, in clock ticks:
/// (total, idle + iowait, steal). The emulated hosts share one machine;
/// how busy it was, and how much of it the hypervisor took for others
/// (steal), says whether they can have had their quotas.
pub fn machine_cpu() -> Option<(u64, u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let fields: Vec<u64> = stat
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    let get = |i: usize| fields.get(i).copied().unwrap_or(0);
    // user nice system idle iowait irq softirq steal (guest time is
    // already counted in user).
    let total = (0..8).map(get).sum();
    Some((total, get(3) + get(4), get(7)))
}

/// How busy the whole machine was over a span, in percent of its CPU time:
/// not idle, and taken by the hypervisor for others (steal).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct MachineLoad {
    /// Share of CPU time not idle.
    pub busy_pct: f64,
    /// Share stolen by the hypervisor.
    pub steal_pct: f64,
}

/// At or above this share busy, the emulated hosts compete for the two
/// cores and cannot all have had their quotas: a round measured so says
/// more about the machine than about Shoal.
pub const SATURATED_BUSY_PCT: f64 = 90.0;
/// At or above this share stolen, the same.
pub const SATURATED_STEAL_PCT: f64 = 10.0;

impl MachineLoad {
    /// True when the hosts cannot all have had their quotas.
    pub fn saturated(&self) -> bool {
        self.busy_pct >= SATURATED_BUSY_PCT || self.steal_pct >= SATURATED_STEAL_PCT
    }
}

/// The machine's CPU counters at one moment, to compare with later.
#[derive(Debug, Clone, Copy)]
pub struct CpuReading(Option<(u64, u64, u64)>);

impl CpuReading {
    /// The counters now.
    pub fn now() -> CpuReading {
        CpuReading(machine_cpu())
    }

    /// How busy the machine was since this reading (`None` without
    /// `/proc/stat` or when no time passed).
    pub fn load_since(&self) -> Option<MachineLoad> {
        match (self.0, machine_cpu()) {
            (Some((t0, i0, s0)), Some((t1, i1, s1))) if t1 > t0 => {
                #[allow(clippy::cast_precision_loss)]
                let pct = |v: u64| 100.0 * v as f64 / (t1 - t0) as f64;
                Some(MachineLoad {
                    busy_pct: 100.0 - pct(i1 - i0),
                    steal_pct: pct(s1 - s0),
                })
            }
            _ => None,
        }
    }
}

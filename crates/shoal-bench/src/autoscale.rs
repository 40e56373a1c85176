//! `shoal bench autoscale`: a compressed day of load — quiet night, a
//! sharp morning ramp, a plateau, a quieter evening, and one unannounced
//! spike on the measured day only — replayed through `shoal up` three
//! ways: fixed at the daily peak (no autoscaling), reactive autoscaling
//! only (`--no-predict`), and reactive + predictive. Each autoscaled run
//! first replays the same day (without the spike) `learn` times, so the
//! predictor has learned it; only the last day is judged.
//!
//! Judged per second of the measured day: a second violates the SLO when
//! its p99 (from each request's intended send time, open loop) is over
//! the SLO or any request failed; cost is replica-seconds (live replicas
//! sampled each second).
//!
//! Capacity is emulated, because replicas on one machine share its cores
//! (adding replicas adds no CPU): every replica admits `slots` requests at
//! once (one inference thread, a queue of `slots - 1`) and each request
//! takes an injected service time (`/admin/faults` latency: a sleep that
//! holds the request's admission but no CPU) — like a replica with a fixed
//! number of accelerator slots. By default 8 slots of 200 ms: 40 requests
//! per second at most, twice the autoscaler's target of 20. Past its slots
//! a replica answers 503 and the gateway retries elsewhere within its
//! budget.
//!
//! Time is compressed for the load and the predictor (a day in minutes,
//! the predictor's slot a sixtieth of it) and for the autoscalers' own
//! clocks, which would otherwise span hours of the compressed day: load is
//! measured over 2 s (`--signal-window`, 10 s by default), the HPA's rate
//! limits count per 2 s (`--rate-limit-period`, 15 s) and a scale-down
//! waits 10 s (`--scale-down-window`, 5 min). Starting a replica process,
//! fetching, loading and warming the model take their real time (about a
//! second), which the compression makes long: that is the lead the
//! predictor is for.
//!
//! [`trace`] and [`judge`] are pure.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;
use shoal_client::ApiClient;
use tokio::io::AsyncBufReadExt;
use tokio::time::Instant;

use crate::load::{self, LoadSpec};

/// How the fleet is scaled in one run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Replicas for the daily peak, all day.
    Fixed,
    /// The HPA algorithm alone.
    Reactive,
    /// The HPA algorithm and the learned daily profile.
    Predictive,
}

impl Mode {
    /// Its name in tables.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Fixed => "fixed at the peak",
            Mode::Reactive => "reactive",
            Mode::Predictive => "reactive + predictive",
        }
    }
}

/// The benchmark's settings.
#[derive(Debug, Clone)]
pub struct AutoscaleBench {
    /// The `shoal` binary.
    pub exe: PathBuf,
    /// Length of one compressed day.
    pub day: Duration,
    /// Days replayed before the measured one (autoscaled modes).
    pub learn: u32,
    /// The daily peak, requests per second.
    pub peak_rps: f64,
    /// Requests per second one replica should carry (the autoscaler's
    /// target; fixed mode runs peak ÷ this).
    pub per_replica_rps: f64,
    /// The emulated service time per request.
    pub latency_ms: u64,
    /// Requests one replica holds at once (emulated capacity: slots ÷
    /// service time per second).
    pub slots: usize,
    /// The p99 to stay under.
    pub slo_ms: f64,
    /// The most replicas the autoscaler may run.
    pub max_replicas: usize,
    /// Modes to run.
    pub modes: Vec<Mode>,
}

/// Load as a share of the peak at `f` (0..1) through the day, with the
/// unannounced spike or without.
pub fn share(f: f64, spike: bool) -> f64 {
    let ramp = |from: f64, to: f64, a: f64, b: f64| a + (b - a) * ((f - from) / (to - from));
    match f {
        f if spike && (0.78..0.81).contains(&f) => 1.2,
        f if f < 0.30 => 0.1,
        f if f < 0.32 => ramp(0.30, 0.32, 0.1, 1.0),
        f if f < 0.70 => 1.0,
        f if f < 0.72 => ramp(0.70, 0.72, 1.0, 0.4),
        f if f < 0.88 => 0.4,
        f if f < 0.90 => ramp(0.88, 0.90, 0.4, 0.1),
        _ => 0.1,
    }
}

/// The request rate second by second over `days` days (the last with the
/// spike when `spike`), as a load schedule.
pub fn trace(day: Duration, days: u32, peak: f64, spike: bool) -> Vec<(Duration, f64)> {
    let per_day = day.as_secs_f64();
    let step = 0.25;
    let total = (per_day * f64::from(days) / step).round() as u64;
    (0..total)
        .map(|i| {
            let t = i as f64 * step;
            let d = (t / per_day).floor() as u32;
            let f = (t % per_day) / per_day;
            let rate = peak * share(f, spike && d + 1 == days);
            (Duration::from_secs_f64(t), rate)
        })
        .collect()
}

/// One second of the measured day.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Second {
    /// Requests due in it.
    pub requests: u64,
    /// Of them, failed.
    pub failed: u64,
    /// Their p99 (ms), successes only.
    pub p99_ms: f64,
}

/// Per-second outcomes of requests due in `[from, to)` after `start`,
/// from the load generator's timeline (end, latency from intended time,
/// success).
pub fn seconds(
    timeline: &[(Instant, Duration, bool)],
    start: Instant,
    from: Duration,
    to: Duration,
) -> Vec<Second> {
    let n = (to - from).as_secs() as usize;
    let mut buckets: Vec<(Vec<f64>, u64)> = vec![(Vec::new(), 0); n];
    for (done, latency, ok) in timeline {
        let Some(intended) = done.checked_sub(*latency) else {
            continue;
        };
        let Some(at) = intended.checked_duration_since(start) else {
            continue;
        };
        if at < from || at >= to {
            continue;
        }
        let i = (at - from).as_secs() as usize;
        if i >= n {
            continue;
        }
        if *ok {
            buckets[i].0.push(latency.as_secs_f64() * 1e3);
        } else {
            buckets[i].1 += 1;
        }
    }
    buckets
        .into_iter()
        .map(|(mut ok, failed)| {
            ok.sort_by(f64::total_cmp);
            let p99 = if ok.is_empty() {
                0.0
            } else {
                ok[((ok.len() as f64 * 0.99).ceil() as usize).clamp(1, ok.len()) - 1]
            };
            Second {
                requests: ok.len() as u64 + failed,
                failed,
                p99_ms: p99,
            }
        })
        .collect()
}

/// Seconds violating the SLO: a p99 over it, or any failure.
pub fn violations(seconds: &[Second], slo_ms: f64) -> usize {
    seconds
        .iter()
        .filter(|s| s.failed > 0 || s.p99_ms > slo_ms)
        .count()
}

/// Replica-seconds over `0..end` from `(seconds, live replicas)` samples
/// in time order: each count holds until the next sample (the first from
/// 0, the last until `end`).
pub fn replica_seconds(samples: &[(f64, usize)], end: f64) -> f64 {
    samples
        .iter()
        .enumerate()
        .map(|(i, (at, n))| {
            let from = if i == 0 { 0.0 } else { *at };
            let until = samples.get(i + 1).map_or(end, |(next, _)| *next);
            (until.min(end) - from).max(0.0) * *n as f64
        })
        .sum()
}

/// One mode's outcome on the measured day.
#[derive(Debug, Clone, Serialize)]
pub struct ModeResult {
    /// The mode.
    pub mode: Mode,
    /// Seconds over the SLO (p99 or failures).
    pub violation_seconds: usize,
    /// Requests due on the measured day.
    pub requests: u64,
    /// Of them, failed.
    pub failed: u64,
    /// Replica-seconds on the measured day.
    pub replica_seconds: f64,
    /// Most replicas at once.
    pub most_replicas: usize,
    /// When the violations were (seconds into the measured day).
    pub violation_at: Vec<usize>,
    /// Sampled about every 250 ms: seconds into the measured day, live
    /// replicas, the desired count.
    pub replicas: Vec<(f64, usize, u32)>,
    /// A few of the failures, as the load generator saw them.
    pub errors: Vec<String>,
}

/// A running `shoal up`, stopped (SIGINT, then SIGKILL) when dropped.
struct Up {
    child: tokio::process::Child,
    gateway: String,
    control: String,
    data: PathBuf,
}

impl Drop for Up {
    fn drop(&mut self) {
        if let Some(pid) = self.child.id() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGINT,
            );
        }
    }
}

async fn start_up(exe: &Path, data: &Path, args: &[String]) -> anyhow::Result<Up> {
    let mut child = tokio::process::Command::new(exe)
        .arg("up")
        .args([
            "--gateway-addr",
            "127.0.0.1:0",
            "--control-addr",
            "127.0.0.1:0",
        ])
        .arg("--data-dir")
        .arg(data)
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let stdout = child.stdout.take().expect("piped");
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let ready = tokio::time::timeout(Duration::from_secs(120), async {
        while let Some(line) = lines.next_line().await? {
            if line.starts_with("shoal up ready:") {
                return Ok::<_, anyhow::Error>(line);
            }
        }
        anyhow::bail!("shoal up exited before it was ready")
    })
    .await??;
    // Keep reading so the child never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let words: Vec<&str> = ready.split_whitespace().collect();
    Ok(Up {
        child,
        gateway: words[4].to_owned(),
        control: words[6].to_owned(),
        data: data.to_owned(),
    })
}

/// Injects the emulated service time into every replica as it appears,
/// and samples the live replica count each second: answers the samples.
async fn tend(
    up_control: String,
    data: PathBuf,
    latency_ms: u64,
    until: Instant,
) -> anyhow::Result<Vec<(Instant, usize, u32)>> {
    let admin = ApiClient::control(
        &up_control,
        Some(shoal_client::secret::read(&data.join("admin.token"))?),
    );
    let fleet = shoal_client::secret::read(&data.join("fleet.token"))?;
    let mut faulted: BTreeSet<String> = BTreeSet::new();
    let mut samples: Vec<(Instant, usize, u32)> = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    while Instant::now() < until {
        tick.tick().await;
        let Ok(status) = admin.status().await else {
            continue;
        };
        for r in &status.replicas {
            if faulted.contains(&r.id) || !r.serving.iter().any(|s| s == "digits:1") {
                continue;
            }
            let client =
                ApiClient::replica(&shoal_api::member_url(&r.address, ""), Some(fleet.clone()));
            let fault = serde_json::json!({ "latency_ms": latency_ms });
            if client
                .put_json_raw("/admin/faults/digits/1", fault.to_string())
                .await
                .is_ok()
            {
                faulted.insert(r.id.clone());
            }
        }
        let desired = admin.fleet_scale().await.map_or(0, |s| s.desired_replicas);
        samples.push((
            Instant::now(),
            status.replicas.iter().filter(|r| r.healthy).count(),
            desired,
        ));
    }
    Ok(samples)
}

impl AutoscaleBench {
    /// The predictor's slot: a sixtieth of the day, in whole milliseconds.
    fn slot(&self) -> Duration {
        Duration::from_millis(
            u64::try_from(self.day.as_millis() / 60)
                .unwrap_or(1000)
                .max(1),
        )
    }

    /// The day, made a whole number of slots.
    fn day(&self) -> Duration {
        self.slot() * 60
    }

    async fn run_mode(&self, mode: Mode, scratch: &Path) -> anyhow::Result<ModeResult> {
        let data = scratch.join(format!("{mode:?}").to_lowercase());
        let _ = std::fs::remove_dir_all(&data);
        let fixed = (self.peak_rps / self.per_replica_rps).ceil() as usize;
        let ms = |d: Duration| format!("{}ms", d.as_millis());
        let (slot, day) = (self.slot(), self.day());
        let mut args: Vec<String> = vec![
            "--replicas".into(),
            if mode == Mode::Fixed { fixed } else { 1 }.to_string(),
            "--scale-down-window".into(),
            "10s".into(),
            "--season-day".into(),
            ms(day),
            "--season-slot".into(),
            ms(slot),
            "--signal-window".into(),
            "2s".into(),
            "--rate-limit-period".into(),
            "2s".into(),
            "--replica-arg=--threads=1".into(),
            format!("--replica-arg=--max-queue={}", self.slots.saturating_sub(1)),
            "--replica-arg=--allow-fault-injection".into(),
        ];
        if mode != Mode::Fixed {
            args.extend([
                "--autoscale".into(),
                "--max-replicas".into(),
                self.max_replicas.to_string(),
            ]);
        }
        if mode == Mode::Reactive {
            args.push("--no-predict".into());
        }
        let up = start_up(&self.exe, &data, &args).await?;
        let admin = ApiClient::control(
            &up.control,
            Some(shoal_client::secret::read(&up.data.join("admin.token"))?),
        );
        if mode != Mode::Fixed {
            admin
                .set_scale(
                    "digits",
                    &shoal_api::scale::ScaleSpec {
                        replicas: None,
                        min: Some(1),
                        max: Some(u32::try_from(self.max_replicas)?),
                        min_on_demand: 0,
                        target: Some(shoal_api::scale::ScaleTarget::Rps(self.per_replica_rps)),
                    },
                )
                .await?;
        }
        let days = if mode == Mode::Fixed {
            1
        } else {
            self.learn + 1
        };
        let duration = day * days;
        let measured_from = day * (days - 1);
        let start = Instant::now() + Duration::from_millis(50);
        let tender = tokio::spawn(tend(
            up.control.clone(),
            up.data.clone(),
            self.latency_ms,
            start + duration + Duration::from_secs(1),
        ));
        let schedule = trace(day, days, self.peak_rps, true);
        eprintln!(
            "autoscale bench: {} for {:.0} s ({days} day(s) of {:.0} s)…",
            mode.as_str(),
            duration.as_secs_f64(),
            day.as_secs_f64()
        );
        let result = load::run(LoadSpec {
            urls: vec![format!("{}/v2/models/digits/infer", up.gateway)],
            body: crate::digits_request()?,
            rate: self.peak_rps * 0.1,
            schedule,
            duration,
            connections: 256,
            timeout: Duration::from_secs(5),
            upstream_header: None,
            kill: None,
            dead_upstream: None,
            failover: false,
        })
        .await?;
        let samples = tender.await??;
        let measured = seconds(&result.timeline, start, measured_from, duration);
        let violation_at: Vec<usize> = measured
            .iter()
            .enumerate()
            .filter(|(_, s)| s.failed > 0 || s.p99_ms > self.slo_ms)
            .map(|(i, _)| i)
            .collect();
        let day_start = start + measured_from;
        let in_day: Vec<(f64, usize, u32)> = samples
            .iter()
            .filter(|(t, _, _)| *t >= day_start && *t < start + duration)
            .map(|(t, n, d)| ((*t - day_start).as_secs_f64(), *n, *d))
            .collect();
        let live: Vec<(f64, usize)> = in_day.iter().map(|(t, n, _)| (*t, *n)).collect();
        drop(up);
        tokio::time::sleep(Duration::from_secs(3)).await;
        Ok(ModeResult {
            mode,
            violation_seconds: violation_at.len(),
            requests: measured.iter().map(|s| s.requests).sum(),
            failed: measured.iter().map(|s| s.failed).sum(),
            replica_seconds: replica_seconds(&live, day.as_secs_f64()),
            most_replicas: live.iter().map(|(_, n)| *n).max().unwrap_or(0),
            violation_at,
            replicas: in_day,
            errors: result.errors.clone(),
        })
    }

    /// Runs every mode in turn.
    pub async fn run(&self, scratch: &Path) -> anyhow::Result<Vec<ModeResult>> {
        let mut results = Vec::new();
        for mode in &self.modes {
            results.push(self.run_mode(*mode, scratch).await?);
        }
        Ok(results)
    }
}

/// The results as a Markdown table, with the ratios the goal is stated in.
pub fn markdown(results: &[ModeResult]) -> String {
    let by: BTreeMap<&str, &ModeResult> = results.iter().map(|r| (r.mode.as_str(), r)).collect();
    let mut out = String::from(
        "| scaling | SLO-violation seconds | failed requests | replica-seconds | most replicas |\n|---|---:|---:|---:|---:|\n",
    );
    for r in results {
        out.push_str(&format!(
            "| {} | {} | {} of {} | {:.0} | {} |\n",
            r.mode.as_str(),
            r.violation_seconds,
            r.failed,
            r.requests,
            r.replica_seconds,
            r.most_replicas
        ));
    }
    if let (Some(re), Some(pr)) = (by.get("reactive"), by.get("reactive + predictive")) {
        let v = if re.violation_seconds == 0 {
            f64::NAN
        } else {
            pr.violation_seconds as f64 / re.violation_seconds as f64
        };
        out.push_str(&format!(
            "\npredictive ÷ reactive: SLO-violation seconds {v:.2}× (goal ≤ 0.5×), replica-seconds {:.2}× (goal ≤ 1.1×)\n",
            pr.replica_seconds / re.replica_seconds.max(1.0)
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_day_has_a_sharp_ramp_and_the_spike_only_when_asked() {
        assert_eq!(share(0.1, true), 0.1);
        assert!((share(0.31, false) - 0.55).abs() < 1e-9);
        assert_eq!(share(0.5, false), 1.0);
        assert_eq!(share(0.79, false), 0.4);
        assert_eq!(share(0.79, true), 1.2);
        let t = trace(Duration::from_secs(100), 2, 200.0, true);
        let rate_at = |secs: f64| {
            t.iter()
                .rev()
                .find(|(at, _)| at.as_secs_f64() <= secs)
                .unwrap()
                .1
        };
        // The spike only on the last day.
        assert_eq!(rate_at(79.0), 80.0);
        assert_eq!(rate_at(179.0), 240.0);
    }

    #[test]
    fn replica_seconds_weigh_each_count_by_how_long_it_held() {
        // 2 replicas for the first 1.5 s, 4 until 2.25 s, then 3 until 4 s.
        let samples = [(0.2, 2), (1.5, 4), (2.25, 3)];
        assert!((replica_seconds(&samples, 4.0) - (3.0 + 3.0 + 5.25)).abs() < 1e-9);
        // Irregular sampling does not change the figure.
        let dense = [(0.0, 2), (0.7, 2), (1.5, 4), (2.0, 4), (2.25, 3), (3.9, 3)];
        assert!((replica_seconds(&dense, 4.0) - 11.25).abs() < 1e-9);
        assert_eq!(replica_seconds(&[], 4.0), 0.0);
    }

    #[test]
    fn seconds_are_judged_by_their_p99_and_failures() {
        let start = Instant::now();
        let at = |s: f64, latency_ms: u64, ok: bool| {
            let latency = Duration::from_millis(latency_ms);
            (start + Duration::from_secs_f64(s) + latency, latency, ok)
        };
        let mut timeline = Vec::new();
        for i in 0..100 {
            timeline.push(at(i as f64 / 100.0, 10, true));
            timeline.push(at(
                1.0 + i as f64 / 100.0,
                if i == 0 { 900 } else { 10 },
                true,
            ));
        }
        timeline.push(at(2.5, 10, false));
        let s = seconds(&timeline, start, Duration::ZERO, Duration::from_secs(3));
        assert_eq!(s.len(), 3);
        assert_eq!((s[0].requests, s[0].p99_ms), (100, 10.0));
        // One slow request in a hundred is the p99's 1 %: still 10 ms.
        assert_eq!(s[1].p99_ms, 10.0);
        assert_eq!((s[2].requests, s[2].failed), (1, 1));
        assert_eq!(violations(&s, 100.0), 1);
    }
}

//! An open-loop load generator: requests are scheduled at a fixed rate and
//! each latency is measured from its intended send time, so a stalled
//! server cannot hide its stall by slowing the client down (the
//! coordinated-omission correction of wrk2 `-R`).
//!
//! Optionally it SIGKILLs a process partway through and reports what the
//! clients saw around it: failures, and how long after the kill responses
//! still named the dead upstream (in a header the proxy sets).
//!
//! Shoal's drills (`shoal drill`) and benchmarks (`shoal bench`) both drive
//! traffic with it; [`stats`] keeps their latencies.

// The pacer thread schedules sends by the real clock on purpose: this is
// a load generator, not code a paused-time test drives.
#![allow(clippy::disallowed_types)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::Serialize;
use tokio::time::Instant;

use crate::stats::{Latencies, Summary};

pub mod stats;

/// What to send.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    /// Target URLs (POST), used in turn.
    pub urls: Vec<String>,
    /// Request body.
    pub body: Bytes,
    /// Requests per second.
    pub rate: f64,
    /// A rate that changes over the run: `(from, rate)` pairs, sorted,
    /// each rate holding until the next (before the first: `rate`).
    pub schedule: Vec<(Duration, f64)>,
    /// How long to send.
    pub duration: Duration,
    /// Concurrent connections.
    pub connections: usize,
    /// Per-request timeout.
    pub timeout: Duration,
    /// Response header naming the upstream(s) that handled a request.
    pub upstream_header: Option<String>,
    /// Kill this pid with SIGKILL at `kill_at`.
    pub kill: Option<(i32, Duration)>,
    /// Substring of the upstream header that identifies the killed upstream.
    pub dead_upstream: Option<String>,
    /// On a failure (no answer, or 502/503/504), send the request once more
    /// to the next URL, as a client holding several gateways does.
    pub failover: bool,
}

/// What happened.
#[derive(Debug, Clone, Serialize)]
pub struct LoadResult {
    /// Requests scheduled.
    pub sent: u64,
    /// 2xx answers.
    pub ok: u64,
    /// Anything else (status or transport error).
    pub failed: u64,
    /// Latency from intended send time, successes only.
    pub latency: Summary,
    /// Achieved throughput of successes, per second.
    pub ok_per_sec: f64,
    /// Answers by upstream header value.
    pub by_upstream: BTreeMap<String, u64>,
    /// Failures seen after the kill.
    pub failed_after_kill: u64,
    /// Last time after the kill that an answer named the dead upstream (ms).
    pub dead_seen_until_ms: Option<f64>,
    /// A few error messages.
    pub errors: Vec<String>,
    /// Every request (the first 500,000): when it ended, its latency from
    /// its intended send time, and whether it succeeded.
    #[serde(skip)]
    pub timeline: Vec<(Instant, Duration, bool)>,
}

struct Shared {
    latencies: Latencies,
    ok: u64,
    failed: u64,
    by_upstream: BTreeMap<String, u64>,
    failed_after_kill: u64,
    dead_seen_until: Option<Duration>,
    errors: Vec<String>,
    timeline: Vec<(Instant, Duration, bool)>,
}

/// Runs the load.
pub async fn run(spec: LoadSpec) -> anyhow::Result<LoadResult> {
    let offsets = send_offsets(spec.rate, &spec.schedule, spec.duration);
    let total = offsets.len() as u64;
    anyhow::ensure!(!spec.urls.is_empty(), "give at least one URL");
    // Many workers take from one queue of send times.
    let (tx, rx) = flume::bounded::<(u64, Instant)>(total as usize + 1);
    let shared = Arc::new(tokio::sync::Mutex::new(Shared {
        latencies: Latencies::default(),
        ok: 0,
        failed: 0,
        by_upstream: BTreeMap::new(),
        failed_after_kill: 0,
        dead_seen_until: None,
        errors: Vec::new(),
        timeline: Vec::new(),
    }));
    let start = Instant::now() + Duration::from_millis(50);
    let kill_at = spec.kill.map(|(_, at)| start + at);
    let spec = Arc::new(spec);
    let mut workers = Vec::new();
    for _ in 0..spec.connections.max(1) {
        let (rx, shared, spec) = (rx.clone(), shared.clone(), spec.clone());
        workers.push(tokio::spawn(async move {
            let mut connector = HttpConnector::new();
            connector.set_nodelay(true);
            // https with the process's TLS (`--ca`) as well as http.
            let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new())
                .pool_max_idle_per_host(1)
                .build(shoal_client::tls::connector(connector));
            while let Ok((i, intended)) = rx.recv_async().await {
                let send = |url: &str| {
                    let request = http::Request::post(url)
                        .header("content-type", "application/json")
                        .body(Full::new(spec.body.clone()));
                    let client = &client;
                    let spec = &spec;
                    async move {
                        let request = request.map_err(|e| e.to_string())?;
                        let response = client
                            .request(request)
                            .await
                            .map_err(|e| format!("{e:?}"))?;
                        let status = response.status();
                        let upstream = spec
                            .upstream_header
                            .as_ref()
                            .and_then(|h| response.headers().get(h.as_str()))
                            .and_then(|v| v.to_str().ok())
                            .map(str::to_owned);
                        let _ = response
                            .into_body()
                            .collect()
                            .await
                            .map_err(|e| e.to_string())?;
                        Ok::<_, String>((status, upstream))
                    }
                };
                let urls = &spec.urls;
                let outcome = tokio::time::timeout(spec.timeout, async {
                    let first = send(&urls[i as usize % urls.len()]).await;
                    let failed_over = match &first {
                        Err(_) => true,
                        Ok((status, _)) => matches!(status.as_u16(), 502..=504),
                    };
                    if spec.failover && failed_over && urls.len() > 1 {
                        return send(&urls[(i as usize + 1) % urls.len()]).await;
                    }
                    first
                })
                .await;
                let done = Instant::now();
                let mut s = shared.lock().await;
                let after_kill = kill_at.is_some_and(|k| intended >= k);
                if s.timeline.len() < 500_000 {
                    let ok = matches!(&outcome, Ok(Ok((status, _))) if status.is_success());
                    s.timeline.push((done, done - intended, ok));
                }
                match outcome {
                    Ok(Ok((status, upstream))) if status.is_success() => {
                        s.ok += 1;
                        s.latencies.record(done - intended);
                        if let Some(u) = upstream {
                            if let (Some(k), Some(dead)) = (kill_at, &spec.dead_upstream)
                                && done >= k
                                && u.contains(dead.as_str())
                            {
                                s.dead_seen_until = Some(done - k);
                            }
                            *s.by_upstream.entry(u).or_default() += 1;
                        }
                    }
                    other => {
                        s.failed += 1;
                        if after_kill {
                            s.failed_after_kill += 1;
                        }
                        if let Some(k) = kill_at
                            && done >= k
                            && spec.dead_upstream.is_some()
                        {
                            s.dead_seen_until = Some(done - k);
                        }
                        if s.errors.len() < 5 {
                            let e = match other {
                                Ok(Ok((status, _))) => format!("status {status}"),
                                Ok(Err(e)) => e,
                                Err(_) => "timeout".into(),
                            };
                            s.errors.push(e);
                        }
                    }
                }
            }
        }));
    }
    drop(rx);
    let killer = spec.kill.map(|(pid, at)| {
        tokio::spawn(async move {
            tokio::time::sleep_until(start + at).await;
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        })
    });
    // The pacer is a plain thread: its sleeps are precise to microseconds,
    // where tokio's timer ticks in milliseconds. It hands each request to
    // the workers at its intended time; if every worker is busy the request
    // waits in the queue, and that wait counts in its latency.
    let std_start = start.into_std();
    let pacer = std::thread::spawn(move || {
        for (i, offset) in offsets.into_iter().enumerate() {
            let i = i as u64;
            let intended = std_start + offset;
            let now = std::time::Instant::now();
            if intended > now {
                std::thread::sleep(intended - now);
            }
            if tx.send((i, Instant::from_std(intended))).is_err() {
                break;
            }
        }
    });
    let _ = tokio::task::spawn_blocking(move || pacer.join()).await;
    for w in workers {
        let _ = w.await;
    }
    if let Some(k) = killer {
        let _ = k.await;
    }
    let mut s = shared.lock().await;
    Ok(LoadResult {
        sent: total,
        ok: s.ok,
        failed: s.failed,
        latency: s.latencies.summary(),
        ok_per_sec: s.ok as f64 / spec.duration.as_secs_f64(),
        by_upstream: s.by_upstream.clone(),
        failed_after_kill: s.failed_after_kill,
        dead_seen_until_ms: s.dead_seen_until.map(|d| d.as_secs_f64() * 1e3),
        errors: s.errors.clone(),
        timeline: std::mem::take(&mut s.timeline),
    })
}

/// When each request is due, from the start: evenly spaced at each
/// moment's rate.
fn send_offsets(rate: f64, schedule: &[(Duration, f64)], duration: Duration) -> Vec<Duration> {
    // Each segment starts its own clock, so a change of rate lands exactly
    // where the schedule says rather than one old-rate gap late.
    let end = duration.as_secs_f64();
    let mut bounds = vec![(0.0, rate)];
    bounds.extend(schedule.iter().map(|(from, r)| (from.as_secs_f64(), *r)));
    let mut offsets = Vec::new();
    for (i, &(from, r)) in bounds.iter().enumerate() {
        let until = bounds.get(i + 1).map_or(end, |(next, _)| *next).min(end);
        if r <= 0.0 || until <= from {
            continue;
        }
        let count = ((until - from) * r).round() as u64;
        offsets.extend((0..count).map(|k| Duration::from_secs_f64(from + k as f64 / r)));
    }
    offsets
}

/// One digits sample as an OIP request body (compiled in: works from any
/// directory).
pub fn digits_request() -> anyhow::Result<bytes::Bytes> {
    #[derive(serde::Deserialize)]
    struct Samples {
        inputs: Vec<Vec<f32>>,
    }
    let samples: Samples =
        serde_json::from_str(include_str!("../../../models/digits-samples.json"))?;
    let row = samples.inputs.into_iter().next().unwrap_or_default();
    let input = shoal_core::Tensor::new("input", vec![1, 64], shoal_core::TensorData::Fp32(row))?;
    Ok(bytes::Bytes::from(shoal_oip::encode_request(
        &shoal_oip::DecodedRequest {
            id: None,
            parameters: None,
            inputs: vec![input],
            outputs: None,
        },
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_schedule_changes_the_rate_where_it_says() {
        let s = |secs: u64, rate: f64| (Duration::from_secs(secs), rate);
        let offsets = send_offsets(
            10.0,
            &[s(1, 100.0), s(2, 0.0), s(3, 10.0)],
            Duration::from_secs(4),
        );
        let in_second = |k: u64| offsets.iter().filter(|o| o.as_secs() == k).count();
        assert_eq!(
            [in_second(0), in_second(1), in_second(2), in_second(3)],
            [10, 100, 0, 10]
        );
        assert_eq!(send_offsets(5.0, &[], Duration::from_secs(2)).len(), 10);
    }
}

//! Placement and autoscaling with real processes: `shoal scale` places a
//! model on N replicas and the gateway routes only there; a placed replica
//! that dies gives its place to another; losing every spot replica costs
//! no request; `shoal up --autoscale` starts and stops replicas under a
//! load that steps up and back down, with no failed request.

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::Value;
use shoal_testkit::{ChildGuard, HttpClient, Samples, TempDir, eventually};

mod common;
use common::{Traffic, cli, cli_fails, status};

/// The ids `digits` is placed on (empty: not placed).
fn placement(status: &Value) -> BTreeSet<String> {
    status["placements"]["digits"]
        .as_array()
        .map(|ids| ids.iter().map(|v| v.as_str().unwrap().to_owned()).collect())
        .unwrap_or_default()
}

/// Replica ids serving `digits`, healthy.
fn serving_digits(status: &Value) -> BTreeSet<String> {
    status["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["healthy"] == true && r["serving"] == serde_json::json!(["digits:1"]))
        .map(|r| r["id"].as_str().unwrap().to_owned())
        .collect()
}

fn field<'a>(status: &'a Value, id: &str, key: &str) -> &'a Value {
    &status["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["id"] == id)
        .unwrap()[key]
}

/// Waits until `digits` is placed on `n` replicas that are exactly the
/// ones serving it; returns the placement.
async fn placed_on(control: &str, n: usize, not: &BTreeSet<String>) -> BTreeSet<String> {
    let c = control.to_owned();
    let not = not.clone();
    eventually(
        &format!("digits placed on {n} replicas, exactly those serving it"),
        Duration::from_secs(30),
        || {
            let (c, not) = (c.clone(), not.clone());
            async move {
                let s = status(&c).await;
                let placed = placement(&s);
                (placed.len() == n && serving_digits(&s) == placed && placed.is_disjoint(&not))
                    .then_some(placed)
            }
        },
    )
    .await
}

/// Waits until `n` answers in a row through the gateway come from `only`.
async fn routed_only_to(gateway: &str, only: &BTreeSet<String>, n: usize) {
    let http = HttpClient::new();
    let url = format!("{gateway}/v2/models/digits/infer");
    let only = only.clone();
    eventually(
        &format!("{n} answers in a row from {only:?}"),
        Duration::from_secs(30),
        || {
            let (http, url, only) = (http.clone(), url.clone(), only.clone());
            async move {
                for _ in 0..n {
                    let r = http.post_json(&url, Samples::load().request(0..1)).await;
                    if r.status != 200 || !only.contains(r.header("x-shoal-replica")?) {
                        return None;
                    }
                }
                Some(())
            }
        },
    )
    .await;
}

struct Fleet {
    _tmp: TempDir,
    _control: ChildGuard,
    control: String,
    replicas: Vec<(ChildGuard, String)>,
    _gateway: ChildGuard,
    gateway: String,
}

/// A control plane, one replica per `(region, tier)` and a gateway, with
/// `digits:1` deployed everywhere.
async fn fleet(replicas: &[(&str, &str)]) -> Fleet {
    let tmp = TempDir::new("capacity-e2e");
    let (control_child, control) = common::control(&tmp.join("control"), "127.0.0.1:0", &[], &[]);
    let replicas: Vec<(ChildGuard, String)> = replicas
        .iter()
        .enumerate()
        .map(|(i, (region, tier))| {
            common::replica(
                &control,
                &tmp.join(&format!("r{i}")),
                &["--region", region, "--tier", tier, "--threads", "1"],
            )
        })
        .collect();
    let (gateway_child, gateway) = common::gateway(&tmp.join("gateway"), &["--control", &control]);
    common::push_and_deploy_digits(&control);
    let c = control.clone();
    let n = replicas.len();
    eventually("digits:1 everywhere", Duration::from_secs(30), || {
        let c = c.clone();
        async move { (serving_digits(&status(&c).await).len() == n).then_some(()) }
    })
    .await;
    Fleet {
        _tmp: tmp,
        _control: control_child,
        control,
        replicas,
        _gateway: gateway_child,
        gateway,
    }
}

impl Fleet {
    /// Kills (SIGKILL) the replica with id `id`.
    fn kill(&mut self, id: &str, status: &Value) {
        let address = field(status, id, "address").as_str().unwrap().to_owned();
        let i = self
            .replicas
            .iter()
            .position(|(_, url)| url.ends_with(&address))
            .unwrap();
        let (child, _) = self.replicas.remove(i);
        child.signal(nix::sys::signal::Signal::SIGKILL);
        drop(child);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scale_places_digits_on_two_replicas_and_moves_it_off_a_dead_one() {
    let mut f = fleet(&[
        ("us", "on-demand"),
        ("eu", "on-demand"),
        ("us", "on-demand"),
        ("eu", "on-demand"),
    ])
    .await;
    let traffic = Traffic::start(&f.gateway, 2);

    // Refused with a reason, changing nothing.
    let err = cli_fails(&f.control, &["scale", "digits", "--replicas", "0"]);
    assert!(err.contains("at least 1"), "{err}");
    let err = cli_fails(&f.control, &["scale", "nothing-here", "--replicas", "2"]);
    assert!(err.contains("deploy a version first"), "{err}");
    let http = HttpClient::new();
    let url = format!("{}/api/v1/deployments/digits/scale", f.control);
    let r = http
        .put_json(&url, r#"{"replicas": 2, "min": 1, "max": 3}"#)
        .await;
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().contains("not both"), "{}", r.text());
    let r = http.put_json(&url, r#"{"replicas": "two"}"#).await;
    assert_eq!(r.status, 400, "{}", r.text());
    // A viewer may read the scale, not change it.
    let viewer = cli(
        &f.control,
        &["token", "create", "--name", "watcher", "--role", "viewer"],
    )["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let bearer = format!("Bearer {viewer}");
    let r = http
        .send_as(
            http::Method::PUT,
            &url,
            &[
                ("authorization", &bearer),
                ("content-type", "application/json"),
            ],
            r#"{"replicas": 2}"#,
        )
        .await
        .unwrap();
    assert_eq!(r.status, 403, "{}", r.text());
    let r = http
        .send_as(http::Method::GET, &url, &[("authorization", &bearer)], "")
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(placement(&status(&f.control).await).is_empty());

    cli(&f.control, &["scale", "digits", "--replicas", "2"]);
    let none = BTreeSet::new();
    let placed = placed_on(&f.control, 2, &none).await;
    let s = status(&f.control).await;
    let regions: BTreeSet<&str> = placed
        .iter()
        .map(|id| field(&s, id, "region").as_str().unwrap())
        .collect();
    assert_eq!(regions.len(), 2, "one copy per region: {placed:?}");
    routed_only_to(&f.gateway, &placed, 40).await;
    // The deployment and `scale status` say so.
    let deployment: Value = serde_json::from_slice(
        &http
            .get(&format!("{}/api/v1/deployments/digits", f.control))
            .await
            .body,
    )
    .unwrap();
    assert_eq!(deployment["scale"]["replicas"], 2, "{deployment}");
    assert_eq!(deployment["placement"].as_array().unwrap().len(), 2);
    let scale = cli(&f.control, &["scale", "status", "digits"]);
    assert_eq!(scale["desired"], 2);
    assert_eq!(scale["current"], 2);
    let placed_json: BTreeSet<String> = scale["placement"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_owned())
        .collect();
    assert_eq!(placed_json, placed);

    // A placed replica dies: another takes its place, in its region.
    let victim = placed.iter().next().unwrap().clone();
    let victim_region = field(&s, &victim, "region").as_str().unwrap().to_owned();
    f.kill(&victim, &s);
    let gone = BTreeSet::from([victim.clone()]);
    let moved = placed_on(&f.control, 2, &gone).await;
    let s = status(&f.control).await;
    let newcomer = moved.difference(&placed).next().unwrap();
    assert_eq!(
        field(&s, newcomer, "region").as_str().unwrap(),
        victim_region
    );
    routed_only_to(&f.gateway, &moved, 40).await;

    // Every eligible replica again.
    cli(&f.control, &["scale", "digits", "--everywhere"]);
    let c = f.control.clone();
    eventually(
        "digits on the 3 live replicas",
        Duration::from_secs(30),
        || {
            let c = c.clone();
            async move {
                let s = status(&c).await;
                (placement(&s).is_empty() && serving_digits(&s).len() == 3).then_some(())
            }
        },
    )
    .await;

    let (_, failures) = traffic.finish().await;
    assert!(failures.is_empty(), "failed requests: {failures:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_every_spot_replica_costs_no_request() {
    let mut f = fleet(&[
        ("local", "on-demand"),
        ("local", "spot"),
        ("local", "spot"),
        ("local", "on-demand"),
    ])
    .await;
    cli(
        &f.control,
        &["scale", "digits", "--replicas", "3", "--min-on-demand", "1"],
    );
    let placed = placed_on(&f.control, 3, &BTreeSet::new()).await;
    let s = status(&f.control).await;
    let tier = |id: &String| field(&s, id, "tier").as_str().unwrap().to_owned();
    assert!(
        placed.iter().any(|id| tier(id) == "on-demand"),
        "no on-demand copy in {placed:?}"
    );
    let traffic = Traffic::start(&f.gateway, 4);
    // Both spot replicas vanish at once.
    let spot: Vec<String> = s["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["tier"] == "spot")
        .map(|r| r["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(spot.len(), 2);
    for id in &spot {
        f.kill(id, &s);
    }
    let gone: BTreeSet<String> = spot.into_iter().collect();
    let moved = placed_on(&f.control, 2, &gone).await;
    routed_only_to(&f.gateway, &moved, 40).await;
    let (_, failures) = traffic.finish().await;
    assert!(failures.is_empty(), "failed requests: {failures:?}");
}

/// `shoal bench load` through `gateway` at `rate` for `seconds`: its JSON.
async fn load(gateway: &str, rate: u32, seconds: u32) -> Value {
    let args = [
        "bench".to_owned(),
        "load".to_owned(),
        "--url".to_owned(),
        format!("{gateway}/v2/models/digits/infer"),
        "--rate".to_owned(),
        rate.to_string(),
        "--duration".to_owned(),
        seconds.to_string(),
        "--connections".to_owned(),
        "16".to_owned(),
        "--json".to_owned(),
    ];
    tokio::task::spawn_blocking(move || {
        shoal_testkit::output_json(std::process::Command::new(common::shoal()).args(&args))
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shoal_up_autoscale_follows_a_load_step_out_and_back_in() {
    let tmp = TempDir::new("autoscale-e2e");
    let data = tmp.join("fleet");
    let (_up, gateway, control) = common::shoal_up(
        &data,
        &[
            "--replicas",
            "2",
            "--autoscale",
            "--max-replicas",
            "6",
            "--scale-down-window",
            "3s",
        ],
    );
    // 20 requests per second per replica, between 1 and 6 replicas.
    cli(
        &control,
        &[
            "scale", "digits", "--min", "1", "--max", "6", "--target", "20",
        ],
    );
    // Watches the fleet the whole time: never below the minimum.
    let watching = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let watcher = {
        let (control, watching) = (control.clone(), watching.clone());
        tokio::spawn(async move {
            let (mut most, mut fewest_placed) = (0usize, usize::MAX);
            while watching.load(std::sync::atomic::Ordering::Relaxed) {
                let s = status(&control).await;
                let live = s["replicas"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .filter(|r| r["healthy"] == true)
                    .count();
                most = most.max(live);
                let placed = placement(&s).len();
                if placed > 0 {
                    fewest_placed = fewest_placed.min(placed);
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            (most, fewest_placed)
        })
    };
    // Step up: 100 requests per second wants 5 replicas.
    let up = load(&gateway, 100, 20).await;
    assert_eq!(up["failed"], 0, "{up}");
    let scale = cli(&control, &["scale", "status", "digits"]);
    assert!(scale["desired"].as_u64().unwrap() >= 4, "{scale}");
    // Step down: light load; the fleet goes back to the two it started
    // with, digits on one of them.
    let c = control.clone();
    let g = gateway.clone();
    let light = tokio::spawn(async move { load(&g, 5, 25).await });
    eventually(
        "back to 2 replicas, digits on 1",
        Duration::from_secs(40),
        || {
            let c = c.clone();
            async move {
                let s = status(&c).await;
                (s["replicas"].as_array().unwrap().len() == 2 && placement(&s).len() == 1)
                    .then_some(())
            }
        },
    )
    .await;
    let light = light.await.unwrap();
    assert_eq!(light["failed"], 0, "{light}");
    watching.store(false, std::sync::atomic::Ordering::Relaxed);
    let (most, fewest_placed) = watcher.await.unwrap();
    assert!(most >= 4, "scaled out to only {most} replicas");
    assert!(
        fewest_placed >= 1,
        "digits placed on {fewest_placed} replicas"
    );
    let _ = control;
}

//! A highly available control plane with real processes: three
//! `shoal control` members on one PostgreSQL registry (started by the test)
//! and one artifact store, three replicas and a gateway given all three
//! URLs. The leader is killed with SIGKILL in the middle of a canary taking
//! live traffic: another member takes the lease in the next term and
//! finishes the same rollout from its persisted state, judging no step
//! twice and skipping none; no client request fails; everything
//! acknowledged before the kill is still there; every member agrees on who
//! leads, including the killed one once it is back.

use std::time::Duration;

use nix::sys::signal::Signal;
use serde_json::Value;
use shoal_testkit::{
    ChildGuard, HttpClient, PostgresServer, TempDir, eventually, metric_sum, model_path,
};

mod common;
use common::{Traffic, cli};

/// A member: its id, its process (None once killed) and its URL.
struct Member {
    id: &'static str,
    child: Option<ChildGuard>,
    url: String,
}

/// `GET /api/v1/leader` on `url`.
async fn leader_of(http: &HttpClient, url: &str) -> Value {
    http.get(&format!("{url}/api/v1/leader")).await.json()
}

/// Waits until every member in `urls` names the same live leader, other
/// than `not`, seen with `members` members; returns (leader, term).
async fn agreed_leader(urls: &[String], members: usize, not: Option<&str>) -> (String, u64) {
    let http = HttpClient::new();
    eventually(
        "every member to name the same leader",
        Duration::from_secs(30),
        || {
            let (http, urls) = (http.clone(), urls.to_vec());
            async move {
                let mut seen = Vec::new();
                for url in &urls {
                    let l = leader_of(&http, url).await;
                    let leader = l["leader"].as_str()?.to_owned();
                    if l["members"].as_array()?.len() != members {
                        return None;
                    }
                    seen.push((leader, l["term"].as_u64()?));
                }
                let first = seen.first()?.clone();
                (seen.iter().all(|s| *s == first) && Some(first.0.as_str()) != not).then_some(first)
            }
        },
    )
    .await
}

/// The canary steps the audit log says were judged, in order: each
/// "step K (P%) passed" names one.
fn judged_steps(audit: &Value) -> Vec<u64> {
    audit
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| {
            e["target"] == "digits"
                && e["action"]
                    .as_str()
                    .is_some_and(|a| a.starts_with("deploy."))
        })
        .filter_map(|e| {
            let detail = e["detail"].as_str()?;
            let at = detail.find(" passed")?;
            let before = &detail[..at];
            let open = before.rfind("step ")?;
            before[open + 5..].split(' ').next()?.parse().ok()
        })
        .collect()
}

/// The canary the tests roll out: judged at 20 % and 50 %, two seconds
/// each, with enough slack on p99 for a shared two-core machine.
const CANARY: [&str; 10] = [
    "--strategy",
    "canary",
    "--steps",
    "20,50,100",
    "--bake",
    "2s",
    "--min-requests",
    "50",
    "--min-p99-increase",
    "25ms",
];

/// Members `a`, `b` and `c` of one control plane: a PostgreSQL the test
/// started, one artifact store, each member's data under the test's
/// directory, plus `extra` flags for every member.
struct Plane {
    _pg: PostgresServer,
    dir: std::path::PathBuf,
    args: Vec<String>,
    /// The admin token `a` made; the registry holds it for all.
    admin: String,
}

impl Plane {
    /// Starts the three members; their admin token is remembered for each
    /// URL and for the list of all three.
    fn start(tmp: &TempDir, extra: &[&str]) -> (Plane, Vec<Member>) {
        let pg = PostgresServer::start();
        let dir = tmp.join("plane");
        std::fs::create_dir_all(dir.join("artifacts")).unwrap();
        let mut args = vec![
            "--registry".to_owned(),
            pg.database("registry"),
            "--artifact-store".to_owned(),
            format!("file://{}", dir.join("artifacts").display()),
        ];
        args.extend(extra.iter().map(|a| (*a).to_owned()));
        let mut plane = Plane {
            _pg: pg,
            dir,
            args,
            admin: String::new(),
        };
        let members: Vec<Member> = ["a", "b", "c"]
            .into_iter()
            .map(|id| {
                let (child, url) = plane.member(id, "127.0.0.1:0");
                Member {
                    id,
                    child: Some(child),
                    url,
                }
            })
            .collect();
        plane.admin = std::fs::read_to_string(plane.dir.join("a").join("admin.token"))
            .unwrap()
            .trim()
            .to_owned();
        let urls: Vec<String> = members.iter().map(|m| m.url.clone()).collect();
        for url in urls.iter().chain([&urls.join(",")]) {
            shoal_testkit::tokens::remember_admin_token(url, &plane.admin);
        }
        (plane, members)
    }

    /// Member `id` on `addr` (again, after it was killed: same data).
    fn member(&self, id: &str, addr: &str) -> (ChildGuard, String) {
        let mut args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        args.extend(["--id", id]);
        common::control(&self.dir.join(id), addr, &args, &[])
    }
}

/// The members' URLs.
fn urls_of(members: &[Member]) -> Vec<String> {
    members.iter().map(|m| m.url.clone()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_dies_mid_canary_and_another_member_finishes_it() {
    let tmp = TempDir::new("ha-e2e");
    let (plane, mut members) = Plane::start(&tmp, &[]);
    let urls = urls_of(&members);
    let all = urls.join(",");
    let (first_leader, first_term) = agreed_leader(&urls, 3, None).await;
    assert!(first_term >= 1);

    let _replicas: Vec<(ChildGuard, String)> = (0..3)
        .map(|i| common::replica(&all, &tmp.join(&format!("r{i}")), &["--poll-interval", "1"]))
        .collect();
    let (_gateway, gateway) = common::gateway(&tmp.join("gw"), &["--control", &all]);

    let v1 = model_path("digits-v1.onnx");
    let v2 = model_path("digits-v2.onnx");
    cli(&all, &["model", "push", "digits", v1.to_str().unwrap()]);
    cli(&all, &["deploy", "digits:1"]);
    common::digits_rollout_until(&all, "the first deploy", |r| r["state"] == "promoted").await;
    shoal_testkit::until_routed(&gateway, "digits").await;
    // Writes acknowledged before the kill, through different members.
    let b = &members[1].url;
    cli(b, &["model", "push", "digits", v2.to_str().unwrap()]);
    let token = cli(
        &members[2].url,
        &[
            "token",
            "create",
            "--name",
            "dashboards",
            "--role",
            "viewer",
        ],
    );
    assert!(token["token"].is_string(), "{token}");

    let traffic = Traffic::start(&gateway, 3);
    cli(
        &members[2].url,
        &[&["deploy", "digits:2"][..], &CANARY].concat(),
    );
    let before = common::digits_rollout_until(&all, "the canary's second step", |r| {
        r["step"].as_u64() >= Some(2)
    })
    .await;
    let step = before["step"].as_u64().unwrap();

    // SIGKILL the leader mid-canary.
    let dead = members
        .iter_mut()
        .find(|m| m.id == first_leader)
        .expect("the leader is a member");
    let dead_id = dead.id;
    let dead_url = dead.url.clone();
    let child = dead.child.take().unwrap();
    child.signal(Signal::SIGKILL);
    drop(child);
    let survivors: Vec<String> = urls.iter().filter(|u| **u != dead_url).cloned().collect();
    let (leader, term) = agreed_leader(&survivors, 3, Some(dead_id)).await;
    assert!(term > first_term, "a new term: {term} after {first_term}");
    assert_ne!(leader, dead_id);
    let survivors_url = survivors.join(",");
    shoal_testkit::tokens::remember_admin_token(&survivors_url, &plane.admin);
    let now = cli(&survivors_url, &["rollout", "status", "digits"]);
    assert!(
        now["step"].as_u64() >= Some(step),
        "the canary started over: {now}"
    );
    let done = common::digits_rollout_until(&survivors_url, "the canary to finish", |r| {
        assert_ne!(r["state"], "rolled_back", "{r}");
        r["state"] == "promoted"
    })
    .await;
    assert!(
        done["reason"].as_str().unwrap().starts_with("promoted"),
        "{done}"
    );
    let (versions, failures) = traffic.finish().await;
    assert!(
        failures.is_empty(),
        "{} failed requests: {:?}",
        failures.len(),
        failures.first()
    );
    assert!(versions.iter().any(|v| v == "2"));

    // Every step judged once, none skipped, whoever judged it.
    let http = HttpClient::new();
    let audit = http
        .get(&format!("{}/api/v1/audit?limit=1000", survivors[0]))
        .await
        .json();
    let steps = judged_steps(&audit);
    assert_eq!(steps, [1, 2], "{audit}");
    // What was acknowledged before the kill is all there.
    let shown = cli(&survivors_url, &["model", "show", "digits"]);
    assert_eq!(shown["model"]["production"], "2", "{shown}");
    let tokens = cli(&survivors_url, &["token", "list"]);
    assert!(
        tokens
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["name"] == "dashboards"),
        "{tokens}"
    );

    // The killed member comes back as a follower; all three agree.
    let (child, url) = plane.member(dead_id, dead_url.trim_start_matches("http://"));
    assert_eq!(url, dead_url);
    let back = members.iter_mut().find(|m| m.id == dead_id).unwrap();
    back.child = Some(child);
    let (again, same_term) = agreed_leader(&urls, 3, Some(dead_id)).await;
    assert_eq!((again.as_str(), same_term), (leader.as_str(), term));
    let status = cli(&all, &["status"]);
    assert_eq!(status["control"]["leader"], leader.as_str(), "{status}");
    assert_eq!(status["control"]["members"].as_array().unwrap().len(), 3);
}

/// What one client saw acknowledged.
#[derive(Debug, Default)]
struct Acknowledged {
    /// (model, version, sha256) of every push that returned success.
    pushes: Vec<(String, String, String)>,
    /// (model, version) of every deploy that returned success.
    deploys: Vec<(String, String)>,
    /// Answers that were neither success nor an expected refusal.
    unexpected: Vec<String>,
}

/// One client: `ops` random operations on `models`, through members in
/// the order of `urls`.
async fn client(urls: String, token: String, sha: String, seed: u64, ops: usize) -> Acknowledged {
    use rand::{Rng, SeedableRng};
    use shoal_api::deploy::{DeployRequest, Strategy};
    use shoal_client::ClientError;
    let client =
        shoal_client::ApiClient::control(&urls, Some(token)).with_timeout(Duration::from_secs(10));
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut seen = Acknowledged::default();
    let mut latest: std::collections::BTreeMap<String, String> = Default::default();
    for _ in 0..ops {
        let model = format!("m{}", rng.random_range(0..3));
        let outcome: Result<(), ClientError> = match rng.random_range(0..10) {
            0..=2 => {
                let new = shoal_api::registry::NewVersion {
                    sha256: sha.clone(),
                    ..Default::default()
                };
                client.create_version(&model, &new).await.map(|v| {
                    latest.insert(model.clone(), v.version.clone());
                    seen.pushes.push((model.clone(), v.version, v.sha256));
                })
            }
            3..=5 => match latest.get(&model).cloned() {
                None => Ok(()),
                Some(version) => {
                    // Canaries with no replicas never finish by themselves:
                    // they stay active until aborted or rolled back.
                    let strategy = if rng.random_bool(0.5) {
                        Strategy::Canary
                    } else {
                        Strategy::Rolling
                    };
                    let request = DeployRequest {
                        version: version.clone(),
                        strategy,
                        ..Default::default()
                    };
                    client
                        .deploy(&model, &request)
                        .await
                        .map(|_| seen.deploys.push((model.clone(), version)))
                }
            },
            6..=7 => client.abort(&model).await.map(|_| ()),
            _ => client
                .rollback(&model, Some("history test"))
                .await
                .map(|_| ()),
        };
        match outcome {
            Ok(()) => {}
            // Refusals (a rollout in progress, none to abort, nothing to
            // roll back to, not deployed) and members being killed.
            Err(ClientError::Status { status, .. }) if status.as_u16() == 409 => {}
            Err(ClientError::Status { status, .. }) if status.as_u16() == 404 => {}
            Err(ClientError::Unreachable { .. }) => {}
            Err(e) => seen.unexpected.push(e.to_string()),
        }
    }
    seen
}

/// Follows replica `id`'s watch stream on one member, reconnecting after
/// the member dies, until `stop`; every revision seen, in order.
async fn watcher(
    url: String,
    token: String,
    id: String,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    last: tokio::sync::watch::Sender<Option<shoal_api::fleet::DesiredState>>,
) -> Vec<u64> {
    use futures::StreamExt;
    let client = shoal_client::ApiClient::control(&url, Some(token));
    let mut seen: Vec<u64> = Vec::new();
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let after = seen.last().copied().unwrap_or(0);
        if let Ok(stream) = client.watch(&id, after).await {
            let mut stream = std::pin::pin!(stream);
            loop {
                let next = tokio::time::timeout(Duration::from_millis(500), stream.next()).await;
                match next {
                    Ok(Some(Ok(state))) => {
                        seen.push(state.revision);
                        last.send_replace(Some(state));
                    }
                    Ok(Some(Err(_)) | None) => break,
                    Err(_) if stop.load(std::sync::atomic::Ordering::Relaxed) => break,
                    Err(_) => {}
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    seen
}

/// In the spirit of Jepsen: clients push, deploy, abort and roll back
/// concurrently through different members while members are killed and
/// restarted. Afterwards every acknowledged write is in the registry, no
/// model ever had two rollouts active at once (by the audit log, which is
/// in commit order), and every watcher saw revisions only increase.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writes_through_dying_members_keep_a_consistent_history() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let tmp = TempDir::new("ha-history");
    let (plane, mut members) = Plane::start(&tmp, &[]);
    let admin = plane.admin.clone();
    let urls = urls_of(&members);
    let (_, first_term) = agreed_leader(&urls, 3, None).await;

    // The artifact every push registers, uploaded once.
    let setup = shoal_client::ApiClient::control(&urls[0], Some(admin.clone()));
    let bytes = std::fs::read(model_path("digits-v1.onnx")).unwrap();
    let size = bytes.len() as u64;
    let uploaded = setup
        .upload_artifact(size, futures::stream::iter([Ok(bytes::Bytes::from(bytes))]))
        .await
        .unwrap();
    // A replica that never serves, whose watch streams the watchers follow.
    setup
        .register(&shoal_api::fleet::Registration {
            tier: Default::default(),
            id: "watched".into(),
            address: "127.0.0.1:9".into(),
            region: "local".into(),
            labels: Default::default(),
            pid: None,
            standby: false,
        })
        .await
        .unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let lasts: Vec<_> = urls
        .iter()
        .map(|_| tokio::sync::watch::Sender::new(None))
        .collect();
    let watchers: Vec<_> = urls
        .iter()
        .zip(&lasts)
        .map(|(url, last)| {
            tokio::spawn(watcher(
                url.clone(),
                admin.clone(),
                "watched".into(),
                stop.clone(),
                last.clone(),
            ))
        })
        .collect();
    let clients: Vec<_> = (0..4)
        .map(|i| {
            // Each client starts at a different member.
            let order: Vec<String> = (0..3).map(|k| urls[(i + k) % 3].clone()).collect();
            tokio::spawn(client(
                order.join(","),
                admin.clone(),
                uploaded.sha256.clone(),
                i as u64,
                60,
            ))
        })
        .collect();
    // Meanwhile: kill a member with SIGKILL, bring it back, five times.
    for round in 0..5 {
        tokio::time::sleep(Duration::from_millis(800)).await;
        let victim = round % 3;
        let member = &mut members[victim];
        member.child.take().unwrap().signal(Signal::SIGKILL);
        tokio::time::sleep(Duration::from_millis(400)).await;
        let addr = member.url.trim_start_matches("http://");
        member.child = Some(plane.member(member.id, addr).0);
    }
    let mut acknowledged = Vec::new();
    for c in clients {
        acknowledged.push(c.await.unwrap());
    }
    // Let the members converge, then stop watching.
    let (_, last_term) = agreed_leader(&urls, 3, None).await;
    assert!(
        last_term > first_term,
        "the lead changed hands under the kills"
    );
    // Stop watching once every watcher has the final desired state.
    let shoal_client::Conditional::Fresh(last) = setup.desired("watched", None).await.unwrap()
    else {
        panic!("no desired state for the watched replica");
    };
    for (url, seen) in urls.iter().zip(&lasts) {
        let mut seen = seen.subscribe();
        let caught_up =
            seen.wait_for(|state| state.as_ref().is_some_and(|s| s.models == last.models));
        tokio::time::timeout(Duration::from_secs(30), caught_up)
            .await
            .unwrap_or_else(|_| panic!("the watcher on {url} never saw the final desired state"))
            .unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    let mut watched = Vec::new();
    for w in watchers {
        watched.push(w.await.unwrap());
    }

    // 1. Every acknowledged write is there.
    let unexpected: Vec<&String> = acknowledged.iter().flat_map(|a| &a.unexpected).collect();
    assert!(unexpected.is_empty(), "{unexpected:?}");
    let pushes: Vec<&(String, String, String)> =
        acknowledged.iter().flat_map(|a| &a.pushes).collect();
    assert!(
        pushes.len() >= 10,
        "too few pushes went through: {}",
        pushes.len()
    );
    for (model, version, sha) in &pushes {
        let v = setup.get_version(model, version).await.unwrap();
        assert_eq!(&v.sha256, sha, "{model}:{version}");
    }
    let mut audit = Vec::new();
    loop {
        let after = audit
            .last()
            .map_or(0, |e: &shoal_api::registry::AuditEntry| e.seq);
        let page = setup.audit(after, 1000).await.unwrap();
        if page.is_empty() {
            break;
        }
        audit.extend(page);
    }
    let seqs: Vec<i64> = audit.iter().map(|e| e.seq).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]));
    let deploys: Vec<&(String, String)> = acknowledged.iter().flat_map(|a| &a.deploys).collect();
    assert!(!deploys.is_empty(), "no deploy went through");
    for (model, version) in &deploys {
        assert!(
            audit.iter().any(|e| e.action == "deploy"
                && &e.target == model
                && e.detail.contains(&format!(" to {version}:"))),
            "acknowledged deploy of {model}:{version} is not in the audit log"
        );
    }

    // 2. Never two rollouts of one model at once.
    let mut active: std::collections::BTreeMap<&str, u64> = Default::default();
    for e in &audit {
        match e.action.as_str() {
            "deploy" | "rollback" => {
                if let Some(since) = active.insert(&e.target, e.seq as u64) {
                    panic!(
                        "{} started a rollout of {} (audit {}) while the one from audit {since} was active",
                        e.actor, e.target, e.seq
                    );
                }
            }
            "deploy.promoted" | "deploy.rolled_back" | "deploy.aborted" => {
                active.remove(e.target.as_str());
            }
            _ => {}
        }
    }

    // 3. Watchers saw revisions only increase, across reconnects.
    for (url, revisions) in urls.iter().zip(&watched) {
        assert!(!revisions.is_empty(), "the watcher on {url} saw nothing");
        assert!(
            revisions.windows(2).all(|w| w[0] < w[1]),
            "revisions went backwards on {url}: {revisions:?}"
        );
    }
}

/// Waits until all three replicas are desired to serve `target` (beside
/// versions kept warm), serve it, and show no skew.
async fn settled_on(control: &str, target: &str) {
    let control = control.to_owned();
    eventually(
        &format!("every replica settled on {target}"),
        Duration::from_secs(30),
        || {
            let control = control.clone();
            async move {
                let status = tokio::task::spawn_blocking(move || cli(&control, &["status"]))
                    .await
                    .unwrap();
                let rows = common::serving_of(&status);
                (rows.len() == 3
                    && rows.iter().all(|(_, serving, desired, skew)| {
                        !skew
                            && serving.iter().any(|s| s == target)
                            && desired.iter().any(|d| d == target)
                    }))
                .then_some(())
            }
        },
    )
    .await;
}

/// The first test's flow with `--events` on NATS JetStream: replicas and
/// the gateway follow desired states and routing tables there (no watch
/// stream to any control plane; polling only every minute), the leader is
/// killed mid-canary and NATS is killed and restarted in the middle too;
/// the canary still finishes with no failed request, and a deploy after
/// the restart reaches every replica through the events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_nats_events_a_leader_kill_and_a_nats_restart_lose_nothing() {
    let tmp = TempDir::new("ha-events");
    let mut nats = shoal_testkit::NatsServer::start();
    let events = nats.url();
    let (plane, mut members) = Plane::start(&tmp, &["--events", &events]);
    let urls = urls_of(&members);
    let all = urls.join(",");
    let (first_leader, first_term) = agreed_leader(&urls, 3, None).await;

    let follow = ["--poll-interval", "60", "--events", events.as_str()];
    let _replicas: Vec<(ChildGuard, String)> = (0..3)
        .map(|i| common::replica(&all, &tmp.join(&format!("r{i}")), &follow))
        .collect();
    let (_gateway, gateway) =
        common::gateway(&tmp.join("gw"), &["--control", &all, "--events", &events]);
    cli(
        &all,
        &[
            "model",
            "push",
            "digits",
            model_path("digits-v1.onnx").to_str().unwrap(),
        ],
    );
    cli(&all, &["deploy", "digits:1"]);
    common::converged_on(&all, "digits:1", 3).await;
    shoal_testkit::until_routed(&gateway, "digits").await;
    // Nobody holds a watch stream: desired states travel on NATS.
    let http = HttpClient::new();
    for url in &urls {
        let metrics = http.get(&format!("{url}/metrics")).await.text();
        assert_eq!(
            metric_sum(&metrics, "shoal_watch_streams", &[]),
            0.0,
            "{url}"
        );
    }

    cli(
        &all,
        &[
            "model",
            "push",
            "digits",
            model_path("digits-v2.onnx").to_str().unwrap(),
        ],
    );
    let traffic = Traffic::start(&gateway, 3);
    cli(&all, &[&["deploy", "digits:2"][..], &CANARY].concat());
    common::digits_rollout_until(&all, "the canary's second step", |r| {
        r["step"].as_u64() >= Some(2)
    })
    .await;
    // NATS dies, then the leader; NATS comes back a moment later.
    nats.kill();
    let dead = members.iter_mut().find(|m| m.id == first_leader).unwrap();
    dead.child.take().unwrap().signal(Signal::SIGKILL);
    let dead_url = dead.url.clone();
    tokio::time::sleep(Duration::from_millis(500)).await;
    nats.restart();
    let survivors: Vec<String> = urls.iter().filter(|u| **u != dead_url).cloned().collect();
    let (_, term) = agreed_leader(&survivors, 3, Some(first_leader.as_str())).await;
    assert!(term > first_term);
    let survivors_url = survivors.join(",");
    shoal_testkit::tokens::remember_admin_token(&survivors_url, &plane.admin);
    let done = common::digits_rollout_until(&survivors_url, "the canary to finish", |r| {
        assert_ne!(r["state"], "rolled_back", "{r}");
        r["state"] == "promoted"
    })
    .await;
    assert!(
        done["reason"].as_str().unwrap().starts_with("promoted"),
        "{done}"
    );
    // Every replica converges on the promoted version by events alone.
    settled_on(&survivors_url, "digits:2").await;
    let (versions, failures) = traffic.finish().await;
    assert!(
        failures.is_empty(),
        "{} failed requests: {:?}",
        failures.len(),
        failures.first()
    );
    assert!(versions.iter().any(|v| v == "2"));
    let audit = http
        .get(&format!("{}/api/v1/audit?limit=1000", survivors[0]))
        .await
        .json();
    assert_eq!(judged_steps(&audit), [1, 2], "{audit}");

    // After the restart, a new deploy still travels on NATS.
    cli(
        &survivors_url,
        &["rollback", "digits", "--reason", "after the restart"],
    );
    settled_on(&survivors_url, "digits:1").await;
    // The new leader published them.
    let mut published = 0;
    for url in &survivors {
        let metrics = http.get(&format!("{url}/metrics")).await.text();
        published += metrics
            .lines()
            .filter(|l| l.starts_with("shoal_events_published_total{result=\"ok\"}"))
            .count();
    }
    assert!(published > 0, "no member published events");
}

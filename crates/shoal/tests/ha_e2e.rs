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
use shoal_testkit::{ChildGuard, HttpClient, PostgresServer, TempDir, eventually, model_path};

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_dies_mid_canary_and_another_member_finishes_it() {
    let tmp = TempDir::new("ha-e2e");
    let pg = PostgresServer::start();
    std::fs::create_dir_all(tmp.join("artifacts")).unwrap();
    let registry = pg.database("registry");
    let store = format!("file://{}", tmp.join("artifacts").display());
    let member_args = |id: &'static str| {
        vec![
            "--registry".to_owned(),
            registry.clone(),
            "--artifact-store".to_owned(),
            store.clone(),
            "--id".to_owned(),
            id.to_owned(),
        ]
    };
    let start = |id: &'static str, addr: &str| {
        let args = member_args(id);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        common::control(&tmp.join(id), addr, &args, &[])
    };
    let mut members: Vec<Member> = ["a", "b", "c"]
        .into_iter()
        .map(|id| {
            let (child, url) = start(id, "127.0.0.1:0");
            Member {
                id,
                child: Some(child),
                url,
            }
        })
        .collect();
    // a made the first admin token; the registry holds it for all.
    let admin = std::fs::read_to_string(tmp.join("a").join("admin.token")).unwrap();
    let urls: Vec<String> = members.iter().map(|m| m.url.clone()).collect();
    let all = urls.join(",");
    for url in urls.iter().chain([&all]) {
        shoal_testkit::tokens::remember_admin_token(url, admin.trim());
    }
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
        &[
            "deploy",
            "digits:2",
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
        ],
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
    shoal_testkit::tokens::remember_admin_token(&survivors_url, admin.trim());
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
    let (child, url) = start(dead_id, dead_url.trim_start_matches("http://"));
    assert_eq!(url, dead_url);
    let back = members.iter_mut().find(|m| m.id == dead_id).unwrap();
    back.child = Some(child);
    let (again, same_term) = agreed_leader(&urls, 3, Some(dead_id)).await;
    assert_eq!((again.as_str(), same_term), (leader.as_str(), term));
    let status = cli(&all, &["status"]);
    assert_eq!(status["control"]["leader"], leader.as_str(), "{status}");
    assert_eq!(status["control"]["members"].as_array().unwrap().len(), 3);
}

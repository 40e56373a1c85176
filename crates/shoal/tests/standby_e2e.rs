//! Active-passive with real processes: `shoal up --topology
//! active-standby` runs two active replicas and a standby that loads and
//! warms the model but takes no traffic; when both actives die, the
//! gateway sends every request to the standby within a second, with no
//! failed request; when the actives come back (shoal up restarts them),
//! the standby steps aside.

use std::collections::BTreeMap;
use std::time::Duration;

use nix::sys::signal::Signal;
use nix::unistd::Pid;
use serde_json::Value;
use shoal_api::replica::REPLICA_HEADER;
use shoal_testkit::{HttpClient, Samples, TempDir, eventually};

mod common;
use common::cli;

/// Replica id → (standby, pid, healthy and serving digits:1).
fn roles(status: &Value) -> BTreeMap<String, (bool, u32, bool)> {
    status["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["id"].as_str().unwrap().to_owned(),
                (
                    r["standby"] == true,
                    u32::try_from(r["pid"].as_u64().unwrap_or(0)).unwrap(),
                    r["healthy"] == true && r["serving"] == serde_json::json!(["digits:1"]),
                ),
            )
        })
        .collect()
}

async fn status(control: &str) -> Value {
    let control = control.to_owned();
    tokio::task::spawn_blocking(move || cli(&control, &["status"]))
        .await
        .unwrap()
}

/// Who answered one prediction through the gateway (`None`: it failed).
async fn answered_by(http: &HttpClient, gateway: &str) -> Option<String> {
    let r = http
        .post_json(
            &format!("{gateway}/v2/models/digits/infer"),
            Samples::load().request(0..1),
        )
        .await;
    (r.status.as_u16() == 200).then(|| r.header(REPLICA_HEADER).unwrap_or("").to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_takes_traffic_only_while_its_region_has_lost_its_actives() {
    let tmp = TempDir::new("standby-e2e");
    let data = tmp.join("fleet");
    let (mut up, gateway, control) = common::shoal_up(&data, &["--topology", "active-standby"]);
    let c = control.clone();
    let fleet = eventually(
        "two actives and a standby serving digits:1",
        Duration::from_secs(30),
        || {
            let c = c.clone();
            async move {
                let roles = roles(&status(&c).await);
                let actives = roles.values().filter(|(s, _, ok)| !s && *ok).count();
                let standbys = roles.values().filter(|(s, _, ok)| *s && *ok).count();
                (actives == 2 && standbys == 1).then_some(roles)
            }
        },
    )
    .await;
    let standby = fleet
        .iter()
        .find(|(_, (s, _, _))| *s)
        .map(|(id, _)| id.clone())
        .unwrap();

    // While the actives are up, the standby takes nothing.
    let http = HttpClient::new();
    for _ in 0..60 {
        let who = answered_by(&http, &gateway).await.expect("answered");
        assert_ne!(
            who, standby,
            "the standby answered while the actives were up"
        );
    }

    // Both actives die: the standby answers within the next requests (a
    // count, not a time: each request to a dead active is retried at once),
    // and nothing fails.
    for (_, (_, pid, _)) in fleet.iter().filter(|(_, (s, _, _))| !s) {
        nix::sys::signal::kill(Pid::from_raw(i32::try_from(*pid).unwrap()), Signal::SIGKILL)
            .unwrap();
    }
    let mut took_over = None;
    for n in 1..=200 {
        let who = answered_by(&http, &gateway).await;
        assert!(who.is_some(), "a request failed after the actives died");
        if who.as_deref() == Some(standby.as_str()) {
            took_over = Some(n);
            break;
        }
    }
    let took_over = took_over.expect("the standby answered none of 200 requests after the kill");
    eprintln!("the standby answered request {took_over} after the kill");
    // Until the actives are back every request is answered (by the
    // standby, or by an active shoal up has already restarted: it restarts
    // them within a few hundred milliseconds, so which one answers next is
    // a race the test does not judge).
    for _ in 0..20 {
        assert!(
            answered_by(&http, &gateway).await.is_some(),
            "a request failed while the standby served"
        );
    }

    // shoal up restarts the actives; once they serve, the standby steps aside.
    let c = control.clone();
    eventually("the actives back", Duration::from_secs(30), || {
        let c = c.clone();
        async move {
            let roles = roles(&status(&c).await);
            (roles.values().filter(|(s, _, ok)| !s && *ok).count() == 2).then_some(())
        }
    })
    .await;
    let (h, g, s) = (http.clone(), gateway.clone(), standby.clone());
    eventually(
        "twenty answers in a row from actives",
        Duration::from_secs(30),
        || {
            let (h, g, s) = (h.clone(), g.clone(), s.clone());
            async move {
                for _ in 0..20 {
                    if answered_by(&h, &g).await.as_deref() == Some(s.as_str()) {
                        return None;
                    }
                }
                Some(())
            }
        },
    )
    .await;

    up.signal(Signal::SIGINT);
    let exited = tokio::task::spawn_blocking(move || up.wait_timeout(Duration::from_secs(30)))
        .await
        .unwrap();
    assert!(exited.expect("shoal up exits on SIGINT").success());
}

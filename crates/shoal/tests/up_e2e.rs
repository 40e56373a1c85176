//! `shoal up` as a user runs it: ready with the bundled model, predictions
//! that match the held-out labels, a new version rolled out, a replica
//! SIGKILLed under a steady stream with no failed request and brought back,
//! and SIGINT leaving no process behind.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use nix::sys::signal::Signal;
use nix::unistd::Pid;
use serde_json::Value;
use shoal_testkit::{HttpClient, Samples, TempDir, eventually, model_path, spawn_until};

mod common;
use common::{cli, shoal};

fn alive(pid: u32) -> bool {
    nix::sys::signal::kill(Pid::from_raw(i32::try_from(pid).unwrap()), None).is_ok()
}

fn replicas_serving(status: &Value, key: &str) -> usize {
    status["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| {
            r["healthy"] == true && r["serving"] == serde_json::json!([key]) && r["skew"] == false
        })
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shoal_up_end_to_end() {
    let tmp = TempDir::new("up-e2e");
    // As in the README: `.shoal` under the directory the CLI runs in, so
    // the CLI finds the admin token there with no flag.
    let data = tmp.join(".shoal");
    let (mut up, ready) = spawn_until(
        shoal(),
        &[
            "up",
            "--gateway-addr",
            "127.0.0.1:0",
            "--control-addr",
            "127.0.0.1:0",
            "--data-dir",
            data.to_str().unwrap(),
            "--replicas",
            "3",
        ],
        "shoal up ready:",
    );
    let words: Vec<&str> = ready.split_whitespace().collect();
    let gateway = words[4].to_owned();
    let control = words[6].to_owned();
    // Leaked so the closure is Copy and goes into blocking tasks.
    let home: &'static std::path::Path = Box::leak(tmp.join("").into_boxed_path());
    let cli = move |control: &str, args: &[&str]| common::cli_in(home, control, args);
    let http = HttpClient::new();

    // The bundled model answers through the gateway as trained.
    let samples = Samples::load();
    let n = samples.labels.len();
    let r = http
        .post_json(
            &format!("{gateway}/v2/models/digits/infer"),
            samples.request(0..n),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let labels: Vec<i64> = r.json()["outputs"][1]["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_i64().unwrap())
        .collect();
    let correct = labels
        .iter()
        .zip(&samples.labels)
        .filter(|(a, b)| a == b)
        .count();
    #[allow(clippy::cast_precision_loss)]
    let accuracy = correct as f64 / n as f64;
    #[allow(clippy::cast_precision_loss)]
    let one = 1.0 / n as f64;
    assert!(
        (accuracy - samples.accuracy["digits-v1"]).abs() <= one + 1e-9,
        "accuracy {accuracy}"
    );

    // Push v2, deploy, all replicas converge.
    cli(
        &control,
        &[
            "model",
            "push",
            "digits",
            model_path("digits-v2.onnx").to_str().unwrap(),
        ],
    );
    cli(&control, &["deploy", "digits:2"]);
    let c = control.clone();
    eventually(
        "3 replicas serving digits:2",
        Duration::from_secs(30),
        || {
            let c = c.clone();
            async move {
                let s = tokio::task::spawn_blocking(move || cli(&c, &["status"]))
                    .await
                    .unwrap();
                (replicas_serving(&s, "digits:2") == 3).then_some(())
            }
        },
    )
    .await;

    // SIGKILL a replica under a steady stream: no failed request; it is
    // restarted and serves again.
    let status = cli(&control, &["status"]);
    let victim = &status["replicas"][0];
    let (victim_id, victim_pid) = (
        victim["id"].as_str().unwrap().to_owned(),
        u32::try_from(victim["pid"].as_u64().unwrap()).unwrap(),
    );
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(tokio::sync::Mutex::new(Vec::new()));
    let clients: Vec<_> = (0..3)
        .map(|_| {
            let (http, url, stop, done, failures) = (
                http.clone(),
                format!("{gateway}/v2/models/digits/infer"),
                stop.clone(),
                done.clone(),
                failures.clone(),
            );
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    match http
                        .send(http::Method::POST, &url, &[], Samples::load().request(0..1))
                        .await
                    {
                        Ok(r) if r.status == 200 => {
                            done.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(r) => failures
                            .lock()
                            .await
                            .push(format!("{}: {}", r.status, r.text())),
                        Err(e) => failures.lock().await.push(e),
                    }
                }
            })
        })
        .collect();
    let d = done.clone();
    eventually("traffic to flow", Duration::from_secs(10), || {
        let d = d.clone();
        async move { (d.load(Ordering::Relaxed) >= 100).then_some(()) }
    })
    .await;
    nix::sys::signal::kill(
        Pid::from_raw(i32::try_from(victim_pid).unwrap()),
        Signal::SIGKILL,
    )
    .unwrap();
    let c = control.clone();
    let id = victim_id.clone();
    eventually(
        "the killed replica to be restarted and serving",
        Duration::from_secs(30),
        || {
            let (c, id) = (c.clone(), id.clone());
            async move {
                let s = tokio::task::spawn_blocking(move || cli(&c, &["status"]))
                    .await
                    .unwrap();
                s["replicas"].as_array().unwrap().iter().find(|r| {
                    r["id"] == id.as_str()
                        && r["healthy"] == true
                        && r["serving"] == serde_json::json!(["digits:2"])
                        && r["pid"].as_u64() != Some(u64::from(victim_pid))
                })?;
                Some(())
            }
        },
    )
    .await;
    let after = done.load(Ordering::Relaxed);
    let d = done.clone();
    eventually(
        "more traffic after the restart",
        Duration::from_secs(10),
        || {
            let d = d.clone();
            async move { (d.load(Ordering::Relaxed) >= after + 100).then_some(()) }
        },
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }
    let failures = failures.lock().await;
    assert!(
        failures.is_empty(),
        "{} failed requests: {:?}",
        failures.len(),
        failures.first()
    );

    // SIGINT: everything stops, nothing is left behind.
    let fleet: Value =
        serde_json::from_slice(&std::fs::read(data.join("fleet.json")).unwrap()).unwrap();
    let pids: Vec<u32> = fleet["pids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| u32::try_from(p[1].as_u64().unwrap()).unwrap())
        .collect();
    assert_eq!(pids.len(), 5, "control, gateway and 3 replicas: {fleet}");
    up.signal(Signal::SIGINT);
    let status = tokio::task::spawn_blocking(move || {
        let s = up.wait_timeout(Duration::from_secs(30));
        (s, up)
    })
    .await
    .unwrap();
    assert!(status.0.expect("shoal up exits after SIGINT").success());
    for pid in pids {
        assert!(!alive(pid), "process {pid} outlived shoal up");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regions_chaos_and_resume() {
    let tmp = TempDir::new("up-regions");
    let data = tmp.join("fleet");
    let args = [
        "up",
        "--gateway-addr",
        "127.0.0.1:0",
        "--control-addr",
        "127.0.0.1:0",
        "--data-dir",
        data.to_str().unwrap(),
        "--replicas",
        "4",
        "--regions",
        "us-east,eu-west",
    ];
    let (mut up, ready) = spawn_until(
        shoal(),
        &[&args[..], &["--chaos", "120"]].concat(),
        "shoal up ready:",
    );
    shoal_testkit::tokens::remember_admin_token(
        ready.split_whitespace().nth(6).unwrap(),
        std::fs::read_to_string(data.join("admin.token"))
            .unwrap()
            .trim(),
    );
    let words: Vec<&str> = ready.split_whitespace().collect();
    let (gateway, control) = (words[4].to_owned(), words[6].to_owned());

    // Replicas spread over both regions; one gateway each.
    let fleet: Value =
        serde_json::from_slice(&std::fs::read(data.join("fleet.json")).unwrap()).unwrap();
    let regions: Vec<&str> = fleet["gateways"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g[0].as_str().unwrap())
        .collect();
    assert_eq!(regions, ["us-east", "eu-west"]);
    let c = control.clone();
    eventually(
        "4 replicas in two regions serving digits",
        Duration::from_secs(30),
        || {
            let c = c.clone();
            async move {
                let s = tokio::task::spawn_blocking(move || cli(&c, &["status"]))
                    .await
                    .unwrap();
                let rows = s["replicas"].as_array()?;
                let per = |r: &str| {
                    rows.iter()
                        .filter(|x| {
                            x["region"] == r && x["serving"] == serde_json::json!(["digits:1"])
                        })
                        .count()
                };
                (per("us-east") == 2 && per("eu-west") == 2).then_some(())
            }
        },
    )
    .await;

    // The chaos monkey kills a replica about twice a second; the fleet
    // keeps answering through the gateway while supervision brings them back.
    let pids = |fleet: &Value| -> Vec<u64> {
        fleet["pids"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| p[0].as_str().unwrap().starts_with("replica-"))
            .map(|p| p[1].as_u64().unwrap())
            .collect()
    };
    let before = pids(&fleet);
    let http = HttpClient::new();
    let url = format!("{gateway}/v2/models/digits/infer");
    let mut failures = Vec::new();
    // Until the monkey has killed a replica and 100 more answers came after
    // that (counts, not a time window); 60 s only gives up on a monkey that
    // never strikes.
    let fleet_json = data.join("fleet.json");
    let killed = || {
        let now: Value = serde_json::from_slice(&std::fs::read(&fleet_json).unwrap()).unwrap();
        before.iter().filter(|p| !pids(&now).contains(p)).count()
    };
    let give_up = tokio::time::Instant::now() + Duration::from_secs(60);
    let (mut answered, mut since_kill) = (0, 0);
    while since_kill < 100 {
        assert!(
            tokio::time::Instant::now() < give_up,
            "the chaos monkey killed nobody in 60 s ({answered} answers)"
        );
        match http
            .send(http::Method::POST, &url, &[], Samples::load().request(0..1))
            .await
        {
            Ok(r) if r.status == 200 => answered += 1,
            Ok(r) => failures.push(format!("{}: {}", r.status, r.text())),
            Err(e) => failures.push(e),
        }
        if since_kill > 0 || (answered % 20 == 0 && killed() >= 1) {
            since_kill += 1;
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} failed: {:?}",
        failures.len(),
        answered + failures.len(),
        failures.first()
    );
    up.signal(Signal::SIGINT);
    let (status, _) =
        tokio::task::spawn_blocking(move || (up.wait_timeout(Duration::from_secs(30)), up))
            .await
            .unwrap();
    assert!(status.expect("shoal up exits").success());

    // A second shoal up on the same directory resumes: the registry still
    // holds digits:1 and nothing is pushed again.
    let (mut again, ready) = spawn_until(shoal(), &args, "shoal up ready:");
    let control = ready.split_whitespace().nth(6).unwrap().to_owned();
    // The same admin token still works: it lives in the registry.
    shoal_testkit::tokens::remember_admin_token(
        &control,
        std::fs::read_to_string(data.join("admin.token"))
            .unwrap()
            .trim(),
    );
    let models = cli(&control, &["model", "list"]);
    assert_eq!(models[0]["name"], "digits");
    assert_eq!(models[0]["versions"], 1);
    again.signal(Signal::SIGINT);
    tokio::task::spawn_blocking(move || again.wait_timeout(Duration::from_secs(30)))
        .await
        .unwrap();
}

/// Two free ports in a row: the gateway's, and the control plane's after it
/// (the layout of the defaults, 8080 and 8081).
fn consecutive_ports() -> u16 {
    loop {
        let first = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = first.local_addr().unwrap().port();
        let next = port.checked_add(2).and_then(|p| {
            let a = std::net::TcpListener::bind(("127.0.0.1", p - 1)).ok()?;
            let b = std::net::TcpListener::bind(("127.0.0.1", p)).ok()?;
            Some((a, b))
        });
        if next.is_some() {
            return port;
        }
    }
}

/// `shoal up --regions` with the default layout (gateway port, control
/// plane on the next): the second region's gateway used to take the
/// control plane's port and crash-loop. It now takes the port after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regions_gateways_skip_the_control_planes_port() {
    let tmp = TempDir::new("up-regions-ports");
    let port = consecutive_ports();
    let (gateway, control) = (
        format!("127.0.0.1:{port}"),
        format!("127.0.0.1:{}", port + 1),
    );
    let (mut up, ready) = spawn_until(
        shoal(),
        &[
            "up",
            "--gateway-addr",
            &gateway,
            "--control-addr",
            &control,
            "--data-dir",
            tmp.join("fleet").to_str().unwrap(),
            "--replicas",
            "2",
            "--regions",
            "us-east,eu-west",
        ],
        "shoal up ready:",
    );
    assert!(
        ready.contains(&format!("control http://{control}")),
        "{ready}"
    );
    let http = HttpClient::new();
    let samples = Samples::load();
    for p in [port, port + 2] {
        let url = format!("http://127.0.0.1:{p}/v2/models/digits/infer");
        eventually(
            "both regions' gateways to answer",
            Duration::from_secs(30),
            || {
                let (http, url, body) = (http.clone(), url.clone(), samples.request(0..1));
                async move { (http.post_json(&url, body).await.status == 200).then_some(()) }
            },
        )
        .await;
    }
    up.signal(Signal::SIGINT);
    let (status, _) =
        tokio::task::spawn_blocking(move || (up.wait_timeout(Duration::from_secs(60)), up))
            .await
            .unwrap();
    assert!(status.expect("shoal up exits on SIGINT").success());
}

/// A child that can never start (its address is taken) stops `shoal up` at
/// start-up with the child's error, rather than restarting it forever; and
/// no child is left behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_taken_address_fails_shoal_up_at_start() {
    let tmp = TempDir::new("up-taken");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let gateway = taken.local_addr().unwrap().to_string();
    let data = tmp.join("fleet");
    let child = std::process::Command::new(shoal())
        .args([
            "up",
            "--gateway-addr",
            &gateway,
            "--control-addr",
            "127.0.0.1:0",
            "--replicas",
            "1",
        ])
        .args(["--data-dir", data.to_str().unwrap()])
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut up = shoal_testkit::ChildGuard(child);
    let status = tokio::task::spawn_blocking(move || {
        let status = up.wait_timeout(Duration::from_secs(120));
        let mut stderr = String::new();
        use std::io::Read;
        if let Some(mut e) = up.0.stderr.take() {
            let _ = e.read_to_string(&mut stderr);
        }
        (status, stderr)
    })
    .await
    .unwrap();
    let (status, stderr) = status;
    let status = status.expect("shoal up gives up instead of restarting the gateway forever");
    assert!(!status.success());
    assert!(
        stderr.contains("Address already in use") && stderr.contains("did not start"),
        "{stderr}"
    );
    // Nothing left running.
    let fleet: Value =
        serde_json::from_slice(&std::fs::read(data.join("fleet.json")).unwrap()).unwrap();
    for pid in fleet["pids"].as_array().into_iter().flatten() {
        let pid = pid[1].as_u64().unwrap() as u32;
        assert!(!alive(pid), "child {pid} outlived shoal up");
    }
    drop(taken);
}

/// Ctrl-C while the fleet is still starting stops everything, children
/// included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_during_start_up_stops_everything() {
    let tmp = TempDir::new("up-early-sigint");
    let data = tmp.join("fleet");
    let child = std::process::Command::new(shoal())
        .args([
            "up",
            "--gateway-addr",
            "127.0.0.1:0",
            "--control-addr",
            "127.0.0.1:0",
        ])
        .args(["--replicas", "2", "--data-dir", data.to_str().unwrap()])
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut up = shoal_testkit::ChildGuard(child);
    // As soon as the control plane is up (a child is recorded), interrupt.
    let fleet_json = data.join("fleet.json");
    let pids = eventually("a child to start", Duration::from_secs(30), || {
        let text = std::fs::read(&fleet_json).ok();
        let pids: Vec<u32> = text
            .and_then(|t| serde_json::from_slice::<Value>(&t).ok())
            .map(|v| {
                v["pids"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|p| p[1].as_u64().map(|p| p as u32))
                    .collect()
            })
            .unwrap_or_default();
        std::future::ready((!pids.is_empty()).then_some(pids))
    })
    .await;
    up.signal(Signal::SIGINT);
    let (status, _) =
        tokio::task::spawn_blocking(move || (up.wait_timeout(Duration::from_secs(60)), up))
            .await
            .unwrap();
    assert!(status.expect("shoal up exits on SIGINT").success());
    for pid in pids {
        assert!(!alive(pid), "child {pid} outlived shoal up");
    }
}

/// `shoal up --control-planes 3` on a PostgreSQL registry: three members,
/// one leader, every member answering. SIGKILL the leader: another member
/// leads in a new term while `shoal up` brings the killed one back,
/// predictions never fail, and a deploy through the member list goes out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_control_planes_under_shoal_up_survive_losing_the_leader() {
    let tmp = TempDir::new("up-ha");
    let pg = shoal_testkit::PostgresServer::start();
    let registry = pg.database("registry");
    let data = tmp.join("fleet");
    let (_up, gateway, control) = common::shoal_up(
        &data,
        &[
            "--control-planes",
            "3",
            "--registry",
            &registry,
            "--replicas",
            "2",
        ],
    );
    let urls: Vec<&str> = control.split(',').collect();
    assert_eq!(urls.len(), 3, "{control}");
    let status = cli(&control, &["status"]);
    let leader = status["control"]["leader"].as_str().unwrap().to_owned();
    let term = status["control"]["term"].as_u64().unwrap();
    assert_eq!(
        status["control"]["members"].as_array().unwrap().len(),
        3,
        "{status}"
    );
    let http = HttpClient::new();
    for url in &urls {
        let l = http.get(&format!("{url}/api/v1/leader")).await.json();
        assert_eq!(l["leader"], leader.as_str(), "{url}: {l}");
    }

    let fleet: Value =
        serde_json::from_slice(&std::fs::read(data.join("fleet.json")).unwrap()).unwrap();
    let pid = fleet["pids"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p[0] == leader.as_str())
        .and_then(|p| p[1].as_u64())
        .unwrap_or_else(|| panic!("no process for the leader {leader}: {fleet}"));
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let load = {
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        let url = format!("{gateway}/v2/models/digits/infer");
        tokio::spawn(async move {
            let http = HttpClient::new();
            while !stop.load(Ordering::Relaxed) {
                let r = http.post_json(&url, Samples::load().request(0..1)).await;
                if r.status == 200 { &ok } else { &failed }.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    nix::sys::signal::kill(Pid::from_raw(i32::try_from(pid).unwrap()), Signal::SIGKILL).unwrap();
    // Any member may answer (the killed one too, once restarted): the
    // lease is in the registry they share.
    let others: Vec<String> = urls.iter().map(|u| (*u).to_owned()).collect();
    let (new_leader, new_term) =
        eventually("a new term of leadership", Duration::from_secs(30), || {
            let (http, others) = (http.clone(), others.clone());
            async move {
                for url in &others {
                    let Ok(r) = http
                        .send(
                            http::Method::GET,
                            &format!("{url}/api/v1/leader"),
                            &[],
                            bytes::Bytes::new(),
                        )
                        .await
                    else {
                        continue;
                    };
                    if r.status != 200 {
                        continue;
                    }
                    let l = r.json();
                    if l["term"].as_u64()? > term {
                        return Some((l["leader"].as_str()?.to_owned(), l["term"].as_u64()?));
                    }
                }
                None
            }
        })
        .await;
    assert!(new_term > term && !new_leader.is_empty());

    // A deploy through the member list goes out under the new leader.
    let v2 = model_path("digits-v2.onnx");
    cli(&control, &["model", "push", "digits", v2.to_str().unwrap()]);
    cli(&control, &["deploy", "digits:2"]);
    common::converged_on(&control, "digits:2", 2).await;
    stop.store(true, Ordering::Relaxed);
    load.await.unwrap();
    assert_eq!(failed.load(Ordering::Relaxed), 0, "failed predictions");
    assert!(ok.load(Ordering::Relaxed) > 0);
}

/// `shoal up | head`: once nobody reads its output, the next line it prints
/// (a replica's restart) must not take the fleet down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_stdout_does_not_stop_the_fleet() {
    use std::io::BufRead;
    let tmp = TempDir::new("up-closed-stdout");
    let data = tmp.join("fleet");
    let mut child = std::process::Command::new(shoal())
        .args([
            "up",
            "--gateway-addr",
            "127.0.0.1:0",
            "--control-addr",
            "127.0.0.1:0",
        ])
        .arg("--data-dir")
        .arg(&data)
        .args(["--replicas", "2"])
        .env("RUST_LOG", "warn")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut up = shoal_testkit::ChildGuard(child);
    let ready = std::io::BufReader::new(stdout)
        .lines()
        .map(Result::unwrap)
        .find(|l| l.starts_with("shoal up ready:"))
        .expect("shoal up printed its ready line");
    // The reader (and with it the pipe's read end) is gone now.
    let gateway = ready.split_whitespace().nth(4).unwrap().to_owned();
    let fleet_pid = |name: &str| -> Option<u64> {
        let fleet: Value =
            serde_json::from_slice(&std::fs::read(data.join("fleet.json")).ok()?).ok()?;
        fleet["pids"]
            .as_array()?
            .iter()
            .find(|p| p[0] == name)
            .and_then(|p| p[1].as_u64())
    };
    let before = fleet_pid("replica-0").expect("replica-0 runs");
    nix::sys::signal::kill(
        Pid::from_raw(i32::try_from(before).unwrap()),
        Signal::SIGKILL,
    )
    .unwrap();
    // Restarted: shoal up printed its "exited; restarting" line into the
    // closed pipe, and lived.
    eventually("replica-0 to be restarted", Duration::from_secs(30), || {
        let now = fleet_pid("replica-0");
        async move { now.filter(|p| *p != before).map(|_| ()) }
    })
    .await;
    // try_wait, not a signal probe: a dead child stays a zombie until reaped.
    let running = |up: &mut shoal_testkit::ChildGuard| up.0.try_wait().unwrap().is_none();
    assert!(running(&mut up), "shoal up died writing to a closed stdout");
    shoal_testkit::until_routed(&gateway, "digits").await;
    assert!(running(&mut up));

    // One-shot commands into a pipe nobody reads (`shoal model list |
    // head` once head has exited) end quietly, not with a panic.
    let control = ready.split_whitespace().nth(6).unwrap().to_owned();
    let token = std::fs::read_to_string(data.join("admin.token")).unwrap();
    for args in [
        &["model", "list"][..],
        &["status"],
        &["model", "list", "--json"],
    ] {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let out = std::process::Command::new(shoal())
            .args(args)
            .args(["--control", &control, "--token", token.trim()])
            .stdout(writer)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{args:?}: {:?} {stderr}", out.status);
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
}

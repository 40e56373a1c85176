//! `shoal up`: the whole fleet on one machine.
//!
//! The control plane, one gateway per region and N replicas run as real
//! child processes of the same binary, on loopback. Each child is
//! supervised: when it dies it is restarted with backoff and rejoins (its
//! data directory, and so its identity and artifact cache, survive). The
//! registry and artifacts live under the data directory, so a second
//! `shoal up` resumes where the first stopped. On first start the bundled
//! `digits` model (compiled into the binary) is pushed and deployed.
//!
//! Children exit on their own if `shoal up` disappears (they watch their
//! parent), so even a `kill -9` of `shoal up` leaves nothing behind.

pub mod autoscale;
mod child;
pub mod tls;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use anyhow::{Context, bail};
use bytes::Bytes;
use serde::Serialize;
use shoal_api::deploy::DeployRequest;
use shoal_api::registry::NewVersion;
use shoal_client::ApiClient;
use shoal_telemetry::say;

pub use crate::child::Supervised;

/// The bundled demo model: digits classifier v1, compiled into the binary so
/// `shoal up` works from any directory.
pub const DIGITS_V1: &[u8] = include_bytes!("../../../models/digits-v1.onnx");

/// One held-out digits sample (a zero) for the printed `curl`.
const SAMPLE_ZERO: &str = "[0,0,5,13,9,1,0,0,0,0,13,15,10,15,5,0,0,3,15,2,0,11,8,0,0,4,12,0,0,8,8,0,0,5,8,0,0,9,8,0,0,4,11,0,1,12,7,0,0,2,14,5,10,12,0,0,0,0,6,13,10,0,0,0]";

/// Environment variable carrying the supervisor's pid to children.
pub const PARENT_ENV: &str = "SHOAL_PARENT_PID";

/// Settings of `shoal up`.
#[derive(Debug, Clone)]
pub struct UpConfig {
    /// The `shoal` binary to run children from.
    pub exe: PathBuf,
    /// Data directory of the whole fleet.
    pub data_dir: PathBuf,
    /// Replicas to run.
    pub replicas: usize,
    /// Standby replicas to run besides them (spread over the regions):
    /// loaded and warm, routed to only while a region is short of actives.
    pub standby: usize,
    /// Regions; replicas are spread over them, one gateway each.
    pub regions: Vec<String>,
    /// Address of the first region's gateway; the others take the next ports.
    pub gateway_addr: SocketAddr,
    /// Where the first region's gateway serves the KServe v2 gRPC protocol,
    /// if at all; the others take the next free ports.
    pub grpc_addr: Option<SocketAddr>,
    /// Address of the control plane.
    pub control_addr: SocketAddr,
    /// Chaos monkey: random replica kills per minute.
    pub chaos_per_minute: Option<f64>,
    /// Run every member on https with a local CA (`DATA_DIR/tls`).
    pub tls: bool,
    /// Control-plane members (they share `registry` and an artifact store
    /// under the data directory).
    pub control_planes: usize,
    /// The registry URL (`postgres://…` for several members).
    pub registry: Option<String>,
    /// NATS server every member is given (`--events`).
    pub events: Option<String>,
    /// Redis for sequences' state, given to every replica
    /// (`--session-store`); none keeps it in each replica's memory.
    pub session_store: Option<String>,
    /// Of `replicas`, this many (the last ones) run as spot capacity
    /// (`--tier spot`).
    pub spot: usize,
    /// Follow the control plane's desired replica count, up to this many
    /// replicas (`--autoscale --max-replicas M`).
    pub autoscale: Option<usize>,
    /// Flags every control plane is started with besides the fleet's own
    /// (the autoscalers' tuning).
    pub control_args: Vec<String>,
    /// Flags every replica is started with besides the fleet's own.
    pub replica_args: Vec<String>,
}

impl UpConfig {
    /// Refuses what cannot run, saying what to do instead.
    pub fn check(&self) -> anyhow::Result<()> {
        let postgres = self
            .registry
            .as_deref()
            .is_some_and(|r| r.starts_with("postgres://") || r.starts_with("postgresql://"));
        if self.spot > self.replicas {
            bail!(
                "--spot {} is more than the {} replicas: spot replicas are some of them",
                self.spot,
                self.replicas
            );
        }
        if let Some(max) = self.autoscale
            && max < self.replicas
        {
            bail!(
                "--max-replicas {max} is below --replicas {}: the fleet starts with --replicas and \
                 grows up to --max-replicas",
                self.replicas
            );
        }
        if self.control_planes > 1 && !postgres {
            bail!(
                "--control-planes {} needs a registry they share: pass --registry postgres://user@host/database (SQLite serves one control plane)",
                self.control_planes
            );
        }
        Ok(())
    }
}

/// Where everything runs, written to `<data-dir>/fleet.json` on each change.
#[derive(Debug, Clone, Default, Serialize)]
pub struct FleetState {
    /// Control plane URL.
    pub control: String,
    /// Gateway URLs by region.
    pub gateways: Vec<(String, String)>,
    /// Gateways' gRPC addresses by region (with `--grpc-addr`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub grpc: Vec<(String, String)>,
    /// Process ids of every child running now.
    pub pids: Vec<(String, u32)>,
    /// The control planes' artifact store: a local directory.
    pub artifacts: Option<std::path::PathBuf>,
}

/// One gateway address per region: the first as given, the others on the
/// next ports, skipping the control plane's (with the defaults, 8080 and
/// 8082 around the control plane's 8081). Port 0 means any, for each.
fn gateway_addrs(first: SocketAddr, control: SocketAddr, regions: usize) -> Vec<SocketAddr> {
    spread(first, &[control], regions)
}

/// `n` addresses from `first` on, on successive ports, skipping any that
/// clashes with one of `taken`. Port 0 means any, for each.
fn spread(first: SocketAddr, taken: &[SocketAddr], n: usize) -> Vec<SocketAddr> {
    if first.port() == 0 {
        return vec![first; n];
    }
    let mut addrs = Vec::with_capacity(n);
    let mut port = first.port();
    while addrs.len() < n {
        let candidate = SocketAddr::new(first.ip(), port);
        let clashes = taken.iter().any(|t| {
            candidate.port() == t.port()
                && (candidate.ip() == t.ip()
                    || t.ip().is_unspecified()
                    || candidate.ip().is_unspecified())
        });
        if !clashes {
            addrs.push(candidate);
        }
        port = port.saturating_add(1);
    }
    addrs
}

use shoal_core::redact_url;

/// Adds `child` to the started children (so it is stopped however
/// start-up ends) and waits for the address it listens on.
async fn listening(
    spawned: &std::sync::Mutex<Vec<Arc<Supervised>>>,
    child: Arc<Supervised>,
) -> anyhow::Result<String> {
    spawned
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .push(child.clone());
    child.address().await.map_err(anyhow::Error::msg)
}

/// Empties the list of started children.
fn take(spawned: &std::sync::Mutex<Vec<Arc<Supervised>>>) -> Vec<Arc<Supervised>> {
    std::mem::take(&mut *spawned.lock().unwrap_or_else(PoisonError::into_inner))
}

/// Stops children in order: gateways, then replicas, then the control plane.
async fn stop_all(mut children: Vec<Arc<Supervised>>) {
    let order = |c: &Arc<Supervised>| match c.name() {
        n if n.starts_with("gateway-") => 0,
        n if n.starts_with("replica-") => 1,
        _ => 2,
    };
    children.sort_by_key(order);
    for group in 0..3 {
        futures::future::join_all(
            children
                .iter()
                .filter(|c| order(c) == group)
                .map(|c| c.stop()),
        )
        .await;
    }
}

/// Name of the fleet token `shoal up` gives its replicas and gateways.
const FLEET_TOKEN: &str = "shoal-up-fleet";

/// The fleet token file under `data_dir`: the one kept from an earlier run
/// while the control plane still accepts it, else a new `fleet` token
/// (replacing a revoked or lost one of the same name).
async fn fleet_token(admin: &ApiClient, data_dir: &std::path::Path) -> anyhow::Result<PathBuf> {
    let path = data_dir.join("fleet.token");
    if let Ok(token) = shoal_client::secret::read(&path) {
        let check = ApiClient::control(admin.base(), Some(token));
        if check
            .whoami()
            .await
            .is_ok_and(|w| w.role == shoal_api::auth::Role::Fleet)
        {
            return Ok(path);
        }
    }
    let new = shoal_api::auth::NewToken {
        name: FLEET_TOKEN.into(),
        role: shoal_api::auth::Role::Fleet,
    };
    let created = match admin.create_token(&new).await {
        Err(e) if e.status() == Some(http::StatusCode::CONFLICT) => {
            admin.revoke_token(FLEET_TOKEN).await?;
            admin.create_token(&new).await?
        }
        other => other?,
    };
    shoal_client::secret::write(&path, &created.token)
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(path)
}

/// Pushes and deploys the bundled model when the registry is empty.
async fn seed(client: &ApiClient) -> anyhow::Result<bool> {
    if !client.list_models().await?.is_empty() {
        return Ok(false);
    }
    let bytes = Bytes::from_static(DIGITS_V1);
    let size = bytes.len() as u64;
    let uploaded = client
        .upload_artifact(size, futures::stream::once(async move { Ok(bytes) }))
        .await?;
    let mut new = NewVersion {
        sha256: uploaded.sha256,
        ..NewVersion::default()
    };
    new.labels.insert("source".into(), "bundled demo".into());
    new.metrics.insert("accuracy".into(), 0.9533);
    let version = client.create_version("digits", &new).await?;
    client
        .deploy(
            "digits",
            &DeployRequest {
                version: version.version,
                reason: Some("shoal up: bundled demo model".into()),
                ..DeployRequest::default()
            },
        )
        .await?;
    Ok(true)
}

/// Runs the fleet until `shutdown` completes, then stops every child.
pub async fn run(
    config: UpConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    config.check()?;
    if config.replicas == 0 {
        bail!("--replicas must be at least 1");
    }
    if config.regions.is_empty() || config.regions.iter().any(String::is_empty) {
        bail!("--regions must name at least one region, e.g. --regions us-east,eu-west");
    }
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("cannot create data directory {}", config.data_dir.display()))?;
    let started = tokio::time::Instant::now();
    let state = Arc::new(tokio::sync::Mutex::new(FleetState::default()));
    let exe = config.exe.clone();
    let dir = |name: &str| config.data_dir.join(name).display().to_string();
    // With --tls every member serves https with the local CA's certificate
    // and trusts that CA as a client; so does this process.
    let tls = if config.tls {
        let hosts: Vec<String> = [config.gateway_addr.ip(), config.control_addr.ip()]
            .iter()
            .filter(|ip| !ip.is_loopback() && !ip.is_unspecified())
            .map(ToString::to_string)
            .collect();
        let files = tls::ensure(&config.data_dir, &hosts)?;
        shoal_client::tls::configure(&shoal_client::tls::ClientTls {
            ca: Some(files.ca.clone()),
            cert: Some(files.cert.clone()),
            key: Some(files.key.clone()),
        })
        .context("shoal up --tls makes its own CA; do not pass --ca with it")?;
        Some(files)
    } else {
        None
    };
    let scheme = if tls.is_some() { "https" } else { "http" };
    let tls_args: Vec<String> = tls
        .iter()
        .flat_map(|f| {
            [
                "--tls-cert".into(),
                f.cert.display().to_string(),
                "--tls-key".into(),
                f.key.display().to_string(),
                "--ca".into(),
                f.ca.display().to_string(),
                "--client-cert".into(),
                f.cert.display().to_string(),
                "--client-key".into(),
                f.key.display().to_string(),
            ]
        })
        .collect();

    // Children as they are started, so that however start-up ends (an
    // error, or Ctrl-C while a child is still coming up) every one is
    // stopped.
    let spawned: Arc<std::sync::Mutex<Vec<Arc<Supervised>>>> = Arc::default();
    let gateway_addrs = gateway_addrs(
        config.gateway_addr,
        config.control_addr,
        config.regions.len(),
    );
    let mut shutdown = std::pin::pin!(shutdown);
    let startup = async {
        // The first member starts alone (it makes the first admin token in
        // an empty registry); the others join it on any free port.
        let events_args: Vec<String> = config
            .events
            .iter()
            .flat_map(|url| ["--events".to_owned(), url.clone()])
            .collect();
        let shared_path = std::path::absolute(config.data_dir.join("artifacts"))?;
        let shared_store = {
            std::fs::create_dir_all(&shared_path)
                .with_context(|| format!("cannot create {}", shared_path.display()))?;
            format!("file://{}", shared_path.display())
        };
        // One member keeps its store in its data directory; several share.
        state.lock().await.artifacts = Some(if config.control_planes > 1 {
            shared_path.clone()
        } else {
            std::path::absolute(config.data_dir.join("control").join("artifacts"))?
        });
        let mut control_addrs = Vec::new();
        for i in 0..config.control_planes.max(1) {
            let (name, addr, data) = if i == 0 {
                ("control".to_owned(), config.control_addr, dir("control"))
            } else {
                (
                    format!("control-{i}"),
                    SocketAddr::new(config.control_addr.ip(), 0),
                    dir(&format!("control-{i}")),
                )
            };
            let mut args: Vec<String> = vec![
                "control".into(),
                "--addr".into(),
                addr.to_string(),
                "--data-dir".into(),
                data,
                "--heartbeat-ms".into(),
                "500".into(),
            ];
            if let Some(registry) = &config.registry {
                args.extend(["--registry".into(), registry.clone()]);
            }
            args.extend(config.control_args.iter().cloned());
            args.extend(events_args.iter().cloned());
            if config.control_planes > 1 {
                args.extend([
                    "--id".into(),
                    name.clone(),
                    "--artifact-store".into(),
                    shared_store.clone(),
                ]);
            }
            let control = Supervised::spawn(
                name.clone(),
                exe.clone(),
                args.into_iter().chain(tls_args.iter().cloned()).collect(),
                true,
                state.clone(),
                config.data_dir.clone(),
            );
            let control_addr = listening(&spawned, control)
                .await
                .with_context(|| format!("the control plane {name} did not start"))?;
            control_addrs.push(format!("{scheme}://{control_addr}"));
        }
        let control_url = control_addrs.join(",");
        state.lock().await.control = control_url.clone();
        let admin =
            shoal_client::secret::read(&config.data_dir.join("control").join("admin.token"))
                .context("the control plane did not leave its admin token")?;
        let admin_file = config.data_dir.join("admin.token");
        shoal_client::secret::write(&admin_file, &admin)
            .with_context(|| format!("cannot write {}", admin_file.display()))?;
        let client = ApiClient::control(&control_url, Some(admin));
        let fleet_file = fleet_token(&client, &config.data_dir).await?;
        let fleet_file = fleet_file.display().to_string();

        let launcher = Arc::new(ReplicaLauncher {
            exe: exe.clone(),
            data_dir: config.data_dir.clone(),
            control_url: control_url.clone(),
            fleet_file: fleet_file.clone(),
            extra: events_args
                .iter()
                .cloned()
                .chain(
                    config
                        .session_store
                        .iter()
                        .flat_map(|url| ["--session-store".to_owned(), url.clone()]),
                )
                .chain(tls_args.iter().cloned())
                .chain(config.replica_args.iter().cloned())
                .collect(),
            state: state.clone(),
        });
        let members = (0..config.replicas)
            .map(|i| {
                let spot = i >= config.replicas - config.spot;
                (format!("replica-{i}"), i, false, spot)
            })
            .chain((0..config.standby).map(|i| (format!("standby-{i}"), i, true, false)));
        for (name, i, standby, spot) in members {
            let region = &config.regions[i % config.regions.len()];
            let child = launcher.spawn(&name, region, standby, spot);
            spawned
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(child);
        }
        let mut gateways = Vec::new();
        let mut grpc = Vec::new();
        // gRPC ports follow the first one, clear of every REST port.
        let grpc_addrs = config.grpc_addr.map(|first| {
            let mut taken = gateway_addrs.clone();
            taken.push(config.control_addr);
            spread(first, &taken, config.regions.len())
        });
        for (i, region) in config.regions.iter().enumerate() {
            let grpc_args = grpc_addrs
                .as_ref()
                .map(|a| vec!["--grpc-addr".to_owned(), a[i].to_string()])
                .unwrap_or_default();
            let g = Supervised::spawn(
                format!("gateway-{region}"),
                exe.clone(),
                vec![
                    "gateway".into(),
                    "--control".into(),
                    control_url.clone(),
                    "--addr".into(),
                    gateway_addrs[i].to_string(),
                    "--data-dir".into(),
                    dir(&format!("gateway-{region}")),
                    "--region".into(),
                    region.clone(),
                    "--health-interval-ms".into(),
                    "250".into(),
                    "--token-file".into(),
                    fleet_file.clone(),
                ]
                .into_iter()
                .chain(events_args.iter().cloned())
                .chain(tls_args.iter().cloned())
                .chain(grpc_args)
                .collect(),
                true,
                state.clone(),
                config.data_dir.clone(),
            );
            let addr = listening(&spawned, g.clone())
                .await
                .with_context(|| format!("the {region} gateway did not start"))?;
            gateways.push((region.clone(), format!("{scheme}://{addr}")));
            if let Some(a) = g.grpc_address() {
                grpc.push((region.clone(), a));
            }
        }
        state.lock().await.gateways = gateways.clone();
        state.lock().await.grpc = grpc.clone();
        child::write_state(&state, &config.data_dir).await;

        let seeded = seed(&client).await?;
        if seeded {
            tracing::info!("registry was empty: pushed and deployed the bundled digits model");
        }
        // Ready when a prediction goes through the first gateway and, for
        // the model just deployed, its rollout is over: one replica serving
        // it is enough for a prediction, and a `shoal deploy` of the next
        // version before the rollout ends is refused (409).
        let gateway = gateways[0].1.clone();
        let infer_url = format!("{gateway}/v2/models/digits/infer");
        let body = format!(
            r#"{{"inputs":[{{"name":"input","shape":[1,64],"datatype":"FP32","data":{SAMPLE_ZERO}}}]}}"#
        );
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        let probe = ApiClient::gateway(&gateway, None).with_timeout(Duration::from_secs(2));
        loop {
            if post_ok(&probe, &infer_url, &body).await
                && (!seeded
                    || client
                        .rollout("digits")
                        .await
                        .is_ok_and(|r| r.state.is_terminal()))
            {
                break;
            }
            if tokio::time::Instant::now() > deadline {
                bail!("the fleet did not become ready within 60 s; see the log above");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok::<_, anyhow::Error>((
            control_url,
            admin_file,
            gateways,
            grpc,
            infer_url,
            body,
            launcher,
            client,
        ))
    };
    let ready = tokio::select! {
        ready = startup => ready,
        () = &mut shutdown => {
            tracing::info!("stopping before the fleet was ready");
            stop_all(take(&spawned)).await;
            return Ok(());
        }
    };
    let (control_url, admin_file, gateways, grpc, infer_url, body, launcher, admin) = match ready {
        Ok(ready) => ready,
        Err(e) => {
            stop_all(take(&spawned)).await;
            return Err(e);
        }
    };
    let children: Vec<Arc<Supervised>> = spawned
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    let gateway = gateways[0].1.clone();
    let elapsed = started.elapsed();
    say!();
    let standby = if config.standby > 0 {
        format!(" and {} standby", config.standby)
    } else {
        String::new()
    };
    say!(
        "Shoal is up in {:.1}s: {} replica(s){standby} in {}.",
        elapsed.as_secs_f64(),
        config.replicas,
        config.regions.join(", ")
    );
    say!("  control plane  {control_url}   (shoal status, shoal model list)");
    if config.control_planes > 1 {
        say!(
            "                 {} members sharing {}: one leads, any answers; pass them all with --control",
            config.control_planes,
            config
                .registry
                .as_deref()
                .map_or("the registry".into(), redact_url)
        );
    }
    say!(
        "  admin token    {}   (the CLI reads .shoal/admin.token under its working directory; \
         elsewhere use --token-file)",
        admin_file.display()
    );
    for (region, url) in &gateways {
        say!("  gateway        {url}   ({region})");
    }
    for (region, addr) in &grpc {
        say!("  gateway gRPC   {addr}   ({region}; KServe v2, e.g. tritonclient.grpc)");
    }
    // As Jupyter does: a link that signs the browser in (the token leaves
    // the address bar at once, traded for a session cookie).
    match shoal_client::secret::read(&admin_file) {
        Ok(token) => {
            say!("  dashboard      {control_url}/?token={token}   (open in a browser)")
        }
        Err(_) => say!("  dashboard      {control_url}/   (sign in with the admin token)"),
    }
    say!();
    say!("Get a prediction:");
    let cacert = tls
        .as_ref()
        .map(|f| format!("--cacert {} ", f.ca.display()))
        .unwrap_or_default();
    say!("  curl -s {cacert}{infer_url} -H 'content-type: application/json' \\");
    say!("    -d '{body}'");
    if let Some(f) = &tls {
        say!();
        say!("Every member serves https with a local CA; for the CLI:");
        say!(
            "  export SHOAL_CONTROL={control_url} SHOAL_CA={}",
            f.ca.display()
        );
    }
    say!();
    say!("Press Ctrl-C to stop.");
    // Tests and tools read this line.
    say!("shoal up ready: gateway {gateway} control {control_url}");

    let chaos = config.chaos_per_minute.filter(|r| *r > 0.0).map(|rate| {
        let replicas: Vec<Arc<Supervised>> = children
            .iter()
            .filter(|c| c.name().starts_with("replica-"))
            .cloned()
            .collect();
        tokio::spawn(chaos_monkey(replicas, rate))
    });
    let autoscaler = config.autoscale.map(|max| {
        say!(
            "autoscale: following the control plane's desired replica count, {} to {max} replicas",
            config.replicas
        );
        let regions = config.regions.clone();
        let launch: autoscale::Launch = Box::new(move |name: &str| {
            let n: usize = name
                .trim_start_matches("replica-")
                .parse()
                .unwrap_or_default();
            launcher.spawn(name, &regions[n % regions.len()], false, false)
        });
        tokio::spawn(autoscale::run(
            admin,
            launch,
            config.replicas,
            max,
            spawned.clone(),
            config.data_dir.clone(),
        ))
    });
    shutdown.await;
    if let Some(c) = chaos {
        c.abort();
    }
    if let Some(a) = autoscaler {
        a.abort();
    }
    tracing::info!("stopping: gateways first, then replicas, then the control plane");
    // Gateways stop taking traffic first; replicas drain; the control plane last.
    drop(children);
    stop_all(take(&spawned)).await;
    state.lock().await.pids.clear();
    child::write_state(&state, &config.data_dir).await;
    Ok(())
}

/// Starts replica processes of the fleet, at start-up and for the
/// autoscaler.
struct ReplicaLauncher {
    exe: PathBuf,
    data_dir: PathBuf,
    control_url: String,
    fleet_file: String,
    /// Events, session store and TLS flags every replica gets.
    extra: Vec<String>,
    state: Arc<tokio::sync::Mutex<FleetState>>,
}

impl ReplicaLauncher {
    fn spawn(&self, name: &str, region: &str, standby: bool, spot: bool) -> Arc<Supervised> {
        let args: Vec<String> = [
            "replica",
            "--control",
            &self.control_url,
            "--addr",
            "127.0.0.1:0",
            "--data-dir",
            &self.data_dir.join(name).display().to_string(),
            "--region",
            region,
            "--poll-interval",
            "5",
            "--token-file",
            &self.fleet_file,
        ]
        .into_iter()
        .map(str::to_owned)
        .chain(standby.then(|| "--standby".to_owned()))
        .chain(
            spot.then(|| ["--tier".to_owned(), "spot".to_owned()])
                .into_iter()
                .flatten(),
        )
        .chain(self.extra.iter().cloned())
        .collect();
        Supervised::spawn(
            name.to_owned(),
            self.exe.clone(),
            args,
            false,
            self.state.clone(),
            self.data_dir.clone(),
        )
    }
}

async fn post_ok(client: &ApiClient, url: &str, body: &str) -> bool {
    let path = url.trim_start_matches(client.base());
    client.post_json_raw(path, body.to_owned()).await.is_ok()
}

/// Kills a random replica now and then (exponential inter-arrival at
/// `rate` per minute), logging each kill; supervision brings it back.
async fn chaos_monkey(replicas: Vec<Arc<Supervised>>, rate: f64) {
    use rand::Rng;
    loop {
        let u: f64 = rand::rng().random_range(f64::EPSILON..1.0);
        let wait = Duration::from_secs_f64(-u.ln() * 60.0 / rate);
        tokio::time::sleep(wait).await;
        let i = rand::rng().random_range(0..replicas.len());
        if let Some(pid) = replicas[i].kill() {
            tracing::warn!(
                replica = replicas[i].name(),
                pid,
                "chaos monkey: killed replica (SIGKILL)"
            );
            say!("chaos: killed {} (pid {pid})", replicas[i].name());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn up(control_planes: usize, registry: Option<&str>) -> UpConfig {
        UpConfig {
            exe: PathBuf::from("shoal"),
            data_dir: PathBuf::from(".shoal"),
            replicas: 3,
            standby: 0,
            regions: vec!["local".into()],
            gateway_addr: SocketAddr::from(([127, 0, 0, 1], 8080)),
            grpc_addr: None,
            control_addr: SocketAddr::from(([127, 0, 0, 1], 8081)),
            chaos_per_minute: None,
            tls: false,
            control_planes,
            registry: registry.map(str::to_owned),
            events: None,
            session_store: None,
            spot: 0,
            autoscale: None,
            control_args: Vec::new(),
            replica_args: Vec::new(),
        }
    }

    #[test]
    fn several_control_planes_need_a_registry_they_share() {
        assert!(up(1, None).check().is_ok());
        let err = up(3, None).check().unwrap_err().to_string();
        assert!(
            err.contains("--control-planes 3") && err.contains("--registry postgres://"),
            "{err}"
        );
        assert!(up(3, Some("sqlite")).check().is_err());
        assert!(up(3, Some("postgres://shoal@db/shoal")).check().is_ok());
    }

    #[test]
    fn spot_and_autoscale_bounds_are_checked() {
        let mut config = up(1, None);
        config.spot = 4;
        let err = config.check().unwrap_err().to_string();
        assert!(
            err.contains("--spot 4 is more than the 3 replicas"),
            "{err}"
        );
        config.spot = 3;
        assert!(config.check().is_ok());
        config.autoscale = Some(2);
        let err = config.check().unwrap_err().to_string();
        assert!(
            err.contains("--max-replicas 2 is below --replicas 3"),
            "{err}"
        );
        config.autoscale = Some(3);
        assert!(config.check().is_ok());
    }

    #[test]
    fn printed_registry_urls_lose_their_password() {
        assert_eq!(
            redact_url("postgres://shoal:secret@db:5432/shoal"),
            "postgres://shoal@db:5432/shoal"
        );
        assert_eq!(redact_url("postgres://db/shoal"), "postgres://db/shoal");
    }

    #[test]
    fn regions_gateways_never_take_the_control_planes_port() {
        let addr = |s: &str| s.parse::<SocketAddr>().unwrap();
        let ports = |first, control, n| {
            gateway_addrs(addr(first), addr(control), n)
                .iter()
                .map(SocketAddr::port)
                .collect::<Vec<_>>()
        };
        // The defaults: 8080, then 8082 around the control plane's 8081.
        assert_eq!(
            ports("127.0.0.1:8080", "127.0.0.1:8081", 3),
            [8080, 8082, 8083]
        );
        assert_eq!(ports("0.0.0.0:8080", "127.0.0.1:8081", 2), [8080, 8082]);
        assert_eq!(ports("127.0.0.1:9000", "127.0.0.1:8081", 2), [9000, 9001]);
        assert_eq!(ports("127.0.0.1:0", "127.0.0.1:0", 2), [0, 0]);
        // gRPC ports skip every REST gateway's and the control plane's.
        let taken = [
            addr("127.0.0.1:8080"),
            addr("127.0.0.1:8082"),
            addr("127.0.0.1:8081"),
        ];
        let grpc: Vec<u16> = spread(addr("127.0.0.1:8080"), &taken, 2)
            .iter()
            .map(SocketAddr::port)
            .collect();
        assert_eq!(grpc, [8083, 8084]);
    }
}

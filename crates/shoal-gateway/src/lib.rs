//! Shoal's gateway: the Open Inference Protocol front door.
//!
//! - [`routes`]: the routing state — endpoints (replicas) with what they
//!   serve, their load and health, and each model's traffic policy — and
//!   the choice of version and replica for one request.
//! - [`discovery`]: where endpoints and policies come from: the control
//!   plane's routing watch stream (the last table is kept on disk, so a
//!   gateway restarted while the control plane is down still routes), or a
//!   static list of replicas.
//! - [`health`]: active checks of every endpoint, which also learn what
//!   each replica really serves.
//! - [`proxy`]: forwarding with timeouts, retries on another replica within
//!   a budget, hedging, shadow mirroring.
//! - [`protect`]: API keys, rate limits per key, payload logging with
//!   personal data redacted.
//!
//! Architecture invariant: the gateway keeps no state that another gateway
//! needs; any number run side by side. It never waits on the control plane
//! to answer a request.

pub mod discovery;
pub mod grpc;
pub mod health;
pub mod homes;
mod learn;
mod metrics;
mod policy;
pub mod protect;
pub mod proxy;
pub mod routes;
mod upstream;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use shoal_balance::health::HealthPolicy;
use shoal_telemetry::MetricsRegistry;

use crate::metrics::GatewayMetrics;
use crate::protect::Protection;
use crate::routes::Routes;

/// Settings of a gateway.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// Gateway id in reports [default: gateway-PORT].
    pub id: Option<String>,
    /// Address to listen on.
    pub addr: SocketAddr,
    /// Address to serve the Open Inference Protocol's gRPC service on
    /// (port 0: any free port); none: REST only.
    pub grpc_addr: Option<SocketAddr>,
    /// Directory for the last known routing table.
    pub data_dir: PathBuf,
    /// This gateway's region: replicas there are preferred.
    pub region: String,
    /// Control plane to follow; `None` with `static_replicas`.
    pub control: Option<String>,
    /// Bearer token for the control plane.
    pub token: Option<String>,
    /// NATS server (`nats://HOST:PORT`) to follow routing tables on instead
    /// of the control plane's watch stream.
    pub events: Option<String>,
    /// Replicas to route to without a control plane (`host:port`).
    pub static_replicas: Vec<String>,
    /// Time allowed for one attempt.
    pub request_timeout: Duration,
    /// Time allowed to connect to a replica.
    pub connect_timeout: Duration,
    /// Interval of active health checks.
    pub health_interval: Duration,
    /// Retries allowed on top of requests (0.2 = 20 %).
    pub retry_ratio: f32,
    /// Retries always allowed per second.
    pub retry_min_per_sec: u32,
    /// Send a second request after the model's observed p95.
    pub hedge: bool,
    /// How to choose among healthy replicas.
    pub balance: routes::Balance,
    /// Header that keeps a user on one version (default for every model).
    pub split_header: String,
    /// Header that keeps a session on one replica.
    pub session_header: String,
    /// Largest request body accepted.
    pub body_limit: usize,
    /// Outlier ejection settings.
    pub health_policy: HealthPolicy,
    /// API keys and rate limits.
    pub protection: protect::ProtectionConfig,
    /// Serve over TLS.
    pub tls: Option<shoal_http::tls::ServerTls>,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            id: None,
            addr: SocketAddr::from(([127, 0, 0, 1], 8080)),
            grpc_addr: None,
            data_dir: PathBuf::from(".shoal/gateway"),
            region: "default".into(),
            control: None,
            token: None,
            events: None,
            static_replicas: Vec::new(),
            request_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_millis(500),
            health_interval: Duration::from_millis(500),
            retry_ratio: 0.2,
            retry_min_per_sec: 10,
            hedge: false,
            balance: routes::Balance::PeakEwma,
            split_header: "x-user-id".into(),
            session_header: "x-session-id".into(),
            body_limit: 16 << 20,
            health_policy: HealthPolicy::default(),
            protection: protect::ProtectionConfig::default(),
            tls: None,
        }
    }
}

pub(crate) type UpstreamClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

/// The gateway's state.
pub struct Gateway {
    id: String,
    config: GatewayConfig,
    learning: learn::Learning,
    routes: Routes,
    client: UpstreamClient,
    /// `config.split_header` and `config.session_header`, parsed once.
    split_header: http::HeaderName,
    session_header: http::HeaderName,
    budget: tower::retry::budget::TpsBudget,
    protection: Protection,
    registry: MetricsRegistry,
    metrics: GatewayMetrics,
    latencies: policy::LatencyWindows,
    homes: homes::Homes,
    epoch: tokio::time::Instant,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("region", &self.config.region)
            .finish_non_exhaustive()
    }
}

impl Gateway {
    /// A gateway with no endpoints yet.
    pub fn new(config: GatewayConfig) -> Result<Arc<Gateway>, String> {
        let id = config
            .id
            .clone()
            .unwrap_or_else(|| format!("gateway-{}", config.addr.port()));
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(config.connect_timeout));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(256)
            .build(shoal_client::tls::connector(connector));
        let header_name = |name: &str, what: &str| {
            http::HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| format!("the {what} header {name:?} is not a valid header name"))
        };
        let split_header = header_name(&config.split_header, "split")?;
        let session_header = header_name(&config.session_header, "session")?;
        let registry = MetricsRegistry::new();
        let metrics = GatewayMetrics::new(&registry);
        shoal_http::limit::connections().register(&registry);
        let protection = Protection::new(&config.protection)?;
        Ok(Arc::new(Gateway {
            budget: tower::retry::budget::TpsBudget::new(
                Duration::from_secs(10),
                config.retry_min_per_sec,
                config.retry_ratio,
            ),
            id,
            learning: learn::Learning::default(),
            routes: Routes::new(config.region.clone(), config.health_policy)
                .with_balance(config.balance),
            config,
            client,
            split_header,
            session_header,
            protection,
            registry,
            metrics,
            latencies: policy::LatencyWindows::default(),
            homes: homes::Homes::default(),
            epoch: tokio::time::Instant::now(),
        }))
    }

    /// Time since the gateway started: the clock of the balancing code.
    pub(crate) fn now(&self) -> Duration {
        self.epoch.elapsed()
    }

    /// [`Gateway::now`] at `instant`, for a caller that read the clock
    /// already.
    pub(crate) fn at(&self, instant: tokio::time::Instant) -> Duration {
        instant.saturating_duration_since(self.epoch)
    }

    /// The routing state.
    pub fn routes(&self) -> &Routes {
        &self.routes
    }

    /// Metrics in Prometheus text format.
    pub fn encode_metrics(&self) -> String {
        self.metrics.update_endpoints(&self.routes, self.now());
        self.registry.encode()
    }
}

/// A running gateway.
#[derive(Debug)]
pub struct GatewayServer {
    /// The address it listens on.
    pub addr: SocketAddr,
    /// The address its gRPC service listens on, when it has one.
    pub grpc_addr: Option<SocketAddr>,
    /// Its state.
    pub gateway: Arc<Gateway>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
    background: Vec<tokio::task::JoinHandle<()>>,
}

impl GatewayServer {
    /// Binds, starts discovery and health checks, and serves.
    pub async fn start(config: GatewayConfig) -> std::io::Result<GatewayServer> {
        let tls = config
            .tls
            .as_ref()
            .map(shoal_http::tls::ServerTls::config)
            .transpose()
            .map_err(std::io::Error::other)?;
        let listener = shoal_http::bind(config.addr).await?;
        let addr = listener.local_addr()?;
        let config = GatewayConfig {
            id: config
                .id
                .clone()
                .or_else(|| Some(format!("gateway-{}", addr.port()))),
            ..config
        };
        let gateway = Gateway::new(config).map_err(std::io::Error::other)?;
        discovery::load_saved(&gateway).await;
        let background = vec![
            shoal_http::supervise("routing discovery", {
                let g = gateway.clone();
                move || discovery::run(g.clone())
            }),
            shoal_http::supervise("health checks", {
                let g = gateway.clone();
                move || health::run(g.clone())
            }),
            shoal_http::supervise("traffic reports", {
                let g = gateway.clone();
                move || learn::report_loop(g.clone())
            }),
        ];
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let router = proxy::router(gateway.clone());
        // gRPC stops when REST is told to.
        let (grpc, stop_grpc) = match gateway.config.grpc_addr {
            None => (None, None),
            Some(grpc_addr) => {
                let (grpc, stop) = shoal_grpc::Beside::start(
                    shoal_http::bind(grpc_addr).await?,
                    gateway.config.tls.as_ref(),
                    grpc::GrpcGateway::service(gateway.clone()),
                )?;
                (Some(grpc), Some(stop))
            }
        };
        let grpc_addr = grpc.as_ref().map(|g| g.addr);
        let served = shoal_http::serve_with_peers(
            listener,
            router,
            Some(proxy::front(gateway.clone())),
            async move {
                let _ = rx.await;
                if let Some(stop) = stop_grpc {
                    stop.stop();
                }
            },
            tls,
        );
        let task = tokio::spawn(async move {
            let rest = served.await;
            if let Some(grpc) = grpc {
                grpc.join().await?;
            }
            rest
        });
        Ok(GatewayServer {
            addr,
            grpc_addr,
            gateway,
            shutdown: Some(tx),
            task,
            background,
        })
    }

    /// Stops serving and waits.
    pub async fn stop(mut self) -> std::io::Result<()> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        for b in &self.background {
            b.abort();
        }
        self.join().await
    }

    /// Waits for the server task to end. Call at most once.
    pub async fn join(&mut self) -> std::io::Result<()> {
        (&mut self.task)
            .await
            .map_err(|e| std::io::Error::other(e.to_string()))?
    }
}

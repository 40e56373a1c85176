//! Command-line definitions (clap) and dispatch to the role crates.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::cmd;

/// Shoal keeps machine-learning models available everywhere, all the time.
#[derive(Debug, Parser)]
#[command(name = "shoal", version, about)]
pub(crate) struct Cli {
    /// Log as JSON lines instead of text.
    #[arg(long, global = true, env = "SHOAL_LOG_JSON")]
    log_json: bool,

    #[command(flatten)]
    pub(crate) global: Global,

    #[command(subcommand)]
    command: Command,
}

/// Options every client command takes.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct Global {
    /// The control plane [default: http://127.0.0.1:8081]. A replica syncs
    /// with it when given; without it, a replica serves its --model files.
    #[arg(long, global = true, env = "SHOAL_CONTROL")]
    pub(crate) control: Option<String>,
    /// Bearer token for the control plane [default: the file given with
    /// --token-file, else .shoal/admin.token under the working directory
    /// for client commands].
    #[arg(long, global = true, env = "SHOAL_TOKEN", hide_env_values = true)]
    pub(crate) token: Option<String>,
    /// Read the bearer token from this file (e.g. a fleet token for
    /// replicas and gateways), so it is not on the command line.
    #[arg(long, global = true, env = "SHOAL_TOKEN_FILE")]
    pub(crate) token_file: Option<std::path::PathBuf>,
    /// Machine-readable JSON output.
    #[arg(long, global = true)]
    pub(crate) json: bool,
    /// Trust these PEM CA certificates for https:// (control plane,
    /// replicas, peers, gateways) instead of the system's roots.
    #[arg(long, global = true, env = "SHOAL_CA")]
    pub(crate) ca: Option<std::path::PathBuf>,
    /// Present this PEM client certificate to https:// servers that ask
    /// for one (mutual TLS between fleet members).
    #[arg(
        long,
        global = true,
        env = "SHOAL_CLIENT_CERT",
        requires = "client_key"
    )]
    pub(crate) client_cert: Option<std::path::PathBuf>,
    /// The client certificate's PEM private key.
    #[arg(
        long,
        global = true,
        env = "SHOAL_CLIENT_KEY",
        requires = "client_cert"
    )]
    pub(crate) client_key: Option<std::path::PathBuf>,
}

/// TLS for a role's own server (`shoal control|replica|gateway`).
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct ServeTls {
    /// Serve https with this PEM certificate chain (leaf first).
    #[arg(long, env = "SHOAL_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<std::path::PathBuf>,
    /// The certificate's PEM private key.
    #[arg(long, env = "SHOAL_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<std::path::PathBuf>,
    /// Require clients to present a certificate signed by --ca (mutual
    /// TLS between fleet members).
    #[arg(long, requires = "tls_cert")]
    require_client_cert: bool,
}

impl ServeTls {
    /// The server's TLS files, if it serves https.
    pub(crate) fn server(
        &self,
        global: &Global,
    ) -> anyhow::Result<Option<shoal_http::tls::ServerTls>> {
        let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) else {
            return Ok(None);
        };
        let client_ca = match (self.require_client_cert, &global.ca) {
            (false, _) => None,
            (true, Some(ca)) => Some(ca.clone()),
            (true, None) => anyhow::bail!(
                "--require-client-cert needs --ca: the CA that signs the clients' certificates"
            ),
        };
        Ok(Some(shoal_http::tls::ServerTls {
            cert: cert.clone(),
            key: key.clone(),
            client_ca,
        }))
    }

    /// `https` when serving TLS, else `http`.
    pub(crate) fn scheme(&self) -> &'static str {
        if self.tls_cert.is_some() {
            "https"
        } else {
            "http"
        }
    }
}

/// How many connections a role's servers hold (`shoal control|replica|gateway`).
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct ServeConnections {
    /// Most connections this process's servers (REST and gRPC) hold at
    /// once; at the cap, idle keep-alive connections close to make room
    /// for new ones, which otherwise wait to be accepted until one closes
    /// [default: half the open-file limit, which is first raised to its
    /// hard limit]
    #[arg(long, env = "SHOAL_MAX_CONNECTIONS", value_parser = clap::value_parser!(u64).range(1..))]
    max_connections: Option<u64>,
}

impl ServeConnections {
    /// Raises the open-file limit and sets the connection cap, before any
    /// server starts.
    pub(crate) fn apply(&self) -> anyhow::Result<()> {
        let files = shoal_http::limit::raise_open_files()
            .inspect_err(
                |e| tracing::warn!(error = %e, "cannot raise the open-file limit; keeping it"),
            )
            .or_else(|_| shoal_http::limit::open_files())
            .ok();
        if let Some(max) = self.max_connections {
            let max = usize::try_from(max).unwrap_or(usize::MAX);
            if let Err(set) = shoal_http::limit::set_max_connections(max) {
                anyhow::bail!("the connection cap was already set to {set}");
            }
        }
        // Unset, the cap defaults to half the (now raised) limit.
        let max = shoal_http::limit::max_connections();
        if let Some(files) = files
            && u64::try_from(max).unwrap_or(u64::MAX) > files.soft
        {
            tracing::warn!(
                max_connections = max,
                open_files = files.soft,
                "--max-connections is above the open-file limit: connections may fail for \
                 want of descriptors before the cap is reached; raise the limit (ulimit -n)"
            );
        }
        tracing::debug!(max_connections = max, open_files = ?files, "connection cap set");
        Ok(())
    }
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a whole fleet on this machine: control plane, gateway, replicas, demo model.
    Up(cmd::up::UpArgs),
    /// Run the control plane: registry, artifacts, rollouts, API.
    Control(cmd::control::ControlArgs),
    /// Run a replica: serve ONNX models over the Open Inference Protocol v2.
    Replica(cmd::replica::ReplicaArgs),
    /// Run a gateway: route inference to healthy replicas.
    Gateway(cmd::gateway::GatewayArgs),
    /// Models and versions in the registry.
    #[command(subcommand)]
    Model(cmd::client::ModelCommand),
    /// Deploy a version: `shoal deploy NAME:VERSION`.
    Deploy(cmd::client::DeployArgs),
    /// Set a model's traffic by hand: weights, shadow share, split header.
    Traffic(cmd::client::TrafficArgs),
    /// Roll a model back to its last known good version.
    Rollback(cmd::client::RollbackArgs),
    /// Rollouts in progress.
    #[command(subcommand)]
    Rollout(cmd::client::RolloutCommand),
    /// How many replicas serve a model (`--replicas N`, or `--min N --max M`
    /// autoscaled), and `status`: its placement and the autoscaler's view.
    Scale(cmd::scale::ScaleArgs),
    /// The fleet: every replica, what it serves and what it should.
    Status,
    /// API tokens: create (shown once), list, revoke. Needs an admin token.
    #[command(subcommand)]
    Token(cmd::client::TokenCommand),
    /// Back up the control plane (registry and artifacts) to a directory or
    /// S3; `list` and `verify` read backups. Needs an admin token.
    Backup(cmd::backup::BackupArgs),
    /// Rebuild a control plane's data directory (or database) from a backup.
    Restore(cmd::backup::RestoreArgs),
    /// A disaster drill on a `shoal up` fleet under load: kills or hangs a
    /// replica, kills a region, the control plane or a gateway, and
    /// measures RTO and RPO.
    Drill(cmd::drill::DrillArgs),
    /// Benchmarks, side by side with reference systems (see BENCHMARKS.md).
    #[cfg_attr(feature = "bench", command(subcommand))]
    Bench(cmd::bench::BenchCommand),
}

pub(crate) fn main() -> ExitCode {
    let cli = Cli::parse();
    shoal_telemetry::init_logging(cli.log_json);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let global = cli.global.clone();
    let client_tls = shoal_client::tls::ClientTls {
        ca: global.ca.clone(),
        cert: global.client_cert.clone(),
        key: global.client_key.clone(),
    };
    if client_tls != shoal_client::tls::ClientTls::default()
        && let Err(e) = shoal_client::tls::configure(&client_tls)
    {
        eprintln!("error: {e}");
        return ExitCode::FAILURE;
    }
    let result = runtime.block_on(async move {
        cmd::exit_with_parent();
        match cli.command {
            Command::Up(args) => cmd::up::run(args).await,
            Command::Control(args) => cmd::control::run(args, &global).await,
            Command::Replica(args) => cmd::replica::run(args, &global).await,
            Command::Gateway(args) => cmd::gateway::run(args, &global).await,
            Command::Traffic(a) => cmd::client::traffic(a, &global).await,
            Command::Model(c) => cmd::client::model(c, &global).await,
            Command::Deploy(a) => cmd::client::deploy(a, &global).await,
            Command::Rollback(a) => cmd::client::rollback(a, &global).await,
            Command::Rollout(c) => cmd::client::rollout(c, &global).await,
            Command::Scale(args) => cmd::scale::run(args, &global).await,
            Command::Status => cmd::client::status(&global).await,
            Command::Token(c) => cmd::client::token(c, &global).await,
            Command::Backup(args) => cmd::backup::backup(args, &global).await,
            Command::Restore(args) => cmd::backup::restore(args, &global).await,
            Command::Drill(args) => cmd::drill::run(args, &global).await,
            Command::Bench(c) => cmd::bench::run(c, global.json).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Where `shoal up` and a control plane started in the working directory
/// leave the admin token, relative to it.
pub(crate) const LOCAL_ADMIN_TOKEN: &str = ".shoal/admin.token";

impl Global {
    /// The token a role (replica, gateway) presents: `--token`, else the
    /// contents of `--token-file`.
    pub(crate) fn role_token(&self) -> anyhow::Result<Option<String>> {
        if let Some(token) = &self.token {
            return Ok(Some(token.clone()));
        }
        self.token_file
            .as_deref()
            .map(shoal_client::secret::read)
            .transpose()
            .map_err(Into::into)
    }

    /// The token a client command presents: as [`Global::role_token`],
    /// else `.shoal/admin.token` under the working directory when it
    /// exists (what `shoal up` writes), so the tour needs no extra step.
    pub(crate) fn client_token(&self) -> anyhow::Result<Option<String>> {
        if let Some(token) = self.role_token()? {
            return Ok(Some(token));
        }
        let local = std::path::Path::new(LOCAL_ADMIN_TOKEN);
        if local.is_file() {
            return Ok(Some(shoal_client::secret::read(local)?));
        }
        Ok(None)
    }

    /// The control plane URL, defaulted.
    pub(crate) fn control_url(&self) -> String {
        self.control
            .clone()
            .unwrap_or_else(|| "http://127.0.0.1:8081".to_owned())
    }
}

/// `--events`: a NATS URL, checked before anything starts.
pub(crate) fn events_url(s: &str) -> Result<String, String> {
    shoal_events::check_url(s)
        .map(|()| s.to_owned())
        .map_err(|e| e.to_string())
}

/// `--session-store`: `memory` or a Redis URL.
pub(crate) fn session_store_url(s: &str) -> Result<String, String> {
    if s == "memory" || s.starts_with("redis://") {
        Ok(s.to_owned())
    } else {
        Err(format!("{s:?}: expected memory or redis://HOST:PORT[/DB]"))
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent() {
        super::Cli::command().debug_assert();
    }
}

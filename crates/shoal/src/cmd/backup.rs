//! `shoal backup` (taken by the control plane, through its API), `shoal
//! backup list|verify` and `shoal restore` (run here, on the destination
//! directly: they need no control plane).

use shoal_telemetry::say;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use futures::StreamExt;
use indicatif::{HumanBytes, ProgressBar, ProgressStyle};
use shoal_api::backup::{BackupEvent, BackupPhase, BackupProgress, BackupRecord};
use shoal_backup::Destination;
use shoal_client::ApiClient;

use super::client::print_json;
use crate::cli::Global;

#[derive(Debug, clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub(crate) struct BackupArgs {
    #[command(subcommand)]
    command: Option<BackupCommand>,
    /// Take a backup to this destination, as the control plane sees it: a
    /// directory (new, empty, or holding earlier backups) or
    /// s3://bucket/prefix. Chunks already there are not copied again.
    #[arg(long, value_name = "DIR|s3://BUCKET/PREFIX")]
    to: Option<String>,
}

#[derive(Debug, clap::Subcommand)]
pub(crate) enum BackupCommand {
    /// The backups at a destination, oldest first.
    List {
        /// The destination: a directory or s3://bucket/prefix.
        #[arg(long, value_name = "DIR|s3://BUCKET/PREFIX")]
        from: String,
    },
    /// Read a backup back and check every hash (snapshot, chunks, artifacts) without restoring it.
    Verify {
        /// The destination: a directory or s3://bucket/prefix.
        #[arg(long, value_name = "DIR|s3://BUCKET/PREFIX")]
        from: String,
        /// Which backup [default: the newest].
        #[arg(long)]
        id: Option<String>,
    },
}

#[derive(Debug, clap::Args)]
pub(crate) struct RestoreArgs {
    /// Where the backups are: a directory or s3://bucket/prefix.
    #[arg(long, value_name = "DIR|s3://BUCKET/PREFIX")]
    from: String,
    /// Which backup [default: the newest].
    #[arg(long)]
    id: Option<String>,
    /// The data directory of the control plane to rebuild; its registry
    /// must be empty.
    #[arg(long, default_value = ".shoal/control", env = "SHOAL_DATA_DIR")]
    data_dir: PathBuf,
    /// The registry to restore into: sqlite (in DATA_DIR), sqlite:///path,
    /// or postgres://… (an empty database).
    #[arg(long, env = "SHOAL_REGISTRY")]
    registry: Option<String>,
    /// The artifact store to restore into [default: DATA_DIR/artifacts].
    #[arg(long, env = "SHOAL_ARTIFACT_STORE")]
    artifact_store: Option<String>,
}

fn bar(global: &Global, what: &str) -> ProgressBar {
    let bar = if global.json {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(0)
    };
    bar.set_style(
        ProgressStyle::with_template(&format!(
            "{what} {{bar:30}} {{bytes}}/{{total_bytes}} {{bytes_per_sec}} {{eta}}"
        ))
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar
}

fn show(bar: &ProgressBar, p: BackupProgress) {
    bar.set_length(p.total);
    bar.set_position(p.done);
}

pub(crate) async fn backup(args: BackupArgs, global: &Global) -> anyhow::Result<()> {
    match (args.command, args.to) {
        (Some(BackupCommand::List { from }), _) => list(&from, global).await,
        (Some(BackupCommand::Verify { from, id }), _) => verify(&from, id.as_deref(), global).await,
        (None, Some(to)) => take(&to, global).await,
        (None, None) => anyhow::bail!(
            "say where: `shoal backup --to DIR` takes a backup; `shoal backup list --from DIR` \
             and `shoal backup verify --from DIR` read them"
        ),
    }
}

async fn take(to: &str, global: &Global) -> anyhow::Result<()> {
    let client = ApiClient::control(&global.control_url(), global.client_token()?)
        .with_timeout(Duration::from_secs(30));
    let mut events = std::pin::pin!(client.backup(to).await?);
    let bar = bar(global, "copying");
    let mut record = None;
    while let Some(event) = events.next().await {
        match event? {
            BackupEvent::Progress(p) => show(&bar, p),
            BackupEvent::Done(r) => record = Some(*r),
            BackupEvent::Error(e) => {
                bar.finish_and_clear();
                anyhow::bail!("the backup failed: {e}");
            }
        }
    }
    bar.finish_and_clear();
    let record = record.context(
        "the control plane closed the connection before the backup finished; it goes on \
         there, see its log and `shoal backup list --from …`",
    )?;
    if global.json {
        return print_json(&record);
    }
    print_record(&record, to);
    Ok(())
}

fn print_record(record: &BackupRecord, to: &str) {
    let c = &record.counts;
    let mut t = super::client::table(&["backup", &record.id]);
    t.add_row(vec!["taken".to_owned(), super::when(record.created_at)]);
    t.add_row(vec!["at".to_owned(), to.to_owned()]);
    t.add_row(vec!["revision".to_owned(), record.revision.to_string()]);
    t.add_row(vec![
        "registry".to_owned(),
        format!(
            "{} models, {} versions, {} deployments, {} replicas, {} tokens, {} audit entries",
            c.models, c.versions, c.deployments, c.replicas, c.tokens, c.audit
        ),
    ]);
    t.add_row(vec![
        "artifacts".to_owned(),
        format!(
            "{} ({}), {} chunks ({} stored)",
            record.artifacts.len(),
            HumanBytes(record.artifact_bytes),
            record.chunks,
            HumanBytes(record.chunk_bytes)
        ),
    ]);
    let rest = if record.copied_chunks == record.chunks {
        "all of them: the first backup here"
    } else {
        "the rest were there from earlier backups"
    };
    t.add_row(vec![
        "copied".to_owned(),
        format!(
            "{} chunks ({}); {rest}",
            record.copied_chunks,
            HumanBytes(record.copied_bytes)
        ),
    ]);
    t.add_row(vec![
        "took".to_owned(),
        format!("{:.1} s", record.duration_ms as f64 / 1000.0),
    ]);
    say!("{t}");
}

async fn list(from: &str, global: &Global) -> anyhow::Result<()> {
    let dest = Destination::open(from)?;
    let records = shoal_backup::list(&dest).await?;
    if global.json {
        return print_json(&records);
    }
    if records.is_empty() {
        say!("no backups at {from}; take one with `shoal backup --to {from}`");
        return Ok(());
    }
    let mut t = super::client::table(&[
        "ID",
        "TAKEN",
        "REVISION",
        "VERSIONS",
        "ARTIFACTS",
        "SIZE",
        "COPIED",
    ]);
    for r in &records {
        t.add_row(vec![
            r.id.clone(),
            super::when(r.created_at),
            r.revision.to_string(),
            r.counts.versions.to_string(),
            r.artifacts.len().to_string(),
            HumanBytes(r.artifact_bytes).to_string(),
            HumanBytes(r.copied_bytes).to_string(),
        ]);
    }
    say!("{t}");
    Ok(())
}

async fn verify(from: &str, id: Option<&str>, global: &Global) -> anyhow::Result<()> {
    let dest = Destination::open(from)?;
    let bar = bar(global, "verifying");
    let shown = bar.clone();
    let checked = shoal_backup::verify(&dest, id, &move |p| show(&shown, p)).await;
    bar.finish_and_clear();
    let checked = checked?;
    if global.json {
        return print_json(&checked);
    }
    say!(
        "backup {} (revision {}) is sound: {} artifacts ({}) reassembled to their SHA-256, {} chunks checked, in {:.1} s",
        checked.id,
        checked.revision,
        checked.artifacts,
        HumanBytes(checked.bytes),
        checked.chunks,
        checked.duration_ms as f64 / 1000.0
    );
    Ok(())
}

pub(crate) async fn restore(args: RestoreArgs, global: &Global) -> anyhow::Result<()> {
    let dest = Destination::open(&args.from)?;
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("cannot create {}", args.data_dir.display()))?;
    let registry = shoal_control::open_registry(args.registry.as_deref(), &args.data_dir).await?;
    let artifacts =
        shoal_control::open_artifacts(args.artifact_store.as_deref(), &args.data_dir).await?;
    let bar = bar(global, "restoring");
    let shown = bar.clone();
    let restored = shoal_backup::restore(
        &dest,
        args.id.as_deref(),
        registry.as_ref(),
        &artifacts,
        &move |p| {
            if p.phase == BackupPhase::Restoring {
                show(&shown, p);
            }
        },
    )
    .await;
    bar.finish_and_clear();
    let restored = restored?;
    if global.json {
        return print_json(&restored);
    }
    say!(
        "restored backup {} (revision {}) into {}: {} artifacts ({}) checked by SHA-256, {} chunks",
        restored.id,
        restored.revision,
        args.data_dir.display(),
        restored.artifacts,
        HumanBytes(restored.bytes),
        restored.chunks
    );
    say!(
        "start it with: shoal control --data-dir {}{}",
        args.data_dir.display(),
        args.registry
            .as_deref()
            .map(|r| format!(" --registry {r}"))
            .unwrap_or_default()
    );
    Ok(())
}

//! Backup and restore of a control plane holding many versions of a model,
//! against `tar` + `zstd` of the same data directory, alternating rounds:
//! a full backup to an empty destination against `tar -I zstd -cf`, a
//! restore into an empty data directory (every chunk and SHA-256 checked)
//! against `tar -xf`, and what one more version costs each: Shoal copies
//! only its new chunks, tar starts again. Dirty pages are flushed before
//! each timed step, so none pays for the previous one's writes.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::Context;
use serde::Serialize;

use crate::fleet::{Fleet, make_model};
use crate::stats::median;

/// What the backup benchmark measured.
#[derive(Debug, Clone, Serialize)]
pub struct BackupBench {
    /// Versions in the registry.
    pub versions: usize,
    /// Sum of their artifact sizes.
    pub artifact_bytes: u64,
    /// Size of the control plane's data directory.
    pub data_dir_bytes: u64,
    /// Full backup, per round (s).
    pub backup_s: Vec<f64>,
    /// `tar -I zstd -cf` of the data directory, per round (s).
    pub tar_s: Vec<f64>,
    /// Restore into an empty data directory, per round (s).
    pub restore_s: Vec<f64>,
    /// `tar -xf` of that archive, per round (s).
    pub untar_s: Vec<f64>,
    /// `shoal backup verify` of the full backup (s), once.
    pub verify_s: f64,
    /// Bytes at the backup destination after a full backup.
    pub backup_bytes: u64,
    /// Size of the tar archive.
    pub tar_bytes: u64,
    /// Backup after one more version: seconds and bytes copied.
    pub incremental_s: f64,
    /// Bytes the incremental backup copied.
    pub incremental_bytes: u64,
    /// Median backup throughput, artifact MiB/s.
    pub backup_mib_s: f64,
    /// Median tar throughput, artifact MiB/s.
    pub tar_mib_s: f64,
}

fn du(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            match entry.metadata() {
                Ok(m) if m.is_dir() => stack.push(entry.path()),
                Ok(m) => total += m.len(),
                Err(_) => {}
            }
        }
    }
    total
}

/// Flushes dirty pages, so no timed step pays for the previous one's
/// writes.
fn settle() {
    let _ = Command::new("sync").status();
}

fn timed(what: &str, mut command: Command) -> anyhow::Result<f64> {
    settle();
    let started = Instant::now();
    let status = command
        .status()
        .with_context(|| format!("run {what} (scripts/setup-bench installs it)"))?;
    anyhow::ensure!(status.success(), "{what} failed: {status}");
    Ok(started.elapsed().as_secs_f64())
}

/// Pushes `versions` versions of a `size_mb`-MiB model (each trained
/// anew: no chunk shared) and runs `rounds` alternating rounds.
pub async fn run(
    versions: usize,
    size_mb: usize,
    rounds: usize,
    dir: &Path,
) -> anyhow::Result<BackupBench> {
    std::fs::create_dir_all(dir)?;
    let fleet = Fleet::start(0, &dir.join("fleet")).await?;
    let control = fleet
        .control()
        .context("the backup bench runs its control plane in process")?
        .clone();
    let model = dir.join("model.onnx");
    let mut artifact_bytes = 0;
    for i in 0..versions {
        make_model(&model, size_mb, 9000 + i as u64, None)?;
        artifact_bytes += std::fs::metadata(&model)?.len();
        fleet.push("big", &model).await?;
        eprint!("\rpushed {}/{versions}", i + 1);
    }
    eprintln!();
    let data_dir = dir.join("fleet").join("control");
    let data_dir_bytes = du(&data_dir);

    let mut bench = BackupBench {
        versions,
        artifact_bytes,
        data_dir_bytes,
        backup_s: Vec::new(),
        tar_s: Vec::new(),
        restore_s: Vec::new(),
        untar_s: Vec::new(),
        verify_s: 0.0,
        backup_bytes: 0,
        tar_bytes: 0,
        incremental_s: 0.0,
        incremental_bytes: 0,
        backup_mib_s: 0.0,
        tar_mib_s: 0.0,
    };
    let dest_dir = dir.join("backup");
    let archive = dir.join("data.tar.zst");
    for round in 0..rounds {
        let _ = std::fs::remove_dir_all(&dest_dir);
        let _ = std::fs::remove_file(&archive);
        let dest = shoal_backup::Destination::open(dest_dir.to_str().context("path")?)?;
        settle();
        let started = Instant::now();
        control.backup(&dest, &shoal_backup::quiet).await?;
        bench.backup_s.push(started.elapsed().as_secs_f64());
        bench.backup_bytes = du(&dest_dir);

        let mut tar = Command::new("tar");
        tar.args(["-I", "zstd -3 -T0", "-cf"])
            .arg(&archive)
            .arg("-C")
            .arg(&data_dir)
            .arg(".");
        bench.tar_s.push(timed("tar with zstd", tar)?);
        bench.tar_bytes = std::fs::metadata(&archive)?.len();

        let target = dir.join("restored");
        let _ = std::fs::remove_dir_all(&target);
        std::fs::create_dir_all(&target)?;
        let registry = shoal_control::open_registry(None, &target).await?;
        let artifacts = shoal_control::open_artifacts(None, &target).await?;
        settle();
        let started = Instant::now();
        shoal_backup::restore(
            &dest,
            None,
            registry.as_ref(),
            &artifacts,
            &shoal_backup::quiet,
        )
        .await?;
        bench.restore_s.push(started.elapsed().as_secs_f64());
        drop(registry);

        let untarred = dir.join("untarred");
        let _ = std::fs::remove_dir_all(&untarred);
        std::fs::create_dir_all(&untarred)?;
        let mut untar = Command::new("tar");
        untar
            .args(["-I", "zstd -T0", "-xf"])
            .arg(&archive)
            .arg("-C")
            .arg(&untarred);
        bench.untar_s.push(timed("tar -x", untar)?);
        let _ = std::fs::remove_dir_all(&target);
        let _ = std::fs::remove_dir_all(&untarred);
        eprintln!(
            "round {round}: backup {:.2} s, tar {:.2} s, restore {:.2} s, untar {:.2} s",
            bench.backup_s[round], bench.tar_s[round], bench.restore_s[round], bench.untar_s[round]
        );
    }
    let dest = shoal_backup::Destination::open(dest_dir.to_str().context("path")?)?;
    let started = Instant::now();
    shoal_backup::verify(&dest, None, &shoal_backup::quiet).await?;
    bench.verify_s = started.elapsed().as_secs_f64();

    make_model(&model, size_mb, 9000 + versions as u64, None)?;
    fleet.push("big", &model).await?;
    let started = Instant::now();
    let record = control.backup(&dest, &shoal_backup::quiet).await?;
    bench.incremental_s = started.elapsed().as_secs_f64();
    bench.incremental_bytes = record.copied_bytes;

    #[allow(clippy::cast_precision_loss)]
    let mib = artifact_bytes as f64 / f64::from(1 << 20);
    bench.backup_mib_s = mib / median(&bench.backup_s);
    bench.tar_mib_s = mib / median(&bench.tar_s);
    fleet.stop().await?;
    let _ = std::fs::remove_dir_all(dir);
    Ok(bench)
}

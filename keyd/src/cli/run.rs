//! `keyd run` and `keyd status`.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;

use crate::config::Config;
use crate::daemon::{self, Status};
use crate::{files, time};

#[derive(Args, Debug)]
pub struct RunArgs {
    /// The configuration file (docs/keyd-config.md).
    #[arg(long)]
    config: PathBuf,
}

#[derive(Args, Debug)]
pub struct StatusArgs {
    /// The configuration file of the daemon to show.
    #[arg(long)]
    config: PathBuf,
    /// Machine-readable output.
    #[arg(long)]
    json: bool,
}

pub fn run(a: RunArgs) -> Result<()> {
    let config = Config::load(&a.config)?;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_writer(std::io::stderr)
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async {
        tokio::select! {
            r = daemon::run(config) => r,
            _ = tokio::signal::ctrl_c() => Ok(()),
        }
    })
}

pub fn status(a: StatusArgs) -> Result<()> {
    let config = Config::load(&a.config)?;
    let path = daemon::status_path(&config);
    let text = files::read_text(&path).context("is keyd running with this configuration?")?;
    if a.json {
        println!("{text}");
        return Ok(());
    }
    let s: Status = serde_json::from_str(&text).with_context(|| format!("{}", path.display()))?;
    let age = time::unix_now().saturating_sub(s.updated_at);
    println!(
        "node {} ({}) on {}, roster serial {}, status {age}s old",
        s.node, s.node_id, s.interface, s.roster_serial
    );
    println!(
        "{:<16} {:<10} {:<10} {:>6} {:>9} {:>8}  last error",
        "peer", "state", "role", "epoch", "key age", "ok/fail"
    );
    for p in s.peers.values() {
        let key_age = p.key_age_secs.map_or("-".into(), |a| format!("{a}s"));
        println!(
            "{:<16} {:<10} {:<10} {:>6} {:>9} {:>8}  {}",
            p.name,
            p.state,
            p.role,
            p.epoch,
            key_age,
            format!("{}/{}", p.exchanges_ok, p.exchanges_failed),
            p.last_error.as_deref().unwrap_or("-")
        );
    }
    if !s.refusals.is_empty() {
        let list: Vec<String> = s.refusals.iter().map(|(k, v)| format!("{k}={v}")).collect();
        println!("refusals: {}", list.join(", "));
    }
    println!(
        "roster rollbacks refused: {}, peers cut at hard lifetime: {}",
        s.roster_rollbacks_refused, s.peers_cut_at_hard_lifetime
    );
    Ok(())
}

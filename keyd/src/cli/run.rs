//! `keyd run` and `keyd status`.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;

use crate::config::Config;
use crate::daemon::{self, Status};
use crate::datapath_thread::DataPathThread;
use crate::logging::{self, LogArgs};
use crate::policy::LocalState;
use crate::{files, health, time};

#[derive(Args, Debug)]
pub struct RunArgs {
    /// The configuration file (docs/keyd-config.md).
    #[arg(long)]
    config: PathBuf,
    /// Start even though the persisted state (roster serial, key epochs) is
    /// missing or corrupt, forgetting it: the current roster file is then
    /// accepted whatever its serial.
    #[arg(long)]
    reset_state: bool,
    /// The data plane's socket directory, in place of the configuration's
    /// `socket_dir` (the package's units: /run/pqmesh, where mesh-node's
    /// unit puts them).
    #[arg(long, value_name = "DIR", value_parser = absolute_dir)]
    socket_dir: Option<PathBuf>,
    #[command(flatten)]
    log: LogArgs,
}

fn absolute_dir(text: &str) -> Result<PathBuf, String> {
    let path = PathBuf::from(text);
    if path.is_absolute() {
        Ok(path)
    } else {
        Err(format!("`{text}` is not an absolute path"))
    }
}

#[derive(Args, Debug)]
pub struct StatusArgs {
    /// The configuration file of the daemon to show.
    #[arg(long)]
    config: PathBuf,
    /// Machine-readable output.
    #[arg(long)]
    json: bool,
    /// One line, `ok: ...`, `degraded: ...` or `failed: ...`, and the exit
    /// status 0, 1 or 2 to match (docs/operations.md).
    #[arg(long, conflicts_with = "json")]
    short: bool,
}

pub fn run(a: RunArgs) -> Result<()> {
    let mut config = Config::load(&a.config)?;
    if let Some(dir) = a.socket_dir {
        config.socket_dir = dir;
    }
    logging::init(a.log.log_format);
    // Started first and stopped last: the daemon's tasks use quinn, whose
    // drivers run there, until its runtime is gone.
    let datapath = DataPathThread::start().context("cannot start the data path's thread")?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let handle = datapath.handle().clone();
    let result = runtime.block_on(async {
        tokio::select! {
            r = daemon::run(config, a.reset_state, handle) => r,
            _ = tokio::signal::ctrl_c() => Ok(()),
        }
    });
    drop(runtime);
    drop(datapath);
    result
}

/// `keyd status --short`: the line, then exit with its level's status
/// (whatever goes wrong, even reading the configuration, is `failed`).
fn short(a: &StatusArgs) -> ! {
    let read = || -> Result<Status> {
        let path = daemon::status_path(&Config::load(&a.config)?);
        let text = files::read_text(&path)?;
        serde_json::from_str(&text).with_context(|| format!("{}", path.display()))
    };
    let h = match read() {
        Ok(s) => health::assess(&s, time::unix_now()),
        Err(e) => health::no_status(&format!("{e:#}")),
    };
    println!("{}", h.line);
    std::process::exit(h.level.exit_code().into())
}

pub fn status(a: StatusArgs) -> Result<()> {
    if a.short {
        short(&a);
    }
    let config = Config::load(&a.config)?;
    let path = daemon::status_path(&config);
    let text = files::read_text(&path).context("is keyd running with this configuration?")?;
    if a.json {
        println!("{text}");
        return Ok(());
    }
    let s: Status = serde_json::from_str(&text).with_context(|| format!("{}", path.display()))?;
    let now = time::unix_now();
    let age = now.saturating_sub(s.updated_at);
    println!(
        "node {} ({}) on {}, roster serial {}, status {age}s old",
        s.node, s.node_id, s.interface, s.roster_serial
    );
    if s.local_state != LocalState::Member {
        println!(
            "WARNING: this node is not a valid member ({:?}): it holds no peers",
            s.local_state
        );
    }
    let left = s.roster_not_after.saturating_sub(now);
    if left < daemon::ROSTER_EXPIRY_WARNING.as_secs() {
        println!(
            "WARNING: the roster expires at {} ({left}s from now); keyd keeps it {}s longer (max_clock_skew), then drops every peer",
            time::rfc3339(s.roster_not_after),
            s.max_clock_skew_secs
        );
    }
    if let Some(a) = &s.authority {
        let last = a.last_update_at.map_or("never".into(), |t| {
            format!("{}s ago", now.saturating_sub(t))
        });
        println!(
            "authority: {}, updates {} by delta and {} by snapshot, last {last}, {} reconnects{}",
            if a.subscribed {
                "subscribed"
            } else {
                "NOT CONNECTED (the mesh runs on the cached roster)"
            },
            a.updates_by_delta,
            a.updates_by_snapshot,
            a.failures,
            a.last_error
                .as_ref()
                .map_or(String::new(), |e| format!(" (last: {e})"))
        );
    }
    {
        use crate::firewall::FirewallState as F;
        let f = &s.firewall;
        let line = match f.state {
            F::Enforced => format!(
                "enforced by the data plane: roster serial {}'s policy, {} rules, {} peers",
                f.generation.unwrap_or(0),
                f.rules,
                f.peers
            ),
            F::NoPolicy => "no policy in the roster: every member reaches every other".into(),
            F::NotSupported => format!(
                "NOT ENFORCED: {}",
                f.detail
                    .as_deref()
                    .unwrap_or("the data plane has no firewall")
            ),
            F::Failed => format!(
                "NOT IN FORCE: {}",
                f.detail.as_deref().unwrap_or("the data plane refused it")
            ),
            F::Unknown => "not pushed yet".into(),
        };
        println!("firewall: {line}");
    }
    if !s.dataplane_reachable {
        println!("WARNING: the data plane could not be read; the table shows keyd's view");
    }
    println!(
        "{:<16} {:<22} {:<10} {:>6} {:>9} {:>8} {:>8} {:<16}  last error",
        "peer", "state", "role", "epoch", "key age", "in wg", "ok/fail", "path"
    );
    for p in s.peers.values() {
        let key_age = p.key_age_secs.map_or("-".into(), |a| format!("{a}s"));
        let in_wg = match p.in_dataplane {
            Some(true) => "yes",
            Some(false) => "no",
            None => "?",
        };
        // The rung, its round trip, and "*" when the ladder is off for
        // the peer (a data plane that does not answer path probes).
        let path = p.path.as_ref().map_or("-".into(), |path| {
            let rtt = path.rtt_ms[path.rung.as_str()]
                .as_f64()
                .map_or(String::new(), |ms| format!(" {ms:.2}ms"));
            let off = if path.ladder { "" } else { "*" };
            format!("{}{off}{rtt}", path.rung)
        });
        println!(
            "{:<16} {:<22} {:<10} {:>6} {:>9} {:>8} {:>8} {:<16}  {}",
            p.name,
            p.state.label(),
            format!("{:?}", p.role).to_lowercase(),
            p.epoch,
            key_age,
            in_wg,
            format!(
                "{}/{}",
                p.exchanges_ok,
                p.exchanges_failed + p.dials_unanswered
            ),
            path,
            p.last_error.as_deref().unwrap_or("-")
        );
    }
    if s.peers
        .values()
        .any(|p| p.path.as_ref().is_some_and(|p| !p.ladder))
    {
        println!(
            "path *: the fallback ladder is off for that peer (both data planes must answer \
             path probes: mesh-node does, stock WireGuard does not); it stays on direct UDP"
        );
    }
    if s.unlisted_in_dataplane > 0 {
        println!(
            "{} peer(s) in the data plane that the roster does not list (being removed)",
            s.unlisted_in_dataplane
        );
    }
    if !s.refusals.is_empty() {
        let list: Vec<String> = s.refusals.iter().map(|(k, v)| format!("{k}={v}")).collect();
        println!("refusals: {}", list.join(", "));
    }
    let c = &s.counters;
    println!(
        "cut: {} at hard lifetime, {} at certificate expiry, {} revoked or unlisted; \
         rosters refused: {} ({} rollbacks); data plane: {} restarts healed, {} failed reads, \
         {} failed installs, {} failed removals",
        c.peers_cut_at_hard_lifetime,
        c.peers_cut_at_certificate_expiry,
        c.peers_cut_revoked_or_unlisted,
        s.rosters_refused,
        s.roster_rollbacks_refused,
        c.dataplane_restarts_healed,
        c.dataplane_reads_failed,
        c.installs_failed,
        c.removals_failed
    );
    Ok(())
}

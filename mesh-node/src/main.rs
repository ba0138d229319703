//! `mesh-node up IFNAME`: create the interface, serve the WireGuard userspace
//! API, run until SIGINT/SIGTERM. Daemonizes by default, like wireguard-go.

mod pow;

use std::io::IsTerminal;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use mesh_node::firewall::{self, Firewall};
use mesh_node::{api, counters::Counters, device, metrics, notify, setup};
use mesh_proto::firewall::conntrack::ConntrackConfig;
use mesh_proto::firewall::document::DEFAULT_SOCKET_DIR;
use mesh_proto::logformat::LogFormat;
use tracing::{error, info, warn};
use tracing_subscriber::fmt::writer::BoxMakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Set in the environment of the re-executed daemon process.
const FOREGROUND_ENV: &str = "MESH_NODE_DAEMONIZED";

#[derive(Parser, Debug)]
#[command(
    name = "mesh-node",
    version,
    about = "pqmesh data plane: WireGuard on gotatun"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum TransportKind {
    Offload,
    Default,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Create the WireGuard interface IFNAME and serve its userspace API.
    Up(UpArgs),
    /// Show the firewall of the mesh-node serving IFNAME: the document in
    /// force, tracked flows, drops by reason and each rule's hits.
    Status {
        ifname: String,
        /// The same as one JSON object.
        #[arg(long)]
        json: bool,
        /// Where that mesh-node's sockets are (its `up --socket-dir`).
        #[arg(long, value_name = "DIR", default_value = DEFAULT_SOCKET_DIR)]
        socket_dir: PathBuf,
    },
}

#[derive(clap::Args, Debug)]
struct UpArgs {
    /// Interface name (at most 15 characters).
    ifname: String,
    /// Stay attached to the terminal instead of daemonizing.
    #[arg(long, short)]
    foreground: bool,
    /// Where the daemon writes its log (default: discarded once running).
    #[arg(long)]
    log_file: Option<std::path::PathBuf>,
    /// Log as text lines or as one JSON object per line.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Serve Prometheus metrics over HTTP on this address (e.g. 127.0.0.1:9586).
    #[arg(long)]
    metrics_listen: Option<std::net::SocketAddr>,
    /// `offload`: our TUN with TSO; `default`: gotatun's own (for comparison).
    #[arg(long, value_enum, default_value_t = TransportKind::Offload)]
    transports: TransportKind,
    /// With `offload`: after a burst of packets, how long (µs) the data
    /// path keeps polling before it sleeps, so that a reply does not wait
    /// for a halted vCPU to wake; 0 turns it off. Capped at 5% of a core.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u16).range(0..=1000))]
    busy_poll_us: u16,
    /// Threads that encrypt and decrypt large batches of one peer's
    /// packets beside the data path; 0 keeps all crypto on the data
    /// path. Default: 0 on 2 CPUs or fewer, else one per CPU but one,
    /// at most 4.
    #[arg(long, value_parser = clap::value_parser!(u16).range(0..=256))]
    crypto_threads: Option<u16>,
    /// With `offload`: 1 runs both directions on one data-path thread,
    /// 2 gives each direction its own. Default: 1 on 4 CPUs or fewer,
    /// else 2.
    #[arg(long, value_parser = clap::value_parser!(u8).range(1..=2))]
    data_path_threads: Option<u8>,
    /// With `offload`: flows the firewall tracks at most; when the table
    /// is full the oldest flow is evicted (and counted).
    #[arg(long, default_value_t = 65_536, value_parser = clap::value_parser!(u64).range(1..=16_777_216))]
    firewall_max_flows: u64,
    /// With `offload`: carry nothing until keyd has given the firewall
    /// its first document (for hosts whose policy must hold even if
    /// mesh-node restarts behind keyd's back).
    #[arg(long)]
    firewall_required: bool,
    /// Give the userspace API and firewall sockets to this group, mode
    /// 0660 (default: 0600, root only), so that an unprivileged keyd in
    /// the group can drive the data plane. mesh-node must be a member.
    #[arg(long, value_name = "GROUP")]
    socket_group: Option<String>,
    /// Where the userspace API socket (IFNAME.sock) and the firewall
    /// socket (IFNAME.firewall) are made. `wg` finds only the default;
    /// elsewhere link IFNAME.sock into it.
    #[arg(long, value_name = "DIR", default_value = DEFAULT_SOCKET_DIR)]
    socket_dir: PathBuf,
    /// Give the interface the overlay addresses of this node
    /// certificate (as `keyd join` writes it) and set it up.
    #[arg(long, value_name = "CERT")]
    address_from_cert: Option<std::path::PathBuf>,
    /// With --address-from-cert: take the addresses only from a
    /// certificate issued under the CA this file pins (its fingerprint, as
    /// `keyd join` writes it as root), checked against the `ca.crt` and
    /// `roster` beside the certificate.
    #[arg(long, value_name = "PIN", requires = "address_from_cert")]
    ca_pin: Option<std::path::PathBuf>,
}

fn main() -> ExitCode {
    let args = match Cli::parse().command {
        Cmd::Status {
            ifname,
            json,
            socket_dir,
        } => return status(&ifname, &socket_dir, json),
        Cmd::Up(args) => args,
    };
    let UpArgs {
        ifname,
        foreground,
        log_file,
        log_format,
        metrics_listen,
        transports,
        busy_poll_us,
        crypto_threads,
        data_path_threads,
        firewall_max_flows,
        firewall_required,
        socket_group,
        socket_dir,
        address_from_cert,
        ca_pin,
    } = args;
    let busy_poll = Duration::from_micros(busy_poll_us.into());
    let crypto_threads = crypto_threads.map_or_else(
        || device::default_crypto_threads(device::available_cpus()),
        usize::from,
    );
    let split_directions = data_path_threads.map_or_else(
        || device::default_split_directions(device::available_cpus()),
        |n| n == 2,
    );
    let result = check_ifname(&ifname).and_then(|()| {
        // Both are checked before anything is created.
        let setup = Setup {
            socket_dir: socket_dir.clone(),
            socket_gid: socket_group
                .as_deref()
                .map(setup::group::resolve)
                .transpose()?,
            addresses: address_from_cert
                .as_deref()
                .map(|cert| setup::address::from_cert(cert, ca_pin.as_deref()))
                .transpose()?
                .unwrap_or_default(),
        };
        if foreground || std::env::var_os(FOREGROUND_ENV).is_some() {
            run(
                &ifname,
                &setup,
                log_file.as_deref(),
                log_format,
                metrics_listen,
                transports,
                DataPath {
                    busy_poll,
                    crypto_threads,
                    split_directions,
                    conntrack: ConntrackConfig {
                        max_flows: firewall_max_flows as usize,
                        ..ConntrackConfig::default()
                    },
                    firewall_required,
                },
            )
        } else {
            daemonize(&api::socket_path(&socket_dir, &ifname))
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mesh-node: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `mesh-node status IFNAME`: asks the running mesh-node over its
/// firewall socket (gotatun's own transports have none: nothing to show).
fn status(ifname: &str, socket_dir: &Path, json: bool) -> ExitCode {
    let result = check_ifname(ifname)
        .and_then(|()| Ok(firewall::control::query_status(socket_dir, ifname)?))
        .and_then(|s| {
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                print!("{s}");
            }
            Ok(())
        });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mesh-node status: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn check_ifname(name: &str) -> Result<()> {
    let ok = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
    if name.is_empty() || name.len() > 15 || !name.chars().all(ok) || name == "." || name == ".." {
        bail!("`{name}` is not an interface name (1-15 of letters, digits, '-', '_', '.')");
    }
    Ok(())
}

/// Re-executes this program in a new session and waits until its UAPI
/// socket answers (success) or it exits (its error is on our stderr, which
/// it shares until it is ready).
fn daemonize(socket: &Path) -> Result<()> {
    let exe = std::env::current_exe().context("cannot find own executable")?;
    let mut child = unsafe {
        Command::new(exe)
            .args(std::env::args_os().skip(1))
            .env(FOREGROUND_ENV, "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            // SAFETY: setsid is async-signal-safe and touches no memory.
            .pre_exec(|| {
                if libc::setsid() < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            })
            .spawn()
            .context("cannot start the daemon process")?
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait()? {
            bail!("mesh-node daemon exited during start-up ({status})");
        }
        if std::os::unix::net::UnixStream::connect(socket).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    bail!("mesh-node daemon did not become ready within 20 s")
}

fn init_logging(log_file: Option<&std::path::Path>, format: LogFormat) -> Result<()> {
    // `Targets` reads RUST_LOG's common form (`info,gotatun=debug`) without
    // EnvFilter's regex engine, which costs resident memory on every node.
    let info = tracing_subscriber::filter::Targets::new().with_default(tracing::Level::INFO);
    let requested = std::env::var("RUST_LOG").ok();
    let (filter, refused) = match requested.as_deref().map(str::parse) {
        Some(Ok(filter)) => (filter, None),
        Some(Err(e)) => (info, Some(e)),
        None => (info, None),
    };
    let writer = match log_file {
        Some(path) => {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("cannot open log file {}", path.display()))?;
            BoxMakeWriter::new(Arc::new(file))
        }
        None => BoxMakeWriter::new(std::io::stderr),
    };
    let builder = tracing_subscriber::fmt()
        .with_target(false)
        // Colour only for a person at a terminal, never into the journal.
        .with_ansi(log_file.is_none() && std::io::stderr().is_terminal())
        .with_writer(writer);
    match format {
        LogFormat::Text => builder.finish().with(filter).init(),
        // The message and the event's fields at the top level, beside
        // timestamp and level: what log pipelines index.
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .finish()
            .with(filter)
            .init(),
    }
    if let (Some(e), Some(value)) = (refused, requested) {
        warn!("RUST_LOG={value:?} is not a filter this daemon reads ({e}); logging at info");
    }
    Ok(())
}

/// Once the daemon is ready, it lets go of the terminal's stderr.
fn detach_stderr() {
    if std::env::var_os(FOREGROUND_ENV).is_none() {
        return;
    }
    // SAFETY: plain libc calls on file descriptors this process owns.
    unsafe {
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_WRONLY);
        if null >= 0 {
            libc::dup2(null, 2);
            libc::close(null);
        }
    }
}

/// How the data path of `--transports offload` runs.
struct DataPath {
    busy_poll: Duration,
    crypto_threads: usize,
    split_directions: bool,
    /// The firewall's flow table.
    conntrack: ConntrackConfig,
    firewall_required: bool,
}

/// What `--socket-dir`, `--socket-group` and `--address-from-cert` ask for.
struct Setup {
    socket_dir: PathBuf,
    socket_gid: Option<u32>,
    addresses: Vec<mesh_proto::prefix::IpPrefix>,
}

fn run(
    ifname: &str,
    setup: &Setup,
    log_file: Option<&std::path::Path>,
    log_format: LogFormat,
    metrics: Option<std::net::SocketAddr>,
    transports: TransportKind,
    data_path: DataPath,
) -> Result<()> {
    let DataPath {
        busy_poll,
        crypto_threads,
        split_directions,
        conntrack,
        firewall_required,
    } = data_path;
    init_logging(log_file, log_format)?;
    // One malloc arena for all threads: packet buffers come from gotatun's
    // pool, so the data path rarely allocates, and per-thread arenas only
    // add resident memory on every node.
    // SAFETY: mallopt only sets an allocator parameter; called before any
    // other thread exists.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) };
    // Our data path runs on a thread of its own; the runtime only serves the
    // API and the protocol's timers. gotatun's default transports run their
    // data path on the runtime, so they get a worker per core.
    let mut runtime = match transports {
        TransportKind::Offload => tokio::runtime::Builder::new_current_thread(),
        TransportKind::Default => tokio::runtime::Builder::new_multi_thread(),
    };
    let runtime = runtime
        .enable_all()
        .thread_name("mesh-node")
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async {
        match transports {
            TransportKind::Offload => {
                let firewall = Arc::new(Firewall::with_required(conntrack, firewall_required));
                serve(
                    ifname,
                    setup,
                    metrics,
                    device::build_offload(
                        ifname,
                        firewall.clone(),
                        busy_poll,
                        crypto_threads,
                        split_directions,
                    )
                    .await?,
                    Some(firewall),
                    &format!(
                        "offloaded TUN, UDP GSO/GRO, {} data-path thread(s) busy-polling {} µs, \
                         {crypto_threads} crypto threads",
                        if split_directions { 2 } else { 1 },
                        busy_poll.as_micros()
                    ),
                )
                .await
            }
            TransportKind::Default => {
                serve(
                    ifname,
                    setup,
                    metrics,
                    device::build_default(ifname, crypto_threads).await?,
                    // gotatun's own TUN has no hook: no firewall socket,
                    // which tells keyd that this data plane filters nothing.
                    None,
                    &format!("gotatun's default transports, {crypto_threads} crypto threads"),
                )
                .await
            }
        }
    })
}

/// Serves the UAPI for `device` (and the firewall's control socket, when it
/// has one) until SIGINT/SIGTERM, then shuts down cleanly.
async fn serve<T: gotatun::device::DeviceTransports>(
    ifname: &str,
    setup: &Setup,
    metrics: Option<std::net::SocketAddr>,
    device: gotatun::device::Device<T>,
    firewall: Option<Arc<Firewall>>,
    transports: &str,
) -> Result<()> {
    {
        let (api_socket, firewall_socket) = (
            api::socket_path(&setup.socket_dir, ifname),
            firewall::control::socket_path(&setup.socket_dir, ifname),
        );
        let device = Arc::new(device);
        // Before any socket answers: whoever waits for one (`mesh-node up`,
        // keyd, systemd) finds the interface addressed and up.
        if !setup.addresses.is_empty() {
            setup::address::apply(ifname, &setup.addresses)?;
        }
        // Bound before the UAPI socket, whose answer tells `mesh-node up`
        // and keyd that we are ready: the firewall socket is there by then.
        let control = match &firewall {
            Some(fw) => Some(tokio::spawn(firewall::control::serve(
                firewall::control::bind(&setup.socket_dir, ifname)?,
                fw.clone(),
            ))),
            None => None,
        };
        let listener = api::bind(&setup.socket_dir, ifname)?;
        if let Some(gid) = setup.socket_gid {
            setup::group::share(&api_socket, gid)?;
            if firewall.is_some() {
                setup::group::share(&firewall_socket, gid)?;
            }
        }
        let counters = Arc::new(Counters::default());
        let drops = device.counters().await;
        if let Some(addr) = metrics {
            metrics::serve(addr, counters.clone(), drops.clone(), firewall.clone()).await?;
        }
        let watcher = tokio::spawn(metrics::watch_drops(drops.clone(), Duration::from_secs(10)));
        let server = tokio::spawn(api::serve(listener, device.clone(), counters.clone()));
        info!(
            "mesh-node up on {ifname} ({transports}); userspace API at {}",
            api_socket.display()
        );
        // Also with a log file: a daemon that kept the caller's stderr open
        // would hang anyone who reads it to its end (`$(mesh-node up ...)`).
        detach_stderr();
        notify::ready();
        let reason = wait_for_signal().await;
        info!("{reason}: shutting down {ifname}");
        // The socket files go first, while the listeners still answer:
        // `wg` unlinks a socket path whose connect is refused, and where
        // that path is a link (the package's /run/wireguard/IF.sock) it
        // would remove the link, not our socket.
        let _ = std::fs::remove_file(&api_socket);
        if control.is_some() {
            let _ = std::fs::remove_file(&firewall_socket);
        }
        server.abort();
        watcher.abort();
        if let Some(control) = control {
            control.abort();
            let _ = control.await;
        }
        // An aborted task lets go of its device handle only once it has
        // been dropped, which awaiting it waits for.
        let _ = server.await;
        let _ = watcher.await;
        match Arc::try_unwrap(device) {
            Ok(device) => device.stop().await,
            Err(_) => error!("device still in use at shutdown; exiting anyway"),
        }
        info!(
            "{}",
            metrics::render(&counters, &drops, firewall.as_deref()).trim_end()
        );
        // What the crypto pool carried (tests read it to know the path ran).
        info!(
            "crypto pool: {} packets sealed, {} opened",
            drops.tx_parallel.load(std::sync::atomic::Ordering::Relaxed),
            drops.rx_parallel.load(std::sync::atomic::Ordering::Relaxed)
        );
        Ok(())
    }
}

async fn wait_for_signal() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without signal handlers the daemon can only be killed; run anyway.
        return std::future::pending::<&'static str>().await;
    };
    tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    }
}

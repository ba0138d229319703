//! How the daemons (`keyd run`, `keyd authority run`) log: to stderr, at
//! the level RUST_LOG asks (default info), as text or, with
//! `--log-format json`, one JSON object per line for a log pipeline.

use tracing_subscriber::EnvFilter;

#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line: timestamp, level, message and fields.
    Json,
}

#[derive(clap::Args, Debug)]
pub struct LogArgs {
    /// Log as text lines or as one JSON object per line.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// Installs the global subscriber (once per process).
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        // The message and the event's fields at the top level, beside
        // timestamp and level: what log pipelines index.
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

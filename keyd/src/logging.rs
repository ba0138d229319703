//! How the daemons (`keyd run`, `keyd authority run`) log: to stderr, at
//! the level RUST_LOG asks (default info), as text or, with
//! `--log-format json`, one JSON object per line for a log pipeline.

pub use mesh_proto::logformat::LogFormat;
use tracing_subscriber::EnvFilter;

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
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        // The message and the event's fields at the top level, beside
        // timestamp and level: what log pipelines index.
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        log: LogArgs,
    }

    #[test]
    fn the_format_is_text_unless_json_is_asked_for() {
        let parse = |args: &[&str]| Cli::try_parse_from(args).map(|c| c.log.log_format);
        assert_eq!(parse(&["keyd"]).unwrap(), LogFormat::Text);
        assert_eq!(
            parse(&["keyd", "--log-format", "json"]).unwrap(),
            LogFormat::Json
        );
        let e = parse(&["keyd", "--log-format", "xml"]).unwrap_err();
        assert!(
            e.to_string().contains("[possible values: text, json]"),
            "{e}"
        );
    }
}

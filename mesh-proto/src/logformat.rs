//! `--log-format` of the daemons (`keyd run`, `keyd authority run`,
//! `mesh-node up`), defined once for both binaries; with the `clap` feature
//! it is a clap value enum (the variants' comments are the help text).

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line: timestamp, level, message and fields.
    Json,
}

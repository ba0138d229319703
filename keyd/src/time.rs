//! Wall-clock helpers for the CLI: now, durations like `90d`, RFC 3339 text.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use mesh_proto::UnixTime;

pub fn unix_now() -> UnixTime {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Parses `90d`, `12h`, `1year 2days`, ... (humantime's grammar).
pub fn parse_duration(field: &str, text: &str) -> Result<Duration> {
    humantime::parse_duration(text)
        .with_context(|| format!("{field}: `{text}` is not a duration (try 90d, 12h or 1year)"))
}

/// `2026-11-25T06:00:00Z`.
pub fn rfc3339(t: UnixTime) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(t)).to_string()
}

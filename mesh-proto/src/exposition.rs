//! The Prometheus text exposition format (version 0.0.4), written. One place
//! for its rules: `# HELP` and `# TYPE` once per family, label values
//! escaped (`\\`, `\"`, `\n`), histograms as cumulative `_bucket` lines
//! ending at `+Inf`, then `_sum` and `_count`.
//!
//! Sans-IO: it builds a `String`; the daemons serve it.

use std::fmt::{self, Display, Write};

/// A metric family's type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// A label value as the format wants it: backslash, double quote and line
/// feed escaped; everything else as is.
pub struct LabelValue<'a>(pub &'a str);

impl Display for LabelValue<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for c in self.0.chars() {
            match c {
                '\\' => f.write_str("\\\\")?,
                '"' => f.write_str("\\\"")?,
                '\n' => f.write_str("\\n")?,
                c => f.write_char(c)?,
            }
        }
        Ok(())
    }
}

/// A sample value: integers as such, floats with `+Inf`, `-Inf` and `NaN`
/// spelled as the format does.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Value {
    U(u64),
    I(i64),
    F(f64),
}

impl From<u64> for Value {
    fn from(v: u64) -> Self {
        Value::U(v)
    }
}
impl From<i64> for Value {
    fn from(v: i64) -> Self {
        Value::I(v)
    }
}
impl From<f64> for Value {
    fn from(v: f64) -> Self {
        Value::F(v)
    }
}
impl From<bool> for Value {
    fn from(v: bool) -> Self {
        Value::U(v.into())
    }
}

impl Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Value::U(v) => write!(f, "{v}"),
            Value::I(v) => write!(f, "{v}"),
            Value::F(v) if v.is_nan() => f.write_str("NaN"),
            Value::F(v) if v == f64::INFINITY => f.write_str("+Inf"),
            Value::F(v) if v == f64::NEG_INFINITY => f.write_str("-Inf"),
            // Rust prints floats without an exponent and exactly enough
            // digits to read back the same value.
            Value::F(v) => write!(f, "{v}"),
        }
    }
}

/// Cumulative-ready histogram data: `counts[i]` observations fell in
/// `(bounds[i-1], bounds[i]]`, and `counts[bounds.len()]` above the last bound.
#[derive(Clone, Debug, PartialEq)]
pub struct Histogram<'a> {
    /// Upper bounds, strictly increasing.
    pub bounds: &'a [f64],
    /// One more than `bounds`: the last is the overflow bucket.
    pub counts: &'a [u64],
    pub sum: f64,
}

/// An exposition being written.
#[derive(Default)]
pub struct Exposition {
    out: String,
}

impl Exposition {
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts a family: its `# HELP` (backslash and line feed escaped, as the
    /// format asks) and `# TYPE` lines. Samples of it follow.
    pub fn family(&mut self, name: &str, kind: Kind, help: &str) -> &mut Self {
        let help = help.replace('\\', "\\\\").replace('\n', "\\n");
        let _ = writeln!(
            self.out,
            "# HELP {name} {help}\n# TYPE {name} {}",
            kind.as_str()
        );
        self
    }

    /// One sample line of the current family.
    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl Into<Value>) {
        self.out.push_str(name);
        self.labels(labels, None);
        let _ = writeln!(self.out, " {}", value.into());
    }

    /// A whole family holding one unlabelled sample.
    pub fn single(&mut self, name: &str, kind: Kind, help: &str, value: impl Into<Value>) {
        self.family(name, kind, help).sample(name, &[], value);
    }

    /// The lines of one labelled histogram (its family started with
    /// [`Kind::Histogram`]). Bounds that are not strictly increasing, or
    /// counts that do not match them, are a programming error: nothing is
    /// written for them rather than a histogram that lies.
    pub fn histogram(&mut self, name: &str, labels: &[(&str, &str)], h: &Histogram<'_>) {
        let increasing = h.bounds.windows(2).all(|w| w[0] < w[1]);
        if !increasing || h.counts.len() != h.bounds.len() + 1 {
            return;
        }
        let mut cumulative = 0u64;
        let bucket = format!("{name}_bucket");
        for (i, count) in h.counts.iter().enumerate() {
            cumulative = cumulative.saturating_add(*count);
            let le = Value::F(h.bounds.get(i).copied().unwrap_or(f64::INFINITY)).to_string();
            self.out.push_str(&bucket);
            self.labels(labels, Some(&le));
            let _ = writeln!(self.out, " {cumulative}");
        }
        self.out.push_str(name);
        self.out.push_str("_sum");
        self.labels(labels, None);
        let _ = writeln!(self.out, " {}", Value::F(h.sum));
        self.out.push_str(name);
        self.out.push_str("_count");
        self.labels(labels, None);
        let _ = writeln!(self.out, " {cumulative}");
    }

    fn labels(&mut self, labels: &[(&str, &str)], le: Option<&str>) {
        if labels.is_empty() && le.is_none() {
            return;
        }
        self.out.push('{');
        let le = le.map(|v| ("le", v));
        for (i, (k, v)) in labels.iter().copied().chain(le).enumerate() {
            if i > 0 {
                self.out.push(',');
            }
            let _ = write!(self.out, "{k}=\"{}\"", LabelValue(v));
        }
        self.out.push('}');
    }

    pub fn finish(self) -> String {
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped() {
        let mut e = Exposition::new();
        e.family("x", Kind::Gauge, "help with \\ and\nnewline");
        e.sample("x", &[("peer", "a\"b\\c\nd"), ("id", "1")], 1u64);
        let text = e.finish();
        assert_eq!(
            text,
            "# HELP x help with \\\\ and\\nnewline\n# TYPE x gauge\nx{peer=\"a\\\"b\\\\c\\nd\",id=\"1\"} 1\n"
        );
    }

    #[test]
    fn values_are_spelled_as_the_format_does() {
        assert_eq!(Value::F(f64::INFINITY).to_string(), "+Inf");
        assert_eq!(Value::F(f64::NEG_INFINITY).to_string(), "-Inf");
        assert_eq!(Value::F(f64::NAN).to_string(), "NaN");
        assert_eq!(Value::F(0.005).to_string(), "0.005");
        assert_eq!(Value::F(2.0).to_string(), "2");
        assert_eq!(Value::I(-5).to_string(), "-5");
        assert_eq!(Value::from(true).to_string(), "1");
    }

    #[test]
    fn histogram_buckets_are_cumulative_and_end_at_inf() {
        let mut e = Exposition::new();
        e.family("d", Kind::Histogram, "h");
        e.histogram(
            "d",
            &[("role", "initiator")],
            &Histogram {
                bounds: &[0.1, 1.0],
                counts: &[2, 0, 3],
                sum: 7.5,
            },
        );
        let text = e.finish();
        let lines: Vec<&str> = text.lines().skip(2).collect();
        assert_eq!(
            lines,
            [
                "d_bucket{role=\"initiator\",le=\"0.1\"} 2",
                "d_bucket{role=\"initiator\",le=\"1\"} 2",
                "d_bucket{role=\"initiator\",le=\"+Inf\"} 5",
                "d_sum{role=\"initiator\"} 7.5",
                "d_count{role=\"initiator\"} 5",
            ]
        );
    }

    #[test]
    fn a_malformed_histogram_writes_nothing() {
        for (bounds, counts) in [
            (&[1.0, 0.5][..], &[1, 1, 1][..]),
            (&[0.5, 0.5][..], &[1, 1, 1][..]),
            (&[0.5, 1.0][..], &[1, 1][..]),
        ] {
            let mut e = Exposition::new();
            e.histogram(
                "d",
                &[],
                &Histogram {
                    bounds,
                    counts,
                    sum: 0.0,
                },
            );
            assert_eq!(e.finish(), "");
        }
    }
}

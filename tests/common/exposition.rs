//! A strict reader of the Prometheus text exposition format (0.0.4), for
//! tests that scrape a daemon: every line must be a `# HELP`, a `# TYPE`
//! (once per family, before its samples) or a sample of a typed family;
//! names, label syntax, escapes (`\\`, `\"`, `\n` only) and values are
//! checked, and a series may appear only once. Anything else is an error
//! naming the line.
//!
//! Included with `#[path = "common/exposition.rs"] mod exposition;`.

#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};

#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

#[derive(Debug, Default)]
pub struct Scrape {
    pub samples: Vec<Sample>,
    /// Family name -> type.
    pub types: HashMap<String, String>,
}

impl Scrape {
    /// Every sample of `name` whose labels include all of `labels`.
    pub fn find(&self, name: &str, labels: &[(&str, &str)]) -> Vec<&Sample> {
        self.samples
            .iter()
            .filter(|s| {
                s.name == name
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .collect()
    }

    /// The one sample of `name` with `labels`; None if there is none, a
    /// panic if several match (the test asked an ambiguous question).
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let found = self.find(name, labels);
        assert!(found.len() <= 1, "{name} {labels:?} matches {found:?}");
        found.first().map(|s| s.value)
    }

    /// Sum of every sample of `name` with `labels`.
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.find(name, labels).iter().map(|s| s.value).sum()
    }
}

fn is_name(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn is_label_name(s: &str) -> bool {
    is_name(s) && !s.contains(':')
}

fn value(s: &str) -> Result<f64, String> {
    match s {
        "+Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        "NaN" => Ok(f64::NAN),
        _ => s.parse().map_err(|_| format!("`{s}` is not a value")),
    }
}

/// Parses `{a="x",b="y"}` (after the metric name); returns the labels and
/// the rest of the line.
fn labels(text: &str) -> Result<(BTreeMap<String, String>, &str), String> {
    let mut out = BTreeMap::new();
    let Some(mut rest) = text.strip_prefix('{') else {
        return Ok((out, text));
    };
    loop {
        if let Some(after) = rest.strip_prefix('}') {
            return Ok((out, after));
        }
        let (name, after) = rest
            .split_once("=\"")
            .ok_or_else(|| format!("no `=\"` in labels at `{rest}`"))?;
        if !is_label_name(name) {
            return Err(format!("`{name}` is not a label name"));
        }
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next() {
                None => return Err("unterminated label value".into()),
                Some((i, '"')) => break i,
                Some((_, '\\')) => match chars.next() {
                    Some((_, '\\')) => value.push('\\'),
                    Some((_, '"')) => value.push('"'),
                    Some((_, 'n')) => value.push('\n'),
                    other => return Err(format!("bad escape `\\{other:?}` in a label value")),
                },
                Some((_, '\n')) => return Err("raw line feed in a label value".into()),
                Some((_, c)) => value.push(c),
            }
        };
        if out.insert(name.to_string(), value).is_some() {
            return Err(format!("label `{name}` twice"));
        }
        rest = &after[end + 1..];
        rest = rest.strip_prefix(',').unwrap_or(rest);
    }
}

/// The family a sample belongs to: itself, or a histogram's base name.
fn family_of<'a>(name: &'a str, types: &HashMap<String, String>) -> Option<&'a str> {
    if types.contains_key(name) {
        return Some(name);
    }
    ["_bucket", "_sum", "_count"].iter().find_map(|suffix| {
        let base = name.strip_suffix(suffix)?;
        matches!(
            types.get(base).map(String::as_str),
            Some("histogram" | "summary")
        )
        .then_some(base)
    })
}

pub fn parse(text: &str) -> Result<Scrape, String> {
    let mut scrape = Scrape::default();
    let mut seen = std::collections::HashSet::new();
    for (n, line) in text.lines().enumerate() {
        let at = |e: String| format!("line {}: {e}: `{line}`", n + 1);
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').ok_or_else(|| at("no type".into()))?;
            if !is_name(name) {
                return Err(at(format!("`{name}` is not a metric name")));
            }
            if !matches!(
                kind,
                "counter" | "gauge" | "histogram" | "summary" | "untyped"
            ) {
                return Err(at(format!("`{kind}` is not a type")));
            }
            if scrape.types.insert(name.into(), kind.into()).is_some() {
                return Err(at("TYPE twice".into()));
            }
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let name = rest.split(' ').next().unwrap_or_default();
            if !is_name(name) {
                return Err(at(format!("`{name}` is not a metric name")));
            }
            continue;
        }
        if line.starts_with('#') || line.is_empty() {
            return Err(at("not a HELP, TYPE or sample line".into()));
        }
        let name_end = line.find(['{', ' ']).ok_or_else(|| at("no value".into()))?;
        let name = &line[..name_end];
        if !is_name(name) {
            return Err(at(format!("`{name}` is not a metric name")));
        }
        if family_of(name, &scrape.types).is_none() {
            return Err(at(format!("`{name}` has no TYPE before it")));
        }
        let (labels, rest) = labels(&line[name_end..]).map_err(at)?;
        let mut fields = rest
            .strip_prefix(' ')
            .ok_or_else(|| at("no space before the value".into()))?
            .split(' ');
        let value = value(fields.next().unwrap_or_default()).map_err(at)?;
        if let Some(ts) = fields.next() {
            ts.parse::<i64>()
                .map_err(|_| at(format!("`{ts}` is not a timestamp")))?;
        }
        if fields.next().is_some() {
            return Err(at("trailing fields".into()));
        }
        if !seen.insert(format!("{name}{labels:?}")) {
            return Err(at("the same series twice".into()));
        }
        scrape.samples.push(Sample {
            name: name.into(),
            labels,
            value,
        });
    }
    Ok(scrape)
}

/// The histogram `name` with `labels`: (le, cumulative count) in order,
/// checked to be a histogram: bounds increasing to +Inf, counts never
/// decreasing, `_count` equal to the +Inf bucket.
pub fn histogram(
    s: &Scrape,
    name: &str,
    labels: &[(&str, &str)],
) -> Result<Vec<(f64, f64)>, String> {
    let buckets: Vec<(f64, f64)> = s
        .find(&format!("{name}_bucket"), labels)
        .iter()
        .map(|b| {
            let le = b.labels.get("le").ok_or("a bucket without le")?;
            Ok((value(le)?, b.value))
        })
        .collect::<Result<_, String>>()?;
    if buckets.is_empty() {
        return Err(format!("no {name}_bucket {labels:?}"));
    }
    if !buckets
        .windows(2)
        .all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1)
    {
        return Err(format!("{name}: buckets not cumulative: {buckets:?}"));
    }
    let last = buckets[buckets.len() - 1];
    if last.0 != f64::INFINITY {
        return Err(format!("{name}: no +Inf bucket"));
    }
    let count = s.get(&format!("{name}_count"), labels);
    if count != Some(last.1) {
        return Err(format!(
            "{name}: _count {count:?} is not the +Inf bucket {}",
            last.1
        ));
    }
    if s.get(&format!("{name}_sum"), labels).is_none() {
        return Err(format!("{name}: no _sum"));
    }
    Ok(buckets)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_what_the_format_allows() {
        let s = parse(
            "# HELP a_total Things\n# TYPE a_total counter\na_total{x=\"q\\\"\\\\\\n\",y=\"\"} 3\n\
             # TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_bucket{le=\"+Inf\"} 2\nh_sum 1.5\nh_count 2 1700000000\n",
        )
        .unwrap();
        assert_eq!(s.get("a_total", &[("x", "q\"\\\n")]), Some(3.0));
        assert_eq!(
            histogram(&s, "h", &[]).unwrap(),
            [(1.0, 1.0), (f64::INFINITY, 2.0)]
        );
    }

    #[test]
    fn refuses_what_it_does_not() {
        for bad in [
            "a 1\n",                                  // no TYPE
            "# TYPE a gauge\na{x=\"1\"}\n",           // no value
            "# TYPE a gauge\na{x=\"\\t\"} 1\n",       // bad escape
            "# TYPE a gauge\na{x=\"1} 1\n",           // unterminated
            "# TYPE a gauge\na{1x=\"1\"} 1\n",        // label name
            "# TYPE a gauge\na one\n",                // value
            "# TYPE a gauge\na 1\na 2\n",             // the same series twice
            "# TYPE a gauge\n# TYPE a gauge\n",       // TYPE twice
            "# TYPE a widget\n",                      // type
            "# TYPE a gauge\na{x=\"1\",x=\"2\"} 1\n", // label twice
            "# TYPE a gauge\n\na 1\n",                // blank line
            "# TYPE a gauge\na 1 2 3\n",              // trailing
        ] {
            assert!(parse(bad).is_err(), "accepted {bad:?}");
        }
        let s = parse("# TYPE h histogram\nh_bucket{le=\"1\"} 3\nh_bucket{le=\"+Inf\"} 2\nh_sum 0\nh_count 2\n")
            .unwrap();
        assert!(histogram(&s, "h", &[]).is_err(), "decreasing buckets");
    }
}

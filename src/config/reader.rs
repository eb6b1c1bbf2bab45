//! Reads typed values out of the merged configuration table, collecting every problem instead of
//! stopping at the first, so that one message can list them all. Values from the environment and
//! flags arrive as text and are parsed into the type each key expects.

use std::collections::HashSet;
use std::time::Duration;

use toml::{Table, Value};

use super::sources::Layered;

/// A typed view of the merged table that records errors and which keys were read.
pub struct Reader<'a> {
    layered: &'a Layered,
    pub errors: Vec<String>,
    /// What is worth telling the operator but does not stop start-up.
    pub warnings: Vec<String>,
    read: HashSet<String>,
}

impl<'a> Reader<'a> {
    pub fn new(layered: &'a Layered) -> Self {
        Reader {
            layered,
            errors: Vec::new(),
            warnings: Vec::new(),
            read: HashSet::new(),
        }
    }

    fn lookup(&self, path: &str) -> Option<&'a Value> {
        let mut parts = path.split('.');
        let mut value = self.layered.table.get(parts.next()?)?;
        for part in parts {
            value = value.as_table()?.get(part)?;
        }
        Some(value)
    }

    /// The raw value at `path`, marking it as known.
    pub fn get(&mut self, path: &str) -> Option<&'a Value> {
        self.read.insert(path.to_owned());
        self.lookup(path)
    }

    /// Whether a value is set at `path` (without reading it).
    pub fn is_set(&self, path: &str) -> bool {
        self.lookup(path).is_some()
    }

    /// Records a problem with the value at `path`, naming where it came from.
    pub fn error(&mut self, path: &str, message: impl std::fmt::Display) {
        let origin = self
            .layered
            .origin(path)
            .map(|origin| format!(" ({origin})"))
            .unwrap_or_default();
        self.errors.push(format!("{path}{origin}: {message}"));
    }

    /// Records a problem not tied to one key.
    pub fn problem(&mut self, message: impl Into<String>) {
        self.errors.push(message.into());
    }

    pub fn warning(&mut self, message: impl Into<String>) {
        self.warnings.push(message.into());
    }

    pub fn string(&mut self, path: &str) -> Option<String> {
        match self.get(path)? {
            Value::String(text) => Some(text.clone()),
            Value::Integer(n) => Some(n.to_string()),
            other => {
                self.error(path, format!("expected a string, got {}", other.type_str()));
                None
            }
        }
    }

    /// A whole number in `range`, from a TOML integer or text.
    pub fn integer(&mut self, path: &str, range: std::ops::RangeInclusive<i64>) -> Option<i64> {
        let value = self.get(path)?;
        let parsed = match value {
            Value::Integer(n) => Some(*n),
            Value::String(text) => text.trim().parse().ok(),
            _ => None,
        };
        match parsed {
            Some(n) if range.contains(&n) => Some(n),
            Some(n) => {
                let (low, high) = (range.start(), range.end());
                self.error(path, format!("must be between {low} and {high}, got {n}"));
                None
            }
            None => {
                self.error(
                    path,
                    format!("expected a whole number, got {}", describe(value)),
                );
                None
            }
        }
    }

    pub fn unsigned(&mut self, path: &str, min: u64) -> Option<u64> {
        self.integer(path, min as i64..=i64::MAX).map(|n| n as u64)
    }

    pub fn number(&mut self, path: &str) -> Option<f64> {
        let value = self.get(path)?;
        let parsed = match value {
            Value::Integer(n) => Some(*n as f64),
            Value::Float(x) => Some(*x),
            Value::String(text) => text.trim().parse().ok(),
            _ => None,
        };
        match parsed {
            Some(x) if x.is_finite() && x > 0.0 => Some(x),
            _ => {
                self.error(
                    path,
                    format!("expected a positive number, got {}", describe(value)),
                );
                None
            }
        }
    }

    pub fn boolean(&mut self, path: &str) -> Option<bool> {
        let value = self.get(path)?;
        let parsed = match value {
            Value::Boolean(flag) => Some(*flag),
            Value::String(text) => match text.trim().to_ascii_lowercase().as_str() {
                "true" | "1" | "yes" | "on" => Some(true),
                "false" | "0" | "no" | "off" => Some(false),
                _ => None,
            },
            _ => None,
        };
        if parsed.is_none() {
            self.error(
                path,
                format!("expected true or false, got {}", describe(value)),
            );
        }
        parsed
    }

    /// A duration: whole seconds, or a humantime string such as `"300ms"`, `"5m"`, `"1h 30m"`.
    pub fn duration(&mut self, path: &str) -> Option<Duration> {
        let value = self.get(path)?;
        let parsed = match value {
            Value::Integer(n) if *n >= 0 => Some(Duration::from_secs(*n as u64)),
            Value::String(text) => parse_duration(text),
            _ => None,
        };
        if parsed.is_none() {
            self.error(
                path,
                format!(
                    "expected a duration such as 30, \"300ms\" or \"5m\", got {}",
                    describe(value)
                ),
            );
        }
        parsed
    }

    /// A size in bytes: a whole number, or text such as `"512KiB"`, `"1 MiB"`, `"16MB"`.
    pub fn byte_size(&mut self, path: &str) -> Option<u64> {
        let value = self.get(path)?;
        let parsed = match value {
            Value::Integer(n) if *n > 0 => Some(*n as u64),
            Value::String(text) => parse_byte_size(text),
            _ => None,
        };
        if parsed.is_none() {
            self.error(
                path,
                format!(
                    "expected a size such as 1048576 or \"1MiB\", got {}",
                    describe(value)
                ),
            );
        }
        parsed
    }

    /// A list of strings: a TOML array, or text holding a TOML array or comma-separated items.
    pub fn string_list(&mut self, path: &str) -> Option<Vec<String>> {
        let value = self.get(path)?;
        let items: Option<Vec<String>> = match value {
            Value::Array(items) => items
                .iter()
                .map(|item| item.as_str().map(str::to_owned))
                .collect(),
            Value::String(text) if text.trim_start().starts_with('[') => parse_inline(text)
                .and_then(|value| match value {
                    Value::Array(items) => items
                        .iter()
                        .map(|item| item.as_str().map(str::to_owned))
                        .collect(),
                    _ => None,
                }),
            Value::String(text) => Some(
                text.split(',')
                    .map(str::trim)
                    .filter(|item| !item.is_empty())
                    .map(str::to_owned)
                    .collect(),
            ),
            _ => None,
        };
        if items.is_none() {
            self.error(
                path,
                format!("expected a list of strings, got {}", describe(value)),
            );
        }
        items
    }

    /// An array of tables (`[[tokens]]`), from the file or as TOML text from the environment.
    pub fn tables(&mut self, path: &str) -> Option<Vec<Table>> {
        let value = self.get(path)?;
        let owned;
        let value = match value {
            Value::String(text) => {
                match parse_inline(text) {
                    Some(parsed) => {
                        owned = parsed;
                        &owned
                    }
                    None => {
                        self.error(path, "expected a TOML array of tables, e.g. [{ name = \"a\", token = \"…\" }]");
                        return None;
                    }
                }
            }
            value => value,
        };
        let tables: Option<Vec<Table>> = match value {
            Value::Array(items) => items.iter().map(|item| item.as_table().cloned()).collect(),
            _ => None,
        };
        if tables.is_none() {
            self.error(
                path,
                format!("expected an array of tables, got {}", describe(value)),
            );
        }
        tables
    }

    /// Reports every key in the table that nothing read.
    pub fn report_unknown_keys(&mut self) {
        let mut unknown = Vec::new();
        collect_unknown(&self.layered.table, "", &self.read, &mut unknown);
        for path in unknown {
            self.error(&path, "unknown configuration key");
        }
    }
}

fn collect_unknown(table: &Table, prefix: &str, read: &HashSet<String>, out: &mut Vec<String>) {
    for (key, value) in table {
        let path = if prefix.is_empty() {
            key.clone()
        } else {
            format!("{prefix}.{key}")
        };
        if read.contains(&path) {
            continue;
        }
        match value {
            Value::Table(child) if super::is_section(&path) => {
                collect_unknown(child, &path, read, out)
            }
            _ => out.push(path),
        }
    }
}

fn describe(value: &Value) -> String {
    match value {
        Value::String(text) => format!("{text:?}"),
        other => format!("{} {other}", other.type_str()),
    }
}

/// Parses a TOML value written on its own (as the environment carries arrays and tables).
fn parse_inline(text: &str) -> Option<Value> {
    let table: Table = format!("value = {text}").parse().ok()?;
    table.get("value").cloned()
}

/// Whole seconds or a humantime duration.
pub fn parse_duration(text: &str) -> Option<Duration> {
    let text = text.trim();
    if let Ok(seconds) = text.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    humantime::parse_duration(text).ok()
}

/// Bytes, with an optional unit (B, KB, KiB, MB, MiB, GB, GiB; case-insensitive).
pub fn parse_byte_size(text: &str) -> Option<u64> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let number: u64 = digits.parse().ok()?;
    let multiplier: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1000,
        "kib" | "k" => 1024,
        "mb" => 1000 * 1000,
        "mib" | "m" => 1024 * 1024,
        "gb" => 1000 * 1000 * 1000,
        "gib" | "g" => 1024 * 1024 * 1024,
        _ => return None,
    };
    number.checked_mul(multiplier).filter(|&bytes| bytes > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_sizes_parse() {
        assert_eq!(parse_duration("30"), Some(Duration::from_secs(30)));
        assert_eq!(parse_duration("300ms"), Some(Duration::from_millis(300)));
        assert_eq!(parse_duration("5m"), Some(Duration::from_secs(300)));
        assert_eq!(parse_duration("soon"), None);
        assert_eq!(parse_byte_size("1MiB"), Some(1 << 20));
        assert_eq!(parse_byte_size("16 MB"), Some(16_000_000));
        assert_eq!(parse_byte_size("512"), Some(512));
        assert_eq!(parse_byte_size("0"), None);
        assert_eq!(parse_byte_size("1 parsec"), None);
    }
}

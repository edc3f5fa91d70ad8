//! How meshctl prints: tables with padded columns, JSON or YAML, and times relative to now.

use clap::ValueEnum;
use time::OffsetDateTime;

#[derive(Clone, Copy, ValueEnum)]
pub enum Format {
    Table,
    Json,
    Yaml,
}

/// How `inspect` prints what has no table.
#[derive(Clone, Copy, ValueEnum)]
pub enum DataFormat {
    Json,
    Yaml,
}

/// What `ls` of networks, services and secrets takes.
#[derive(clap::Args)]
pub struct ListArgs {
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
    /// Only the names, one per line.
    #[arg(short, long)]
    pub quiet: bool,
}

/// What `inspect` of a network, a service or a secret takes.
#[derive(clap::Args)]
pub struct InspectArgs {
    pub name: String,
    #[arg(long, value_enum, default_value_t = DataFormat::Json)]
    pub format: DataFormat,
}

impl From<DataFormat> for Format {
    fn from(f: DataFormat) -> Format {
        match f {
            DataFormat::Json => Format::Json,
            DataFormat::Yaml => Format::Yaml,
        }
    }
}

/// `value` as JSON (pretty) or YAML, a newline at the end; tables are each command's own.
pub fn data(format: Format, value: &impl serde::Serialize) -> anyhow::Result<String> {
    Ok(match format {
        Format::Yaml => yaml(&serde_json::to_value(value)?),
        Format::Json | Format::Table => format!("{}\n", serde_json::to_string_pretty(value)?),
    })
}

/// `value` in YAML's block style; a string is written plain only when YAML reads it back as
/// the same string, else double-quoted (JSON's escapes are YAML's).
pub fn yaml(value: &serde_json::Value) -> String {
    let mut out = String::new();
    match value {
        serde_json::Value::Object(m) if !m.is_empty() => block(value, 0, &mut out),
        serde_json::Value::Array(a) if !a.is_empty() => block(value, 0, &mut out),
        scalar => {
            out.push_str(&inline(scalar));
            out.push('\n');
        }
    }
    out
}

/// A scalar, or an empty map or list, on one line.
fn inline(value: &serde_json::Value) -> String {
    use serde_json::Value;
    match value {
        Value::Null => "null".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => text(s),
        Value::Array(_) => "[]".into(),
        Value::Object(_) => "{}".into(),
    }
}

fn text(s: &str) -> String {
    let reserved = ["true", "false", "yes", "no", "on", "off", "null", "y", "n", "~"];
    let plain = s.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '/')
        && s.chars().all(|c| c.is_ascii_alphanumeric() || "_./-".contains(c))
        && !reserved.contains(&s.to_ascii_lowercase().as_str());
    if plain { s.to_owned() } else { serde_json::to_string(s).expect("a string serializes") }
}

fn nested(value: &serde_json::Value) -> bool {
    match value {
        serde_json::Value::Object(m) => !m.is_empty(),
        serde_json::Value::Array(a) => !a.is_empty(),
        _ => false,
    }
}

/// A non-empty map or list, each line indented by `indent` spaces.
fn block(value: &serde_json::Value, indent: usize, out: &mut String) {
    let pad = " ".repeat(indent);
    match value {
        serde_json::Value::Object(map) => {
            for (key, v) in map {
                out.push_str(&format!("{pad}{}:", text(key)));
                if nested(v) {
                    out.push('\n');
                    block(v, indent + 2, out);
                } else {
                    out.push_str(&format!(" {}\n", inline(v)));
                }
            }
        }
        serde_json::Value::Array(items) => {
            for v in items {
                if nested(v) {
                    // The item's first line follows the dash; the rest line up under it.
                    let mut item = String::new();
                    block(v, indent + 2, &mut item);
                    out.push_str(&format!("{pad}- {}", &item[indent + 2..]));
                } else {
                    out.push_str(&format!("{pad}- {}\n", inline(v)));
                }
            }
        }
        _ => out.push_str(&format!("{pad}{}\n", inline(value))),
    }
}

pub fn when(t: Option<OffsetDateTime>) -> String {
    let Some(t) = t else { return "-".to_owned() };
    let now = OffsetDateTime::now_utc();
    let secs = (t - now).whole_seconds();
    let span = humantime::format_duration(std::time::Duration::from_secs(secs.unsigned_abs()));
    // Keep the two largest units: "23h 59m", not "23h 59m 58s".
    let short: Vec<_> = span.to_string().split(' ').take(2).map(str::to_owned).collect();
    if secs >= 0 { format!("in {}", short.join(" ")) } else { format!("{} ago", short.join(" ")) }
}

/// Columns padded to their widest cell.
pub fn render(header: &[&str], rows: impl Iterator<Item = Vec<String>>) -> String {
    let rows: Vec<Vec<String>> = rows.collect();
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let padded: Vec<String> = cells.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        out.push_str(padded.join("  ").trim_end());
        out.push('\n');
    };
    line(header.to_vec());
    for row in &rows {
        line(row.iter().map(String::as_str).collect());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What YAML a reader makes of the output is what was printed: maps, lists (of maps, of
    /// lists), and every string that YAML would take for something else.
    #[test]
    fn yaml_reads_back_as_the_value_printed() {
        let value = serde_json::json!({
            "name": "api",
            "replicas": 3,
            "ratio": 0.5,
            "signed": true,
            "none": null,
            "empty_list": [],
            "empty_map": {},
            "tricky": ["yes", "No", "null", "~", "1.5", "0x10", "", " lead", "a: b", "- x", "#c",
                       "quote\"d", "new\nline", "10.0.0.1/24", "*star", "@at", "été", "key=value"],
            "endpoints": [
                {"slot": 1, "addresses": {"front": "10.1.0.2"}, "state": "running"},
                {"slot": 2, "addresses": {}, "ports": [[80, "http"], [443]]}
            ],
            "nested": {"deeper": {"deepest": ["a", {"b": "c"}]}},
            "1": "numeric key",
            "true": "boolean key"
        });
        let printed = yaml(&value);
        let read: serde_json::Value =
            serde_yaml::from_str(&printed).unwrap_or_else(|e| panic!("{e}\n{printed}"));
        assert_eq!(read, value, "{printed}");
        assert!(printed.contains("\nname: api\n") && printed.contains("\n  - addresses:\n"), "{printed}");
        for scalar in
            [serde_json::json!("yes"), serde_json::json!(7), serde_json::json!([]), serde_json::json!(null)]
        {
            let read: serde_json::Value = serde_yaml::from_str(&yaml(&scalar)).unwrap();
            assert_eq!(read, scalar);
        }
    }
}

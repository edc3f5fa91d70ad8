//! How meshctl prints: tables with padded columns, JSON, and times relative to now.

use clap::ValueEnum;
use time::OffsetDateTime;

#[derive(Clone, Copy, ValueEnum)]
pub enum Format {
    Table,
    Json,
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

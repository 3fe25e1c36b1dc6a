//! `api usage`: token usage per day, org and model as a plain text table (operators).

use chrono::{DateTime, NaiveDate, SecondsFormat, Utc};
use store::budgets::{Period, Standing};
use store::usage::Row;

/// Parse a `YYYY-MM-DD` day (clap value parser for `--since`).
pub fn parse_day(s: &str) -> Result<NaiveDate, String> {
    NaiveDate::parse_from_str(s, "%Y-%m-%d")
        .map_err(|e| format!("expected a date as YYYY-MM-DD ({e})"))
}

/// The report: a header, one line per row, and a `total` line; columns separated by two spaces,
/// numbers right-aligned.
pub fn render(rows: &[Row]) -> String {
    let header = ["day", "org", "model", "requests", "prompt", "completion"];
    let mut lines: Vec<[String; 6]> = Vec::with_capacity(rows.len() + 2);
    lines.push(header.map(str::to_owned));
    let (mut requests, mut prompt, mut completion) = (0i64, 0i64, 0i64);
    for r in rows {
        requests = requests.saturating_add(r.requests);
        prompt = prompt.saturating_add(r.prompt_tokens);
        completion = completion.saturating_add(r.completion_tokens);
        lines.push([
            r.day.to_string(),
            r.org_id.to_string(),
            r.model.clone(),
            r.requests.to_string(),
            r.prompt_tokens.to_string(),
            r.completion_tokens.to_string(),
        ]);
    }
    lines.push([
        "total".to_owned(),
        String::new(),
        String::new(),
        requests.to_string(),
        prompt.to_string(),
        completion.to_string(),
    ]);
    let mut widths = [0usize; 6];
    for line in &lines {
        for (w, cell) in widths.iter_mut().zip(line) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for line in &lines {
        let cells: Vec<String> = line
            .iter()
            .zip(widths)
            .enumerate()
            .map(|(i, (cell, w))| {
                if i >= 3 {
                    format!("{cell:>w$}")
                } else {
                    format!("{cell:<w$}")
                }
            })
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// One org's budget below its table (`api usage --org`): per period, the limit (or
/// `unlimited`), what was used, what open turns hold, what is left, and when it resets.
pub fn render_budget(s: &Standing, now: DateTime<Utc>) -> String {
    let mut out = String::new();
    for (period, limit, used, left) in [
        (
            Period::Day,
            s.daily_limit,
            s.used_today,
            s.remaining_today(),
        ),
        (
            Period::Month,
            s.monthly_limit,
            s.used_this_month,
            s.remaining_this_month(),
        ),
    ] {
        let limit = limit.map_or_else(|| "unlimited".to_owned(), |l| l.to_string());
        let left = left.map_or_else(|| "unlimited".to_owned(), |l| l.to_string());
        out.push_str(&format!(
            "budget {}: limit={limit} used={used} reserved={} left={left} resets={}\n",
            period.as_str(),
            s.reserved,
            period
                .resets_at(now)
                .to_rfc3339_opts(SecondsFormat::Secs, true)
        ));
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn days_are_strict_yyyy_mm_dd() {
        assert_eq!(
            parse_day("2026-11-03").unwrap(),
            NaiveDate::from_ymd_opt(2026, 11, 3).unwrap()
        );
        for bad in ["2026-13-01", "yesterday", "2026/11/03", ""] {
            assert!(parse_day(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_table_aligns_columns_and_ends_with_totals() {
        let org = uuid::Uuid::nil();
        let row = |day: u32, model: &str, n: i64| Row {
            day: NaiveDate::from_ymd_opt(2026, 11, day).unwrap(),
            org_id: org.into(),
            model: model.to_owned(),
            requests: n,
            prompt_tokens: n * 100,
            completion_tokens: n * 10,
        };
        let out = render(&[row(1, "a", 1), row(2, "local-chat", 12)]);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 4, "{out}");
        assert!(lines[0].starts_with("day         org "), "{out}");
        assert!(lines[0].ends_with("requests  prompt  completion"), "{out}");
        assert!(lines[2].contains("local-chat"), "{out}");
        assert!(lines[2].ends_with("      12    1200         120"), "{out}");
        assert!(lines[3].starts_with("total"), "{out}");
        assert!(lines[3].ends_with("      13    1300         130"), "{out}");
        // every line but the totals has the same width
        assert_eq!(lines[0].len(), lines[1].len());
        assert_eq!(lines[1].len(), lines[2].len());
        // no rows: a header and zero totals
        assert_eq!(render(&[]).lines().count(), 2);
    }
}

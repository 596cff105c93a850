//! The report's charts, drawn as inline SVG: a file that needs no script
//! and no network opens anywhere, at once. Only numbers go in (never a row's
//! text), so nothing here needs escaping.

use std::fmt::Write;

/// Bars of the over-time chart, and bins of the latency histogram.
pub const BARS: usize = 120;
pub const BINS: usize = 40;

const WIDTH: f64 = 800.0;
const HEIGHT: f64 = 160.0;
/// Room below the bars for the axis labels.
const AXIS: f64 = 18.0;

/// `850 ms`, `1.20 s`, `2 min 03 s`.
pub fn duration(ms: f64) -> String {
    match ms {
        ms if ms < 1_000.0 => format!("{ms:.0} ms"),
        ms if ms < 60_000.0 => format!("{:.2} s", ms / 1000.0),
        ms => format!("{} min {:02} s", (ms / 60_000.0) as u64, ((ms % 60_000.0) / 1000.0) as u64),
    }
}

fn clock(unix: i64) -> String {
    let stamp = crate::jobs::when(unix);
    stamp.get(11..19).unwrap_or(&stamp).to_owned()
}

fn svg(label: &str, body: &str) -> String {
    let height = HEIGHT + AXIS;
    format!(
        r#"<svg class="chart" role="img" aria-label="{label}" viewBox="0 0 {WIDTH} {height}" width="100%" preserveAspectRatio="none">{body}</svg>"#
    )
}

/// Records finished over time, answered (green) under the rest (red), one
/// bar per bucket of `(start, seconds, answered, not)`.
pub fn over_time(buckets: &[(i64, i64, u64, u64)]) -> String {
    let Some(most) = buckets.iter().map(|b| b.2 + b.3).max().filter(|m| *m > 0) else {
        return String::new();
    };
    let width = WIDTH / buckets.len() as f64;
    let mut body = String::new();
    for (i, &(start, seconds, answered, not)) in buckets.iter().enumerate() {
        let x = i as f64 * width;
        let scale = |n: u64| n as f64 / most as f64 * (HEIGHT - 4.0);
        let (ok, bad) = (scale(answered), scale(not));
        let title = format!("{} +{seconds} s: {answered} answered, {not} not", clock(start));
        let _ = write!(
            body,
            r#"<g><title>{title}</title><rect class="ok" x="{x:.1}" y="{:.1}" width="{:.1}" height="{ok:.1}"/><rect class="bad" x="{x:.1}" y="{:.1}" width="{:.1}" height="{bad:.1}"/></g>"#,
            HEIGHT - ok,
            (width - 1.0).max(0.5),
            HEIGHT - ok - bad,
            (width - 1.0).max(0.5),
        );
    }
    let (first, last) = (buckets[0].0, buckets[buckets.len() - 1].0 + buckets[buckets.len() - 1].1);
    let per = buckets[0].1;
    let _ = write!(
        body,
        r#"<text x="0" y="{y}">{}</text><text x="{WIDTH}" y="{y}" text-anchor="end">{}</text><text x="{mid}" y="{y}" text-anchor="middle">most: {most} in {per} s</text>"#,
        clock(first),
        clock(last),
        y = HEIGHT + AXIS - 4.0,
        mid = WIDTH / 2.0,
    );
    svg("records finished over time", &body)
}

/// Answered calls by latency (a log scale), with the quantiles marked.
pub fn latency(bins: &[(f64, f64, u64)], quantiles: &[(f64, f64)]) -> String {
    let Some(most) = bins.iter().map(|b| b.2).max().filter(|m| *m > 0) else {
        return String::new();
    };
    let (low, high) = (bins[0].0, bins[bins.len() - 1].1);
    if !(high > low && low > 0.0) {
        return String::new();
    }
    let x_of = |ms: f64| ((ms.max(low) / low).ln() / (high / low).ln() * WIDTH).clamp(0.0, WIDTH);
    let mut body = String::new();
    for &(from, to, count) in bins {
        let (x, end) = (x_of(from), x_of(to));
        let h = count as f64 / most as f64 * (HEIGHT - 4.0);
        let title = format!("{} to {}: {count}", duration(from), duration(to));
        let _ = write!(
            body,
            r#"<g><title>{title}</title><rect class="ok" x="{x:.1}" y="{:.1}" width="{:.1}" height="{h:.1}"/></g>"#,
            HEIGHT - h,
            (end - x - 1.0).max(0.5),
        );
    }
    for (line, &(q, ms)) in quantiles.iter().enumerate() {
        let x = x_of(ms);
        // One line each, so that close quantiles do not overlap; near the
        // right edge, to the left of their line.
        let (label_x, anchor) =
            if x > WIDTH * 0.88 { (x - 3.0, "end") } else { (x + 3.0, "start") };
        let _ = write!(
            body,
            r#"<line class="quantile" x1="{x:.1}" x2="{x:.1}" y1="0" y2="{HEIGHT}"/><text class="quantile" x="{label_x:.1}" y="{}" text-anchor="{anchor}">p{} {}</text>"#,
            12 + 12 * line,
            (q * 100.0).round(),
            duration(ms),
        );
    }
    let _ = write!(
        body,
        r#"<text x="0" y="{y}">{}</text><text x="{WIDTH}" y="{y}" text-anchor="end">{}</text>"#,
        duration(low),
        duration(high),
        y = HEIGHT + AXIS - 4.0,
    );
    svg("latency distribution", &body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_naturally() {
        assert_eq!(duration(850.4), "850 ms");
        assert_eq!(duration(1_204.0), "1.20 s");
        assert_eq!(duration(123_000.0), "2 min 03 s");
    }

    #[test]
    fn charts_have_a_bar_per_bucket_and_a_line_per_quantile() {
        let buckets = [(1_000, 1, 5, 1), (1_001, 1, 0, 0), (1_002, 1, 3, 0)];
        let drawn = over_time(&buckets);
        assert_eq!(drawn.matches("<g>").count(), 3);
        assert!(drawn.starts_with("<svg") && drawn.contains("most: 6 in 1 s"), "{drawn}");
        let bins = [(10.0, 20.0, 4), (20.0, 40.0, 1)];
        let drawn = latency(&bins, &[(0.5, 12.0), (0.99, 35.0)]);
        assert_eq!(drawn.matches("class=\"quantile\" x1").count(), 2);
        assert!(drawn.contains("p99 35 ms"), "{drawn}");
        assert_eq!(over_time(&[]), "");
    }
}

//! The report's charts, drawn as inline SVG: a file that needs no script
//! and no network opens anywhere, at once. Only numbers go in (never a row's
//! text), so nothing here needs escaping.

use std::fmt::Write;

use super::calls::Calls;

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

/// The labels under a chart: its start on the left, its end on the right,
/// and what a reader needs to scale it in the middle.
fn axis(body: &mut String, y: f64, left: &str, right: &str, middle: Option<&str>) {
    let _ = write!(
        body,
        r#"<text x="0" y="{y}">{left}</text><text x="{WIDTH}" y="{y}" text-anchor="end">{right}</text>"#
    );
    if let Some(middle) = middle {
        let mid = WIDTH / 2.0;
        let _ = write!(body, r#"<text x="{mid}" y="{y}" text-anchor="middle">{middle}</text>"#);
    }
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
    let scale = format!("most: {most} in {per} s");
    axis(&mut body, HEIGHT + AXIS - 4.0, &clock(first), &clock(last), Some(&scale));
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
    axis(&mut body, HEIGHT + AXIS - 4.0, &duration(low), &duration(high), None);
    svg("latency distribution", &body)
}

/// One lane per concurrency slot the calls used, each call a bar coloured by
/// what it was and how it ended, and every pause of the run a band across
/// all lanes.
pub fn timeline(calls: &Calls) -> String {
    let (Some(first), Some(last)) = (calls.first_ms, calls.last_ms) else {
        return String::new();
    };
    let pauses = calls.pauses.iter().map(|&(at, ms, _)| (at, at + ms as i64));
    let (first, last) = pauses.fold((first, last), |(f, l), (from, to)| (f.min(from), l.max(to)));
    let span = (last - first).max(1) as f64;
    let x_of = |ms: i64| (ms - first) as f64 / span * WIDTH;
    let (placed, lanes) = calls.lanes();
    let lane_height = (300.0 / lanes.max(1) as f64).clamp(2.0, 12.0);
    let height = lanes as f64 * lane_height;
    let mut by_lane = vec![String::new(); lanes];
    for (lane, drawn) in placed {
        let x = x_of(drawn.sent_ms);
        let width = (f64::from(drawn.elapsed_ms) / span * WIDTH).max(0.8);
        let _ = write!(
            by_lane[lane],
            r#"<rect class="call {}" x="{x:.1}" y="{:.1}" width="{width:.1}" height="{:.1}"><title>row {}: {}, {}</title></rect>"#,
            drawn.look.class(),
            lane as f64 * lane_height,
            (lane_height - 0.5).max(1.0),
            drawn.index,
            drawn.what,
            duration(f64::from(drawn.elapsed_ms)),
        );
    }
    let mut body = String::new();
    for lane in by_lane {
        let _ = write!(body, r#"<g class="lane">{lane}</g>"#);
    }
    for &(at, ms, _) in &calls.pauses {
        let _ = write!(
            body,
            r#"<rect class="pause" x="{:.1}" y="0" width="{:.1}" height="{height:.1}"><title>every call paused {}</title></rect>"#,
            x_of(at),
            (ms / span * WIDTH).max(1.0),
            duration(ms),
        );
    }
    let scale = format!("{lanes} lanes over {}", duration(span));
    let (from, to) = (clock(first.div_euclid(1000)), clock(last.div_euclid(1000)));
    axis(&mut body, height + AXIS - 4.0, &from, &to, Some(&scale));
    let total = height + AXIS;
    format!(
        r#"<svg class="chart timeline" role="img" aria-label="timeline of the calls" viewBox="0 0 {WIDTH} {total}" width="100%" preserveAspectRatio="none">{body}</svg>"#
    )
}

/// Calls in flight (the average over each bucket), with the concurrency
/// limit as a line and the 429s that came back as red bars:
/// buckets of `(start, seconds, in flight, sent, 429s)`.
pub fn load(buckets: &[(i64, i64, f64, u64, u64)], limits: &[(i64, f64)]) -> String {
    let Some(&(first, width_s, ..)) = buckets.first() else { return String::new() };
    let most_limit = limits.iter().map(|l| l.1).fold(0.0, f64::max);
    let most = buckets.iter().map(|b| b.2).fold(most_limit, f64::max).max(1.0);
    let most_limited = buckets.iter().map(|b| b.4).max().unwrap_or(0).max(1);
    let width = WIDTH / buckets.len() as f64;
    let span_s = (buckets.len() as i64 * width_s) as f64;
    let mut body = String::new();
    for (i, &(start, seconds, in_flight, sent, limited)) in buckets.iter().enumerate() {
        let x = i as f64 * width;
        let h = in_flight / most * (HEIGHT - 4.0);
        let red = limited as f64 / most_limited as f64 * HEIGHT / 3.0;
        let title = format!(
            "{} +{seconds} s: {in_flight:.1} in flight, {sent} sent, {limited} rate-limited",
            clock(start)
        );
        let _ = write!(
            body,
            r#"<g><title>{title}</title><rect class="inflight" x="{x:.1}" y="{:.1}" width="{w:.1}" height="{h:.1}"/><rect class="limited" x="{x:.1}" y="{:.1}" width="{w:.1}" height="{red:.1}"/></g>"#,
            HEIGHT - h,
            HEIGHT - red,
            w = (width - 1.0).max(0.5),
        );
    }
    if !limits.is_empty() {
        // A step line: each limit holds until the next.
        let y_of = |limit: f64| HEIGHT - limit / most * (HEIGHT - 4.0);
        let x_of =
            |ms: i64| ((ms as f64 / 1000.0 - first as f64) / span_s * WIDTH).clamp(0.0, WIDTH);
        let mut points = String::new();
        for (i, &(at, limit)) in limits.iter().enumerate() {
            let x = x_of(at);
            if i > 0 {
                let _ = write!(points, "{x:.1},{:.1} ", y_of(limits[i - 1].1));
            }
            let _ = write!(points, "{x:.1},{:.1} ", y_of(limit));
        }
        let _ = write!(points, "{WIDTH:.1},{:.1}", y_of(limits[limits.len() - 1].1));
        let _ = write!(body, r#"<polyline class="limit" points="{points}"/>"#);
    }
    let (last, per) = (first + span_s as i64, width_s);
    let scale = format!("most in flight: {most:.0}; a bar is {per} s");
    axis(&mut body, HEIGHT + AXIS - 4.0, &clock(first), &clock(last), Some(&scale));
    svg("calls in flight and 429s over time", &body)
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

    #[test]
    fn the_timeline_has_a_lane_per_slot_and_a_band_per_pause() {
        use crate::history::{Role, StoredCall};
        let mut calls = Calls::default();
        let call = |sent_ms, end: &str| StoredCall {
            sent_ms,
            elapsed_ms: 400,
            role: Role::First,
            end: end.into(),
            status: None,
            first_token_ms: None,
            input_tokens: 0,
            output_tokens: 0,
        };
        calls.add(0, &call(1_000, "rate_limited"));
        calls.add(1, &call(1_100, "ok"));
        calls.add_event(&fanout_store::RunEvent {
            at_ms: 1_400,
            kind: "pause".into(),
            value: 1_000.0,
            detail: Some("429".into()),
        });
        let drawn = timeline(&calls);
        assert_eq!(drawn.matches(r#"<g class="lane">"#).count(), 2);
        assert_eq!(drawn.matches(r#"class="pause""#).count(), 1);
        assert!(
            drawn.contains(r#"class="call limited""#) && drawn.contains("every call paused 1.00 s")
        );
        assert_eq!(timeline(&Calls::default()), "");
        let drawn = load(&calls.load(10), &[(1_000, 4.0), (1_500, 2.0)]);
        assert_eq!(drawn.matches(r#"class="limit""#).count(), 1);
        assert!(drawn.contains("rate-limited"), "{drawn}");
    }
}

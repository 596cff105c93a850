//! Rate-limit headers, parsed into one structure the executor acts on.
//!
//! Understood: `Retry-After` (seconds or an HTTP date), `retry-after-ms`, and
//! OpenAI's `x-ratelimit-{limit,remaining,reset}-{requests,tokens}`, whose resets
//! are Go-style durations such as `6m0s`, `1.5s` or `20ms`, and Anthropic's
//! `anthropic-ratelimit-{requests,tokens}-{limit,remaining,reset}`, whose resets
//! are RFC 3339 times. Providers send these on
//! successes too: the executor uses the remaining budget to slow down before the
//! provider has to say 429.

use std::time::{Duration, SystemTime};

use http::HeaderMap;

/// Header names of the limit, remaining and reset of requests, then tokens.
/// Spelled out: they are looked up on every answer.
const OPENAI_NAMES: [[&str; 3]; 2] = [
    ["x-ratelimit-limit-requests", "x-ratelimit-remaining-requests", "x-ratelimit-reset-requests"],
    ["x-ratelimit-limit-tokens", "x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens"],
];
const ANTHROPIC_NAMES: [[&str; 3]; 2] = [
    [
        "anthropic-ratelimit-requests-limit",
        "anthropic-ratelimit-requests-remaining",
        "anthropic-ratelimit-requests-reset",
    ],
    [
        "anthropic-ratelimit-tokens-limit",
        "anthropic-ratelimit-tokens-remaining",
        "anthropic-ratelimit-tokens-reset",
    ],
];

/// One dimension of a provider's budget (requests or tokens).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Budget {
    /// The most the provider allows per window.
    pub limit: Option<u64>,
    /// What is left in the current window.
    pub remaining: Option<u64>,
    /// How long until the window is full again.
    pub reset: Option<Duration>,
}

impl Budget {
    fn is_empty(&self) -> bool {
        self.limit.is_none() && self.remaining.is_none() && self.reset.is_none()
    }

    fn is_exhausted(&self) -> bool {
        self.remaining == Some(0)
    }
}

/// Everything an answer said about rate limits.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RateLimit {
    /// An explicit request to wait (`retry-after-ms` or `Retry-After`).
    pub retry_after: Option<Duration>,
    /// The provider's request budget.
    pub requests: Budget,
    /// The provider's token budget.
    pub tokens: Budget,
}

impl RateLimit {
    /// Reads the headers of an answer. `now` turns an HTTP-date `Retry-After`
    /// into a duration. Returns `None` when no rate-limit header is present.
    pub fn from_headers(headers: &HeaderMap, now: SystemTime) -> Option<Self> {
        let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::trim);
        let number = |name: &str| text(name).and_then(|v| v.parse().ok());
        let budget = |dimension: usize| {
            let [limit, remaining, reset] = OPENAI_NAMES[dimension];
            let openai = Budget {
                limit: number(limit),
                remaining: number(remaining),
                reset: text(reset).and_then(parse_duration),
            };
            if !openai.is_empty() {
                return openai;
            }
            let [limit, remaining, reset] = ANTHROPIC_NAMES[dimension];
            Budget {
                limit: number(limit),
                remaining: number(remaining),
                reset: text(reset).and_then(|at| parse_reset_time(at, now)),
            }
        };
        let retry_after = text("retry-after-ms")
            .and_then(|ms| ms.parse::<f64>().ok())
            .and_then(|ms| Duration::try_from_secs_f64(ms / 1000.0).ok())
            .or_else(|| text("retry-after").and_then(|v| parse_retry_after(v, now)));
        let parsed = Self { retry_after, requests: budget(0), tokens: budget(1) };
        (!parsed.is_empty()).then_some(parsed)
    }

    /// Whether the answer said nothing about rate limits.
    pub fn is_empty(&self) -> bool {
        self.retry_after.is_none() && self.requests.is_empty() && self.tokens.is_empty()
    }

    /// How long a rate-limited caller should wait: the explicit retry-after, else
    /// the reset of whichever budget is exhausted, else the longest reset.
    pub fn wait_hint(&self) -> Option<Duration> {
        if self.retry_after.is_some() {
            return self.retry_after;
        }
        let exhausted = [self.requests, self.tokens]
            .into_iter()
            .filter(Budget::is_exhausted)
            .filter_map(|b| b.reset)
            .max();
        exhausted.or_else(|| self.requests.reset.max(self.tokens.reset))
    }
}

/// `Retry-After` is either delay-seconds or an HTTP date (RFC 9110 §10.2.3);
/// some servers send fractional seconds, which are accepted too.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<f64>() {
        return Duration::try_from_secs_f64(seconds).ok();
    }
    let at = httpdate::parse_http_date(value).ok()?;
    // A date in the past means "now".
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// An RFC 3339 reset time (`2024-10-18T17:38:20Z`) as a duration from `now`.
fn parse_reset_time(value: &str, now: SystemTime) -> Option<Duration> {
    let at = humantime::parse_rfc3339_weak(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// Parses Go-style durations as OpenAI sends them: `6m0s`, `1h2m3.5s`, `20ms`,
/// `0.5s`, `150us`. A bare number is seconds.
pub fn parse_duration(value: &str) -> Option<Duration> {
    let value = value.trim();
    if value.is_empty() {
        return None;
    }
    if let Ok(seconds) = value.parse::<f64>() {
        return Duration::try_from_secs_f64(seconds).ok();
    }
    let mut total = 0.0_f64;
    let mut rest = value;
    while !rest.is_empty() {
        let number_end = rest.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
        let number: f64 = rest[..number_end].parse().ok()?;
        rest = &rest[number_end..];
        let unit_end = rest.find(|c: char| c.is_ascii_digit() || c == '.').unwrap_or(rest.len());
        let seconds_per_unit = match &rest[..unit_end] {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 1e-3,
            "us" | "µs" => 1e-6,
            "ns" => 1e-9,
            _ => return None,
        };
        total += number * seconds_per_unit;
        rest = &rest[unit_end..];
    }
    Duration::try_from_secs_f64(total).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(*name, HeaderValue::from_str(value).unwrap());
        }
        map
    }

    #[test]
    fn go_durations() {
        let ms = Duration::from_millis;
        assert_eq!(parse_duration("6m0s"), Some(ms(360_000)));
        assert_eq!(parse_duration("20ms"), Some(ms(20)));
        assert_eq!(parse_duration("1.5s"), Some(ms(1500)));
        assert_eq!(parse_duration("1h2m3s"), Some(ms(3_723_000)));
        assert_eq!(parse_duration("0.5"), Some(ms(500)));
        assert_eq!(parse_duration("150us"), Some(Duration::from_micros(150)));
        assert_eq!(parse_duration(""), None);
        assert_eq!(parse_duration("5 parsecs"), None);
        assert_eq!(parse_duration("m5"), None);
        assert_eq!(parse_duration("-1s"), None);
    }

    #[test]
    fn retry_after_seconds_and_http_date() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(784_111_777);
        assert_eq!(parse_retry_after("120", now), Some(Duration::from_secs(120)));
        assert_eq!(parse_retry_after("0.25", now), Some(Duration::from_millis(250)));
        // 784111777 is Sun, 06 Nov 1994 08:49:37 GMT.
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:50:07 GMT", now),
            Some(Duration::from_secs(30))
        );
        assert_eq!(parse_retry_after("Sun, 06 Nov 1994 08:00:00 GMT", now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("soon", now), None);
    }

    #[test]
    fn retry_after_ms_wins_over_retry_after() {
        let map = headers(&[("retry-after", "2"), ("retry-after-ms", "1500.5")]);
        let limit = RateLimit::from_headers(&map, SystemTime::now()).unwrap();
        assert_eq!(limit.retry_after, Some(Duration::from_micros(1_500_500)));
    }

    #[test]
    fn openai_budget_headers() {
        let map = headers(&[
            ("x-ratelimit-limit-requests", "60"),
            ("x-ratelimit-remaining-requests", "0"),
            ("x-ratelimit-reset-requests", "1s"),
            ("x-ratelimit-limit-tokens", "150000"),
            ("x-ratelimit-remaining-tokens", "149000"),
            ("x-ratelimit-reset-tokens", "6m0s"),
        ]);
        let limit = RateLimit::from_headers(&map, SystemTime::now()).unwrap();
        assert_eq!(
            limit.requests,
            Budget { limit: Some(60), remaining: Some(0), reset: Some(Duration::from_secs(1)) }
        );
        assert_eq!(limit.tokens.remaining, Some(149_000));
        assert_eq!(limit.tokens.reset, Some(Duration::from_secs(360)));
        // The exhausted dimension decides the wait, not the longer token reset.
        assert_eq!(limit.wait_hint(), Some(Duration::from_secs(1)));
    }

    #[test]
    fn anthropic_budget_headers_with_rfc3339_resets() {
        let now = humantime::parse_rfc3339("2024-10-18T17:38:00Z").unwrap();
        let map = headers(&[
            ("anthropic-ratelimit-requests-limit", "50"),
            ("anthropic-ratelimit-requests-remaining", "0"),
            ("anthropic-ratelimit-requests-reset", "2024-10-18T17:38:20Z"),
            ("anthropic-ratelimit-tokens-remaining", "40000"),
            ("anthropic-ratelimit-tokens-reset", "2024-10-18T17:37:00Z"),
            ("retry-after", "20"),
        ]);
        let limit = RateLimit::from_headers(&map, now).unwrap();
        assert_eq!(
            limit.requests,
            Budget { limit: Some(50), remaining: Some(0), reset: Some(Duration::from_secs(20)) }
        );
        assert_eq!(limit.tokens.reset, Some(Duration::ZERO), "a reset in the past is now");
        assert_eq!(limit.retry_after, Some(Duration::from_secs(20)));
    }

    #[test]
    fn wait_hint_falls_back_to_longest_reset() {
        let map =
            headers(&[("x-ratelimit-reset-requests", "2s"), ("x-ratelimit-reset-tokens", "3s")]);
        let limit = RateLimit::from_headers(&map, SystemTime::now()).unwrap();
        assert_eq!(limit.wait_hint(), Some(Duration::from_secs(3)));
    }

    #[test]
    fn garbage_and_absent_headers() {
        assert_eq!(RateLimit::from_headers(&HeaderMap::new(), SystemTime::now()), None);
        let map = headers(&[("x-ratelimit-remaining-requests", "lots"), ("retry-after", "never")]);
        assert_eq!(RateLimit::from_headers(&map, SystemTime::now()), None);
    }
}

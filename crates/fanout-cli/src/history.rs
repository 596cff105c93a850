//! A job's history as the store keeps it: each task's calls (compact, in the
//! task's record) and what happened to the run as a whole (its events).
//!
//! A task's calls are one JSON array of arrays, a call each:
//! `[sent, elapsed, role, end, status, first_token, input_tokens, output_tokens]`
//! — `sent` in milliseconds since the Unix epoch, `elapsed` and `first_token`
//! in milliseconds (`first_token` null unless the call streamed), `role` one
//! letter (`f` first, `r` retry, `p` repair, `h` hedge), `end` `ok`,
//! `cancelled` or the error's kind (`rate_limited`, `server`, ...), `status`
//! the HTTP status of a failure (0 for none). Positional and short: a
//! one-call task costs about 45 bytes, so a million-row job's store grows by
//! a fraction, not twice over (see BENCHMARKS.md).

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fanout::{CallEnd, CallRecord, CallRole, Event};
use fanout_store::RunEvent;

/// One call as read back from the store.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredCall {
    pub sent_ms: i64,
    pub elapsed_ms: u32,
    pub role: Role,
    /// `ok`, `cancelled`, or the error's kind.
    pub end: String,
    /// The failure's HTTP status; `None` when it had none.
    pub status: Option<u16>,
    pub first_token_ms: Option<u32>,
    pub input_tokens: u64,
    pub output_tokens: u64,
}

/// Why a stored call was sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    First,
    Retry,
    Repair,
    Hedge,
}

impl Role {
    fn letter(self) -> &'static str {
        match self {
            Self::First => "f",
            Self::Retry => "r",
            Self::Repair => "p",
            Self::Hedge => "h",
        }
    }

    fn from_letter(letter: &str) -> Option<Self> {
        Some(match letter {
            "f" => Self::First,
            "r" => Self::Retry,
            "p" => Self::Repair,
            "h" => Self::Hedge,
            _ => return None,
        })
    }
}

impl From<CallRole> for Role {
    fn from(role: CallRole) -> Self {
        match role {
            CallRole::First => Self::First,
            CallRole::Retry => Self::Retry,
            CallRole::Repair => Self::Repair,
            CallRole::Hedge => Self::Hedge,
        }
    }
}

impl StoredCall {
    pub fn rate_limited(&self) -> bool {
        self.end == "rate_limited"
    }
}

/// A task's calls as the store keeps them; `None` when it made none.
pub fn encode(calls: &[CallRecord]) -> Option<String> {
    if calls.is_empty() {
        return None;
    }
    let rows: Vec<_> = calls
        .iter()
        .map(|call| {
            let (end, status) = match call.end {
                CallEnd::Answered => ("ok".to_owned(), 0),
                CallEnd::Cancelled => ("cancelled".to_owned(), 0),
                CallEnd::Failed { kind, status } => {
                    (crate::record::kind_name(kind), status.unwrap_or(0))
                }
            };
            serde_json::json!([
                epoch_ms(call.started_at),
                whole_ms(call.elapsed),
                Role::from(call.role).letter(),
                end,
                status,
                call.first_token.map(whole_ms),
                call.usage.input_tokens,
                call.usage.output_tokens,
            ])
        })
        .collect();
    Some(serde_json::Value::Array(rows).to_string())
}

type StoredRow = (i64, u32, String, String, u16, Option<u32>, u64, u64);

/// The calls a record keeps; empty when it keeps none (or an unreadable history).
pub fn decode(text: Option<&str>) -> Vec<StoredCall> {
    let Some(rows) = text.and_then(|t| serde_json::from_str::<Vec<StoredRow>>(t).ok()) else {
        return Vec::new();
    };
    rows.into_iter()
        .filter_map(|(sent_ms, elapsed_ms, role, end, status, first_token_ms, input, output)| {
            Some(StoredCall {
                sent_ms,
                elapsed_ms,
                role: Role::from_letter(&role)?,
                end,
                status: (status != 0).then_some(status),
                first_token_ms,
                input_tokens: input,
                output_tokens: output,
            })
        })
        .collect()
}

fn whole_ms(duration: Duration) -> u32 {
    u32::try_from(duration.as_millis()).unwrap_or(u32::MAX)
}

fn epoch_ms(at: SystemTime) -> i64 {
    at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// Kinds of run event, as stored.
pub mod kind {
    /// A run started; the value is its concurrency limit.
    pub const START: &str = "start";
    /// A run ended.
    pub const END: &str = "end";
    /// The concurrency limit moved; the value is the new limit.
    pub const LIMIT: &str = "limit";
    /// Every call was paused; the value is the pause's milliseconds.
    pub const PAUSE: &str = "pause";
}

/// What happened to a run as a whole, gathered from the executor's events
/// and handed to whoever commits the results (cheap to clone).
#[derive(Clone, Debug, Default)]
pub struct RunLog {
    events: Arc<Mutex<Vec<RunEvent>>>,
}

/// The run event an executor's event is, for those that concern the run as
/// a whole (a 429 pause, a new concurrency limit).
pub fn run_event(event: &Event) -> Option<RunEvent> {
    match event {
        Event::Paused { duration, error } => {
            let cause = match error.status() {
                Some(status) => format!("{status}: {}", error.message()),
                None => error.message().to_owned(),
            };
            Some(event_now(kind::PAUSE, duration.as_secs_f64() * 1000.0, Some(cause)))
        }
        Event::ConcurrencyChanged { limit } => Some(event_now(kind::LIMIT, *limit as f64, None)),
        _ => None,
    }
}

/// A run event that happens now.
pub fn event_now(kind: &str, value: f64, detail: Option<String>) -> RunEvent {
    RunEvent { at_ms: epoch_ms(SystemTime::now()), kind: kind.into(), value, detail }
}

impl RunLog {
    pub fn push(&self, kind: &str, value: f64, detail: Option<String>) {
        let event = event_now(kind, value, detail);
        self.events.lock().expect("never poisoned").push(event);
    }

    /// Keeps the events that concern the run as a whole.
    pub fn observe(&self, event: &Event) {
        if let Some(event) = run_event(event) {
            self.events.lock().expect("never poisoned").push(event);
        }
    }

    /// The events since the last take.
    pub fn take(&self) -> Vec<RunEvent> {
        std::mem::take(&mut *self.events.lock().expect("never poisoned"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fanout::{Behavior, ErrorKind, Executor, HedgePolicy, MockProvider, Request, Task};

    /// What the executor logged survives the store's compact form, to the millisecond.
    #[tokio::test(start_paused = true)]
    async fn calls_round_trip_through_the_stored_form() {
        let mock = MockProvider::new().with_latency(Duration::from_millis(100));
        mock.script(
            "p",
            [Behavior::rate_limited(None), Behavior::reply("slow").after(Duration::from_secs(9))],
        );
        let hedge = HedgePolicy::after(Duration::from_secs(1)).with_budget(1.0);
        let executor = Executor::builder(mock).probe(false).hedge(Some(hedge)).build();
        let report = executor.run([Task::new(Request::user("p"))]).await;
        let calls = &report.results[0].calls;
        let stored = decode(encode(calls).as_deref());
        assert_eq!(stored.len(), 3);
        let [limited, outrun, hedge] = &stored[..] else { unreachable!() };
        assert_eq!(
            (limited.role, limited.end.as_str(), limited.status),
            (Role::First, "rate_limited", Some(429))
        );
        assert_eq!(
            (outrun.role, outrun.end.as_str(), outrun.elapsed_ms),
            (Role::Retry, "cancelled", 1_100)
        );
        assert_eq!((hedge.role, hedge.end == "ok", hedge.elapsed_ms), (Role::Hedge, true, 100));
        assert_eq!(hedge.sent_ms - outrun.sent_ms, 1_000);
        assert_eq!(hedge.output_tokens, calls[2].usage.output_tokens);
        assert_eq!(limited.first_token_ms, None);
        assert!(matches!(calls[0].end, CallEnd::Failed { kind: ErrorKind::RateLimited, .. }));
    }

    #[test]
    fn no_calls_store_nothing_and_unreadable_histories_read_as_none() {
        assert_eq!(encode(&[]), None);
        assert!(decode(None).is_empty());
        assert!(decode(Some("not json")).is_empty());
        assert!(decode(Some(r#"[[1,2,"x","ok",0,null,0,0]]"#)).is_empty());
    }

    #[test]
    fn pauses_and_limit_changes_are_logged_with_their_cause() {
        let log = RunLog::default();
        let error = fanout::ProviderError::from_status(429, "slow down");
        log.observe(&Event::Paused { duration: Duration::from_millis(1500), error });
        log.observe(&Event::ConcurrencyChanged { limit: 12 });
        let events = log.take();
        assert_eq!(events.len(), 2);
        assert_eq!((events[0].kind.as_str(), events[0].value), (kind::PAUSE, 1500.0));
        assert_eq!(events[0].detail.as_deref(), Some("429: slow down"));
        assert_eq!((events[1].kind.as_str(), events[1].value), (kind::LIMIT, 12.0));
        assert!(log.take().is_empty(), "taken once");
    }
}

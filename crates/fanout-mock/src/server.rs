//! The shared decision for every request: rate limits, faults, latency, answers.

use std::sync::{Arc, Mutex};

use std::time::{Duration, Instant};
use tokio::sync::Semaphore;

use crate::answer;
use crate::bucket::{Bucket, Verdict};
use crate::config::Config;
use crate::stats::Stats;

/// A request, reduced to what the mock acts on (either API).
#[derive(Debug, Default)]
pub(crate) struct Call {
    /// Every message's text, system included.
    pub messages: Vec<String>,
    /// The last user message.
    pub prompt: String,
    pub n: u32,
    pub seed: Option<u64>,
}

/// The budgets after a request, for rate-limit headers.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Budgets {
    pub requests: Option<Verdict>,
    pub tokens: Option<Verdict>,
    /// Whether answers tell them in rate-limit headers (`Config::rate_limit_headers`).
    pub told: bool,
}

impl Budgets {
    /// How long a refused request should wait.
    pub(crate) fn retry_after(&self) -> Duration {
        [self.requests, self.tokens]
            .into_iter()
            .flatten()
            .filter(|v| !v.admitted)
            .map(|v| v.retry_after)
            .max()
            .unwrap_or(Duration::from_secs(1))
    }
}

/// What goes wrong with an answer on its way out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Cut {
    /// Stops after the first bytes for the hang time, then goes on.
    Stall,
    /// The connection is reset after the first bytes.
    Reset,
}

#[derive(Debug)]
pub(crate) enum Plan {
    RateLimited {
        budgets: Budgets,
        dimension: &'static str,
    },
    ServerError,
    Malformed,
    Answer {
        choices: Vec<String>,
        prompt_tokens: u64,
        completion_tokens: u64,
        budgets: Budgets,
        cut: Option<Cut>,
    },
}

#[derive(Debug)]
pub(crate) struct State {
    pub config: Config,
    rng: Mutex<fastrand::Rng>,
    rpm: Option<Mutex<Bucket>>,
    tpm: Option<Mutex<Bucket>>,
    ids: std::sync::atomic::AtomicU64,
    /// The server-side queue, when the capacity is limited.
    slots: Option<Arc<Semaphore>>,
    pub stats: Stats,
    pub batches: crate::batches::Batches,
    /// Where it listens: a Message Batch's results URL names it.
    pub addr: std::sync::OnceLock<std::net::SocketAddr>,
}

impl State {
    pub(crate) fn new(config: Config) -> Self {
        Self {
            rng: Mutex::new(fastrand::Rng::with_seed(config.seed)),
            rpm: config.rpm.map(|l| Mutex::new(Bucket::new(l))),
            tpm: config.tpm.map(|l| Mutex::new(Bucket::new(l))),
            ids: std::sync::atomic::AtomicU64::new(1),
            slots: config.capacity.map(|c| Arc::new(Semaphore::new(c.max(1)))),
            stats: Stats::default(),
            batches: crate::batches::Batches::default(),
            addr: std::sync::OnceLock::new(),
            config,
        }
    }

    /// How long generating `tokens` output tokens takes.
    pub(crate) fn generation_time(&self, tokens: u64) -> Duration {
        match self.config.tokens_per_second.filter(|t| *t > 0.0) {
            Some(tps) => Duration::from_secs_f64(tokens as f64 / tps),
            None => Duration::ZERO,
        }
    }

    /// Takes `wait` of work: in a slot of the server's capacity, when it has
    /// one, queueing for it first. The work goes on when the client gives up.
    pub(crate) async fn work(&self, wait: Duration) {
        let Some(slots) = &self.slots else {
            if !wait.is_zero() {
                tokio::time::sleep(wait).await;
            }
            return;
        };
        let slots = Arc::clone(slots);
        let work = tokio::spawn(async move {
            let _slot = slots.acquire_owned().await;
            tokio::time::sleep(wait).await;
        });
        let _ = work.await;
    }

    pub(crate) fn addr(&self) -> std::net::SocketAddr {
        self.addr.get().copied().unwrap_or_else(|| ([127, 0, 0, 1], 0).into())
    }

    /// Two uniform draws in `[0, 1)` from the seeded generator: a fault's and an answer's.
    pub(crate) fn draws(&self) -> (f64, f64) {
        let mut rng = self.rng.lock().unwrap();
        (rng.f64(), rng.f64())
    }

    /// The counters, the Batch APIs' included.
    pub(crate) fn snapshot(&self) -> crate::stats::StatsSnapshot {
        crate::stats::StatsSnapshot { batches: self.batches.stats(), ..self.stats.snapshot() }
    }

    pub(crate) fn next_id(&self) -> u64 {
        self.ids.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }

    /// Decides the answer to `call` and how long to wait before it starts
    /// (generation time, at `tokens_per_second`, comes on top).
    pub(crate) fn decide(&self, call: &Call) -> (Plan, Duration) {
        let config = &self.config;
        if config.count_prompts {
            self.stats.saw_prompt(&call.prompt);
        }
        let (fault, jitter, draws) = {
            let mut rng = self.rng.lock().unwrap();
            let draws: Vec<f64> = (0..call.n).map(|_| rng.f64()).collect();
            (rng.f64(), rng.f64() * 2.0 - 1.0, draws)
        };
        let choices: Vec<String> = (0..call.n)
            .map(|i| {
                let draw = draws[i as usize];
                answer::answer(&config.answers, config.seed, &call.prompt, call.seed, i, draw)
            })
            .collect();
        let prompt_tokens = answer::prompt_tokens(&call.messages);
        let completion_tokens: u64 = choices.iter().map(|c| answer::tokens(c)).sum();

        let now = Instant::now();
        let budgets = Budgets {
            requests: self.rpm.as_ref().map(|b| b.lock().unwrap().take(1.0, now)),
            tokens: self
                .tpm
                .as_ref()
                .map(|b| b.lock().unwrap().take((prompt_tokens + completion_tokens) as f64, now)),
            told: config.rate_limit_headers,
        };
        for (verdict, dimension) in [(budgets.requests, "requests"), (budgets.tokens, "tokens")] {
            if verdict.is_some_and(|v| !v.admitted) {
                return (Plan::RateLimited { budgets, dimension }, Duration::ZERO);
            }
        }

        let latency = config.latency.as_secs_f64() + jitter * config.jitter.as_secs_f64();
        let mut wait = Duration::from_secs_f64(latency.max(0.0));
        let mut threshold = config.error_rate;
        if fault < threshold {
            return (Plan::ServerError, wait);
        }
        threshold += config.hang_rate;
        let mut cut = None;
        if fault < threshold {
            wait += config.hang;
        } else if fault < threshold + config.malformed_rate {
            return (Plan::Malformed, wait);
        } else if fault < threshold + config.malformed_rate + config.stall_rate {
            cut = Some(Cut::Stall);
        } else if fault < threshold + config.malformed_rate + config.stall_rate + config.reset_rate
        {
            cut = Some(Cut::Reset);
        }
        (Plan::Answer { choices, prompt_tokens, completion_tokens, budgets, cut }, wait)
    }
}

/// `1.5s`, `20ms`: the duration style OpenAI uses in x-ratelimit-reset-*.
pub(crate) fn go_duration(duration: Duration) -> String {
    if duration < Duration::from_secs(1) {
        format!("{}ms", duration.as_millis())
    } else {
        format!("{:.3}s", duration.as_secs_f64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Limit;

    fn call(prompt: &str) -> Call {
        Call { messages: vec![prompt.into()], prompt: prompt.into(), n: 1, seed: None }
    }

    #[test]
    fn latency_jitter_and_generation_time() {
        let config = Config {
            latency: Duration::from_millis(100),
            jitter: Duration::from_millis(10),
            tokens_per_second: Some(100.0),
            ..Config::default()
        };
        let state = State::new(config);
        for _ in 0..100 {
            let (plan, wait) = state.decide(&call("hello"));
            assert!(matches!(plan, Plan::Answer { .. }));
            assert!(
                (Duration::from_millis(90)..=Duration::from_millis(110)).contains(&wait),
                "{wait:?}"
            );
        }
        assert_eq!(state.generation_time(20), Duration::from_millis(200));
        assert_eq!(State::new(Config::default()).generation_time(20), Duration::ZERO);
    }

    #[test]
    fn injected_faults() {
        let hang = Duration::from_secs(30);
        let only = |error_rate, hang_rate, malformed_rate| {
            State::new(Config { error_rate, hang_rate, malformed_rate, hang, ..Config::default() })
        };
        assert!(matches!(only(1.0, 0.0, 0.0).decide(&call("x")).0, Plan::ServerError));
        assert!(matches!(only(0.0, 0.0, 1.0).decide(&call("x")).0, Plan::Malformed));
        let (plan, wait) = only(0.0, 1.0, 0.0).decide(&call("x"));
        assert!(
            matches!(plan, Plan::Answer { .. }) && wait == hang,
            "a hang answers after the hang"
        );
        let mixed = only(0.2, 0.1, 0.1);
        let errors =
            (0..10_000).filter(|_| matches!(mixed.decide(&call("x")).0, Plan::ServerError)).count();
        assert!((1_800..2_200).contains(&errors), "{errors} errors at 20%");
    }

    #[test]
    fn request_and_token_limits_refuse_with_a_retry_time() {
        let rpm = State::new(Config {
            rpm: Some(Limit { per_minute: 60, burst: 2 }),
            ..Config::default()
        });
        assert!(matches!(rpm.decide(&call("a")).0, Plan::Answer { .. }));
        assert!(matches!(rpm.decide(&call("a")).0, Plan::Answer { .. }));
        let Plan::RateLimited { budgets, dimension } = rpm.decide(&call("a")).0 else { panic!() };
        assert_eq!(dimension, "requests");
        let retry = budgets.retry_after();
        assert!(retry > Duration::from_millis(900) && retry <= Duration::from_secs(1), "{retry:?}");

        // "hello" is 2 + 4 prompt tokens, and its answer some more: 60 fit twice at most.
        let tpm = State::new(Config {
            tpm: Some(Limit { per_minute: 6_000, burst: 60 }),
            ..Config::default()
        });
        let refused = (0..5).map(|_| tpm.decide(&call("hello")).0).find_map(|plan| match plan {
            Plan::RateLimited { dimension, budgets } => Some((dimension, budgets)),
            _ => None,
        });
        let (dimension, budgets) = refused.expect("the token budget ran out");
        assert_eq!(dimension, "tokens");
        assert_eq!(budgets.tokens.unwrap().limit, 6_000);
    }

    #[tokio::test(start_paused = true)]
    async fn a_limited_capacity_queues_and_computes_abandoned_calls() {
        let state = Arc::new(State::new(Config { capacity: Some(1), ..Config::default() }));
        let start = tokio::time::Instant::now();
        // The first client gives up after 100 ms; its call still takes the slot for 1 s.
        let abandoned =
            tokio::time::timeout(Duration::from_millis(100), state.work(Duration::from_secs(1)));
        assert!(abandoned.await.is_err());
        let (a, b) =
            tokio::join!(state.work(Duration::from_secs(1)), state.work(Duration::from_secs(1)));
        let ((), ()) = (a, b);
        assert_eq!(
            start.elapsed(),
            Duration::from_secs(3),
            "one at a time, the abandoned one first"
        );
    }

    #[test]
    fn stalls_and_resets_are_drawn_at_their_rates() {
        let state = State::new(Config { stall_rate: 0.1, reset_rate: 0.2, ..Config::default() });
        let cuts: Vec<_> = (0..10_000)
            .filter_map(|_| match state.decide(&call("x")).0 {
                Plan::Answer { cut, .. } => cut,
                _ => None,
            })
            .collect();
        let stalls = cuts.iter().filter(|c| **c == Cut::Stall).count();
        let resets = cuts.iter().filter(|c| **c == Cut::Reset).count();
        assert!((800..1_200).contains(&stalls), "{stalls}");
        assert!((1_800..2_200).contains(&resets), "{resets}");
    }

    #[test]
    fn n_choices_each_get_an_answer() {
        let state = State::new(Config::default());
        let Plan::Answer { choices, completion_tokens, .. } =
            state.decide(&Call { n: 3, ..call("q") }).0
        else {
            panic!()
        };
        assert_eq!(choices.len(), 3);
        assert_eq!(completion_tokens, 3 * crate::answer::tokens(&choices[0]));
    }
}

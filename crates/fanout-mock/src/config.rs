//! How the mock server behaves.

use std::time::Duration;

/// Where answers come from.
#[derive(Clone, Debug, PartialEq)]
pub enum Answers {
    /// A deterministic function of the prompt: the same prompt, the same answer.
    Derived,
    /// Drawn from weighted options (for voting tests). A request that carries a
    /// `seed` draws deterministically from (server seed, prompt, request seed,
    /// choice index); others draw from the server's seeded generator.
    Weighted(Vec<(String, f64)>),
}

/// Requests (or tokens) per minute, and how many may be spent at once.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Limit {
    /// Requests (or tokens) the bucket refills per minute.
    pub per_minute: u64,
    /// The bucket's size: the most spent at once, and what it starts full with.
    pub burst: u64,
}

impl Limit {
    /// A limit whose burst is one second's worth.
    pub fn per_minute(per_minute: u64) -> Self {
        Self { per_minute, burst: per_minute.div_ceil(60).max(1) }
    }
}

/// The server's behaviour. Rates are fractions of requests in `[0, 1]`.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// Time before the answer starts.
    pub latency: Duration,
    /// Uniform `±jitter` around the latency.
    pub jitter: Duration,
    /// Generation speed: each output token adds `1 / tokens_per_second`.
    pub tokens_per_second: Option<f64>,
    /// How answers' texts are chosen.
    pub answers: Answers,
    /// Requests per minute, beyond which requests get 429; `None` is unlimited.
    pub rpm: Option<Limit>,
    /// Tokens per minute (each request costs its prompt and answer tokens),
    /// beyond which requests get 429; `None` is unlimited.
    pub tpm: Option<Limit>,
    /// Share of requests answered HTTP 500.
    pub error_rate: f64,
    /// Share of requests that hang for `hang` before answering normally: the
    /// heavy tail (e.g. 2% of calls taking 10 s).
    pub hang_rate: f64,
    /// How long a hang, or a stall, lasts (30 s by default).
    pub hang: Duration,
    /// Share of answers that stall: a stream stops after its first piece for
    /// `hang`, then goes on; a JSON answer sends half its body, then waits.
    pub stall_rate: f64,
    /// Share of answers whose connection is reset after the first bytes.
    pub reset_rate: f64,
    /// Requests processed at once; the rest queue, as self-hosted servers
    /// (llama.cpp, vLLM, Ollama) do instead of answering 429. A request whose
    /// client gave up keeps its place until its work would be done, as theirs do.
    pub capacity: Option<usize>,
    /// Share of requests answered 200 with a truncated JSON body.
    pub malformed_rate: f64,
    /// Seeds latency jitter, faults and weighted answers.
    pub seed: u64,
    /// The model `/v1/models` lists.
    pub model: String,
    /// Count requests per prompt (the last user message) in `/stats`, so tests
    /// can tell which tasks were asked again.
    pub count_prompts: bool,
    /// When a request offers tools: how many tool calls (one a turn) the mock
    /// makes before it answers in text.
    pub tool_turns: usize,
    /// Whether answers carry the rate-limit headers (`x-ratelimit-*`,
    /// `anthropic-ratelimit-*`); without them a client learns the limits only
    /// from its 429s, as from servers that send none.
    pub rate_limit_headers: bool,
    /// How long a batch of the Batch APIs takes to run, its requests
    /// finishing evenly over it.
    pub batch_time: Duration,
    /// Share of a batch's requests answered with a server error.
    pub batch_error_rate: f64,
    /// Share of a batch's requests left unrun when its time runs out: the
    /// batch ends expired, with those requests' `batch_expired` errors.
    pub batch_expire_rate: f64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            latency: Duration::ZERO,
            jitter: Duration::ZERO,
            tokens_per_second: None,
            answers: Answers::Derived,
            rpm: None,
            tpm: None,
            error_rate: 0.0,
            hang_rate: 0.0,
            hang: Duration::from_secs(30),
            stall_rate: 0.0,
            reset_rate: 0.0,
            capacity: None,
            malformed_rate: 0.0,
            seed: 0,
            model: "mock-1".into(),
            count_prompts: false,
            tool_turns: 1,
            rate_limit_headers: true,
            batch_time: Duration::ZERO,
            batch_error_rate: 0.0,
            batch_expire_rate: 0.0,
        }
    }
}

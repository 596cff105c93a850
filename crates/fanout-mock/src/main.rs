//! `fanout-mock`: serve the mock LLM API until interrupted.
//!
//! Prints `listening on http://HOST:PORT` on its first line, so scripts that pass
//! `--port 0` learn the port it picked.

use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use clap::Parser;
use fanout_mock::{Answers, Config, Limit, MockServer};

/// An OpenAI- and Anthropic-compatible mock LLM server.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    #[arg(long, default_value = "127.0.0.1")]
    host: IpAddr,
    /// 0 picks a free port.
    #[arg(long, default_value_t = 0)]
    port: u16,
    /// Latency before each answer starts.
    #[arg(long, default_value_t = 0)]
    latency_ms: u64,
    /// Uniform ± jitter around the latency.
    #[arg(long, default_value_t = 0)]
    jitter_ms: u64,
    /// Generation speed; each output token takes 1/N s more.
    #[arg(long)]
    tokens_per_second: Option<f64>,
    /// Weighted answers instead of ones derived from the prompt: `A=0.6,B=0.3,C=0.1`.
    #[arg(long, value_parser = parse_weights)]
    answers: Option<Vec<(String, f64)>>,
    /// Requests per minute before answering 429.
    #[arg(long)]
    rpm: Option<u64>,
    /// Requests that may arrive at once (default: one second's worth).
    #[arg(long)]
    rpm_burst: Option<u64>,
    /// Tokens per minute before answering 429.
    #[arg(long)]
    tpm: Option<u64>,
    #[arg(long)]
    tpm_burst: Option<u64>,
    /// Share of requests answered HTTP 500, in [0, 1].
    #[arg(long, default_value_t = 0.0)]
    error_rate: f64,
    /// Share of requests that hang for --hang-ms before answering normally
    /// (a heavy tail: `--hang-rate 0.02 --hang-ms 10000` is 2% of calls taking 10 s).
    #[arg(long, default_value_t = 0.0)]
    hang_rate: f64,
    #[arg(long, default_value_t = 30_000)]
    hang_ms: u64,
    /// Share of answers that stall after their first bytes for --hang-ms, then go on.
    #[arg(long, default_value_t = 0.0)]
    stall_rate: f64,
    /// Share of answers whose connection is reset after their first bytes.
    #[arg(long, default_value_t = 0.0)]
    reset_rate: f64,
    /// Requests processed at once; the rest queue (as llama.cpp or vLLM do), and
    /// abandoned ones are still computed.
    #[arg(long)]
    capacity: Option<usize>,
    /// Share of requests answered 200 with truncated JSON.
    #[arg(long, default_value_t = 0.0)]
    malformed_rate: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, default_value = "mock-1")]
    model: String,
    /// Count requests per prompt in /stats
    #[arg(long)]
    count_prompts: bool,
    /// When tools are offered: the tool calls made, one a turn, before the answer
    #[arg(long, default_value_t = 1)]
    tool_turns: usize,
    /// Send no rate-limit headers: clients learn the limits from 429s only
    #[arg(long)]
    no_rate_limit_headers: bool,
    /// How long a Batch API batch takes to run, in milliseconds
    #[arg(long, default_value_t = 2_000)]
    batch_time_ms: u64,
    /// Share of a batch's requests answered with a server error
    #[arg(long, default_value_t = 0.0)]
    batch_error_rate: f64,
    /// Share of a batch's requests left unrun when it expires
    #[arg(long, default_value_t = 0.0)]
    batch_expire_rate: f64,
}

fn parse_weights(text: &str) -> Result<Vec<(String, f64)>, String> {
    text.split(',')
        .map(|pair| {
            let (answer, weight) =
                pair.rsplit_once('=').ok_or(format!("`{pair}` is not ANSWER=WEIGHT"))?;
            let weight: f64 = weight.parse().map_err(|_| format!("`{weight}` is not a number"))?;
            Ok((answer.to_string(), weight))
        })
        .collect()
}

fn limit(per_minute: Option<u64>, burst: Option<u64>) -> Option<Limit> {
    per_minute.map(|pm| {
        let limit = Limit::per_minute(pm);
        Limit { burst: burst.unwrap_or(limit.burst).max(1), ..limit }
    })
}

fn check_rate(name: &str, rate: f64) -> Result<(), String> {
    if (0.0..=1.0).contains(&rate) {
        Ok(())
    } else {
        Err(format!("--{name} must be between 0 and 1, not {rate}"))
    }
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    for (name, rate) in [
        ("error-rate", args.error_rate),
        ("hang-rate", args.hang_rate),
        ("malformed-rate", args.malformed_rate),
        ("stall-rate", args.stall_rate),
        ("reset-rate", args.reset_rate),
        ("batch-error-rate", args.batch_error_rate),
        ("batch-expire-rate", args.batch_expire_rate),
    ] {
        if let Err(message) = check_rate(name, rate) {
            eprintln!("fanout-mock: {message}");
            std::process::exit(2);
        }
    }
    let config = Config {
        latency: Duration::from_millis(args.latency_ms),
        jitter: Duration::from_millis(args.jitter_ms),
        tokens_per_second: args.tokens_per_second,
        answers: args.answers.map_or(Answers::Derived, Answers::Weighted),
        rpm: limit(args.rpm, args.rpm_burst),
        tpm: limit(args.tpm, args.tpm_burst),
        error_rate: args.error_rate,
        hang_rate: args.hang_rate,
        hang: Duration::from_millis(args.hang_ms),
        stall_rate: args.stall_rate,
        reset_rate: args.reset_rate,
        capacity: args.capacity,
        malformed_rate: args.malformed_rate,
        seed: args.seed,
        model: args.model,
        count_prompts: args.count_prompts,
        tool_turns: args.tool_turns,
        rate_limit_headers: !args.no_rate_limit_headers,
        batch_time: Duration::from_millis(args.batch_time_ms),
        batch_error_rate: args.batch_error_rate,
        batch_expire_rate: args.batch_expire_rate,
    };
    let server = match MockServer::bind(config, SocketAddr::new(args.host, args.port)).await {
        Ok(server) => server,
        Err(error) => {
            eprintln!("fanout-mock: cannot listen on {}:{}: {error}", args.host, args.port);
            std::process::exit(1);
        }
    };
    println!("listening on http://{}", server.addr());
    let _ = std::io::stdout().flush();
    let _ = tokio::signal::ctrl_c().await;
}

//! Aggregate decode throughput and time to first token of the embedded model
//! with 1, 4, 8 and 16 concurrent requests (BENCHMARKS.md).
//!
//!     cargo run --release -p fanout-local --example local_throughput -- [GGUF] [--threads N] [--tokens N] [--levels 1,4,8,16] [--repeat N]
//!
//! Each request asks a different question and generates exactly `--tokens`
//! tokens (EOS ignored), so every level does the same work per request.
//! "decode tok/s" counts the tokens after each request's first one, over the
//! time after the last request's first token (prompts are all processed by
//! then): the batched decoding rate. "end-to-end" includes prompt processing.
//! Each level runs `--repeat` times (default 3) and the fastest run is shown:
//! on a shared machine the slower runs measure the neighbours.

use std::time::Instant;

use fanout::Request;
use fanout_local::sampling::SamplingParams;
use fanout_local::{
    EngineOptions, GenerationRequest, LocalModel, LocalOptions, Locations, ModelSpec,
};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let flag = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .and_then(|v| v.parse().ok())
    };
    let threads = flag("--threads").unwrap_or_else(fanout_local::engine::default_threads);
    let tokens: usize = flag("--tokens").unwrap_or(128);
    let repeat: usize = flag("--repeat").unwrap_or(3);
    let levels: Vec<usize> =
        match args.iter().position(|a| a == "--levels").and_then(|i| args.get(i + 1)) {
            Some(list) => list.split(',').filter_map(|l| l.parse().ok()).collect(),
            None => vec![1, 4, 8, 16],
        };
    let explicit = args.first().filter(|a| !a.starts_with("--")).map(String::as_str);
    let (path, _) = fanout_local::resolve(explicit, &ModelSpec::default(), &Locations::from_env())?;
    let options = LocalOptions {
        engine: EngineOptions { threads, max_batch: 16, ..EngineOptions::default() },
        ..LocalOptions::default()
    };
    let model = LocalModel::load(&path, options)?;
    println!("model {} · {threads} threads · {tokens} tokens per request", model.model_name());
    println!(
        "| concurrent | aggregate decode tok/s | per request decode tok/s | end-to-end tok/s | TTFT p50 / max (ms) | wall (s) |"
    );
    println!("| ---: | ---: | ---: | ---: | ---: | ---: |");
    // Warm-up: page in the weights and size the allocators.
    run(&model, 2, 16).await?;
    for &concurrent in &levels {
        let mut best: Option<Level> = None;
        for _ in 0..repeat.max(1) {
            let level = measure(&model, concurrent, tokens).await?;
            if best.as_ref().is_none_or(|b| level.decode > b.decode) {
                best = Some(level);
            }
        }
        let level = best.expect("at least one run");
        println!(
            "| {concurrent} | {:.1} | {:.1} | {:.1} | {:.0} / {:.0} | {:.2} |",
            level.decode,
            level.decode / concurrent as f64,
            level.end_to_end,
            level.ttft_p50_ms,
            level.ttft_max_ms,
            level.wall,
        );
    }
    Ok(())
}

struct Level {
    decode: f64,
    end_to_end: f64,
    ttft_p50_ms: f64,
    ttft_max_ms: f64,
    wall: f64,
}

async fn measure(
    model: &LocalModel,
    concurrent: usize,
    tokens: usize,
) -> Result<Level, fanout_local::LocalError> {
    let started = Instant::now();
    let results = run(model, concurrent, tokens).await?;
    let wall = started.elapsed().as_secs_f64();
    let generated: usize = results.iter().map(|g| g.tokens.len()).sum();
    let mut ttft: Vec<f64> =
        results.iter().map(|g| g.time_to_first_token.as_secs_f64() * 1000.0).collect();
    ttft.sort_by(f64::total_cmp);
    let ttft_max_ms = ttft[ttft.len() - 1];
    Ok(Level {
        decode: (generated - concurrent) as f64 / (wall - ttft_max_ms / 1000.0),
        end_to_end: generated as f64 / wall,
        ttft_p50_ms: ttft[ttft.len() / 2],
        ttft_max_ms,
        wall,
    })
}

async fn run(
    model: &LocalModel,
    concurrent: usize,
    tokens: usize,
) -> Result<Vec<fanout_local::Generation>, fanout_local::LocalError> {
    let topics =
        ["rivers", "bread", "bicycles", "volcanoes", "libraries", "bees", "trains", "glaciers"];
    let requests = (0..concurrent).map(|i| {
        let prompt = format!("Write a short story about {} number {i}.", topics[i % topics.len()]);
        let prompt = model.prompt_tokens(&Request::user(prompt)).expect("prompt tokens");
        GenerationRequest {
            prompt,
            max_tokens: tokens,
            stop: Vec::new(),
            sampling: SamplingParams {
                temperature: 0.7,
                seed: i as u64,
                ..SamplingParams::default()
            },
            ignore_eos: true,
        }
    });
    futures_util::future::try_join_all(requests.map(|r| model.generate(r))).await
}

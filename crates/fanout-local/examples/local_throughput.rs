//! The embedded model's speed (BENCHMARKS.md), in scenarios:
//!
//! - `levels`: aggregate decode throughput and time to first token with 1, 4,
//!   8 and 16 concurrent requests;
//! - `prefill`: prompt processing of one ~500-token prompt, alone;
//! - `vote`: a vote of n = 16 on one ~360-token prompt (8 answer tokens), with
//!   and without prefix sharing, against n = 1;
//! - `prefix`: 100 rows sharing a ~430-token rubric, 16 at a time, with and
//!   without sharing;
//! - `structured`: 8 answers at once constrained to a JSON Schema, against 8
//!   free answers of the same lengths (the cost of the per-step masks);
//! - `memory` (only when named): 32 concurrent 2k-token prompts under a KV
//!   memory budget (`--kv-memory BYTES`, default 1 GiB).
//!
//!     cargo run --release -p fanout-local --example local_throughput -- [GGUF] [--threads N] [--tokens N] [--levels 1,4,8,16] [--repeat N] [--scenarios levels,prefill,vote,prefix,memory]
//!
//! In the sharing scenarios every measured run's user message starts with a
//! number of its own, so nothing past the chat template's default system
//! prompt (its first block) is shared from the cache of an earlier run.
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
    let scenarios: Vec<String> =
        match args.iter().position(|a| a == "--scenarios").and_then(|i| args.get(i + 1)) {
            Some(list) => list.split(',').map(str::to_owned).collect(),
            None => {
                ["levels", "prefill", "vote", "prefix", "structured"].map(str::to_owned).to_vec()
            }
        };
    let explicit = args.first().filter(|a| !a.starts_with("--")).map(String::as_str);
    let (path, _) = fanout_local::resolve(explicit, &ModelSpec::default(), &Locations::from_env())?;
    let load = |max_batch: usize, prefix_sharing: bool, kv_memory: Option<u64>| {
        let engine = EngineOptions {
            threads,
            max_batch,
            prefix_sharing,
            kv_memory,
            ..EngineOptions::default()
        };
        LocalModel::load(&path, LocalOptions { engine, ..LocalOptions::default() })
    };
    let model = load(16, true, None)?;
    println!("model {} · {threads} threads", model.model_name());
    // Warm-up: page in the weights and size the allocators.
    run(&model, 2, 16).await?;
    for scenario in &scenarios {
        match scenario.as_str() {
            "levels" => levels_scenario(&model, &levels, tokens, repeat).await?,
            "prefill" => prefill_scenario(&model, repeat).await?,
            "vote" => vote_scenario(&model, &load(16, false, None)?).await?,
            "prefix" => prefix_scenario(&model, &load(16, false, None)?).await?,
            "structured" => structured_scenario(&model).await?,
            "memory" => {
                let budget = flag("--kv-memory").map_or(1 << 30, |bytes| bytes as u64);
                memory_scenario(&load(32, true, Some(budget))?, budget).await?;
            }
            other => return Err(format!("unknown scenario `{other}`").into()),
        }
    }
    Ok(())
}

async fn levels_scenario(
    model: &LocalModel,
    levels: &[usize],
    tokens: usize,
    repeat: usize,
) -> Result<(), Box<dyn std::error::Error>> {
    println!("\n{tokens} tokens per request");
    println!(
        "| concurrent | aggregate decode tok/s | per request decode tok/s | end-to-end tok/s | TTFT p50 / max (ms) | wall (s) |"
    );
    println!("| ---: | ---: | ---: | ---: | ---: | ---: |");
    for &concurrent in levels {
        let mut best: Option<Level> = None;
        for _ in 0..repeat.max(1) {
            let level = measure(model, concurrent, tokens).await?;
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
            format: None,
        }
    });
    futures_util::future::try_join_all(requests.map(|r| model.generate(r))).await
}

/// A long text of `words` words, different for each `run` from its first token.
fn passage(run: usize, words: usize) -> String {
    let sentence = "The river carries silt from the mountains to the delta, where farmers plant rice \
                    in the rich soil every spring and harvest it before the autumn floods arrive.";
    let mut text = format!("Run {run}. ");
    let vocabulary: Vec<&str> = sentence.split(' ').collect();
    for i in 0..words {
        text.push_str(vocabulary[i % vocabulary.len()]);
        text.push(' ');
    }
    text
}

fn sampled(prompt: Vec<u32>, max_tokens: usize, seed: u64) -> GenerationRequest {
    GenerationRequest {
        prompt,
        max_tokens,
        stop: Vec::new(),
        sampling: SamplingParams { temperature: 0.7, seed, ..SamplingParams::default() },
        ignore_eos: true,
        format: None,
    }
}

/// Runs `requests` at once; the wall time and the prompt positions computed.
async fn timed(
    model: &LocalModel,
    requests: Vec<GenerationRequest>,
) -> Result<(f64, u64, Vec<fanout_local::Generation>), fanout_local::LocalError> {
    let computed = model.stats().prompt_tokens_computed;
    let started = Instant::now();
    let answers =
        futures_util::future::try_join_all(requests.into_iter().map(|r| model.generate(r))).await?;
    Ok((started.elapsed().as_secs_f64(), model.stats().prompt_tokens_computed - computed, answers))
}

static RUN: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

fn next_run() -> usize {
    RUN.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

async fn prefill_scenario(
    model: &LocalModel,
    repeat: usize,
) -> Result<(), Box<dyn std::error::Error>> {
    let mut best = 0f64;
    let mut length = 0;
    for _ in 0..repeat.max(1) {
        let prompt = model.prompt_tokens(&Request::user(passage(next_run(), 330)))?;
        length = prompt.len();
        let (_, _, answers) = timed(model, vec![sampled(prompt, 1, 0)]).await?;
        best = best.max(length as f64 / answers[0].time_to_first_token.as_secs_f64());
    }
    println!("\nprefill: one {length}-token prompt alone: {best:.1} tok/s (best of {repeat})");
    Ok(())
}

async fn vote_scenario(
    shared: &LocalModel,
    unshared: &LocalModel,
) -> Result<(), Box<dyn std::error::Error>> {
    let vote = |model: &LocalModel, n: usize| {
        let prompt = model
            .prompt_tokens(&Request::user(format!(
                "{}\nWhich crop do the farmers plant?",
                passage(next_run(), 300)
            )))
            .expect("prompt tokens");
        (prompt.len(), (0..n).map(|i| sampled(prompt.clone(), 8, i as u64)).collect::<Vec<_>>())
    };
    println!("\nvote: one prompt, 8 answer tokens per sample");
    println!("| engine | n | prompt tokens | wall (s) | × n = 1 | prompt positions computed |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: |");
    for (name, model) in [("prefix sharing", shared), ("no sharing", unshared)] {
        let (length, one) = vote(model, 1);
        let (single, computed_one, _) = timed(model, one).await?;
        println!("| {name} | 1 | {length} | {single:.2} | 1.00 | {computed_one} |");
        let (length, sixteen) = vote(model, 16);
        let (wall, computed, _) = timed(model, sixteen).await?;
        println!("| {name} | 16 | {length} | {wall:.2} | {:.2} | {computed} |", wall / single);
    }
    Ok(())
}

async fn prefix_scenario(
    shared: &LocalModel,
    unshared: &LocalModel,
) -> Result<(), Box<dyn std::error::Error>> {
    println!("\nprefix: 100 rows sharing one rubric, 16 at a time, 32 answer tokens each");
    println!(
        "| engine | rubric tokens | wall (s) | end-to-end tok/s | prompt positions computed |"
    );
    println!("| --- | ---: | ---: | ---: | ---: |");
    for (name, model) in [("prefix sharing", shared), ("no sharing", unshared)] {
        let rubric = format!(
            "Grade the essay below from 1 to 5 on this rubric. {}",
            passage(next_run(), 360)
        );
        let rubric_tokens = model.prompt_tokens(&Request::user(rubric.clone()))?.len();
        let requests: Vec<GenerationRequest> = (0..100)
            .map(|row| {
                let essay = format!("{rubric}\nEssay {row}: bees make honey in hive number {row}.");
                sampled(model.prompt_tokens(&Request::user(essay)).expect("prompt tokens"), 32, row)
            })
            .collect();
        // 16 at a time, as `fanout batch -c 16` sends them.
        let semaphore = std::sync::Arc::new(tokio::sync::Semaphore::new(16));
        let computed = model.stats().prompt_tokens_computed;
        let started = Instant::now();
        let answers = futures_util::future::try_join_all(requests.into_iter().map(|r| {
            let semaphore = semaphore.clone();
            async move {
                let _permit = semaphore.acquire().await.expect("open");
                model.generate(r).await
            }
        }))
        .await?;
        let wall = started.elapsed().as_secs_f64();
        let generated: usize = answers.iter().map(|a| a.tokens.len()).sum();
        let computed = model.stats().prompt_tokens_computed - computed;
        println!(
            "| {name} | {rubric_tokens} | {wall:.2} | {:.1} | {computed} |",
            generated as f64 / wall
        );
    }
    Ok(())
}

/// The process's peak resident memory (`VmHWM`), in bytes, where Linux says.
fn peak_resident() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    Some(line.split_whitespace().nth(1)?.parse::<u64>().ok()? * 1024)
}

async fn memory_scenario(
    model: &LocalModel,
    budget: u64,
) -> Result<(), Box<dyn std::error::Error>> {
    let requests: Vec<GenerationRequest> = (0..32)
        .map(|i| {
            sampled(
                model
                    .prompt_tokens(&Request::user(passage(next_run(), 1400)))
                    .expect("prompt tokens"),
                16,
                i,
            )
        })
        .collect();
    let length = requests[0].prompt.len();
    let (wall, computed, _) = timed(model, requests).await?;
    let stats = model.stats();
    let block_bytes = stats.kv_block_tokens * model.config().kv_bytes_per_token();
    let mib = |bytes: u64| bytes as f64 / f64::from(1u32 << 20);
    println!(
        "\nmemory: 32 concurrent {length}-token prompts, 16 answer tokens, KV budget {:.0} MiB",
        mib(budget)
    );
    println!(
        "wall {wall:.1} s · {computed} prompt positions computed · KV peak {} of {} blocks ({:.0} MiB) · process peak RSS {:.0} MiB",
        stats.kv_blocks_peak,
        stats.kv_blocks_total,
        mib(stats.kv_blocks_peak * block_bytes),
        mib(peak_resident().unwrap_or(0)),
    );
    Ok(())
}

async fn structured_scenario(model: &LocalModel) -> Result<(), Box<dyn std::error::Error>> {
    let schema = serde_json::json!({
        "type": "object",
        "properties": {
            "title": {"type": "string", "maxLength": 60},
            "people": {"type": "array", "items": {
                "type": "object",
                "properties": {"name": {"type": "string", "maxLength": 30}, "age": {"type": "integer"}},
                "required": ["name", "age"], "additionalProperties": false
            }, "maxItems": 12}
        },
        "required": ["title", "people"], "additionalProperties": false
    });
    let prompt = |i: usize| {
        let text = format!(
            "Run {}. List the people in a story about a village, with their ages, as JSON.",
            next_run() + i
        );
        model.prompt_tokens(&Request::user(text)).expect("prompt tokens")
    };
    let mut constrained = Vec::new();
    for i in 0..8 {
        let mut request = sampled(prompt(i), 256, i as u64);
        request.ignore_eos = false;
        request.format = Some(fanout_local::OutputFormat::JsonSchema(schema.clone()));
        constrained.push(request);
    }
    let (wall, _, answers) = timed(model, constrained).await?;
    let lengths: Vec<usize> = answers.iter().map(|a| a.tokens.len()).collect();
    let valid = answers
        .iter()
        .filter(|a| serde_json::from_str::<serde_json::Value>(&a.text).is_ok())
        .count();
    // The same lengths, free.
    let free: Vec<GenerationRequest> =
        lengths.iter().enumerate().map(|(i, &n)| sampled(prompt(i), n.max(1), i as u64)).collect();
    let (free_wall, _, _) = timed(model, free).await?;
    let tokens: usize = lengths.iter().sum();
    println!("\nstructured: 8 at once, {tokens} answer tokens in all, {valid} of 8 parse");
    println!(
        "constrained {wall:.2} s ({:.1} tok/s) · free {free_wall:.2} s ({:.1} tok/s) · cost {:+.0}%",
        tokens as f64 / wall,
        tokens as f64 / free_wall,
        (wall / free_wall - 1.0) * 100.0
    );
    Ok(())
}

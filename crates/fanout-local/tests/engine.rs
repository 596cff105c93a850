//! The engine's mechanics on a tiny random model: batching, sampling, stops,
//! cancellation, errors, and running under fanout's executor.

mod common;

use std::time::Duration;

use fanout::{ErrorKind, Executor, Provider, Request, Task};
use fanout_local::sampling::SamplingParams;
use fanout_local::{
    EngineOptions, Generation, GenerationRequest, LocalError, LocalModel, LocalOptions,
};

fn options(max_batch: usize) -> LocalOptions {
    LocalOptions {
        engine: EngineOptions {
            threads: 1,
            max_batch,
            prefill_chunk: 16,
            ..EngineOptions::default()
        },
        default_max_tokens: 24,
        ..LocalOptions::default()
    }
}

fn sampled(prompt: &str, seed: u64) -> Request {
    let mut request = Request::user(prompt).with_temperature(1.0).with_max_tokens(24);
    request.seed = Some(seed);
    request
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_does_not_depend_on_what_else_is_in_the_batch() {
    let dir = tempfile::tempdir().unwrap();
    let alone = common::tiny_model(&dir, options(1));
    let batched = common::tiny_model(&dir, options(8));
    let prompts: Vec<String> =
        (0..8).map(|i| format!("prompt number {i} {}", "word ".repeat(i * 5))).collect();
    let mut expected = Vec::new();
    for (i, prompt) in prompts.iter().enumerate() {
        expected.push(alone.complete(&sampled(prompt, i as u64)).await.unwrap().text);
    }
    // All eight at once: prompts of different lengths prefill in chunks while
    // others decode, each at its own position.
    let together = futures_util::future::join_all(prompts.iter().enumerate().map(|(i, p)| {
        let request = sampled(p, i as u64);
        let model = batched.clone();
        async move { model.complete(&request).await.unwrap().text }
    }))
    .await;
    assert_eq!(together, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seeds_give_diversity_and_the_same_seed_repeats() {
    let dir = tempfile::tempdir().unwrap();
    let model = common::tiny_model(&dir, options(4));
    let a = model.complete(&sampled("tell me", 1)).await.unwrap().text;
    let again = model.complete(&sampled("tell me", 1)).await.unwrap().text;
    let b = model.complete(&sampled("tell me", 2)).await.unwrap().text;
    assert_eq!(a, again);
    assert_ne!(a, b);
    // Without a seed, votes differ by sample index and a repeat is stable.
    let vote = |index| {
        let mut request = Request::user("vote").with_temperature(1.0).with_max_tokens(16);
        request.sample_index = index;
        request
    };
    let first = model.complete(&vote(0)).await.unwrap().text;
    assert_eq!(first, model.complete(&vote(0)).await.unwrap().text);
    assert_ne!(first, model.complete(&vote(1)).await.unwrap().text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_tokens_stop_sequences_and_usage() {
    let dir = tempfile::tempdir().unwrap();
    let model = common::tiny_model(&dir, options(4));
    let prompt_tokens = model.prompt_tokens(&Request::user("count")).unwrap().len() as u64;
    let request = Request::user("count").with_temperature(0.0).with_max_tokens(12);
    let full = model.complete(&request).await.unwrap();
    assert_eq!(full.usage.input_tokens, prompt_tokens);
    assert_eq!(full.finish_reason.as_deref(), Some("length"));
    assert_eq!(full.usage.output_tokens, 12);
    assert_eq!(model.estimate_tokens(&request), prompt_tokens + 12);

    // Stop at a piece of the greedy answer: the text ends just before it.
    let chars: Vec<char> = full.text.chars().collect();
    let stop: String = chars[chars.len() / 2..chars.len() / 2 + 2].iter().collect();
    let mut stopped = request.clone();
    stopped.stop = vec![stop.clone()];
    let answer = model.complete(&stopped).await.unwrap();
    assert_eq!(answer.finish_reason.as_deref(), Some("stop"));
    assert_eq!(answer.text, full.text[..full.text.find(&stop).unwrap()]);
    assert!(answer.usage.output_tokens < 12);

    // `n` choices come back as other_choices, each counted.
    let mut several = sampled("count", 5);
    several.n = Some(3);
    let answer = model.complete(&several).await.unwrap();
    assert_eq!(answer.other_choices.len(), 2);
    // A choice may end early on a special token; each counts what it generated.
    assert!((3..=3 * 24).contains(&answer.usage.output_tokens), "{:?}", answer.usage);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_long_a_prompt_is_a_bad_request_and_the_engine_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let model = common::tiny_model(&dir, options(2));
    let error = model.complete(&Request::user("word ".repeat(1000))).await.unwrap_err();
    assert_eq!(error.kind(), ErrorKind::BadRequest);
    assert!(error.message().contains("tokens"), "{error}");
    assert!(model.complete(&Request::user("still here")).await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_request_frees_its_slot() {
    let dir = tempfile::tempdir().unwrap();
    let model = common::tiny_model(&dir, options(1));
    // The only slot is taken by a 4,000-token answer that nobody will wait for.
    let waiting = start_long_answer(&model, 4000).await;
    waiting.abort();
    assert!(wait_for(|| model.stats().abandoned == 1).await, "{:?}", model.stats());
    let stats = model.stats();
    assert!(
        stats.generated_tokens < 4000 && stats.finished == 0 && stats.running == 0,
        "{stats:?}"
    );
    // The slot is free: the next request is answered.
    assert!(model.complete(&Request::user("next").with_max_tokens(4)).await.is_ok());
    assert_eq!(model.stats().finished, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_request_joins_while_another_is_decoding() {
    let dir = tempfile::tempdir().unwrap();
    let model = common::tiny_model(&dir, options(4));
    let long = start_long_answer(&model, 3000).await;
    // Admitted next to the running sequence and answered long before it ends.
    let short = model.complete(&Request::user("short").with_max_tokens(3)).await.unwrap();
    assert!(short.usage.output_tokens <= 3);
    let stats = model.stats();
    assert_eq!((stats.finished, stats.running), (1, 1), "{stats:?}");
    let long = long.await.unwrap().unwrap();
    assert_eq!(long.tokens.len(), 3000);
    assert_eq!(long.finish, fanout_local::FinishReason::Length);
}

/// Starts a greedy answer of exactly `tokens` tokens and waits until it is decoding.
async fn start_long_answer(
    model: &LocalModel,
    tokens: usize,
) -> tokio::task::JoinHandle<Result<Generation, LocalError>> {
    let request = GenerationRequest {
        prompt: model.prompt_tokens(&Request::user("long")).unwrap(),
        max_tokens: tokens,
        stop: Vec::new(),
        sampling: SamplingParams { temperature: 0.0, ..SamplingParams::default() },
        ignore_eos: true,
        format: None,
    };
    let answer = tokio::spawn({
        let model = model.clone();
        async move { model.generate(request).await }
    });
    assert!(wait_for(|| model.stats().generated_tokens > 0).await, "the long answer never started");
    answer
}

/// Polls the engine's counters (it runs on its own thread, in real time).
async fn wait_for(condition: impl Fn() -> bool) -> bool {
    for _ in 0..10_000 {
        if condition() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_under_the_executor_with_usage() {
    let dir = tempfile::tempdir().unwrap();
    let model = common::tiny_model(&dir, options(4));
    let executor = Executor::builder(model).concurrency(6).build();
    let tasks = (0..20).map(|i| Task::new(Request::user(format!("task {i}")).with_max_tokens(8)));
    let report = executor.run(tasks).await;
    assert_eq!(report.totals.succeeded, 20, "{:?}", report.totals);
    let answered: u64 = report.results.iter().map(|r| r.outcome.usage().output_tokens).sum();
    assert_eq!(report.totals.usage.output_tokens, answered);
    assert!(answered > 20 && answered <= 20 * 8, "{answered}");
    assert!(report.totals.usage.input_tokens > 20 * 10);
}

/// The embedded model does not call tools, and says so plainly (not retried).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tools_are_refused_plainly() {
    let dir = tempfile::tempdir().unwrap();
    let model = common::tiny_model(&dir, options(1));
    let spec = fanout::ToolSpec::new("lookup", "Looks up.", serde_json::json!({"type": "object"}));
    let request = Request { tools: vec![spec], ..Request::user("look it up") };
    let error = model.complete(&request).await.unwrap_err();
    assert_eq!(error.kind(), ErrorKind::BadRequest);
    assert!(!error.is_retryable());
    assert!(error.message().contains("the local model does not call tools"), "{error}");
}

/// The embedded model takes text only, and says so plainly (not retried).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_are_refused_plainly() {
    let dir = tempfile::tempdir().unwrap();
    let model = common::tiny_model(&dir, options(1));
    let mut request = Request::user("What is in the picture?");
    request.messages[0].images.push(fanout::Image::Url("https://example.com/a.png".into()));
    let error = model.complete(&request).await.unwrap_err();
    assert_eq!(error.kind(), ErrorKind::BadRequest);
    assert!(error.message().contains("the local model takes text only"), "{error}");
}

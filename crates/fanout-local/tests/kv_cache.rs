//! The paged KV cache on a tiny random model: shared prefixes give the same
//! answers bit for bit, blocks go back and are reused, admission waits for
//! memory, and a request too large for the budget is refused alone.

mod common;

use fanout::{ErrorKind, Provider, Request};
use fanout_local::sampling::SamplingParams;
use fanout_local::{EngineOptions, Generation, GenerationRequest, LocalModel, LocalOptions};

/// Tiny-model options: one thread, `max_batch` sequences, blocks of
/// `block_tokens`, and a KV budget of `kv_blocks` blocks (`None`: the default).
fn options(max_batch: usize, block_tokens: usize, sharing: bool) -> LocalOptions {
    LocalOptions {
        engine: EngineOptions {
            threads: 1,
            max_batch,
            prefill_chunk: 16,
            block_tokens,
            prefix_sharing: sharing,
            ..EngineOptions::default()
        },
        ..LocalOptions::default()
    }
}

fn with_kv_blocks(mut options: LocalOptions, model: &LocalModel, blocks: u64) -> LocalOptions {
    let block_tokens = options.engine.block_tokens as u64;
    options.engine.kv_memory = Some(blocks * block_tokens * model.config().kv_bytes_per_token());
    options
}

/// A sampled request (temperature 1: any difference in the logits shows).
fn request(prompt: Vec<u32>, max_tokens: usize, seed: u64) -> GenerationRequest {
    GenerationRequest {
        prompt,
        max_tokens,
        stop: Vec::new(),
        sampling: SamplingParams { temperature: 1.0, seed, ..SamplingParams::default() },
        ignore_eos: true,
        format: None,
    }
}

/// Token ids of some text, long enough to cut prefixes from.
fn text_tokens(model: &LocalModel, text: &str) -> Vec<u32> {
    model.tokenizer().encode(text).unwrap()
}

async fn all(model: &LocalModel, requests: &[GenerationRequest]) -> Vec<Generation> {
    let answers = requests.iter().map(|r| {
        let (model, r) = (model.clone(), r.clone());
        async move { model.generate(r).await.unwrap() }
    });
    futures_util::future::join_all(answers).await
}

/// Prompts that share their first `length` tokens, for several lengths around
/// the block boundaries, plus one prompt sent three times (a vote).
fn prompts_with_shared_prefixes(model: &LocalModel) -> Vec<Vec<u32>> {
    let common =
        text_tokens(model, &"the rubric says grade each essay on its argument. ".repeat(4));
    let mut prompts = Vec::new();
    for (i, length) in [0, 1, 3, 4, 5, 15, 16, 17, 33, 64].into_iter().enumerate() {
        let mut prompt = common[..length.min(common.len())].to_vec();
        prompt.extend(text_tokens(model, &format!(" essay number {i}: {}", "word ".repeat(i))));
        prompts.push(prompt);
    }
    let vote = common[..40].to_vec();
    prompts.extend([vote.clone(), vote.clone(), vote]);
    prompts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_prefixes_give_the_answers_of_unshared_computation_bit_for_bit() {
    let dir = tempfile::tempdir().unwrap();
    let unshared = common::tiny_model(&dir, options(1, 16, false));
    let prompts = prompts_with_shared_prefixes(&unshared);
    // Answers of different lengths: sequences leave while others still prefill.
    let requests: Vec<GenerationRequest> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| request(p.clone(), 3 + (i * 7) % 20, i as u64))
        .collect();
    let mut expected = Vec::new();
    for r in &requests {
        expected.push(unshared.generate(r.clone()).await.unwrap().tokens);
    }
    assert_eq!(unshared.stats().prompt_tokens_shared, 0);
    for block_tokens in [4, 16] {
        let shared = common::tiny_model(&dir, options(6, block_tokens, true));
        // Six at a time out of thirteen: the others join as sequences leave.
        let answers: Vec<Vec<u32>> =
            all(&shared, &requests).await.into_iter().map(|g| g.tokens).collect();
        assert_eq!(answers, expected, "blocks of {block_tokens}");
        // Once more, one at a time: now the prefixes come from the cache.
        let before = shared.stats().prompt_tokens_shared;
        for (r, expected) in requests.iter().zip(&expected) {
            assert_eq!(&shared.generate(r.clone()).await.unwrap().tokens, expected);
        }
        let stats = shared.stats();
        assert!(before > 0 && stats.prompt_tokens_shared > before, "{stats:?}");
        assert_eq!((stats.kv_blocks_used, stats.running), (0, 0), "{stats:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vote_prefills_its_prompt_once() {
    // Chunks of one block, and of four: then a sample takes the blocks
    // computed so far and waits for the one being computed.
    for chunk in [16, 64] {
        let dir = tempfile::tempdir().unwrap();
        let mut options = options(16, 16, true);
        options.engine.prefill_chunk = chunk;
        vote_prefills_once(common::tiny_model(&dir, options)).await;
    }
}

async fn vote_prefills_once(model: LocalModel) {
    let prompt = text_tokens(&model, &"one question asked sixteen times. ".repeat(5));
    let requests: Vec<GenerationRequest> = (0..16).map(|i| request(prompt.clone(), 6, i)).collect();
    let answers = all(&model, &requests).await;
    assert_eq!(answers.len(), 16);
    let stats = model.stats();
    // The prompt once, then each sample computes only its last partial block.
    let tail = prompt.len() - (prompt.len() - 1) / 16 * 16;
    assert_eq!(stats.prompt_tokens_computed as usize, prompt.len() + 15 * tail, "{stats:?}");
    assert_eq!(stats.prompt_tokens_shared as usize, 15 * (prompt.len() - tail), "{stats:?}");
    // The samples still differ: each has its own seed.
    assert!(answers.iter().any(|a| a.tokens != answers[0].tokens));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocks_are_freed_and_reused_over_a_thousand_requests() {
    let dir = tempfile::tempdir().unwrap();
    let probe = common::tiny_model(&dir, options(1, 4, true));
    let model = common::tiny_model(&dir, with_kv_blocks(options(8, 4, true), &probe, 64));
    let requests: Vec<GenerationRequest> = (0..1000)
        .map(|i| {
            let prompt = text_tokens(&model, &format!("request {i} of a thousand"));
            request(prompt, 1 + i % 5, i as u64)
        })
        .collect();
    let answers = all(&model, &requests).await;
    assert_eq!(answers.len(), 1000);
    let stats = model.stats();
    assert_eq!(stats.finished, 1000, "{stats:?}");
    assert_eq!((stats.kv_blocks_used, stats.kv_blocks_shared), (0, 0), "{stats:?}");
    assert!(stats.kv_blocks_peak <= stats.kv_blocks_total, "{stats:?}");
    // 64 blocks held thousands of prompts' blocks in turn: cached prefixes were evicted.
    assert!(stats.kv_blocks_evicted > 100 && stats.kv_blocks_cached <= 64, "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_a_small_budget_requests_wait_and_all_finish() {
    let dir = tempfile::tempdir().unwrap();
    let unshared = common::tiny_model(&dir, options(1, 4, false));
    let requests: Vec<GenerationRequest> = (0..8)
        .map(|i| request(text_tokens(&unshared, &format!("waiting request {i}")), 10, i))
        .collect();
    let mut expected = Vec::new();
    for r in &requests {
        expected.push(unshared.generate(r.clone()).await.unwrap().tokens);
    }
    // Room for one request's prompt and answer at a time, not two.
    let one = requests.iter().map(|r| (r.prompt.len() + r.max_tokens).div_ceil(4)).max().unwrap();
    let model =
        common::tiny_model(&dir, with_kv_blocks(options(8, 4, true), &unshared, one as u64 + 2));
    let answers: Vec<Vec<u32>> =
        all(&model, &requests).await.into_iter().map(|g| g.tokens).collect();
    assert_eq!(answers, expected);
    let stats = model.stats();
    assert!(stats.kv_blocks_peak as usize <= one + 2, "{stats:?}");
    assert_eq!((stats.finished, stats.waiting, stats.kv_blocks_used), (8, 0, 0), "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_too_large_for_the_budget_is_refused_and_the_others_go_on() {
    let dir = tempfile::tempdir().unwrap();
    let probe = common::tiny_model(&dir, options(1, 4, true));
    // 16 blocks of 4 positions: 64 tokens.
    let model = common::tiny_model(&dir, with_kv_blocks(options(4, 4, true), &probe, 16));
    let small = Request::user("fits").with_max_tokens(8);
    let large = Request::user("does not fit").with_max_tokens(100);
    let (small, large) = futures_util::join!(model.complete(&small), model.complete(&large));
    assert!(small.is_ok(), "{small:?}");
    let error = large.unwrap_err();
    assert_eq!(error.kind(), ErrorKind::BadRequest);
    let prompt = model.prompt_tokens(&Request::user("does not fit")).unwrap().len();
    let message = error.message();
    assert!(message.contains(&format!("{} tokens ({prompt} prompt + 100 answer)", prompt + 100)));
    assert!(message.contains("holds (64 tokens)"), "{message}");
    assert!(message.contains("--kv-memory"), "{message}");
    assert!(model.complete(&Request::user("still here").with_max_tokens(4)).await.is_ok());
}

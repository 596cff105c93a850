//! The scheduler: one thread owns the model and runs continuous batching.
//!
//! Requests arrive on a channel. Each step admits waiting requests while there
//! is room (up to `max_batch` sequences), feeds new prompts in chunks alongside
//! one decode token of every running sequence, samples each sequence's next
//! token with its own sampler, and retires sequences as soon as they stop —
//! their reply is sent at once and their cache slot is freed for the next one.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, Sender, TryRecvError};
use std::time::{Duration, Instant};

use rayon::prelude::*;
use tokio::sync::oneshot;

use crate::LocalError;
use crate::model::{KvCache, Model, Row};
use crate::sampling::{Sampler, SamplingParams};
use crate::tokenizer::ChatTokenizer;

/// How the engine shares the machine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EngineOptions {
    /// Compute threads for the forward pass.
    pub threads: usize,
    /// Sequences decoded together in one forward pass.
    pub max_batch: usize,
    /// Prompt tokens fed per step (a long prompt is spread over several steps
    /// so running sequences keep producing tokens).
    pub prefill_chunk: usize,
}

impl Default for EngineOptions {
    fn default() -> Self {
        Self { threads: default_threads(), max_batch: 16, prefill_chunk: 256 }
    }
}

/// One compute thread per core the process may use.
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// What one request asks the engine to generate.
#[derive(Clone, Debug)]
pub struct GenerationRequest {
    /// The prompt's token ids: at least 1, fewer than the context length.
    pub prompt: Vec<u32>,
    /// Most tokens to generate; the context length also ends the answer.
    pub max_tokens: usize,
    /// Stop sequences: the answer stops at the first one generated and ends before it.
    pub stop: Vec<String>,
    /// How each next token is chosen.
    pub sampling: SamplingParams,
    /// Keep generating through EOS and end-of-turn tokens, up to `max_tokens`
    /// (for benchmarks that need a fixed answer length).
    pub ignore_eos: bool,
}

/// Why a sequence stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// EOS, an end-of-turn token, or a stop sequence.
    Stop,
    /// `max_tokens` or the context length.
    Length,
}

/// One request's answer.
#[derive(Clone, Debug)]
pub struct Generation {
    /// The answer's text, special tokens left out, cut before the earliest stop sequence.
    pub text: String,
    /// Generated token ids, without the EOS or end-of-turn token that stopped them
    /// (a stop sequence's tokens are kept).
    pub tokens: Vec<u32>,
    /// The prompt's length, in tokens.
    pub prompt_tokens: usize,
    /// Why generation stopped.
    pub finish: FinishReason,
    /// From submission to the first generated token.
    pub time_to_first_token: Duration,
}

struct Job {
    request: GenerationRequest,
    reply: oneshot::Sender<Result<Generation, LocalError>>,
    submitted: Instant,
}

/// What the engine has done so far (counters since it started).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EngineStats {
    /// Forward passes run.
    pub steps: u64,
    /// Tokens sampled, over all sequences.
    pub generated_tokens: u64,
    /// Sequences answered.
    pub finished: u64,
    /// Sequences dropped because their caller stopped waiting.
    pub abandoned: u64,
    /// Sequences being decoded now.
    pub running: u64,
}

#[derive(Debug, Default)]
struct Counters {
    steps: AtomicU64,
    generated_tokens: AtomicU64,
    finished: AtomicU64,
    abandoned: AtomicU64,
    running: AtomicU64,
}

/// A handle to the scheduler thread; dropping the last one stops it.
#[derive(Debug, Clone)]
pub struct Engine {
    jobs: Sender<Job>,
    counters: Arc<Counters>,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job").field("prompt_tokens", &self.request.prompt.len()).finish()
    }
}

impl Engine {
    /// Starts the scheduler over a loaded model: crate-internal, since a
    /// [`Model`] is only made by [`LocalModel::load`](crate::LocalModel::load).
    pub(crate) fn start(
        model: Model,
        tokenizer: Arc<ChatTokenizer>,
        options: EngineOptions,
    ) -> Result<Self, LocalError> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(options.threads.max(1))
            .thread_name(|i| format!("fanout-local-{i}"))
            .build()
            .map_err(|e| LocalError::Engine(format!("cannot start compute threads: {e}")))?;
        let (jobs, inbox) = std::sync::mpsc::channel();
        let counters = Arc::new(Counters::default());
        let scheduler = Scheduler {
            model,
            tokenizer,
            options,
            pool,
            counters: counters.clone(),
            waiting: Default::default(),
            running: Vec::new(),
            caches: Vec::new(),
        };
        std::thread::Builder::new()
            .name("fanout-local-scheduler".into())
            .spawn(move || scheduler.run(&inbox))
            .map_err(|e| LocalError::Engine(format!("cannot start the scheduler thread: {e}")))?;
        Ok(Self { jobs, counters })
    }

    /// Counters of the engine's work so far.
    pub fn stats(&self) -> EngineStats {
        let c = &self.counters;
        EngineStats {
            steps: c.steps.load(Ordering::Relaxed),
            generated_tokens: c.generated_tokens.load(Ordering::Relaxed),
            finished: c.finished.load(Ordering::Relaxed),
            abandoned: c.abandoned.load(Ordering::Relaxed),
            running: c.running.load(Ordering::Relaxed),
        }
    }

    /// Queues a request; the answer arrives when its sequence stops. Dropping
    /// the returned future cancels the request (its slot is freed next step).
    pub async fn generate(&self, request: GenerationRequest) -> Result<Generation, LocalError> {
        let (reply, answer) = oneshot::channel();
        self.jobs
            .send(Job { request, reply, submitted: Instant::now() })
            .map_err(|_| LocalError::Engine("the model's scheduler has stopped".into()))?;
        answer.await.map_err(|_| {
            LocalError::Engine("the model's scheduler stopped before answering".into())
        })?
    }
}

struct Sequence {
    job: Job,
    sampler: Sampler,
    /// Prompt tokens already in the cache.
    fed: usize,
    generated: Vec<u32>,
    first_token: Option<Duration>,
}

impl Sequence {
    fn prefilling(&self) -> bool {
        self.fed < self.job.request.prompt.len()
    }

    /// Sends the answer: the generated text, ending before the earliest stop sequence.
    fn answer(self, finish: FinishReason, tokenizer: &ChatTokenizer) {
        let request = &self.job.request;
        let mut text = tokenizer.decode(&self.generated);
        if let Some(cut) = request.stop.iter().filter_map(|s| text.find(s.as_str())).min() {
            text.truncate(cut);
        }
        let generation = Generation {
            text,
            prompt_tokens: request.prompt.len(),
            tokens: self.generated,
            finish,
            time_to_first_token: self.first_token.unwrap_or_default(),
        };
        // A caller that stopped waiting has nothing to receive it.
        let _ = self.job.reply.send(Ok(generation));
    }
}

struct Scheduler {
    model: Model,
    tokenizer: Arc<ChatTokenizer>,
    options: EngineOptions,
    /// The forward pass and sampling run on these threads (one per worker).
    pool: rayon::ThreadPool,
    counters: Arc<Counters>,
    waiting: std::collections::VecDeque<Job>,
    running: Vec<Sequence>,
    caches: Vec<KvCache>,
}

impl Scheduler {
    fn run(mut self, inbox: &Receiver<Job>) {
        loop {
            // Idle: block for work. Busy: take whatever has arrived, without waiting.
            if self.running.is_empty() && self.waiting.is_empty() {
                match inbox.recv() {
                    Ok(job) => self.waiting.push_back(job),
                    // Every handle is gone and nothing is left to answer.
                    Err(_) => return,
                }
            }
            loop {
                match inbox.try_recv() {
                    Ok(job) => self.waiting.push_back(job),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected)
                        if self.running.is_empty() && self.waiting.is_empty() =>
                    {
                        return;
                    }
                    Err(TryRecvError::Disconnected) => break,
                }
            }
            self.drop_abandoned();
            self.admit();
            if !self.running.is_empty() {
                self.step();
            }
        }
    }

    /// Callers that gave up (timeout, cancellation) free their slot.
    fn drop_abandoned(&mut self) {
        self.waiting.retain(|job| !job.reply.is_closed());
        let mut i = 0;
        while i < self.running.len() {
            if self.running[i].job.reply.is_closed() {
                self.retire(i);
                self.counters.abandoned.fetch_add(1, Ordering::Relaxed);
            } else {
                i += 1;
            }
        }
    }

    fn admit(&mut self) {
        let context = self.model.config.context_length;
        while self.running.len() < self.options.max_batch {
            let Some(job) = self.waiting.pop_front() else { break };
            let prompt = job.request.prompt.len();
            if prompt == 0 || prompt >= context {
                let message = format!(
                    "the prompt is {prompt} tokens; this model reads 1 to {} tokens",
                    context - 1
                );
                let _ = job.reply.send(Err(LocalError::PromptTooLong(message)));
                continue;
            }
            let sampler = Sampler::new(job.request.sampling.clone());
            self.running.push(Sequence {
                job,
                sampler,
                fed: 0,
                generated: Vec::new(),
                first_token: None,
            });
            self.caches.push(KvCache::new(&self.model.config));
        }
        self.counters.running.store(self.running.len() as u64, Ordering::Relaxed);
    }

    fn step(&mut self) {
        // Decode rows first (one per running sequence), then prompt chunks.
        let mut rows = Vec::new();
        let mut logits_for = Vec::new();
        let mut sampled = Vec::new();
        for (i, seq) in self.running.iter().enumerate() {
            if !seq.prefilling() {
                let token = *seq.generated.last().expect("a decoding sequence has a token");
                logits_for.push(rows.len());
                sampled.push(i);
                rows.push(Row { token, sequence: i, position: self.caches[i].len() });
            }
        }
        let mut budget = self.options.prefill_chunk.max(1);
        for (i, seq) in self.running.iter_mut().enumerate() {
            if budget == 0 || !seq.prefilling() {
                continue;
            }
            let prompt = &seq.job.request.prompt;
            let take = budget.min(prompt.len() - seq.fed);
            for (offset, &token) in prompt[seq.fed..seq.fed + take].iter().enumerate() {
                rows.push(Row { token, sequence: i, position: seq.fed + offset });
            }
            seq.fed += take;
            budget -= take;
            if !seq.prefilling() {
                logits_for.push(rows.len() - 1);
                sampled.push(i);
            }
        }
        let (model, caches) = (&self.model, &mut self.caches);
        let logits = match self.pool.install(|| model.forward(&rows, caches, &logits_for)) {
            Ok(logits) => logits,
            Err(error) => {
                // A failed pass leaves the caches unreliable: fail every running sequence.
                let message = format!("forward pass failed: {error}");
                while !self.running.is_empty() {
                    let seq = self.running.swap_remove(0);
                    self.caches.swap_remove(0);
                    let _ = seq.job.reply.send(Err(LocalError::Engine(message.clone())));
                }
                return;
            }
        };
        // Sampling reads the whole vocabulary per sequence: spread it over the threads.
        let mut logits_of: Vec<Option<&[f32]>> = vec![None; self.running.len()];
        for (logits, &i) in logits.iter().zip(&sampled) {
            logits_of[i] = Some(logits);
        }
        let running = &mut self.running;
        let tokens: Vec<Option<u32>> = self.pool.install(|| {
            running
                .par_iter_mut()
                .zip(logits_of)
                .map(|(seq, logits)| logits.map(|logits| seq.sampler.sample(logits)))
                .collect()
        });
        let mut finished = Vec::new();
        for (i, token) in tokens.into_iter().enumerate() {
            let Some(token) = token else { continue };
            let seq = &mut self.running[i];
            self.counters.generated_tokens.fetch_add(1, Ordering::Relaxed);
            seq.first_token.get_or_insert_with(|| seq.job.submitted.elapsed());
            if let Some(reason) = self.stop_reason(i, token) {
                finished.push((i, reason));
            }
        }
        self.counters.steps.fetch_add(1, Ordering::Relaxed);
        self.counters.finished.fetch_add(finished.len() as u64, Ordering::Relaxed);
        // Retire from the back so earlier indices stay valid.
        finished.sort_by_key(|(i, _)| std::cmp::Reverse(*i));
        for (i, reason) in finished {
            self.retire(i).answer(reason, &self.tokenizer);
        }
    }

    /// Records `token` for sequence `i`; says why the sequence stops, if it does.
    fn stop_reason(&mut self, i: usize, token: u32) -> Option<FinishReason> {
        let seq = &mut self.running[i];
        if self.tokenizer.ends_generation(token) && !seq.job.request.ignore_eos {
            return Some(FinishReason::Stop);
        }
        seq.generated.push(token);
        let request = &seq.job.request;
        if !request.stop.is_empty() {
            let text = self.tokenizer.decode(&seq.generated);
            if request.stop.iter().any(|stop| text.contains(stop.as_str())) {
                return Some(FinishReason::Stop);
            }
        }
        let at_context_end =
            request.prompt.len() + seq.generated.len() >= self.model.config.context_length;
        (seq.generated.len() >= request.max_tokens || at_context_end)
            .then_some(FinishReason::Length)
    }

    fn retire(&mut self, i: usize) -> Sequence {
        self.caches.swap_remove(i);
        let sequence = self.running.swap_remove(i);
        self.counters.running.store(self.running.len() as u64, Ordering::Relaxed);
        sequence
    }
}

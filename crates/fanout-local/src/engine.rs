//! The scheduler: one thread owns the model and runs continuous batching.
//!
//! Requests arrive on a channel. Each step admits waiting requests while there
//! is room (up to `max_batch` sequences), feeds new prompts in chunks alongside
//! one decode token of every running sequence, samples each sequence's next
//! token with its own sampler, and retires sequences as soon as they stop —
//! their reply is sent at once and their cache blocks go back to the pool.
//!
//! The KV cache is paged (`kv`): a request is admitted when the memory budget
//! has room for its prompt and its answer budget, and waits otherwise. A
//! prompt that starts like one computed before (or being computed now) takes
//! the shared blocks instead of computing them again: a vote's samples
//! prefill their prompt once, a batch's rows their common rubric once.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, Sender, TryRecvError};
use std::time::{Duration, Instant};

use rayon::prelude::*;
use tokio::sync::oneshot;

use crate::LocalError;
use crate::grammar::{Constraint, LazyGrammars, OutputFormat};
use crate::kv::{BlockTable, KvPool, Lookup, PrefixKey};
use crate::model::{Model, Row};
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
    /// Bytes the KV cache may take; `None`: half the memory available when
    /// the engine starts ([`default_kv_memory`]).
    pub kv_memory: Option<u64>,
    /// Positions per KV cache block: the unit of memory and of sharing.
    pub block_tokens: usize,
    /// Sequences that start with the same tokens share their cache blocks.
    pub prefix_sharing: bool,
}

impl Default for EngineOptions {
    fn default() -> Self {
        Self {
            threads: default_threads(),
            max_batch: 16,
            prefill_chunk: 256,
            kv_memory: None,
            block_tokens: crate::kv::DEFAULT_BLOCK_TOKENS,
            prefix_sharing: true,
        }
    }
}

/// One compute thread per core the process may use.
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Half the memory the system says is available now (`MemAvailable` in
/// `/proc/meminfo`), else 2 GiB where that cannot be read.
pub fn default_kv_memory() -> u64 {
    const FALLBACK: u64 = 2 << 30;
    let available = std::fs::read_to_string("/proc/meminfo").ok().and_then(|info| {
        let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib * 1024)
    });
    available.map_or(FALLBACK, |bytes| bytes / 2)
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
    /// (for benchmarks that need a fixed answer length; not with a `format`).
    pub ignore_eos: bool,
    /// The answer's shape: decoding keeps to it, token by token.
    pub format: Option<OutputFormat>,
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
    /// The grammar of `request.format`, compiled by the caller.
    constraint: Option<Constraint>,
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
    /// Requests waiting for a batch slot or for KV memory.
    pub waiting: u64,
    /// Prompt positions computed by forward passes.
    pub prompt_tokens_computed: u64,
    /// Prompt positions taken from shared blocks instead of computed.
    pub prompt_tokens_shared: u64,
    /// Blocks the KV memory budget holds.
    pub kv_blocks_total: u64,
    /// Blocks running sequences hold now.
    pub kv_blocks_used: u64,
    /// Blocks held by more than one running sequence now.
    pub kv_blocks_shared: u64,
    /// Blocks of computed prefixes no sequence holds, kept for later ones.
    pub kv_blocks_cached: u64,
    /// Cached prefix blocks reused for other positions (least recently used first).
    pub kv_blocks_evicted: u64,
    /// The most blocks held at once.
    pub kv_blocks_peak: u64,
    /// Positions per block.
    pub kv_block_tokens: u64,
}

#[derive(Debug, Default)]
struct Counters {
    steps: AtomicU64,
    generated_tokens: AtomicU64,
    finished: AtomicU64,
    abandoned: AtomicU64,
    running: AtomicU64,
    waiting: AtomicU64,
    prompt_tokens_computed: AtomicU64,
    prompt_tokens_shared: AtomicU64,
    kv_blocks_total: AtomicU64,
    kv_blocks_used: AtomicU64,
    kv_blocks_shared: AtomicU64,
    kv_blocks_cached: AtomicU64,
    kv_blocks_evicted: AtomicU64,
    kv_blocks_peak: AtomicU64,
    kv_block_tokens: AtomicU64,
}

/// A handle to the scheduler thread; dropping the last one stops it.
#[derive(Debug, Clone)]
pub struct Engine {
    jobs: Sender<Job>,
    counters: Arc<Counters>,
    grammars: Arc<LazyGrammars>,
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
        let block_tokens = options.block_tokens.max(1);
        let grammars = Arc::new(LazyGrammars::new(tokenizer.clone(), model.config.vocab_size));
        let budget = options.kv_memory.unwrap_or_else(default_kv_memory);
        let capacity = budget / KvPool::block_bytes(&model.config, block_tokens);
        let kv = KvPool::new(&model.config, block_tokens, capacity as usize);
        let scheduler = Scheduler {
            model,
            tokenizer,
            options,
            pool,
            counters: counters.clone(),
            waiting: Default::default(),
            running: Vec::new(),
            kv,
            kv_budget: budget,
        };
        scheduler.publish();
        std::thread::Builder::new()
            .name("fanout-local-scheduler".into())
            .spawn(move || scheduler.run(&inbox))
            .map_err(|e| LocalError::Engine(format!("cannot start the scheduler thread: {e}")))?;
        Ok(Self { jobs, counters, grammars })
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
            waiting: c.waiting.load(Ordering::Relaxed),
            prompt_tokens_computed: c.prompt_tokens_computed.load(Ordering::Relaxed),
            prompt_tokens_shared: c.prompt_tokens_shared.load(Ordering::Relaxed),
            kv_blocks_total: c.kv_blocks_total.load(Ordering::Relaxed),
            kv_blocks_used: c.kv_blocks_used.load(Ordering::Relaxed),
            kv_blocks_shared: c.kv_blocks_shared.load(Ordering::Relaxed),
            kv_blocks_cached: c.kv_blocks_cached.load(Ordering::Relaxed),
            kv_blocks_evicted: c.kv_blocks_evicted.load(Ordering::Relaxed),
            kv_blocks_peak: c.kv_blocks_peak.load(Ordering::Relaxed),
            kv_block_tokens: c.kv_block_tokens.load(Ordering::Relaxed),
        }
    }

    /// Queues a request; the answer arrives when its sequence stops. Dropping
    /// the returned future cancels the request (its slot is freed next step).
    pub async fn generate(&self, request: GenerationRequest) -> Result<Generation, LocalError> {
        // Compiled before it is queued, on a blocking thread (the first one
        // also builds the vocabulary's trie): a bad schema is refused at once,
        // and neither the scheduler's steps nor the caller's runtime wait.
        let constraint = match request.format.clone() {
            Some(format) => {
                let grammars = self.grammars.clone();
                let compiled = tokio::task::spawn_blocking(move || grammars.constrain(&format));
                Some(compiled.await.map_err(|e| LocalError::Engine(e.to_string()))??)
            }
            None => None,
        };
        let (reply, answer) = oneshot::channel();
        self.jobs
            .send(Job { request, constraint, reply, submitted: Instant::now() })
            .map_err(|_| LocalError::Engine("the model's scheduler has stopped".into()))?;
        answer.await.map_err(|_| {
            LocalError::Engine("the model's scheduler stopped before answering".into())
        })?
    }
}

struct Sequence {
    job: Job,
    sampler: Sampler,
    /// Where a structured answer stands in its grammar.
    constraint: Option<Constraint>,
    /// Its KV cache blocks, and the blocks it may still take.
    table: BlockTable,
    /// Prompt tokens already in the cache (computed or shared).
    fed: usize,
    generated: Vec<u32>,
    first_token: Option<Duration>,
}

/// How a sequence ends.
enum Ending {
    Finished(FinishReason),
    Failed(String),
}

impl Sequence {
    fn prefilling(&self) -> bool {
        self.fed < self.job.request.prompt.len()
    }

    /// Samples the next token, from the tokens its grammar allows if it has one.
    fn next_token(&mut self, logits: &mut [f32]) -> Result<u32, String> {
        if let Some(constraint) = &mut self.constraint {
            constraint.mask(logits)?;
        }
        Ok(self.sampler.sample(logits))
    }

    /// Takes the computed blocks that continue its prompt from the shared
    /// ones, block by block. Stops one token short of the prompt's end: that
    /// token's logits start the answer. Says `false` when the next block is
    /// being computed by another sequence now: then this one waits a step
    /// and shares it, rather than computing the same positions twice.
    fn share_prefix(&mut self, kv: &mut KvPool) -> bool {
        let block_tokens = kv.block_tokens();
        let prompt = &self.job.request.prompt;
        while self.fed + block_tokens < prompt.len() {
            let tokens = &prompt[self.fed..self.fed + block_tokens];
            let Some(key) = PrefixKey::after(kv, &self.table, tokens) else { return true };
            match kv.lookup(&key) {
                Lookup::Ready(id) => {
                    kv.adopt(&mut self.table, id);
                    self.fed += block_tokens;
                }
                Lookup::Filling => return false,
                Lookup::Absent => return true,
            }
        }
        true
    }

    /// Sends the answer: the generated text, ending before the earliest stop sequence.
    fn answer(self, finish: FinishReason, tokenizer: &ChatTokenizer) {
        let request = &self.job.request;
        let mut text = tokenizer.decode(&self.generated);
        let cut = request.stop.iter().filter_map(|s| text.find(s.as_str())).min();
        if let Some(cut) = cut.filter(|_| self.constraint.is_none()) {
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
    kv: KvPool,
    /// The bytes `kv` was sized from, for error messages.
    kv_budget: u64,
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
            self.publish();
        }
    }

    /// Copies the gauges out for [`Engine::stats`].
    fn publish(&self) {
        let c = &self.counters;
        let kv = self.kv.stats();
        c.running.store(self.running.len() as u64, Ordering::Relaxed);
        c.waiting.store(self.waiting.len() as u64, Ordering::Relaxed);
        c.kv_blocks_total.store(kv.capacity as u64, Ordering::Relaxed);
        c.kv_blocks_used.store(kv.in_use as u64, Ordering::Relaxed);
        c.kv_blocks_shared.store(kv.shared as u64, Ordering::Relaxed);
        c.kv_blocks_cached.store(kv.cached as u64, Ordering::Relaxed);
        c.kv_blocks_evicted.store(kv.evicted, Ordering::Relaxed);
        c.kv_blocks_peak.store(kv.peak_in_use as u64, Ordering::Relaxed);
        c.kv_block_tokens.store(self.kv.block_tokens() as u64, Ordering::Relaxed);
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

    /// Starts waiting requests, first come first served, while there is a
    /// batch slot and KV memory for the whole of the next one: its prompt and
    /// its answer budget, so no running sequence ever runs out mid-answer. A
    /// request that does not fit even alone is answered with an error.
    fn admit(&mut self) {
        let context = self.model.config.context_length;
        while self.running.len() < self.options.max_batch {
            let Some(job) = self.waiting.front() else { break };
            let prompt = job.request.prompt.len();
            let positions = (prompt + job.request.max_tokens).min(context);
            let blocks = self.kv.blocks_for(positions);
            let refusal = if prompt == 0 || prompt >= context {
                Some(format!(
                    "the prompt is {prompt} tokens; this model reads 1 to {} tokens",
                    context - 1
                ))
            } else if blocks > self.kv.capacity() {
                Some(format!(
                    "the request needs KV cache for {positions} tokens ({prompt} prompt + {} \
                     answer), more than the KV memory budget of {} holds ({} tokens); give \
                     the local model more (--kv-memory) or ask for fewer tokens",
                    positions - prompt,
                    bytesize::ByteSize(self.kv_budget).display().iec(),
                    self.kv.capacity() * self.kv.block_tokens(),
                ))
            } else {
                None
            };
            if let Some(message) = refusal {
                let job = self.waiting.pop_front().expect("looked at above");
                let _ = job.reply.send(Err(LocalError::PromptTooLong(message)));
                continue;
            }
            // No room yet: it waits, and so do the requests behind it (first
            // come first served, so a long request is not passed over forever).
            let Some(table) = self.kv.reserve(blocks) else { break };
            let mut job = self.waiting.pop_front().expect("looked at above");
            let sampler = Sampler::new(job.request.sampling.clone());
            self.running.push(Sequence {
                constraint: job.constraint.take(),
                job,
                sampler,
                table,
                fed: 0,
                generated: Vec::new(),
                first_token: None,
            });
        }
    }

    fn step(&mut self) {
        let block_tokens = self.kv.block_tokens();
        // Decode rows first (one per running sequence), then prompt chunks.
        let mut rows = Vec::new();
        let mut logits_for = Vec::new();
        let mut sampled = Vec::new();
        for (i, seq) in self.running.iter_mut().enumerate() {
            if !seq.prefilling() {
                let token = *seq.generated.last().expect("a decoding sequence has a token");
                // The newest token sits after the prompt and the tokens before it.
                let position = seq.job.request.prompt.len() + seq.generated.len() - 1;
                if position == seq.table.blocks.len() * block_tokens {
                    self.kv.allocate(&mut seq.table, None);
                }
                logits_for.push(rows.len());
                sampled.push(i);
                rows.push(Row { token, sequence: i, position });
            }
        }
        // Chunks end on block boundaries (unless the prompt ends first), so
        // the next chunk can start with a shared block.
        let mut budget = self.options.prefill_chunk.max(block_tokens);
        // Prefix blocks this pass computes: shareable once it succeeds.
        let mut computed = Vec::new();
        let sharing = self.options.prefix_sharing;
        for (i, seq) in self.running.iter_mut().enumerate() {
            if budget == 0 || !seq.prefilling() {
                continue;
            }
            let before = seq.fed;
            let go_on = !sharing || seq.share_prefix(&mut self.kv);
            let shared = (seq.fed - before) as u64;
            self.counters.prompt_tokens_shared.fetch_add(shared, Ordering::Relaxed);
            if !go_on {
                continue;
            }
            let prompt = &seq.job.request.prompt;
            let end = if prompt.len() - seq.fed <= budget {
                prompt.len()
            } else {
                (seq.fed + budget) / block_tokens * block_tokens
            };
            if end <= seq.fed {
                continue;
            }
            for position in seq.fed..end {
                if position == seq.table.blocks.len() * block_tokens {
                    // A block of prompt tokens only is registered for sharing.
                    let block = prompt.get(position..position + block_tokens);
                    let key = block
                        .filter(|_| sharing)
                        .and_then(|tokens| PrefixKey::after(&self.kv, &seq.table, tokens));
                    let id = self.kv.allocate(&mut seq.table, key);
                    if self.kv.is_registered(id) {
                        computed.push(id);
                    }
                }
                rows.push(Row { token: prompt[position], sequence: i, position });
            }
            self.counters
                .prompt_tokens_computed
                .fetch_add((end - seq.fed) as u64, Ordering::Relaxed);
            budget -= end - seq.fed;
            seq.fed = end;
            if !seq.prefilling() {
                logits_for.push(rows.len() - 1);
                sampled.push(i);
            }
        }
        if rows.is_empty() {
            // Every prefilling sequence waits for a block another computes:
            // impossible, since the one computing it runs first, but never spin.
            return;
        }
        let tables: Vec<&[crate::kv::BlockId]> =
            self.running.iter().map(|seq| seq.table.blocks.as_slice()).collect();
        let (model, kv) = (&self.model, &mut self.kv);
        let logits = match self.pool.install(|| model.forward(&rows, kv, &tables, &logits_for)) {
            Ok(logits) => logits,
            Err(error) => {
                // A failed pass leaves this step's positions unwritten: fail
                // every running sequence (their computed blocks stay unshared).
                let message = format!("forward pass failed: {error}");
                for seq in std::mem::take(&mut self.running) {
                    self.kv.release(seq.table);
                    let _ = seq.job.reply.send(Err(LocalError::Engine(message.clone())));
                }
                return;
            }
        };
        for id in computed {
            self.kv.mark_ready(id);
        }
        // Sampling (and a structured answer's mask) reads the whole
        // vocabulary per sequence: spread it over the threads.
        let mut logits_of: Vec<Option<Vec<f32>>> = (0..self.running.len()).map(|_| None).collect();
        for (logits, &i) in logits.into_iter().zip(&sampled) {
            logits_of[i] = Some(logits);
        }
        let running = &mut self.running;
        let tokens: Vec<Option<Result<u32, String>>> = self.pool.install(|| {
            running
                .par_iter_mut()
                .zip(logits_of)
                .map(|(seq, logits)| logits.map(|mut logits| seq.next_token(&mut logits)))
                .collect()
        });
        let mut ended = Vec::new();
        for (i, token) in tokens.into_iter().enumerate() {
            let Some(token) = token else { continue };
            let seq = &mut self.running[i];
            self.counters.generated_tokens.fetch_add(1, Ordering::Relaxed);
            seq.first_token.get_or_insert_with(|| seq.job.submitted.elapsed());
            let ending = match token {
                Ok(token) => self.stop_reason(i, token),
                Err(message) => Some(Ending::Failed(message)),
            };
            if let Some(ending) = ending {
                ended.push((i, ending));
            }
        }
        self.counters.steps.fetch_add(1, Ordering::Relaxed);
        // Retire from the back so earlier indices stay valid.
        ended.sort_by_key(|(i, _)| std::cmp::Reverse(*i));
        for (i, ending) in ended {
            let seq = self.retire(i);
            match ending {
                Ending::Finished(reason) => {
                    self.counters.finished.fetch_add(1, Ordering::Relaxed);
                    seq.answer(reason, &self.tokenizer);
                }
                Ending::Failed(message) => {
                    // The grammar refused what its own mask allowed: asking
                    // again would fail the same way, so not retryable.
                    let _ = seq.job.reply.send(Err(LocalError::Schema(message)));
                }
            }
        }
    }

    /// Records `token` for sequence `i`; says why the sequence stops, if it does.
    fn stop_reason(&mut self, i: usize, token: u32) -> Option<Ending> {
        let seq = &mut self.running[i];
        // A structured answer ends where its grammar allowed an end token.
        let keep_going = seq.job.request.ignore_eos && seq.constraint.is_none();
        if self.tokenizer.ends_generation(token) && !keep_going {
            return Some(Ending::Finished(FinishReason::Stop));
        }
        seq.generated.push(token);
        let request = &seq.job.request;
        if let Some(constraint) = &mut seq.constraint {
            match constraint.advance(token) {
                // Nothing the grammar could add (the object is closed): done.
                Ok(true) => return Some(Ending::Finished(FinishReason::Stop)),
                Ok(false) => {}
                Err(message) => return Some(Ending::Failed(message)),
            }
        } else if !request.stop.is_empty() {
            // Stop sequences end free text only: inside JSON they would cut a
            // structured answer short of parsing.
            let text = self.tokenizer.decode(&seq.generated);
            if request.stop.iter().any(|stop| text.contains(stop.as_str())) {
                return Some(Ending::Finished(FinishReason::Stop));
            }
        }
        let at_context_end =
            request.prompt.len() + seq.generated.len() >= self.model.config.context_length;
        (seq.generated.len() >= request.max_tokens || at_context_end)
            .then_some(Ending::Finished(FinishReason::Length))
    }

    /// Takes sequence `i` out of the batch; its blocks go back to the pool.
    fn retire(&mut self, i: usize) -> Sequence {
        // `remove`, not `swap_remove`: the batch stays in admission order, so
        // the prefill budget goes to the oldest prompts first.
        let mut sequence = self.running.remove(i);
        self.kv.release(std::mem::take(&mut sequence.table));
        // Before the answer goes out: whoever receives it sees the batch without it.
        self.publish();
        sequence
    }
}

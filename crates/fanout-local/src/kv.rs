//! The KV cache in blocks of a fixed token count, within a memory budget, and
//! shared between sequences that start with the same tokens.
//!
//! Every sequence owns a [`BlockTable`]: the blocks holding its positions in
//! order. A block that holds a full block of *prompt* tokens is registered
//! under its content — the block before it and its tokens — so a later
//! sequence whose prompt starts the same way takes a reference to it instead
//! of computing those positions again. Keys and values at a position depend
//! only on the tokens up to it, and the block-quantized kernels (Q4_1, Q8_0:
//! the default model's) are batch-invariant, so a shared block holds exactly
//! what the sequence would have computed itself. (Other weight types go
//! through candle's f32 matmul, which may round differently by batch size:
//! equal answers, not always equal bits.)
//!
//! A block is in one of three states: *in use* (referenced by a sequence),
//! *cached* (no references, but registered: kept for later sequences and
//! evicted least-recently-used when a block is needed), or *free*.
//!
//! Memory is admitted, not grabbed: a sequence reserves every block it may
//! need (its prompt and its answer budget) before it starts, so a running
//! sequence never runs out mid-answer and nothing has to be preempted. The
//! invariant is `in use + reserved ≤ capacity`.
//!
//! Why by hand: the paged caches of vLLM or mistral.rs are tied to their own
//! model code and GPU kernels; this one is the bookkeeping of a few vectors.

use std::collections::{BTreeMap, HashMap};

use crate::gguf::ModelConfig;

/// Index of a block in the pool.
pub type BlockId = u32;

/// Positions per block unless configured otherwise.
pub const DEFAULT_BLOCK_TOKENS: usize = 16;

/// What a registered block holds: the block before it (`None` for a prompt's
/// first) and its tokens. The parent's id names the whole prefix exactly,
/// because a registered block is never evicted while a registered block
/// follows it (see [`KvPool::evict`]).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PrefixKey {
    parent: Option<BlockId>,
    tokens: Box<[u32]>,
}

impl PrefixKey {
    /// The key of the block after `table`'s blocks, holding `tokens`; `None`
    /// when the table's last block is not registered (then neither can this be).
    pub fn after(pool: &KvPool, table: &BlockTable, tokens: &[u32]) -> Option<Self> {
        let parent = match table.blocks.last() {
            Some(&last) => {
                pool.key_of[last as usize].as_ref()?;
                Some(last)
            }
            None => None,
        };
        Some(Self { parent, tokens: tokens.into() })
    }
}

/// Where a prefix block stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lookup {
    /// Computed: take a reference to it.
    Ready(BlockId),
    /// Another sequence is computing it in this step or the next.
    Filling,
    /// Nobody has it.
    Absent,
}

/// One sequence's blocks, and the blocks it may still allocate.
#[derive(Debug, Default)]
pub struct BlockTable {
    pub blocks: Vec<BlockId>,
    reserve: usize,
}

/// Counters of the pool, for the engine's stats.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolStats {
    pub capacity: usize,
    pub in_use: usize,
    pub shared: usize,
    pub cached: usize,
    pub evicted: u64,
    pub peak_in_use: usize,
}

#[derive(Debug)]
pub struct KvPool {
    block_tokens: usize,
    /// Floats of one layer's keys or values in one block.
    half_stride: usize,
    layers: usize,
    capacity: usize,
    /// The blocks' memory, allocated on first use and kept for reuse.
    storage: Vec<Box<[f32]>>,
    references: Vec<u32>,
    key_of: Vec<Option<PrefixKey>>,
    /// Whether a registered block's positions are all computed.
    ready: Vec<bool>,
    /// How many registered blocks name this one as their parent.
    child_count: Vec<u32>,
    /// The cached blocks by the time they were last let go: oldest first.
    cached: BTreeMap<u64, BlockId>,
    released_at: Vec<u64>,
    clock: u64,
    registry: HashMap<PrefixKey, BlockId, ahash::RandomState>,
    free: Vec<BlockId>,
    in_use: usize,
    reserved: usize,
    evicted: u64,
    peak_in_use: usize,
}

impl KvPool {
    /// A pool of `capacity` blocks of `block_tokens` positions for `config`'s layers.
    pub fn new(config: &ModelConfig, block_tokens: usize, capacity: usize) -> Self {
        Self {
            block_tokens,
            half_stride: block_tokens * config.kv_heads * config.head_dim,
            layers: config.layers,
            capacity,
            storage: Vec::new(),
            references: Vec::new(),
            key_of: Vec::new(),
            ready: Vec::new(),
            child_count: Vec::new(),
            cached: BTreeMap::new(),
            released_at: Vec::new(),
            clock: 0,
            registry: HashMap::default(),
            free: Vec::new(),
            in_use: 0,
            reserved: 0,
            evicted: 0,
            peak_in_use: 0,
        }
    }

    /// Bytes of one block: keys and values of every layer, f32.
    pub fn block_bytes(config: &ModelConfig, block_tokens: usize) -> u64 {
        block_tokens as u64 * config.kv_bytes_per_token()
    }

    pub fn block_tokens(&self) -> usize {
        self.block_tokens
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Blocks that hold `tokens` positions.
    pub fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_tokens)
    }

    /// Reserves `blocks` for a new sequence, if the budget has room for them
    /// next to what running sequences hold and have reserved.
    pub fn reserve(&mut self, blocks: usize) -> Option<BlockTable> {
        (self.in_use + self.reserved + blocks <= self.capacity).then(|| {
            self.reserved += blocks;
            BlockTable { blocks: Vec::with_capacity(blocks), reserve: blocks }
        })
    }

    /// Where the block with `key` stands.
    pub fn lookup(&self, key: &PrefixKey) -> Lookup {
        match self.registry.get(key) {
            Some(&id) if self.ready[id as usize] => Lookup::Ready(id),
            Some(_) => Lookup::Filling,
            None => Lookup::Absent,
        }
    }

    /// Appends a computed shared block to `table`, in place of one it would
    /// have allocated.
    pub fn adopt(&mut self, table: &mut BlockTable, id: BlockId) {
        let i = id as usize;
        debug_assert!(self.ready[i], "only computed blocks are shared");
        if self.references[i] == 0 {
            self.cached.remove(&self.released_at[i]);
            self.in_use += 1;
            self.peak_in_use = self.peak_in_use.max(self.in_use);
        }
        self.references[i] += 1;
        self.use_reservation(table);
        table.blocks.push(id);
    }

    /// Appends a block for `table` to fill, registered under `key` when one is
    /// given and nobody holds that prefix yet.
    pub fn allocate(&mut self, table: &mut BlockTable, key: Option<PrefixKey>) -> BlockId {
        self.use_reservation(table);
        let id = match self.free.pop() {
            Some(id) => id,
            None if self.storage.len() < self.capacity => self.grow(),
            None => self.evict(),
        };
        let i = id as usize;
        self.references[i] = 1;
        self.in_use += 1;
        self.peak_in_use = self.peak_in_use.max(self.in_use);
        if let Some(key) = key.filter(|key| !self.registry.contains_key(key)) {
            if let Some(parent) = key.parent {
                self.child_count[parent as usize] += 1;
            }
            self.registry.insert(key.clone(), id);
            self.key_of[i] = Some(key);
            self.ready[i] = false;
        }
        table.blocks.push(id);
        id
    }

    /// The block's positions are computed: later sequences may share it.
    pub fn mark_ready(&mut self, id: BlockId) {
        if self.key_of[id as usize].is_some() {
            self.ready[id as usize] = true;
        }
    }

    /// Whether `id` is registered (so the block after it can be too).
    pub fn is_registered(&self, id: BlockId) -> bool {
        self.key_of[id as usize].is_some()
    }

    /// Lets go of a finished (or failed) sequence's blocks and the rest of its
    /// reservation. Computed prefix blocks stay cached; the rest are free.
    pub fn release(&mut self, table: BlockTable) {
        self.reserved -= table.reserve;
        // Last block first: a block is let go no later than the one before
        // it, so eviction (oldest first) reaches the end of a prefix first.
        for &id in table.blocks.iter().rev() {
            let i = id as usize;
            self.references[i] -= 1;
            if self.references[i] > 0 {
                continue;
            }
            self.in_use -= 1;
            if self.ready[i] && self.key_of[i].is_some() {
                self.clock += 1;
                self.released_at[i] = self.clock;
                self.cached.insert(self.clock, id);
            } else {
                self.unregister(id);
                self.free.push(id);
            }
        }
    }

    /// One layer of one block: `block_tokens` keys, then as many values.
    pub fn layer(&self, id: BlockId, layer: usize) -> &[f32] {
        &self.storage[id as usize][layer * 2 * self.half_stride..][..2 * self.half_stride]
    }

    /// Writes one position's keys and values for one layer.
    pub fn write(&mut self, id: BlockId, layer: usize, slot: usize, key: &[f32], value: &[f32]) {
        let width = key.len();
        let block = &mut self.storage[id as usize][layer * 2 * self.half_stride..];
        block[slot * width..][..width].copy_from_slice(key);
        block[self.half_stride + slot * width..][..width].copy_from_slice(value);
    }

    pub fn stats(&self) -> PoolStats {
        PoolStats {
            capacity: self.capacity,
            in_use: self.in_use,
            shared: self.references.iter().filter(|&&r| r > 1).count(),
            cached: self.cached.len(),
            evicted: self.evicted,
            peak_in_use: self.peak_in_use,
        }
    }

    fn use_reservation(&mut self, table: &mut BlockTable) {
        assert!(table.reserve > 0, "a sequence allocated past its reservation");
        table.reserve -= 1;
        self.reserved -= 1;
    }

    fn grow(&mut self) -> BlockId {
        let id = self.storage.len() as BlockId;
        self.storage.push(vec![0f32; 2 * self.half_stride * self.layers].into_boxed_slice());
        self.references.push(0);
        self.key_of.push(None);
        self.ready.push(false);
        self.child_count.push(0);
        self.released_at.push(0);
        id
    }

    /// Takes the cached block let go longest ago that no registered block
    /// follows. One exists whenever a block is cached: the blocks after a
    /// cached block are cached too (a sequence holding one holds the blocks
    /// before it), and among them the last ones have nothing after them.
    fn evict(&mut self) -> BlockId {
        let (&stamp, &id) = self
            .cached
            .iter()
            .find(|(_, id)| self.child_count[**id as usize] == 0)
            .expect("the reservation guarantees a cached block to evict");
        self.cached.remove(&stamp);
        self.unregister(id);
        self.evicted += 1;
        id
    }

    fn unregister(&mut self, id: BlockId) {
        let i = id as usize;
        if let Some(key) = self.key_of[i].take() {
            self.registry.remove(&key);
            if let Some(parent) = key.parent {
                self.child_count[parent as usize] -= 1;
            }
        }
        self.ready[i] = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> ModelConfig {
        ModelConfig {
            architecture: "llama".into(),
            layers: 1,
            hidden: 4,
            feed_forward: 4,
            heads: 1,
            kv_heads: 1,
            head_dim: 2,
            context_length: 64,
            rms_eps: 1e-5,
            rope_base: 10_000.0,
            vocab_size: 8,
        }
    }

    /// A sequence that fills `prompt`'s full blocks, registering them.
    fn fill(pool: &mut KvPool, prompt: &[u32]) -> BlockTable {
        let mut table = pool.reserve(prompt.len().div_ceil(2)).expect("room");
        for tokens in prompt.chunks(2) {
            let key = (tokens.len() == 2).then(|| PrefixKey::after(pool, &table, tokens)).flatten();
            let id = pool.allocate(&mut table, key);
            pool.mark_ready(id);
        }
        table
    }

    #[test]
    fn prefixes_are_shared_cached_and_evicted_from_the_end() {
        let mut pool = KvPool::new(&config(), 2, 4);
        let first = fill(&mut pool, &[1, 2, 3, 4]);
        let key = PrefixKey::after(&pool, &BlockTable::default(), &[1, 2]).unwrap();
        let Lookup::Ready(shared) = pool.lookup(&key) else { panic!("not registered") };
        let mut second = pool.reserve(2).unwrap();
        pool.adopt(&mut second, shared);
        assert_eq!(pool.stats().shared, 1);
        // 2 in use, 1 reserved by the second: one more block fits, not two.
        assert!(pool.reserve(2).is_none());
        pool.release(first);
        pool.release(second);
        let stats = pool.stats();
        assert_eq!((stats.in_use, stats.cached, stats.shared), (0, 2, 0), "{stats:?}");
        // Filling all four blocks evicts the cached prefix, its end first.
        let other = fill(&mut pool, &[5, 6, 7, 8, 9, 10, 11, 12]);
        assert_eq!(pool.stats().evicted, 2);
        assert_eq!(pool.lookup(&key), Lookup::Absent);
        pool.release(other);
        assert_eq!(pool.stats().in_use, 0);
    }

    #[test]
    fn a_prefix_being_computed_is_waited_for_and_dropped_if_abandoned() {
        let mut pool = KvPool::new(&config(), 2, 4);
        let mut table = pool.reserve(1).unwrap();
        let key = PrefixKey::after(&pool, &table, &[1, 2]).unwrap();
        pool.allocate(&mut table, Some(key.clone()));
        assert_eq!(pool.lookup(&key), Lookup::Filling);
        pool.release(table);
        assert_eq!(pool.lookup(&key), Lookup::Absent);
        assert_eq!(pool.stats().cached, 0);
    }
}

//! Matrix products against 32-value quantized blocks (GGUF Q4_1 and Q8_0),
//! in f32 arithmetic on the dequantized weights' values.
//!
//! Why not candle's quantized matmul: it quantizes the *activations* to 8 bits
//! as well, and with this model that flips answers ("What is the capital of
//! France?" → "L'Étoile…"); f32 weights answer right but are 4× the memory
//! traffic. Here the weights stay packed as the file has them (Q4_1: half a
//! byte each, Q8_0: one) beside their block's scale and offset, are widened to
//! f32 in registers, and multiplied with f32 activations: the dequantized
//! model's arithmetic at an eighth (Q4_1) or a quarter (Q8_0) of its size.
//! Decoding one sequence reads every weight once per token, so what it reads
//! is what it costs: unpacking Q4_1 to a byte a value first doubled that.
//!
//! Each block's offset is factored out of its sum:
//! `Σ (q·scale + offset)·x = Σ q·scale·x + offset·Σ x`, with `Σ x` per block
//! taken once per product for each activation row, and the offsets' share,
//! `Σ offset·Σ x`, one short vector dot product per row after the kernel
//! (scales and offsets are kept apart for it). The AVX-512 kernel multiplies
//! a block's widened values by its scale once per tile and adds their
//! products with each activation row into two sums (values 0..16 and
//! 16..32): two FMAs a block and row, in two chains that overlap (+5–9%
//! prefill over scaling each block's partial sum, single stream alike). The
//! AVX2 and plain kernels take each block's products into a partial sum of
//! its own and scale that, so that the blocks of a row still overlap in the
//! pipeline instead of queueing behind one chain of dependent FMAs (+29% for
//! one decoded sequence when it came in). The result equals the dequantized
//! product to within f32 rounding.
//!
//! The kernel is AVX-512 where the CPU has it (+12% single-stream decode over
//! AVX2), else AVX2 + FMA, else plain Rust. It asks for each weight row's
//! bytes a few rows before it reads them (`PREFETCH_ROWS`), and indexes
//! slices cut to the row's length up front (`Blocks`), so its loop is the
//! arithmetic alone: half the instructions a Q4_1 block took with bounds
//! checks and a scalar chain for the offsets.
//!
//! Every output value is one row's dot product in a fixed order, whatever the
//! batch size, so an answer never depends on what else is in the batch.

use candle_core::quantized::{GgmlDType, QTensor};
use half::f16;
use rayon::prelude::*;

use crate::lanes::add_lanes;

const BLOCK: usize = 32;

/// How a block's 32 quantized values are packed in its bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Packing {
    /// Q4_1's 16 bytes: value `i` is the low nibble of byte `i` (for `i` < 16)
    /// or the high nibble of byte `i − 16`, from 0 to 15.
    Nibbles,
    /// Q8_0's 32 signed bytes, one a value.
    Bytes,
}

/// The bytes one block's values take.
const fn block_bytes<const NIBBLES: bool>() -> usize {
    if NIBBLES { BLOCK / 2 } else { BLOCK }
}

/// One block's 32 values from its packed bytes.
#[inline(always)]
fn unpack<const NIBBLES: bool>(bytes: &[u8]) -> [i8; BLOCK] {
    std::array::from_fn(|i| match NIBBLES {
        true if i < BLOCK / 2 => (bytes[i] & 0x0F) as i8,
        true => (bytes[i - BLOCK / 2] >> 4) as i8,
        false => bytes[i] as i8,
    })
}

/// A weight matrix (rows × cols) in 32-value blocks: `value = q · scale + offset`.
#[derive(Debug)]
pub struct BlockMatrix {
    rows: usize,
    cols: usize,
    packing: Packing,
    /// The blocks' packed values, row-major.
    quants: Vec<u8>,
    /// Each block's scale, row-major.
    scales: Vec<f32>,
    /// Each block's offset, row-major (Q4_1; Q8_0 has none).
    offsets: Vec<f32>,
}

impl BlockMatrix {
    /// Repacks a GGUF tensor, if its type has blocks this kernel reads.
    pub fn from_qtensor(tensor: &QTensor) -> Option<Self> {
        let dims = tensor.shape().dims();
        let [rows, cols] = *dims else { return None };
        if cols % BLOCK != 0 {
            return None;
        }
        let data = tensor.data().ok()?;
        let blocks = rows * cols / BLOCK;
        let mut scales = Vec::with_capacity(blocks);
        let mut offsets = Vec::new();
        let half_at =
            |bytes: &[u8], at: usize| f16::from_le_bytes([bytes[at], bytes[at + 1]]).to_f32();
        let (packing, quants) = match tensor.dtype() {
            GgmlDType::Q4_1 => {
                // d: f16, m: f16, then the 16 bytes of nibbles.
                let mut quants = Vec::with_capacity(rows * cols / 2);
                for block in data.chunks_exact(20).take(blocks) {
                    scales.push(half_at(block, 0));
                    offsets.push(half_at(block, 2));
                    quants.extend_from_slice(&block[4..20]);
                }
                (Packing::Nibbles, quants)
            }
            GgmlDType::Q8_0 => {
                // d: f16, then 32 signed bytes.
                let mut quants = Vec::with_capacity(rows * cols);
                for block in data.chunks_exact(34).take(blocks) {
                    scales.push(half_at(block, 0));
                    quants.extend_from_slice(&block[2..34]);
                }
                (Packing::Bytes, quants)
            }
            _ => return None,
        };
        (scales.len() == blocks).then_some(Self { rows, cols, packing, quants, scales, offsets })
    }

    pub fn shape(&self) -> [usize; 2] {
        [self.rows, self.cols]
    }

    /// The matrices' rows one after another, if they are packed alike and
    /// have as many columns.
    pub fn stack(parts: &[&BlockMatrix]) -> Option<Self> {
        let first = parts.first()?;
        if parts.iter().any(|part| part.cols != first.cols || part.packing != first.packing) {
            return None;
        }
        Some(Self {
            rows: parts.iter().map(|part| part.rows).sum(),
            cols: first.cols,
            packing: first.packing,
            quants: parts.iter().flat_map(|part| &part.quants).copied().collect(),
            scales: parts.iter().flat_map(|part| &part.scales).copied().collect(),
            offsets: parts.iter().flat_map(|part| &part.offsets).copied().collect(),
        })
    }

    /// One row, dequantized (an embedding look-up). Out-of-range rows are zeros.
    pub fn row(&self, row: usize) -> Vec<f32> {
        if row >= self.rows {
            return vec![0.0; self.cols];
        }
        let values = |row: WeightRow<'_>, block: usize| match self.packing {
            Packing::Nibbles => row.block::<true>(block),
            Packing::Bytes => row.block::<false>(block),
        };
        let weights = self.weight_row(row);
        (0..self.cols / BLOCK)
            .flat_map(|block| {
                let scale = weights.scales[block];
                let offset = weights.offsets.get(block).copied().unwrap_or(0.0);
                values(weights, block).map(move |q| f32::from(q) * scale + offset)
            })
            .collect()
    }

    /// Row `row`'s packed values, block scales and block offsets.
    #[inline(always)]
    fn weight_row(&self, row: usize) -> WeightRow<'_> {
        let blocks = self.cols / BLOCK;
        let bytes = blocks * self.packing_bytes();
        WeightRow {
            quants: &self.quants[row * bytes..][..bytes],
            scales: &self.scales[row * blocks..][..blocks],
            offsets: match self.packing {
                Packing::Nibbles => &self.offsets[row * blocks..][..blocks],
                Packing::Bytes => &[],
            },
        }
    }

    fn packing_bytes(&self) -> usize {
        match self.packing {
            Packing::Nibbles => block_bytes::<true>(),
            Packing::Bytes => block_bytes::<false>(),
        }
    }

    /// `x` (batch × cols) times this matrix transposed: (batch × rows).
    pub fn matmul(&self, x: &[f32], batch: usize) -> Vec<f32> {
        self.product(x, batch, Kernel::Widest)
    }

    /// [`Self::matmul`] with the kernel `kernel` names, where the machine has it.
    fn product(&self, x: &[f32], batch: usize, kernel: Kernel) -> Vec<f32> {
        assert_eq!(x.len(), batch * self.cols, "input is not batch × {}", self.cols);
        let block_sums = match self.packing {
            Packing::Nibbles => block_sums(x),
            // Q8_0 has no offset to multiply them with.
            Packing::Bytes => Vec::new(),
        };
        // Computed transposed (rows × batch) so each task owns whole weight
        // rows; with one activation row the two layouts are the same.
        let mut transposed = vec![0f32; self.rows * batch];
        // Four tasks per thread: enough to even out, few enough that starting
        // a task stays cheap next to its work (a multiple of 8 rows: whole passes).
        let rows_per_task =
            self.rows.div_ceil(rayon::current_num_threads() * 4).next_multiple_of(8);
        transposed.par_chunks_mut(rows_per_task * batch).enumerate().for_each(|(task, out)| {
            let rows = RowTask {
                matrix: self,
                x,
                block_sums: &block_sums,
                batch,
                first_row: task * rows_per_task,
                out,
            };
            #[cfg(target_arch = "x86_64")]
            if let Some(simd) = pulp::x86::V4::try_new().filter(|_| kernel == Kernel::Widest) {
                return simd.vectorize(Vectorized { kernel: avx512::Avx512(simd), task: rows });
            }
            #[cfg(target_arch = "x86_64")]
            if let Some(simd) = pulp::x86::V3::try_new().filter(|_| kernel != Kernel::Portable) {
                return simd.vectorize(Vectorized { kernel: avx2::Avx2(simd), task: rows });
            }
            rows.run(portable::Portable);
        });
        if batch == 1 {
            return transposed;
        }
        // Back to batch × rows, one output row a task: the reads stride
        // through `transposed`, which is small enough to stay in cache.
        let mut out = vec![0f32; batch * self.rows];
        out.par_chunks_mut(self.rows).enumerate().for_each(|(b, out)| {
            for (value, row) in out.iter_mut().zip(transposed.chunks_exact(batch)) {
                *value = row[b];
            }
        });
        out
    }
}

/// `Σ offset · Σ x` over a row's blocks, given its offsets and an activation
/// row's block sums: the offsets' share of a Q4_1 dot product, in a fixed
/// order (eight lanes, which vectorize).
#[inline(always)]
fn offsets_sum(offsets: &[f32], sums: &[f32]) -> f32 {
    let (offsets, offsets_tail) = offsets.as_chunks::<8>();
    let (sums, sums_tail) = sums.as_chunks::<8>();
    let mut lanes = [0f32; 8];
    for (offsets, sums) in offsets.iter().zip(sums) {
        for (lane, (offset, sum)) in lanes.iter_mut().zip(offsets.iter().zip(sums)) {
            *lane += offset * sum;
        }
    }
    let tail: f32 = offsets_tail.iter().zip(sums_tail).map(|(offset, sum)| offset * sum).sum();
    add_lanes(lanes) + tail
}

/// Each 32-value block's sum, for every block of every row of `x`, in a
/// fixed order (eight lanes, which vectorize).
fn block_sums(x: &[f32]) -> Vec<f32> {
    x.chunks_exact(BLOCK)
        .map(|block| {
            let mut lanes = [0f32; 8];
            for eight in block.chunks_exact(8) {
                for (lane, &value) in lanes.iter_mut().zip(eight) {
                    *lane += value;
                }
            }
            add_lanes(lanes)
        })
        .collect()
}

/// The widest kernel a product may use; each falls back to the next where the
/// CPU lacks it. Results differ between kernels by f32 rounding only (their
/// lanes add up in different orders), and one machine always uses the same.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kernel {
    /// AVX-512, else AVX2 + FMA, else plain Rust.
    Widest,
    /// AVX2 + FMA, else plain Rust (the tests' way to reach it on AVX-512 CPUs).
    #[cfg_attr(not(test), allow(dead_code))]
    Avx2,
    /// Plain Rust.
    #[cfg_attr(not(test), allow(dead_code))]
    Portable,
}

/// Consecutive weight rows against the whole batch, tile by tile.
struct RowTask<'a> {
    matrix: &'a BlockMatrix,
    x: &'a [f32],
    /// `x`'s block sums (Q4_1), or none (Q8_0).
    block_sums: &'a [f32],
    batch: usize,
    first_row: usize,
    out: &'a mut [f32],
}

/// One weight row: its packed values and its blocks' scales and offsets.
#[derive(Clone, Copy)]
struct WeightRow<'a> {
    quants: &'a [u8],
    scales: &'a [f32],
    /// Empty for Q8_0.
    offsets: &'a [f32],
}

impl<'a> WeightRow<'a> {
    /// Block `block`'s packed bytes.
    #[inline(always)]
    fn bytes<const NIBBLES: bool>(self, block: usize) -> &'a [u8] {
        &self.quants[block * block_bytes::<NIBBLES>()..][..block_bytes::<NIBBLES>()]
    }

    /// Block `block`'s values.
    #[inline(always)]
    fn block<const NIBBLES: bool>(self, block: usize) -> [i8; BLOCK] {
        unpack::<NIBBLES>(self.bytes::<NIBBLES>(block))
    }
}

/// A weight row's blocks and a tile's activations, each sliced to the row's
/// block count up front, so that a kernel's loop indexes them by block with
/// no bounds checks left in it.
struct Blocks<'a, const T: usize> {
    count: usize,
    /// The packed values in 16-byte pieces: one a block (Q4_1), two (Q8_0).
    sixteens: &'a [[u8; 16]],
    scales: &'a [f32],
    xs: [&'a [[f32; BLOCK]]; T],
}

impl<'a, const T: usize> Blocks<'a, T> {
    #[inline(always)]
    fn new<const NIBBLES: bool>(row: WeightRow<'a>, xs: [&'a [f32]; T]) -> Self {
        let count = row.scales.len();
        let pieces = count * block_bytes::<NIBBLES>() / 16;
        Self {
            count,
            sixteens: &row.quants.as_chunks::<16>().0[..pieces],
            scales: &row.scales[..count],
            xs: xs.map(|x| &x.as_chunks::<BLOCK>().0[..count]),
        }
    }
}

/// Dot products of one weight row with `T` activation rows, without the
/// blocks' offsets: `Σ scale · Σ q·x` over the row's blocks (the caller adds
/// `Σ offset · Σ x`).
///
/// Every (weight row, activation row) pair is computed in the same order
/// whatever `T` is, so a result does not depend on the tile it was computed
/// in — nor on what else is in the batch.
trait DotTiles: Copy {
    fn dot<const T: usize, const NIBBLES: bool>(
        self,
        row: WeightRow<'_>,
        xs: [&[f32]; T],
    ) -> [f32; T];

    /// Asks for `items` to be brought into cache ahead of their use (where
    /// the kernel can).
    fn prefetch<E>(self, _items: &[E]) {}
}

/// How many weight rows ahead of the one being multiplied a task asks for
/// its next rows' bytes. Reading the weights is what a decoded token waits
/// on, and the hardware prefetchers alone did not keep up on this project's
/// (virtual) machines: the loads of packed values stalled, and asking four
/// rows (1–3 KB) ahead took single-stream decode from 53 to 80–90 tok/s.
/// Two to eight rows measured alike; one, or sixteen, slower.
const PREFETCH_ROWS: usize = 4;

impl RowTask<'_> {
    /// The task's weight rows against the batch in tiles of 8, 4 or 1 batch
    /// rows: each weight block is widened once per tile, and one tile's
    /// activations stay in L1 while the task's rows pass over them. (Tiles
    /// that also span several weight rows measured slower.)
    #[inline(always)]
    fn run(self, kernel: impl DotTiles) {
        match self.matrix.packing {
            Packing::Nibbles => self.run_packed::<true>(kernel),
            Packing::Bytes => self.run_packed::<false>(kernel),
        }
    }

    #[inline(always)]
    fn run_packed<const NIBBLES: bool>(self, kernel: impl DotTiles) {
        let m = self.matrix;
        let x = |b: usize| &self.x[b * m.cols..][..m.cols];
        let blocks = if NIBBLES { m.cols / BLOCK } else { 0 };
        let sums = |b: usize| &self.block_sums[b * blocks..][..blocks];
        let rows = self.out.len() / self.batch;
        let mut start = 0;
        while start < self.batch {
            let tile = match self.batch - start {
                8.. => 8,
                4..=7 => 4,
                _ => 1,
            };
            for offset in 0..rows {
                if offset + PREFETCH_ROWS < rows {
                    let ahead = m.weight_row(self.first_row + offset + PREFETCH_ROWS);
                    kernel.prefetch(ahead.quants);
                    kernel.prefetch(ahead.scales);
                    kernel.prefetch(ahead.offsets);
                }
                let weights = m.weight_row(self.first_row + offset);
                let out = &mut self.out[offset * self.batch + start..][..tile];
                let xs = |t: usize| x(start + t);
                match tile {
                    8 => out.copy_from_slice(
                        &kernel.dot::<8, NIBBLES>(weights, std::array::from_fn(xs)),
                    ),
                    4 => out.copy_from_slice(
                        &kernel.dot::<4, NIBBLES>(weights, std::array::from_fn(xs)),
                    ),
                    _ => out.copy_from_slice(&kernel.dot::<1, NIBBLES>(weights, [xs(0)])),
                }
                if NIBBLES {
                    for (t, value) in out.iter_mut().enumerate() {
                        *value += offsets_sum(weights.offsets, sums(start + t));
                    }
                }
            }
            start += tile;
        }
    }
}

/// Plain Rust, for machines without AVX2.
mod portable {
    use super::{BLOCK, DotTiles, WeightRow};

    #[derive(Clone, Copy)]
    pub struct Portable;

    impl DotTiles for Portable {
        fn dot<const T: usize, const NIBBLES: bool>(
            self,
            row: WeightRow<'_>,
            xs: [&[f32]; T],
        ) -> [f32; T] {
            std::array::from_fn(|t| {
                let mut scaled = 0f32;
                for (block, &scale) in row.scales.iter().enumerate() {
                    let x = &xs[t][block * BLOCK..][..BLOCK];
                    let values = row.block::<NIBBLES>(block);
                    let products: f32 = values.iter().zip(x).map(|(&q, &x)| f32::from(q) * x).sum();
                    scaled += scale * products;
                }
                scaled
            })
        }
    }
}

/// A SIMD kernel over a task's rows, run by pulp with its target features on.
#[cfg(target_arch = "x86_64")]
struct Vectorized<'a, K> {
    kernel: K,
    task: RowTask<'a>,
}

#[cfg(target_arch = "x86_64")]
impl<K: DotTiles> pulp::NullaryFnOnce for Vectorized<'_, K> {
    type Output = ();

    #[inline(always)]
    fn call(self) {
        self.task.run(self.kernel);
    }
}

/// Every cache line of `items`, asked for ahead of its use (into L1). A
/// prefetch never faults, whatever the address.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn prefetch_lines<E>(sse: pulp::core_arch::x86::Sse, items: &[E]) {
    let start = items.as_ptr().cast::<i8>();
    for at in (0..size_of_val(items)).step_by(64) {
        sse._mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>(start.wrapping_add(at));
    }
}

/// AVX2 + FMA through pulp's safe intrinsics: each block's values are
/// unpacked to 32 bytes, widened to four vectors of eight f32 once per tile,
/// multiplied with each activation row's block into a partial sum of its own,
/// and the partial sums scaled into the tile's running sums.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use core::arch::x86_64::__m128i;

    use pulp::x86::V3;

    use super::{Blocks, DotTiles, WeightRow, prefetch_lines};
    use crate::lanes::{load8, sum8};

    #[derive(Clone, Copy)]
    pub struct Avx2(pub V3);

    impl DotTiles for Avx2 {
        #[inline(always)]
        fn dot<const T: usize, const NIBBLES: bool>(
            self,
            row: WeightRow<'_>,
            xs: [&[f32]; T],
        ) -> [f32; T] {
            let (avx, avx2, fma, sse2) = (self.0.avx, self.0.avx2, self.0.fma, self.0.sse2);
            let blocks = Blocks::new::<NIBBLES>(row, xs);
            let mut scaled = [avx._mm256_setzero_ps(); T];
            for block in 0..blocks.count {
                // Values 0..16, then 16..32, a byte each.
                let (low, high) = if NIBBLES {
                    let (packed, mask): (__m128i, _) =
                        (pulp::cast(blocks.sixteens[block]), sse2._mm_set1_epi8(0x0F));
                    let shifted = sse2._mm_srli_epi16::<4>(packed);
                    (sse2._mm_and_si128(packed, mask), sse2._mm_and_si128(shifted, mask))
                } else {
                    let half = |i: usize| -> __m128i { pulp::cast(blocks.sixteens[i]) };
                    (half(2 * block), half(2 * block + 1))
                };
                let widen =
                    |bytes: __m128i| avx._mm256_cvtepi32_ps(avx2._mm256_cvtepi8_epi32(bytes));
                let w0 = widen(low);
                let w1 = widen(sse2._mm_unpackhi_epi64(low, low));
                let w2 = widen(high);
                let w3 = widen(sse2._mm_unpackhi_epi64(high, high));
                let scale = avx._mm256_set1_ps(blocks.scales[block]);
                for (scaled, x) in scaled.iter_mut().zip(&blocks.xs) {
                    let x = &x[block];
                    let mut products = avx._mm256_mul_ps(w0, load8(&x[0..8]));
                    products = fma._mm256_fmadd_ps(w1, load8(&x[8..16]), products);
                    products = fma._mm256_fmadd_ps(w2, load8(&x[16..24]), products);
                    products = fma._mm256_fmadd_ps(w3, load8(&x[24..32]), products);
                    *scaled = fma._mm256_fmadd_ps(products, scale, *scaled);
                }
            }
            std::array::from_fn(|t| sum8(scaled[t]))
        }

        #[inline(always)]
        fn prefetch<E>(self, items: &[E]) {
            prefetch_lines(self.0.sse, items);
        }
    }
}

/// For CPUs with AVX-512: each block's values widened to two vectors of
/// sixteen f32 (AVX2 takes four of eight) and scaled once per tile, then
/// two FMAs a block for each activation row, into two sums.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use pulp::x86::V4;

    use super::{Blocks, DotTiles, WeightRow, prefetch_lines};
    use crate::lanes::{load16, sum16};

    #[derive(Clone, Copy)]
    pub struct Avx512(pub V4);

    impl DotTiles for Avx512 {
        #[inline(always)]
        fn dot<const T: usize, const NIBBLES: bool>(
            self,
            row: WeightRow<'_>,
            xs: [&[f32]; T],
        ) -> [f32; T] {
            let f = self.0.avx512f;
            let blocks = Blocks::new::<NIBBLES>(row, xs);
            let (mut low, mut high) = ([f._mm512_setzero_ps(); T], [f._mm512_setzero_ps(); T]);
            for block in 0..blocks.count {
                // Widened straight from memory to sixteen 32-bit lanes: Q4_1's
                // low nibbles are values 0..16 and its high ones 16..32; Q8_0's
                // two 16-byte halves are its values in order.
                let (w0, w1) = if NIBBLES {
                    let bytes = f._mm512_cvtepu8_epi32(pulp::cast(blocks.sixteens[block]));
                    (
                        f._mm512_and_si512(bytes, f._mm512_set1_epi32(0x0F)),
                        f._mm512_srli_epi32::<4>(bytes),
                    )
                } else {
                    (
                        f._mm512_cvtepi8_epi32(pulp::cast(blocks.sixteens[2 * block])),
                        f._mm512_cvtepi8_epi32(pulp::cast(blocks.sixteens[2 * block + 1])),
                    )
                };
                let scale = f._mm512_set1_ps(blocks.scales[block]);
                let w0 = f._mm512_mul_ps(f._mm512_cvtepi32_ps(w0), scale);
                let w1 = f._mm512_mul_ps(f._mm512_cvtepi32_ps(w1), scale);
                for ((low, high), x) in low.iter_mut().zip(&mut high).zip(&blocks.xs) {
                    let x = &x[block];
                    *low = f._mm512_fmadd_ps(w0, load16(&x[..16]), *low);
                    *high = f._mm512_fmadd_ps(w1, load16(&x[16..]), *high);
                }
            }
            std::array::from_fn(|t| sum16(f._mm512_add_ps(low[t], high[t])))
        }

        #[inline(always)]
        fn prefetch<E>(self, items: &[E]) {
            prefetch_lines(self.0.sse, items);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    fn check(dtype: GgmlDType) {
        let (rows, cols) = (40, 96);
        let mut rng = fastrand::Rng::with_seed(3);
        let weights: Vec<f32> = (0..rows * cols).map(|_| rng.f32() * 2.0 - 1.0).collect();
        let weights = Tensor::from_vec(weights, (rows, cols), &Device::Cpu).unwrap();
        let quantized = QTensor::quantize(&weights, dtype).unwrap();
        let dense = quantized.dequantize(&Device::Cpu).unwrap();
        let matrix = BlockMatrix::from_qtensor(&quantized).unwrap();
        let dense_rows = dense.to_vec2::<f32>().unwrap();
        for (r, expected) in dense_rows.iter().enumerate() {
            assert_eq!(&matrix.row(r), expected, "{dtype:?}: row {r} dequantized as candle does");
        }
        for batch in [1, 3, 4, 7, 8, 9, 13, 16] {
            let x: Vec<f32> = (0..batch * cols).map(|_| rng.f32() - 0.5).collect();
            let xt = Tensor::from_vec(x.clone(), (batch, cols), &Device::Cpu).unwrap();
            let expected = xt
                .matmul(&dense.t().unwrap())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let got = matrix.matmul(&x, batch);
            for kernel in [Kernel::Widest, Kernel::Avx2, Kernel::Portable] {
                let product = matrix.product(&x, batch, kernel);
                for (p, e) in product.iter().zip(&expected) {
                    assert!(
                        (p - e).abs() < 1e-4,
                        "{dtype:?} batch {batch}, {kernel:?}: {p} vs {e}"
                    );
                }
            }
            // Batch-invariant: each row alone gives the same bits.
            for b in 0..batch {
                let alone = matrix.matmul(&x[b * cols..][..cols], 1);
                assert_eq!(alone, got[b * rows..][..rows], "{dtype:?} row {b} of {batch}");
            }
        }
    }

    #[test]
    fn q4_1_matches_the_dequantized_weights() {
        check(GgmlDType::Q4_1);
    }

    #[test]
    fn q8_0_matches_the_dequantized_weights() {
        check(GgmlDType::Q8_0);
    }
}

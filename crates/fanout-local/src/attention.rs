//! Causal attention of one token against its sequence's cached keys and values,
//! read block by block from the paged cache (see `kv`).
//!
//! Written once over a small set of vector kernels (dot product, scaled add),
//! which have AVX-512 and AVX2 + FMA versions (pulp's safe intrinsics, the
//! widest the CPU has, chosen at run time) and a plain one.

/// Attention shape: `heads` query heads share `kv_heads` key/value heads.
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

/// A sequence's cached positions for one layer: blocks of `block_tokens`
/// positions, each block its keys then its values (position-major, kv_heads ×
/// head_dim each); the first `seen` positions are read.
#[derive(Clone, Copy)]
pub struct Cached<'a> {
    pub blocks: &'a [&'a [f32]],
    pub block_tokens: usize,
    pub seen: usize,
}

impl<'a> Cached<'a> {
    /// Each block with the positions of it that are read: (keys, values, count).
    fn blocks(self, kv_width: usize) -> impl Iterator<Item = (&'a [f32], &'a [f32], usize)> + 'a {
        let half = self.block_tokens * kv_width;
        self.blocks.iter().enumerate().map_while(move |(b, block)| {
            let start = b * self.block_tokens;
            (start < self.seen).then(|| {
                let (keys, values) = block.split_at(half);
                (keys, values, (self.seen - start).min(self.block_tokens))
            })
        })
    }
}

/// `out` (heads × head_dim) for query `q` against the cached positions.
pub fn attend(shape: Shape, q: &[f32], cached: Cached<'_>, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if let Some(simd) = pulp::x86::V4::try_new() {
        let kernels = avx512::Avx512(simd);
        return simd.vectorize(Vectorized { kernels, shape, q, cached, out });
    }
    #[cfg(target_arch = "x86_64")]
    if let Some(simd) = pulp::x86::V3::try_new() {
        let kernels = avx2::Avx2(simd);
        return simd.vectorize(Vectorized { kernels, shape, q, cached, out });
    }
    attend_with(Portable, shape, q, cached, out);
}

/// [`attend_with`] a SIMD kernel, run by pulp with its target features on.
struct Vectorized<'a, K> {
    kernels: K,
    shape: Shape,
    q: &'a [f32],
    cached: Cached<'a>,
    out: &'a mut [f32],
}

impl<K: Kernels> pulp::NullaryFnOnce for Vectorized<'_, K> {
    type Output = ();

    #[inline(always)]
    fn call(self) {
        attend_with(self.kernels, self.shape, self.q, self.cached, self.out);
    }
}

trait Kernels: Copy {
    fn dot(self, a: &[f32], b: &[f32]) -> f32;
    /// `out += weight · v`
    fn scaled_add(self, out: &mut [f32], weight: f32, v: &[f32]);
}

#[inline(always)]
fn attend_with<K: Kernels>(
    kernels: K,
    shape: Shape,
    q: &[f32],
    cached: Cached<'_>,
    out: &mut [f32],
) {
    let d = shape.head_dim;
    let group = shape.heads / shape.kv_heads;
    let kv_width = shape.kv_heads * d;
    let scale = 1.0 / (d as f32).sqrt();
    let seen = cached.seen;
    // The query heads that share a key/value head go together: each cached
    // key and value is read once per group, not once per head.
    let mut scores = vec![0f32; group * seen];
    out.fill(0.0);
    for kv_head in 0..shape.kv_heads {
        let kv_offset = kv_head * d;
        let heads = kv_head * group..(kv_head + 1) * group;
        // Positions in order, block after block: the same sums in the same
        // order as one contiguous cache, whichever blocks are shared.
        let mut t = 0;
        for (keys, _, count) in cached.blocks(kv_width) {
            for i in 0..count {
                let key = &keys[i * kv_width + kv_offset..][..d];
                for (g, head) in heads.clone().enumerate() {
                    scores[g * seen + t] = kernels.dot(&q[head * d..][..d], key) * scale;
                }
                t += 1;
            }
        }
        for scores in scores.chunks_exact_mut(seen) {
            let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut total = 0.0;
            for score in scores.iter_mut() {
                *score = (*score - max).exp();
                total += *score;
            }
            for score in scores.iter_mut() {
                *score /= total;
            }
        }
        let out = &mut out[heads.start * d..heads.end * d];
        let mut t = 0;
        for (_, values, count) in cached.blocks(kv_width) {
            for i in 0..count {
                let value = &values[i * kv_width + kv_offset..][..d];
                for (g, out) in out.chunks_exact_mut(d).enumerate() {
                    kernels.scaled_add(out, scores[g * seen + t], value);
                }
                t += 1;
            }
        }
    }
}

#[derive(Clone, Copy)]
struct Portable;

impl Kernels for Portable {
    fn dot(self, a: &[f32], b: &[f32]) -> f32 {
        a.iter().zip(b).map(|(x, y)| x * y).sum()
    }

    fn scaled_add(self, out: &mut [f32], weight: f32, v: &[f32]) {
        for (o, &v) in out.iter_mut().zip(v) {
            *o += weight * v;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use pulp::x86::V3;

    use super::Kernels;
    use crate::lanes::{load8, sum8};

    #[derive(Clone, Copy)]
    pub struct Avx2(pub V3);

    impl Kernels for Avx2 {
        #[inline(always)]
        fn dot(self, a: &[f32], b: &[f32]) -> f32 {
            let (avx, fma) = (self.0.avx, self.0.fma);
            let (mut even, mut odd) = (avx._mm256_setzero_ps(), avx._mm256_setzero_ps());
            let (a8, b8) = (a.chunks_exact(16), b.chunks_exact(16));
            let tail: f32 = a8.remainder().iter().zip(b8.remainder()).map(|(x, y)| x * y).sum();
            for (a, b) in a8.zip(b8) {
                even = fma._mm256_fmadd_ps(load8(&a[..8]), load8(&b[..8]), even);
                odd = fma._mm256_fmadd_ps(load8(&a[8..]), load8(&b[8..]), odd);
            }
            sum8(avx._mm256_add_ps(even, odd)) + tail
        }

        #[inline(always)]
        fn scaled_add(self, out: &mut [f32], weight: f32, v: &[f32]) {
            let (avx, fma) = (self.0.avx, self.0.fma);
            let w = avx._mm256_set1_ps(weight);
            let mut outs = out.chunks_exact_mut(8);
            let mut vs = v.chunks_exact(8);
            for (o, v) in (&mut outs).zip(&mut vs) {
                let o: &mut [f32; 8] = o.try_into().expect("eight floats");
                *o = pulp::cast(fma._mm256_fmadd_ps(w, load8(v), pulp::cast(*o)));
            }
            for (o, &v) in outs.into_remainder().iter_mut().zip(vs.remainder()) {
                *o += weight * v;
            }
        }
    }
}

/// The AVX2 kernels sixteen lanes wide: a 64-value head is four vectors.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use pulp::x86::V4;

    use super::Kernels;
    use crate::lanes::{load16, sum16};

    #[derive(Clone, Copy)]
    pub struct Avx512(pub V4);

    impl Kernels for Avx512 {
        #[inline(always)]
        fn dot(self, a: &[f32], b: &[f32]) -> f32 {
            let f = self.0.avx512f;
            let (mut even, mut odd) = (f._mm512_setzero_ps(), f._mm512_setzero_ps());
            let (a32, b32) = (a.chunks_exact(32), b.chunks_exact(32));
            let tail: f32 = a32.remainder().iter().zip(b32.remainder()).map(|(x, y)| x * y).sum();
            for (a, b) in a32.zip(b32) {
                even = f._mm512_fmadd_ps(load16(&a[..16]), load16(&b[..16]), even);
                odd = f._mm512_fmadd_ps(load16(&a[16..]), load16(&b[16..]), odd);
            }
            sum16(f._mm512_add_ps(even, odd)) + tail
        }

        #[inline(always)]
        fn scaled_add(self, out: &mut [f32], weight: f32, v: &[f32]) {
            let f = self.0.avx512f;
            let w = f._mm512_set1_ps(weight);
            let mut outs = out.chunks_exact_mut(16);
            let mut vs = v.chunks_exact(16);
            for (o, v) in (&mut outs).zip(&mut vs) {
                let o: &mut [f32; 16] = o.try_into().expect("sixteen floats");
                *o = pulp::cast(f._mm512_fmadd_ps(w, load16(v), pulp::cast(*o)));
            }
            for (o, &v) in outs.into_remainder().iter_mut().zip(vs.remainder()) {
                *o += weight * v;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every vector kernel this CPU has, each beside the plain one. A head
    /// of 40 values is one 32-value step of the AVX-512 dot product (two of
    /// AVX2's 16) and a tail.
    #[test]
    fn vector_kernels_agree_with_the_plain_ones() {
        let (d, kv_heads) = (40, 2);
        let shape = Shape { heads: 4, kv_heads, head_dim: d };
        let (width, kv_width) = (4 * d, kv_heads * d);
        let mut rng = fastrand::Rng::with_seed(5);
        let mut random = |n: usize| (0..n).map(|_| rng.f32() - 0.5).collect::<Vec<f32>>();
        // Seven positions in blocks of three: keys then values in each block.
        let (seen, block_tokens) = (7, 3);
        let q = random(width);
        let q = q.as_slice();
        let blocks: Vec<Vec<f32>> = (0..3).map(|_| random(2 * block_tokens * kv_width)).collect();
        let views: Vec<&[f32]> = blocks.iter().map(Vec::as_slice).collect();
        let cached = |seen| Cached { blocks: &views, block_tokens, seen };
        let mut plain = vec![1.0; width];
        attend_with(Portable, shape, q, cached(seen), &mut plain);
        type Attend<'a> = Box<dyn Fn(Cached<'_>, &mut [f32]) + 'a>;
        let mut kernels: Vec<(&str, Attend<'_>)> =
            vec![("widest", Box::new(|cached, out| attend(shape, q, cached, out)))];
        #[cfg(target_arch = "x86_64")]
        if let Some(simd) = pulp::x86::V3::try_new() {
            kernels.push((
                "avx2",
                Box::new(move |cached, out| {
                    let kernels = avx2::Avx2(simd);
                    simd.vectorize(Vectorized { kernels, shape, q, cached, out })
                }),
            ));
        }
        #[cfg(target_arch = "x86_64")]
        if let Some(simd) = pulp::x86::V4::try_new() {
            kernels.push((
                "avx512",
                Box::new(move |cached, out| {
                    let kernels = avx512::Avx512(simd);
                    simd.vectorize(Vectorized { kernels, shape, q, cached, out })
                }),
            ));
        }
        for (name, attend) in &kernels {
            let mut fast = vec![1.0; width];
            attend(cached(seen), &mut fast);
            for (f, p) in fast.iter().zip(&plain) {
                assert!((f - p).abs() < 1e-5, "{name}: {f} vs {p}");
            }
            // One position: the output is exactly that position's values
            // (query heads 0 and 3 read key/value heads 0 and 1).
            attend(cached(1), &mut fast);
            let values = &blocks[0][block_tokens * kv_width..];
            assert_eq!(fast[..d], values[..d], "{name}");
            assert_eq!(fast[3 * d..], values[d..2 * d], "{name}");
        }
    }
}

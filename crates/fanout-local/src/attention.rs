//! Causal attention of one token against its sequence's cached keys and values,
//! read block by block from the paged cache (see `kv`).
//!
//! Written once over two vector kernels (dot product, scaled add), which are
//! generic over pulp's SIMD types and run as wide as the CPU goes (AVX-512,
//! AVX2 + FMA, NEON, …, chosen at run time). A plain version stands beside
//! them for the tests.

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
    pulp::Arch::new().dispatch(Attend { shape, q, cached, out });
}

/// [`attend_with`] on the widest SIMD level the CPU has, run by pulp with
/// that level's target features on.
struct Attend<'a> {
    shape: Shape,
    q: &'a [f32],
    cached: Cached<'a>,
    out: &'a mut [f32],
}

impl pulp::WithSimd for Attend<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, simd: S) {
        attend_with(Vector(simd), self.shape, self.q, self.cached, self.out);
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

/// Plain Rust, the tests' reference.
#[cfg(test)]
#[derive(Clone, Copy)]
struct Portable;

#[cfg(test)]
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

/// The kernels on one of pulp's SIMD levels: a 64-value head is four
/// vectors with AVX-512, eight with AVX2.
#[derive(Clone, Copy)]
struct Vector<S>(S);

impl<S: pulp::Simd> Kernels for Vector<S> {
    #[inline(always)]
    fn dot(self, a: &[f32], b: &[f32]) -> f32 {
        let simd = self.0;
        let ((a, a_tail), (b, b_tail)) = (S::as_simd_f32s(a), S::as_simd_f32s(b));
        let tail: f32 = a_tail.iter().zip(b_tail).map(|(x, y)| x * y).sum();
        // Even and odd vectors into two sums: two chains of FMAs overlap.
        let ((a, a_odd), (b, b_odd)) = (a.as_chunks::<2>(), b.as_chunks::<2>());
        let (mut even, mut odd) = (simd.splat_f32s(0.0), simd.splat_f32s(0.0));
        for ([a0, a1], [b0, b1]) in a.iter().zip(b) {
            even = simd.mul_add_f32s(*a0, *b0, even);
            odd = simd.mul_add_f32s(*a1, *b1, odd);
        }
        if let ([a], [b]) = (a_odd, b_odd) {
            even = simd.mul_add_f32s(*a, *b, even);
        }
        simd.reduce_sum_f32s(simd.add_f32s(even, odd)) + tail
    }

    #[inline(always)]
    fn scaled_add(self, out: &mut [f32], weight: f32, v: &[f32]) {
        let simd = self.0;
        let w = simd.splat_f32s(weight);
        let ((outs, outs_tail), (vs, vs_tail)) = (S::as_mut_simd_f32s(out), S::as_simd_f32s(v));
        for (o, &v) in outs.iter_mut().zip(vs) {
            *o = simd.mul_add_f32s(w, v, *o);
        }
        for (o, &v) in outs_tail.iter_mut().zip(vs_tail) {
            *o += weight * v;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pulp::Simd;

    /// The kernels on the widest SIMD level the CPU has, on AVX2 where it
    /// has that, and on pulp's scalar level, each beside the plain ones. A
    /// head of 40 values is two AVX-512 vectors and a tail, or five of AVX2.
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
        type Run<'a> = Box<dyn Fn(Cached<'_>, &mut [f32]) + 'a>;
        let mut kernels: Vec<(&str, Run<'_>)> = vec![
            ("widest", Box::new(|cached, out| attend(shape, q, cached, out))),
            (
                "scalar",
                Box::new(|cached, out| {
                    Simd::vectorize(pulp::Scalar, Attend { shape, q, cached, out })
                }),
            ),
        ];
        #[cfg(target_arch = "x86_64")]
        if let Some(simd) = pulp::x86::V3::try_new() {
            kernels.push((
                "avx2",
                Box::new(move |cached, out| {
                    Simd::vectorize(simd, Attend { shape, q, cached, out })
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

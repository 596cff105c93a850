//! The steps the vector kernels share: loading eight or sixteen floats, and
//! adding up their lanes in one fixed order (so results are reproducible),
//! which the plain-Rust sums that stand beside the kernels use too.

#[cfg(target_arch = "x86_64")]
use core::arch::x86_64::{__m256, __m512};

#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub fn load8(x: &[f32]) -> __m256 {
    pulp::cast(*<&[f32; 8]>::try_from(x).expect("eight floats"))
}

#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub fn sum8(vector: __m256) -> f32 {
    add_lanes(pulp::cast(vector))
}

#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub fn load16(x: &[f32]) -> __m512 {
    pulp::cast(*<&[f32; 16]>::try_from(x).expect("sixteen floats"))
}

/// Sixteen lanes' sum: pairs eight apart, then as [`add_lanes`].
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub fn sum16(vector: __m512) -> f32 {
    let lanes: [f32; 16] = pulp::cast(vector);
    add_lanes(std::array::from_fn(|i| lanes[i] + lanes[i + 8]))
}

/// Eight lanes' sum: pairs four apart, then pairs of pairs.
#[inline(always)]
pub fn add_lanes(lanes: [f32; 8]) -> f32 {
    ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5]))
        + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]))
}

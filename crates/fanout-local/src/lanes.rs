//! The steps the vector kernels share: loading eight floats, and adding up
//! eight lanes in one fixed order (so results are reproducible), which the
//! plain-Rust sums that stand beside the kernels use too.

#[cfg(target_arch = "x86_64")]
use core::arch::x86_64::__m256;

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

/// Eight lanes' sum: pairs four apart, then pairs of pairs.
#[inline(always)]
pub fn add_lanes(lanes: [f32; 8]) -> f32 {
    ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5]))
        + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]))
}

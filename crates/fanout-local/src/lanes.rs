//! The two AVX2 steps both kernels share: loading eight floats and adding up
//! a vector's lanes in a fixed order (so results are reproducible).

use core::arch::x86_64::__m256;

#[inline(always)]
pub fn load8(x: &[f32]) -> __m256 {
    pulp::cast(*<&[f32; 8]>::try_from(x).expect("eight floats"))
}

#[inline(always)]
pub fn sum8(vector: __m256) -> f32 {
    let lanes: [f32; 8] = pulp::cast(vector);
    ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5]))
        + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]))
}

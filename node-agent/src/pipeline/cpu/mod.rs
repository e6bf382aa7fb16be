//! Kernels for the CPU (f32) that replace candle's own where they are much
//! slower: convolution ([`conv`]), fused attention ([`attention`]), and group
//! norm with its SiLU and GEGLU ([`ops`]). Each is checked against candle's
//! result in its tests; the networks in [`super::nets`] call them when a
//! tensor is f32 on the CPU and fall back to candle's ops everywhere else.

pub mod attention;
pub mod conv;
pub mod ops;

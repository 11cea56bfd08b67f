//! Memory of the tiers: host slabs (the `cpu` device tier and the host tier), the CUDA
//! device tier, and the disk tier's block file.

pub mod cuda;
pub mod disk;
pub mod host;

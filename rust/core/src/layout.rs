//! Byte geometry of a tier's KV memory.
//!
//! Two layouts share one addressing function:
//! - `block_major`: `[num_blocks][num_layers][2][block_size][heads][head_dim]`. A block is one
//!   contiguous run of `bytes_per_block` bytes, so a swap, offload or disk write is one copy.
//! - `layer_major`: `[num_layers][num_blocks][2][block_size][heads][head_dim]`. A block is
//!   `num_layers` runs of `bytes_per_block / num_layers` bytes.
//!
//! In both, the K (or V) vectors of consecutive token slots of one block and layer are
//! contiguous (`token_bytes` apart), which is what `write_kv` / `read_kv` rely on.
//!
//! Arithmetic: every size and offset here is at most `total_bytes`, which `KvLayout::new`
//! requires to be at most `MAX_TIER_BYTES` (`CacheConfig::validate` checks it for each tier
//! with checked arithmetic), so the plain `*` / `+` below cannot overflow.

use crate::config::{CacheConfig, LayoutKind, MAX_TIER_BYTES};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvLayout {
    pub kind: LayoutKind,
    pub num_blocks: usize,
    pub num_layers: usize,
    pub block_size: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub itemsize: usize,
}

/// A zero-copy view of one layer: `[num_blocks, 2, block_size, heads, head_dim]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerView {
    /// Byte offset of element `[0, 0, 0, 0, 0]` from the start of the slab.
    pub byte_offset: usize,
    pub shape: [i64; 5],
    /// Strides in elements.
    pub strides: [i64; 5],
}

impl LayerView {
    /// One past the last byte the view reaches (`byte_offset`, plus `(shape - 1) x stride`
    /// elements per dimension, plus one element), or `byte_offset` for an empty view; None
    /// if that overflows or a stride is negative. A consumer of the view touches only bytes
    /// in `byte_offset..end_byte`.
    pub fn end_byte(&self, itemsize: usize) -> Option<usize> {
        if self.shape.contains(&0) {
            return Some(self.byte_offset);
        }
        let last = self
            .shape
            .iter()
            .zip(&self.strides)
            .try_fold(0u64, |acc, (&n, &s)| {
                let (n, s) = (u64::try_from(n - 1).ok()?, u64::try_from(s).ok()?);
                acc.checked_add(n.checked_mul(s)?)
            })?;
        let bytes = usize::try_from(last.checked_add(1)?)
            .ok()?
            .checked_mul(itemsize)?;
        self.byte_offset.checked_add(bytes)
    }
}

impl KvLayout {
    /// The layout of a tier of `num_blocks` blocks of `c`. Panics if the tier is larger than
    /// `MAX_TIER_BYTES`, which a validated config rules out for each of its tiers.
    pub fn new(c: &CacheConfig, num_blocks: usize) -> Self {
        assert!(
            num_blocks
                .checked_mul(c.bytes_per_block())
                .is_some_and(|t| t <= MAX_TIER_BYTES),
            "a tier of {num_blocks} blocks of {} bytes is larger than MAX_TIER_BYTES",
            c.bytes_per_block()
        );
        KvLayout {
            kind: c.layout,
            num_blocks,
            num_layers: c.num_layers,
            block_size: c.block_size,
            num_kv_heads: c.num_kv_heads,
            head_dim: c.head_dim,
            itemsize: c.dtype.itemsize(),
        }
    }

    /// Bytes of one token's K (or V) for one layer: heads x head_dim x itemsize.
    #[inline]
    pub fn token_bytes(&self) -> usize {
        self.num_kv_heads * self.head_dim * self.itemsize
    }

    /// Bytes of one block in one layer (K and V).
    #[inline]
    pub fn layer_block_bytes(&self) -> usize {
        2 * self.block_size * self.token_bytes()
    }

    #[inline]
    pub fn bytes_per_block(&self) -> usize {
        self.num_layers * self.layer_block_bytes()
    }

    pub fn total_bytes(&self) -> usize {
        self.num_blocks * self.bytes_per_block()
    }

    /// Byte offset of token slot `slot` of K (`kv = 0`) or V (`kv = 1`) of `layer` in `block`.
    #[inline]
    pub fn offset(&self, block: usize, layer: usize, kv: usize, slot: usize) -> usize {
        debug_assert!(block < self.num_blocks && layer < self.num_layers && kv < 2);
        debug_assert!(slot < self.block_size);
        let within = (kv * self.block_size + slot) * self.token_bytes();
        match self.kind {
            LayoutKind::BlockMajor => {
                block * self.bytes_per_block() + layer * self.layer_block_bytes() + within
            }
            LayoutKind::LayerMajor => {
                (layer * self.num_blocks + block) * self.layer_block_bytes() + within
            }
        }
    }

    /// The contiguous byte runs `(offset, len)` that make up `block`, in a fixed order shared
    /// by every tier, so a block copies run by run between tiers of any layout.
    pub fn block_runs(&self, block: usize) -> impl Iterator<Item = (usize, usize)> + '_ {
        let (n, len) = match self.kind {
            LayoutKind::BlockMajor => (1, self.bytes_per_block()),
            LayoutKind::LayerMajor => (self.num_layers, self.layer_block_bytes()),
        };
        (0..n).map(move |i| match self.kind {
            LayoutKind::BlockMajor => (block * len, len),
            LayoutKind::LayerMajor => ((i * self.num_blocks + block) * len, len),
        })
    }

    pub fn layer_view(&self, layer: usize) -> LayerView {
        let e = |bytes: usize| (bytes / self.itemsize) as i64;
        let (block_stride, base) = match self.kind {
            LayoutKind::BlockMajor => (self.bytes_per_block(), layer * self.layer_block_bytes()),
            LayoutKind::LayerMajor => (
                self.layer_block_bytes(),
                layer * self.num_blocks * self.layer_block_bytes(),
            ),
        };
        LayerView {
            byte_offset: base,
            shape: [
                self.num_blocks as i64,
                2,
                self.block_size as i64,
                self.num_kv_heads as i64,
                self.head_dim as i64,
            ],
            strides: [
                e(block_stride),
                e(self.block_size * self.token_bytes()),
                e(self.token_bytes()),
                self.head_dim as i64,
                1,
            ],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ConfigInput;

    fn layout(kind: &str) -> KvLayout {
        let mut c = ConfigInput::small(3);
        c.layout = kind.into();
        KvLayout::new(&CacheConfig::validate(&c).unwrap(), 3)
    }

    #[test]
    fn runs_cover_every_byte_once() {
        for kind in ["block_major", "layer_major"] {
            let l = layout(kind);
            let mut seen = vec![0u8; l.total_bytes()];
            for b in 0..l.num_blocks {
                for (off, len) in l.block_runs(b) {
                    seen[off..off + len].iter_mut().for_each(|x| *x += 1);
                }
            }
            assert!(seen.iter().all(|&x| x == 1), "{kind}");
        }
    }

    #[test]
    fn views_end_inside_the_tier() {
        for kind in ["block_major", "layer_major"] {
            let l = layout(kind);
            let ends: Vec<_> = (0..l.num_layers)
                .map(|layer| l.layer_view(layer).end_byte(l.itemsize).unwrap())
                .collect();
            // The last token slot of V of the last block of a layer ends the view.
            for (layer, &end) in ends.iter().enumerate() {
                let last = l.offset(l.num_blocks - 1, layer, 1, l.block_size - 1);
                assert_eq!(end, last + l.token_bytes(), "{kind}");
            }
            assert_eq!(*ends.last().unwrap(), l.total_bytes(), "{kind}");
        }
        let mut v = layout("block_major").layer_view(0);
        v.strides[0] = -1;
        assert_eq!(v.end_byte(2), None, "a negative stride is refused");
        v.strides[0] = i64::MAX;
        assert_eq!(v.end_byte(2), None, "an overflow is refused");
        v.shape[2] = 0;
        assert_eq!(
            v.end_byte(2),
            Some(v.byte_offset),
            "an empty view reaches nothing"
        );
    }

    #[test]
    fn view_strides_match_offsets() {
        for kind in ["block_major", "layer_major"] {
            let l = layout(kind);
            for layer in 0..l.num_layers {
                let v = l.layer_view(layer);
                for (b, kv, s) in [(0, 0, 0), (2, 1, 3), (1, 0, 2)] {
                    let elems = b as i64 * v.strides[0]
                        + kv as i64 * v.strides[1]
                        + s as i64 * v.strides[2];
                    let want = l.offset(b, layer, kv, s);
                    assert_eq!(v.byte_offset + elems as usize * l.itemsize, want, "{kind}");
                }
            }
        }
    }
}

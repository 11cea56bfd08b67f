//! K/V data access: block tables, batch layouts, `write_kv` / `read_kv` byte copies and the layer views
//! DLPack exports.
//!
//! `write_kv` first unshares the blocks it writes (copy-on-write, recorded as effects and run
//! before the write); both copy under the lock, so a read never sees a half-moved block.

use crate::error::{Error, Result};
use crate::layout::LayerView;
use crate::state::{BatchLayout, NewTokens, State};
use crate::storage::Memory;
use crate::types::RequestId;

use super::EngineCore;

impl EngineCore {
    /// Row-major `[rids.len(), max_blocks]` block ids padded with `pad`, and the column count.
    pub fn block_table(&self, rids: &[RequestId], pad: i32) -> Result<(Vec<i32>, usize)> {
        self.lock()?.block_table(rids, pad)
    }

    /// The attention metadata of one forward step (see `state::BatchLayout`).
    pub fn batch_layout(
        &self,
        rids: &[RequestId],
        new: NewTokens<'_>,
        pad: i32,
    ) -> Result<BatchLayout> {
        self.lock()?.batch_layout(&self.ctx, rids, new, pad)
    }

    pub(super) fn kv_span(
        &self,
        st: &State,
        rid: &RequestId,
        layer: usize,
        start: usize,
        n: usize,
        what: &str,
    ) -> Result<()> {
        let num_tokens = st.view_tokens(rid, what)?;
        if layer >= self.ctx.config.num_layers {
            return Err(Error::InvalidArgument(format!(
                "layer {layer} is outside 0..{}",
                self.ctx.config.num_layers
            )));
        }
        if start.checked_add(n).is_none_or(|e| e > num_tokens) {
            return Err(Error::InvalidArgument(format!(
                "positions {start}..{} are past the end of request {rid} ({} tokens)",
                start.saturating_add(n),
                num_tokens
            )));
        }
        Ok(())
    }

    /// Visits the contiguous runs of token positions `start..start+n` of one layer:
    /// `(byte offset of K in the slab, byte offset of V, bytes, offset in the caller's array)`.
    pub(super) fn for_each_run(
        &self,
        blocks: &[crate::types::BlockId],
        layer: usize,
        start: usize,
        n: usize,
        mut f: impl FnMut(usize, usize, usize, usize) -> Result<()>,
    ) -> Result<()> {
        let bs = self.ctx.config.block_size;
        let tb = self.ctx.layout.token_bytes();
        let mut pos = start;
        while pos < start + n {
            let slot = pos % bs;
            let run = (bs - slot).min(start + n - pos);
            let b = blocks[pos / bs].idx();
            let k = self.ctx.layout.offset(b, layer, 0, slot);
            let v = self.ctx.layout.offset(b, layer, 1, slot);
            f(k, v, run * tb, (pos - start) * tb)?;
            pos += run;
        }
        Ok(())
    }

    /// Copies K and V (`n x heads x head_dim` elements each, as bytes) into positions
    /// `start..start+n` of one layer. A shared block is copied first (copy-on-write).
    pub fn write_kv(
        &self,
        rid: &RequestId,
        layer: usize,
        start: usize,
        k: &[u8],
        v: &[u8],
    ) -> Result<()> {
        let tb = self.ctx.layout.token_bytes();
        if k.len() != v.len() || k.len() % tb != 0 {
            return Err(Error::InvalidArgument(format!(
                "k and v must both hold n x {tb} bytes (got {} and {})",
                k.len(),
                v.len()
            )));
        }
        let n = k.len() / tb;
        self.mutate(false, |st, ctx| {
            self.kv_span(st, rid, layer, start, n, "write_kv")?;
            st.unshare_span(ctx, rid, start, n)?;
            self.run_copies(st)?; // the copies land before the write, never over it
            let blocks = st.resident_blocks(rid, "write_kv")?;
            self.for_each_run(blocks, layer, start, n, |ko, vo, len, at| {
                ctx.memory.write(ko, &k[at..at + len])?;
                ctx.memory.write(vo, &v[at..at + len])
            })
        })
    }

    /// Copies K and V of positions `start..start+n` of one layer out into `k` and `v`.
    pub fn read_kv(
        &self,
        rid: &RequestId,
        layer: usize,
        start: usize,
        k: &mut [u8],
        v: &mut [u8],
    ) -> Result<()> {
        let tb = self.ctx.layout.token_bytes();
        if k.len() != v.len() || k.len() % tb != 0 {
            return Err(Error::InvalidArgument(format!(
                "k and v must both hold n x {tb} bytes"
            )));
        }
        let n = k.len() / tb;
        let st = self.lock()?;
        self.kv_span(&st, rid, layer, start, n, "read_kv")?;
        self.for_each_run(
            st.resident_blocks(rid, "read_kv")?,
            layer,
            start,
            n,
            |ko, vo, len, at| {
                self.ctx.memory.read(ko, &mut k[at..at + len])?;
                self.ctx.memory.read(vo, &mut v[at..at + len])
            },
        )
    }

    /// The device tier's memory and one layer's view of it (for DLPack).
    /// Orders the engine's GPU copies against the consumer's kernels on `stream`, a
    /// `CUstream` handle (0: the legacy default stream; see `storage::order` and
    /// `CudaDevice::set_compute_stream` for the handle's contract). A `cpu` engine has no
    /// streams: only 0 is accepted there.
    pub fn set_compute_stream(&self, stream: u64) -> Result<()> {
        drop(self.lock()?);
        match self.ctx.memory.cuda_device() {
            Some(dev) => {
                dev.set_compute_stream(stream);
                Ok(())
            }
            None if stream == 0 => Ok(()),
            None => Err(Error::InvalidArgument(format!(
                "device=\"cpu\" has no CUDA streams: cannot order copies against stream \
                 {stream:#x}"
            ))),
        }
    }

    /// The compute stream's handle (0 on a `cpu` engine).
    pub fn compute_stream(&self) -> u64 {
        self.ctx
            .memory
            .cuda_device()
            .map_or(0, |d| d.compute_stream())
    }

    pub fn layer_view(&self, layer: usize) -> Result<(Memory, LayerView)> {
        drop(self.lock()?);
        if layer >= self.ctx.config.num_layers {
            return Err(Error::InvalidArgument(format!(
                "layer {layer} is outside 0..{}",
                self.ctx.config.num_layers
            )));
        }
        Ok((self.ctx.memory.clone(), self.ctx.layout.layer_view(layer)))
    }
}

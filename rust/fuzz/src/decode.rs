//! Bytes to an engine setup and to operations. Every byte string decodes (missing bytes read
//! as zeros), and small changes to the bytes make small changes to the program, which is what
//! a coverage-guided fuzzer needs.

use arbitrary::Unstructured;

use crate::model::{NUM_RIDS, NUM_SALTS};

/// Most operations in one program.
pub const MAX_OPS: usize = 96;

/// Prompts are made of these chunks (two share 3 tokens: partial reuse) and a short tail.
const CHUNKS: [[u32; 4]; 4] = [[1, 2, 3, 4], [1, 2, 3, 5], [6, 6, 6, 6], [7, 8, 9, 10]];

fn int(u: &mut Unstructured, lo: usize, hi: usize) -> usize {
    u.int_in_range(lo..=hi).unwrap_or(lo)
}

fn flag(u: &mut Unstructured) -> bool {
    u.arbitrary().unwrap_or(false)
}

fn byte(u: &mut Unstructured) -> u8 {
    u.arbitrary().unwrap_or(0)
}

/// The engine a program runs on.
#[derive(Debug, Clone)]
pub struct Setup {
    pub num_blocks: usize,
    pub block_size: usize,
    pub layers: usize,
    pub heads: usize,
    pub head_dim: usize,
    pub dtype: &'static str,
    pub layer_major: bool,
    pub prefix: bool,
    pub sha256: bool,
    pub host_blocks: usize,
    pub disk_blocks: usize,
    pub events: bool,
    /// Swaps start on the copy worker (`set_inline_copy_bytes(0)`) instead of inline.
    pub worker_swaps: bool,
    /// The eviction policy of every tier (`eviction::POLICY_NAMES`).
    pub eviction_policy: &'static str,
}

impl Setup {
    pub fn decode(u: &mut Unstructured) -> Setup {
        let num_blocks = int(u, 1, 12);
        let block_size = [1, 2, 4, 8][int(u, 0, 3)];
        let flags = byte(u);
        let bit = |i: u8| flags & (1 << i) != 0;
        let host_blocks = if bit(0) { 0 } else { int(u, 1, 8) };
        let disk_blocks = if host_blocks == 0 || bit(1) {
            0
        } else {
            int(u, 1, 8)
        };
        Setup {
            num_blocks,
            block_size,
            host_blocks,
            disk_blocks,
            prefix: !bit(2),
            worker_swaps: bit(3),
            layer_major: bit(4),
            sha256: bit(5),
            events: !bit(6),
            layers: 1 + usize::from(!bit(7)),
            heads: int(u, 1, 2),
            head_dim: [1, 2, 4][int(u, 0, 2)],
            dtype: ["float16", "uint8", "float32"][int(u, 0, 2)],
            eviction_policy: ferrumkv_core::eviction::POLICY_NAMES
                [int(u, 0, ferrumkv_core::eviction::POLICY_NAMES.len() - 1)],
        }
    }

    pub fn itemsize(&self) -> usize {
        match self.dtype {
            "uint8" => 1,
            "float32" => 4,
            _ => 2,
        }
    }
}

/// One step of a program. Request ids and salts are indices (`model::rid`, `model::salt`).
#[derive(Debug, Clone)]
pub enum Op {
    Allocate {
        rid: usize,
        salt: usize,
        tokens: Vec<u32>,
        wait: bool,
    },
    Extend {
        rid: usize,
        tokens: Vec<u32>,
        by_count: bool,
        wait: bool,
    },
    /// (request, tokens, by count)
    ExtendBatch {
        items: Vec<(usize, Vec<u32>, bool)>,
    },
    Deallocate {
        rid: usize,
    },
    Fork {
        parent: usize,
        child: usize,
    },
    Swap {
        rid: usize,
        out: bool,
    },
    /// `take_ticket` / `cancel_ticket` of the `pick`-th ticket ever issued (past the end: one
    /// never issued).
    Take {
        pick: usize,
    },
    Cancel {
        pick: usize,
    },
    PauseCopies(bool),
    /// Swaps copy inline (true) or on the worker.
    InlineSwaps(bool),
    CopyFaults(u8),
    /// 0: fail the next write, 1: short next read, else flip a byte of a slot: `slot` and
    /// `offset` pick one in range, except for their top values, which pick one past the end.
    DiskFault {
        kind: u8,
        slot: u8,
        offset: u16,
    },
    WriteKv {
        rid: usize,
        layer: usize,
        start: usize,
        n: usize,
        bad_len: bool,
    },
    ReadKv {
        rid: usize,
        layer: usize,
        start: usize,
        n: usize,
    },
    /// 0: the default target; 1..=5: (ratio - 1) / 4; 6: an invalid 1.25.
    Gc {
        ratio: u8,
    },
    Reset,
    Lookup {
        salt: usize,
        tokens: Vec<u32>,
    },
    BlockTable {
        rids: Vec<usize>,
    },
    CanAllocate {
        n: usize,
    },
    Stats {
        subscribe: bool,
    },
    Clock {
        dt: u8,
    },
    Close,
}

/// A prompt: the given chunks, then `tail`.
pub fn prompt_of(chunks: &[usize], tail: &[u32]) -> Vec<u32> {
    chunks
        .iter()
        .flat_map(|&c| CHUNKS[c % CHUNKS.len()])
        .chain(tail.iter().copied())
        .collect()
}

fn prompt(u: &mut Unstructured) -> Vec<u32> {
    let n = int(u, 0, 6);
    let chunks: Vec<usize> = (0..n).map(|_| int(u, 0, CHUNKS.len() - 1)).collect();
    let t = int(u, 0, 3);
    let tail: Vec<u32> = (0..t).map(|_| int(u, 0, 9) as u32).collect();
    prompt_of(&chunks, &tail)
}

fn tokens(u: &mut Unstructured) -> Vec<u32> {
    let n = int(u, 0, 6);
    (0..n).map(|_| int(u, 0, 9) as u32).collect()
}

fn rid(u: &mut Unstructured) -> usize {
    int(u, 0, NUM_RIDS - 1)
}

/// Operation kinds and their weights (out of `WEIGHTS`' sum).
const WEIGHTS: [(u8, usize); 22] = [
    (0, 14), // allocate
    (1, 12), // extend
    (2, 3),  // extend_batch
    (3, 7),  // deallocate
    (4, 4),  // fork
    (5, 7),  // swap
    (6, 7),  // take
    (7, 5),  // cancel
    (8, 4),  // pause / resume
    (9, 2),  // inline or worker swaps
    (10, 2), // copy faults
    (11, 3), // disk faults
    (12, 4), // write_kv
    (13, 3), // read_kv
    (14, 3), // gc
    (15, 2), // reset
    (16, 2), // lookup
    (17, 2), // block_table
    (18, 1), // can_allocate
    (19, 1), // stats
    (20, 1), // clock
    (21, 1), // close
];

impl Op {
    pub fn decode(u: &mut Unstructured) -> Op {
        let total: usize = WEIGHTS.iter().map(|w| w.1).sum();
        let mut pick = int(u, 0, total - 1);
        let mut code = 0;
        for &(c, w) in &WEIGHTS {
            if pick < w {
                code = c;
                break;
            }
            pick -= w;
        }
        match code {
            0 => Op::Allocate {
                rid: rid(u),
                salt: int(u, 0, NUM_SALTS - 1),
                tokens: prompt(u),
                wait: flag(u),
            },
            1 => Op::Extend {
                rid: rid(u),
                tokens: tokens(u),
                by_count: byte(u) % 6 == 0,
                wait: flag(u),
            },
            2 => {
                let n = int(u, 1, 3);
                Op::ExtendBatch {
                    items: (0..n)
                        .map(|_| (rid(u), tokens(u), byte(u) % 6 == 0))
                        .collect(),
                }
            }
            3 => Op::Deallocate { rid: rid(u) },
            4 => Op::Fork {
                parent: rid(u),
                child: rid(u),
            },
            5 => Op::Swap {
                rid: rid(u),
                out: flag(u),
            },
            6 => Op::Take {
                pick: byte(u) as usize,
            },
            7 => Op::Cancel {
                pick: byte(u) as usize,
            },
            8 => Op::PauseCopies(flag(u)),
            9 => Op::InlineSwaps(flag(u)),
            10 => Op::CopyFaults(byte(u) % 3),
            11 => Op::DiskFault {
                kind: byte(u) % 3,
                slot: byte(u),
                offset: u.arbitrary().unwrap_or(0),
            },
            12 => Op::WriteKv {
                rid: rid(u),
                layer: int(u, 0, 2),
                start: byte(u) as usize,
                n: byte(u) as usize,
                bad_len: byte(u) % 8 == 0,
            },
            13 => Op::ReadKv {
                rid: rid(u),
                layer: int(u, 0, 2),
                start: byte(u) as usize,
                n: byte(u) as usize,
            },
            14 => Op::Gc { ratio: byte(u) % 7 },
            15 => Op::Reset,
            16 => Op::Lookup {
                salt: int(u, 0, NUM_SALTS - 1),
                tokens: prompt(u),
            },
            17 => {
                let n = int(u, 1, 3);
                Op::BlockTable {
                    rids: (0..n).map(|_| rid(u)).collect(),
                }
            }
            18 => Op::CanAllocate { n: int(u, 0, 40) },
            19 => Op::Stats { subscribe: flag(u) },
            20 => Op::Clock { dt: byte(u) },
            // A close ends the program: only one in four picks of it does, so that random
            // programs mostly run long.
            _ => match byte(u) % 4 {
                0 => Op::Close,
                _ => Op::Stats { subscribe: true },
            },
        }
    }
}

//! The model a program runs against: live sequences (tokens, prefix digests, phase), every
//! ticket ever issued and its state, the copy jobs the worker still holds, and the K/V oracle.

use std::collections::BTreeSet;

use ferrumkv_core::prefix::Salt;
use ferrumkv_core::types::RequestId;
use ferrumkv_core::waiters::Ticket;
use ferrumkv_core::Error;

pub const NUM_RIDS: usize = 6;
pub const NUM_SALTS: usize = 3;

/// Request ids 0..3 are integers, 3..6 strings.
pub fn rid(r: usize) -> RequestId {
    if r < 3 {
        RequestId::Int(r as i64)
    } else {
        RequestId::from(format!("r{r}").as_str())
    }
}

/// Salt 0 is none, 1 a string, 2 an integer.
pub fn salt(s: usize) -> Option<Salt> {
    match s {
        0 => None,
        1 => Some(Salt::Str("tenant-b".into())),
        _ => Some(Salt::Int(7)),
    }
}

/// An engine error, by the kind the documentation promises for an input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    InvalidConfig,
    InvalidArgument,
    /// `OutOfBlocks { never_fits: false }`
    Short,
    /// `OutOfBlocks { never_fits: true }`
    NeverFits,
    Unknown,
    Duplicate,
    InvalidState,
    Closed,
    CudaUnavailable,
    Cuda,
    CopyFailed,
    Io,
    OutOfMemory,
}

pub fn kind(e: &Error) -> Kind {
    match e {
        Error::InvalidConfig { .. } => Kind::InvalidConfig,
        Error::InvalidArgument(_) => Kind::InvalidArgument,
        Error::OutOfBlocks {
            never_fits: false, ..
        } => Kind::Short,
        Error::OutOfBlocks {
            never_fits: true, ..
        } => Kind::NeverFits,
        Error::UnknownRequest(_) => Kind::Unknown,
        Error::DuplicateRequest(_) => Kind::Duplicate,
        Error::InvalidState(_) => Kind::InvalidState,
        Error::Closed => Kind::Closed,
        Error::CudaUnavailable(_) => Kind::CudaUnavailable,
        Error::Cuda(_) => Kind::Cuda,
        Error::CopyFailed(_) => Kind::CopyFailed,
        Error::Io(_) => Kind::Io,
        Error::OutOfMemory(_) => Kind::OutOfMemory,
    }
}

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The digest of a salt's empty prefix.
fn root_digest(salt: usize) -> u64 {
    splitmix(0xF0F0_0000 + salt as u64)
}

/// The digest of a prefix extended by one token.
fn step_digest(prev: u64, token: u32) -> u64 {
    splitmix(prev ^ splitmix(u64::from(token) ^ 0x5EED))
}

/// Appends the K and V (`tb` bytes each) a model computes at a position whose prefix digest
/// is `d`, in `layer`.
pub fn kv_bytes(d: u64, layer: usize, tb: usize, k: &mut Vec<u8>, v: &mut Vec<u8>) {
    let mut z = splitmix(d ^ (layer as u64 + 1).wrapping_mul(0xA076_1D64_78BD_642F));
    for (i, out) in [k, v].into_iter().enumerate() {
        let mut left = tb;
        while left > 0 {
            z = splitmix(z ^ i as u64);
            let bytes = z.to_le_bytes();
            let n = left.min(8);
            out.extend_from_slice(&bytes[..n]);
            left -= n;
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PhaseM {
    Resident,
    Swapped,
    /// A swap copies it on the worker (out: to the host tier).
    Moving {
        out: bool,
    },
}

#[derive(Debug, Clone)]
pub struct SeqM {
    pub salt: usize,
    /// Token ids (bare-count extends get ids no prompt uses).
    pub tokens: Vec<u32>,
    /// `digests[p]`: the digest of (salt, tokens 0..=p), which defines the K/V at p.
    pub digests: Vec<u64>,
    pub phase: PhaseM,
    /// Changes whenever the sequence moves between tiers (or is created).
    pub gen: u64,
}

impl SeqM {
    pub fn new(salt: usize, tokens: &[u32]) -> Self {
        let mut s = SeqM {
            salt,
            tokens: vec![],
            digests: vec![],
            phase: PhaseM::Resident,
            gen: 0,
        };
        s.grow(tokens);
        s
    }

    pub fn grow(&mut self, tokens: &[u32]) {
        for &t in tokens {
            let prev = self
                .digests
                .last()
                .copied()
                .unwrap_or_else(|| root_digest(self.salt));
            self.digests.push(step_digest(prev, t));
            self.tokens.push(t);
        }
    }
}

#[derive(Debug, Clone)]
pub enum TKind {
    Alloc {
        rid: usize,
        salt: usize,
        tokens: Vec<u32>,
    },
    /// `tokens`: the model's ids of the appended tokens.
    Extend {
        rid: usize,
        tokens: Vec<u32>,
    },
    Swap {
        rid: usize,
        out: bool,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub enum TState {
    /// Queued, waiting for blocks.
    Pending,
    /// Served: its blocks are reserved until it is taken or cancelled.
    Granted,
    /// A swap whose copy the (paused) worker holds; `abandoned` once cancelled.
    Moving { abandoned: bool },
    /// A swap that finished: the sequence was `gen` then.
    Moved { rid: usize, gen: u64, out: bool },
    /// Taking it gives this error.
    Failed(Kind),
    /// Taken, cancelled, or abandoned and finished: unknown to the engine.
    Gone,
}

#[derive(Debug, Clone)]
pub struct TicketM {
    pub id: Ticket,
    pub kind: TKind,
    pub state: TState,
}

pub struct Model {
    pub seqs: Vec<Option<SeqM>>,
    pub tickets: Vec<TicketM>,
    /// Swap tickets whose copies the worker holds, in submission order.
    pub jobs: Vec<Ticket>,
    /// Injected copy faults left (`inject_copy_faults` sets the count).
    pub copy_faults: u32,
    pub worker_swaps: bool,
    /// Tickets that must be reported finished by the next drain.
    expected: BTreeSet<Ticket>,
    next_fake: u32,
    gen: u64,
}

impl Model {
    pub fn new(worker_swaps: bool) -> Self {
        Model {
            seqs: vec![None; NUM_RIDS],
            tickets: vec![],
            jobs: vec![],
            copy_faults: 0,
            worker_swaps,
            expected: BTreeSet::new(),
            next_fake: 1 << 30,
            gen: 0,
        }
    }

    pub fn next_gen(&mut self) -> u64 {
        self.gen += 1;
        self.gen
    }

    /// The model's ids of appended tokens: as given, or fresh ones for a bare count.
    pub fn ids_for(&mut self, tokens: &[u32], by_count: bool) -> Vec<u32> {
        if !by_count {
            return tokens.to_vec();
        }
        tokens
            .iter()
            .map(|_| {
                self.next_fake += 1;
                self.next_fake
            })
            .collect()
    }

    pub fn find(&self, t: Ticket) -> Option<usize> {
        self.tickets.iter().position(|x| x.id == t)
    }

    pub fn push_ticket(&mut self, id: Ticket, kind: TKind, state: TState) {
        assert!(self.find(id).is_none(), "ticket {id} issued twice");
        self.tickets.push(TicketM { id, kind, state });
    }

    /// Waiting allocate / extend calls.
    pub fn num_pending(&self) -> usize {
        self.tickets
            .iter()
            .filter(|t| t.state == TState::Pending)
            .count()
    }

    pub fn pending_extends(&self) -> usize {
        self.tickets
            .iter()
            .filter(|t| t.state == TState::Pending && matches!(t.kind, TKind::Extend { .. }))
            .count()
    }

    /// The open (pending or granted, not taken) allocate / extend ticket of request `r`.
    pub fn open_ticket(&self, r: usize) -> Option<Ticket> {
        self.tickets
            .iter()
            .find(|t| {
                matches!(t.state, TState::Pending | TState::Granted)
                    && match t.kind {
                        TKind::Alloc { rid, .. } | TKind::Extend { rid, .. } => rid == r,
                        TKind::Swap { .. } => false,
                    }
            })
            .map(|t| t.id)
    }

    /// Ticket `t` fails with `k` (its request was deallocated while it waited).
    pub fn fail(&mut self, t: Ticket, k: Kind) {
        let i = self.find(t).expect("a known ticket");
        self.tickets[i].state = TState::Failed(k);
        self.expected.insert(t);
    }

    /// The worker ran every job it held, in order: each copy consumes an injected fault if
    /// one is left (and is then undone).
    pub fn run_jobs(&mut self) {
        for t in std::mem::take(&mut self.jobs) {
            let i = self.find(t).expect("a job's ticket");
            let TKind::Swap { rid, out } = self.tickets[i].kind else {
                unreachable!("jobs are swaps")
            };
            let ok = if self.copy_faults > 0 {
                self.copy_faults -= 1;
                false
            } else {
                true
            };
            let gen = self.next_gen();
            let s = self.seqs[rid]
                .as_mut()
                .expect("a moving sequence stays live");
            assert_eq!(s.phase, PhaseM::Moving { out }, "r{rid}: job of ticket {t}");
            s.phase = if ok == out {
                PhaseM::Swapped
            } else {
                PhaseM::Resident
            };
            s.gen = gen;
            let abandoned = matches!(self.tickets[i].state, TState::Moving { abandoned: true });
            self.tickets[i].state = if abandoned {
                TState::Gone
            } else {
                self.expected.insert(t);
                if ok {
                    TState::Moved { rid, gen, out }
                } else {
                    TState::Failed(Kind::CopyFailed)
                }
            };
        }
    }

    /// The tickets a drain reported finished: each must be one the model expects (a grant of
    /// a waiting call, or a failure or swap it knows of), grants must be first come, first
    /// served, and every expected one must be there.
    pub fn completed(&mut self, done: &[Ticket]) {
        let done: BTreeSet<Ticket> = done.iter().copied().collect();
        let mut granted = vec![];
        for &t in &done {
            let Some(i) = self.find(t) else {
                panic!("ticket {t} finished but was never issued");
            };
            let tm = &mut self.tickets[i];
            match tm.state {
                TState::Pending => {
                    tm.state = TState::Granted;
                    granted.push(i);
                }
                _ if self.expected.contains(&t) => {}
                _ => panic!("ticket {t} finished unexpectedly: {tm:?}"),
            }
        }
        let missing: Vec<_> = self.expected.difference(&done).collect();
        assert!(
            missing.is_empty(),
            "tickets {missing:?} finished but were not reported"
        );
        self.expected.clear();
        for i in granted {
            let t = &self.tickets[i];
            let alloc = matches!(t.kind, TKind::Alloc { .. });
            for o in &self.tickets {
                if o.state != TState::Pending {
                    continue;
                }
                let o_extend = matches!(o.kind, TKind::Extend { .. });
                let o_alloc = matches!(o.kind, TKind::Alloc { .. });
                assert!(
                    !(alloc && o_extend),
                    "prompt ticket {} was granted while extend ticket {} waits",
                    t.id,
                    o.id
                );
                assert!(
                    !(o.id < t.id && (o_alloc == alloc)),
                    "ticket {} was granted before the earlier ticket {} of its kind",
                    t.id,
                    o.id
                );
            }
        }
    }
}

//! ferrumkv's engine: paged KV-cache block pools, a prefix cache, waiters, pressure levels
//! and stats, with no Python in sight (the bindings live in `rust/py`).
//!
//! Map: `config` (validated settings), `layout` (byte geometry), `storage` (memory),
//! `pool` (refcounts and free queues), `eviction` / `ghost` / `shadow` (the policies), `prefix` (hashes and the cached-block index),
//! `sequence`, `waiters` (tickets of calls that wait for blocks), `state` (the bookkeeping
//! under the lock), `engine` (the lock, the notifier and the public calls), `stats`,
//! `events`, `incidents` (failures the engine got over, for the log), `remote` (the shared store's keys, values and write queue), `residency`, `pressure`, `notify`, `clock`, `cuda`, `error`, `fallible`
//! (bookkeeping allocations that fail with `Error::OutOfMemory` instead of aborting), `sync`
//! (the locks, atomics and threads of the worker handshakes; shuttle's under `--features shuttle`).

pub mod clock;
pub mod config;
pub mod cuda;
pub mod engine;
pub mod error;
pub mod events;
pub mod eviction;
pub mod fallible;
pub mod ghost;
pub mod incidents;
pub mod layout;
pub mod lru2;
pub mod notify;
pub mod pool;
pub mod prefix;
pub mod pressure;
pub mod remote;
pub mod residency;
pub mod sequence;
pub mod shadow;
pub mod slots;
pub mod state;
pub mod stats;
pub mod storage;
pub mod sync;
pub mod tier;
pub mod transfer;
pub mod types;
pub mod waiters;

pub use engine::{Engine, Outcome};
pub use error::{Error, Result};

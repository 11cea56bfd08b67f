//! Waiting, granting, cancelling and swapping, one defect scenario each: a grant is
//! invisible to other requests until its waiter takes it, a cancel gives back exactly what
//! its ticket holds, waiting is first come first served, and a moving sequence is untouchable.
//! Each test failed on the engine before tickets reserved instead of applying.

mod common;

use common::*;
use ferrumkv_core::clock::Clock;
use ferrumkv_core::config::{CacheConfig, ConfigInput};
use ferrumkv_core::sequence::Append;
use ferrumkv_core::waiters::Ticket;
use ferrumkv_core::{Engine, Error, Outcome};

fn alloc_wait(e: &Engine, id: &str, tokens: &[u32]) -> Ticket {
    waits(e.allocate(rid(id), tokens.to_vec(), None, true).unwrap())
}

fn extend_wait(e: &Engine, id: &str, tokens: &[u32]) -> Ticket {
    waits(
        e.extend(rid(id), Append::Ids(tokens.to_vec()), true)
            .unwrap(),
    )
}

fn granted(e: &Engine, t: Ticket) -> bool {
    // Tickets finished since the last drain; a test drains once per grant it expects.
    e.drain_notifications().0.contains(&t)
}

/// 4 device blocks: "a" holds [1, 2, 3] (one partial block), "x" fills the rest.
fn full_engine_with_partial_a() -> Engine {
    let e = engine(4, true);
    alloc(&e, "a", &[1, 2, 3]);
    alloc(&e, "x", &(100..112).collect::<Vec<_>>());
    e
}

#[test]
fn a_granted_extend_is_not_published_before_it_is_taken() {
    // Defect 1: the grant used to register a's completed block at once; a prompt hit it,
    // then the cancel made it a partial tail again under its old hash.
    let e = full_engine_with_partial_a();
    let t = extend_wait(&e, "a", &[4, 5]);
    e.deallocate(&rid("x")).unwrap(); // grants the extend
    assert!(granted(&e, t));
    let b = alloc(&e, "b", &[1, 2, 3, 4, 9]);
    assert_eq!(
        b.num_cached_tokens, 0,
        "a grant not yet taken was served as cached"
    );
    e.cancel_ticket(t);
    e.check_invariants();
    assert_eq!(e.get(&rid("a")).unwrap().unwrap().num_tokens, 3);
    // The next prompts are served, and none of them hits a block nobody computed.
    let c = alloc(&e, "c", &[1, 2, 3, 4, 7]);
    assert_eq!(
        c.num_cached_tokens, 4,
        "b's own computed block is the only hit"
    );
    e.check_invariants();
}

#[test]
fn a_taken_extend_registers_and_counts() {
    let e = full_engine_with_partial_a();
    let before = e.stats().unwrap().counters;
    let t = extend_wait(&e, "a", &[4, 5]);
    e.deallocate(&rid("x")).unwrap();
    assert!(granted(&e, t));
    let v = e.take_ticket(t).unwrap();
    assert_eq!((v.num_tokens, v.block_ids.len()), (5, 2));
    let b = alloc(&e, "b", &[1, 2, 3, 4, 9]);
    assert_eq!(b.num_cached_tokens, 4);
    let after = e.stats().unwrap().counters;
    assert_eq!(after.gen_alloc_blocks - before.gen_alloc_blocks, 1);
    e.check_invariants();
}

#[test]
fn a_later_extend_is_refused_while_a_grant_is_untaken() {
    // Defect 3: a later extend was applied on top of the grant, and the grant's cancel
    // rolled both back (the later handle listed blocks given to others).
    let e = full_engine_with_partial_a();
    let t = extend_wait(&e, "a", &[4, 5]);
    e.deallocate(&rid("x")).unwrap();
    let later = e.extend(rid("a"), Append::Ids(vec![6]), false);
    assert!(matches!(later, Err(Error::InvalidState(_))), "{later:?}");
    for refused in [
        e.extend_batch(&[(rid("a"), Append::Ids(vec![6]))]),
        e.fork(&rid("a"), rid("f")).map(|_| ()),
    ] {
        assert!(
            matches!(refused, Err(Error::InvalidState(_))),
            "{refused:?}"
        );
    }
    e.cancel_ticket(t);
    let a = e.get(&rid("a")).unwrap().unwrap();
    assert_eq!((a.num_tokens, a.block_ids.len()), (3, 1));
    assert_eq!(e.stats().unwrap().device.used_blocks, 1);
    e.check_invariants();
}

#[test]
fn a_failed_allocate_ticket_never_reaches_a_reused_request_id() {
    // Defect 4: a granted allocate survived `deallocate`; cancelling the old waiter after
    // the id was reused deleted the new sequence.
    let e = engine(4, true);
    alloc(&e, "x", &(100..116).collect::<Vec<_>>());
    let t = alloc_wait(&e, "w", &[1, 2, 3, 4, 5]);
    e.deallocate(&rid("x")).unwrap(); // grants w
    assert!(granted(&e, t));
    e.deallocate(&rid("w")).unwrap(); // withdraws the grant: its waiter gets an error
    assert!(granted(&e, t), "the waiter is told");
    assert_eq!(e.stats().unwrap().device.used_blocks, 0);
    alloc(&e, "w", &[7, 8]); // the id is reused
    e.cancel_ticket(t); // the old waiter gives up late
    assert!(e.contains(&rid("w")).unwrap());
    assert!(matches!(e.take_ticket(t), Err(Error::InvalidState(_))));
    e.check_invariants();
}

#[test]
fn a_granted_allocate_is_never_a_prefix_hit_for_others() {
    // Defect 5: a cancelled allocate left never-computed blocks cached once another request
    // hit them.
    let e = engine(6, true);
    alloc(&e, "x", &(100..124).collect::<Vec<_>>());
    let prompt: Vec<u32> = (1..=9).collect();
    let t = alloc_wait(&e, "w", &prompt);
    e.deallocate(&rid("x")).unwrap(); // grants w (3 blocks)
    assert!(granted(&e, t));
    let y = alloc(&e, "y", &prompt);
    assert_eq!(
        y.num_cached_tokens, 0,
        "w's grant was served before w computed it"
    );
    e.cancel_ticket(t);
    e.deallocate(&rid("y")).unwrap();
    e.check_invariants();
    // Only y's blocks, which y computed, are cached now.
    let s = e.stats().unwrap();
    assert_eq!(s.device.used_blocks, 0);
    assert_eq!(s.device.evictable_blocks, 2);
}

#[test]
fn a_waiting_decode_step_is_not_overtaken() {
    // Defect 6: new prompts and later extends overtook a waiting extend.
    let e = engine(4, true);
    alloc(&e, "a", &[1, 2, 3, 4]); // 1 full block
    alloc(&e, "x1", &[20, 21]); // 1 block
    alloc(&e, "x2", &(30..38).collect::<Vec<_>>()); // 2 full blocks: the device is full
    let t = extend_wait(&e, "a", &[5, 6, 7, 8, 9]); // needs 2 blocks
    e.deallocate(&rid("x1")).unwrap(); // 1 free: not enough for the head of the queue
    assert!(!granted(&e, t));
    assert!(!e.can_allocate(1).unwrap());
    let p = e.allocate(rid("p"), vec![50], None, false);
    assert!(matches!(p, Err(Error::OutOfBlocks { .. })), "{p:?}");
    let later = e.extend(rid("x2"), Append::Ids(vec![39]), false);
    assert!(matches!(later, Err(Error::OutOfBlocks { .. })), "{later:?}");
    let batch = e.extend_batch(&[(rid("x2"), Append::Ids(vec![39]))]);
    assert!(matches!(batch, Err(Error::OutOfBlocks { .. })), "{batch:?}");
    // A later extend that needs blocks queues behind it and is granted after it.
    let t2 = extend_wait(&e, "x2", &[39]);
    let p2 = alloc_wait(&e, "p", &[50]);
    assert!(!granted(&e, t2) && !granted(&e, p2));
    // Aborting a withdraws its waiting extend and frees its block: the queue is served in
    // order, the extend first, then the prompt.
    e.deallocate(&rid("a")).unwrap();
    assert_eq!(e.drain_notifications().0, [t, t2, p2]);
    assert!(matches!(e.take_ticket(t), Err(Error::InvalidState(_))));
    assert_eq!(e.take_ticket(t2).unwrap().num_tokens, 9);
    assert_eq!(e.take_ticket(p2).unwrap().num_tokens, 1);
    e.check_invariants();
}

#[test]
fn a_cancelled_copy_on_write_extend_keeps_no_copy() {
    // Defect 7: a cancelled extend that did copy-on-write kept its private copy.
    let e = engine(4, true);
    alloc(&e, "a", &[1, 2, 3]);
    e.fork(&rid("a"), rid("b")).unwrap(); // a and b share the partial block
    alloc(&e, "x", &(100..112).collect::<Vec<_>>());
    let before = e.stats().unwrap().counters;
    let t = extend_wait(&e, "a", &[4]); // copy-on-write needs a block
    e.deallocate(&rid("x")).unwrap();
    assert!(granted(&e, t));
    e.cancel_ticket(t);
    let (a, b) = (
        e.get(&rid("a")).unwrap().unwrap(),
        e.get(&rid("b")).unwrap().unwrap(),
    );
    assert_eq!(a.block_ids, b.block_ids, "sharing was lost");
    let s = e.stats().unwrap();
    assert_eq!(s.device.used_blocks, 1);
    assert_eq!(
        s.counters.intra_device_copy_blocks,
        before.intra_device_copy_blocks
    );
    e.check_invariants();
}

#[test]
fn an_undone_grant_counts_no_allocation() {
    // Defect 13: counters of a cancelled grant were kept.
    let e = engine(4, true);
    alloc(&e, "x", &(100..116).collect::<Vec<_>>());
    let t = alloc_wait(&e, "w", &[1, 2, 3, 4, 5]);
    let before = e.stats().unwrap().counters;
    e.deallocate(&rid("x")).unwrap();
    assert!(granted(&e, t));
    e.cancel_ticket(t);
    let after = e.stats().unwrap().counters;
    assert_eq!(after.alloc_total_blocks, before.alloc_total_blocks);
    assert_eq!(after.alloc_new_blocks, before.alloc_new_blocks);
    assert_eq!(after.missed_blocks, before.missed_blocks);
    assert_eq!(after.input_tokens, before.input_tokens);
    assert_eq!(after.cache_tokens, before.cache_tokens);
}

#[test]
fn huge_extend_counts_are_refused_not_overflowed() {
    // Defect 9 (extend_batch): an unchecked sum of block counts overflowed.
    let e = engine(4, true);
    alloc(&e, "a", &[1, 2]);
    alloc(&e, "b", &[3, 4]);
    let huge = Append::Count(usize::MAX - 1);
    let r = e.extend_batch(&[(rid("a"), huge.clone()), (rid("b"), huge.clone())]);
    assert!(matches!(r, Err(Error::InvalidArgument(_))), "{r:?}");
    let r = e.extend(rid("a"), huge, true);
    assert!(matches!(r, Err(Error::InvalidArgument(_))), "{r:?}");
    assert_eq!(e.get(&rid("a")).unwrap().unwrap().num_tokens, 2);
    e.check_invariants();
}

// ----- swaps ------------------------------------------------------------------------------

const BIG_TOKEN_BYTES: usize = 8 * 256 * 2;

/// Blocks of 64 KiB (2 layers, 8 heads, head_dim 256, block_size 4): a 64 MiB sequence is
/// swapped on the worker, long enough to act while it is in flight.
fn big_engine(device: i64, host: i64) -> Engine {
    let mut c = ConfigInput::small(device);
    c.num_kv_heads = 8;
    c.head_dim = 256;
    c.host_blocks = host;
    c.enable_prefix_cache = false;
    Engine::with_clock(CacheConfig::validate(&c).unwrap(), Clock::manual(0.0)).unwrap()
}

fn pattern(n_tokens: usize, seed: u8) -> Vec<u8> {
    (0..n_tokens * BIG_TOKEN_BYTES)
        .map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed) ^ (i >> 12) as u8)
        .collect()
}

#[test]
fn a_moving_sequence_is_untouchable_and_its_blocks_stay_pinned() {
    // Defect 2: write_kv during an in-flight swap_out was accepted; with a fork it landed
    // in a block the copier never read, and a deallocated sibling's block could be handed
    // to a third request whose K/V was then copied into the swapped sequence.
    let e = big_engine(2100, 1100);
    let n = 4096; // 1024 blocks, 64 MiB
    alloc(&e, "a", &vec![1; n]);
    let kv = pattern(n, 3);
    e.write_kv(&rid("a"), 0, 0, &kv, &kv).unwrap();
    e.fork(&rid("a"), rid("b")).unwrap();
    let o = e.swap_out(&rid("a")).unwrap();
    assert!(
        matches!(o, Outcome::Waiting(_)),
        "a 64 MiB swap runs on the worker"
    );
    let one = pattern(1, 99);
    let w = e.write_kv(&rid("a"), 0, 0, &one, &one);
    assert!(matches!(w, Err(Error::InvalidState(_))), "{w:?}");
    let (mut k, mut v) = (vec![0; BIG_TOKEN_BYTES], vec![0; BIG_TOKEN_BYTES]);
    let r = e.read_kv(&rid("a"), 0, 0, &mut k, &mut v);
    assert!(matches!(r, Err(Error::InvalidState(_))), "{r:?}");
    // The sibling goes and a third request takes every free block and writes its own K/V.
    e.deallocate(&rid("b")).unwrap();
    let free = e.stats().unwrap().device.free_blocks;
    alloc(&e, "c", &vec![2; free * 4]);
    let other = pattern(free * 4, 200);
    e.write_kv(&rid("c"), 0, 0, &other, &other).unwrap();
    settle(&e, o);
    e.deallocate(&rid("c")).unwrap();
    settle(&e, e.swap_in(&rid("a")).unwrap());
    let (mut k, mut v) = (vec![0; kv.len()], vec![0; kv.len()]);
    e.read_kv(&rid("a"), 0, 0, &mut k, &mut v).unwrap();
    assert!(
        k == kv && v == kv,
        "the swapped sequence came back with other bytes"
    );
    e.check_invariants();
}

#[test]
fn a_failed_swap_copy_fails_its_ticket_and_undoes_the_swap() {
    // Defect 12: a panic on the copy worker killed the thread without failing the ticket.
    let e = big_engine(1100, 1100);
    let n = 4096;
    alloc(&e, "a", &vec![1; n]);
    let kv = pattern(n, 5);
    e.write_kv(&rid("a"), 0, 0, &kv, &kv).unwrap();
    e.inject_copy_faults(1);
    let t = waits(e.swap_out(&rid("a")).unwrap());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !e.drain_notifications().0.contains(&t) {
        assert!(
            std::time::Instant::now() < deadline,
            "the ticket never finished"
        );
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    let r = e.take_ticket(t);
    assert!(matches!(r, Err(Error::CopyFailed(_))), "{r:?}");
    let s = e.stats().unwrap();
    assert_eq!(
        s.host.used_blocks, 0,
        "the host blocks the swap took went back"
    );
    assert_eq!(s.device.used_blocks, 1024);
    let a = e.get(&rid("a")).unwrap().unwrap();
    assert_eq!(a.tier, ferrumkv_core::types::Tier::Device);
    // The worker lives on: the next swap works, byte for byte.
    settle(&e, e.swap_out(&rid("a")).unwrap());
    settle(&e, e.swap_in(&rid("a")).unwrap());
    let (mut k, mut v) = (vec![0; kv.len()], vec![0; kv.len()]);
    e.read_kv(&rid("a"), 0, 0, &mut k, &mut v).unwrap();
    assert!(k == kv && v == kv);
    e.check_invariants();
}

#[test]
fn a_failed_inline_swap_copy_changes_nothing() {
    let e = engine_with_host(4, 4, true);
    alloc(&e, "a", &[1, 2, 3, 4, 5]);
    let kv = fill(&e, "a", 0, 5, 9);
    e.inject_copy_faults(1);
    let r = e.swap_out(&rid("a"));
    assert!(matches!(r, Err(Error::CopyFailed(_))), "{r:?}");
    assert_eq!(e.stats().unwrap().host.used_blocks, 0);
    assert_eq!(read(&e, "a", 0, 5), kv);
    e.check_invariants();
}

#[test]
fn a_waiting_prompt_is_not_served_while_a_decode_step_waits() {
    // Defect 6, in the queues: the prompt queue was served when the head extend was short.
    let e = engine(4, true);
    alloc(&e, "a", &[1, 2, 3, 4]);
    alloc(&e, "x1", &[20, 21]);
    alloc(&e, "x2", &(30..38).collect::<Vec<_>>());
    let p = alloc_wait(&e, "p", &[50]); // needs 1 block
    let t = extend_wait(&e, "a", &[5, 6, 7, 8, 9]); // needs 2 blocks, queued after p
    e.deallocate(&rid("x1")).unwrap(); // 1 block: enough for p, not for the extend
    let done = e.drain_notifications().0;
    assert!(
        !done.contains(&p),
        "a prompt was served while a decode step waits"
    );
    e.deallocate(&rid("x2")).unwrap();
    assert_eq!(e.drain_notifications().0, [t, p]);
    e.take_ticket(t).unwrap();
    e.take_ticket(p).unwrap();
    e.check_invariants();
}

#[test]
fn a_take_serves_no_waiter_a_hit_on_blocks_not_yet_computed() {
    // Found by the model-based test: taking a granted allocate published its blocks and, in
    // the same call, granted a second waiter hits on them; the first waiter's own write then
    // went to a copy (copy-on-write of a shared block), so the second read bytes nobody
    // wrote. Now a take serves nobody after its publish, and a sequence writes the blocks it
    // computes in place even when they are shared.
    let e = engine(9, true);
    alloc(&e, "x", &(100..136).collect::<Vec<_>>()); // the device is full
    let prompt: Vec<u32> = (1..=9).collect(); // 2 full blocks + 1 token
    let t1 = alloc_wait(&e, "p1", &prompt);
    let t2 = alloc_wait(&e, "p2", &prompt);
    e.deallocate(&rid("x")).unwrap(); // 9 free: p1 takes 3, p2 3 more
    let done = e.drain_notifications().0;
    assert_eq!(done, [t1, t2], "both are granted at once");
    let p1 = e.take_ticket(t1).unwrap();
    let k = fill(&e, "p1", 0, 9, 42); // p1 computes its blocks
    let p2 = e.take_ticket(t2).unwrap();
    assert_eq!(
        p2.num_cached_tokens, 0,
        "p2 was reserved before p1 published"
    );
    assert_ne!(p1.block_ids, p2.block_ids);
    alloc(&e, "p3", &prompt); // a later prompt hits p1's computed blocks
    assert_eq!(read(&e, "p3", 0, 8), k[..8 * 16].to_vec());
    e.check_invariants();
}

#[test]
fn the_owner_writes_its_blocks_in_place_when_others_already_share_them() {
    let e = engine(8, true);
    let prompt: Vec<u32> = (1..=9).collect();
    alloc(&e, "a", &prompt); // registered at once, computed below
    let b = alloc(&e, "b", &prompt); // same step: a full hit on a's blocks
    assert_eq!(b.num_cached_tokens, 8);
    let k = fill(&e, "a", 0, 9, 7);
    assert_eq!(
        read(&e, "b", 0, 8),
        k[..8 * 16].to_vec(),
        "b reads what a computed"
    );
    assert_eq!(e.stats().unwrap().counters.intra_device_copy_blocks, 0);
    e.check_invariants();
}

//! Chunked prefill, speculative-decoding truncation, recompute-preemption accounting,
//! per-tier prefix matches and `can_allocate` of a prompt: exact block ids, counters and
//! events (block_size 4; blank blocks are taken in id order, released ones at the back).

mod common;

use common::*;
use ferrumkv_core::events::KvEvent;
use ferrumkv_core::sequence::{AllocOpts, Append, SeqView};
use ferrumkv_core::stats::Counters;
use ferrumkv_core::{Engine, Error};

fn toks(range: std::ops::Range<u32>) -> Vec<u32> {
    range.collect()
}

fn chunked(k: usize) -> AllocOpts {
    AllocOpts {
        num_new_tokens: Some(k),
        preempted: false,
    }
}

fn preempted() -> AllocOpts {
    AllocOpts {
        num_new_tokens: None,
        preempted: true,
    }
}

fn alloc_with(e: &Engine, id: &str, tokens: &[u32], opts: AllocOpts) -> SeqView {
    ready(
        e.allocate_with(rid(id), tokens.to_vec(), None, opts, false)
            .unwrap(),
    )
}

/// The next `n` prompt tokens of `id`, now.
fn chunk(e: &Engine, id: &str, n: usize) -> Result<SeqView, Error> {
    e.extend(rid(id), Append::Prompt(n), false).map(ready)
}

fn counters(e: &Engine) -> Counters {
    e.stats().unwrap().counters
}

fn stored(e: &Engine) -> Vec<Vec<u128>> {
    e.drain_events()
        .unwrap()
        .into_iter()
        .filter_map(|ev| match ev {
            KvEvent::Stored { block_hashes, .. } => Some(block_hashes),
            _ => None,
        })
        .collect()
}

fn removed(e: &Engine) -> Vec<Vec<u128>> {
    e.drain_events()
        .unwrap()
        .into_iter()
        .filter_map(|ev| match ev {
            KvEvent::Removed { block_hashes, .. } => Some(block_hashes),
            _ => None,
        })
        .collect()
}

fn cached(e: &Engine, tokens: &[u32]) -> usize {
    e.lookup_prefix(tokens, None).unwrap().num_cached_tokens()
}

/// Fails unless `f` fails and leaves the stats and the handle of `id` as they were.
fn changes_nothing<T: std::fmt::Debug>(
    e: &Engine,
    id: &str,
    f: impl FnOnce() -> Result<T, Error>,
) -> Error {
    let (before, view) = (e.stats().unwrap(), e.get(&rid(id)).unwrap());
    let err = f().expect_err("the call should fail");
    let after = e.stats().unwrap();
    assert_eq!(after.counters, before.counters);
    assert_eq!(after.device, before.device);
    assert_eq!(e.get(&rid(id)).unwrap(), view);
    e.check_invariants();
    err
}

// ----- chunked prefill --------------------------------------------------------------------

#[test]
fn a_chunked_prompt_gets_its_slots_chunk_by_chunk_and_registers_each_block_once() {
    let e = engine(16, true);
    let prompt = toks(0..14); // 3 full blocks + 2 tokens
    let a = alloc_with(&e, "a", &prompt, chunked(5));
    assert_eq!(
        (ids(&a), a.num_tokens, a.num_prompt_tokens),
        (vec![0, 1], 5, 14)
    );
    assert_eq!(a.num_cached_tokens, 0);
    let c = counters(&e);
    // The lookup counts the whole prompt once; blocks count as they are taken.
    assert_eq!((c.alloc_total_blocks, c.alloc_new_blocks), (2, 2));
    assert_eq!(
        (c.missed_blocks, c.input_tokens, c.cache_tokens),
        (4, 14, 0)
    );
    assert_eq!(
        cached(&e, &toks(0..9)),
        4,
        "block 0 is registered, block 1 is partial"
    );
    e.check_invariants();

    let a = chunk(&e, "a", 6).unwrap();
    assert_eq!((ids(&a), a.num_tokens), (vec![0, 1, 2], 11));
    assert_eq!(cached(&e, &toks(0..9)), 8);
    let a = chunk(&e, "a", 3).unwrap();
    assert_eq!(
        (ids(&a), a.num_tokens, a.num_prompt_tokens),
        (vec![0, 1, 2, 3], 14, 14)
    );
    let c = counters(&e);
    assert_eq!(
        (c.alloc_total_blocks, c.alloc_new_blocks, c.gen_alloc_blocks),
        (4, 4, 0)
    );
    assert_eq!(
        (c.missed_blocks, c.input_tokens),
        (4, 14),
        "counted once, at allocation"
    );
    e.check_invariants();

    // The prompt is done: generated tokens now, and no more chunks.
    let err = changes_nothing(&e, "a", || chunk(&e, "a", 1));
    assert!(matches!(err, Error::InvalidArgument(_)), "{err:?}");
    let a = extend(&e, "a", &[14, 15]);
    assert_eq!((ids(&a), a.num_tokens), (vec![0, 1, 2, 3], 16));
    assert_eq!(counters(&e).gen_alloc_blocks, 0);

    // Same hashes as the same prompt allocated whole: the events agree block for block.
    let whole = engine(16, true);
    alloc(&whole, "a", &prompt);
    extend(&whole, "a", &[14, 15]);
    let chunked_events = stored(&e);
    assert_eq!(chunked_events.len(), 4, "one event per completed block");
    assert_eq!(
        chunked_events.concat(),
        stored(&whole).concat(),
        "a chunk registers its blocks under the prompt's hashes"
    );
    let b = alloc(&e, "b", &toks(0..13));
    assert_eq!((ids(&b), b.num_cached_tokens), (vec![0, 1, 2, 4], 12));
    e.check_invariants();
}

#[test]
fn bad_chunks_and_early_generated_tokens_change_nothing() {
    let e = engine(16, true);
    alloc_with(&e, "a", &toks(0..14), chunked(5));
    let err = changes_nothing(&e, "a", || e.extend(rid("a"), Append::Ids(vec![7]), false));
    assert!(matches!(err, Error::InvalidState(_)), "{err:?}");
    let err = changes_nothing(&e, "a", || e.extend(rid("a"), Append::Count(1), false));
    assert!(matches!(err, Error::InvalidState(_)), "{err:?}");
    let err = changes_nothing(&e, "a", || chunk(&e, "a", 10)); // 5 + 10 > 14
    assert!(matches!(err, Error::InvalidArgument(_)), "{err:?}");
    let err = changes_nothing(&e, "a", || {
        e.extend_batch(&[(rid("a"), Append::Ids(vec![1]))])
    });
    assert!(matches!(err, Error::InvalidState(_)), "{err:?}");
    let r = e.allocate_with(rid("z"), toks(0..4), None, chunked(0), false);
    assert!(matches!(r, Err(Error::InvalidArgument(_))), "{r:?}");
    assert!(e.get(&rid("z")).unwrap().is_none());
    // The last 9 tokens of the prompt are exactly one chunk.
    assert_eq!(chunk(&e, "a", 9).unwrap().num_tokens, 14);
    e.check_invariants();
}

#[test]
fn a_batch_takes_prompt_chunks_and_decode_ids_at_once_in_item_order() {
    let e = engine(16, true);
    let a = alloc_with(&e, "a", &toks(0..14), chunked(5)); // blocks 0, 1
    let b = alloc(&e, "b", &toks(100..107)); // blocks 2, 3 (3 tokens in the tail)
    assert_eq!((ids(&a), ids(&b)), (vec![0, 1], vec![2, 3]));
    // Generated ids before the prompt is reserved: refused, by either batch entry point.
    let err = changes_nothing(&e, "a", || {
        e.extend_batch_ids(&[rid("b"), rid("a")], &[107, 5])
    });
    assert!(matches!(err, Error::InvalidState(_)), "{err:?}");
    let err = changes_nothing(&e, "a", || {
        e.extend_batch(&[(rid("a"), Append::Prompt(10))]) // 5 + 10 > 14
    });
    assert!(matches!(err, Error::InvalidArgument(_)), "{err:?}");
    // A failure names the first bad item in order: the repeat of "b" before the unknown "z".
    let err = changes_nothing(&e, "b", || {
        e.extend_batch(&[
            (rid("b"), Append::Ids(vec![107])),
            (rid("b"), Append::Ids(vec![107])),
            (rid("z"), Append::Ids(vec![1])),
        ])
    });
    assert!(
        matches!(err, Error::InvalidArgument(ref m) if m.contains("twice")),
        "{err:?}"
    );
    let err = changes_nothing(&e, "b", || {
        e.extend_batch(&[
            (rid("z"), Append::Ids(vec![1])),
            (rid("b"), Append::Ids(vec![107])),
            (rid("b"), Append::Ids(vec![107])),
        ])
    });
    assert!(matches!(err, Error::UnknownRequest(_)), "{err:?}");
    // One step: a's next chunk of 6 (a prompt block) and b's next id (no new block).
    e.extend_batch(&[
        (rid("a"), Append::Prompt(6)),
        (rid("b"), Append::Ids(vec![107])),
    ])
    .unwrap();
    let (a, b) = (
        e.get(&rid("a")).unwrap().unwrap(),
        e.get(&rid("b")).unwrap().unwrap(),
    );
    assert_eq!((ids(&a), a.num_tokens), (vec![0, 1, 4], 11));
    assert_eq!((ids(&b), b.num_tokens), (vec![2, 3], 8));
    let c = counters(&e);
    assert_eq!(
        (c.alloc_total_blocks, c.alloc_new_blocks, c.gen_alloc_blocks),
        (5, 5, 0),
        "a chunk's block counts as a prompt block"
    );
    assert_eq!(cached(&e, &toks(0..9)), 8, "a's block 1 is registered");
    assert_eq!(cached(&e, &toks(100..109)), 8, "b's block 3 is registered");
    e.check_invariants();
    // The last chunk, then a decode step of one id each: b spills into a new block.
    e.extend_batch(&[(rid("a"), Append::Prompt(3))]).unwrap();
    e.extend_batch_ids(&[rid("a"), rid("b")], &[14, 108])
        .unwrap();
    let (a, b) = (
        e.get(&rid("a")).unwrap().unwrap(),
        e.get(&rid("b")).unwrap().unwrap(),
    );
    assert_eq!((ids(&a), a.num_tokens), (vec![0, 1, 4, 5], 15));
    assert_eq!((ids(&b), b.num_tokens), (vec![2, 3, 6], 9));
    let c = counters(&e);
    assert_eq!(
        (c.alloc_total_blocks, c.alloc_new_blocks, c.gen_alloc_blocks),
        (6, 6, 1)
    );
    // The same prompt allocated whole and extended alike registers the same hashes.
    let whole = engine(16, true);
    alloc(&whole, "a", &toks(0..14));
    extend(&whole, "a", &[14]);
    let whole_a: Vec<u128> = stored(&whole).concat();
    let here: Vec<u128> = stored(&e).concat();
    assert!(
        whole_a.iter().all(|h| here.contains(h)),
        "{whole_a:?} in {here:?}"
    );
    e.check_invariants();
}

#[test]
fn a_chunked_prompt_takes_every_prefix_hit_at_allocation() {
    let e = engine(16, true);
    alloc(&e, "a", &toks(0..13)); // blocks 0..=3, the first 3 registered
    let mut prompt = toks(0..12);
    prompt.extend(100..108); // 3 cached blocks, then 8 new tokens
    let b = alloc_with(&e, "b", &prompt, chunked(2));
    // Slots: the 12 cached tokens plus 2 of the new ones.
    assert_eq!(
        (ids(&b), b.num_tokens, b.num_cached_tokens),
        (vec![0, 1, 2, 4], 14, 12)
    );
    let c = counters(&e);
    assert_eq!((c.full_reused_blocks, c.missed_blocks), (3, 4 + 2));
    assert_eq!((c.cache_tokens, c.input_tokens), (12, 13 + 8));
    assert_eq!((c.alloc_total_blocks, c.alloc_new_blocks), (4 + 4, 4 + 1));
    let b = chunk(&e, "b", 6).unwrap();
    assert_eq!((ids(&b), b.num_tokens), (vec![0, 1, 2, 4, 5], 20));
    e.check_invariants();
}

#[test]
fn a_partial_hit_counts_in_the_first_chunk() {
    let e = engine(8, true);
    alloc(&e, "a", &[1, 2, 3, 4, 5, 6, 7, 8, 9]); // blocks 0, 1 registered; 2 partial
    let b = alloc_with(&e, "b", &[1, 2, 3, 4, 5, 6, 0, 0, 0, 0, 0], chunked(1));
    // 4 shared + 2 copied from block 1, then one new token: 7 slots in blocks 0 and 3.
    assert_eq!(
        (ids(&b), b.num_tokens, b.num_cached_tokens),
        (vec![0, 3], 7, 6)
    );
    let c = counters(&e);
    assert_eq!((c.full_reused_blocks, c.partial_reused_blocks), (1, 1));
    assert_eq!(c.intra_device_copy_blocks, 1);
    let b = chunk(&e, "b", 4).unwrap();
    assert_eq!((ids(&b), b.num_tokens), (vec![0, 3, 4], 11));
    e.check_invariants();
}

#[test]
fn a_waiting_chunk_is_an_extend_first_in_line_and_a_cancel_gives_its_block_back() {
    let e = engine(4, true);
    alloc_with(&e, "a", &toks(0..16), chunked(4)); // block 0
    alloc(&e, "x", &toks(100..112)); // blocks 1, 2, 3 (full, registered)
    let t = waits(e.extend(rid("a"), Append::Prompt(4), true).unwrap());
    let u = waits(e.allocate(rid("y"), toks(200..212), None, true).unwrap());
    let err = changes_nothing(&e, "a", || e.extend(rid("a"), Append::Prompt(1), true));
    assert!(
        matches!(err, Error::InvalidState(_)),
        "one waiting call a request: {err:?}"
    );
    let before = counters(&e);
    // x releases 3, 2, 1 (tail first): the chunk, ahead of y, is granted the LRU block 3;
    // y (3 blocks) waits on.
    e.deallocate(&rid("x")).unwrap();
    assert_eq!(e.drain_notifications().0, vec![t]);
    e.cancel_ticket(t); // gives block 3 back, blank: y's turn
    assert_eq!(e.drain_notifications().0, vec![u]);
    assert_eq!(ids(&e.take_ticket(u).unwrap()), [3, 2, 1]);
    let a = e.get(&rid("a")).unwrap().unwrap();
    assert_eq!((ids(&a), a.num_tokens), (vec![0], 4), "a is as it was");
    let c = counters(&e);
    assert_eq!(
        (c.alloc_total_blocks, c.evicted_blocks),
        (before.alloc_total_blocks + 3, before.evicted_blocks + 3),
        "only y's blocks count; the eviction the cancelled grant made stays"
    );
    e.check_invariants();

    // Again, taken this time: the chunk's block counts as a prompt block.
    let t = waits(e.extend(rid("a"), Append::Prompt(4), true).unwrap());
    e.deallocate(&rid("y")).unwrap(); // releases 1, 2, 3: block 1 is the LRU one
    assert_eq!(e.drain_notifications().0, vec![t]);
    let a = e.take_ticket(t).unwrap();
    assert_eq!((ids(&a), a.num_tokens), (vec![0, 1], 8));
    let after = counters(&e);
    assert_eq!(after.alloc_total_blocks, c.alloc_total_blocks + 1);
    assert_eq!(after.gen_alloc_blocks, 0);
    assert_eq!(
        cached(&e, &toks(0..9)),
        8,
        "the taken chunk registered block 1"
    );
    e.check_invariants();
}

#[test]
fn a_waiting_chunked_allocate_reserves_the_hits_it_finds_when_served() {
    let e = engine(4, true);
    alloc(&e, "p", &toks(0..9)); // blocks 0, 1 registered, 2 partial
    alloc(&e, "x", &toks(100..104)); // block 3, registered
    let mut prompt = toks(0..8);
    prompt.extend(50..58);
    // 8 cached + 2 new = 10 slots: 3 blocks, 1 of them new, none free.
    let t = waits(
        e.allocate_with(rid("a"), prompt.clone(), None, chunked(2), true)
            .unwrap(),
    );
    assert!(
        !e.can_allocate_prompt(&prompt, None, chunked(2)).unwrap(),
        "a call waits"
    );
    let before = counters(&e);
    e.deallocate(&rid("x")).unwrap();
    assert_eq!(e.drain_notifications().0, vec![t]);
    assert_eq!(
        counters(&e).full_reused_blocks,
        before.full_reused_blocks,
        "not yet taken"
    );
    let a = e.take_ticket(t).unwrap();
    assert_eq!(
        (ids(&a), a.num_tokens, a.num_cached_tokens),
        (vec![0, 1, 3], 10, 8)
    );
    let c = counters(&e);
    assert_eq!(c.full_reused_blocks - before.full_reused_blocks, 2);
    assert_eq!(c.missed_blocks - before.missed_blocks, 2);
    assert_eq!(c.input_tokens - before.input_tokens, 8);
    e.check_invariants();
    // A cancelled one gives back its hits and its new block; nothing counts.
    e.deallocate(&rid("a")).unwrap();
    alloc(&e, "x", &toks(100..104)); // takes the free block again
    let t = waits(
        e.allocate_with(rid("a2"), prompt.clone(), None, chunked(2), true)
            .unwrap(),
    );
    let before = e.stats().unwrap();
    e.deallocate(&rid("x")).unwrap();
    assert_eq!(e.drain_notifications().0, vec![t]);
    e.cancel_ticket(t);
    let after = e.stats().unwrap();
    assert_eq!(
        after.counters.full_reused_blocks,
        before.counters.full_reused_blocks
    );
    assert_eq!(after.device.used_blocks, 3, "only p's blocks");
    assert!(e.get(&rid("a2")).unwrap().is_none());
    e.check_invariants();
}

#[test]
fn a_fork_and_a_swap_in_the_middle_of_a_chunked_prefill() {
    let e = engine_with_host(8, 8, true);
    alloc_with(&e, "a", &toks(0..14), chunked(6)); // blocks 0, 1
    let b = e.fork(&rid("a"), rid("b")).unwrap();
    assert_eq!(
        (ids(&b), b.num_tokens, b.num_prompt_tokens),
        (vec![0, 1], 6, 14)
    );
    // The child's chunk copies the shared partial block 1 first (copy-on-write).
    let b = chunk(&e, "b", 8).unwrap();
    assert_eq!((ids(&b), b.num_tokens), (vec![0, 2, 3, 4], 14));
    assert_eq!(counters(&e).intra_device_copy_blocks, 1);
    e.check_invariants();
    // The parent swaps out and in with its prompt pending, then finishes it.
    settle(&e, e.swap_out(&rid("a")).unwrap());
    let a = settle(&e, e.swap_in(&rid("a")).unwrap());
    assert_eq!((a.num_tokens, a.num_prompt_tokens), (6, 14));
    let a = chunk(&e, "a", 8).unwrap();
    assert_eq!(a.num_tokens, 14);
    assert_eq!(cached(&e, &toks(0..13)), 12);
    e.check_invariants();
}

// ----- truncate ---------------------------------------------------------------------------

#[test]
fn truncate_frees_the_blocks_past_the_end_and_unindexes_a_block_only_it_holds() {
    let e = engine(8, true);
    alloc(&e, "a", &toks(0..10)); // blocks 0, 1 registered; 2 holds 8, 9
    let hashes = stored(&e).concat();
    assert_eq!(hashes.len(), 2);
    let a = e.truncate(&rid("a"), 6).unwrap();
    assert_eq!((ids(&a), a.num_tokens), (vec![0, 1], 6));
    assert_eq!(counters(&e).truncated_blocks, 1);
    // Block 1 held tokens 4..8 under its hash; only a holds it, so it leaves the index.
    assert_eq!(removed(&e), vec![vec![hashes[1]]]);
    assert_eq!(cached(&e, &toks(0..9)), 4);
    let s = e.stats().unwrap();
    assert_eq!((s.device.used_blocks, s.device.evictable_blocks), (2, 0));
    e.check_invariants();
    // Appends write block 1 in place (no copy) and register it under its new tokens.
    let a = extend(&e, "a", &[50, 51, 52]);
    assert_eq!((ids(&a), a.num_tokens), (vec![0, 1, 3], 9));
    assert_eq!(counters(&e).intra_device_copy_blocks, 0);
    assert_eq!(stored(&e).len(), 1);
    let b = alloc(&e, "b", &[0, 1, 2, 3, 4, 5, 50, 51, 9]);
    assert_eq!((ids(&b), b.num_cached_tokens), (vec![0, 1, 4], 8));
    // Of the old tokens 4..8 of block 1, only 4, 5 are still there (a partial match).
    assert_eq!(cached(&e, &toks(0..9)), 6);
    e.check_invariants();
}

#[test]
fn truncate_into_a_shared_block_keeps_it_for_the_others_and_copies_it_on_append() {
    let e = engine(8, true);
    alloc(&e, "a", &toks(0..9)); // blocks 0, 1 registered, 2
    let a_data = fill(&e, "a", 0, 9, 7);
    let b = alloc(&e, "b", &toks(0..10));
    assert_eq!(ids(&b), [0, 1, 3]);
    let b = e.truncate(&rid("b"), 6).unwrap();
    assert_eq!(ids(&b), [0, 1]);
    assert!(removed(&e).is_empty(), "a still holds block 1 full");
    assert_eq!(cached(&e, &toks(0..9)), 8);
    // Blank blocks are 4..=7 then 3 (released last): the copy of block 1 takes 4.
    let b = extend(&e, "b", &[60]);
    assert_eq!((ids(&b), b.num_tokens), (vec![0, 4], 7));
    let c = counters(&e);
    assert_eq!((c.intra_device_copy_blocks, c.truncated_blocks), (1, 1));
    // b kept a's K/V of positions 0..6; a's block 1 is untouched by b's write at 6.
    assert_eq!(read(&e, "b", 0, 6), a_data[..6 * 16]);
    let k = vec![0xAB; 16];
    e.write_kv(&rid("b"), 0, 6, &k, &k).unwrap();
    assert_eq!(read(&e, "a", 0, 9), a_data);
    let c2 = alloc(&e, "c", &toks(0..9));
    assert_eq!((ids(&c2), c2.num_cached_tokens), (vec![0, 1, 5], 8));
    e.check_invariants();
}

#[test]
fn an_indexed_tail_is_copied_before_an_append_even_once_the_others_left() {
    let e = engine(8, true);
    alloc(&e, "a", &toks(0..9)); // blocks 0, 1 registered, 2
    alloc(&e, "b", &toks(0..9)); // shares 0, 1; block 3
    e.truncate(&rid("b"), 6).unwrap(); // frees 3; block 1 shared, stays indexed
    e.deallocate(&rid("a")).unwrap(); // b alone holds block 1, still indexed
    e.check_invariants();
    let b = extend(&e, "b", &[60]);
    assert_eq!(
        ids(&b),
        [0, 4],
        "block 1 was copied (blanks 4..=7, then 3, 2)"
    );
    assert_eq!(counters(&e).intra_device_copy_blocks, 1);
    // Block 1, released by the copy, is evictable with the K/V its hash names.
    let s = e.stats().unwrap();
    assert_eq!(s.device.evictable_blocks, 1);
    assert_eq!(cached(&e, &toks(0..9)), 8);
    e.check_invariants();
}

#[test]
fn a_waiting_append_to_an_indexed_tail_still_copies_it_when_the_others_left_meanwhile() {
    let e = engine(6, true);
    alloc(&e, "a", &toks(0..9)); // blocks 0, 1 registered, 2
    let a_data = fill(&e, "a", 0, 9, 3);
    alloc(&e, "b", &toks(0..9)); // shares 0, 1; block 3
    e.truncate(&rid("b"), 6).unwrap(); // block 3 back blank; block 1 shared and indexed
    alloc(&e, "x", &toks(100..112)); // blanks 4, 5, then 3
    let t = waits(e.extend(rid("b"), Append::Ids(vec![60]), true).unwrap());
    e.deallocate(&rid("x")).unwrap(); // releases 3, 5, 4: the copy is granted block 3
    assert_eq!(e.drain_notifications().0, vec![t]);
    e.deallocate(&rid("a")).unwrap(); // b alone holds block 1 now, still indexed
    let b = e.take_ticket(t).unwrap();
    assert_eq!(
        (ids(&b), b.num_tokens),
        (vec![0, 3], 7),
        "block 1 is copied, not written"
    );
    let k = vec![0xCD; 16];
    e.write_kv(&rid("b"), 0, 6, &k, &k).unwrap();
    // Block 1 still holds a's K/V for the tokens its hash names.
    let c = alloc(&e, "c", &toks(0..9));
    assert_eq!((ids(&c), c.num_cached_tokens), (vec![0, 1, 2], 8));
    assert_eq!(read(&e, "c", 0, 8), a_data[..8 * 16]);
    e.check_invariants();
}

#[test]
fn truncate_and_re_extend_a_chunked_prefill_uses_the_prompt_again() {
    let e = engine(8, true);
    alloc_with(&e, "a", &toks(0..14), chunked(10)); // blocks 0, 1 registered, 2
    let hashes = stored(&e).concat();
    let a = e.truncate(&rid("a"), 6).unwrap();
    assert_eq!(
        (ids(&a), a.num_tokens, a.num_prompt_tokens),
        (vec![0, 1], 6, 14)
    );
    assert_eq!(removed(&e), vec![vec![hashes[1]]]);
    // Generated tokens are still refused: the prompt has tokens without slots.
    let err = changes_nothing(&e, "a", || e.extend(rid("a"), Append::Ids(vec![1]), false));
    assert!(matches!(err, Error::InvalidState(_)), "{err:?}");
    let a = chunk(&e, "a", 8).unwrap();
    assert_eq!((ids(&a), a.num_tokens), (vec![0, 1, 3, 4], 14));
    let again = stored(&e).concat();
    assert_eq!(
        again[0], hashes[1],
        "block 1 registered again under the prompt's hash"
    );
    assert_eq!(again.len(), 2);
    assert_eq!(cached(&e, &toks(0..13)), 12);
    e.check_invariants();
}

#[test]
fn truncate_to_a_block_boundary_keeps_every_kept_block_cached() {
    let e = engine(8, true);
    alloc(&e, "a", &toks(0..10));
    e.drain_events().unwrap();
    let a = e.truncate(&rid("a"), 8).unwrap();
    assert_eq!((ids(&a), a.num_tokens), (vec![0, 1], 8));
    assert!(removed(&e).is_empty());
    let a = extend(&e, "a", &[70]);
    assert_eq!(ids(&a), [0, 1, 3], "block 2 went back blank, behind 3..=7");
    assert_eq!(cached(&e, &toks(0..9)), 8);
    e.check_invariants();
}

#[test]
fn bad_truncates_change_nothing() {
    let e = engine_with_host(4, 4, true);
    alloc(&e, "a", &toks(0..6));
    for n in [0, 7] {
        let err = changes_nothing(&e, "a", || e.truncate(&rid("a"), n));
        assert!(matches!(err, Error::InvalidArgument(_)), "{n}: {err:?}");
    }
    let err = changes_nothing(&e, "a", || e.truncate(&rid("nobody"), 1));
    assert!(matches!(err, Error::UnknownRequest(_)), "{err:?}");
    // An open ticket of the request refuses it.
    alloc(&e, "x", &toks(100..108));
    let t = waits(e.extend(rid("a"), Append::Ids(toks(6..12)), true).unwrap());
    let err = changes_nothing(&e, "a", || e.truncate(&rid("a"), 2));
    assert!(matches!(err, Error::InvalidState(_)), "{err:?}");
    e.cancel_ticket(t);
    // So does a swapped-out sequence.
    settle(&e, e.swap_out(&rid("a")).unwrap());
    let err = changes_nothing(&e, "a", || e.truncate(&rid("a"), 2));
    assert!(matches!(err, Error::InvalidState(_)), "{err:?}");
    settle(&e, e.swap_in(&rid("a")).unwrap());
    assert_eq!(e.truncate(&rid("a"), 2).unwrap().num_tokens, 2);
    e.check_invariants();
}

#[test]
fn a_truncated_block_whose_tokens_no_tier_knows_stops_caching() {
    let e = engine(8, true);
    alloc(&e, "a", &[1, 2, 3]);
    alloc(&e, "b", &[1, 2, 3]);
    extend(&e, "a", &[4]); // block 0 registered
    extend(&e, "b", &[4]); // the same hash: b's block 1 stays unindexed
    e.deallocate(&rid("a")).unwrap();
    e.gc(Some(1.0)).unwrap(); // evicts block 0: no tier knows [1, 2, 3, 4] now
    let b = e.truncate(&rid("b"), 2).unwrap();
    assert_eq!((ids(&b), b.num_tokens), (vec![1], 2));
    extend(&e, "b", &[3, 4, 5]);
    assert_eq!(
        cached(&e, &[1, 2, 3, 4, 5]),
        0,
        "b's block 1 is never registered again"
    );
    e.check_invariants();
}

#[test]
fn truncate_of_a_sequence_whose_ids_are_unknown_or_uncached() {
    for prefix in [true, false] {
        let e = engine(8, prefix);
        alloc(&e, "a", &toks(0..5)); // blocks 0, 1
        e.extend(rid("a"), Append::Count(4), false).unwrap(); // 9 tokens, the last 4 unknown
        let a = e.truncate(&rid("a"), 7).unwrap();
        assert_eq!(
            (ids(&a), a.num_tokens),
            (vec![0, 1], 7),
            "prefix cache {prefix}"
        );
        let a = extend(&e, "a", &[1, 2, 3]);
        assert_eq!((ids(&a), a.num_tokens), (vec![0, 1, 3], 10));
        assert_eq!(counters(&e).truncated_blocks, 1);
        e.check_invariants();
    }
}

// ----- preempted requests -------------------------------------------------------------------

#[test]
fn a_preempted_request_is_counted_apart_from_the_hit_rates() {
    let e = engine(8, true);
    alloc(&e, "a", &toks(0..9));
    e.deallocate(&rid("a")).unwrap();
    let before = counters(&e);
    let a = alloc_with(&e, "a", &toks(0..9), preempted());
    assert_eq!((ids(&a), a.num_cached_tokens), (vec![0, 1, 3], 8));
    let c = counters(&e);
    assert_eq!(
        (
            c.preempted_requests,
            c.preempted_prompt_tokens,
            c.preempted_cache_tokens
        ),
        (1, 9, 8)
    );
    for (name, was, now) in [
        (
            "full_reused",
            before.full_reused_blocks,
            c.full_reused_blocks,
        ),
        (
            "partial_reused",
            before.partial_reused_blocks,
            c.partial_reused_blocks,
        ),
        ("missed", before.missed_blocks, c.missed_blocks),
        ("input_tokens", before.input_tokens, c.input_tokens),
        ("cache_tokens", before.cache_tokens, c.cache_tokens),
    ] {
        assert_eq!(was, now, "{name} counted a preempted request");
    }
    assert_eq!(c.alloc_total_blocks - before.alloc_total_blocks, 3);
    assert_eq!(c.alloc_new_blocks - before.alloc_new_blocks, 1);
    e.check_invariants();
}

// ----- lookup and can_allocate --------------------------------------------------------------

#[test]
fn lookup_prefix_reports_each_tier() {
    let e = engine_with_host(3, 4, true);
    alloc(&e, "a", &toks(0..9));
    // A partly matching device block counts as device tokens.
    let m = e.lookup_prefix(&[0, 1, 2, 3, 4, 5, 9, 9, 9], None).unwrap();
    assert_eq!(
        (m.device_tokens, m.host_tokens, m.num_cached_tokens()),
        (4 + 2, 0, 6)
    );
    e.deallocate(&rid("a")).unwrap();
    alloc(&e, "b", &toks(500..512)); // evicts blocks 1, 0: offloaded to the host
    let m = e.lookup_prefix(&toks(0..9), None).unwrap();
    assert_eq!((m.device_tokens, m.host_tokens, m.disk_tokens), (0, 8, 0));
    e.deallocate(&rid("b")).unwrap();
    alloc(&e, "d", &toks(0..5)); // onboards A0 into a device block
    let m = e.lookup_prefix(&toks(0..9), None).unwrap();
    assert_eq!(
        (m.device_tokens, m.host_tokens, m.num_cached_tokens()),
        (4, 4, 8)
    );

    e.check_invariants();
}

#[test]
fn can_allocate_a_prompt_counts_its_hits_and_its_first_chunk() {
    let e = engine(4, true);
    alloc(&e, "a", &toks(0..12)); // blocks 0, 1, 2, all registered; 1 block free
    let opts = AllocOpts::default();
    assert!(
        e.can_allocate_prompt(&toks(0..13), None, opts).unwrap(),
        "3 hits + 1 new"
    );
    assert!(!e.can_allocate(13).unwrap(), "4 blocks with nothing cached");
    assert!(
        !e.can_allocate_prompt(&toks(0..17), None, opts).unwrap(),
        "5 blocks > 4"
    );
    let other = toks(100..120);
    assert!(e.can_allocate_prompt(&other, None, chunked(4)).unwrap());
    assert!(!e.can_allocate_prompt(&other, None, chunked(5)).unwrap());
    // Salts isolate: under another salt nothing is cached.
    let salt = ferrumkv_core::prefix::Salt::Str("t".into());
    assert!(!e
        .can_allocate_prompt(&toks(0..13), Some(&salt), opts)
        .unwrap());
    let r = e.can_allocate_prompt(&[], None, opts);
    assert!(matches!(r, Err(Error::InvalidArgument(_))), "{r:?}");
    // What it answered is what allocate does.
    let b = alloc(&e, "b", &toks(0..13));
    assert_eq!(ids(&b), [0, 1, 2, 3]);
    e.check_invariants();
}

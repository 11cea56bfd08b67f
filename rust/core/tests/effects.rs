//! The commit path: state plans copies, the engine runs them in order, and a copy that fails
//! (a lost device) stops the engine from serving instead of panicking or serving bytes nobody
//! wrote.

mod common;

use common::*;
use ferrumkv_core::sequence::Append;
use ferrumkv_core::{Error, Outcome};

#[test]
fn an_offload_then_onboard_in_one_call_sees_the_offloaded_bytes() {
    // 3 device blocks and a host tier. "b" onboards a's blocks from the host into device
    // blocks it takes by evicting (offloading) c's: within that one call, each offload copy
    // must run before the onboard copy that overwrites its block.
    let e = engine_with_host(3, 8, true);
    let a: Vec<u32> = (1..=9).collect();
    let c: Vec<u32> = (21..=29).collect();
    alloc(&e, "a", &a);
    let kv_a = fill(&e, "a", 0, 9, 7);
    e.deallocate(&rid("a")).unwrap();
    alloc(&e, "c", &c); // offloads a's 2 cached blocks
    let kv_c = fill(&e, "c", 0, 9, 99);
    e.deallocate(&rid("c")).unwrap();
    let b = alloc(&e, "b", &a); // offloads c's blocks, onboards a's into them
    assert_eq!(b.num_cached_tokens, 8);
    assert_eq!(read(&e, "b", 0, 8), kv_a[..8 * 16].to_vec());
    e.deallocate(&rid("b")).unwrap();
    let d = alloc(&e, "d", &c);
    assert_eq!(d.num_cached_tokens, 8);
    assert_eq!(read(&e, "d", 0, 8), kv_c[..8 * 16].to_vec());
    e.check_invariants();
}

#[test]
fn a_failed_bookkeeping_copy_stops_the_engine_and_answers_every_waiter() {
    let e = engine_with_host(3, 8, true);
    alloc(&e, "a", &(1..=8).collect::<Vec<_>>());
    e.deallocate(&rid("a")).unwrap(); // 2 cached blocks
    alloc(&e, "x", &[60, 61, 62]);
    let waiter = match e
        .allocate(rid("w"), (70..82).collect(), None, true)
        .unwrap()
    {
        Outcome::Waiting(t) => t,
        Outcome::Ready(v) => panic!("expected a wait, got {v:?}"),
    };
    e.inject_device_fault();
    // gc offloads the cached blocks to the host tier: its copies fail.
    let err = e.gc(Some(1.0)).unwrap_err();
    assert!(matches!(err, Error::CopyFailed(_)), "{err:?}");
    let (done, _) = e.drain_notifications();
    assert!(done.contains(&waiter), "the waiter was not answered");
    assert!(matches!(e.take_ticket(waiter), Err(Error::CopyFailed(_))));
    // Nothing is served from now on, and nothing panics.
    assert!(matches!(
        e.extend(rid("x"), Append::Ids(vec![1]), false),
        Err(Error::CopyFailed(_))
    ));
    assert!(matches!(e.stats(), Err(Error::CopyFailed(_))));
    e.close();
    assert!(matches!(e.stats(), Err(Error::Closed)));
}

#[test]
fn a_commit_without_copies_is_untouched_by_a_pending_device_fault() {
    let e = engine(4, true);
    e.inject_device_fault();
    alloc(&e, "a", &[1, 2, 3]); // no copies: nothing can fail
    extend(&e, "a", &[4]);
    e.check_invariants();
}

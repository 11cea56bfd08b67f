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

/// `n` device blocks and a host tier holding a's 2 full blocks (written with `kv`); the
/// device tier is empty.
fn a_on_the_host(n: i64) -> (ferrumkv_core::Engine, Vec<u32>, Vec<u8>) {
    let e = engine_with_host(n, 8, true);
    let a: Vec<u32> = (1..=9).collect();
    alloc(&e, "a", &a);
    let kv = fill(&e, "a", 0, 9, 7);
    e.deallocate(&rid("a")).unwrap();
    e.gc(Some(1.0)).unwrap(); // offloads a's cached blocks, frees the device tier
    e.check_invariants();
    (e, a, kv)
}

#[test]
fn a_failed_fill_fails_only_its_call_and_gives_everything_back() {
    let (e, a, kv) = a_on_the_host(3);
    let before = e.stats().unwrap();
    e.inject_device_fault();
    // The onboard copy fails outside the lock: nothing was published, so only this call
    // fails and the engine goes on serving.
    let err = e.allocate(rid("b"), a.clone(), None, false).unwrap_err();
    assert!(matches!(err, Error::CopyFailed(_)), "{err:?}");
    e.check_invariants();
    let after = e.stats().unwrap();
    assert_eq!(after.device.free_blocks, before.device.free_blocks);
    assert_eq!(after.host.free_blocks, before.host.free_blocks);
    assert_eq!(
        after.counters.onboard_blocks,
        before.counters.onboard_blocks
    );
    assert!(!e.contains(&rid("b")).unwrap());
    // The host copies are intact and still cached: a retry is served them, byte for byte.
    let b = alloc(&e, "b", &a);
    assert_eq!(b.num_cached_tokens, 8);
    assert_eq!(read(&e, "b", 0, 8), kv[..8 * 16].to_vec());
    assert_eq!(e.stats().unwrap().counters.onboard_blocks, 2);
    e.check_invariants();
}

/// Waits until an allocation on another thread has staged its fill (its blocks are taken
/// from the 4 free ones) while `pause_fills` holds it.
fn held_until_staged(e: &ferrumkv_core::Engine) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while e.stats().unwrap().device.free_blocks == 4 {
        assert!(
            std::time::Instant::now() < deadline,
            "the fill never started"
        );
        std::thread::yield_now();
    }
}

#[test]
fn a_fill_runs_without_the_lock_and_its_request_stays_invisible_until_published() {
    let (e, a, kv) = a_on_the_host(4);
    let e = std::sync::Arc::new(e);
    e.pause_fills(true);
    let bg = {
        let (e, a) = (e.clone(), a.clone());
        std::thread::spawn(
            move || match e.allocate(rid("b"), a, None, false).unwrap() {
                Outcome::Ready(v) => v,
                Outcome::Waiting(t) => panic!("unexpected wait (ticket {t})"),
            },
        )
    };
    // Wait until b's fill is staged (its blocks are taken), then call in while it is held.
    held_until_staged(&e);
    e.check_invariants(); // the staged admission owns its blocks and pins
    assert!(
        !e.contains(&rid("b")).unwrap(),
        "published before its fill ran"
    );
    assert!(matches!(
        e.allocate(rid("b"), vec![1], None, false),
        Err(Error::DuplicateRequest(_))
    ));
    let c = alloc(&e, "c", &[1, 2, 3]); // other calls go on meanwhile
    assert_eq!(c.num_cached_tokens, 0, "a hit on blocks still being filled");
    assert!(!e.reset_prefix_cache().unwrap());
    e.pause_fills(false);
    let b = bg.join().unwrap();
    assert_eq!(b.num_cached_tokens, 8);
    assert_eq!(read(&e, "b", 0, 8), kv[..8 * 16].to_vec());
    e.check_invariants();
}

#[test]
fn a_granted_fill_runs_when_taken_and_a_cancelled_one_copies_nothing() {
    let (e, a, kv) = a_on_the_host(3);
    alloc(&e, "x", &(100..112).collect::<Vec<_>>()); // the whole device tier
    let t = match e.allocate(rid("b"), a.clone(), None, true).unwrap() {
        Outcome::Waiting(t) => t,
        Outcome::Ready(v) => panic!("expected a wait, got {v:?}"),
    };
    e.deallocate(&rid("x")).unwrap(); // grants b: its fill is staged, not run
    assert!(e.drain_notifications().0.contains(&t));
    e.check_invariants();
    assert_eq!(e.stats().unwrap().counters.onboard_blocks, 0);
    e.cancel_ticket(t);
    e.check_invariants();
    assert_eq!(
        e.stats().unwrap().counters.onboard_blocks,
        0,
        "a cancel copied"
    );
    // Granted again and taken: the fill runs at the take.
    let t = match e.allocate(rid("b"), a.clone(), None, true).unwrap() {
        Outcome::Waiting(t) => panic!("nothing should wait now (ticket {t})"),
        Outcome::Ready(v) => v,
    };
    assert_eq!(t.num_cached_tokens, 8);
    assert_eq!(read(&e, "b", 0, 8), kv[..8 * 16].to_vec());
    e.deallocate(&rid("b")).unwrap();
    alloc(&e, "x", &(100..112).collect::<Vec<_>>());
    let t = match e.allocate(rid("c"), a.clone(), None, true).unwrap() {
        Outcome::Waiting(t) => t,
        Outcome::Ready(v) => panic!("expected a wait, got {v:?}"),
    };
    e.deallocate(&rid("x")).unwrap();
    assert!(e.drain_notifications().0.contains(&t));
    let c = e.take_ticket(t).unwrap();
    assert_eq!(c.num_cached_tokens, 8);
    assert_eq!(read(&e, "c", 0, 8), kv[..8 * 16].to_vec());
    e.check_invariants();
}

#[test]
fn a_deallocate_during_a_fill_withdraws_the_allocation() {
    // The shuttle model check found a take whose fill ran while the request was deallocated:
    // the deallocate said "unknown request" and the sequence appeared afterwards.
    let (e, a, _) = a_on_the_host(4);
    let e = std::sync::Arc::new(e);
    e.pause_fills(true);
    let bg = {
        let (e, a) = (e.clone(), a.clone());
        std::thread::spawn(move || e.allocate(rid("b"), a, None, false))
    };
    held_until_staged(&e);
    e.deallocate(&rid("b")).unwrap();
    e.pause_fills(false);
    let r = bg.join().unwrap();
    assert!(matches!(r, Err(Error::InvalidState(_))), "{r:?}");
    assert!(!e.contains(&rid("b")).unwrap());
    assert_eq!(e.stats().unwrap().device.free_blocks, 4);
    e.check_invariants();
}

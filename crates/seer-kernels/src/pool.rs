//! seer-kernels' own thread pool: `threads − 1` workers plus the calling thread.
//!
//! Built for many short products (a decode step is hundreds of them) on a machine that
//! may be busy with other work:
//! - the caller works too, so a product starts at once;
//! - chunks are claimed one at a time from a shared counter, so a thread the OS has
//!   descheduled simply takes fewer chunks: nobody waits at a barrier for a thread that
//!   has not started (a descheduled worker costs a time slice to barrier pools);
//! - idle workers spin for a few tens of microseconds, enough to bridge the gaps between
//!   the products of a decode step, then sleep on a condition variable, so the pool costs
//!   nothing between requests.
//!
//! Protocol, for one job at a time: the caller publishes the job and opens it (odd
//! `epoch`), claims chunks alongside the workers, waits until every chunk has finished,
//! closes the job (even `epoch`), and waits until no worker is inside it (`active` = 0).
//! A worker announces itself in `active` and then re-checks the epoch; with both sides
//! sequentially consistent, either the caller sees the worker and waits for it, or the
//! worker sees the job closed and never touches it.

use std::any::Any;
use std::cell::{Cell, UnsafeCell};
use std::ops::Range;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How long an idle worker spins before it sleeps.
const SPIN: Duration = Duration::from_micros(50);

type Task = dyn Fn(Range<usize>) + Sync;

struct Shared {
    /// Odd while a job is open.
    epoch: AtomicUsize,
    /// The open job's closure (its lifetime erased; valid while the job is open or any
    /// worker is active).
    task: UnsafeCell<*const Task>,
    chunks: AtomicUsize,
    next: AtomicUsize,
    /// Chunks not yet finished.
    pending: AtomicUsize,
    /// Workers inside the current job.
    active: AtomicUsize,
    /// A caller owns the job slot.
    busy: AtomicBool,
    sleepers: AtomicUsize,
    lock: Mutex<()>,
    wake: Condvar,
    panic: Mutex<Option<Box<dyn Any + Send>>>,
}

// SAFETY: `task` is written only by the caller owning `busy`, while no worker is active
// and no job is open (see the protocol above); the closure it points to is `Sync`.
unsafe impl Sync for Shared {}

pub(crate) struct Pool {
    shared: &'static Shared,
    threads: usize,
}

thread_local! {
    /// Set on the pool's workers: a product started from inside a job runs inline.
    static IN_POOL: Cell<bool> = const { Cell::new(false) };
}

/// Threads for products: `RAYON_NUM_THREADS` (which `seer --threads` sets), else the CPUs
/// this process may run on.
fn thread_count() -> usize {
    std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1))
}

pub(crate) fn global() -> &'static Pool {
    static POOL: OnceLock<Pool> = OnceLock::new();
    POOL.get_or_init(|| Pool::new(thread_count()))
}

impl Pool {
    fn new(threads: usize) -> Pool {
        let shared: &'static Shared = Box::leak(Box::new(Shared {
            epoch: AtomicUsize::new(0),
            task: UnsafeCell::new(std::ptr::null::<fn(Range<usize>)>() as *const Task),
            chunks: AtomicUsize::new(0),
            next: AtomicUsize::new(0),
            pending: AtomicUsize::new(0),
            active: AtomicUsize::new(0),
            busy: AtomicBool::new(false),
            sleepers: AtomicUsize::new(0),
            lock: Mutex::new(()),
            wake: Condvar::new(),
            panic: Mutex::new(None),
        }));
        let mut started = 1;
        for k in 1..threads {
            let spawned = std::thread::Builder::new().name(format!("seer-kernels-{k}")).spawn(move || worker(shared));
            if spawned.is_ok() {
                started += 1;
            }
        }
        Pool { shared, threads: started }
    }

    pub(crate) fn threads(&self) -> usize {
        self.threads
    }

    /// Calls `f` on `0..1`, `1..2`, …, `n - 1..n`, spread over the pool and the calling
    /// thread; returns when all calls have returned. A panic in `f` is re-raised here.
    pub(crate) fn run(&self, n: usize, f: &(dyn Fn(Range<usize>) + Sync)) {
        let s = self.shared;
        if n <= 1 || self.threads <= 1 || IN_POOL.with(|p| p.get()) || s.busy.swap(true, SeqCst) {
            // One chunk, no workers, a nested call, or another caller owns the pool: inline.
            return f(0..n);
        }
        // SAFETY: the lifetime is erased only for the duration of this call: the job is
        // closed and no worker is inside it before we return.
        let task: *const Task = unsafe { std::mem::transmute::<&(dyn Fn(Range<usize>) + Sync), &'static Task>(f) };
        unsafe { *s.task.get() = task };
        s.chunks.store(n, SeqCst);
        s.next.store(0, SeqCst);
        s.pending.store(n, SeqCst);
        s.epoch.fetch_add(1, SeqCst); // open
        if s.sleepers.load(SeqCst) > 0 {
            let _g = s.lock.lock().unwrap_or_else(|e| e.into_inner());
            s.wake.notify_all();
        }
        let mine = catch_unwind(AssertUnwindSafe(|| claim(s, f)));
        let mut spins = 0u32;
        while s.pending.load(SeqCst) != 0 {
            backoff(&mut spins);
        }
        s.epoch.fetch_add(1, SeqCst); // close
        while s.active.load(SeqCst) != 0 {
            backoff(&mut spins);
        }
        let theirs = s.panic.lock().unwrap_or_else(|e| e.into_inner()).take();
        s.busy.store(false, SeqCst);
        if let Err(p) = mine {
            resume_unwind(p);
        }
        if let Some(p) = theirs {
            resume_unwind(p);
        }
    }
}

/// Runs chunks until none are left.
fn claim(s: &Shared, f: &(dyn Fn(Range<usize>) + Sync)) {
    let n = s.chunks.load(SeqCst);
    loop {
        let c = s.next.fetch_add(1, SeqCst);
        if c >= n {
            return;
        }
        let r = catch_unwind(AssertUnwindSafe(|| f(c..c + 1)));
        if let Err(p) = r {
            s.panic.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert(p);
        }
        s.pending.fetch_sub(1, SeqCst);
    }
}

fn backoff(spins: &mut u32) {
    *spins += 1;
    if *spins < 1 << 14 {
        std::hint::spin_loop();
    } else {
        std::thread::yield_now();
    }
}

fn worker(s: &'static Shared) {
    IN_POOL.with(|p| p.set(true));
    let mut seen = s.epoch.load(SeqCst);
    loop {
        let e = wait_for_job(s, seen);
        seen = e;
        s.active.fetch_add(1, SeqCst);
        if s.epoch.load(SeqCst) == e {
            // SAFETY: the job is open and we are counted active, so the caller has not
            // returned and will not before we leave.
            let f = unsafe { &**s.task.get() };
            claim(s, f);
        }
        s.active.fetch_sub(1, SeqCst);
    }
}

/// Waits (spinning, then sleeping) for an open job other than epoch `seen`.
fn wait_for_job(s: &Shared, seen: usize) -> usize {
    let ready = |e: usize| e % 2 == 1 && e != seen;
    let start = Instant::now();
    let mut k = 0u32;
    loop {
        let e = s.epoch.load(SeqCst);
        if ready(e) {
            return e;
        }
        std::hint::spin_loop();
        k += 1;
        if k.is_multiple_of(64) && start.elapsed() > SPIN {
            break;
        }
    }
    s.sleepers.fetch_add(1, SeqCst);
    let mut g = s.lock.lock().unwrap_or_else(|e| e.into_inner());
    let e = loop {
        let e = s.epoch.load(SeqCst);
        if ready(e) {
            break e;
        }
        g = s.wake.wait(g).unwrap_or_else(|e| e.into_inner());
    };
    drop(g);
    s.sleepers.fetch_sub(1, SeqCst);
    e
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;

    #[test]
    fn every_chunk_runs_once() {
        let pool = Pool::new(3);
        for n in [0, 1, 2, 7, 100, 1000] {
            let hits: Vec<AtomicU64> = (0..n).map(|_| AtomicU64::new(0)).collect();
            pool.run(n, &|r: Range<usize>| {
                for i in r {
                    hits[i].fetch_add(1, SeqCst);
                }
            });
            assert!(hits.iter().all(|h| h.load(SeqCst) == 1), "n = {n}");
        }
    }

    #[test]
    fn many_jobs_in_a_row_and_after_sleeping() {
        let pool = Pool::new(2);
        let total = AtomicU64::new(0);
        for round in 0..2000 {
            if round % 500 == 0 {
                std::thread::sleep(Duration::from_millis(2)); // let the workers fall asleep
            }
            pool.run(16, &|r: Range<usize>| {
                total.fetch_add(r.len() as u64, SeqCst);
            });
        }
        assert_eq!(total.load(SeqCst), 2000 * 16);
    }

    #[test]
    fn a_panic_reaches_the_caller_and_the_pool_still_works() {
        let pool = Pool::new(2);
        let r = catch_unwind(AssertUnwindSafe(|| {
            pool.run(8, &|r: Range<usize>| {
                if r.start == 5 {
                    panic!("chunk 5");
                }
            })
        }));
        assert!(r.is_err());
        let count = AtomicU64::new(0);
        pool.run(8, &|_| {
            count.fetch_add(1, SeqCst);
        });
        assert_eq!(count.load(SeqCst), 8);
    }

    #[test]
    fn two_callers_at_once() {
        let pool: &'static Pool = Box::leak(Box::new(Pool::new(2)));
        std::thread::scope(|sc| {
            for _ in 0..2 {
                sc.spawn(|| {
                    for _ in 0..500 {
                        let count = AtomicU64::new(0);
                        pool.run(10, &|r: Range<usize>| {
                            count.fetch_add(r.len() as u64, SeqCst);
                        });
                        assert_eq!(count.load(SeqCst), 10);
                    }
                });
            }
        });
    }
}

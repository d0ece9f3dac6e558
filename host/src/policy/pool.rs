//! Policy calls run on threads of their own, one per CPU, behind an async semaphore.
//!
//! Why: a policy call is CPU work (a fresh instance, the guest's code, up to its whole deadline
//! when it loops) and may do blocking I/O (`kv-set` persists the policy's store). Run on a Tokio
//! worker, a policy that burned its 10 ms deadline on every decision of a backlog took the
//! workers from everything else: inbound connect+greeting+NOOP went from 0.6 ms to a p50 of
//! 143 ms (issue 10). Here a caller waits for a permit *asynchronously* (its task yields, the
//! worker serves other tasks), and the call then runs on one of the pool's threads.
//!
//! One thread per CPU, and one call per thread, is also what the deadline needs: a call's
//! budget is charged in CPU time of its thread, and a call waiting for a permit has not started
//! its store, so queueing never counts against it (this replaces the former blocking gate).

use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};

type Job = Box<dyn FnOnce() + Send>;

/// The threads that run policy calls.
#[derive(Debug)]
pub struct CallPool {
    permits: Arc<Semaphore>,
    jobs: Mutex<Option<mpsc::Sender<Job>>>,
    threads: usize,
}

/// Why a call did not run to its end.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PoolError {
    /// The pool's threads are gone (shutdown) or could not be started.
    #[error("the policy call pool is not running")]
    Stopped,
    /// The call panicked on the host side.
    #[error("the policy call panicked")]
    Panicked,
}

/// How much nicer than the relay's other threads a pool thread is (`nice` 5: CFS weight 335
/// against 1024).
///
/// Why: with one pool thread per CPU, a policy burning its deadline on every decision keeps
/// every core busy, and an inbound session's task then waits for the kernel to hand a core
/// back to its Tokio worker. At a lower priority the kernel runs a woken worker first: in the
/// isolation bench (`PW_CASE=policy`, dev profile, one sitting, 2 cores) inbound p99 was
/// 6.6 and 7.8 ms at nice 0, 4.9, 5.0 and 6.0 ms at nice 5. A call's budget is charged in CPU time of
/// its own thread, so running less often never fails a decision; and at weight 335 a pool
/// thread still gets a quarter of a core against busy workers, far inside the wall-clock
/// ceiling that reports a starved call.
pub const NICENESS: i32 = 5;

/// Lowers the calling thread's scheduling priority by [`NICENESS`] (Linux: `setpriority` on a
/// thread id applies to that thread alone). A failure only costs latency, so it is logged.
fn lower_priority() {
    #[cfg(target_os = "linux")]
    {
        let tid = rustix::thread::gettid();
        let current = rustix::process::getpriority_process(Some(tid)).unwrap_or(0);
        if let Err(error) = rustix::process::setpriority_process(Some(tid), current + NICENESS) {
            tracing::warn!(%error, "cannot lower the policy thread's priority");
        }
    }
}

impl CallPool {
    /// A pool of `threads` threads (at least one).
    pub fn new(threads: usize) -> std::io::Result<Self> {
        let threads = threads.max(1);
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        for n in 0..threads {
            let rx = rx.clone();
            std::thread::Builder::new().name(format!("policy-{n}")).spawn(move || {
                lower_priority();
                loop {
                    // The lock is held only to take one job; a poisoned lock still guards a
                    // usable receiver (nothing panics while holding it).
                    let job = rx.lock().unwrap_or_else(|e| e.into_inner()).recv();
                    match job {
                        Ok(job) => job(),
                        Err(_) => return,
                    }
                }
            })?;
        }
        Ok(CallPool {
            permits: Arc::new(Semaphore::new(threads)),
            jobs: Mutex::new(Some(tx)),
            threads,
        })
    }

    /// One thread per CPU the process may use.
    pub fn per_cpu() -> std::io::Result<Self> {
        Self::new(std::thread::available_parallelism().map_or(1, usize::from))
    }

    /// How many calls run at once.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Calls running or waiting for a thread, for tests and metrics: `threads` minus the free
    /// permits, plus those queued behind them is not counted.
    pub fn busy(&self) -> usize {
        self.threads - self.permits.available_permits()
    }

    /// Runs `f` on a pool thread once one is free; the caller's task waits without holding a
    /// worker. A permit is held until `f` returns, even if the caller stops waiting, so that no
    /// more calls run than there are threads.
    pub async fn run<R: Send + 'static>(
        &self,
        f: impl FnOnce() -> R + Send + 'static,
    ) -> Result<R, PoolError> {
        let permit: OwnedSemaphorePermit =
            self.permits.clone().acquire_owned().await.map_err(|_| PoolError::Stopped)?;
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move || {
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
            drop(permit);
            let _ = tx.send(result);
        });
        {
            let jobs = self.jobs.lock().unwrap_or_else(|e| e.into_inner());
            let sender = jobs.as_ref().ok_or(PoolError::Stopped)?;
            sender.send(job).map_err(|_| PoolError::Stopped)?;
        }
        match rx.await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(_)) => Err(PoolError::Panicked),
            Err(_) => Err(PoolError::Stopped),
        }
    }
}

impl Drop for CallPool {
    fn drop(&mut self) {
        // Closing the channel ends each thread after its current job.
        self.jobs.lock().unwrap_or_else(|e| e.into_inner()).take();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test(flavor = "current_thread")]
    async fn calls_run_off_the_callers_thread_never_more_than_the_threads() {
        let pool = Arc::new(CallPool::new(2).unwrap());
        let caller = std::thread::current().id();
        let inside = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let mut calls = tokio::task::JoinSet::new();
        for _ in 0..16 {
            let (pool, inside, most) = (pool.clone(), inside.clone(), most.clone());
            calls.spawn(async move {
                pool.run(move || {
                    let now = inside.fetch_add(1, Ordering::SeqCst) + 1;
                    most.fetch_max(now, Ordering::SeqCst);
                    std::thread::yield_now();
                    inside.fetch_sub(1, Ordering::SeqCst);
                    std::thread::current().id()
                })
                .await
                .unwrap()
            });
        }
        while let Some(thread) = calls.join_next().await {
            assert_ne!(thread.unwrap(), caller);
        }
        assert!(most.load(Ordering::SeqCst) <= 2, "{most:?} calls at once");
        assert_eq!(pool.busy(), 0);
        assert!(matches!(pool.run(|| panic!("host bug")).await, Err(PoolError::Panicked)));
        assert_eq!(pool.run(|| 7).await.unwrap(), 7, "a panic costs no thread");
    }

    /// The pool's threads yield the CPU to the relay's workers (see [`NICENESS`]).
    #[cfg(target_os = "linux")]
    #[tokio::test(flavor = "current_thread")]
    async fn pool_threads_run_at_a_lower_priority_than_their_creator() {
        let caller = rustix::process::getpriority_process(None).unwrap();
        let pool = CallPool::new(1).unwrap();
        let inside = pool.run(|| rustix::process::getpriority_process(None)).await.unwrap();
        assert_eq!(inside.unwrap(), (caller + NICENESS).min(19));
        assert_eq!(rustix::process::getpriority_process(None).unwrap(), caller, "caller unchanged");
    }
}

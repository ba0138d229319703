// This Source Code Form is subject to the terms of the Mozilla Public
// License, v. 2.0. If a copy of the MPL was not distributed with this
// file, You can obtain one at https://mozilla.org/MPL/2.0/.

//! The data path on a thread of its own (pqmesh patch).
//!
//! On a tokio runtime, a packet that arrives on an idle device wakes the
//! runtime's epoll, whose worker wakes the task, which may run on another
//! CPU than the one that received the packet. On a virtual machine each
//! wake-up of an idle vCPU costs 50-250 µs, more than the cryptography, and
//! a ping through two nodes crosses four such hand-offs. Here one thread
//! runs both data-path tasks (TUN to UDP and UDP to TUN) with a minimal
//! executor whose reactor is `poll(2)` on the few descriptors they wait
//! for: the kernel wakes the thread that does the work, and a reply that
//! the kernel produces while the thread writes a packet (an ICMP echo, a
//! TCP ACK) is read by the same thread without another wake-up.
//!
//! Busy polling: a vCPU that halts when its thread sleeps is slow to wake
//! (a VM exit; guest halt-polling is often off). So after a burst of work
//! the thread may keep polling its descriptors for a short window, yielding
//! the CPU to anything else runnable between polls, before it sleeps: the
//! reply to what it just sent (a TCP ACK, a ping) usually arrives inside the
//! window. The window is the device's choice (zero: off), and polling is
//! capped at [`BUSY_POLL_BUDGET`] of each second, so a steady trickle of
//! packets cannot turn it into a spinning core.
//!
//! Transports that support this wait with [`ready`] instead of tokio's
//! readiness, and must not register their descriptors with tokio. Wakers
//! (tokio's locks and channels work here) set a flag and write an eventfd
//! that the reactor polls too; stopping writes the same eventfd.

use std::cell::RefCell;
use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

/// A data-path task: boxed once when the thread starts.
pub(crate) type DataPathTask = Pin<Box<dyn Future<Output = ()> + Send>>;

/// State shared between the thread and everyone who wakes or stops it.
struct Shared {
    stopping: AtomicBool,
    /// One flag per task: poll it again.
    woken: Vec<AtomicBool>,
    /// Readable after a wake from a waker or a stop; polled by the reactor.
    eventfd: OwnedFd,
}

impl Shared {
    fn notify(&self) {
        let one = 1u64.to_ne_bytes();
        // SAFETY: an 8-byte write from a local into our own eventfd. It only
        // fails (EAGAIN) when the counter is saturated, i.e. already readable.
        unsafe { libc::write(self.eventfd.as_raw_fd(), one.as_ptr().cast(), one.len()) };
    }

    fn drain(&self) {
        let mut count = [0u8; 8];
        // SAFETY: an 8-byte read into a local from our own non-blocking eventfd.
        unsafe { libc::read(self.eventfd.as_raw_fd(), count.as_mut_ptr().cast(), 8) };
    }
}

/// Wakes task `index` from any thread.
struct TaskWaker {
    shared: Arc<Shared>,
    index: usize,
}

impl Wake for TaskWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.shared.woken[self.index].store(true, Ordering::Release);
        self.shared.notify();
    }
}

/// What the tasks on this thread wait for: (descriptor, events, task).
struct Reactor {
    interests: Vec<(RawFd, libc::c_short, usize)>,
    /// The task being polled, to which new interests belong.
    current: usize,
}

thread_local! {
    static REACTOR: RefCell<Option<Reactor>> = const { RefCell::new(None) };
}

/// Waits until `fd` is ready for `events` (`libc::POLLIN`, `libc::POLLOUT`)
/// or has an error to report. The caller retries its non-blocking call after
/// this returns, and waits again on `WouldBlock` (wake-ups may be spurious).
///
/// Fails with `ErrorKind::WouldBlock` when not on a data-path thread: there,
/// nothing would wake the caller (e.g. gotatun's timer task, on tokio,
/// sending into a full socket buffer; it drops that packet).
pub fn ready(fd: BorrowedFd<'_>, events: libc::c_short) -> impl Future<Output = io::Result<()>> {
    Ready {
        fd: fd.as_raw_fd(),
        events,
        registered: false,
    }
}

struct Ready {
    fd: RawFd,
    events: libc::c_short,
    registered: bool,
}

impl Future for Ready {
    type Output = io::Result<()>;

    fn poll(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.registered {
            return Poll::Ready(Ok(()));
        }
        REACTOR.with_borrow_mut(|reactor| match reactor {
            None => Poll::Ready(Err(io::ErrorKind::WouldBlock.into())),
            Some(reactor) => {
                let task = reactor.current;
                reactor.interests.push((self.fd, self.events, task));
                self.registered = true;
                Poll::Pending
            }
        })
    }
}

/// The running data-path thread; dropping it tells the thread to stop.
pub(crate) struct DataPathThread {
    shared: Arc<Shared>,
    /// Closed when the thread has dropped its tasks.
    exited: tokio::sync::oneshot::Receiver<()>,
}

impl DataPathThread {
    /// Runs `tasks` on a new thread named `name`, inside the current tokio
    /// runtime's context (so they may still spawn or use timers). Fails
    /// outside a runtime, or when the thread or its eventfd cannot be made.
    pub(crate) fn spawn(
        name: &'static str,
        tasks: Vec<DataPathTask>,
        busy_poll: Duration,
    ) -> io::Result<Self> {
        // SAFETY: eventfd(2) with constant flags.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let shared = Arc::new(Shared {
            stopping: AtomicBool::new(false),
            // Every task is polled once at the start.
            woken: tasks.iter().map(|_| AtomicBool::new(true)).collect(),
            // SAFETY: the descriptor was just created and is owned by nobody else.
            eventfd: unsafe { OwnedFd::from_raw_fd(fd) },
        });
        let (exited_tx, exited) = tokio::sync::oneshot::channel::<()>();
        let runtime = tokio::runtime::Handle::try_current().map_err(io::Error::other)?;
        let thread_shared = Arc::clone(&shared);
        std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                let _runtime = runtime.enter();
                let _exited = exited_tx;
                REACTOR.set(Some(Reactor {
                    interests: Vec::new(),
                    current: 0,
                }));
                run(tasks, &thread_shared, BusyPoll::new(busy_poll));
                REACTOR.set(None);
            })?;
        Ok(Self { shared, exited })
    }

    fn signal(&self) {
        self.shared.stopping.store(true, Ordering::Release);
        self.shared.notify();
    }

    /// Stops the thread and waits until it has dropped its tasks.
    pub(crate) async fn stop(mut self) {
        self.signal();
        let _ = (&mut self.exited).await;
    }

    /// Whether the thread has finished (its tasks returned or were dropped).
    pub(crate) fn poll_exited(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        Pin::new(&mut self.exited).poll(cx).map(|_| ())
    }
}

impl Drop for DataPathThread {
    fn drop(&mut self) {
        self.signal();
    }
}

/// Polls woken tasks until all have finished or the thread is stopped;
/// when none is woken, waits in `poll(2)` for what they registered.
fn run(mut tasks: Vec<DataPathTask>, shared: &Arc<Shared>, mut busy_poll: BusyPoll) {
    let wakers: Vec<Waker> = (0..tasks.len())
        .map(|index| {
            Waker::from(Arc::new(TaskWaker {
                shared: Arc::clone(shared),
                index,
            }))
        })
        .collect();
    let mut done = vec![false; tasks.len()];
    let mut pollfds: Vec<libc::pollfd> = Vec::new();
    let mut waiting: Vec<(RawFd, libc::c_short, usize)> = Vec::new();
    loop {
        let mut polled = false;
        for (index, task) in tasks.iter_mut().enumerate() {
            if shared.stopping.load(Ordering::Acquire) {
                return;
            }
            if done[index] || !shared.woken[index].swap(false, Ordering::AcqRel) {
                continue;
            }
            polled = true;
            // The task registers afresh whatever it still waits for.
            REACTOR.with_borrow_mut(|reactor| {
                let reactor = reactor.as_mut().expect("set for the thread's lifetime");
                reactor.interests.retain(|&(_, _, task)| task != index);
                reactor.current = index;
            });
            let mut cx = Context::from_waker(&wakers[index]);
            if task.as_mut().poll(&mut cx).is_ready() {
                done[index] = true;
            }
        }
        if done.iter().all(|&d| d) || shared.stopping.load(Ordering::Acquire) {
            return;
        }
        if polled {
            // Polling may have woken a task; look again before blocking.
            continue;
        }

        REACTOR.with_borrow(|reactor| {
            let reactor = reactor.as_ref().expect("set for the thread's lifetime");
            waiting.clear();
            waiting.extend_from_slice(&reactor.interests);
        });
        pollfds.clear();
        pollfds.push(libc::pollfd {
            fd: shared.eventfd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        });
        pollfds.extend(waiting.iter().map(|&(fd, events, _)| libc::pollfd {
            fd,
            events,
            revents: 0,
        }));
        let n = busy_poll.wait(&mut pollfds);
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                tracing::error!("data path: poll failed: {e}");
                // Retry after a pause rather than spin on a persistent error.
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            continue;
        }
        if pollfds[0].revents != 0 {
            shared.drain();
        }
        for (pollfd, &(_, _, task)) in pollfds[1..].iter().zip(&waiting) {
            if pollfd.revents != 0 {
                shared.woken[task].store(true, Ordering::Release);
            }
        }
    }
}

/// At most this much of each second goes to busy polling (5% of a core).
pub const BUSY_POLL_BUDGET: Duration = Duration::from_millis(50);

/// How long to poll before sleeping, within the budget.
struct BusyPoll {
    window: Duration,
    period_start: Instant,
    spent: Duration,
}

impl BusyPoll {
    fn new(window: Duration) -> Self {
        Self {
            window,
            period_start: Instant::now(),
            spent: Duration::ZERO,
        }
    }

    /// `poll(2)` on `pollfds`: first without blocking for up to the window
    /// (while the budget lasts), then until something is ready.
    fn wait(&mut self, pollfds: &mut [libc::pollfd]) -> libc::c_int {
        if let Some(start) = self.start() {
            let ready = loop {
                let n = poll(pollfds, 0);
                if n != 0 || start.elapsed() >= self.window {
                    break n;
                }
                // Let whatever else is runnable here (the application that
                // will answer) go first.
                // SAFETY: sched_yield has no arguments and no memory effects.
                unsafe { libc::sched_yield() };
            };
            self.spent += start.elapsed();
            if ready != 0 {
                return ready;
            }
        }
        poll(pollfds, -1)
    }

    /// When polling may start now: the window is not zero and the budget
    /// of the current one-second period is not spent.
    fn start(&mut self) -> Option<Instant> {
        if self.window.is_zero() {
            return None;
        }
        let now = Instant::now();
        if now.duration_since(self.period_start) >= Duration::from_secs(1) {
            self.period_start = now;
            self.spent = Duration::ZERO;
        }
        (self.spent < BUSY_POLL_BUDGET).then_some(now)
    }
}

fn poll(pollfds: &mut [libc::pollfd], timeout_ms: libc::c_int) -> libc::c_int {
    // SAFETY: `pollfds` is a valid array of its length for the call.
    unsafe { libc::poll(pollfds.as_mut_ptr(), pollfds.len() as libc::nfds_t, timeout_ms) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;
    use std::sync::atomic::AtomicUsize;

    fn pipe() -> (OwnedFd, OwnedFd) {
        let mut fds = [0; 2];
        // SAFETY: pipe2 fills the two-element array.
        assert_eq!(
            unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) },
            0
        );
        // SAFETY: both descriptors were just created and are ours.
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
    }

    /// Reads one byte the way a transport does: try, and wait on WouldBlock.
    async fn read_byte(fd: &OwnedFd) -> io::Result<u8> {
        let mut byte = 0u8;
        loop {
            // SAFETY: a one-byte read into a local.
            let n = unsafe { libc::read(fd.as_raw_fd(), (&mut byte as *mut u8).cast(), 1) };
            match n {
                1 => return Ok(byte),
                0 => return Err(io::ErrorKind::UnexpectedEof.into()),
                _ => {
                    let e = io::Error::last_os_error();
                    if e.kind() != io::ErrorKind::WouldBlock {
                        return Err(e);
                    }
                    ready(fd.as_fd(), libc::POLLIN).await?;
                }
            }
        }
    }

    fn write_byte(fd: &OwnedFd, byte: u8) {
        // SAFETY: a one-byte write from a local.
        assert_eq!(unsafe { libc::write(fd.as_raw_fd(), (&byte as *const u8).cast(), 1) }, 1);
    }

    #[tokio::test]
    async fn two_tasks_wait_on_their_descriptors_and_on_wakers() {
        let (in_rx, in_tx) = pipe();
        let (out_rx, out_tx) = pipe();
        let (wake_tx, wake_rx) = tokio::sync::oneshot::channel::<u8>();
        let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel();
        let done = done_tx.clone();
        // Task 0 echoes one byte from one pipe to the other; task 1 waits
        // on a channel, which wakes it from the runtime's side.
        let echo: DataPathTask = Box::pin(async move {
            let byte = read_byte(&in_rx).await.unwrap();
            write_byte(&out_tx, byte + 1);
            done.send("echo").unwrap();
        });
        let waiter: DataPathTask = Box::pin(async move {
            assert_eq!(wake_rx.await.unwrap(), 7);
            done_tx.send("waiter").unwrap();
        });
        let thread = DataPathThread::spawn("test", vec![echo, waiter], Duration::ZERO).unwrap();

        write_byte(&in_tx, 41);
        assert_eq!(done_rx.recv().await, Some("echo"));
        let mut byte = 0u8;
        // SAFETY: a one-byte read into a local.
        assert_eq!(unsafe { libc::read(out_rx.as_raw_fd(), (&mut byte as *mut u8).cast(), 1) }, 1);
        assert_eq!(byte, 42);
        wake_tx.send(7).unwrap();
        assert_eq!(done_rx.recv().await, Some("waiter"));
        thread.stop().await;
    }

    #[tokio::test]
    async fn stopping_drops_a_task_that_waits_forever() {
        struct CountDrop(Arc<AtomicUsize>);
        impl Drop for CountDrop {
            fn drop(&mut self) {
                self.0.fetch_add(1, Ordering::SeqCst);
            }
        }
        let drops = Arc::new(AtomicUsize::new(0));
        let (rx, _tx) = pipe();
        let guard = CountDrop(Arc::clone(&drops));
        let task: DataPathTask = Box::pin(async move {
            let _guard = guard;
            let _ = read_byte(&rx).await;
            unreachable!("nothing is ever written");
        });
        // Busy polling on: the thread also stops while it polls.
        let thread = DataPathThread::spawn("test", vec![task], Duration::from_micros(200)).unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(drops.load(Ordering::SeqCst), 0);
        thread.stop().await;
        assert_eq!(drops.load(Ordering::SeqCst), 1, "the task was dropped");
    }

    #[tokio::test]
    async fn waiting_off_a_data_path_thread_would_block() {
        let (rx, _tx) = pipe();
        let e = read_byte(&rx).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
    }

    #[test]
    fn spawning_outside_a_tokio_runtime_is_an_error_not_a_panic() {
        let task: DataPathTask = Box::pin(async {});
        assert!(DataPathThread::spawn("test", vec![task], Duration::ZERO).is_err());
    }

    #[test]
    fn busy_polling_stops_when_the_budget_is_spent_and_resumes_next_period() {
        let mut busy = BusyPoll::new(Duration::from_micros(100));
        assert!(busy.start().is_some());
        busy.spent = BUSY_POLL_BUDGET;
        assert!(busy.start().is_none(), "budget spent");
        busy.period_start -= Duration::from_secs(1);
        assert!(busy.start().is_some(), "a new period");
        assert_eq!(busy.spent, Duration::ZERO);
        assert!(BusyPoll::new(Duration::ZERO).start().is_none(), "off");
    }
}

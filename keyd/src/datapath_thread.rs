//! The thread that carries packets: quinn's endpoint and connection drivers
//! and the edge relays run on a single-threaded runtime of their own, apart
//! from the daemon's runtime.
//!
//! Why: on the QUIC rung every packet passes the relay task, quinn's
//! connection driver and its endpoint driver. On the daemon's two-worker
//! runtime each hand-off between them could wake the other worker, and the
//! wake-ups cost more CPU than quinn's crypto (bench/edge profiles). On one
//! thread they are function calls. The daemon's runtime cannot itself be
//! that one thread: its heavy steps (verifying a large roster, the status
//! file's fsyncs) would then stall every packet.

use std::fmt;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use tokio::runtime::{Handle, Runtime};
use tokio::sync::oneshot;

/// The running thread; dropping this stops it (its tasks end with it).
pub struct DataPathThread {
    handle: Handle,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl DataPathThread {
    pub fn start() -> io::Result<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let handle = runtime.handle().clone();
        let (stop, stopped) = oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("keyd-datapath".into())
            .spawn(move || run(runtime, stopped))?;
        Ok(Self {
            handle,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// Where to spawn the data path's tasks and register its sockets.
    pub fn handle(&self) -> &Handle {
        &self.handle
    }
}

fn run(runtime: Runtime, stopped: oneshot::Receiver<()>) {
    // Either a stop or the owner gone: both end the thread.
    let _ = runtime.block_on(stopped);
}

impl Drop for DataPathThread {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        // Joined only outside a runtime: blocking inside one would stall
        // its other tasks (the thread ends by itself either way).
        if let (Err(_), Some(t)) = (Handle::try_current(), self.thread.take()) {
            let _ = t.join();
        }
    }
}

/// quinn's runtime on that thread: its drivers are spawned there, its
/// socket is registered with that thread's reactor and its timers with
/// that thread's clock, whichever thread calls quinn.
pub struct QuinnOn(pub Handle);

impl fmt::Debug for QuinnOn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("QuinnOn")
    }
}

impl quinn::Runtime for QuinnOn {
    fn new_timer(&self, at: Instant) -> Pin<Box<dyn quinn::AsyncTimer>> {
        let _on = self.0.enter();
        quinn::TokioRuntime.new_timer(at)
    }

    fn spawn(&self, future: Pin<Box<dyn Future<Output = ()> + Send>>) {
        self.0.spawn(future);
    }

    fn wrap_udp_socket(
        &self,
        socket: std::net::UdpSocket,
    ) -> io::Result<Arc<dyn quinn::AsyncUdpSocket>> {
        let _on = self.0.enter();
        quinn::TokioRuntime.wrap_udp_socket(socket)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tasks_run_on_the_thread_and_end_when_it_stops() {
        let t = DataPathThread::start().unwrap();
        let here = std::thread::current().id();
        let (tx, rx) = std::sync::mpsc::channel();
        t.handle().spawn(async move {
            let _ = tx.send(std::thread::current().id());
        });
        let there = rx.recv().unwrap();
        assert_ne!(there, here);

        // A task still pending when the thread stops is dropped with it.
        let (held, gone) = oneshot::channel::<()>();
        t.handle().spawn(async move {
            let _held = held;
            std::future::pending::<()>().await;
        });
        drop(t);
        assert!(
            gone.blocking_recv().is_err(),
            "the pending task outlived the thread"
        );
    }
}

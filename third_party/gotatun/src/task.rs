// This Source Code Form is subject to the terms of the Mozilla Public
// License, v. 2.0. If a copy of the MPL was not distributed with this
// file, You can obtain one at https://mozilla.org/MPL/2.0/.
//
// This file incorporates work covered by the following copyright and
// permission notice:
//
//   Copyright (c) Mullvad VPN AB. All rights reserved.
//
// SPDX-License-Identifier: MPL-2.0
#![cfg(any(feature = "device", feature = "tun"))]

use std::pin::Pin;
use tokio::task::JoinHandle;

/// A wrapper around [`JoinHandle`] that.
/// - Aborts the task on Drop.
/// - If the task returns an `Err`, logs it.
pub struct Task {
    name: &'static str,

    /// [`JoinHandle`] for the tokio task.
    ///
    /// INVARIANT: This (or, pqmesh patch, `thread`) will be `Some` until either of:
    /// - Self is dropped.
    /// - [`Self::stop`] is called.
    handle: Option<JoinHandle<()>>,

    /// The task's own thread, instead of `handle` (pqmesh patch).
    #[cfg(feature = "device")]
    thread: Option<crate::data_path_thread::DataPathThread>,
}

pub trait TaskOutput: Sized + Send + 'static {
    fn handle(self, task_name: &'static str) {
        tracing::trace!("task {task_name:?} exited");
    }
}

impl TaskOutput for () {}

impl<T, E> TaskOutput for Result<T, E>
where
    Self: Send + 'static,
    E: std::fmt::Debug,
{
    fn handle(self, task_name: &'static str) {
        match self {
            Ok(..) => ().handle(task_name),
            Err(e) => tracing::error!("task {task_name:?} errored: {e:?}"),
        }
    }
}

impl Task {
    #[track_caller]
    pub fn spawn<Fut, O>(name: &'static str, fut: Fut) -> Self
    where
        Fut: Future<Output = O> + Send + 'static,
        O: TaskOutput,
    {
        let handle = tokio::spawn(async move {
            let output = fut.await;
            TaskOutput::handle(output, name);
        });

        Task {
            name,
            handle: Some(handle),
            #[cfg(feature = "device")]
            thread: None,
        }
    }

    /// Runs named `tasks` together on one thread of their own (pqmesh
    /// patch): see [`crate::data_path_thread`].
    #[cfg(feature = "device")]
    pub fn spawn_thread<O: TaskOutput>(
        name: &'static str,
        tasks: Vec<(&'static str, Pin<Box<dyn Future<Output = O> + Send>>)>,
        busy_poll: std::time::Duration,
    ) -> std::io::Result<Self> {
        let tasks = tasks
            .into_iter()
            .map(|(task_name, fut)| {
                Box::pin(async move { TaskOutput::handle(fut.await, task_name) }) as _
            })
            .collect();
        let thread = crate::data_path_thread::DataPathThread::spawn(name, tasks, busy_poll)?;
        Ok(Task {
            name,
            handle: None,
            thread: Some(thread),
        })
    }

    #[cfg(feature = "device")]
    pub async fn stop(mut self) {
        #[cfg(feature = "device")]
        if let Some(thread) = self.thread.take() {
            thread.stop().await;
            tracing::trace!("stopped thread {}", self.name);
        }
        if let Some(handle) = self.handle.take() {
            handle.abort();
            match handle.await {
                Err(e) if e.is_panic() => {
                    tracing::error!("task {} panicked: {e:#?}", self.name);
                }
                _ => {
                    tracing::trace!("stopped task {}", self.name);
                }
            }
        }
    }
}

impl Future for Task {
    type Output = <JoinHandle<()> as Future>::Output;

    fn poll(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        #[cfg(feature = "device")]
        if let Some(thread) = self.thread.as_mut() {
            return thread.poll_exited(cx).map(Ok);
        }
        self.handle
            .as_mut()
            .map(Pin::new)
            .expect("handle or thread is Some until task is stopped or dropped")
            .poll(cx)
    }
}

impl Drop for Task {
    fn drop(&mut self) {
        if let Some(handle) = self.handle.take() {
            tracing::trace!("dropped task {}", self.name);

            // Note that the task future isn't dropped when calling abort.
            // It is dropped by the tokio runtime at some point in the future.
            // Prefer calling `Task::stop` for tasks that need to be promptly cleaned up.
            handle.abort();
        }
    }
}

//! The daemon's long-lived tasks, watched as one set. Any of them that ends
//! before it is asked to (a panic, a loop that returns) is logged at ERROR
//! and stops the daemon with an error, so the service manager restarts it:
//! a daemon whose queue loop is gone would otherwise keep running and
//! claim nothing.

use std::collections::HashMap;
use std::future::Future;

use tokio::task::{Id, JoinSet};
use tracing::Instrument;

/// How a task ended.
pub struct Ended {
    pub name: &'static str,
    /// `false` when it panicked (or was aborted).
    pub returned: bool,
}

#[derive(Default)]
pub struct Tasks {
    set: JoinSet<()>,
    names: HashMap<Id, &'static str>,
}

impl Tasks {
    /// Starts `task`, named for the logs, in the current span.
    pub fn spawn(&mut self, name: &'static str, task: impl Future<Output = ()> + Send + 'static) {
        let handle = self.set.spawn(task.in_current_span());
        self.names.insert(handle.id(), name);
    }

    /// Waits for the next task to end; `None` once none is left.
    pub async fn next_ended(&mut self) -> Option<Ended> {
        let (id, returned) = match self.set.join_next_with_id().await? {
            Ok((id, ())) => (id, true),
            Err(e) => (e.id(), false),
        };
        let name = self.names.remove(&id).unwrap_or("a daemon task");
        Some(Ended { name, returned })
    }

    /// Stops whatever is left.
    pub fn abort_all(&mut self) {
        self.set.abort_all();
    }
}

/// Fails the calling task when the test suite asks for it at `point`
/// (`CONNECTORD_FAULT=<point>`), so tests can kill a loop for real. Debug
/// builds only: a release binary has no such hook.
pub fn fault(point: &str) {
    #[cfg(debug_assertions)]
    if std::env::var_os("CONNECTORD_FAULT").is_some_and(|v| v == point) {
        panic!("fault injected at {point}");
    }
    #[cfg(not(debug_assertions))]
    let _ = point;
}

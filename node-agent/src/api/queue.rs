//! Admission control: `concurrency` generations run, up to `queue_size` wait,
//! the rest are refused at once with 429 and a `Retry-After` estimated from
//! how long generations have been taking.

use super::ApiError;
use crate::metrics::AgentMetrics;
use axum::http::StatusCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

pub struct Queue {
    slots: Arc<Semaphore>,
    capacity: usize,
    concurrency: usize,
    admitted: AtomicUsize,
    waiting: AtomicUsize,
    /// Moving average of generation seconds, for Retry-After.
    avg_seconds: Mutex<f64>,
}

impl Queue {
    pub fn new(concurrency: usize, queue_size: usize) -> Self {
        let concurrency = concurrency.max(1);
        Queue {
            slots: Arc::new(Semaphore::new(concurrency)),
            capacity: concurrency + queue_size,
            concurrency,
            admitted: AtomicUsize::new(0),
            waiting: AtomicUsize::new(0),
            avg_seconds: Mutex::new(1.0),
        }
    }

    /// A place in the queue, or 429 when it is full.
    pub(super) fn admit(self: &Arc<Self>) -> Result<Ticket, ApiError> {
        if self.admitted.fetch_add(1, Ordering::SeqCst) >= self.capacity {
            self.admitted.fetch_sub(1, Ordering::SeqCst);
            let per = *self.avg_seconds.lock().unwrap_or_else(|p| p.into_inner());
            let wait = (per * (self.waiting() as f64 + 1.0) / self.concurrency as f64)
                .ceil()
                .max(1.0) as u64;
            return Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "the generation queue is full; retry later",
                "rate_limit_error",
                "queue_full",
            )
            .retry_after(wait));
        }
        Ok(Ticket {
            queue: self.clone(),
        })
    }

    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }

    /// Counts a finished generation's time into the Retry-After estimate.
    pub(super) fn record(&self, seconds: f64) {
        let mut avg = self.avg_seconds.lock().unwrap_or_else(|p| p.into_inner());
        *avg = 0.8 * *avg + 0.2 * seconds;
    }
}

/// An admitted request; holds its place until dropped.
pub(super) struct Ticket {
    queue: Arc<Queue>,
}

impl Ticket {
    /// Waits for a generation slot. The request counts as waiting until it
    /// gets one or is dropped (its client went away): a guard, not code after
    /// the `await`, takes it off the count.
    pub(super) async fn slot(
        &self,
        metrics: &AgentMetrics,
    ) -> Result<OwnedSemaphorePermit, ApiError> {
        let q = &self.queue;
        let _waiting = Waiting::start(q, metrics);
        let permit = q.slots.clone().acquire_owned().await;
        permit.map_err(|_| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "the agent is shutting down",
                "server_error",
                "shutting_down",
            )
        })
    }
}

/// One request on the waiting count (and the `modelcache_queue_depth` gauge).
struct Waiting<'a> {
    queue: &'a Queue,
    metrics: &'a AgentMetrics,
}

impl<'a> Waiting<'a> {
    fn start(queue: &'a Queue, metrics: &'a AgentMetrics) -> Self {
        let n = queue.waiting.fetch_add(1, Ordering::SeqCst) + 1;
        metrics.queue_depth.set(n as f64);
        Waiting { queue, metrics }
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let n = self.queue.waiting.fetch_sub(1, Ordering::SeqCst) - 1;
        self.metrics.queue_depth.set(n as f64);
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.queue.admitted.fetch_sub(1, Ordering::SeqCst);
    }
}

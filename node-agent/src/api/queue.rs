//! Admission control: `concurrency` generations run, up to `queue_size` wait,
//! the rest are refused at once with 429 and a `Retry-After` estimated from
//! how long generations have been taking.
//!
//! It also counts what it holds by deployment: the load a gateway reads from
//! every reply's `x-modelcache-queue-depth` and the operator's autoscaler
//! from `/load`.

use super::ApiError;
use crate::metrics::AgentMetrics;
use axum::http::StatusCode;
use serde::Serialize;
use std::collections::BTreeMap;
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
    /// Admitted requests by deployment (cluster mode) or model.
    by_model: Mutex<BTreeMap<String, usize>>,
}

/// What the agent is working on, as `/load` answers it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Load {
    /// Requests admitted and not finished: running and waiting.
    pub in_flight: usize,
    /// Of those, the requests waiting for a generation slot.
    pub waiting: usize,
    /// Generations that run at once.
    pub concurrency: usize,
    /// `in_flight` by deployment (`namespace/name`) in cluster mode, by model standalone.
    pub models: BTreeMap<String, usize>,
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
            by_model: Mutex::new(BTreeMap::new()),
        }
    }

    /// A place in the queue for a request for `model`, or 429 when it is full.
    pub(super) fn admit(self: &Arc<Self>, model: &str) -> Result<Ticket, ApiError> {
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
        *self.models().entry(model.to_string()).or_default() += 1;
        Ok(Ticket {
            queue: self.clone(),
            model: model.to_string(),
        })
    }

    fn models(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, usize>> {
        self.by_model.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }

    /// Requests admitted and not finished.
    pub fn in_flight(&self) -> usize {
        self.admitted.load(Ordering::Relaxed)
    }

    pub fn load(&self) -> Load {
        Load {
            in_flight: self.in_flight(),
            waiting: self.waiting(),
            concurrency: self.concurrency,
            models: self.models().clone(),
        }
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
    model: String,
}

impl Queue {
    /// Waits for a generation slot (a batch takes one).
    pub(super) async fn slot(&self) -> Result<OwnedSemaphorePermit, ApiError> {
        self.slots.clone().acquire_owned().await.map_err(|_| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "the agent is shutting down",
                "server_error",
                "shutting_down",
            )
        })
    }
}

/// One request on the waiting count (and the `modelcache_queue_depth`
/// gauge) until dropped: a guard, not code after an `await`, takes it off
/// the count.
pub(super) struct Waiting {
    queue: Arc<Queue>,
    metrics: AgentMetrics,
}

impl Waiting {
    fn start(queue: &Arc<Queue>, metrics: &AgentMetrics) -> Self {
        let n = queue.waiting.fetch_add(1, Ordering::SeqCst) + 1;
        metrics.queue_depth.set(n as f64);
        Waiting {
            queue: queue.clone(),
            metrics: metrics.clone(),
        }
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        let n = self.queue.waiting.fetch_sub(1, Ordering::SeqCst) - 1;
        self.metrics.queue_depth.set(n as f64);
    }
}

/// A [`Waiting`] shared by a request's handler and its place in a batch:
/// it ends when the batch starts or when the handler is dropped (its client
/// went away), whichever comes first.
#[derive(Clone)]
pub(super) struct SharedWaiting(Arc<Mutex<Option<Waiting>>>);

impl SharedWaiting {
    pub(super) fn start(queue: &Arc<Queue>, metrics: &AgentMetrics) -> Self {
        SharedWaiting(Arc::new(Mutex::new(Some(Waiting::start(queue, metrics)))))
    }

    pub(super) fn end(&self) {
        let waiting = self.0.lock().unwrap_or_else(|p| p.into_inner()).take();
        drop(waiting);
    }
}

impl Drop for SharedWaiting {
    fn drop(&mut self) {
        self.end();
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut models = self.queue.models();
        if let Some(n) = models.get_mut(&self.model) {
            *n -= 1;
            if *n == 0 {
                models.remove(&self.model);
            }
        }
        drop(models);
        self.queue.admitted.fetch_sub(1, Ordering::SeqCst);
    }
}

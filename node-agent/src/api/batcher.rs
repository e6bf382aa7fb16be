//! Gathers requests that can share a denoising batch (the same
//! [`BatchKey`]) and runs each batch in one generation slot.
//!
//! The first request of a batch opens it; others join while it waits, for
//! the window (20 ms by default) and then for a free slot, until it holds
//! `max_images` images. Under load a batch therefore fills while its slot is
//! busy, and an idle agent delays a request by the window at most. Requests
//! that cannot share one (edits) run alone without waiting for a window.
//! Each request keeps its own cancellation: a client that goes away stops
//! its images and frees its place in the queue, not the rest of its batch.

use super::queue::SharedWaiting;
use super::{ApiError, AppState};
use crate::pipeline::{self, BatchKey, GenerateParams, Member, Previews, Stage};
use crate::routes::Target;
use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;
use tracing::Span;

/// How requests are gathered into batches.
#[derive(Debug, Clone, Copy)]
pub struct Batching {
    /// How long a batch waits for more requests after its first; zero:
    /// requests batch only while they wait for a slot anyway.
    pub window: Duration,
    /// Most images in one batch (the device tier's room may make it fewer).
    pub max_images: usize,
}

impl Default for Batching {
    fn default() -> Self {
        Batching {
            window: Duration::from_millis(20),
            max_images: 8,
        }
    }
}

/// What a request's generation gives back: its images as PNG and the
/// seconds its batch took.
pub(super) type Reply = Result<(Vec<Vec<u8>>, f64), ApiError>;

/// One request waiting for, or running in, a batch.
pub(super) struct Job {
    pub params: GenerateParams,
    /// Set when its client went away or its time ran out.
    pub cancelled: Arc<AtomicBool>,
    pub previews: Option<Arc<dyn Previews + Send>>,
    pub reply: oneshot::Sender<Reply>,
    /// Its log lines' span (the request id).
    pub span: Span,
    /// On the waiting count until its batch starts (or its client leaves).
    pub waiting: SharedWaiting,
    pub submitted: Instant,
}

struct Open {
    jobs: Vec<Job>,
    images: usize,
}

type Shared = Arc<Mutex<Open>>;

/// The batches being gathered, by what their requests share.
pub struct Batcher {
    settings: Batching,
    open: Mutex<HashMap<BatchKey, Shared>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Batcher {
    pub fn new(settings: Batching) -> Self {
        Batcher {
            settings,
            open: Mutex::new(HashMap::new()),
        }
    }

    /// Adds `job` (for `target`'s model) to an open batch it can share, or
    /// opens one and starts the task that runs it.
    pub(super) fn submit(self: &Arc<Self>, s: &Arc<AppState>, target: Target, job: Job) {
        let n = job.params.n;
        let key = BatchKey::of(Path::new(&target.model), &job.params)
            .filter(|_| self.settings.max_images > 1);
        let batch = match &key {
            None => Arc::new(Mutex::new(Open {
                jobs: vec![job],
                images: n,
            })),
            Some(key) => {
                let mut open = lock(&self.open);
                if let Some(b) = open.get(key) {
                    let mut b = lock(b);
                    if b.images + n <= self.settings.max_images {
                        b.images += n;
                        b.jobs.push(job);
                        return;
                    }
                }
                // None open, or the open one is full: this one replaces it
                // in the map, and the full one runs as it is.
                let b = Arc::new(Mutex::new(Open {
                    jobs: vec![job],
                    images: n,
                }));
                open.insert(key.clone(), b.clone());
                b
            }
        };
        let (this, s) = (self.clone(), s.clone());
        tokio::spawn(async move { this.lead(s, target, key, batch).await });
    }

    /// Waits out the window and for a slot, closes the batch, and runs it.
    async fn lead(&self, s: Arc<AppState>, target: Target, key: Option<BatchKey>, batch: Shared) {
        if key.is_some() {
            tokio::time::sleep(self.settings.window).await;
        }
        let permit = s.queue.slot().await;
        if let Some(key) = &key {
            let mut open = lock(&self.open);
            if open.get(key).is_some_and(|b| Arc::ptr_eq(b, &batch)) {
                open.remove(key);
            }
        }
        let jobs: Vec<Job> = std::mem::take(&mut lock(&batch).jobs)
            .into_iter()
            .filter(|j| !j.cancelled.load(Ordering::Relaxed))
            .collect();
        if jobs.is_empty() {
            return;
        }
        let permit = match permit {
            Ok(p) => p,
            Err(e) => {
                for j in jobs {
                    let _ = j.reply.send(Err(e.clone()));
                }
                return;
            }
        };
        let metrics = &s.agent.metrics;
        let images: usize = jobs.iter().map(|j| j.params.n).sum();
        metrics.batch_images.observe(images as f64);
        for j in &jobs {
            metrics
                .batch_wait_seconds
                .observe(j.submitted.elapsed().as_secs_f64());
        }
        let (agent, max_images) = (s.agent.clone(), self.settings.max_images);
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            run(&agent, &target, jobs, max_images)
        })
        .await
        .unwrap_or_else(|e| tracing::error!("a generation batch failed: {e}"));
    }
}

/// Runs a closed batch on the blocking pool and answers each request.
fn run(agent: &crate::agent::Agent, target: &Target, jobs: Vec<Job>, max_images: usize) {
    let started = Instant::now();
    let (jobs, replies): (Vec<_>, Vec<_>) = jobs
        .into_iter()
        .map(|j| {
            j.waiting.end();
            ((j.params, j.cancelled, j.previews, j.span), j.reply)
        })
        .unzip();
    let progress: Vec<_> = jobs
        .iter()
        .map(|(_, cancelled, ..)| move |_: Stage| !cancelled.load(Ordering::Relaxed))
        .collect();
    let members: Vec<Member> = jobs
        .iter()
        .zip(&progress)
        .map(|((params, _, previews, _), progress)| Member {
            params,
            progress,
            previews: previews.as_deref().map(|p| p as &dyn Previews),
        })
        .collect();
    let result = agent
        .catalog
        .open(&target.model)
        .map_err(ApiError::from)
        .and_then(|model| {
            match pipeline::generate_batch(&agent.cache, &model, &members, max_images) {
                // Every request of the batch was cancelled.
                Err(pipeline::PipelineError::Cancelled) => {
                    Ok(members.iter().map(|_| None).collect())
                }
                r => r.map_err(ApiError::from),
            }
        });
    let seconds = started.elapsed().as_secs_f64();
    if jobs.len() > 1 {
        tracing::info!(requests = jobs.len(), seconds, "ran a batch");
    }
    match result {
        Ok(images) => {
            for ((images, (p, _, _, span)), reply) in images.into_iter().zip(&jobs).zip(replies) {
                let _span = span.enter();
                let Some(images) = images else {
                    tracing::info!(
                        seconds,
                        "generation stopped: its client went away or its time ran out"
                    );
                    continue;
                };
                tracing::info!(
                    images = images.len(),
                    width = p.width,
                    height = p.height,
                    steps = p.steps,
                    seconds,
                    "generated"
                );
                agent.metrics.generation_seconds.observe(seconds);
                let pngs = images
                    .iter()
                    .map(|img| img.to_png())
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| ApiError::internal(format!("PNG encoding: {e}")));
                let _ = reply.send(pngs.map(|p| (p, seconds)));
            }
        }
        Err(e) => {
            for reply in replies {
                let _ = reply.send(Err(e.clone()));
            }
        }
    }
}

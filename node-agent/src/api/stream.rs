//! `stream: true`: the answer as Server-Sent Events in the shape of OpenAI's
//! image streaming. While an image is denoised, `partial_images` previews
//! (`image_generation.partial_image`, or `image_edit.partial_image` for an
//! edit) come at evenly spaced steps; each finished image comes as
//! `image_generation.completed` (`image_edit.completed`). A failure after
//! the stream has started comes as an `error` event carrying OpenAI's error
//! body. A client that disconnects drops the stream, which cancels its
//! images and frees its place in the queue.
//!
//! Each event also carries `image_index` (which of the request's `n`
//! images it belongs to), an extension that OpenAI's clients ignore.

use super::{ApiError, AppState, Counted, InFlight};
use crate::pipeline::{self, Image};
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use serde_json::{json, Value};
use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};

/// Sends a request's previews to its stream as the pipeline makes them.
pub(super) struct Previews {
    partial: usize,
    tx: UnboundedSender<(usize, Image)>,
}

impl Previews {
    pub(super) fn new(partial: usize, tx: UnboundedSender<(usize, Image)>) -> Self {
        Previews { partial, tx }
    }
}

/// The steps after which `partial` previews of a `steps`-step denoising
/// are shown: evenly spaced, the last before the end (the final image
/// follows it).
fn preview_steps(partial: usize, steps: usize) -> impl Iterator<Item = usize> {
    (1..=partial).map(move |k| (k * steps / (partial + 1)).max(1))
}

impl pipeline::Previews for Previews {
    fn wants(&self, step: usize, steps: usize) -> bool {
        preview_steps(self.partial, steps).any(|s| s == step)
    }

    fn show(&self, image: usize, _step: usize, preview: Image) {
        // A closed channel is a client gone: the progress check cancels it.
        let _ = self.tx.send((image, preview));
    }
}

/// What every event says about the request.
pub(super) struct Shape {
    pub edit: bool,
    pub width: usize,
    pub height: usize,
}

struct State {
    s: Arc<AppState>,
    in_flight: InFlight,
    previews: Option<UnboundedReceiver<(usize, Image)>>,
    /// Previews sent so far, per image.
    sent: Vec<usize>,
    shape: Shape,
    deadline: Option<(Instant, Duration)>,
    started: Instant,
    counted: Counted,
    ready: VecDeque<Event>,
    done: bool,
}

impl State {
    fn event(&self, kind: &str, image: usize, png: &[u8], extra: Value) -> Event {
        let prefix = if self.shape.edit {
            "image_edit"
        } else {
            "image_generation"
        };
        let kind = format!("{prefix}.{kind}");
        let mut data = json!({
            "type": kind,
            "b64_json": base64::engine::general_purpose::STANDARD.encode(png),
            "created_at": super::unix_now(),
            "size": format!("{}x{}", self.shape.width, self.shape.height),
            "quality": "auto",
            "background": "opaque",
            "output_format": "png",
            "image_index": image,
        });
        if let (Some(d), Value::Object(extra)) = (data.as_object_mut(), extra) {
            d.extend(extra);
        }
        Event::default().event(kind).data(data.to_string())
    }

    fn fail(&mut self, e: ApiError) {
        let e = e.redacted(&self.s.agent.catalog);
        self.counted.status = Some(e.status);
        let mut body = e.body();
        body["type"] = "error".into();
        self.ready
            .push_back(Event::default().event("error").data(body.to_string()));
        self.done = true;
    }

    /// Waits for the next preview, the images, or the deadline.
    async fn next(&mut self) {
        let preview = async {
            match &mut self.previews {
                Some(rx) => rx.recv().await,
                None => std::future::pending().await,
            }
        };
        let deadline = async {
            match self.deadline {
                Some((at, _)) => tokio::time::sleep_until(at.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            Some((image, preview)) = preview => {
                match tokio::task::spawn_blocking(move || preview.to_png()).await {
                    Ok(Ok(png)) => {
                        if self.sent.len() <= image {
                            self.sent.resize(image + 1, 0);
                        }
                        let index = self.sent[image];
                        self.sent[image] += 1;
                        let e = self.event("partial_image", image, &png, json!({"partial_image_index": index}));
                        self.ready.push_back(e);
                    }
                    // A preview that cannot be encoded is skipped; the image still comes.
                    _ => tracing::warn!("a preview could not be encoded"),
                }
            }
            images = self.in_flight.images() => {
                match images {
                    Ok((pngs, _)) => {
                        for (i, png) in pngs.iter().enumerate() {
                            let e = self.event("completed", i, png, json!({}));
                            self.ready.push_back(e);
                        }
                        self.counted.status = Some(StatusCode::OK);
                        self.s.queue.record(self.started.elapsed().as_secs_f64());
                        self.done = true;
                    }
                    Err(e) => self.fail(e),
                }
            }
            _ = deadline => {
                let limit = self.deadline.map_or(Duration::ZERO, |(_, l)| l);
                self.fail(super::timed_out(limit));
            }
        }
    }
}

/// The event stream answering a streamed request.
#[allow(clippy::too_many_arguments)]
pub(super) fn respond(
    s: Arc<AppState>,
    label: String,
    in_flight: InFlight,
    previews: Option<UnboundedReceiver<(usize, Image)>>,
    shape: Shape,
    deadline: Option<(Instant, Duration)>,
    started: Instant,
) -> Response {
    let state = State {
        counted: Counted {
            state: Some(s.clone()),
            label,
            status: None,
        },
        s,
        in_flight,
        previews,
        sent: Vec::new(),
        shape,
        deadline,
        started,
        ready: VecDeque::new(),
        done: false,
    };
    let events = futures::stream::unfold(state, |mut st| async move {
        loop {
            if let Some(e) = st.ready.pop_front() {
                return Some((Ok::<_, Infallible>(e), st));
            }
            if st.done {
                return None;
            }
            st.next().await;
        }
    });
    // A comment every second: the server learns of a client gone when a
    // write fails, so its images stop within a second even between previews.
    Sse::new(events)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(1)))
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn previews_are_evenly_spaced_before_the_end() {
        let steps = |k, n| preview_steps(k, n).collect::<Vec<_>>();
        assert_eq!(steps(0, 20), Vec::<usize>::new());
        assert_eq!(steps(1, 20), [10]);
        assert_eq!(steps(3, 20), [5, 10, 15]);
        assert_eq!(steps(3, 2), [1, 1, 1]);
    }
}

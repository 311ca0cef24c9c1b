//! Runs requests against one loaded model from any number of callers. Requests wait in a
//! bounded queue and a worker thread runs them one at a time (batching will replace the
//! one-at-a-time part here, behind the same interface).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::Arc;

use seer_vision::ImageLimits;

use crate::error::Result;
use crate::generate::{GenerateRequest, Generation};
use crate::vlm::Vlm;

/// Receives text as it is generated; returning `false` cancels the request (a client
/// that went away).
pub type OnText = Box<dyn FnMut(&str) -> bool + Send>;
/// Receives the outcome once, when the request is done.
pub type OnDone = Box<dyn FnOnce(Result<Generation>) + Send>;

struct Job {
    req: GenerateRequest,
    limits: ImageLimits,
    on_text: OnText,
    on_done: OnDone,
}

#[derive(Debug, thiserror::Error)]
#[error("the queue is full ({0} requests waiting)")]
pub struct QueueFull(pub usize);

pub struct Scheduler {
    tx: SyncSender<Job>,
    waiting: Arc<AtomicUsize>,
    running: Arc<AtomicUsize>,
    capacity: usize,
}

impl Scheduler {
    /// Starts the worker. At most `capacity` requests wait behind the running one.
    pub fn new(vlm: Arc<Vlm>, capacity: usize) -> Self {
        let (tx, rx) = sync_channel::<Job>(capacity);
        let waiting = Arc::new(AtomicUsize::new(0));
        let running = Arc::new(AtomicUsize::new(0));
        let (w, r) = (waiting.clone(), running.clone());
        std::thread::Builder::new()
            .name("seer-worker".into())
            .spawn(move || {
                for mut job in rx {
                    w.fetch_sub(1, Ordering::SeqCst);
                    r.store(1, Ordering::SeqCst);
                    let outcome = vlm.generate(&job.req, &job.limits, &mut job.on_text);
                    r.store(0, Ordering::SeqCst);
                    (job.on_done)(outcome);
                }
            })
            .expect("spawning the worker thread");
        Scheduler { tx, waiting, running, capacity }
    }

    /// Queues a request, or refuses at once when the queue is full.
    pub fn submit(&self, req: GenerateRequest, limits: ImageLimits, on_text: OnText, on_done: OnDone) -> Result<(), QueueFull> {
        self.waiting.fetch_add(1, Ordering::SeqCst);
        match self.tx.try_send(Job { req, limits, on_text, on_done }) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.waiting.fetch_sub(1, Ordering::SeqCst);
                Err(QueueFull(self.capacity))
            }
        }
    }

    /// Requests waiting for the worker.
    pub fn queue_depth(&self) -> usize {
        self.waiting.load(Ordering::SeqCst)
    }

    /// Requests being generated right now.
    pub fn running(&self) -> usize {
        self.running.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc::channel;

    fn fixture() -> Arc<Vlm> {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/llava/tiny-llava-hub");
        Arc::new(Vlm::load(&dir, None).unwrap())
    }

    fn request(text: &str) -> GenerateRequest {
        GenerateRequest {
            messages: vec![crate::Message::text(crate::Role::User, text)],
            max_tokens: 8,
            ignore_eos: true,
            ..Default::default()
        }
    }

    #[test]
    fn every_request_is_answered_as_if_alone_and_a_full_queue_refuses() {
        let vlm = fixture();
        let alone: Vec<Vec<u32>> = (0..4)
            .map(|i| vlm.generate(&request(&format!("story {i}")), &ImageLimits::default(), &mut |_| true).unwrap().token_ids)
            .collect();
        let sched = Scheduler::new(vlm, 8);
        let (tx, rx) = channel();
        for i in 0..4 {
            let tx = tx.clone();
            let on_done: OnDone = Box::new(move |r| tx.send((i, r.unwrap().token_ids)).unwrap());
            sched.submit(request(&format!("story {i}")), ImageLimits::default(), Box::new(|_| true), on_done).unwrap();
        }
        let mut got: Vec<(usize, Vec<u32>)> = (0..4).map(|_| rx.recv().unwrap()).collect();
        got.sort();
        for (i, ids) in got {
            assert_eq!(ids, alone[i], "request {i}");
        }

        // A worker stuck on a slow request: capacity 1 takes one more, then refuses.
        let small = Scheduler::new(fixture(), 1);
        let (gate_tx, gate_rx) = channel::<()>();
        let gate = std::sync::Mutex::new(Some(gate_rx));
        let blocking: OnText = Box::new(move |_| {
            if let Some(rx) = gate.lock().unwrap().take() {
                let _ = rx.recv();
            }
            true
        });
        small.submit(request("a"), ImageLimits::default(), blocking, Box::new(|_| {})).unwrap();
        while small.running() == 0 {
            std::thread::yield_now();
        }
        small.submit(request("b"), ImageLimits::default(), Box::new(|_| true), Box::new(|_| {})).unwrap();
        assert_eq!(small.queue_depth(), 1);
        assert!(small.submit(request("c"), ImageLimits::default(), Box::new(|_| true), Box::new(|_| {})).is_err());
        gate_tx.send(()).unwrap();
    }

    #[test]
    fn a_callback_returning_false_cancels() {
        let sched = Scheduler::new(fixture(), 2);
        let (tx, rx) = channel();
        let mut pieces = 0;
        let on_text: OnText = Box::new(move |_| {
            pieces += 1;
            pieces < 2
        });
        sched.submit(request("x"), ImageLimits::default(), on_text, Box::new(move |r| tx.send(r.unwrap()).unwrap())).unwrap();
        let gen = rx.recv().unwrap();
        assert_eq!(gen.finish_reason, crate::FinishReason::Cancelled);
        assert!(gen.token_ids.len() < 8);
    }
}

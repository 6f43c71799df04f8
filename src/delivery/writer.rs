//! The receiver's copy writers: a streamed message's data (one too large to go to the agent
//! whole) is written into its copies, and the copies closed, by a thread of its own, never
//! by the event loop.
//!
//! A write or close on a hung NFS or FUSE home blocks for as long as the filesystem does:
//! done in the event loop, it stalled every client (found in review). One thread per
//! streamed transaction, so a hung home holds up only the transactions that write to it;
//! it lives from the agent's descriptors to the close, and is the only owner of the
//! descriptors meanwhile. It writes the trace fields, then each chunk in order, keeps the
//! first error, and reports what it wrote and how the copies were closed; a dropped
//! [`CopyWriter`] (an aborted transaction) makes it close the copies and end.
//!
//! It must not decide anything: the agent client (`client.rs`) bounds how much waits for it
//! (back-pressure), and commits or aborts.

use std::fs::File;
use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Mutex};

use mio::Waker;

use super::DeliveryError;

/// A thread's stack: it only copies buffers it is given into files.
const STACK: usize = 128 * 1024;
/// Writer threads alive at most. A writer stuck on a hung home outlives its transaction
/// (found in review: each retry of the sender added one, with its descriptors); beyond this
/// many, a new streamed transaction gets 451 instead of one more thread.
pub const MAX_WRITERS: usize = 256;
/// What one queued chunk costs beyond its buffer (the allocation and the queue's slot), so
/// that many small chunks count for what they hold.
pub const JOB_OVERHEAD: usize = 64;

enum Job {
    /// Data, and what it counts for (see [`CopyWriter::write`]).
    Write(Vec<u8>, usize),
    Close,
}

/// What a writer did, for the event loop.
#[derive(Debug)]
pub enum Progress {
    /// A chunk of transaction `id`'s data that counted `cost` was written (or, after an
    /// error, dropped).
    Written { id: u64, cost: usize },
    /// Transaction `id`'s copies are closed; `Err` is the first write error.
    Closed {
        id: u64,
        result: Result<(), DeliveryError>,
    },
}

/// Starts writers and collects their progress.
pub struct Writers {
    progress: Arc<Mutex<Vec<Progress>>>,
    /// Threads alive (writers, and closers of descriptors nobody writes to).
    live: Arc<AtomicUsize>,
    /// Wakes the event loop when progress arrives; `None` in unit tests, which ask.
    waker: Option<Arc<Waker>>,
}

/// One transaction's writer. Dropping it without [`CopyWriter::close`] abandons the copies.
pub struct CopyWriter {
    jobs: Sender<Job>,
    /// Set when the writer is dropped unclosed: the thread drops what is still queued.
    abandoned: Arc<AtomicBool>,
}

impl Drop for CopyWriter {
    fn drop(&mut self) {
        self.abandoned.store(true, Ordering::Relaxed);
    }
}

/// Counts a thread as alive until it ends.
struct Alive(Arc<AtomicUsize>);

impl Drop for Alive {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Writers {
    pub fn new() -> Writers {
        Writers {
            progress: Arc::new(Mutex::new(Vec::new())),
            live: Arc::new(AtomicUsize::new(0)),
            waker: None,
        }
    }

    /// The event loop's waker, for the writers started from now on.
    pub fn set_waker(&mut self, waker: Arc<Waker>) {
        self.waker = Some(waker);
    }

    /// Threads alive now.
    pub fn live(&self) -> usize {
        self.live.load(Ordering::Relaxed)
    }

    /// Counts one more thread, unless [`MAX_WRITERS`] are alive.
    fn admit(&self) -> io::Result<Alive> {
        if self.live.fetch_add(1, Ordering::Relaxed) >= MAX_WRITERS {
            self.live.fetch_sub(1, Ordering::Relaxed);
            return Err(io::Error::other(format!(
                "{MAX_WRITERS} writer threads are busy (a hung home?)"
            )));
        }
        Ok(Alive(Arc::clone(&self.live)))
    }

    /// Closes descriptors nobody will write to (a transaction aborted before they came) off
    /// the calling thread: on a hung NFS or FUSE home a close blocks too. Only if no thread
    /// can be started are they closed here.
    pub fn discard(&self, files: Vec<File>) {
        if files.is_empty() {
            return;
        }
        let Ok(alive) = self.admit() else {
            return;
        };
        let _ = std::thread::Builder::new()
            .name("copy-closer".into())
            .stack_size(STACK)
            .spawn(move || {
                let _alive = alive;
                drop(files);
            });
    }

    /// Starts the writer of transaction `id`: it writes each head into its copy first. An
    /// error (too many writers alive, no thread) drops `files` here.
    pub fn start(&self, id: u64, files: Vec<File>, heads: Vec<Vec<u8>>) -> io::Result<CopyWriter> {
        let alive = self.admit()?;
        let abandoned = Arc::new(AtomicBool::new(false));
        let gone = Arc::clone(&abandoned);
        let (jobs, rx) = channel::<Job>();
        let progress = Arc::clone(&self.progress);
        let waker = self.waker.clone();
        let report = move |p: Progress| {
            let mut v = progress.lock().unwrap_or_else(|e| e.into_inner());
            let first = v.is_empty();
            v.push(p);
            drop(v);
            // The event loop takes everything at each wake: one wake per batch is enough. A
            // failed wake means the event loop is gone.
            if first {
                if let Some(w) = &waker {
                    let _ = w.wake();
                }
            }
        };
        std::thread::Builder::new()
            .name("copy-writer".into())
            .stack_size(STACK)
            .spawn(move || {
                let _alive = alive;
                let mut files = files;
                let mut error = None;
                for (f, h) in files.iter_mut().zip(&heads) {
                    if let Err(e) = f.write_all(h) {
                        error = Some(DeliveryError::from_io(e, "write of the trace fields"));
                        break;
                    }
                }
                while let Ok(job) = rx.recv() {
                    if gone.load(Ordering::Relaxed) {
                        // Aborted: nothing more is written; the copies close as we return.
                        return;
                    }
                    match job {
                        Job::Write(data, cost) => {
                            if error.is_none() {
                                for f in &mut files {
                                    if let Err(e) = f.write_all(&data) {
                                        error =
                                            Some(DeliveryError::from_io(e, "write of mail data"));
                                        break;
                                    }
                                }
                            }
                            report(Progress::Written { id, cost });
                        }
                        Job::Close => {
                            // Our descriptors are not needed any more: the agent fsyncs its
                            // own. A close on NFS flushes, and may block: here, not in the
                            // event loop.
                            drop(files);
                            report(Progress::Closed {
                                id,
                                result: error.map_or(Ok(()), Err),
                            });
                            return;
                        }
                    }
                }
                // Abandoned: the copies are closed as `files` goes.
            })?;
        Ok(CopyWriter { jobs, abandoned })
    }

    /// The progress reported since the last call, in order per transaction.
    pub fn take_progress(&self) -> Vec<Progress> {
        std::mem::take(&mut *self.progress.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

impl Default for Writers {
    fn default() -> Writers {
        Writers::new()
    }
}

impl CopyWriter {
    /// Queues `data` for every copy: what it counts for (its allocation and
    /// [`JOB_OVERHEAD`], what it holds in memory until written), or `None` if the thread is
    /// gone.
    pub fn write(&self, data: Vec<u8>) -> Option<usize> {
        let cost = data.capacity() + JOB_OVERHEAD;
        self.jobs.send(Job::Write(data, cost)).ok().map(|()| cost)
    }

    /// Asks for the copies to be closed; [`Progress::Closed`] follows. False if the thread is
    /// gone.
    pub fn close(&self) -> bool {
        self.jobs.send(Job::Close).is_ok()
    }
}

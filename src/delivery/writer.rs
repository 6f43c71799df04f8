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
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Mutex};

use mio::Waker;

use super::DeliveryError;

/// A thread's stack: it only copies buffers it is given into files.
const STACK: usize = 128 * 1024;

enum Job {
    Write(Vec<u8>),
    Close,
}

/// What a writer did, for the event loop.
#[derive(Debug)]
pub enum Progress {
    /// `bytes` of transaction `id`'s data were written (or, after an error, dropped).
    Written { id: u64, bytes: usize },
    /// Transaction `id`'s copies are closed; `Err` is the first write error.
    Closed {
        id: u64,
        result: Result<(), DeliveryError>,
    },
}

/// Starts writers and collects their progress.
pub struct Writers {
    progress: Arc<Mutex<Vec<Progress>>>,
    /// Wakes the event loop when progress arrives; `None` in unit tests, which ask.
    waker: Option<Arc<Waker>>,
}

/// One transaction's writer. Dropping it without [`CopyWriter::close`] abandons the copies.
pub struct CopyWriter {
    jobs: Sender<Job>,
}

impl Writers {
    pub fn new() -> Writers {
        Writers {
            progress: Arc::new(Mutex::new(Vec::new())),
            waker: None,
        }
    }

    /// The event loop's waker, for the writers started from now on.
    pub fn set_waker(&mut self, waker: Arc<Waker>) {
        self.waker = Some(waker);
    }

    /// Starts the writer of transaction `id`: it writes each head into its copy first.
    pub fn start(&self, id: u64, files: Vec<File>, heads: Vec<Vec<u8>>) -> io::Result<CopyWriter> {
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
                let mut files = files;
                let mut error = None;
                for (f, h) in files.iter_mut().zip(&heads) {
                    if let Err(e) = f.write_all(h) {
                        error = Some(DeliveryError::from_io(e, "write of the trace fields"));
                        break;
                    }
                }
                while let Ok(job) = rx.recv() {
                    match job {
                        Job::Write(data) => {
                            if error.is_none() {
                                for f in &mut files {
                                    if let Err(e) = f.write_all(&data) {
                                        error =
                                            Some(DeliveryError::from_io(e, "write of mail data"));
                                        break;
                                    }
                                }
                            }
                            report(Progress::Written {
                                id,
                                bytes: data.len(),
                            });
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
        Ok(CopyWriter { jobs })
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
    /// Queues `data` for every copy; false if the thread is gone.
    pub fn write(&self, data: Vec<u8>) -> bool {
        self.jobs.send(Job::Write(data)).is_ok()
    }

    /// Asks for the copies to be closed; [`Progress::Closed`] follows. False if the thread is
    /// gone.
    pub fn close(&self) -> bool {
        self.jobs.send(Job::Close).is_ok()
    }
}

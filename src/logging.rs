//! The process's log sink: logging never fails, stalls or kills anything.
//!
//! A log line is handed to one writer thread through a bounded queue and written to the log
//! (the original stderr) there. A full queue, or a write that fails (disk full, EIO, a closed
//! pipe), drops the line and counts it in `fleetlm_log_lines_dropped_total`: the task that
//! logged never sees an error, never panics and never waits on the disk. Once writing works
//! again, the log first says how many lines it lost.
//!
//! Why all this: tracing-subscriber reports a failed write with `eprintln!`, and `eprintln!`
//! panics when stderr fails, so a full disk under the log file killed whichever task was
//! logging (the shard writer that had just logged the ENOSPC; issue 19). So:
//! - the fmt layer writes into [`LogSink`], whose writes always succeed, and it is told not to
//!   report write errors (`log_internal_errors(false)`);
//! - file descriptor 2 itself is replaced by a pipe whose reader forwards into the sink, so any
//!   other write to stderr (a library's `eprintln!`, the panic hook's output) cannot fail either;
//! - panics are logged through the sink (as JSON in JSON mode), with a backtrace if asked for.

use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use crate::config::LogFormat;

/// Lines waiting for the writer thread, at most (and bytes, below): past either, lines drop.
const QUEUE_LINES: usize = 8192;
const QUEUE_BYTES: usize = 8 * 1024 * 1024;
/// How long a panicking thread waits for the log to take its panic line.
const PANIC_FLUSH_WAIT: Duration = Duration::from_millis(500);
const WRITER_THREAD: &str = "fleetlm-log";
const DROPPED_METRIC: &str = "fleetlm_log_lines_dropped_total";

static SINK: OnceLock<LogSink> = OnceLock::new();

enum Item {
    Bytes(Vec<u8>),
    /// Answered once everything queued before it was written (or dropped).
    Flush(SyncSender<()>),
}

/// Where log lines go. Cloning shares the queue and its writer thread.
#[derive(Clone)]
pub struct LogSink {
    shared: Arc<Shared>,
}

struct Shared {
    queue: SyncSender<Item>,
    queued_bytes: AtomicUsize,
    /// Dropped lines the log has not mentioned yet.
    unreported: AtomicU64,
    dropped_total: AtomicU64,
    format: LogFormat,
}

impl LogSink {
    /// Starts the writer thread writing to `out`.
    pub fn start(out: Box<dyn Write + Send>, format: LogFormat) -> io::Result<LogSink> {
        let (queue, receiver) = sync_channel(QUEUE_LINES);
        let shared = Arc::new(Shared {
            queue,
            queued_bytes: AtomicUsize::new(0),
            unreported: AtomicU64::new(0),
            dropped_total: AtomicU64::new(0),
            format,
        });
        let for_writer = shared.clone();
        std::thread::Builder::new()
            .name(WRITER_THREAD.into())
            .spawn(move || write_queued(receiver, out, &for_writer))?;
        Ok(LogSink { shared })
    }

    /// Queues `bytes` (one or more whole lines); drops them if the queue is full. Never blocks.
    pub fn enqueue(&self, bytes: Vec<u8>) {
        let len = bytes.len();
        let shared = &self.shared;
        if shared.queued_bytes.fetch_add(len, Ordering::AcqRel) + len > QUEUE_BYTES {
            shared.queued_bytes.fetch_sub(len, Ordering::AcqRel);
            shared.dropped(1);
            return;
        }
        if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) = shared.queue.try_send(Item::Bytes(bytes)) {
            shared.queued_bytes.fetch_sub(len, Ordering::AcqRel);
            shared.dropped(1);
        }
    }

    /// Waits (at most `within`) until everything queued so far was written or dropped; false if
    /// the log did not get there in time (a stalled pipe, say).
    pub fn flush(&self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        let (done, written) = sync_channel(1);
        let mut item = Item::Flush(done);
        loop {
            match self.shared.queue.try_send(item) {
                Ok(()) => break,
                Err(TrySendError::Full(back)) => {
                    if Instant::now() >= deadline {
                        return false;
                    }
                    item = back;
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(TrySendError::Disconnected(_)) => return false,
            }
        }
        written
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .is_ok()
    }

    /// Lines dropped since the sink started.
    pub fn dropped_total(&self) -> u64 {
        self.shared.dropped_total.load(Ordering::Acquire)
    }
}

impl Shared {
    fn dropped(&self, lines: u64) {
        self.unreported.fetch_add(lines, Ordering::AcqRel);
        self.dropped_total.fetch_add(lines, Ordering::AcqRel);
        metrics::counter!(DROPPED_METRIC).increment(lines);
    }
}

/// The writer thread: writes each queued item whole; a failed write drops it (counted).
fn write_queued(receiver: Receiver<Item>, mut out: Box<dyn Write + Send>, shared: &Shared) {
    // A failed write may have left part of a line: the next write starts on a new line.
    let mut mid_line = false;
    let mut last_error: Option<String> = None;
    for item in receiver {
        let bytes = match item {
            Item::Flush(done) => {
                let _ = out.flush();
                let _ = done.try_send(());
                continue;
            }
            Item::Bytes(bytes) => bytes,
        };
        shared.queued_bytes.fetch_sub(bytes.len(), Ordering::AcqRel);
        let unreported = shared.unreported.swap(0, Ordering::AcqRel);
        if unreported > 0 || mid_line {
            let mut note = Vec::new();
            if mid_line {
                note.push(b'\n');
            }
            if unreported > 0 {
                note.extend(dropped_note(shared.format, unreported, last_error.as_deref()));
            }
            if let Err((error, partial)) = write_whole(&mut out, &note) {
                // Still failing: this line goes too, and the note waits for the next success.
                shared.unreported.fetch_add(unreported, Ordering::AcqRel);
                shared.dropped(1);
                mid_line |= partial;
                last_error = Some(error.to_string());
                continue;
            }
        }
        match write_whole(&mut out, &bytes) {
            Ok(()) => mid_line = false,
            Err((error, partial)) => {
                shared.dropped(1);
                mid_line = partial;
                last_error = Some(error.to_string());
            }
        }
    }
}

/// Writes all of `bytes`; on failure, the error and whether some bytes were written.
fn write_whole(out: &mut dyn Write, mut bytes: &[u8]) -> Result<(), (io::Error, bool)> {
    let mut partial = false;
    while !bytes.is_empty() {
        match out.write(bytes) {
            Ok(0) => return Err((io::ErrorKind::WriteZero.into(), partial)),
            Ok(written) => {
                bytes = &bytes[written..];
                partial = true;
            }
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(error) => return Err((error, partial)),
        }
    }
    Ok(())
}

fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// The line saying that `lines` log lines were lost, in the log's format.
fn dropped_note(format: LogFormat, lines: u64, error: Option<&str>) -> Vec<u8> {
    let cause = match error {
        Some(error) => format!("writing the log failed ({error})"),
        None => "the log could not keep up".to_string(),
    };
    let message = format!("{lines} log lines were dropped: {cause}");
    event_line(format, "WARN", "fleetlm::logging", &message, serde_json::Map::new())
}

/// One log line shaped like the fmt layer's (text or JSON), for lines written outside it.
fn event_line(
    format: LogFormat,
    level: &str,
    target: &str,
    message: &str,
    fields: serde_json::Map<String, serde_json::Value>,
) -> Vec<u8> {
    let timestamp = now_rfc3339();
    match format {
        LogFormat::Text => {
            let mut line = format!("{timestamp} {level:>5} {target}: {message}");
            for (name, value) in &fields {
                match value {
                    serde_json::Value::String(text) => line.push_str(&format!(" {name}={text}")),
                    other => line.push_str(&format!(" {name}={other}")),
                }
            }
            line.push('\n');
            line.into_bytes()
        }
        LogFormat::Json => {
            let mut all = serde_json::Map::new();
            all.insert("message".into(), message.into());
            all.extend(fields);
            let mut line = serde_json::to_vec(&serde_json::json!({
                "timestamp": timestamp,
                "level": level,
                "fields": all,
                "target": target,
            }))
            .unwrap_or_default();
            line.push(b'\n');
            line
        }
    }
}

/// The fmt layer's writer for one event: collects the formatted line, queues it when dropped.
pub struct EventWriter<'a> {
    sink: &'a LogSink,
    line: Vec<u8>,
}

impl Write for EventWriter<'_> {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        self.line.extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for EventWriter<'_> {
    fn drop(&mut self) {
        if !self.line.is_empty() {
            self.sink.enqueue(std::mem::take(&mut self.line));
        }
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogSink {
    type Writer = EventWriter<'a>;

    fn make_writer(&'a self) -> EventWriter<'a> {
        EventWriter {
            sink: self,
            line: Vec::new(),
        }
    }
}

/// Sets up logging for `fleetlm serve`: the subscriber (level from `RUST_LOG`), the sink on
/// the original stderr, stderr itself captured, and the panic hook. Call once, early.
pub fn init(format: LogFormat) {
    // The recorder first, so that lines dropped from the first one on are counted.
    crate::metrics::prometheus();
    metrics::describe_counter!(
        DROPPED_METRIC,
        "Log lines dropped because the log could not be written (full disk, EIO, closed pipe) or fell behind."
    );
    metrics::counter!(DROPPED_METRIC).increment(0);

    let default = || format!("info,{},tokio_postgres=warn", crate::consensus::LOG_DIRECTIVES);
    let directives = match std::env::var("RUST_LOG") {
        Ok(env) if !env.trim().is_empty() => crate::consensus::with_log_directives(&env),
        _ => default(),
    };
    let (filter, filter_error) = match tracing_subscriber::EnvFilter::try_new(&directives) {
        Ok(filter) => (filter, None),
        Err(error) => (tracing_subscriber::EnvFilter::new(default()), Some(error)),
    };

    let original = std::io::stderr().as_fd().try_clone_to_owned().map(std::fs::File::from);
    let ansi = original.as_ref().is_ok_and(std::io::IsTerminal::is_terminal);
    let out: Box<dyn Write + Send> = match original {
        Ok(file) => Box::new(file),
        // No stderr at all: nothing to write to.
        Err(_) => Box::new(io::sink()),
    };
    let sink = match LogSink::start(out, format) {
        Ok(sink) => sink,
        Err(error) => {
            say(&format!(
                "fleetlm: cannot start the log writer thread ({error}); logging is off"
            ));
            return;
        }
    };
    let _ = SINK.set(sink.clone());

    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(sink.clone())
        .log_internal_errors(false);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
    if let Some(error) = filter_error {
        tracing::warn!(%error, "RUST_LOG is not a valid filter; using the default");
    }
    install_panic_hook(sink.clone(), format);
    if let Err(error) = capture_stderr(sink) {
        tracing::warn!(%error, "stderr could not be captured; a failed write to it may still panic");
    }
}

/// Panics go to the log like any line (its format, its sink), never to a stderr that may fail.
fn install_panic_hook(sink: LogSink, format: LogFormat) {
    std::panic::set_hook(Box::new(move |info| {
        let thread = std::thread::current();
        let name = thread.name().unwrap_or("<unnamed>");
        let mut fields = serde_json::Map::new();
        fields.insert("thread".into(), name.into());
        fields.insert("panic".into(), info.to_string().into());
        let backtrace = std::backtrace::Backtrace::capture();
        if backtrace.status() == std::backtrace::BacktraceStatus::Captured {
            fields.insert("backtrace".into(), backtrace.to_string().into());
        }
        sink.enqueue(event_line(
            format,
            "ERROR",
            "fleetlm::panic",
            "a thread panicked",
            fields,
        ));
        // The process may be about to end: give the line a moment to reach the log.
        if name != WRITER_THREAD {
            sink.flush(PANIC_FLUSH_WAIT);
        }
    }));
}

/// Replaces file descriptor 2 with a pipe whose reader forwards into the sink: a write to
/// stderr from anywhere then only fails if the pipe does, which it does not (we hold its
/// reader, and the reader never waits on the disk).
fn capture_stderr(sink: LogSink) -> io::Result<()> {
    let (mut reader, writer) = io::pipe()?;
    // SAFETY: dup2 on two valid descriptors; fd 2 is atomically replaced.
    if unsafe { libc::dup2(writer.as_raw_fd(), libc::STDERR_FILENO) } < 0 {
        return Err(io::Error::last_os_error());
    }
    drop(writer);
    std::thread::Builder::new()
        .name("fleetlm-stderr".into())
        .spawn(move || {
            let mut buffer = vec![0u8; 16 * 1024];
            loop {
                match reader.read(&mut buffer) {
                    Ok(0) => return,
                    Ok(read) => sink.enqueue(buffer[..read].to_vec()),
                    Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => return,
                }
            }
        })?;
    Ok(())
}

/// Writes a plain line to the log (through the sink once `init` ran, else straight to stderr);
/// a failure is ignored, never a panic.
pub fn say(line: &str) {
    let mut bytes = line.as_bytes().to_vec();
    bytes.push(b'\n');
    match SINK.get() {
        Some(sink) => sink.enqueue(bytes),
        None => {
            let _ = io::stderr().write_all(&bytes);
        }
    }
}

/// Writes `text` to stdout; false if that failed (a closed pipe, a full disk), never a panic.
pub fn print_stdout(text: &str) -> bool {
    let mut stdout = io::stdout().lock();
    stdout.write_all(text.as_bytes()).and_then(|()| stdout.flush()).is_ok()
}

/// Waits (at most `within`) for the log to take every line queued so far; true at once when
/// logging was never set up.
pub fn flush(within: Duration) -> bool {
    SINK.get().is_none_or(|sink| sink.flush(within))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Fails its first `failures` writes with `error` (after taking `partial` bytes of the
    /// first one), then writes into `written`.
    struct FlakyOut {
        failures: usize,
        partial: usize,
        error: io::ErrorKind,
        written: Arc<Mutex<Vec<u8>>>,
    }

    impl Write for FlakyOut {
        fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
            if self.partial > 0 {
                let taken = self.partial.min(bytes.len());
                self.written.lock().unwrap().extend_from_slice(&bytes[..taken]);
                self.partial = 0;
                return Ok(taken);
            }
            if self.failures > 0 {
                self.failures -= 1;
                return Err(io::Error::from(self.error));
            }
            self.written.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn flaky_sink(
        failures: usize,
        partial: usize,
        error: io::ErrorKind,
        format: LogFormat,
    ) -> (LogSink, Arc<Mutex<Vec<u8>>>) {
        let written = Arc::new(Mutex::new(Vec::new()));
        let out = FlakyOut {
            failures,
            partial,
            error,
            written: written.clone(),
        };
        (LogSink::start(Box::new(out), format).unwrap(), written)
    }

    #[test]
    fn failed_writes_drop_lines_count_them_and_the_log_says_so_once_it_works_again() {
        let (sink, written) = flaky_sink(3, 0, io::ErrorKind::StorageFull, LogFormat::Text);
        for n in 0..5 {
            sink.enqueue(format!("line {n}\n").into_bytes());
        }
        assert!(sink.flush(Duration::from_secs(5)));
        assert_eq!(sink.dropped_total(), 3);
        let text = String::from_utf8(written.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert!(
            lines[0].contains("3 log lines were dropped: writing the log failed"),
            "{text}"
        );
        assert_eq!(&lines[1..], ["line 3", "line 4"]);
    }

    #[test]
    fn a_line_cut_by_a_failed_write_is_ended_before_the_next_one() {
        // 4 bytes of "first line" get written, then the disk is full once.
        let (sink, written) = flaky_sink(1, 4, io::ErrorKind::StorageFull, LogFormat::Text);
        sink.enqueue(b"first line\n".to_vec());
        sink.enqueue(b"second line\n".to_vec());
        assert!(sink.flush(Duration::from_secs(5)));
        let text = String::from_utf8(written.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "firs", "{text}");
        assert!(lines[1].contains("1 log lines were dropped"), "{text}");
        assert_eq!(lines[2], "second line", "{text}");
    }

    /// A log that does not take anything (a pipe nobody reads): logging neither blocks nor
    /// grows without bound; the lines past the queue are dropped and counted.
    #[test]
    fn a_stalled_log_never_blocks_the_caller() {
        struct Stalled(std::sync::mpsc::Receiver<()>);
        impl Write for Stalled {
            fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
                let _ = self.0.recv();
                Ok(bytes.len())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let (release, stalled) = std::sync::mpsc::channel();
        let sink = LogSink::start(Box::new(Stalled(stalled)), LogFormat::Text).unwrap();
        let started = Instant::now();
        for n in 0..QUEUE_LINES + 100 {
            sink.enqueue(format!("line {n}\n").into_bytes());
        }
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(sink.dropped_total() >= 99, "{}", sink.dropped_total());
        let flushing = Instant::now();
        assert!(!sink.flush(Duration::from_millis(200)), "a stalled log is not flushed");
        assert!(flushing.elapsed() < Duration::from_secs(2));
        drop(release);
    }

    /// The whole stack: events through the fmt layer (text and JSON) into a failing log return
    /// normally, and later lines arrive once the log works.
    #[test]
    fn the_fmt_layer_over_a_failing_log_never_panics() {
        for json in [false, true] {
            let (sink, written) = flaky_sink(
                2,
                0,
                io::ErrorKind::BrokenPipe,
                if json { LogFormat::Json } else { LogFormat::Text },
            );
            let builder = tracing_subscriber::fmt()
                .with_writer(sink.clone())
                .with_ansi(false)
                .log_internal_errors(false);
            let dispatch = if json {
                tracing::Dispatch::new(builder.json().finish())
            } else {
                tracing::Dispatch::new(builder.finish())
            };
            tracing::dispatcher::with_default(&dispatch, || {
                for n in 0..4 {
                    tracing::error!(n, "cannot write: the disk is full");
                }
            });
            assert!(sink.flush(Duration::from_secs(5)));
            assert_eq!(sink.dropped_total(), 2);
            let text = String::from_utf8(written.lock().unwrap().clone()).unwrap();
            assert_eq!(text.lines().count(), 3, "{text}");
            if json {
                for line in text.lines() {
                    serde_json::from_str::<serde_json::Value>(line).unwrap_or_else(|_| panic!("{line}"));
                }
            }
        }
    }
}

//! The scanner gate: whether this node's workers take files to scan.
//!
//! When a scan finds the scanner unreachable, the gate closes. While it is closed, workers claim
//! only jobs that already have a verdict (routing needs no scanner), and one probe asks the scanner
//! whether it answers, every [`ScannerGate::probe_every`]. When it does, the gate opens and the
//! workers are woken.
//!
//! So an outage costs the one job that found it one attempt, instead of a claim, a failed
//! connection and a recorded failure for every file that arrives meanwhile, each one burning its
//! attempts towards `failed`. Files wait in landing, unscanned (fail closed). The team learns of
//! the outage from `/readyz`, the `ingestion_scanning_paused` gauge and the stuck alert of the job
//! that found it (jobs never tried are not reported stuck one by one).

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Open (scan) or closed since an instant (route only).
#[derive(Debug, Default)]
pub(super) struct ScannerGate {
    closed_since: Mutex<Option<Instant>>,
}

impl ScannerGate {
    /// Whether scanning is on.
    pub(super) fn is_open(&self) -> bool {
        self.closed_since
            .lock()
            .map_or(true, |closed| closed.is_none())
    }

    /// Closes the gate; `true` if it was open (the caller starts the probe).
    pub(super) fn close(&self) -> bool {
        match self.closed_since.lock() {
            Ok(mut closed) if closed.is_none() => {
                *closed = Some(Instant::now());
                true
            }
            _ => false,
        }
    }

    /// Opens the gate; how long it was closed.
    pub(super) fn open(&self) -> Duration {
        self.closed_since
            .lock()
            .ok()
            .and_then(|mut closed| closed.take())
            .map_or(Duration::ZERO, |since| since.elapsed())
    }

    /// How often a closed gate asks the scanner: the first retry's wait, between 100 ms and 5 s.
    pub(super) fn probe_every(retry_base: Duration) -> Duration {
        retry_base.clamp(Duration::from_millis(100), Duration::from_secs(5))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn closes_once_and_opens_once() {
        let gate = ScannerGate::default();
        assert!(gate.is_open());
        assert!(gate.close(), "the first close starts the probe");
        assert!(
            !gate.close(),
            "a second worker finding the outage starts none"
        );
        assert!(!gate.is_open());
        std::thread::sleep(Duration::from_millis(5));
        assert!(gate.open() >= Duration::from_millis(5));
        assert!(gate.is_open());
        assert_eq!(gate.open(), Duration::ZERO);
    }

    #[test]
    fn probes_are_neither_a_busy_loop_nor_rare() {
        let every = ScannerGate::probe_every;
        assert_eq!(every(Duration::ZERO), Duration::from_millis(100));
        assert_eq!(every(Duration::from_secs(1)), Duration::from_secs(1));
        assert_eq!(every(Duration::from_secs(3600)), Duration::from_secs(5));
    }
}

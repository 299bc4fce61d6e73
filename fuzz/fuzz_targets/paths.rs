//! The path normaliser never panics, and what it accepts can never name anything outside the home.
#![no_main]

use ingestion::sftp::paths::{AboveRoot, MAX_PATH_BYTES, normalise};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|raw: &str| {
    for mode in [AboveRoot::Refuse, AboveRoot::StayAtRoot] {
        if let Ok(path) = normalise(raw, mode) {
            assert!(raw.len() <= MAX_PATH_BYTES);
            for part in path.parts() {
                assert!(!part.is_empty() && part != "." && part != "..", "{raw:?} -> {part:?}");
                assert!(!part.contains('/') && !part.chars().any(char::is_control), "{raw:?}");
            }
            let shown = path.to_string();
            assert_eq!(normalise(&shown, AboveRoot::Refuse).as_ref(), Ok(&path), "not idempotent: {raw:?}");
        }
    }
});

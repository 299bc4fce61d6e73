//! The configuration and user-file parsers never panic, whatever the text.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    let _ = ingestion::config::Config::parse(Path::new("/etc/ingestion/ingestion.toml"), text);
    let _ = ingestion::config::parse_user(Path::new("/etc/ingestion/users/acme.toml"), text, Path::new("/etc/ingestion"));
});

//! Decoding whatever a client sends as an SFTP packet never panics (russh-sftp's decoder, which the
//! session loop feeds every packet to).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut bytes = bytes::Bytes::copy_from_slice(data);
    let _ = russh_sftp::protocol::Packet::try_from(&mut bytes);
});

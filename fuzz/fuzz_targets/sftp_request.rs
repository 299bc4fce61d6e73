//! The session's own decoders never panic and what they return stays inside what was sent: the
//! framing of `read_packet` (length-prefixed, 1..=MAX_PACKET bytes), then, for each packet body,
//! what `dispatch` runs (the WRITE fast path `parse_write`, russh-sftp's decoder, the reply to what
//! neither decodes) and `two_strings`, which reads posix-rename's paths.
#![no_main]

use bytes::Bytes;
use ingestion::sftp::fuzzing::{MAX_PACKET, Request, decode_request, read_packets, two_strings};
use libfuzzer_sys::fuzz_target;
use russh_sftp::protocol::{Packet, StatusCode};

fuzz_target!(|data: &[u8]| {
    // The input as a channel's byte stream: packets are consecutive length-prefixed pieces of it.
    let (packets, end) = read_packets(data);
    let mut rest = data;
    for packet in &packets {
        assert!(
            !packet.is_empty() && packet.len() <= MAX_PACKET as usize,
            "{} bytes",
            packet.len()
        );
        let (length, tail) = rest.split_at(4);
        assert_eq!(
            u32::from_be_bytes([length[0], length[1], length[2], length[3]]) as usize,
            packet.len()
        );
        assert_eq!(&tail[..packet.len()], &packet[..]);
        rest = &tail[packet.len()..];
    }
    match end {
        // The stream ended between packets (or inside the next length, which counts as its end).
        Ok(()) => assert!(rest.len() < 4, "a clean end with {} bytes left", rest.len()),
        // An out-of-range length or a packet cut short.
        Err(_) => assert!(rest.len() >= 4, "an error with {} bytes left", rest.len()),
    }

    // Each packet, and the whole input as one packet body, as dispatch decodes them.
    for raw in packets.into_iter().chain([Bytes::copy_from_slice(data)]) {
        check(raw);
    }
});

fn check(raw: Bytes) {
    let id = raw
        .get(1..5)
        .map_or(0, |id| u32::from_be_bytes([id[0], id[1], id[2], id[3]]));
    match decode_request(raw.clone()) {
        Request::Write(write) => {
            assert_eq!(raw[0], 6, "the fast path took a packet of type {}", raw[0]);
            assert_eq!(write.id, id);
            // type, id, handle length, handle, offset, data length: then the data, inside the packet.
            assert!(21 + write.handle.len() + write.data.len() <= raw.len());
            if !write.data.is_empty() {
                let (packet, data) = (raw.as_ptr_range(), write.data.as_ptr_range());
                assert!(
                    packet.start <= data.start && data.end <= packet.end,
                    "the data is not a slice of the packet"
                );
            }
            // Where russh-sftp reads the same packet, it reads the same request.
            if let Ok(Packet::Write(theirs)) = Packet::try_from(&mut raw.clone()) {
                assert_eq!(
                    (theirs.id, &theirs.handle, theirs.offset, &theirs.data[..]),
                    (write.id, &write.handle, write.offset, &write.data[..])
                );
            }
        }
        Request::Packet(Packet::Extended(extended)) => {
            if let Some((from, to)) = two_strings(&extended.data) {
                assert!(8 + from.len() + to.len() <= extended.data.len());
            }
        }
        Request::Packet(_) => {}
        Request::Refused(Packet::Status(status)) => {
            assert_eq!(status.id, id);
            assert!(matches!(
                status.status_code,
                StatusCode::BadMessage | StatusCode::OpUnsupported
            ));
        }
        Request::Refused(other) => panic!("refused with {other:?}"),
    }
}

//! `Message::decode` on arbitrary bytes (one frame's payload).
//!
//! Properties: no panic; a refusal is `BadMessage` or `VersionMismatch`; a
//! decoded message encodes again (`frame::encode`) into a frame whose
//! payload decodes to an equal message and encodes to the same bytes; the
//! helpers a session applies to message fields (`unpack_entries`,
//! `validate_name`) do not panic, and packed entries re-pack to entries that
//! unpack equal.

use deltasync_core::error::ErrorCode;
use deltasync_core::frame::{self, MAX_ENCODED, MAX_FRAME};
use deltasync_core::message::{self, Message, PACKED_ENTRY_MAX};

/// The harness.
pub fn run(data: &[u8]) {
    let m = match Message::decode(data) {
        Ok(m) => m,
        Err(code) => {
            assert!(
                matches!(code, ErrorCode::BadMessage | ErrorCode::VersionMismatch),
                "decode refused with {code:?}"
            );
            return;
        }
    };
    fields(&m);
    let mut buf = vec![0u8; MAX_ENCODED];
    let n = match frame::encode(&m, &mut buf) {
        Ok(n) => n,
        // A message decoded from at most a frame's worth of bytes fits a
        // frame again (its canonical encoding is never longer).
        Err(e) => {
            assert!(data.len() > MAX_FRAME, "{m:?} decoded from {} bytes does not encode: {e:?}", data.len());
            return;
        }
    };
    let payload = crate::frame_payload(&buf[..n]).expect("frame::encode writes one whole frame");
    let again = Message::decode(payload).expect("an encoded message decodes");
    assert_eq!(again, m, "round trip changed the message");
    let mut buf2 = vec![0u8; MAX_ENCODED];
    let n2 = frame::encode(&again, &mut buf2).expect("it encoded once");
    assert_eq!(&buf[..n], &buf2[..n2], "encoding is not stable");
}

/// Applies what sessions do with a message's fields.
fn fields(m: &Message<'_>) {
    match *m {
        Message::Stat { name }
        | Message::Download { name }
        | Message::Delete { name }
        | Message::Upload { name, .. }
        | Message::UploadIf { name, .. } => {
            let _ = message::validate_name(name);
        }
        Message::Info(i) => {
            let _ = message::validate_name(i.name);
        }
        Message::Partial(p) => {
            let _ = message::validate_name(p.name);
        }
        Message::Entries { packed, .. } => {
            let entries: Vec<_> = message::unpack_entries(packed).collect();
            // At most one error, and only as the last item.
            let errors = entries.iter().filter(|e| e.is_err()).count();
            assert!(errors <= 1 && (errors == 0 || entries.last().is_some_and(|e| e.is_err())));
            let ok: Vec<_> = entries.into_iter().filter_map(Result::ok).collect();
            let mut out = vec![0u8; ok.len() * PACKED_ENTRY_MAX];
            let mut pos = 0;
            for e in &ok {
                message::pack_entry(&mut out, &mut pos, *e).expect("room for every entry");
            }
            let back: Vec<_> =
                message::unpack_entries(&out[..pos]).collect::<Result<_, _>>().expect("re-packed");
            assert_eq!(back, ok, "packed entries do not round trip");
        }
        _ => {}
    }
}

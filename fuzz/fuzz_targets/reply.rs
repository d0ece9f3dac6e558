//! Replies from any server on the internet: `ReplyBuffer` fed in arbitrary chunks.
//!
//! Checks: no panic; the result does not depend on how the bytes were split; every reply has a
//! code whose first digit is 2..=5, within the parser's line, line-count and size limits; the
//! buffer never holds more than its limit.
#![no_main]

use libfuzzer_sys::fuzz_target;
use postwarden::smtp::{Reply, ReplyBuffer, ReplyParser};

/// Feeds `data` in chunks of the given sizes (cycled), draining replies after each chunk the
/// way the connection layer does; returns the replies and whether it ended in an error.
fn run(parser: &ReplyParser, data: &[u8], sizes: &[usize]) -> (Vec<Reply>, bool) {
    let mut buf = ReplyBuffer::with_parser(parser.clone());
    let mut replies = Vec::new();
    let mut rest = data;
    let mut i = 0;
    while !rest.is_empty() {
        let want = sizes[i % sizes.len()].max(1).min(rest.len()).min(buf.room());
        i += 1;
        if want == 0 {
            // No room and no complete reply: the parser must have rejected it already.
            return (replies, true);
        }
        buf.extend(&rest[..want]).expect("extend within room never fails");
        rest = &rest[want..];
        loop {
            match buf.next_reply() {
                Ok(Some(reply)) => replies.push(reply),
                Ok(None) => break,
                Err(_) => return (replies, true),
            }
        }
        assert!(buf.pending() <= parser.max_reply_len());
    }
    (replies, false)
}

fuzz_target!(|input: &[u8]| {
    let Some((&shape, data)) = input.split_first() else { return };
    // Small limits half the time, so the bounds are reached by short inputs.
    let parser = if shape & 1 == 1 {
        ReplyParser::new().with_max_line_len(40).with_max_reply_len(200).with_max_lines(4)
    } else {
        ReplyParser::new()
    };
    let (whole, whole_err) = run(&parser, data, &[usize::MAX]);
    let sizes = [usize::from(shape >> 1) % 7 + 1, 1, usize::from(shape >> 4) + 1];
    let (split, split_err) = run(&parser, data, &sizes);
    let (bytes, _) = run(&parser, data, &[1]);
    for reply in &whole {
        assert!((200..600).contains(&reply.code()), "code {}", reply.code());
        assert!(!reply.lines().is_empty() && reply.lines().len() <= parser.max_lines());
        for line in reply.lines() {
            assert!(line.len() <= parser.max_line_len() * 3, "line of {} bytes", line.len());
            assert!(!line.contains('\n'), "a line holds a LF: {line:?}");
        }
        let _ = (reply.enhanced(), reply.severity(), reply.text(), reply.to_string());
    }
    // Chunking never changes the replies. (An error may surface at a different point only when
    // the whole input did not fit at once.)
    let codes = |r: &[Reply]| r.iter().map(|r| (r.code(), r.lines().to_vec())).collect::<Vec<_>>();
    assert_eq!(codes(&whole), codes(&bytes), "byte-at-a-time differs");
    if data.len() <= parser.max_reply_len() {
        assert_eq!(codes(&whole), codes(&split), "split {sizes:?} differs");
        assert_eq!(whole_err, split_err);
    }
});

//! The SMTP client's wire format, without I/O.
//!
//! Everything here turns bytes into values or values into bytes and nothing more: no socket,
//! no clock, no TLS. That keeps the hostile-input surface (replies from any server on the
//! internet) testable byte by byte, and lets the connection layer above own every read, write
//! and timeout. The STARTTLS switch lives in that layer too; this one only tells it, through
//! [`ReplyBuffer::pending`], whether bytes were left over after the `220`.
//!
//! # Layout
//!
//! - `reply`: [`ReplyParser`] and [`ReplyBuffer`] turn received bytes into [`Reply`] values,
//!   bounded in line length, line count and size; [`Severity`] and [`EnhancedCode`] classify
//!   them.
//! - `command`: [`Command::encode`] appends a command to an outgoing buffer after refusing
//!   arguments that could inject another command.
//! - `ehlo`: [`Capabilities::from_reply`] reads the extension list from an `EHLO` reply.
//! - `dot`: [`DotStuffer`] prepares the message for `DATA`: dot-stuffing, CRLF line ends and
//!   lines broken at [`MAX_LINE_OCTETS`].

mod command;
mod dot;
mod ehlo;
mod reply;

pub use command::{Argument, Command, CommandError, MAX_DOMAIN_LEN, MAX_PATH_LEN};
pub use dot::{DotStuffer, MAX_LINE_OCTETS};
pub use ehlo::Capabilities;
pub use reply::{
    DEFAULT_MAX_LINE_LEN, DEFAULT_MAX_LINES, DEFAULT_MAX_REPLY_LEN, EnhancedCode, Reply,
    ReplyBuffer, ReplyError, ReplyParser, Severity,
};

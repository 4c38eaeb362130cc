//! The log writer: every record on one line, whatever it quotes.
//!
//! Log records carry text that clients and plugins control (a refused
//! token's fields, a plugin's `log` message, a malformed packet). A newline
//! in that text would start a line that looks like a record of its own,
//! and terminal escapes would reach the operator's terminal. [`SafeStderr`]
//! escapes every control character of a record (C0, DEL, C1: `\n` as `\n`,
//! others as `\u{..}`) except the newline that ends it, so a record is
//! always exactly one line. It sits under the formatter rather than in each
//! call site, so a call site that forgets cannot forge a line.
//!
//! ```
//! assert_eq!(
//!     chanhost::logging::escape_record(b"refused: a\nFORGED\n"),
//!     b"refused: a\\nFORGED\n".to_vec()
//! );
//! ```

use std::borrow::Cow;
use std::io::{self, Write};

/// Escapes control characters in one formatted record, keeping its final
/// newline.
pub fn escape_record(record: &[u8]) -> Cow<'_, [u8]> {
    let (body, newline) = match record.strip_suffix(b"\n") {
        Some(b) => (b, true),
        None => (record, false),
    };
    let text = String::from_utf8_lossy(body);
    if !text.chars().any(char::is_control) && matches!(text, Cow::Borrowed(_)) {
        return Cow::Borrowed(record);
    }
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => out.push_str(&c.escape_unicode().to_string()),
            c => out.push(c),
        }
    }
    if newline {
        out.push('\n');
    }
    Cow::Owned(out.into_bytes())
}

/// Standard error, one escaped record per write (the formatter writes each
/// record with one `write_all`).
#[derive(Debug, Clone, Copy, Default)]
pub struct SafeStderr;

impl Write for SafeStderr {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        io::stderr().lock().write_all(&escape_record(buf))?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        io::stderr().flush()
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for SafeStderr {
    type Writer = SafeStderr;

    fn make_writer(&'a self) -> Self::Writer {
        SafeStderr
    }
}

/// Installs the process's subscriber: `CHANHOST_LOG` as the filter
/// (default `info`), records escaped on standard error, no colours (an
/// escape sequence is a control character like any other).
pub fn init() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("CHANHOST_LOG").unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("info,wasmtime=warn,cranelift=warn")
    });
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(SafeStderr)
        .with_ansi(false)
        .init();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_stays_one_line() {
        let r = b"2026 DEBUG plugin log: hi\n2026 INFO forged\r\x1b[31m\x7f\xc2\x85 end\n";
        let out = String::from_utf8(escape_record(r).into_owned()).unwrap();
        assert_eq!(out.matches('\n').count(), 1, "{out}");
        assert!(out.ends_with(" end\n"));
        assert!(
            out.contains("hi\\n2026 INFO forged\\r\\u{1b}[31m\\u{7f}\\u{85} end"),
            "{out}"
        );
    }

    #[test]
    fn plain_records_are_not_copied() {
        assert!(matches!(escape_record(b"ok \xce\xbb\n"), Cow::Borrowed(_)));
        assert_eq!(&*escape_record(b"tab\there"), b"tab\\there");
    }

    #[test]
    fn invalid_utf8_is_replaced() {
        assert_eq!(&*escape_record(b"a\xffb\n"), "a\u{fffd}b\n".as_bytes());
    }
}

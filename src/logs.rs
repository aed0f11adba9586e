//! The text log format: tracing-subscriber's full format, byte for byte,
//! with a shorter way to the same bytes for the line written most often.
//!
//! Every request writes one access line (`archmerge::access`, see
//! [`crate::server`]). Through tracing-subscriber's formatter that line
//! costs about a tenth of the user-space instructions of a forwarded
//! manifest GET: without colours it still paints every field name with an
//! empty style, through several dynamic `fmt` calls per field. [`Text`]
//! writes the same line directly when no colours are wanted and the event
//! sits in no span; everything else (colours on a terminal, events in
//! spans, other targets) goes through the full format unchanged.

use std::fmt::{self, Write as _};

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::{self, FormatEvent, FormatFields, Writer};
use tracing_subscriber::fmt::time::FormatTime;
use tracing_subscriber::fmt::FmtContext;
use tracing_subscriber::registry::LookupSpan;

/// The target of the per-request access line.
pub const ACCESS: &str = "archmerge::access";

/// tracing-subscriber's full text format, with the access line written
/// directly (see the module docs).
pub struct Text<T = Rfc3339> {
    full: format::Format<format::Full, T>,
    timer: T,
}

impl Default for Text<Rfc3339> {
    fn default() -> Self {
        Text::with_timer(Rfc3339)
    }
}

/// The time as tracing-subscriber's `SystemTime` timer writes it (UTC,
/// RFC 3339, microseconds: `2026-12-04T12:00:00.000000Z`), formatted in one
/// buffer instead of a padded `fmt` call per part.
#[derive(Clone, Copy, Debug, Default)]
pub struct Rfc3339;

impl FormatTime for Rfc3339 {
    fn format_time(&self, w: &mut Writer<'_>) -> fmt::Result {
        write!(
            w,
            "{}",
            humantime::format_rfc3339_micros(std::time::SystemTime::now())
        )
    }
}

impl<T: FormatTime + Clone> Text<T> {
    /// The full format with `timer` for timestamps.
    pub fn with_timer(timer: T) -> Text<T> {
        Text {
            full: format::Format::default().with_timer(timer.clone()),
            timer,
        }
    }
}

impl<S, N, T> FormatEvent<S, N> for Text<T>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    T: FormatTime,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        if meta.target() != ACCESS || writer.has_ansi_escapes() || ctx.event_scope().is_some() {
            return self.full.format_event(ctx, writer, event);
        }
        // What the full format writes without colours, spans, thread names
        // or source locations: `TIME LEVEL TARGET: FIELDS`.
        if self.timer.format_time(&mut writer).is_err() {
            writer.write_str("<unknown time>")?;
        }
        writer.write_str(level_padded(meta.level()))?;
        writer.write_str(meta.target())?;
        writer.write_str(": ")?;
        let mut fields = Fields {
            writer: &mut writer,
            first: true,
            result: Ok(()),
        };
        event.record(&mut fields);
        fields.result?;
        writer.write_char('\n')
    }
}

/// A space, the level as the full format pads it, a space.
fn level_padded(level: &Level) -> &'static str {
    match *level {
        Level::TRACE => " TRACE ",
        Level::DEBUG => " DEBUG ",
        Level::INFO => "  INFO ",
        Level::WARN => "  WARN ",
        Level::ERROR => " ERROR ",
    }
}

/// The fields as tracing-subscriber's default field formatter writes them
/// without colours: the message bare, the others `name=value` (`Debug`),
/// separated by a space.
struct Fields<'a, 'w> {
    writer: &'a mut Writer<'w>,
    first: bool,
    result: fmt::Result,
}

impl Fields<'_, '_> {
    /// Begins a field: the separator, and `name=` unless it is the message.
    fn begin(&mut self, field: &Field) -> bool {
        if self.result.is_err() {
            return false;
        }
        let name = field.name();
        // Metadata of events from the `log` crate, written elsewhere.
        if name.starts_with("log.") {
            return false;
        }
        if !std::mem::take(&mut self.first) {
            self.result = self.writer.write_char(' ');
        }
        if name != "message" {
            let name = name.strip_prefix("r#").unwrap_or(name);
            self.result = self
                .result
                .and_then(|()| self.writer.write_str(name))
                .and_then(|()| self.writer.write_char('='));
        }
        self.result.is_ok()
    }
}

impl Visit for Fields<'_, '_> {
    fn record_u64(&mut self, field: &Field, value: u64) {
        if self.begin(field) {
            self.result = self.writer.write_str(itoa::Buffer::new().format(value));
        }
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        if self.begin(field) {
            self.result = self.writer.write_str(itoa::Buffer::new().format(value));
        }
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        if self.begin(field) {
            self.result = self.writer.write_str(if value { "true" } else { "false" });
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.record_debug(field, &format_args!("{value}"));
        } else if self.begin(field) {
            self.result = write!(self.writer, "{value:?}");
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if !self.begin(field) {
            return;
        }
        self.result = if field.name() == "message" && self.writer.sanitizes_ansi_escapes() {
            write!(Escaping(&mut *self.writer), "{value:?}")
        } else {
            write!(self.writer, "{value:?}")
        };
    }
}

/// Writes what it is given with terminal control characters spelled out,
/// as the full format writes a message.
struct Escaping<'a, 'w>(&'a mut Writer<'w>);

impl fmt::Write for Escaping<'_, '_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let mut rest = s;
        while let Some(i) = rest.find(|c: char| {
            matches!(
                c,
                '\x1b' | '\x07' | '\x08' | '\x0c' | '\x7f' | '\u{80}'..='\u{9f}'
            )
        }) {
            self.0.write_str(&rest[..i])?;
            let c = rest[i..].chars().next().unwrap_or_default();
            match c {
                '\u{80}'..='\u{9f}' => write!(self.0, "\\u{{{:x}}}", c as u32)?,
                c => write!(self.0, "\\x{:02x}", c as u32)?,
            }
            rest = &rest[i + c.len_utf8()..];
        }
        self.0.write_str(rest)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    /// Always the same time, so two formats' lines can be compared whole.
    #[derive(Clone)]
    struct Fixed;

    impl FormatTime for Fixed {
        fn format_time(&self, w: &mut Writer<'_>) -> fmt::Result {
            w.write_str("2026-12-04T12:00:00.000000Z")
        }
    }

    #[derive(Clone, Default)]
    struct Lines(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Lines {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// What `emit` logs through the full format and through [`Text`].
    fn both(emit: impl Fn()) -> (String, String) {
        let full = Lines::default();
        let text = Lines::default();
        let sub = tracing_subscriber::fmt()
            .with_max_level(Level::TRACE)
            .with_ansi(false)
            .with_timer(Fixed)
            .with_writer({
                let full = full.clone();
                move || full.clone()
            })
            .finish();
        tracing::subscriber::with_default(sub, &emit);
        let sub = tracing_subscriber::fmt()
            .with_max_level(Level::TRACE)
            .with_ansi(false)
            .event_format(Text::with_timer(Fixed))
            .with_writer({
                let text = text.clone();
                move || text.clone()
            })
            .finish();
        tracing::subscriber::with_default(sub, &emit);
        let read = |l: Lines| String::from_utf8(l.0.lock().unwrap().clone()).unwrap();
        (read(full), read(text))
    }

    #[test]
    fn the_access_line_is_the_full_formats_byte_for_byte() {
        let method = http::Method::from_bytes(b"PATCH").unwrap();
        let (full, text) = both(|| {
            tracing::info!(
                target: "archmerge::access",
                method = %method,
                route = "upload",
                status = 202u16,
                elapsed_ms = 12u64,
                bytes = Option::<u64>::None,
                "request"
            );
            tracing::info!(
                target: "archmerge::access",
                method = %http::Method::GET,
                route = "manifest",
                status = 200u16,
                elapsed_ms = 0u64,
                bytes = Some(247u64),
                "request"
            );
            tracing::warn!(
                target: "archmerge::access",
                quoted = "a \"b\" \\ c\u{1b}[31m",
                negative = -3i64,
                yes = true,
                r#type = "raw",
                debug = ?Some("x"),
                "odd {} message \u{1b}[2J \u{85} \u{7f}",
                7
            );
            tracing::error!(target: "archmerge::access", "only a message");
            tracing::info!(target: "archmerge::access", status = 500u16);
        });
        assert_eq!(text, full);
        assert!(
            text.starts_with(
                "2026-12-04T12:00:00.000000Z  INFO archmerge::access: request method=PATCH \
                 route=\"upload\" status=202 elapsed_ms=12\n"
            ),
            "{text}"
        );
        assert_eq!(text.lines().count(), 5, "{text}");
    }

    #[test]
    fn the_timestamp_is_the_one_tracing_subscriber_writes() {
        use tracing_subscriber::fmt::time::SystemTime;
        let stamp = |timer: &dyn FormatTime| {
            let mut s = String::new();
            timer.format_time(&mut Writer::new(&mut s)).unwrap();
            s
        };
        // Fixed width, so text order is time order: ours lies between two
        // of tracing-subscriber's taken around it, in the same shape.
        let before = stamp(&SystemTime);
        let ours = stamp(&Rfc3339);
        let after = stamp(&SystemTime);
        assert_eq!(ours.len(), before.len(), "{ours} vs {before}");
        assert!(before <= ours && ours <= after, "{before} {ours} {after}");
        let shape = |s: &str| {
            s.bytes()
                .map(|b| if b.is_ascii_digit() { b'0' } else { b })
                .collect::<Vec<u8>>()
        };
        assert_eq!(shape(&ours), b"0000-00-00T00:00:00.000000Z");
    }

    #[test]
    fn other_targets_and_events_in_spans_take_the_full_format() {
        let (full, text) = both(|| {
            tracing::info!(target: "archmerge::merge", target_tag = "v1", "index written");
            let span = tracing::info_span!("push", repo = "app");
            let _in = span.enter();
            tracing::info!(target: "archmerge::access", status = 201u16, "request");
        });
        assert_eq!(text, full);
        assert!(
            text.contains("push{repo=\"app\"}: archmerge::access"),
            "{text}"
        );
    }
}

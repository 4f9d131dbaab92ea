//! Server-sent events, read incrementally: bytes → lines → events.
//!
//! Lines end with LF, CRLF or CR, and a CRLF split across two reads is one terminator
//! (`LineSplitter` remembers a trailing CR). Text is never decoded here: lines stay bytes,
//! so a UTF-8 character split across reads is whole again by the time anything parses it.
//! Memory is bounded: a line or an event's data past `MAX_EVENT_BYTES` is dropped, and the
//! stream is read on from the next event.

/// Largest event (line or joined `data`) the tap keeps in memory.
pub(super) const MAX_EVENT_BYTES: usize = 1024 * 1024;

/// Largest event buffer kept from one event to the next.
const RECYCLED_CAPACITY: usize = 64 * 1024;

const BOM: &[u8] = b"\xEF\xBB\xBF";

/// One step of splitting a read into lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Piece {
    /// A line ended; its bytes (terminator included) run up to `end` in the input.
    Line { end: usize, text: LineText },
    /// The LF of a CRLF whose CR ended the previous read.
    CrlfTail { end: usize },
    /// The start of a line that is not terminated yet; kept until it is.
    Partial { end: usize },
}

/// Where a completed line's text (without terminator and BOM) lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum LineText {
    /// Inside the current read.
    Input { start: usize, stop: usize },
    /// In the splitter's own buffer (the line spanned several reads).
    Buffered,
    /// Longer than `MAX_EVENT_BYTES`; its bytes were not kept.
    Oversize,
}

#[derive(Debug, Default)]
pub(super) struct LineSplitter {
    /// The current unterminated line (without BOM handling yet).
    partial: Vec<u8>,
    /// Its full length, including bytes not kept after it grew oversize.
    partial_len: usize,
    is_oversize: bool,
    /// `partial` was handed out as a line and must be emptied before reuse.
    is_stale: bool,
    /// The previous read ended with CR: a leading LF in the next read belongs to it.
    ends_with_cr: bool,
    /// A line has completed: a BOM can no longer lead the stream.
    is_past_first_line: bool,
}

impl LineSplitter {
    /// The next piece of `input` starting at `pos`, or `None` when the read is used up.
    pub(super) fn next(&mut self, input: &[u8], pos: usize) -> Option<Piece> {
        let rest = input.get(pos..).filter(|rest| !rest.is_empty())?;
        if self.is_stale {
            self.partial.clear();
            self.partial_len = 0;
            self.is_oversize = false;
            self.is_stale = false;
        }
        if std::mem::take(&mut self.ends_with_cr) && rest.first() == Some(&b'\n') {
            return Some(Piece::CrlfTail { end: pos + 1 });
        }
        let Some(offset) = rest.iter().position(|&b| b == b'\n' || b == b'\r') else {
            self.keep(rest);
            return Some(Piece::Partial { end: input.len() });
        };
        let stop = pos + offset;
        let mut end = stop + 1;
        if rest.get(offset) == Some(&b'\r') {
            match input.get(end) {
                Some(b'\n') => end += 1,
                Some(_) => {}
                None => self.ends_with_cr = true,
            }
        }
        let text = if self.partial_len == 0 {
            let start = if !self.is_past_first_line && rest.starts_with(BOM) {
                (pos + BOM.len()).min(stop)
            } else {
                pos
            };
            LineText::Input { start, stop }
        } else {
            self.keep(rest.get(..offset).unwrap_or_default());
            self.is_stale = true;
            self.buffered_text()
        };
        self.is_past_first_line = true;
        Some(Piece::Line { end, text })
    }

    /// At end of stream: the last line if it was never terminated.
    pub(super) fn finish(&mut self) -> Option<LineText> {
        if self.is_stale || self.partial_len == 0 {
            return None;
        }
        self.is_stale = true;
        Some(self.buffered_text())
    }

    /// The text of a line returned by `next` or `finish`; `None` when it was oversize.
    pub(super) fn text<'a>(&'a self, input: &'a [u8], text: LineText) -> Option<&'a [u8]> {
        match text {
            LineText::Input { start, stop } => input.get(start..stop),
            LineText::Buffered => Some(&self.partial),
            LineText::Oversize => None,
        }
    }

    fn keep(&mut self, bytes: &[u8]) {
        self.partial_len = self.partial_len.saturating_add(bytes.len());
        if self.is_oversize {
            return;
        }
        if self.partial_len > MAX_EVENT_BYTES {
            self.is_oversize = true;
            self.partial = Vec::new();
        } else {
            self.partial.extend_from_slice(bytes);
        }
    }

    fn buffered_text(&mut self) -> LineText {
        if self.is_oversize {
            return LineText::Oversize;
        }
        if !self.is_past_first_line && self.partial.starts_with(BOM) {
            self.partial.drain(..BOM.len());
        }
        LineText::Buffered
    }
}

/// What one line meant to the event being assembled.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum LineRole {
    /// A `:` comment; `is_inside_event` when field lines of the current event precede it.
    Comment { is_inside_event: bool },
    /// A field line (`data:`, `event:`, `id:`, anything else) or an oversize line.
    Field,
    /// A blank line: the event ends. `Some` when it carried something to read.
    EventEnd(Option<Event>),
}

/// A dispatched event: its joined `data` and whether it was flagged as an error by an
/// `event: error` or `error:` line (older llama.cpp builds send the latter).
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Event {
    pub(super) data: Vec<u8>,
    pub(super) is_flagged_error: bool,
}

#[derive(Debug, Default)]
pub(super) struct EventAssembler {
    data: Vec<u8>,
    has_fields: bool,
    is_flagged_error: bool,
    /// The current event grew past the bound: ignore it up to its blank line.
    is_discarding: bool,
    /// Events dropped for size.
    pub(super) oversize_events: u64,
}

impl EventAssembler {
    /// Reads one line; `None` stands for an oversize line.
    pub(super) fn push(&mut self, line: Option<&[u8]>) -> LineRole {
        let Some(line) = line else {
            self.discard();
            self.has_fields = true;
            return LineRole::Field;
        };
        if line.is_empty() {
            return LineRole::EventEnd(self.take_event());
        }
        if line.first() == Some(&b':') {
            return LineRole::Comment {
                is_inside_event: self.has_fields,
            };
        }
        self.has_fields = true;
        if self.is_discarding {
            return LineRole::Field;
        }
        let (name, value) = match line.iter().position(|&b| b == b':') {
            Some(colon) => {
                let value = line.get(colon + 1..).unwrap_or_default();
                let value = value.strip_prefix(b" ").unwrap_or(value);
                (line.get(..colon).unwrap_or_default(), value)
            }
            None => (line, &[][..]),
        };
        match name {
            b"data" => {
                if self.data.len() + value.len() + 1 > MAX_EVENT_BYTES {
                    self.discard();
                } else {
                    self.data.extend_from_slice(value);
                    self.data.push(b'\n');
                }
            }
            b"error" => self.is_flagged_error = true,
            b"event" if value == b"error" => self.is_flagged_error = true,
            _ => {}
        }
        LineRole::Field
    }

    /// At end of stream: the pending event, if it has anything to read.
    pub(super) fn finish(&mut self) -> Option<Event> {
        self.take_event()
    }

    fn take_event(&mut self) -> Option<Event> {
        let is_discarded = std::mem::take(&mut self.is_discarding);
        let is_flagged_error = std::mem::take(&mut self.is_flagged_error);
        self.has_fields = false;
        let mut data = std::mem::take(&mut self.data);
        if is_discarded || (data.is_empty() && !is_flagged_error) {
            return None;
        }
        data.pop();
        Some(Event {
            data,
            is_flagged_error,
        })
    }

    /// Takes back the buffer of an event that has been read, to assemble the next one in
    /// (one allocation per stream instead of one per event); a buffer grown past
    /// `RECYCLED_CAPACITY` is let go, so a rare large event does not stay resident.
    pub(super) fn recycle(&mut self, mut data: Vec<u8>) {
        if self.data.capacity() == 0 && data.capacity() <= RECYCLED_CAPACITY {
            data.clear();
            self.data = data;
        }
    }

    fn discard(&mut self) {
        if !self.is_discarding {
            self.is_discarding = true;
            self.oversize_events += 1;
            self.data = Vec::new();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{EventAssembler, LineRole, RECYCLED_CAPACITY};

    fn one_event(assembler: &mut EventAssembler, data: &[u8]) -> Vec<u8> {
        let mut line = b"data: ".to_vec();
        line.extend_from_slice(data);
        assert_eq!(assembler.push(Some(&line)), LineRole::Field);
        match assembler.push(Some(b"")) {
            LineRole::EventEnd(Some(event)) => event.data,
            other => panic!("expected an event, got {other:?}"),
        }
    }

    #[test]
    fn a_read_event_buffer_is_reused_unless_it_grew_large() {
        let mut assembler = EventAssembler::default();
        let data = one_event(&mut assembler, b"{\"a\":1}");
        let pointer = data.as_ptr();
        assembler.recycle(data);
        let next = one_event(&mut assembler, b"{\"b\":2}");
        assert_eq!(next, b"{\"b\":2}");
        assert_eq!(next.as_ptr(), pointer);

        let large = one_event(&mut assembler, &vec![b'x'; RECYCLED_CAPACITY + 1]);
        assembler.recycle(large);
        assert_eq!(assembler.data.capacity(), 0);
    }
}

//! The usage tap: reads usage out of upstream bytes as they pass (UPSTREAMS.md rules).
//!
//! The tap never alters the pass-through: without stripping, `feed` hands back the very
//! bytes it was given and parses a view of them. With stripping, it forwards event by
//! event, holding back only the current incomplete event, and drops exactly one kind of
//! event: the usage-only chunk (`choices: []` + `usage`) the gateway asked for on a
//! client's behalf. Parsing is bounded (1 MiB per event) and cannot fail: whatever it does
//! not understand it skips. Usage is never summed: the last report wins, field by field.

mod payload;
mod sse;
#[cfg(test)]
mod tests;

use std::ops::Range;

use bytes::{Bytes, BytesMut};

use payload::{Payload, ReportedUsage};
use sse::{Event, EventAssembler, LineRole, LineSplitter, Piece, MAX_EVENT_BYTES};

/// Token counts as reported by an upstream (or estimated).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// `prompt_tokens_details.cached_tokens`; part of `prompt_tokens`.
    pub cached_tokens: u64,
}

impl Usage {
    pub fn total(&self) -> u64 {
        self.prompt_tokens.saturating_add(self.completion_tokens)
    }
}

/// How a stream ended (rule 10).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamEnd {
    /// `data: [DONE]` seen.
    Done,
    /// A choice finished (`finish_reason` set) but no `[DONE]` came.
    FinishedWithoutDone,
    /// The upstream sent an error event (a payload with a top-level `error`).
    ErrorEvent,
    /// EOF or reset with neither a finish nor `[DONE]`.
    Truncated,
}

/// What the tap learned from a whole stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamSummary {
    /// The last usage the upstream reported (last wins, never summed); `None` when it
    /// reported none (null / absent / all-zero at the end).
    pub usage: Option<Usage>,
    pub end: StreamEnd,
    /// True when the very first event was an error (a failed request, nothing billable).
    pub is_error_first: bool,
    /// Content-bearing chunks seen (used to estimate completion tokens when the upstream
    /// reported no usage).
    pub content_chunks: u64,
}

/// Incremental tap over an SSE body.
#[derive(Debug)]
pub struct StreamTap {
    splitter: LineSplitter,
    reader: StreamReader,
    /// `Some` when stripping the usage-only chunk.
    forwarder: Option<Forwarder>,
    is_finished: bool,
    /// Reads no further than the stream's first event (`StreamTap::opening`).
    stops_at_first_event: bool,
}

impl StreamTap {
    /// `strip_usage_chunk`: drop the usage-only chunk (`choices: []` + usage) from what
    /// is forwarded, because the gateway injected `include_usage` and the client did not
    /// ask for it.
    pub fn new(strip_usage_chunk: bool) -> Self {
        Self {
            splitter: LineSplitter::default(),
            reader: StreamReader::default(),
            forwarder: strip_usage_chunk.then(Forwarder::default),
            is_finished: false,
            stops_at_first_event: false,
        }
    }

    /// A tap for a stream's opening: it reads up to the first event (a JSON chunk, an
    /// error, or `[DONE]`) and no further, so the bytes after it in the same read are
    /// parsed once, by the tap that meters the stream, not twice. Forwards every byte.
    pub fn opening() -> Self {
        Self {
            stops_at_first_event: true,
            ..Self::new(false)
        }
    }

    /// Feeds one read from the upstream; returns the bytes to forward now, unchanged and
    /// in order (except the stripped usage chunk). May hold back an incomplete event only
    /// when stripping.
    pub fn feed(&mut self, chunk: Bytes) -> Bytes {
        if self.is_finished {
            return chunk;
        }
        let mut out = Output::default();
        let mut pos = 0;
        while let Some(piece) = self.splitter.next(&chunk, pos) {
            let (end, step) = match piece {
                Piece::CrlfTail { end } => (end, Step::SameAsPrevious),
                Piece::Partial { end } => (end, Step::Unfinished),
                Piece::Line { end, text } => {
                    let line = self.splitter.text(&chunk, text);
                    let kind = self.reader.read_line(line);
                    if self.stops_at_first_event && self.has_read_an_event() {
                        self.is_finished = true;
                        return chunk;
                    }
                    (end, Step::Line(kind))
                }
            };
            if let Some(forwarder) = &mut self.forwarder {
                forwarder.route(step, &chunk, pos..end, &mut out);
            }
            pos = end;
        }
        match &mut self.forwarder {
            Some(forwarder) => {
                forwarder.end_read(&chunk);
                out.into_bytes(&chunk)
            }
            None => chunk,
        }
    }

    /// At upstream EOF (or reset): the bytes still held back, to forward.
    ///
    /// A last event that never got its blank line is still read when it is a complete
    /// JSON object (see `recovered_at_eof`); if it is the usage-only chunk being
    /// stripped, it is not forwarded.
    pub fn finish(&mut self) -> Bytes {
        if std::mem::replace(&mut self.is_finished, true) {
            return Bytes::new();
        }
        if let Some(text) = self.splitter.finish() {
            let line = self.splitter.text(&[], text);
            self.reader.read_line(line);
        }
        let is_usage_only = self.reader.finish();
        match &mut self.forwarder {
            Some(forwarder) if !is_usage_only => Bytes::from(std::mem::take(&mut forwarder.held)),
            _ => Bytes::new(),
        }
    }

    /// What was learned so far (callable at any time, e.g. on client disconnect).
    pub fn summary(&self) -> StreamSummary {
        self.reader.summary()
    }

    /// True once `data: [DONE]` has been read, whatever came before it (an error event
    /// makes `summary().end` `ErrorEvent` even when `[DONE]` follows).
    pub fn has_seen_done(&self) -> bool {
        self.reader.is_done
    }

    /// True once the stream's first event (a JSON chunk, an error, or `[DONE]`) has been
    /// read; comments, keep-alives and non-JSON data before it do not count.
    pub fn has_read_an_event(&self) -> bool {
        self.reader.json_events > 0 || self.reader.is_done
    }

    /// The data of the first event when that event was an error (what a 200 that failed
    /// says about why).
    pub fn first_error(&self) -> Option<&[u8]> {
        self.reader.first_error.as_deref()
    }

    /// True when the last event was read at EOF without its closing blank line.
    pub fn recovered_at_eof(&self) -> bool {
        self.reader.recovered_at_eof
    }

    /// Events left unread because they exceeded the 1 MiB bound (still forwarded).
    pub fn oversize_events(&self) -> u64 {
        self.reader.assembler.oversize_events
    }
}

/// What a piece of input was, for forwarding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Line(LineKind),
    /// The LF of a CRLF split across reads: it follows its CR.
    SameAsPrevious,
    /// An unterminated line.
    Unfinished,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LineKind {
    /// A comment before any field of an event: nothing to hold it for.
    LoneComment,
    /// A field line, or a comment between fields.
    InsideEvent,
    EventEnd {
        is_usage_only: bool,
    },
}

/// The stream's parse state and everything learned from it.
#[derive(Debug, Default)]
struct StreamReader {
    assembler: EventAssembler,
    usage: ReportedUsage,
    has_usage: bool,
    is_done: bool,
    has_finish: bool,
    has_error: bool,
    is_error_first: bool,
    /// The first event's data, when it was an error.
    first_error: Option<Vec<u8>>,
    json_events: u64,
    content_chunks: u64,
    recovered_at_eof: bool,
}

impl StreamReader {
    fn read_line(&mut self, line: Option<&[u8]>) -> LineKind {
        match self.assembler.push(line) {
            LineRole::Comment {
                is_inside_event: false,
            } => LineKind::LoneComment,
            LineRole::Comment { .. } | LineRole::Field => LineKind::InsideEvent,
            LineRole::EventEnd(event) => LineKind::EventEnd {
                is_usage_only: event.is_some_and(|event| {
                    let is_usage_only = self.read_event(&event);
                    self.assembler.recycle(event.data);
                    is_usage_only
                }),
            },
        }
    }

    /// At EOF: reads a pending event if it is whole. Returns whether it was the usage-only
    /// chunk.
    fn finish(&mut self) -> bool {
        let Some(event) = self.assembler.finish() else {
            return false;
        };
        let is_readable =
            event.is_flagged_error || !matches!(payload::read_payload(&event.data), Payload::Other);
        self.recovered_at_eof = is_readable;
        is_readable && self.read_event(&event)
    }

    /// Records one event; returns whether it is the usage-only chunk.
    fn read_event(&mut self, event: &Event) -> bool {
        let facts = match payload::read_payload(&event.data) {
            Payload::Done => {
                self.is_done = true;
                return false;
            }
            Payload::Other if event.is_flagged_error => payload::ChunkFacts {
                is_error: true,
                ..payload::ChunkFacts::default()
            },
            Payload::Other => return false,
            Payload::Chunk(mut facts) => {
                facts.is_error |= event.is_flagged_error;
                facts
            }
        };
        if facts.is_error {
            if self.json_events == 0 {
                self.is_error_first = true;
                self.first_error = Some(event.data.clone());
            }
            self.has_error = true;
        }
        self.json_events += 1;
        // All-zero usage is a placeholder: it neither counts nor erases a real figure
        // (`all_zero_after_a_real_figure_does_not_erase_it`).
        if let Some(usage) = facts.usage.filter(|u| !u.is_all_zero()) {
            self.usage.merge(usage);
            self.has_usage = true;
        }
        self.has_finish |= facts.has_finish;
        self.content_chunks += facts.content_choices;
        facts.is_usage_only
    }

    fn summary(&self) -> StreamSummary {
        let end = if self.has_error {
            StreamEnd::ErrorEvent
        } else if self.is_done {
            StreamEnd::Done
        } else if self.has_finish {
            StreamEnd::FinishedWithoutDone
        } else {
            StreamEnd::Truncated
        };
        StreamSummary {
            usage: self.has_usage.then(|| self.usage.resolve()).flatten(),
            end,
            is_error_first: self.is_error_first,
            content_chunks: self.content_chunks,
        }
    }
}

/// Forwarding when stripping: holds the current event's bytes until it is known not to be
/// the usage-only chunk. Comments before an event's first field go out at once, so
/// keep-alives are never delayed (`lone_comments_are_forwarded_at_once_when_stripping`);
/// the LF of a CRLF split across reads follows its CR's fate
/// (`stripped_cr_terminated_usage_chunk_takes_its_split_lf_along`).
#[derive(Debug, Default)]
struct Forwarder {
    /// Held bytes from earlier reads.
    held: Vec<u8>,
    /// Where the held bytes start in the current read (they run up to the current piece).
    held_from: Option<usize>,
    /// The held event outgrew the bound: forward the rest of it as it comes.
    is_passing_through: bool,
    previous: Disposition,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Disposition {
    #[default]
    Forward,
    Hold,
    Drop,
}

impl Forwarder {
    fn route(&mut self, step: Step, input: &Bytes, range: Range<usize>, out: &mut Output) {
        let is_event_end = matches!(step, Step::Line(LineKind::EventEnd { .. }));
        let disposition = match step {
            _ if self.is_passing_through => Disposition::Forward,
            Step::SameAsPrevious => self.previous,
            Step::Unfinished | Step::Line(LineKind::InsideEvent) => Disposition::Hold,
            Step::Line(LineKind::LoneComment) => Disposition::Forward,
            Step::Line(LineKind::EventEnd { is_usage_only }) => {
                if is_usage_only {
                    Disposition::Drop
                } else {
                    Disposition::Forward
                }
            }
        };
        match disposition {
            Disposition::Forward => self.forward(input, range, out),
            Disposition::Hold => {
                let from = *self.held_from.get_or_insert(range.start);
                let held = self.held.len() + (range.end - from);
                if held > MAX_EVENT_BYTES {
                    self.is_passing_through = true;
                    self.forward(input, range, out);
                }
            }
            Disposition::Drop => {
                self.held.clear();
                self.held_from = None;
            }
        }
        if is_event_end {
            self.is_passing_through = false;
        }
        self.previous = disposition;
    }

    /// Forwards everything held and the current piece.
    fn forward(&mut self, input: &Bytes, piece: Range<usize>, out: &mut Output) {
        out.push_held(input, &mut self.held);
        let start = self.held_from.take().unwrap_or(piece.start);
        out.push_input(input, start..piece.end);
    }

    /// At the end of a read: keeps what is held of it.
    fn end_read(&mut self, input: &Bytes) {
        if let Some(from) = self.held_from.take() {
            self.held
                .extend_from_slice(input.get(from..).unwrap_or_default());
        }
    }
}

/// The bytes one `feed` forwards: a slice of the read when possible, a copy otherwise.
#[derive(Debug, Default)]
struct Output {
    /// Forwarded bytes, as one range of the read (while `owned` is `None`).
    slice: Option<Range<usize>>,
    owned: Option<BytesMut>,
}

impl Output {
    fn push_input(&mut self, input: &Bytes, range: Range<usize>) {
        if range.is_empty() {
            return;
        }
        if self.owned.is_none() {
            match &mut self.slice {
                None => {
                    self.slice = Some(range);
                    return;
                }
                Some(current) if current.end == range.start => {
                    current.end = range.end;
                    return;
                }
                Some(_) => {}
            }
        }
        self.owned(input)
            .extend_from_slice(input.get(range).unwrap_or_default());
    }

    fn push_held(&mut self, input: &Bytes, held: &mut Vec<u8>) {
        if !held.is_empty() {
            self.owned(input).extend_from_slice(held);
            held.clear();
        }
    }

    /// Switches to a buffer of its own, starting with the slice forwarded so far.
    fn owned(&mut self, input: &Bytes) -> &mut BytesMut {
        let slice = self.slice.take();
        self.owned.get_or_insert_with(|| {
            BytesMut::from(slice.and_then(|r| input.get(r)).unwrap_or_default())
        })
    }

    fn into_bytes(self, input: &Bytes) -> Bytes {
        match (self.owned, self.slice) {
            (Some(buffer), _) => buffer.freeze(),
            (None, Some(range)) => input.slice(range),
            (None, None) => Bytes::new(),
        }
    }
}

/// Outcome of a non-streamed 2xx body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BodySummary {
    pub usage: Option<Usage>,
    /// A 2xx whose JSON has a top-level `error`.
    pub is_error: bool,
}

/// Reads usage from a complete non-streamed JSON body (same usage rules as a stream; a
/// body that is not a JSON object has neither usage nor error).
pub fn summarize_body(body: &[u8]) -> BodySummary {
    let facts = payload::read_object(body).unwrap_or_default();
    BodySummary {
        usage: facts
            .usage
            .filter(|usage| !usage.is_all_zero())
            .and_then(|usage| usage.resolve()),
        is_error: facts.is_error,
    }
}

//! The framing of a chunked request body (RFC 9112 §7.1), followed over the
//! bytes that pass through, so that a chunked blob upload goes to the
//! registry exactly as the client framed it and archmerge knows where it
//! ends. Pure: no I/O; the upload reader ([`super::upload`]) feeds it.
//!
//! Strict where a lenient reader could disagree with the registry about
//! where the body ends: every line ends in CRLF (a bare LF or CR is an
//! error), and a chunk's data is followed by CRLF. Bounded: a line of
//! framing and the trailer fields have a length limit.

/// Longest line of framing taken: a chunk's size with its extensions, or
/// one trailer field.
const MAX_LINE: usize = 4096;

/// Most bytes of trailer fields taken.
const MAX_TRAILERS: usize = 16 * 1024;

/// Why a chunked body's framing is not taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum ChunkError {
    /// A chunk size with no hexadecimal digit, or another byte in it.
    #[error("a chunk size that is not hexadecimal")]
    Size,
    /// A chunk size past what 64 bits hold.
    #[error("a chunk size past 2^64")]
    Overflow,
    /// A chunk's data not followed by CRLF.
    #[error("a chunk's data not followed by CRLF")]
    DataEnd,
    /// A line of framing not ended by CRLF.
    #[error("a line of framing not ended by CRLF")]
    LineEnd,
    /// A line of framing past [`MAX_LINE`].
    #[error("a line of framing past {MAX_LINE} bytes")]
    LongLine,
    /// Trailer fields past [`MAX_TRAILERS`].
    #[error("trailer fields past {MAX_TRAILERS} bytes")]
    LongTrailers,
}

/// Where the framing is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// In a chunk's size: `digits` of it read so far.
    Size { digits: u32 },
    /// Past the size, before the line's CR (extensions, whitespace).
    Extension,
    /// The size line's CR seen.
    SizeLf,
    /// In a chunk's data, this many bytes to go.
    Data(u64),
    /// Past a chunk's data, before its CR.
    DataCr,
    /// A chunk's data and its CR seen.
    DataLf,
    /// At the start of a trailer field, or of the empty line that ends the
    /// body.
    LineStart,
    /// In a trailer field.
    Trailer,
    /// A trailer field's CR seen.
    TrailerLf,
    /// The last line's CR seen.
    EndLf,
    /// The body is over.
    Done,
}

/// A chunked body's framing, followed from its first byte.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Chunks {
    state: State,
    /// The size of the chunk whose size line is being read.
    size: u64,
    /// Bytes of the line of framing being read.
    line: usize,
    /// Bytes of trailer fields so far.
    trailers: usize,
}

impl Default for Chunks {
    fn default() -> Chunks {
        Chunks {
            state: State::Size { digits: 0 },
            size: 0,
            line: 0,
            trailers: 0,
        }
    }
}

impl Chunks {
    /// Follows `bytes`, the next of the body's: how many of them belong to
    /// it (all, unless the body ends among them).
    pub(crate) fn feed(&mut self, bytes: &[u8]) -> Result<usize, ChunkError> {
        let mut i = 0;
        while i < bytes.len() {
            match self.state {
                State::Done => return Ok(i),
                // A chunk's data is skipped over whole, not looked at.
                State::Data(left) => {
                    let n = left.min((bytes.len() - i) as u64);
                    i += n as usize;
                    self.state = match left - n {
                        0 => State::DataCr,
                        left => State::Data(left),
                    };
                }
                _ => {
                    self.step(bytes[i])?;
                    i += 1;
                }
            }
        }
        Ok(i)
    }

    /// Whether the body is over: its last chunk and trailer section came.
    pub(crate) fn done(&self) -> bool {
        self.state == State::Done
    }

    /// In a chunk's data: the bytes of it to go, taken as followed (the
    /// framing goes on after them). Otherwise 0.
    pub(crate) fn take_data(&mut self) -> u64 {
        match self.state {
            State::Data(left) => {
                self.state = State::DataCr;
                left
            }
            _ => 0,
        }
    }

    fn step(&mut self, b: u8) -> Result<(), ChunkError> {
        self.state = match self.state {
            State::Size { digits } => {
                self.line(1)?;
                match (b as char).to_digit(16) {
                    Some(d) => {
                        self.size = self
                            .size
                            .checked_mul(16)
                            .and_then(|s| s.checked_add(u64::from(d)))
                            .ok_or(ChunkError::Overflow)?;
                        State::Size { digits: digits + 1 }
                    }
                    None if digits == 0 => return Err(ChunkError::Size),
                    None => match b {
                        b'\r' => State::SizeLf,
                        b';' | b' ' | b'\t' => State::Extension,
                        _ => return Err(ChunkError::Size),
                    },
                }
            }
            State::Extension => {
                self.line(1)?;
                match b {
                    b'\r' => State::SizeLf,
                    b'\n' => return Err(ChunkError::LineEnd),
                    _ => State::Extension,
                }
            }
            State::SizeLf => {
                if b != b'\n' {
                    return Err(ChunkError::LineEnd);
                }
                self.line = 0;
                match std::mem::take(&mut self.size) {
                    0 => State::LineStart,
                    size => State::Data(size),
                }
            }
            State::DataCr if b == b'\r' => State::DataLf,
            State::DataLf if b == b'\n' => State::Size { digits: 0 },
            State::DataCr | State::DataLf => return Err(ChunkError::DataEnd),
            State::LineStart | State::Trailer => match b {
                b'\r' if self.state == State::LineStart => State::EndLf,
                b'\r' => State::TrailerLf,
                b'\n' => return Err(ChunkError::LineEnd),
                _ => {
                    self.line(1)?;
                    self.trailers += 1;
                    if self.trailers > MAX_TRAILERS {
                        return Err(ChunkError::LongTrailers);
                    }
                    State::Trailer
                }
            },
            State::TrailerLf | State::EndLf if b != b'\n' => return Err(ChunkError::LineEnd),
            State::TrailerLf => {
                self.line = 0;
                State::LineStart
            }
            State::EndLf => State::Done,
            // `feed` never steps through these.
            State::Data(_) | State::Done => self.state,
        };
        Ok(())
    }

    /// Counts `n` more bytes of the line of framing being read.
    fn line(&mut self, n: usize) -> Result<(), ChunkError> {
        self.line += n;
        if self.line > MAX_LINE {
            return Err(ChunkError::LongLine);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The bytes of a body, whole, then fed one byte at a time: how many
    /// belong to it, and whether it is over.
    fn follow(bytes: &[u8]) -> Result<(usize, bool), ChunkError> {
        let mut whole = Chunks::default();
        let used = whole.feed(bytes)?;
        let mut single = Chunks::default();
        let mut one_by_one = 0;
        for b in bytes {
            let n = single.feed(std::slice::from_ref(b))?;
            one_by_one += n;
            if n == 0 {
                break;
            }
        }
        assert_eq!(used, one_by_one, "{:?}", String::from_utf8_lossy(bytes));
        assert_eq!(whole, single);
        Ok((used, whole.done()))
    }

    #[test]
    fn a_body_ends_after_its_last_chunk_and_trailer_section() {
        let cases: [(&[u8], usize, bool); 8] = [
            (b"5\r\nhello\r\n0\r\n\r\n", 15, true),
            (b"5\r\nhello\r\n0\r\n\r\nGET / HTTP/1.1\r\n", 15, true),
            (b"A\r\n0123456789\r\n000\r\n\r\nX", 22, true),
            (b"5;name=value;x\r\nhello\r\n0;last\r\n\r\n", 33, true),
            (
                b"5 \r\nhello\r\n0\r\nDigest: sha-256=:x:\r\nA: b\r\n\r\nnext",
                43,
                true,
            ),
            (b"ffff\r\n", 6, false),
            (b"5\r\nhel", 6, false),
            (b"5\r\nhello\r\n0\r\n", 13, false),
        ];
        for (bytes, used, done) in cases {
            assert_eq!(
                follow(bytes),
                Ok((used, done)),
                "{:?}",
                String::from_utf8_lossy(bytes)
            );
        }
    }

    #[test]
    fn the_data_of_a_chunk_is_taken_whole_and_the_framing_goes_on_after_it() {
        let mut chunks = Chunks::default();
        assert_eq!(chunks.take_data(), 0);
        assert_eq!(chunks.feed(b"A\r\n0123"), Ok(7));
        assert_eq!(chunks.take_data(), 6);
        assert_eq!(chunks.take_data(), 0);
        assert_eq!(chunks.feed(b"\r\n0\r\n\r\nGET"), Ok(7));
        assert!(chunks.done());
        let mut cut = Chunks::default();
        assert_eq!(cut.feed(b"5\r\n"), Ok(3));
        assert_eq!(cut.take_data(), 5);
        assert_eq!(cut.feed(b"X"), Err(ChunkError::DataEnd));
    }

    #[test]
    fn a_chunks_data_is_skipped_whatever_it_holds() {
        // Data that looks like the body's end.
        let mut body = b"7\r\n\r\n0\r\n\r\n\r\n".to_vec();
        body.extend_from_slice(b"0\r\n\r\n");
        assert_eq!(follow(&body), Ok((body.len(), true)));
        let mut big = Chunks::default();
        assert_eq!(big.feed(b"40000000\r\n"), Ok(10));
        assert_eq!(big.feed(&vec![b'\n'; 1 << 20]), Ok(1 << 20));
        assert!(!big.done());
    }

    #[test]
    fn framing_a_lenient_reader_could_read_another_way_is_refused() {
        let cases: [(&[u8], ChunkError); 12] = [
            (b"\r\n", ChunkError::Size),
            (b"x\r\n", ChunkError::Size),
            (b"5x\r\n", ChunkError::Size),
            (b"+5\r\n", ChunkError::Size),
            (b"5\n", ChunkError::Size),
            (b"5;a\nhello", ChunkError::LineEnd),
            (b"5\rhello", ChunkError::LineEnd),
            (b"5\r\nhelloX", ChunkError::DataEnd),
            (b"5\r\nhello\rX", ChunkError::DataEnd),
            (b"0\r\nA: b\n\r\n", ChunkError::LineEnd),
            (b"0\r\n\n", ChunkError::LineEnd),
            (b"10000000000000000\r\n", ChunkError::Overflow),
        ];
        for (bytes, error) in cases {
            assert_eq!(
                follow(bytes),
                Err(error),
                "{:?}",
                String::from_utf8_lossy(bytes)
            );
        }
        assert_eq!(follow(b"ffffffffffffffff\r\n"), Ok((18, false)));
    }

    #[test]
    fn lines_of_framing_and_trailers_are_bounded() {
        let mut long = b"5;".to_vec();
        long.resize(MAX_LINE, b'x');
        assert_eq!(follow(&long), Ok((MAX_LINE, false)));
        long.push(b'x');
        assert_eq!(follow(&long), Err(ChunkError::LongLine));

        let mut trailers = b"0\r\n".to_vec();
        for _ in 0..MAX_TRAILERS / 98 + 1 {
            trailers.extend_from_slice(&[b'a'; 98]);
            trailers.extend_from_slice(b"\r\n");
        }
        assert_eq!(follow(&trailers), Err(ChunkError::LongTrailers));
    }

    proptest! {
        /// However a well-framed body is cut into pieces, the pieces fed
        /// one after another end exactly where the body does, and the
        /// request after it is left alone.
        #[test]
        fn a_body_cut_anywhere_ends_where_it_ends(
            chunks in proptest::collection::vec(
                (proptest::collection::vec(any::<u8>(), 1..300), any::<bool>(), any::<bool>()),
                0..12,
            ),
            trailers in proptest::collection::vec("[A-Za-z-]{1,12}: [ -~]{0,20}", 0..3),
            cuts in proptest::collection::vec(any::<proptest::sample::Index>(), 0..8),
        ) {
            let mut body = Vec::new();
            for (data, upper, extension) in &chunks {
                let size = if *upper {
                    format!("{:X}", data.len())
                } else {
                    format!("{:x}", data.len())
                };
                body.extend(size.into_bytes());
                if *extension {
                    body.extend_from_slice(b";name=\"va lue\"");
                }
                body.extend_from_slice(b"\r\n");
                body.extend_from_slice(data);
                body.extend_from_slice(b"\r\n");
            }
            body.extend_from_slice(b"0\r\n");
            for t in &trailers {
                body.extend_from_slice(t.as_bytes());
                body.extend_from_slice(b"\r\n");
            }
            body.extend_from_slice(b"\r\n");
            let len = body.len();
            body.extend_from_slice(b"GET /v2/ HTTP/1.1\r\n\r\n");

            let mut at: Vec<usize> = cuts.iter().map(|i| i.index(body.len())).collect();
            at.push(body.len());
            at.sort_unstable();
            let mut chunks = Chunks::default();
            let (mut from, mut used) = (0, 0);
            for to in at {
                let n = chunks.feed(&body[from..to]).unwrap();
                used += n;
                if n < to - from {
                    break;
                }
                from = to;
            }
            prop_assert!(chunks.done());
            prop_assert_eq!(used, len);
        }
    }
}

//! A streaming parser of Postgres' binary COPY format.
//!
//! Postgres sends one CopyData message per row, but the protocol does not promise it, so
//! the parser carries a partial row over to the next chunk. Rows that arrive whole (the
//! usual case) are parsed in place without copying.

use super::Error;

const SIGNATURE: &[u8] = b"PGCOPY\n\xff\r\n\0";
/// The widest row we read (tuples: subject, object, permission, expires_at).
pub(crate) const MAX_FIELDS: usize = 4;

/// One row's fields; `None` is SQL NULL.
pub(crate) type Fields<'a> = [Option<&'a [u8]>; MAX_FIELDS];

/// The parse state of one COPY stream.
pub(crate) struct CopyParser {
    header_done: bool,
    finished: bool,
    carry: Vec<u8>,
}

enum Step {
    Row(usize),
    Trailer(usize),
    NeedMore,
}

impl CopyParser {
    pub(crate) fn new() -> Self {
        Self {
            header_done: false,
            finished: false,
            carry: Vec::new(),
        }
    }

    /// Feeds one chunk, calling `on_row` for every complete row in it.
    pub(crate) fn feed(
        &mut self,
        chunk: &[u8],
        mut on_row: impl FnMut(&Fields<'_>) -> Result<(), Error>,
    ) -> Result<(), Error> {
        if self.carry.is_empty() {
            let used = self.parse(chunk, &mut on_row)?;
            self.carry.extend_from_slice(&chunk[used..]);
        } else {
            let mut buf = std::mem::take(&mut self.carry);
            buf.extend_from_slice(chunk);
            let used = self.parse(&buf, &mut on_row)?;
            buf.drain(..used);
            self.carry = buf;
        }
        Ok(())
    }

    /// Confirms the stream ended with the trailer and nothing else.
    pub(crate) fn finish(&self) -> Result<(), Error> {
        if self.finished && self.carry.is_empty() {
            Ok(())
        } else {
            Err(Error::Copy("stream ended before the COPY trailer".into()))
        }
    }

    fn parse(
        &mut self,
        buf: &[u8],
        on_row: &mut impl FnMut(&Fields<'_>) -> Result<(), Error>,
    ) -> Result<usize, Error> {
        let mut pos = 0;
        if !self.header_done {
            let Some(header_len) = header_len(buf)? else {
                return Ok(0);
            };
            pos = header_len;
            self.header_done = true;
        }
        while pos < buf.len() {
            if self.finished {
                return Err(Error::Copy("data after the COPY trailer".into()));
            }
            let mut fields: Fields<'_> = [None; MAX_FIELDS];
            match row(&buf[pos..], &mut fields)? {
                Step::Row(len) => {
                    on_row(&fields)?;
                    pos += len;
                }
                Step::Trailer(len) => {
                    self.finished = true;
                    pos += len;
                }
                Step::NeedMore => break,
            }
        }
        Ok(pos)
    }
}

fn header_len(buf: &[u8]) -> Result<Option<usize>, Error> {
    let fixed = SIGNATURE.len() + 8;
    if buf.len() < fixed {
        return Ok(None);
    }
    if &buf[..SIGNATURE.len()] != SIGNATURE {
        return Err(Error::Copy("missing binary COPY signature".into()));
    }
    let ext = read_i32(&buf[SIGNATURE.len() + 4..]);
    let ext = usize::try_from(ext).map_err(|_| Error::Copy("negative header extension".into()))?;
    if buf.len() < fixed + ext {
        return Ok(None);
    }
    Ok(Some(fixed + ext))
}

fn row<'a>(buf: &'a [u8], fields: &mut Fields<'a>) -> Result<Step, Error> {
    if buf.len() < 2 {
        return Ok(Step::NeedMore);
    }
    let count = i16::from_be_bytes([buf[0], buf[1]]);
    if count == -1 {
        return Ok(Step::Trailer(2));
    }
    let count = usize::try_from(count).map_err(|_| Error::Copy("negative field count".into()))?;
    if count > MAX_FIELDS {
        return Err(Error::Copy(format!(
            "row has {count} fields, at most {MAX_FIELDS} expected"
        )));
    }
    let mut pos = 2;
    for field in fields.iter_mut().take(count) {
        if buf.len() < pos + 4 {
            return Ok(Step::NeedMore);
        }
        let len = read_i32(&buf[pos..]);
        pos += 4;
        if len < 0 {
            *field = None;
            continue;
        }
        let len = len as usize;
        if buf.len() < pos + len {
            return Ok(Step::NeedMore);
        }
        *field = Some(&buf[pos..pos + len]);
        pos += len;
    }
    Ok(Step::Row(pos))
}

fn read_i32(buf: &[u8]) -> i32 {
    i32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]])
}

/// A text field as `&str`; NULL or invalid UTF-8 is a protocol error.
pub(crate) fn text<'a>(field: Option<&'a [u8]>, what: &str) -> Result<&'a str, Error> {
    std::str::from_utf8(bytes(field, what)?).map_err(|_| not_utf8(what))
}

/// A field's bytes; NULL is a protocol error.
pub(crate) fn bytes<'a>(field: Option<&'a [u8]>, what: &str) -> Result<&'a [u8], Error> {
    field.ok_or_else(|| Error::Copy(format!("{what} is NULL")))
}

/// The error of a text field `what` that is not UTF-8.
pub(crate) fn not_utf8(what: &str) -> Error {
    Error::Copy(format!("{what} is not UTF-8"))
}

/// An int8 field; NULL is `None`.
pub(crate) fn int8(field: Option<&[u8]>, what: &str) -> Result<Option<i64>, Error> {
    match field {
        None => Ok(None),
        Some(b) => <[u8; 8]>::try_from(b)
            .map(|b| Some(i64::from_be_bytes(b)))
            .map_err(|_| Error::Copy(format!("{what} is not an int8"))),
    }
}

/// Microseconds from the Unix epoch to Postgres' epoch, 2000-01-01 00:00:00 UTC.
const POSTGRES_EPOCH_MICROS: i64 = 946_684_800_000_000;

/// A binary timestamptz field as microseconds since the Unix epoch; NULL is `None`.
/// `infinity` (which `permd.tuples` refuses anyway) reads as `None`, never expiring, and
/// `-infinity` as the earliest time.
pub(crate) fn timestamptz(field: Option<&[u8]>, what: &str) -> Result<Option<i64>, Error> {
    Ok(int8(field, what)?.and_then(|micros| match micros {
        i64::MAX => None,
        i64::MIN => Some(i64::MIN),
        m => Some(m.saturating_add(POSTGRES_EPOCH_MICROS)),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream(rows: &[&[Option<&[u8]>]]) -> Vec<u8> {
        let mut out = SIGNATURE.to_vec();
        out.extend_from_slice(&0i32.to_be_bytes());
        out.extend_from_slice(&0i32.to_be_bytes());
        for row in rows {
            out.extend_from_slice(&(row.len() as i16).to_be_bytes());
            for f in *row {
                match f {
                    None => out.extend_from_slice(&(-1i32).to_be_bytes()),
                    Some(b) => {
                        out.extend_from_slice(&(b.len() as i32).to_be_bytes());
                        out.extend_from_slice(b);
                    }
                }
            }
        }
        out.extend_from_slice(&(-1i16).to_be_bytes());
        out
    }

    fn parse_in_chunks(data: &[u8], chunk: usize) -> Vec<(String, Option<i64>)> {
        let mut parser = CopyParser::new();
        let mut rows = Vec::new();
        for piece in data.chunks(chunk) {
            parser
                .feed(piece, |f| {
                    rows.push((text(f[0], "a")?.to_owned(), int8(f[1], "b")?));
                    Ok(())
                })
                .expect("valid stream");
        }
        parser.finish().expect("complete stream");
        rows
    }

    #[test]
    fn rows_split_at_every_byte_boundary_parse_the_same() {
        let seven = 7i64.to_be_bytes();
        let data = stream(&[&[Some(b"alpha"), Some(&seven)], &[Some(b""), None]]);
        let expected = vec![("alpha".to_owned(), Some(7)), (String::new(), None)];
        for chunk in 1..=data.len() {
            assert_eq!(
                parse_in_chunks(&data, chunk),
                expected,
                "chunk size {chunk}"
            );
        }
    }

    #[test]
    fn a_truncated_stream_is_an_error() {
        let data = stream(&[&[Some(b"alpha"), None]]);
        let mut parser = CopyParser::new();
        parser
            .feed(&data[..data.len() - 3], |_| Ok(()))
            .expect("prefix parses");
        assert!(parser.finish().is_err());
    }

    #[test]
    fn timestamps_count_from_the_unix_epoch() {
        let at = |micros: i64| timestamptz(Some(&micros.to_be_bytes()), "t").expect("int8");
        assert_eq!(at(0), Some(POSTGRES_EPOCH_MICROS));
        assert_eq!(at(-POSTGRES_EPOCH_MICROS), Some(0));
        assert_eq!(at(i64::MAX), None);
        assert_eq!(at(i64::MIN), Some(i64::MIN));
        assert_eq!(timestamptz(None, "t").expect("null"), None);
    }

    #[test]
    fn garbage_is_rejected() {
        let mut parser = CopyParser::new();
        assert!(parser
            .feed(b"PGCOPY\nnot really a copy stream", |_| Ok(()))
            .is_err());
    }
}

//! RecordIO, the framing of Mesos's streaming responses: each record is its
//! length in decimal ASCII, a newline, then that many bytes.

/// Frames one record.
pub fn encode(record: &[u8]) -> Vec<u8> {
    let mut framed = Vec::with_capacity(record.len() + 12);
    framed.extend_from_slice(record.len().to_string().as_bytes());
    framed.push(b'\n');
    framed.extend_from_slice(record);
    framed
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RecordIoError {
    /// the record header is not a decimal length followed by a newline
    #[error("malformed RecordIO header {0:?}: expected a decimal length and a newline")]
    BadHeader(String),
    /// the record is larger than the reader accepts
    #[error("RecordIO record of {len} bytes exceeds the limit of {limit} bytes")]
    TooLarge { len: usize, limit: usize },
}

/// Splits a byte stream that arrives in arbitrary chunks back into records.
#[derive(Debug)]
pub struct Decoder {
    buffer: Vec<u8>,
    max_record: usize,
}

impl Decoder {
    pub fn new(max_record: usize) -> Self {
        Self {
            buffer: Vec::new(),
            max_record,
        }
    }

    /// Feeds a chunk and returns every record it completed.
    pub fn feed(&mut self, chunk: &[u8]) -> Result<Vec<Vec<u8>>, RecordIoError> {
        self.buffer.extend_from_slice(chunk);
        let mut records = Vec::new();
        loop {
            let Some(newline) = self.buffer.iter().position(|&b| b == b'\n') else {
                // A length header has at most 20 digits; more is garbage, not a slow sender.
                if self.buffer.len() > 20 {
                    return Err(self.bad_header(self.buffer.len().min(24)));
                }
                break;
            };
            let header = &self.buffer[..newline];
            let len: usize = std::str::from_utf8(header)
                .ok()
                .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| self.bad_header(newline))?;
            if len > self.max_record {
                return Err(RecordIoError::TooLarge {
                    len,
                    limit: self.max_record,
                });
            }
            let end = newline + 1 + len;
            if self.buffer.len() < end {
                break;
            }
            records.push(self.buffer[newline + 1..end].to_vec());
            self.buffer.drain(..end);
        }
        Ok(records)
    }

    fn bad_header(&self, upto: usize) -> RecordIoError {
        RecordIoError::BadHeader(String::from_utf8_lossy(&self.buffer[..upto]).into_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn empty_record_round_trips() {
        let mut decoder = Decoder::new(16);
        assert_eq!(decoder.feed(&encode(b"")).unwrap(), vec![Vec::<u8>::new()]);
    }

    #[test]
    fn garbage_header_is_an_error() {
        let mut decoder = Decoder::new(16);
        assert!(matches!(
            decoder.feed(b"12x\nabc"),
            Err(RecordIoError::BadHeader(_))
        ));
        let mut decoder = Decoder::new(16);
        assert!(matches!(
            decoder.feed(&[b'9'; 30]),
            Err(RecordIoError::BadHeader(_))
        ));
    }

    #[test]
    fn oversized_record_is_refused_before_buffering() {
        let mut decoder = Decoder::new(4);
        assert_eq!(
            decoder.feed(b"5\n"),
            Err(RecordIoError::TooLarge { len: 5, limit: 4 })
        );
    }

    proptest! {
        #[test]
        fn records_survive_any_chunking(
            records in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..64), 0..8),
            chunk in 1usize..17,
        ) {
            let stream: Vec<u8> = records.iter().flat_map(|r| encode(r)).collect();
            let mut decoder = Decoder::new(1 << 20);
            let mut decoded = Vec::new();
            for piece in stream.chunks(chunk) {
                decoded.extend(decoder.feed(piece).unwrap());
            }
            prop_assert_eq!(decoded, records);
        }
    }
}

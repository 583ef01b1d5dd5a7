//! The bounds-checked cursor every pgoutput message is read through.
//!
//! Invariant: no read indexes past the end of the message, so decoding cannot panic on any input.
//! A read either returns the field it asked for and moves past it, or returns a [`DecodeError`]
//! naming the message, the byte offset of the field and what was expected there.

use bytes::Bytes;

use super::DecodeError;

/// A bounds-checked cursor over one message.
pub(super) struct Reader<'a> {
    data: &'a Bytes,
    pos: usize,
    message: &'static str,
}

impl<'a> Reader<'a> {
    /// A cursor after the tag byte of `data`, naming `message` in its errors.
    pub(super) fn after_tag(data: &'a Bytes, message: &'static str) -> Self {
        Reader { data, pos: 1, message }
    }

    /// Bytes not read yet.
    pub(super) fn remaining(&self) -> usize {
        self.data.len() - self.pos
    }

    pub(super) fn take(&mut self, n: usize, expected: &'static str) -> Result<Bytes, DecodeError> {
        let end =
            self.pos.checked_add(n).filter(|end| *end <= self.data.len()).ok_or(
                DecodeError::Truncated { message: self.message, offset: self.pos, expected },
            )?;
        let out = self.data.slice(self.pos..end);
        self.pos = end;
        Ok(out)
    }

    fn array<const N: usize>(&mut self, expected: &'static str) -> Result<[u8; N], DecodeError> {
        let bytes = self.take(N, expected)?;
        let mut out = [0; N];
        out.copy_from_slice(&bytes);
        Ok(out)
    }

    pub(super) fn u8(&mut self, expected: &'static str) -> Result<u8, DecodeError> {
        Ok(self.array::<1>(expected)?[0])
    }
    pub(super) fn i16(&mut self, expected: &'static str) -> Result<i16, DecodeError> {
        Ok(i16::from_be_bytes(self.array(expected)?))
    }
    pub(super) fn i32(&mut self, expected: &'static str) -> Result<i32, DecodeError> {
        Ok(i32::from_be_bytes(self.array(expected)?))
    }
    pub(super) fn u32(&mut self, expected: &'static str) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.array(expected)?))
    }
    pub(super) fn i64(&mut self, expected: &'static str) -> Result<i64, DecodeError> {
        Ok(i64::from_be_bytes(self.array(expected)?))
    }
    pub(super) fn u64(&mut self, expected: &'static str) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.array(expected)?))
    }

    /// A non-negative 32-bit length that fits in what is left of the message.
    pub(super) fn len_u32(&mut self, expected: &'static str) -> Result<usize, DecodeError> {
        let at = self.pos;
        let len = self.i32(expected)?;
        let len = usize::try_from(len).map_err(|_| DecodeError::Invalid {
            message: self.message,
            offset: at,
            problem: format!("negative {expected} {len}"),
        })?;
        if len > self.data.len() - self.pos {
            return Err(DecodeError::Invalid {
                message: self.message,
                offset: at,
                problem: format!(
                    "{expected} {len} exceeds the {} byte(s) left",
                    self.data.len() - self.pos
                ),
            });
        }
        Ok(len)
    }

    /// A NUL-terminated UTF-8 string.
    pub(super) fn cstr(&mut self, expected: &'static str) -> Result<String, DecodeError> {
        let rest = &self.data[self.pos..];
        let nul = rest.iter().position(|b| *b == 0).ok_or(DecodeError::Truncated {
            message: self.message,
            offset: self.pos,
            expected,
        })?;
        let text = std::str::from_utf8(&rest[..nul]).map_err(|_| DecodeError::Invalid {
            message: self.message,
            offset: self.pos,
            problem: format!("{expected} is not UTF-8"),
        })?;
        let text = text.to_owned();
        self.pos += nul + 1;
        Ok(text)
    }

    pub(super) fn expect_byte(
        &mut self,
        want: u8,
        expected: &'static str,
    ) -> Result<(), DecodeError> {
        let at = self.pos;
        let got = self.u8(expected)?;
        if got != want {
            return Err(DecodeError::Invalid {
                message: self.message,
                offset: at,
                problem: format!("found {:?}, expected {expected}", got as char),
            });
        }
        Ok(())
    }

    /// The field that ends at the current position (one byte back) holds a disallowed value.
    pub(super) fn invalid(&self, problem: String) -> DecodeError {
        DecodeError::Invalid { message: self.message, offset: self.pos.saturating_sub(1), problem }
    }

    /// Ok when the whole message was read.
    pub(super) fn finish(&self) -> Result<(), DecodeError> {
        match self.data.len() - self.pos {
            0 => Ok(()),
            extra => Err(DecodeError::Trailing { message: self.message, extra }),
        }
    }
}

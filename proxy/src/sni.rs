//! Reading the server name from a TLS ClientHello without terminating TLS.

/// Why a ClientHello could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HelloError {
    /// More bytes are needed.
    Incomplete,
    /// Not a TLS handshake record, or malformed.
    Invalid(&'static str),
}

/// The largest ClientHello record accepted (one TLS record: 16 KiB + header).
pub const MAX_HELLO: usize = 16 * 1024 + 5;

struct Reader<'a> {
    b: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], HelloError> {
        if self.b.len() < n {
            return Err(HelloError::Invalid("truncated ClientHello"));
        }
        let (h, t) = self.b.split_at(n);
        self.b = t;
        Ok(h)
    }
    fn u8(&mut self) -> Result<usize, HelloError> {
        Ok(usize::from(self.take(1)?[0]))
    }
    fn u16(&mut self) -> Result<usize, HelloError> {
        let b = self.take(2)?;
        Ok(usize::from(b[0]) << 8 | usize::from(b[1]))
    }
    fn vec8(&mut self) -> Result<&'a [u8], HelloError> {
        let n = self.u8()?;
        self.take(n)
    }
    fn vec16(&mut self) -> Result<&'a [u8], HelloError> {
        let n = self.u16()?;
        self.take(n)
    }
}

/// The SNI host name of the ClientHello at the start of `buf`, lower case;
/// `Ok(None)` when the hello carries no server name.
pub fn server_name(buf: &[u8]) -> Result<Option<String>, HelloError> {
    if buf.len() < 5 {
        return Err(HelloError::Incomplete);
    }
    if buf[0] != 22 {
        return Err(HelloError::Invalid("not a TLS handshake record"));
    }
    if buf[1] != 3 {
        return Err(HelloError::Invalid("not TLS"));
    }
    let len = usize::from(buf[3]) << 8 | usize::from(buf[4]);
    if len == 0 || len > MAX_HELLO - 5 {
        return Err(HelloError::Invalid("bad record length"));
    }
    if buf.len() < 5 + len {
        return Err(HelloError::Incomplete);
    }
    let mut r = Reader { b: &buf[5..5 + len] };
    if r.u8()? != 1 {
        return Err(HelloError::Invalid("not a ClientHello"));
    }
    let hs_len = usize::from(r.take(3)?[0]) << 16;
    let _ = hs_len; // a hello split over records is not supported; the record bounds the parse
    r.take(2)?; // legacy version
    r.take(32)?; // random
    r.vec8()?; // session id
    r.vec16()?; // cipher suites
    r.vec8()?; // compression methods
    if r.b.is_empty() {
        return Ok(None); // no extensions
    }
    let mut ext = Reader { b: r.vec16()? };
    while !ext.b.is_empty() {
        let kind = ext.u16()?;
        let body = ext.vec16()?;
        if kind != 0 {
            continue;
        }
        let mut list = Reader {
            b: Reader { b: body }.vec16()?,
        };
        while !list.b.is_empty() {
            let name_type = list.u8()?;
            let name = list.vec16()?;
            if name_type == 0 {
                let s = std::str::from_utf8(name).map_err(|_| HelloError::Invalid("server name is not ASCII"))?;
                if s.is_empty()
                    || !s
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
                {
                    return Err(HelloError::Invalid("invalid server name"));
                }
                return Ok(Some(s.to_ascii_lowercase()));
            }
        }
        return Ok(None);
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal ClientHello with the given SNI.
    pub(crate) fn hello(sni: &str) -> Vec<u8> {
        let mut sn = vec![0u8];
        sn.extend((sni.len() as u16).to_be_bytes());
        sn.extend(sni.as_bytes());
        let mut list = (sn.len() as u16).to_be_bytes().to_vec();
        list.extend(sn);
        let mut ext = vec![0, 0];
        ext.extend((list.len() as u16).to_be_bytes());
        ext.extend(list);
        let mut body = vec![3, 3];
        body.extend([7u8; 32]);
        body.extend([0, 0, 2, 0x13, 0x01, 1, 0]);
        body.extend((ext.len() as u16).to_be_bytes());
        body.extend(ext);
        let mut hs = vec![1, 0];
        hs.extend((body.len() as u16).to_be_bytes());
        hs.extend(body);
        let mut rec = vec![22, 3, 1];
        rec.extend((hs.len() as u16).to_be_bytes());
        rec.extend(hs);
        rec
    }

    #[test]
    fn reads_the_server_name_and_rejects_garbage() {
        let h = hello("App.Test");
        assert_eq!(server_name(&h), Ok(Some("app.test".into())));
        for cut in [0, 3, 10, h.len() - 1] {
            assert_eq!(server_name(&h[..cut]), Err(HelloError::Incomplete), "cut at {cut}");
        }
        assert!(matches!(
            server_name(b"GET / HTTP/1.1\r\n\r\n"),
            Err(HelloError::Invalid(_))
        ));
        let mut bad = h.clone();
        bad[43] = 200; // the session id length now runs past the record
        assert!(server_name(&bad).is_err());
        // Every truncation of every byte position: never a panic.
        for i in 0..h.len() {
            let mut m = h.clone();
            m[i] = m[i].wrapping_add(91);
            let _ = server_name(&m);
        }
    }
}

//! A server connection's parameters as it reports them (`ParameterStatus`): "ParameterStatus
//! messages will be generated whenever the active value changes for any of the parameters the
//! backend believes the frontend should know about" (protocol, 55.2.7).

use crate::tracked::{Tracked, server_index};
use bytes::{BufMut, Bytes, BytesMut};

/// Parameters as a server reports them: names and values (bytes, as the server sent them), in
/// the order it first did, with the tracked ones also by index.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Params {
    all: Vec<(String, Bytes)>,
    tracked: Tracked,
}

impl Params {
    pub(crate) fn get(&self, name: &str) -> Option<&Bytes> {
        self.all.iter().find(|(n, _)| n == name).map(|(_, v)| v)
    }

    /// The tracked parameters' values.
    pub(crate) fn tracked(&self) -> &Tracked {
        &self.tracked
    }

    /// Every parameter and its value, in the order first reported.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (&str, &Bytes)> {
        self.all.iter().map(|(name, value)| (name.as_str(), value))
    }

    /// Records a `ParameterStatus` body (`name\0value\0`), if well formed; the tracked
    /// parameter's index, if it is one.
    pub(crate) fn report(&mut self, body: &[u8]) -> Option<usize> {
        let mut parts = body.split(|b| *b == 0);
        let (Some(name), Some(value)) = (parts.next(), parts.next()) else {
            return None;
        };
        let name = std::str::from_utf8(name).ok()?;
        let value = Bytes::copy_from_slice(value);
        let index = server_index(name);
        if let Some(index) = index {
            self.tracked.set(index, value.clone());
        }
        match self.all.iter_mut().find(|(n, _)| n == name) {
            Some((_, old)) => *old = value,
            None => self.all.push((name.to_owned(), value)),
        }
        index
    }

    /// The `ParameterStatus` messages for these parameters, in order.
    pub(crate) fn messages(&self) -> Bytes {
        let mut out = BytesMut::new();
        for (name, value) in &self.all {
            let len = 4 + name.len() + 1 + value.len() + 1;
            out.put_u8(b'S');
            out.put_i32(i32::try_from(len).unwrap_or(i32::MAX));
            out.put_slice(name.as_bytes());
            out.put_u8(0);
            out.put_slice(value);
            out.put_u8(0);
        }
        out.freeze()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_keep_their_first_order_and_the_tracked_ones_by_index() {
        let mut params = Params::default();
        assert_eq!(params.report(b"server_version\x0015.4\0"), None);
        assert_eq!(params.report(b"TimeZone\0UTC\0"), Some(3));
        assert_eq!(params.report(b"server_version\x0016.1\0"), None);
        assert_eq!(params.report(b"no terminator"), None);
        let names: Vec<&str> = params.iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["server_version", "TimeZone"]);
        assert_eq!(params.get("server_version").unwrap(), "16.1");
        assert_eq!(params.tracked().get(3).unwrap(), "UTC");
        assert_eq!(
            &params.messages()[..],
            b"S\0\0\0\x18server_version\x0016.1\0S\0\0\0\x11TimeZone\0UTC\0"
        );
    }
}

//! Reading request bodies under the namespace's size limit.
//!
//! A body over the limit is answered 413, but only after the rest of it has been read and
//! dropped (up to [`DRAIN_BYTES`] more, for at most [`DRAIN_TIME`]). Closing a connection with
//! unread data makes the kernel reset it, and a client still sending then gets "broken pipe" or
//! "connection reset" instead of the answer that names the limit. Once the body is read through,
//! the connection stays usable.

use crate::error::ApiError;
use axum::body::{Body, Bytes};
use bytes::BytesMut;
use http_body_util::BodyExt;
use hyper::body::Body as _;
use std::time::Duration;

/// How much past the limit is read and dropped so the 413 reaches the client.
pub const DRAIN_BYTES: usize = 64 << 20;
/// How long a client past the limit may take to finish sending before the connection is closed.
pub const DRAIN_TIME: Duration = Duration::from_secs(2);

/// Reads the whole body if it is at most `limit` bytes.
pub async fn read_limited(mut body: Body, limit: usize) -> Result<Bytes, ApiError> {
    let announced = body.size_hint().lower();
    if announced > limit as u64 {
        // Content-Length says it is too large: nothing of it is kept.
        let drained = announced <= limit.saturating_add(DRAIN_BYTES) as u64 && drain(body).await;
        return Err(too_large(limit, drained));
    }
    let mut first: Option<Bytes> = None;
    let mut joined: Option<BytesMut> = None;
    let mut total = 0usize;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| {
            let mut err = ApiError::bad_request(
                "unreadable_body",
                format!("cannot read the request body: {e}"),
            );
            err.close_connection = true;
            err
        })?;
        let Ok(data) = frame.into_data() else {
            continue; // trailers
        };
        total += data.len();
        if total > limit {
            let drained = drain(body).await;
            return Err(too_large(limit, drained));
        }
        // A body that arrives in one frame is kept as it is; more frames are copied together.
        match (&mut first, &mut joined) {
            (None, None) => first = Some(data),
            (Some(f), None) => {
                let mut all = BytesMut::with_capacity(announced.max(total as u64) as usize);
                all.extend_from_slice(f);
                all.extend_from_slice(&data);
                first = None;
                joined = Some(all);
            }
            (_, Some(all)) => all.extend_from_slice(&data),
        }
    }
    Ok(match (first, joined) {
        (_, Some(all)) => all.freeze(),
        (Some(f), None) => f,
        (None, None) => Bytes::new(),
    })
}

/// Reads and drops what is left of `body`; true if it ended within the bounds.
async fn drain(mut body: Body) -> bool {
    let read_rest = async {
        let mut left = DRAIN_BYTES;
        while let Some(frame) = body.frame().await {
            let Ok(frame) = frame else {
                return false;
            };
            if let Ok(data) = frame.into_data() {
                match left.checked_sub(data.len()) {
                    Some(l) => left = l,
                    None => return false,
                }
            }
        }
        true
    };
    tokio::time::timeout(DRAIN_TIME, read_rest)
        .await
        .unwrap_or(false)
}

fn too_large(limit: usize, drained: bool) -> ApiError {
    let mut e = ApiError::limit(
        413,
        "maxRequestBytes",
        format!("the request body is larger than {limit} bytes"),
    );
    // A body left partly unread makes the connection unusable for another request.
    e.close_connection = !drained;
    e
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::stream;

    fn chunked(chunks: Vec<Bytes>) -> Body {
        Body::from_stream(stream::iter(
            chunks.into_iter().map(Ok::<_, std::io::Error>),
        ))
    }

    fn parts(chunks: &[&'static [u8]]) -> Vec<Bytes> {
        chunks.iter().map(|c| Bytes::from_static(c)).collect()
    }

    #[tokio::test]
    async fn bodies_up_to_the_limit_are_read_whole_in_one_or_many_frames() {
        let one = read_limited(Body::from("hello"), 5)
            .await
            .expect("at the limit");
        assert_eq!(&one[..], b"hello");
        let many = read_limited(chunked(parts(&[b"he", b"ll", b"o"])), 5)
            .await
            .expect("at the limit");
        assert_eq!(&many[..], b"hello");
        let empty = read_limited(Body::empty(), 5).await.expect("empty");
        assert!(empty.is_empty());
    }

    #[tokio::test]
    async fn a_body_over_the_limit_is_read_through_and_named_in_the_error() {
        for body in [Body::from("hello!"), chunked(parts(&[b"hel", b"lo", b"!"]))] {
            let err = read_limited(body, 5).await.expect_err("over the limit");
            assert_eq!(err.status, 413);
            assert_eq!(err.code, "limit_exceeded");
            assert!(err.message.contains("maxRequestBytes"), "{}", err.message);
            assert!(
                !err.close_connection,
                "a body read through leaves the connection usable"
            );
        }
    }

    #[tokio::test]
    async fn a_body_that_breaks_off_is_a_400_that_says_so_and_closes_the_connection() {
        let broken = Body::from_stream(stream::iter([
            Ok(Bytes::from_static(b"{\"par")),
            Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionReset,
                "client went away",
            )),
        ]));
        let err = read_limited(broken, 1 << 20)
            .await
            .expect_err("the body broke off");
        assert_eq!((err.status, err.code), (400, "unreadable_body"));
        assert!(err.message.contains("client went away"), "{}", err.message);
        assert!(err.close_connection);
    }

    #[tokio::test]
    async fn a_body_far_over_the_limit_closes_the_connection_without_reading_it() {
        let huge = Bytes::from(vec![0u8; DRAIN_BYTES + 10]);
        let err = read_limited(Body::from(huge.clone()), 5)
            .await
            .expect_err("over the limit");
        assert_eq!(err.status, 413);
        assert!(err.close_connection);
        // Unannounced length: read up to the drain bound, then given up.
        let err = read_limited(
            chunked(vec![
                Bytes::from_static(b"abc"),
                Bytes::from_static(b"def"),
                huge,
            ]),
            5,
        )
        .await
        .expect_err("over the limit");
        assert!(err.close_connection);
    }
}

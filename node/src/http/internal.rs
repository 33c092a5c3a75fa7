//! `/v1/internal`: node-to-node traffic — the replication stream (an upgraded connection), slot
//! manifests and object snapshots for snapshot syncs.

use super::{AppState, json_ok};
use crate::cluster::Cluster;
use crate::cluster::links::UPGRADE_PROTOCOL;
use crate::cluster::sync::{self, SNAPSHOT_LSN_HEADER};
use crate::cluster::wire::{Frame, PROTOCOL_VERSION, SYNC_NOW_SINCE, VERSION_HEADER};
use crate::error::ApiError;
use crate::lsn::Lsn;
use crate::storage::record::{Entry, ObjectKey, SlotKey};
use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::{Bytes, BytesMut};
use hyper_util::rt::TokioIo;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// `GET /v1/internal/replicate` with `Upgrade: colony-replication`: the owner's side opens it; this
/// node answers as a follower for every slot the owner streams.
pub async fn replicate(State(node): State<AppState>, req: Request) -> Response {
    let wants = req
        .headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case(UPGRADE_PROTOCOL));
    if !wants {
        return ApiError::bad_request(
            "upgrade_required",
            format!("this endpoint speaks {UPGRADE_PROTOCOL} over an upgraded connection"),
        )
        .into_response();
    }
    let cluster = node.cluster.clone();
    let on_upgrade = hyper::upgrade::on(req);
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => serve_stream(cluster, TokioIo::new(upgraded)).await,
            Err(e) => tracing::warn!(error = %e, "replication upgrade failed"),
        }
    });
    let mut resp = Response::new(Body::empty());
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    resp.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    resp.headers_mut()
        .insert(header::UPGRADE, HeaderValue::from_static(UPGRADE_PROTOCOL));
    resp.headers_mut().insert(
        VERSION_HEADER,
        HeaderValue::from(u16::from(PROTOCOL_VERSION)),
    );
    resp
}

/// Acknowledgements queued together go out as one per slot, its newest: an ack says "durable
/// up to here", so the later one says all the earlier ones do. A log commit completes many
/// entries at once; without this, a follower sent (and the owner processed) one ack for each.
/// Only consecutive acks merge: any other frame first sends the acks before it, in order.
#[derive(Default)]
struct AckRun {
    newest: Vec<(SlotKey, Lsn)>,
}

impl AckRun {
    fn encode(&mut self, frame: Frame, out: &mut BytesMut) {
        match frame {
            Frame::Ack { slot, lsn } => match self.newest.iter_mut().find(|(s, _)| *s == slot) {
                Some((_, newest)) => *newest = (*newest).max(lsn),
                None => self.newest.push((slot, lsn)),
            },
            other => {
                self.flush(out);
                other.encode(out);
            }
        }
    }

    fn flush(&mut self, out: &mut BytesMut) {
        for (slot, lsn) in self.newest.drain(..) {
            Frame::Ack { slot, lsn }.encode(out);
        }
    }
}

pub(crate) async fn serve_stream<S>(cl: Arc<Cluster>, io: S)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut reader, mut writer) = tokio::io::split(io);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Frame>();
    let writer_task = tokio::spawn(async move {
        let mut out = BytesMut::new();
        let mut acks = AckRun::default();
        while let Some(f) = rx.recv().await {
            acks.encode(f, &mut out);
            while out.len() < (1 << 20) {
                match rx.try_recv() {
                    Ok(f) => acks.encode(f, &mut out),
                    Err(_) => break,
                }
            }
            acks.flush(&mut out);
            if writer.write_all(&out).await.is_err() {
                return;
            }
            out.clear();
        }
    });
    let mut buf = BytesMut::with_capacity(64 << 10);
    let mut from: Option<String> = None;
    // Entries are logged lazily only for an owner that says when to commit them (`SyncNow`).
    let mut lazy = false;
    'read: loop {
        // The entries of one read are logged together, and committed on this thread when no
        // commit is under way and nothing else waits for one: a follower's ack then waits for
        // one fsync and no hand-off to the writer thread (a wake-up of an idle CPU costs tens of
        // microseconds on a VM, and the follower's ack is on the critical path of every
        // replicated write). On a busy node the writer thread commits them with the rest.
        let deferred = cl.log.defer_wakeups();
        let mut appended = false;
        loop {
            match Frame::decode(&mut buf) {
                Ok(Some(frame)) => match frame {
                    Frame::Hello { node, version } => {
                        from = Some(node);
                        lazy = version >= SYNC_NOW_SINCE;
                    }
                    Frame::Append { entry, kind, epoch } => {
                        // One copy, of the entry's exact size, shared from here on by its ring
                        // frame, log record and applier: a slice of the read buffer would keep
                        // the whole buffer alive as long as the ring holds the entry.
                        let Ok(entry) = Entry::from_bytes(kind, Bytes::copy_from_slice(&entry))
                        else {
                            tracing::warn!(from = ?from, "malformed entry; dropping the connection");
                            break 'read;
                        };
                        if entry.lsn().epoch > epoch {
                            tracing::warn!(from = ?from, "entry newer than its sender's epoch; dropping the connection");
                            break 'read;
                        }
                        let slot = cl.slot(&entry.slot());
                        slot.on_append(&cl, entry, epoch, lazy, &tx);
                        appended = true;
                    }
                    Frame::Probe { slot, .. } => {
                        let _ = tx.send(cl.slot(&slot).status_frame());
                    }
                    Frame::SyncRequired { slot, .. } => cl.start_sync(slot),
                    // Committed below by this thread when it can lead, or by the writer.
                    Frame::SyncNow => cl.log.urge(),
                    other => tracing::debug!(?other, "unexpected frame from an owner"),
                },
                Ok(None) => {
                    // Before the next await: the guard must not outlive this thread's turn.
                    if appended {
                        deferred.lead();
                    } else {
                        drop(deferred);
                    }
                    break;
                }
                Err(e) => {
                    tracing::warn!(from = ?from, error = %e, "bad replication frame; dropping the connection");
                    cl.metrics_corrupt_frame();
                    break 'read;
                }
            }
        }
        match reader.read_buf(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
    drop(tx);
    writer_task.abort();
}

/// `GET /v1/internal/slots/{colo}/{slot}/manifest` (owner): position, then objects.
pub async fn manifest(
    State(node): State<AppState>,
    Path((colo, slot)): Path<(String, u32)>,
) -> Result<Response, ApiError> {
    let cl = node.cluster.clone();
    let key = SlotKey::new(&colo, slot);
    let m = tokio::task::spawn_blocking(move || sync::manifest(&cl, &key))
        .await
        .map_err(|e| ApiError::internal(e.to_string()))??;
    Ok(json_ok(&m))
}

/// `GET /v1/internal/objects/{ns}/{id}/snapshot` (owner): the database bytes, with the slot
/// position they reflect in a header.
pub async fn snapshot(
    State(node): State<AppState>,
    Path((ns, id)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let id = id
        .parse()
        .map_err(|_| ApiError::bad_request("invalid_id", "not an object ID"))?;
    let (bytes, lsn) = node.cluster.snapshot(ObjectKey::new(ns.into(), id)).await?;
    let mut resp = Response::new(Body::from(bytes));
    resp.headers_mut().insert(
        SNAPSHOT_LSN_HEADER,
        HeaderValue::from_str(&lsn.to_string()).map_err(|e| ApiError::internal(e.to_string()))?,
    );
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/vnd.sqlite3"),
    );
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ack(slot: &SlotKey, seq: u64) -> Frame {
        Frame::Ack {
            slot: slot.clone(),
            lsn: Lsn::new(1, seq),
        }
    }

    #[test]
    fn a_run_of_acks_goes_out_as_the_newest_per_slot_and_other_frames_keep_their_place() {
        let (a, b) = (SlotKey::new("c", 1), SlotKey::new("c", 2));
        let probe = Frame::Probe {
            slot: a.clone(),
            epoch: 1,
        };
        let mut run = AckRun::default();
        let mut out = BytesMut::new();
        for f in [
            ack(&a, 1),
            ack(&b, 5),
            ack(&a, 3),
            ack(&a, 2),
            probe.clone(),
            ack(&a, 4),
        ] {
            run.encode(f, &mut out);
        }
        run.flush(&mut out);
        let mut sent = Vec::new();
        while let Some(f) = Frame::decode(&mut out).expect("decodes") {
            sent.push(f);
        }
        assert_eq!(sent, vec![ack(&a, 3), ack(&b, 5), probe, ack(&a, 4)]);
    }
}

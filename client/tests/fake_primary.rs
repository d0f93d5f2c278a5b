//! The volume client against a fake group primary: a small TCP server that
//! speaks the chunk RPC's frames, decodes `Op::Group` requests, keeps the
//! volume's bytes in memory, deduplicates by `(client, id)` as a real
//! primary does, and can be told to refuse or to drop connections. The
//! Cluster runs on a hand-built map (no volume manager).

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use cairn_client::{ClientConfig, ClientError, Cluster, Volume};
use cairn_group::msg::{ClientOp, Refusal, ScrubFound, WriteOp};
use cairn_group::GroupKey;
use cairn_proto::chunk::{ChunkRequest, ChunkResponse, Op, Status};
use cairn_proto::frame::FRAME_DATA_BYTES_MAX;
use cairn_proto::frame_io::{read_header, read_part, read_prefix, write_frame};
use cairn_proto::group::{decode_request, encode_refusal};
use cairn_proto::map::{ClusterMap, GroupRecord, NodeInfo, VolumeInfo};
use prost::Message;
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

const KIB: u64 = 1024;
const EXTENT: u64 = 64 * KIB;
const GROUPS: u32 = 4;

/// One request as the fake primary saw it.
#[derive(Clone, Debug)]
struct Seen {
    client: u64,
    id: u64,
    oldest: u64,
    abandoned: Vec<u64>,
    epoch: u64,
    key: GroupKey,
    kind: &'static str,
}

#[derive(Default)]
struct State {
    extents: HashMap<(u64, u64, u64), Vec<u8>>,
    log: Vec<Seen>,
    applied: HashSet<(u64, u64)>,
    /// Times each write id changed the data.
    applications: HashMap<u64, usize>,
    refuse_next: VecDeque<Refusal>,
    refuse_always: Option<Refusal>,
    refuse_reads: Option<Refusal>,
    refuse_writes: Option<Refusal>,
    /// Answer every request with this status (a chunk server without groups).
    answer_status: Option<Status>,
    /// Apply this many more writes, then close the connection unanswered.
    drop_after_apply: usize,
    flushes: Vec<GroupKey>,
    /// Direct (whole-store) flushes, and how many more to fail.
    store_flushes: usize,
    fail_store_flushes: usize,
}

#[derive(Clone)]
struct Fake {
    addr: String,
    state: Arc<Mutex<State>>,
}

/// A reply frame, or `None`: close the connection without answering.
type Reply = Option<(ChunkResponse, Bytes)>;

impl Fake {
    async fn start() -> Fake {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let fake = Fake {
            addr: listener.local_addr().unwrap().to_string(),
            state: Arc::default(),
        };
        let state = fake.state.clone();
        tokio::spawn(async move {
            loop {
                let Ok((sock, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(serve(sock, state.clone()));
            }
        });
        fake
    }

    fn with<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        f(&mut self.state.lock().unwrap())
    }

    fn log(&self) -> Vec<Seen> {
        self.with(|s| s.log.clone())
    }
}

async fn serve(sock: tokio::net::TcpStream, state: Arc<Mutex<State>>) {
    let (r, mut w) = sock.into_split();
    let mut r = BufReader::new(r);
    loop {
        let Ok(prefix) = read_prefix(&mut r, FRAME_DATA_BYTES_MAX).await else {
            return;
        };
        let Ok(header) = read_header(&mut r, &prefix).await else {
            return;
        };
        let mut data = vec![0u8; prefix.data_bytes as usize];
        if read_part(&mut r, &mut data, "data").await.is_err() {
            return;
        }
        let req = ChunkRequest::decode(header.as_slice()).expect("request header");
        let reply = handle(&state, &req, Bytes::from(data));
        match reply {
            None => return,
            Some((mut resp, data)) => {
                resp.request_id = req.request_id;
                if write_frame(&mut w, &resp.encode_to_vec(), &data)
                    .await
                    .is_err()
                    || w.flush().await.is_err()
                {
                    return;
                }
            }
        }
    }
}

fn status(s: Status, message: &str) -> Reply {
    Some((
        ChunkResponse {
            status: s as i32,
            message: message.into(),
            ..Default::default()
        },
        Bytes::new(),
    ))
}

fn handle(state: &Mutex<State>, req: &ChunkRequest, data: Bytes) -> Reply {
    let mut s = state.lock().unwrap();
    if let Some(st) = s.answer_status {
        return status(st, "told to answer this");
    }
    if req.op == Op::Flush as i32 {
        if s.fail_store_flushes > 0 {
            s.fail_store_flushes -= 1;
            return status(Status::IoError, "store flush failed");
        }
        s.store_flushes += 1;
        return Some((ChunkResponse::default(), Bytes::new()));
    }
    if req.op != Op::Group as i32 {
        return status(Status::UnknownOp, "fake primary serves only Group");
    }
    let (creq, extent_bytes) = match decode_request(req.group.as_ref().unwrap(), data) {
        Ok(r) => r,
        Err(e) => return status(Status::InvalidArgument, &e),
    };
    let kind = match &creq.op {
        ClientOp::Write {
            op: WriteOp::Data { .. },
            ..
        } => "write",
        ClientOp::Write {
            op: WriteOp::Zero { .. },
            ..
        } => "zero",
        ClientOp::Write {
            op: WriteOp::Materialize { .. },
            ..
        } => "materialize",
        ClientOp::Read { .. } => "read",
        ClientOp::CompareAndWrite { .. } => "compare-and-write",
        ClientOp::Scrub { .. } => "scrub",
        ClientOp::Flush => "flush",
    };
    s.log.push(Seen {
        client: creq.client,
        id: creq.id,
        oldest: creq.oldest_outstanding,
        abandoned: creq.abandoned.clone(),
        epoch: creq.epoch,
        key: creq.key,
        kind,
    });
    assert!(creq.oldest_outstanding <= creq.id, "{creq:?}");
    let by_kind = match kind {
        "read" => s.refuse_reads.clone(),
        "write" => s.refuse_writes.clone(),
        _ => None,
    };
    let refusal = s
        .refuse_next
        .pop_front()
        .or_else(|| s.refuse_always.clone())
        .or(by_kind);
    if let Some(r) = refusal {
        return Some((
            ChunkResponse {
                status: Status::Refused as i32,
                refusal: Some(encode_refusal(&r)),
                ..Default::default()
            },
            Bytes::new(),
        ));
    }
    let mut out = Bytes::new();
    match creq.op {
        ClientOp::Write { ext, op, .. } => {
            if s.applied.insert((creq.client, creq.id)) {
                *s.applications.entry(creq.id).or_default() += 1;
                let e = s
                    .extents
                    .entry((ext.volume, ext.index, ext.epoch))
                    .or_insert_with(|| vec![0; extent_bytes as usize]);
                match op {
                    WriteOp::Data { offset, data } => {
                        e[offset as usize..offset as usize + data.len()].copy_from_slice(&data)
                    }
                    WriteOp::Zero { offset, len } => {
                        e[offset as usize..(offset + len) as usize].fill(0)
                    }
                    // No chain here: a copy-up changes nothing.
                    WriteOp::Materialize { .. } => {}
                }
            }
            if s.drop_after_apply > 0 {
                s.drop_after_apply -= 1;
                return None;
            }
        }
        ClientOp::Read { ext, offset, len } => {
            let (o, l) = (offset as usize, len as usize);
            out = match s.extents.get(&(ext.volume, ext.index, ext.epoch)) {
                Some(e) => Bytes::copy_from_slice(&e[o..o + l]),
                None => Bytes::from(vec![0; l]),
            };
        }
        // Compared on every copy, as a primary that never saw an earlier
        // one (after a failover) does.
        ClientOp::CompareAndWrite {
            ext,
            offset,
            compare,
            data,
            ..
        } => {
            let e = s
                .extents
                .entry((ext.volume, ext.index, ext.epoch))
                .or_insert_with(|| vec![0; extent_bytes as usize]);
            let range = offset as usize..offset as usize + data.len();
            if e[range.clone()] == compare[..] {
                e[range].copy_from_slice(&data);
                *s.applications.entry(creq.id).or_default() += 1;
            } else {
                out = Bytes::copy_from_slice(&e[range]);
            }
            if s.drop_after_apply > 0 {
                s.drop_after_apply -= 1;
                return None;
            }
        }
        // One copy, found bad at the start of odd extents; the report of
        // extent 5 is garbage.
        ClientOp::Scrub { ext, offset, .. } => {
            out = match ext.index {
                5 => Bytes::from_static(b"\xff\xff\xff"),
                i => Bytes::from(
                    ScrubFound {
                        copies: 1,
                        repaired_here: i % 2 == 1 && offset == 0,
                        ..Default::default()
                    }
                    .encode_to_vec(),
                ),
            }
        }
        ClientOp::Flush => s.flushes.push(creq.key),
    }
    Some((ChunkResponse::default(), out))
}

/// A map with `nodes` (id, addr), every group of replica count 1 acting on
/// `primary(index)`.
fn map(epoch: u64, nodes: &[(u64, &str)], primary: impl Fn(u32) -> u64) -> ClusterMap {
    ClusterMap {
        epoch,
        group_count: GROUPS,
        nodes: nodes
            .iter()
            .map(|&(id, addr)| NodeInfo {
                id,
                addr: addr.to_string(),
                host: format!("h{id}"),
                weight: 1,
                up: true,
                in_: true,
                up_since: 1,
                ..Default::default()
            })
            .collect(),
        groups: (0..GROUPS)
            .map(|index| GroupRecord {
                replicas: 1,
                index,
                interval: 1,
                acting: vec![primary(index)],
            })
            .collect(),
    }
}

fn volume_info() -> VolumeInfo {
    VolumeInfo {
        id: 7,
        name: "scans".into(),
        size_bytes: 16 * EXTENT,
        extent_size_bytes: EXTENT as u32,
        replicas: 1,
        min_replicas: 1,
        head_epoch: 1,
        ..Default::default()
    }
}

fn config(io_timeout: Duration) -> ClientConfig {
    ClientConfig {
        io_timeout,
        attempt_timeout: Duration::from_secs(1),
        ..Default::default()
    }
}

fn one_node(fake: &Fake, io_timeout: Duration) -> (Arc<Cluster>, Volume) {
    let cluster = Cluster::with_static_map(config(io_timeout), map(1, &[(1, &fake.addr)], |_| 1));
    let vol = cluster.volume(volume_info()).unwrap();
    (cluster, vol)
}

/// assert_eq without printing megabytes.
#[track_caller]
fn same(got: &[u8], want: &[u8]) {
    assert_eq!(got.len(), want.len(), "lengths differ");
    if let Some(i) = (0..got.len()).find(|&i| got[i] != want[i]) {
        panic!(
            "bytes differ from offset {i}: got {}, want {}",
            got[i], want[i]
        );
    }
}

fn pattern(len: usize, seed: u8) -> Bytes {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect::<Vec<u8>>()
        .into()
}

#[tokio::test]
async fn write_read_round_trip_across_extents() {
    let fake = Fake::start().await;
    let (cluster, vol) = one_node(&fake, Duration::from_secs(10));
    // 200 KiB from 60 KiB: five extents.
    let data = pattern(200 * KIB as usize, 3);
    vol.write(60 * KIB, data.clone(), false).await.unwrap();
    same(&vol.read(60 * KIB, 200 * KIB).await.unwrap(), &data);
    // One piece, and a range around the written one.
    same(
        &vol.read(64 * KIB, 4 * KIB).await.unwrap(),
        &data.slice(4 * KIB as usize..8 * KIB as usize),
    );
    let around = vol.read(56 * KIB, 208 * KIB).await.unwrap();
    let k = |n: u64| (n * KIB) as usize;
    same(&around[..k(4)], &[0u8; 4096]);
    same(&around[k(4)..k(204)], &data);
    same(&around[k(204)..], &[0u8; 4096]);
    // Zeroes and trim in the middle.
    vol.write_zeroes(100 * KIB, 8 * KIB, true).await.unwrap();
    vol.trim(128 * KIB, 64 * KIB).await.unwrap();
    let got = vol.read(60 * KIB, 200 * KIB).await.unwrap();
    let mut want = data.to_vec();
    want[40 * KIB as usize..48 * KIB as usize].fill(0);
    want[68 * KIB as usize..132 * KIB as usize].fill(0);
    same(&got, &want);
    // The volume's last sector.
    vol.write(vol.size() - 512, pattern(512, 9), true)
        .await
        .unwrap();
    same(
        &vol.read(vol.size() - 512, 512).await.unwrap(),
        &pattern(512, 9),
    );

    let log = fake.log();
    let writes: Vec<&Seen> = log.iter().filter(|s| s.kind == "write").collect();
    assert_eq!(writes.len(), 6, "five pieces and the last sector: {log:?}");
    let mut ids: Vec<u64> = log.iter().map(|s| s.id).collect();
    ids.dedup();
    assert_eq!(ids.len(), log.len(), "every piece has its own id");
    assert!(log.iter().all(|s| s.client == cluster.client_id()));
    assert!(log.iter().all(|s| s.epoch == 1 && s.key.replicas == 1));
    assert!(log.iter().all(|s| s.key.index < GROUPS));
    // Nothing is in flight any more.
    assert!(cluster.oldest_outstanding() > log.iter().map(|s| s.id).max().unwrap());
}

/// A scrub of an extent goes out in pieces of at most 1 MiB, in order, each
/// with the primary's report; a report that does not decode fails only its
/// piece; an extent past the end is refused before sending.
#[tokio::test]
async fn a_scrub_covers_the_extent_in_pieces_with_their_reports() {
    let fake = Fake::start().await;
    let cluster = Cluster::with_static_map(
        config(Duration::from_secs(10)),
        map(1, &[(1, &fake.addr)], |_| 1),
    );
    let extent = 4 << 20;
    let info = VolumeInfo {
        size_bytes: 16 * extent,
        extent_size_bytes: extent as u32,
        ..volume_info()
    };
    let vol = cluster.volume(info).unwrap();
    let pieces = vol.scrub_extent(3).await.unwrap();
    let per = cairn_client::SCRUB_PIECE_BYTES;
    let ranges: Vec<(u64, u64, u64)> = pieces.iter().map(|p| (p.index, p.offset, p.len)).collect();
    let want: Vec<(u64, u64, u64)> = (0..extent / per).map(|i| (3, i * per, per)).collect();
    assert_eq!(ranges, want);
    let found: Vec<ScrubFound> = pieces.into_iter().map(|p| p.found.unwrap()).collect();
    assert!(found[0].repaired_here && found.iter().skip(1).all(|f| !f.repaired_here));
    assert!(found.iter().all(|f| f.copies == 1));
    let scrubs = fake.log().iter().filter(|s| s.kind == "scrub").count();
    assert_eq!(scrubs, want.len());

    let pieces = vol.scrub_extent(5).await.unwrap();
    let e = pieces[0].found.as_ref().unwrap_err().to_string();
    assert!(
        e.contains("undecodable report") && e.contains("extent 5"),
        "{e}"
    );

    let before = fake.log().len();
    let e = vol.scrub_extent(16).await.unwrap_err();
    assert!(e.is_invalid_argument(), "{e}");
    assert_eq!(fake.log().len(), before);
}

#[tokio::test]
async fn invalid_ranges_are_refused_before_sending() {
    let fake = Fake::start().await;
    let (_cluster, vol) = one_node(&fake, Duration::from_secs(10));
    for (off, len) in [
        (100, 512),
        (0, 100),
        (vol.size() - 512, 1024),
        (vol.size(), 512),
    ] {
        let err = vol.read(off, len).await.unwrap_err();
        assert!(err.is_invalid_argument(), "{err}");
        let msg = err.to_string();
        assert!(
            msg.contains("scans") && msg.contains(&off.to_string()),
            "{msg}"
        );
    }
    let err = vol.write(1000, pattern(512, 0), false).await.unwrap_err();
    assert!(err.is_invalid_argument());
    assert!(vol.read(0, 0).await.unwrap().is_empty());
    assert!(fake.log().is_empty());
}

#[tokio::test]
async fn busy_is_retried_with_the_same_id() {
    let fake = Fake::start().await;
    let (_cluster, vol) = one_node(&fake, Duration::from_secs(10));
    fake.with(|s| {
        s.refuse_next
            .extend([Refusal::Busy, Refusal::NodeBehind, Refusal::Busy])
    });
    let data = pattern(4096, 1);
    vol.write(8192, data.clone(), false).await.unwrap();
    let log = fake.log();
    assert_eq!(log.len(), 4, "{log:?}");
    assert!(log.iter().all(|s| s.id == log[0].id));
    assert_eq!(fake.with(|s| s.applications[&log[0].id]), 1);
    same(&vol.read(8192, 4096).await.unwrap(), &data);
}

#[tokio::test]
async fn dropped_connection_is_retried_with_the_same_id_and_applied_once() {
    let fake = Fake::start().await;
    let (_cluster, vol) = one_node(&fake, Duration::from_secs(10));
    fake.with(|s| s.drop_after_apply = 1);
    let data = pattern(8192, 2);
    vol.write(0, data.clone(), false).await.unwrap();
    let log = fake.log();
    assert_eq!(log.len(), 2, "{log:?}");
    assert_eq!(log[0].id, log[1].id);
    assert_eq!(fake.with(|s| s.applications[&log[0].id]), 1);
    same(&vol.read(0, 8192).await.unwrap(), &data);
}

/// A compare-and-write travels as one request with both halves; one that
/// finds other bytes writes nothing and names the first difference; one
/// whose answer was lost finds its own bytes on the retry (a primary that
/// never saw the first copy compares again), which is its success.
#[tokio::test]
async fn compare_and_write_compares_at_the_primary_and_survives_a_lost_answer() {
    let fake = Fake::start().await;
    let (_cluster, vol) = one_node(&fake, Duration::from_secs(5));
    let old = pattern(512, 1);
    vol.write(4096, old.clone(), false).await.unwrap();
    let new = pattern(512, 2);
    let mut wrong = old.to_vec();
    wrong[100] ^= 1;
    let found = vol
        .compare_and_write(4096, Bytes::from(wrong), new.clone(), false)
        .await
        .unwrap();
    assert_eq!(found, Some(100));
    same(&vol.read(4096, 512).await.unwrap(), &old);

    fake.with(|s| s.drop_after_apply = 1);
    let found = vol
        .compare_and_write(4096, old.clone(), new.clone(), false)
        .await
        .unwrap();
    assert_eq!(found, None, "the retry found its own write");
    same(&vol.read(4096, 512).await.unwrap(), &new);
    let log = fake.log();
    let caws: Vec<_> = log
        .iter()
        .filter(|s| s.kind == "compare-and-write")
        .collect();
    assert_eq!(caws.len(), 3, "{log:?}");
    assert_eq!(caws[1].id, caws[2].id, "a retry keeps its id");
    assert_eq!(fake.with(|s| s.applications[&caws[1].id]), 1);

    // Not a retry: the same found-equals-new answer is a miscompare.
    let found = vol
        .compare_and_write(4096, old.clone(), new.clone(), false)
        .await
        .unwrap();
    assert_eq!(found, Some(0));
    // Halves of different lengths never leave the client.
    assert!(vol
        .compare_and_write(0, pattern(512, 0), pattern(1024, 0), false)
        .await
        .is_err());
}

#[tokio::test]
async fn degraded_until_the_timeout_is_a_degraded_error() {
    let fake = Fake::start().await;
    let (cluster, vol) = one_node(&fake, Duration::from_millis(400));
    fake.with(|s| s.refuse_always = Some(Refusal::Degraded { acting: 1, min: 2 }));
    let started = std::time::Instant::now();
    let err = vol.write(0, pattern(4096, 0), false).await.unwrap_err();
    assert!(started.elapsed() >= Duration::from_millis(400));
    assert!(started.elapsed() < Duration::from_secs(3));
    let msg = err.to_string();
    assert!(
        matches!(
            err,
            ClientError::Degraded {
                acting: 1,
                min: 2,
                ..
            }
        ),
        "{msg}"
    );
    assert!(msg.contains("scans") && msg.contains("group") && msg.contains("1 replica"));
    assert!(msg.contains("2 required"), "{msg}");
    let log = fake.log();
    assert!(log.len() > 2 && log.iter().all(|s| s.id == log[0].id));
    // The abandoned write is below the next request's oldest_outstanding:
    // a late copy of it is dropped.
    fake.with(|s| s.refuse_always = None);
    vol.read(0, 512).await.unwrap();
    let next = fake.log().last().unwrap().clone();
    assert!(next.oldest > log[0].id && next.abandoned.is_empty());
    assert!(vol.unflushed_groups().is_empty());
    drop(cluster);
}

#[tokio::test]
async fn abandoned_write_is_listed_while_an_older_request_is_in_flight() {
    let fake = Fake::start().await;
    // The read is refused Busy until the end, so it stays in flight.
    let (_cluster, vol) = one_node(&fake, Duration::from_secs(5));
    fake.with(|s| {
        s.refuse_reads = Some(Refusal::Busy);
        s.refuse_writes = Some(Refusal::Busy);
    });
    let reader = tokio::spawn({
        let vol = vol.clone();
        async move { vol.read(0, 512).await }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let read_id = fake.log()[0].id;
    // Give up on a write: a cancelled write is abandoned like a failed one.
    let cut = tokio::time::timeout(
        Duration::from_millis(100),
        vol.write(0, pattern(512, 1), false),
    )
    .await;
    assert!(cut.is_err(), "the write was cut off");
    let writes = |fake: &Fake| -> Vec<Seen> {
        fake.log()
            .into_iter()
            .filter(|s| s.kind == "write")
            .collect()
    };
    let write_id = writes(&fake)[0].id;
    assert!(write_id > read_id);
    fake.with(|s| s.refuse_writes = None);
    vol.write(4096, pattern(512, 2), false).await.unwrap();
    let last = writes(&fake).pop().unwrap();
    assert!(last.id > write_id);
    assert_eq!(last.oldest, read_id, "the read is still in flight");
    assert_eq!(last.abandoned, vec![write_id]);
    assert_eq!(fake.with(|s| s.applications.get(&write_id).copied()), None);
    fake.with(|s| s.refuse_reads = None);
    reader.await.unwrap().unwrap();
    // With the read done, nothing older is outstanding: the list is empty.
    vol.write(8192, pattern(512, 3), false).await.unwrap();
    let last = writes(&fake).pop().unwrap();
    assert_eq!((last.oldest, last.abandoned.clone()), (last.id, vec![]));
}

#[tokio::test]
async fn io_refusals_are_retried_three_times() {
    let fake = Fake::start().await;
    let (_cluster, vol) = one_node(&fake, Duration::from_secs(10));
    fake.with(|s| s.refuse_always = Some(Refusal::Io("bad block 7".into())));
    let err = vol.read(0, 4096).await.unwrap_err();
    assert!(matches!(err, ClientError::Io { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("bad block 7") && msg.contains(&fake.addr),
        "{msg}"
    );
    assert_eq!(fake.log().len(), 4);
}

#[tokio::test]
async fn a_server_without_groups_fails_at_once() {
    let fake = Fake::start().await;
    let (_cluster, vol) = one_node(&fake, Duration::from_secs(10));
    fake.with(|s| s.answer_status = Some(Status::UnknownOp));
    let err = vol.read(0, 4096).await.unwrap_err();
    assert!(
        matches!(
            err,
            ClientError::Server {
                status: Status::UnknownOp,
                ..
            }
        ),
        "{err}"
    );
}

#[tokio::test]
async fn stale_epoch_waits_for_the_newer_map_and_keeps_the_id() {
    let fake = Fake::start().await;
    let (cluster, vol) = one_node(&fake, Duration::from_secs(10));
    fake.with(|s| s.refuse_next.push_back(Refusal::StaleEpoch { current: 2 }));
    let newer = map(2, &[(1, &fake.addr)], |_| 1);
    let c = cluster.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(c.set_map(newer));
    });
    vol.write(0, pattern(512, 5), false).await.unwrap();
    let log = fake.log();
    assert_eq!(log.len(), 2);
    assert_eq!(log[0].id, log[1].id);
    assert_eq!((log[0].epoch, log[1].epoch), (1, 2));
    assert_eq!(cluster.map_epoch(), 2);
}

#[tokio::test]
async fn not_primary_fails_over_to_the_new_primary_with_the_same_id() {
    let a = Fake::start().await;
    let b = Fake::start().await;
    let nodes = [(1, a.addr.as_str()), (2, b.addr.as_str())];
    let cluster = Cluster::with_static_map(config(Duration::from_secs(10)), map(1, &nodes, |_| 1));
    let vol = cluster.volume(volume_info()).unwrap();
    a.with(|s| s.refuse_always = Some(Refusal::NotPrimary { current: 2 }));
    let newer = map(2, &nodes, |_| 2);
    let c = cluster.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(100)).await;
        c.set_map(newer);
    });
    let data = pattern(4096, 6);
    vol.write(4096, data.clone(), false).await.unwrap();
    let (la, lb) = (a.log(), b.log());
    assert!(!la.is_empty() && !lb.is_empty());
    assert_eq!(la[0].id, lb[0].id);
    assert_eq!(lb[0].epoch, 2);
    assert_eq!(b.with(|s| s.applications[&lb[0].id]), 1);
    same(&vol.read(4096, 4096).await.unwrap(), &data);
}

#[tokio::test]
async fn unreachable_node_is_retried_until_the_map_moves() {
    let fake = Fake::start().await;
    let dead = {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap().to_string()
    };
    let cluster = Cluster::with_static_map(
        config(Duration::from_secs(10)),
        map(1, &[(1, &dead)], |_| 1),
    );
    let vol = cluster.volume(volume_info()).unwrap();
    let newer = map(2, &[(1, &dead), (2, &fake.addr)], |_| 2);
    let c = cluster.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        c.set_map(newer);
    });
    vol.write(0, pattern(4096, 7), true).await.unwrap();
    assert_eq!(fake.log().len(), 1);
}

#[tokio::test]
async fn no_primary_times_out_with_a_clear_error() {
    let fake = Fake::start().await;
    let mut m = map(1, &[(1, &fake.addr)], |_| 1);
    m.nodes[0].up = false;
    let cluster = Cluster::with_static_map(config(Duration::from_millis(300)), m);
    let vol = cluster.volume(volume_info()).unwrap();
    let err = vol.read(0, 512).await.unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, ClientError::TimedOut { .. }), "{msg}");
    assert!(msg.contains("no primary") && msg.contains("scans"), "{msg}");
    assert!(fake.log().is_empty());
}

#[tokio::test]
async fn flush_reaches_every_group_written_since_the_last_flush() {
    let fake = Fake::start().await;
    let (_cluster, vol) = one_node(&fake, Duration::from_secs(10));
    // Nothing written: nothing to flush.
    vol.flush().await.unwrap();
    assert!(fake.with(|s| s.flushes.is_empty()));
    // FUA writes are durable already.
    vol.write(0, pattern(16 * EXTENT as usize, 1), true)
        .await
        .unwrap();
    assert!(vol.unflushed_groups().is_empty());
    // Non-FUA writes over every extent: every group that took one is dirty.
    vol.write(0, pattern(16 * EXTENT as usize, 2), false)
        .await
        .unwrap();
    let written: HashSet<GroupKey> = fake
        .log()
        .iter()
        .filter(|s| s.kind == "write")
        .map(|s| s.key)
        .collect();
    assert!(written.len() > 1, "the extents span several groups");
    let mut dirty = vol.unflushed_groups();
    dirty.sort();
    let mut want: Vec<GroupKey> = written.into_iter().collect();
    want.sort();
    assert_eq!(dirty, want);
    vol.flush().await.unwrap();
    let mut flushed = fake.with(|s| s.flushes.clone());
    flushed.sort();
    assert_eq!(flushed, want);
    assert!(vol.unflushed_groups().is_empty());
    vol.flush().await.unwrap();
    assert_eq!(fake.with(|s| s.flushes.len()), want.len());
    // A failed flush keeps its group dirty.
    vol.trim(0, 512).await.unwrap();
    assert_eq!(vol.unflushed_groups().len(), 1);
    fake.with(|s| s.refuse_always = Some(Refusal::Io("flush failed".into())));
    assert!(vol.flush().await.is_err());
    assert_eq!(vol.unflushed_groups().len(), 1);
    fake.with(|s| s.refuse_always = None);
    vol.flush().await.unwrap();
    assert!(vol.unflushed_groups().is_empty());
}

#[tokio::test]
async fn large_io_is_split_at_the_frame_limit() {
    let fake = Fake::start().await;
    let cluster = Cluster::with_static_map(
        config(Duration::from_secs(10)),
        map(1, &[(1, &fake.addr)], |_| 1),
    );
    let info = VolumeInfo {
        size_bytes: 64 << 20,
        extent_size_bytes: 32 << 20,
        ..volume_info()
    };
    let vol = cluster.volume(info).unwrap();
    let data = pattern(20 << 20, 4);
    vol.write(4 << 20, data.clone(), false).await.unwrap();
    same(&vol.read(4 << 20, 20 << 20).await.unwrap(), &data);
    // 4..12, 12..20, 20..24 MiB in one extent: three pieces each way.
    assert_eq!(fake.log().iter().filter(|s| s.kind == "write").count(), 3);
}

/// A front end taking over a volume (a restarted target) asks for its next
/// flush to reach every chunk server's whole store: once, retried on
/// failure, and not again after it succeeded.
#[tokio::test]
async fn a_takeover_flush_reaches_every_store_once() {
    let fake = Fake::start().await;
    let (_cluster, vol) = one_node(&fake, Duration::from_secs(10));
    vol.flush().await.unwrap();
    assert_eq!(fake.with(|s| s.store_flushes), 0, "not asked for");
    vol.flush_stores_on_next_flush();
    fake.with(|s| s.fail_store_flushes = 2);
    vol.flush().await.unwrap();
    assert_eq!(
        fake.with(|s| (s.store_flushes, s.fail_store_flushes)),
        (1, 0)
    );
    vol.flush().await.unwrap();
    assert_eq!(fake.with(|s| s.store_flushes), 1, "only the first flush");
}

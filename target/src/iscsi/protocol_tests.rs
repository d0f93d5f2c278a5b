//! The iSCSI protocol end to end in memory: a small initiator written from
//! RFC 7143 drives login (with and without CHAP), SendTargets, writes with
//! immediate data and R2T, reads split over Data-In PDUs, CmdSN windows,
//! DataSN errors and logout, against memory exports. The real initiators
//! (libiscsi) are in tests/tests/iscsi.rs.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncWriteExt, DuplexStream, ReadHalf, WriteHalf};
use tokio::sync::watch;

use super::login::chap_response;
use super::pdu::*;
use super::serve::{serve_stream, IscsiOptions};
use super::text;
use super::{Auth, Chap, IscsiConfig, Portal, Secret, TargetDef};
use crate::nbd::memory::{MemCatalog, MemExport};

const IQN: &str = "iqn.2026-12.io.cairn:vol";
const SIZE: u64 = 8 << 20;

struct Initiator {
    r: ReadHalf<DuplexStream>,
    w: WriteHalf<DuplexStream>,
    cmd_sn: u32,
    exp_stat_sn: u32,
    itt: u32,
    _stop: watch::Sender<bool>,
    pub max_cmd_sn: u32,
}

fn portal(config: IscsiConfig) -> Arc<Portal<MemCatalog>> {
    Portal::new(
        MemCatalog {
            exports: vec![
                MemExport::new("vol", SIZE, false),
                MemExport::new("other", SIZE, false),
            ],
        },
        config,
    )
}

fn auto() -> IscsiConfig {
    IscsiConfig {
        auto_prefix: Some(super::AUTO_PREFIX_DEFAULT.into()),
        ..IscsiConfig::default()
    }
}

impl Initiator {
    fn connect(portal: Arc<Portal<MemCatalog>>) -> Initiator {
        let (a, b) = tokio::io::duplex(1 << 20);
        let (sr, sw) = tokio::io::split(b);
        let (stop, stop_rx) = watch::channel(false);
        tokio::spawn(serve_stream(
            portal,
            sr,
            sw,
            IscsiOptions {
                connections_max: 8,
                login_timeout: Duration::from_secs(5),
            },
            stop_rx,
        ));
        let (r, w) = tokio::io::split(a);
        Initiator {
            r,
            w,
            cmd_sn: 1,
            exp_stat_sn: 0,
            itt: 1,
            _stop: stop,
            max_cmd_sn: 0,
        }
    }

    async fn send(&mut self, p: &Pdu) {
        let mut out = BytesMut::new();
        encode(p, Digests::default(), &mut out);
        self.w.write_all(&out).await.unwrap();
    }

    async fn recv(&mut self) -> Option<Pdu> {
        let p = tokio::time::timeout(
            Duration::from_secs(5),
            read_pdu(&mut self.r, Digests::default(), 16 << 20),
        )
        .await
        .expect("no answer within 5 s")
        .ok()?;
        if p.opcode() != OP_DATA_IN || p.flags() & 1 != 0 {
            self.exp_stat_sn = p.u32(24).wrapping_add(1);
        }
        self.max_cmd_sn = p.u32(32);
        Some(p)
    }

    /// One login request; the answer's status and keys.
    async fn login_step(
        &mut self,
        flags: u8,
        keys: &[(&str, &str)],
    ) -> (u16, Vec<(String, String)>, Pdu) {
        let mut p = Pdu::new(OP_LOGIN_REQ | IMMEDIATE);
        p.bhs[1] = flags;
        p.bhs[8..14].copy_from_slice(&[0x80, 0, 0, 0, 0, 1]);
        p.set_u32(16, self.itt)
            .set_u32(24, self.cmd_sn)
            .set_u32(28, self.exp_stat_sn);
        let pairs: Vec<(String, String)> = keys
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        p.data = Bytes::from(text::encode(&pairs));
        self.send(&p).await;
        let r = self.recv().await.expect("a login response");
        assert_eq!(r.opcode(), OP_LOGIN_RESP);
        (r.u16(36), text::parse(&r.data).unwrap(), r)
    }

    /// Logs in to `target` (None: discovery) without CHAP.
    async fn login(&mut self, target: Option<&str>) -> u16 {
        let mut keys = vec![("InitiatorName", "iqn.2026-12.test:init")];
        match target {
            Some(t) => keys.push(("TargetName", t)),
            None => keys.push(("SessionType", "Discovery")),
        }
        keys.extend([("AuthMethod", "None")]);
        let (status, _, _) = self.login_step(0x80 | 0x01, &keys).await; // security -> operational
        if status != 0 {
            return status;
        }
        let (status, _, r) = self
            .login_step(
                0x80 | (1 << 2) | 0x03,
                &[
                    ("ImmediateData", "Yes"),
                    ("InitialR2T", "Yes"),
                    ("MaxRecvDataSegmentLength", "8192"),
                    ("MaxBurstLength", "16384"),
                    ("FirstBurstLength", "8192"),
                ],
            )
            .await;
        if status == 0 {
            assert_eq!(r.flags() & 0x83, 0x83, "transit to full feature");
            assert_ne!(r.u16(14), 0, "a TSIH");
        }
        status
    }

    fn next_itt(&mut self) -> u32 {
        self.itt += 1;
        self.itt
    }

    /// A SCSI command; returns (status, data-in, sense).
    async fn scsi(
        &mut self,
        cdb: &[u8],
        read_len: u32,
        write: Option<&[u8]>,
    ) -> (u8, Vec<u8>, Vec<u8>) {
        let itt = self.next_itt();
        let mut p = Pdu::new(OP_SCSI_CMD);
        let mut f = FINAL;
        if read_len > 0 {
            f |= 0x40;
        }
        let edtl = match write {
            Some(d) => {
                f |= 0x20;
                d.len() as u32
            }
            None => read_len,
        };
        p.bhs[1] = f;
        p.set_u32(16, itt)
            .set_u32(20, edtl)
            .set_u32(24, self.cmd_sn)
            .set_u32(28, self.exp_stat_sn);
        p.bhs[32..32 + cdb.len()].copy_from_slice(cdb);
        // Immediate data: the first 8 KiB.
        if let Some(d) = write {
            p.data = Bytes::copy_from_slice(&d[..d.len().min(8192)]);
        }
        self.cmd_sn += 1;
        self.send(&p).await;
        let mut data = Vec::new();
        loop {
            let r = self.recv().await.expect("an answer");
            match r.opcode() {
                OP_R2T => {
                    let d = write.expect("R2T for a write");
                    let (off, len) = (r.u32(40) as usize, r.u32(44) as usize);
                    let mut sn = 0;
                    let mut at = off;
                    while at < off + len {
                        let n = (off + len - at).min(8192);
                        let mut o = Pdu::new(OP_DATA_OUT);
                        o.bhs[1] = if at + n == off + len { FINAL } else { 0 };
                        o.set_u32(16, itt)
                            .set_u32(20, r.u32(20))
                            .set_u32(36, sn)
                            .set_u32(40, at as u32);
                        o.data = Bytes::copy_from_slice(&d[at..at + n]);
                        self.send(&o).await;
                        sn += 1;
                        at += n;
                    }
                }
                OP_DATA_IN => {
                    assert_eq!(r.u32(40) as usize, data.len(), "Data-In in order");
                    data.extend_from_slice(&r.data);
                    if r.flags() & 1 != 0 {
                        return (r.u8(3), data, Vec::new());
                    }
                }
                OP_SCSI_RESP => {
                    let sense = if r.data.len() > 2 {
                        r.data[2..].to_vec()
                    } else {
                        Vec::new()
                    };
                    return (r.u8(3), data, sense);
                }
                op => panic!("unexpected opcode {op:#x}"),
            }
        }
    }
}

fn write10(lba: u32, blocks: u16) -> [u8; 10] {
    let mut c = [0u8; 10];
    c[0] = 0x2a;
    c[2..6].copy_from_slice(&lba.to_be_bytes());
    c[7..9].copy_from_slice(&blocks.to_be_bytes());
    c
}

fn read10(lba: u32, blocks: u16) -> [u8; 10] {
    let mut c = write10(lba, blocks);
    c[0] = 0x28;
    c
}

#[tokio::test]
async fn login_write_with_r2t_and_read_back() {
    let mut i = Initiator::connect(portal(auto()));
    assert_eq!(i.login(Some(IQN)).await, 0);
    // 40 KiB: 8 KiB immediate, the rest solicited in 16 KiB bursts.
    let data: Vec<u8> = (0..40 * 1024).map(|n| (n * 7 % 251) as u8).collect();
    let (status, _, sense) = i.scsi(&write10(100, 80), 0, Some(&data)).await;
    assert_eq!(status, 0, "sense {sense:02x?}");
    let (status, back, _) = i.scsi(&read10(100, 80), 40 * 1024, None).await;
    assert_eq!(status, 0);
    assert!(back == data, "read back differs");
    // The window: MaxCmdSN lies ahead of the next CmdSN.
    assert!(i.max_cmd_sn.wrapping_sub(i.cmd_sn) < 1 << 31);
}

#[tokio::test]
async fn unknown_targets_acls_and_missing_names_are_refused() {
    let mut i = Initiator::connect(portal(auto()));
    assert_eq!(i.login(Some("iqn.2026-12.io.cairn:nope")).await, 0x0203);
    let mut cfg = auto();
    cfg.auto_initiators = vec!["iqn.2026-12.test:someone-else".into()];
    let mut i = Initiator::connect(portal(cfg));
    assert_eq!(i.login(Some(IQN)).await, 0x0202);
    let mut i = Initiator::connect(portal(auto()));
    let (status, _, _) = i.login_step(0x81, &[("AuthMethod", "None")]).await;
    assert_eq!(status, 0x0207, "no InitiatorName");
}

#[tokio::test]
async fn discovery_lists_targets_and_rejects_bad_values() {
    let mut cfg = auto();
    cfg.targets.push(TargetDef {
        iqn: "iqn.2026-12.org.hospital:pacs".into(),
        luns: vec!["vol".into(), "other".into()],
        initiators: vec![],
        auth: None,
    });
    let mut i = Initiator::connect(portal(cfg));
    assert_eq!(i.login(None).await, 0);
    for (ask, want) in [
        ("All", Some(3usize)),
        ("Alle", None),
        ("SendTargetsPlease", None),
    ] {
        let mut p = Pdu::new(OP_TEXT_REQ | IMMEDIATE);
        p.bhs[1] = FINAL;
        let key = if ask == "SendTargetsPlease" {
            "SendTargetsPlease"
        } else {
            "SendTargets"
        };
        let v = if ask == "SendTargetsPlease" {
            "All"
        } else {
            ask
        };
        p.set_u32(16, i.next_itt())
            .set_u32(20, NO_TAG)
            .set_u32(24, i.cmd_sn);
        p.data = Bytes::from(text::encode(&[(key.into(), v.into())]));
        i.send(&p).await;
        let r = i.recv().await.unwrap();
        assert_eq!(r.opcode(), OP_TEXT_RESP);
        let kv = text::parse(&r.data).unwrap();
        match want {
            Some(n) => {
                let names: Vec<&str> = kv
                    .iter()
                    .filter(|(k, _)| k == "TargetName")
                    .map(|(_, v)| v.as_str())
                    .collect();
                assert_eq!(names.len(), n, "{kv:?}");
                assert!(names.contains(&"iqn.2026-12.org.hospital:pacs"));
                assert!(kv
                    .iter()
                    .any(|(k, v)| k == "TargetAddress" && v == "127.0.0.1:3260,1"));
            }
            None => assert!(
                kv.iter().all(|(k, _)| k != "TargetName")
                    && kv
                        .iter()
                        .any(|(_, v)| v == "Reject" || v == "NotUnderstood"),
                "{kv:?}"
            ),
        }
    }
}

fn chap_config(mutual: bool) -> IscsiConfig {
    let mut cfg = auto();
    cfg.auto_auth = Some(Auth {
        chap: Chap {
            user: "pacs".into(),
            secret: Secret::new("initiator-secret").unwrap(),
        },
        mutual: mutual.then(|| Chap {
            user: "cairn".into(),
            secret: Secret::new("target-secret-1").unwrap(),
        }),
    });
    cfg
}

/// Runs the CHAP exchange; the final status and keys.
async fn chap_login(
    i: &mut Initiator,
    secret: &[u8],
    mutual: Option<(u8, [u8; 16])>,
) -> (u16, Vec<(String, String)>) {
    let (s, kv, _) = i
        .login_step(
            0x01,
            &[
                ("InitiatorName", "iqn.2026-12.test:init"),
                ("TargetName", IQN),
                ("AuthMethod", "CHAP,None"),
            ],
        )
        .await;
    assert_eq!(s, 0);
    assert!(kv.contains(&("AuthMethod".into(), "CHAP".into())), "{kv:?}");
    let (s, kv, _) = i.login_step(0x01, &[("CHAP_A", "5")]).await;
    assert_eq!(s, 0);
    let get = |k: &str| {
        kv.iter()
            .find(|(x, _)| x == k)
            .map(|(_, v)| v.clone())
            .unwrap()
    };
    let id: u8 = get("CHAP_I").parse().unwrap();
    let challenge = super::login::decode_binary(&get("CHAP_C")).unwrap();
    let resp = format!("0x{}", hex::encode(chap_response(id, secret, &challenge)));
    let mut keys = vec![("CHAP_N", "pacs".to_string()), ("CHAP_R", resp)];
    if let Some((mid, mc)) = mutual {
        keys.push(("CHAP_I", mid.to_string()));
        keys.push(("CHAP_C", format!("0x{}", hex::encode(mc))));
    }
    let keys: Vec<(&str, &str)> = keys.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let (s, kv, _) = i.login_step(0x81, &keys).await;
    (s, kv)
}

#[tokio::test]
async fn chap_one_way_and_mutual() {
    let mut i = Initiator::connect(portal(chap_config(false)));
    let (s, _) = chap_login(&mut i, b"initiator-secret", None).await;
    assert_eq!(s, 0);

    let mut i = Initiator::connect(portal(chap_config(false)));
    let (s, _) = chap_login(&mut i, b"wrong-secret-xx", None).await;
    assert_eq!(s, 0x0201);

    // Without AuthMethod the operational stage is refused.
    let mut i = Initiator::connect(portal(chap_config(false)));
    let (s, _, _) = i
        .login_step(
            0x87,
            &[
                ("InitiatorName", "iqn.2026-12.test:init"),
                ("TargetName", IQN),
            ],
        )
        .await;
    assert_eq!(s, 0x0201);

    // Mutual: the target proves it knows its own secret.
    let mut i = Initiator::connect(portal(chap_config(true)));
    let mc = [9u8; 16];
    let (s, kv) = chap_login(&mut i, b"initiator-secret", Some((7, mc))).await;
    assert_eq!(s, 0);
    let r = kv
        .iter()
        .find(|(k, _)| k == "CHAP_R")
        .map(|(_, v)| v.clone())
        .unwrap();
    assert_eq!(
        super::login::decode_binary(&r).unwrap(),
        chap_response(7, b"target-secret-1", &mc).to_vec()
    );
}

#[tokio::test]
async fn out_of_window_commands_are_ignored_and_a_bad_datasn_aborts_its_command() {
    let mut i = Initiator::connect(portal(auto()));
    assert_eq!(i.login(Some(IQN)).await, 0);
    // TEST UNIT READY with a CmdSN beyond MaxCmdSN: no answer.
    let saved = i.cmd_sn;
    i.cmd_sn = i.max_cmd_sn.wrapping_add(1);
    let itt = i.next_itt();
    let mut p = Pdu::new(OP_SCSI_CMD);
    p.bhs[1] = FINAL;
    p.set_u32(16, itt).set_u32(24, i.cmd_sn);
    i.send(&p).await;
    let quiet = tokio::time::timeout(
        Duration::from_millis(300),
        read_pdu(&mut i.r, Digests::default(), 1 << 20),
    )
    .await;
    assert!(quiet.is_err(), "a command outside the window was answered");
    i.cmd_sn = saved;
    let (status, _, _) = i.scsi(&[0u8; 6], 0, None).await;
    assert_eq!(status, 0, "the right CmdSN works again");

    // A write whose Data-Out carries DataSN 5: the PDU is rejected, the
    // command fails with ABORTED COMMAND, the connection goes on.
    let itt = i.next_itt();
    let mut p = Pdu::new(OP_SCSI_CMD);
    p.bhs[1] = FINAL | 0x20;
    p.set_u32(16, itt).set_u32(20, 16384).set_u32(24, i.cmd_sn);
    p.bhs[32..42].copy_from_slice(&write10(0, 32));
    i.cmd_sn += 1;
    i.send(&p).await;
    let r2t = i.recv().await.unwrap();
    assert_eq!(r2t.opcode(), OP_R2T);
    let mut o = Pdu::new(OP_DATA_OUT);
    o.bhs[1] = FINAL;
    o.set_u32(16, itt)
        .set_u32(20, r2t.u32(20))
        .set_u32(36, 5)
        .set_u32(40, 0);
    o.data = Bytes::from(vec![0u8; 16384]);
    i.send(&o).await;
    let r = i.recv().await.unwrap();
    assert_eq!((r.opcode(), r.u8(2)), (OP_REJECT, REJECT_PROTOCOL));
    // The rejected header comes back (its length field as it was sent).
    assert_eq!(
        &r.data[8..BHS_LEN],
        &o.bhs[8..],
        "the rejected header comes back"
    );
    let r = i.recv().await.unwrap();
    assert_eq!((r.opcode(), r.itt(), r.u8(3)), (OP_SCSI_RESP, itt, 0x02));
    assert_eq!(r.data[2 + 2] & 0x0f, 0x0b, "ABORTED COMMAND");
    let (status, _, _) = i.scsi(&[0u8; 6], 0, None).await;
    assert_eq!(status, 0, "the connection still serves");
}

#[tokio::test]
async fn nop_and_logout() {
    let mut i = Initiator::connect(portal(auto()));
    assert_eq!(i.login(Some(IQN)).await, 0);
    let itt = i.next_itt();
    let mut p = Pdu::new(OP_NOP_OUT | IMMEDIATE);
    p.bhs[1] = FINAL;
    p.set_u32(16, itt).set_u32(20, NO_TAG).set_u32(24, i.cmd_sn);
    p.data = Bytes::from_static(b"ping");
    i.send(&p).await;
    let r = i.recv().await.unwrap();
    assert_eq!(
        (r.opcode(), r.itt(), &r.data[..]),
        (OP_NOP_IN, itt, &b"ping"[..])
    );
    let itt = i.next_itt();
    let mut p = Pdu::new(OP_LOGOUT_REQ | IMMEDIATE);
    p.bhs[1] = FINAL;
    p.set_u32(16, itt).set_u32(24, i.cmd_sn);
    i.send(&p).await;
    let r = i.recv().await.unwrap();
    assert_eq!((r.opcode(), r.u8(2)), (OP_LOGOUT_RESP, 0));
    assert!(i.recv().await.is_none());
}

/// The next PDU within `wait` (paused time: waits cost no real time), or
/// None once the target closed the connection.
async fn recv_within(i: &mut Initiator, wait: Duration) -> Option<Pdu> {
    tokio::time::timeout(wait, read_pdu(&mut i.r, Digests::default(), 16 << 20))
        .await
        .expect("neither a PDU nor a close in time")
        .ok()
}

fn nop_out(itt: u32, ttt: u32, cmd_sn: u32) -> Pdu {
    let mut p = Pdu::new(OP_NOP_OUT | IMMEDIATE);
    p.bhs[1] = FINAL;
    p.set_u32(16, itt).set_u32(20, ttt).set_u32(24, cmd_sn);
    p
}

/// The keepalive: a connection that talks is never pinged; a quiet one is
/// pinged after `NOP_INTERVAL`; a ping answered keeps it, one unanswered for
/// `NOP_TIMEOUT` drops it. Paused time, so the minutes take no real time.
#[tokio::test(start_paused = true)]
async fn keepalive_pings_quiet_connections_and_drops_silent_ones() {
    use super::session::{NOP_INTERVAL, NOP_TIMEOUT};
    use tokio::time::Instant;
    let mut i = Initiator::connect(portal(auto()));
    assert_eq!(i.login(Some(IQN)).await, 0);
    // Talking at a third of the interval for three intervals: every PDU
    // back is the answer to ours, never a ping.
    for _ in 0..9 {
        tokio::time::sleep(NOP_INTERVAL / 3).await;
        let itt = i.next_itt();
        i.send(&nop_out(itt, NO_TAG, i.cmd_sn)).await;
        let r = i.recv().await.expect("an answer");
        assert_eq!((r.opcode(), r.itt()), (OP_NOP_IN, itt), "not a ping");
    }
    // Quiet: pinged once the interval has passed, and answered.
    let quiet = Instant::now();
    let ping = recv_within(&mut i, NOP_INTERVAL * 2).await.expect("a ping");
    assert_eq!((ping.opcode(), ping.itt()), (OP_NOP_IN, NO_TAG));
    assert_ne!(ping.u32(20), NO_TAG, "a ping asks for an answer");
    let waited = quiet.elapsed();
    assert!(
        waited >= NOP_INTERVAL && waited < NOP_INTERVAL + Duration::from_secs(1),
        "pinged after {waited:?}"
    );
    i.send(&nop_out(NO_TAG, ping.u32(20), i.cmd_sn)).await;
    // Answered: the connection stays, and the next ping comes an interval
    // after the answer, not a drop after the timeout.
    let answered = Instant::now();
    let ping = recv_within(&mut i, NOP_TIMEOUT * 2)
        .await
        .expect("a second ping");
    assert_eq!((ping.opcode(), ping.itt()), (OP_NOP_IN, NO_TAG));
    let waited = answered.elapsed();
    assert!(
        waited >= NOP_INTERVAL && waited < NOP_INTERVAL + Duration::from_secs(1),
        "second ping after {waited:?}"
    );
    // Unanswered: dropped once the timeout has passed, not before.
    let pinged = Instant::now();
    assert!(
        recv_within(&mut i, NOP_TIMEOUT * 2).await.is_none(),
        "closed, not another PDU"
    );
    let waited = pinged.elapsed();
    assert!(
        waited >= NOP_TIMEOUT && waited < NOP_TIMEOUT + Duration::from_secs(1),
        "dropped after {waited:?}"
    );
}

//! A whole iSCSI connection from the initiator's first byte: login (with
//! the security and operational stages), then the full feature phase
//! (SCSI commands with immediate and solicited data, Data-Out, NOP, Text,
//! task management, logout) against memory exports. The target must never
//! panic, hang or answer with anything but whole target PDUs.
#![no_main]

use std::time::Duration;

use cairn_target::iscsi::pdu::{parse, Digests, BHS_LEN};
use cairn_target::iscsi::serve::{serve_stream, IscsiOptions};
use cairn_target::iscsi::{IscsiConfig, Portal, AUTO_PREFIX_DEFAULT};
use cairn_target::nbd::memory::{MemCatalog, MemExport};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .expect("a runtime")
    })
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    runtime().block_on(async {
        let portal = Portal::new(
            MemCatalog {
                exports: vec![
                    MemExport::new("vol", 1 << 20, false),
                    MemExport::new("ro", 64 << 10, true),
                ],
            },
            IscsiConfig {
                auto_prefix: Some(AUTO_PREFIX_DEFAULT.into()),
                ..IscsiConfig::default()
            },
        );
        let (client, server) = tokio::io::duplex(1 << 20);
        let (sr, sw) = tokio::io::split(server);
        let (_stop, stop_rx) = watch::channel(false);
        let opts = IscsiOptions {
            connections_max: 1,
            login_timeout: Duration::from_secs(5),
        };
        let served = tokio::spawn(serve_stream(portal, sr, sw, opts, stop_rx));
        let (mut cr, mut cw) = tokio::io::split(client);
        let reader = tokio::spawn(async move {
            let mut out = Vec::new();
            let _ = cr.read_to_end(&mut out).await;
            out
        });
        let _ = cw.write_all(data).await;
        let _ = cw.shutdown().await;
        // Paused time: the login deadline and NOP timers run instantly,
        // so an input that leaves the target waiting cannot hang the run.
        tokio::time::timeout(Duration::from_secs(120), served)
            .await
            .expect("the connection ended")
            .expect("no panic");
        drop(cw);
        let out = reader.await.expect("reader");
        // The first answer, if any, is a whole Login Response (digests are
        // not in force during login).
        if out.len() >= BHS_LEN {
            let (first, _) = parse(&out, Digests::default(), 1 << 24)
                .expect("a well-formed first PDU")
                .expect("a whole first PDU");
            assert_eq!(first.opcode(), 0x23, "the first answer is a Login Response");
        }
    });
});

//! The data directory's file system fills up while a real chunk server is
//! serving: writes get a clear NoSpace error, everything written before stays
//! readable, the server keeps serving, and trimming gives space back so writes
//! succeed again.

use std::path::Path;

use bytes::Bytes;
use cairn_chunkserver::rpc::client::ChunkClient;
use cairn_proto::chunk::{ExtentKey, Status};
use cairn_tests::mount::Mount;
use cairn_tests::{ChunkServerOptions, ChunkServerProcess};

fn key(i: u64) -> ExtentKey {
    ExtentKey {
        volume_id: 0xf011,
        extent_index: i,
        epoch: 1,
    }
}

fn free_bytes(p: &Path) -> u64 {
    let s = nix::sys::statvfs::statvfs(p).unwrap();
    s.blocks_available() as u64 * s.fragment_size() as u64
}

#[test]
fn full_file_system_gives_no_space_errors_and_recovers_after_trim() {
    let dir = cairn_tests::temp_dir("cairn-loopfs-").unwrap();
    let fs = Mount::loop_ext4(dir.path(), 48);
    let data_dir = fs.target().join("chunk");
    std::fs::create_dir(&data_dir).unwrap();
    let options = ChunkServerOptions {
        data_dir: Some(data_dir.clone()),
        extra_args: vec!["--free-bytes-min".into(), "0".into()],
        ..ChunkServerOptions::default()
    };
    let mut server =
        ChunkServerProcess::start(options).expect("start chunk server on the small file system");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let client = ChunkClient::connect(server.addr()).await.unwrap();
        let other = ChunkClient::connect(server.addr()).await.unwrap();
        let eb = 4u32 << 20;
        let chunk = Bytes::from(vec![0xab; 1 << 20]);
        let mut written: Vec<(u64, u64)> = Vec::new();
        let mut no_space = None;
        'fill: for e in 0..64u64 {
            for off in (0..eb as u64).step_by(1 << 20) {
                match client.write(key(e), eb, off, chunk.clone(), false).await {
                    Ok(()) => written.push((e, off)),
                    Err(err) => {
                        assert_eq!(
                            err.status(),
                            Some(Status::NoSpace),
                            "a full disk is NoSpace: {err}"
                        );
                        assert!(
                            err.to_string().contains("no space"),
                            "message says why: {err}"
                        );
                        no_space = Some(err);
                        break 'fill;
                    }
                }
            }
        }
        let err = no_space.expect("48 MiB file system filled up");
        eprintln!("filled after {} MiB: {err}", written.len());
        assert!(
            written.len() > 8,
            "wrote only {} MiB before NoSpace",
            written.len()
        );
        // Everything acknowledged is still there, for any client, after a flush.
        other.flush().await.unwrap();
        for &(e, off) in &written {
            let got = other.read(key(e), eb, off, 4096).await.unwrap();
            assert!(got.iter().all(|&b| b == 0xab), "extent {e} offset {off}");
        }
        // Trim gives space back; writes work again.
        let before = free_bytes(fs.target());
        for e in 0..4u64 {
            client.trim(key(e), eb, 0, eb).await.unwrap();
        }
        client.flush().await.unwrap();
        let after = free_bytes(fs.target());
        assert!(
            after >= before + (8 << 20),
            "trimming 4 extents freed only {} bytes",
            after.saturating_sub(before)
        );
        client
            .write(key(0), eb, 0, chunk.clone(), true)
            .await
            .expect("write after trim");
        assert!(client
            .read(key(0), eb, 0, 4096)
            .await
            .unwrap()
            .iter()
            .all(|&b| b == 0xab));
    });
    let status = server.stop().expect("clean stop");
    assert!(status.success(), "exit status {status}");
}

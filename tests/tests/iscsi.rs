//! cairn-target's iSCSI side with libiscsi's real initiators (iscsi-ls,
//! iscsi-inq, iscsi-readcapacity16, iscsi-test-cu) and qemu-img against a
//! real cluster: a volume manager, three chunk servers and the target, all
//! as processes on loopback.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use cairn_tests::cluster::ReplicatedCluster;
use cairn_tests::free_loopback_addr;
use cairn_tests::target::{run_tool, stdout, tool, TargetProcess, TARGET_IP};

const MIB: u64 = 1 << 20;
const PREFIX: &str = "iqn.2026-12.io.cairn";
const SECRET: &str = "s3cret-for-tests";

/// A cluster with 3-replica volumes, and a target serving iSCSI on a free
/// port of 127.0.0.10. Returns the cluster, the target and `HOST:PORT`.
async fn setup(
    volumes: &[(&str, u64)],
    target_args: &[&str],
) -> (ReplicatedCluster, TargetProcess, String) {
    let cluster = ReplicatedCluster::start(3).await.expect("cluster");
    for (name, size) in volumes {
        cluster
            .client()
            .create_volume(name, *size, MIB as u32, 3, 2)
            .await
            .expect("create volume");
    }
    let portal = free_loopback_addr(TARGET_IP).unwrap().to_string();
    let mut args = vec!["--iscsi-listen", portal.as_str()];
    args.extend_from_slice(target_args);
    let target = TargetProcess::start(&cluster, &args).expect("target");
    (cluster, target, portal)
}

fn secret_file(dir: &Path, name: &str, secret: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, format!("{secret}\n")).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    p.display().to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn discovery_lists_a_target_per_volume_with_its_lun() {
    let (_cluster, target, portal) =
        setup(&[("pacs-db", 64 * MIB), ("Images", 8 * MIB)], &[]).await;
    let out = stdout(&run_tool("iscsi-ls", &["-s", &format!("iscsi://{portal}")]).unwrap());
    assert!(
        out.contains(&format!("Target:{PREFIX}:pacs-db Portal:{portal},1")),
        "{out}"
    );
    assert!(
        out.contains(&format!("Target:{PREFIX}:images Portal:{portal},1")),
        "{out}"
    );
    // -s logs in to each target and lists its LUNs with their sizes.
    assert!(out.contains("Lun:0"), "{out}");
    assert!(
        out.contains(&format!("{}", 64 * MIB)) || out.contains("64M"),
        "{out}"
    );
    drop(target);
}

#[tokio::test(flavor = "multi_thread")]
async fn chap_admits_the_right_secret_only_and_keeps_it_out_of_logs() {
    let dir = tempfile::tempdir().unwrap();
    let file = secret_file(dir.path(), "chap", SECRET);
    let (_cluster, target, portal) = setup(
        &[("vol", 16 * MIB)],
        &[
            "--iscsi-chap-user",
            "pacs",
            "--iscsi-chap-secret-file",
            &file,
            "--iscsi-discovery-chap-user",
            "pacs",
            "--iscsi-discovery-chap-secret-file",
            &file,
        ],
    )
    .await;
    let iqn = format!("{PREFIX}:vol");
    // Discovery and a LUN with the right secret.
    let ok = stdout(&run_tool("iscsi-ls", &[&format!("iscsi://pacs%{SECRET}@{portal}")]).unwrap());
    assert!(ok.contains(&iqn), "{ok}");
    let inq = stdout(
        &run_tool(
            "iscsi-inq",
            &[&format!("iscsi://pacs%{SECRET}@{portal}/{iqn}/0")],
        )
        .unwrap(),
    );
    assert!(inq.contains("CAIRN"), "{inq}");
    // A wrong secret, a wrong user and no CHAP at all are refused.
    for url in [
        format!("iscsi://pacs%wrong-secret-123@{portal}/{iqn}/0"),
        format!("iscsi://other%{SECRET}@{portal}/{iqn}/0"),
        format!("iscsi://{portal}/{iqn}/0"),
    ] {
        let out = tool("iscsi-inq", &[&url]).unwrap();
        assert!(
            !out.status.success(),
            "{url} was admitted: {}",
            stdout(&out)
        );
    }
    let out = tool(
        "iscsi-ls",
        &[&format!("iscsi://pacs%wrong-secret-123@{portal}")],
    )
    .unwrap();
    assert!(
        !out.status.success(),
        "discovery with a wrong secret was admitted"
    );
    let log = target.log();
    assert!(log.contains("CHAP response"), "{log}");
    assert!(!log.contains(SECRET), "the secret is in the log:\n{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn inquiry_and_read_capacity_describe_a_thin_volume() {
    let (_cluster, mut target, portal) = setup(&[("vol", 64 * MIB)], &[]).await;
    let lun = format!("iscsi://{portal}/{PREFIX}:vol/0");
    let std_inq = stdout(&run_tool("iscsi-inq", &[&lun]).unwrap());
    assert!(std_inq.contains("CAIRN"), "{std_inq}");
    assert!(
        std_inq.contains("Peripheral Device Type:DIRECT_ACCESS"),
        "{std_inq}"
    );
    // Unit serial number (0x80) and device identification (0x83) VPD pages
    // (iscsi-inq takes the page code in decimal).
    let serial = stdout(&run_tool("iscsi-inq", &["-e", "1", "-c", "128", &lun]).unwrap());
    assert!(serial.contains("Unit Serial Number:["), "{serial}");
    let ids = stdout(&run_tool("iscsi-inq", &["-e", "1", "-c", "131", &lun]).unwrap());
    assert!(ids.contains("Designator Type:(3) NAA"), "{ids}");
    assert!(ids.contains(&format!("Designator:[{PREFIX}:vol]")), "{ids}");
    // Stable: the same answers from a new login, and from a restarted
    // target (initiators key multipath on these).
    assert_eq!(
        serial,
        stdout(&run_tool("iscsi-inq", &["-e", "1", "-c", "128", &lun]).unwrap())
    );
    target.stop().unwrap();
    target.restart().unwrap();
    assert_eq!(
        ids,
        stdout(&run_tool("iscsi-inq", &["-e", "1", "-c", "131", &lun]).unwrap())
    );
    let cap = stdout(&run_tool("iscsi-readcapacity16", &[&lun]).unwrap());
    assert!(
        cap.contains(&format!(
            "RETURNED LOGICAL BLOCK ADDRESS:{}",
            64 * MIB / 512 - 1
        )),
        "{cap}"
    );
    assert!(cap.contains("LOGICAL BLOCK LENGTH IN BYTES:512"), "{cap}");
    assert!(
        cap.contains("LOGICAL BLOCKS PER PHYSICAL BLOCK EXPONENT:3"),
        "{cap}"
    );
    assert!(cap.contains("LBPME:1 LBPRZ:1"), "{cap}");
    assert!(cap.contains(&format!("Total size:{}", 64 * MIB)), "{cap}");
}

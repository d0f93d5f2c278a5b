//! An NBD export as a block device without the kernel's nbd driver: nbdfuse
//! turns the export into a file, losetup the file into a loop device. On
//! drop everything is undone in reverse order (file system, loop device,
//! nbdfuse mount and process), lazily if still busy.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::target::{run_tool, stdout};

/// How long nbdfuse may take to connect and mount.
const ATTACH_TIMEOUT: Duration = Duration::from_secs(30);

/// One export attached as a loop device.
pub struct FuseDisk {
    /// The loop device, `/dev/loopN`.
    pub dev: String,
    /// Where a file system on it is mounted, if it is.
    fs_mount: Option<PathBuf>,
    fuse_mount: PathBuf,
    nbdfuse: Child,
}

impl FuseDisk {
    /// Attaches `uri` under `dir` (which must exist and be empty of
    /// `fuse/`), read-only if `read_only`.
    pub fn attach(dir: &Path, uri: &str, read_only: bool) -> FuseDisk {
        let fuse_mount = dir.join("fuse");
        std::fs::create_dir_all(&fuse_mount).unwrap();
        let pidfile = dir.join("nbdfuse.pid");
        let _ = std::fs::remove_file(&pidfile);
        let mut cmd = Command::new("nbdfuse");
        if read_only {
            cmd.arg("-r");
        }
        let nbdfuse = cmd
            .arg("-P")
            .arg(&pidfile)
            .arg(fuse_mount.join("disk"))
            .arg(uri)
            .stdin(Stdio::null())
            .spawn()
            .expect("starting nbdfuse (apt-get install nbdfuse)");
        let mut disk = FuseDisk {
            dev: String::new(),
            fs_mount: None,
            fuse_mount: fuse_mount.clone(),
            nbdfuse,
        };
        let t0 = Instant::now();
        while !pidfile.exists() {
            assert!(
                disk.nbdfuse.try_wait().unwrap().is_none(),
                "nbdfuse exited before mounting {uri}"
            );
            assert!(t0.elapsed() < ATTACH_TIMEOUT, "nbdfuse did not mount {uri}");
            std::thread::sleep(Duration::from_millis(50));
        }
        let file = fuse_mount.join("disk");
        let mut args = vec!["-f", "--show"];
        if read_only {
            args.push("-r");
        }
        let file = file.to_str().unwrap().to_string();
        args.push(&file);
        disk.dev = stdout(&run_tool("losetup", &args).unwrap())
            .trim()
            .to_string();
        disk
    }

    /// The size of the attached export, as the file nbdfuse shows.
    pub fn size(&self) -> u64 {
        std::fs::metadata(self.fuse_mount.join("disk"))
            .unwrap()
            .len()
    }

    /// `mkfs.ext4` on the device.
    pub fn mkfs_ext4(&self) {
        run_tool("mkfs.ext4", &["-q", "-F", &self.dev]).unwrap();
    }

    /// Mounts the device's file system on `at` (with `-o options` if given).
    pub fn mount(&mut self, at: &Path, options: Option<&str>) {
        std::fs::create_dir_all(at).unwrap();
        let at_s = at.to_str().unwrap();
        match options {
            Some(o) => run_tool("mount", &["-o", o, &self.dev, at_s]).unwrap(),
            None => run_tool("mount", &[&self.dev, at_s]).unwrap(),
        };
        self.fs_mount = Some(at.to_path_buf());
    }

    /// Syncs and unmounts the file system, then drops the loop device's page
    /// cache, so what is read next comes from the export.
    pub fn umount(&mut self) {
        run_tool("sync", &[]).unwrap();
        if let Some(m) = self.fs_mount.take() {
            run_tool("umount", &[m.to_str().unwrap()]).unwrap();
        }
        run_tool("blockdev", &["--flushbufs", &self.dev]).unwrap();
    }

    /// `fsck.ext4 -n -f`: Ok(output) if clean.
    pub fn fsck(&self) -> Result<String, String> {
        let out = run_tool("fsck.ext4", &["-n", "-f", &self.dev]).map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(stdout(&out))
        } else {
            Err(stdout(&out))
        }
    }

    /// Detaches everything now (the same as dropping it).
    pub fn detach(self) {}
}

impl Drop for FuseDisk {
    fn drop(&mut self) {
        if let Some(m) = self.fs_mount.take() {
            let _ = Command::new("umount").arg("-l").arg(m).status();
        }
        if !self.dev.is_empty() {
            let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
        }
        // A clean unmount first: nbdfuse then flushes and disconnects.
        let clean = Command::new("umount")
            .arg(&self.fuse_mount)
            .status()
            .is_ok_and(|s| s.success());
        if !clean {
            let _ = Command::new("umount")
                .arg("-l")
                .arg(&self.fuse_mount)
                .status();
        }
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(5) {
            if self.nbdfuse.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.nbdfuse.kill();
        let _ = self.nbdfuse.wait();
    }
}

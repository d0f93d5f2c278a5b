//! File systems mounted for a test (tmpfs, bind, loop-device ext4), unmounted
//! on drop. These need root; a test that cannot mount fails loudly rather
//! than passing by skipping.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A mounted file system, unmounted on drop (lazily if still busy, so a
/// failing test cannot leave a mount behind).
pub struct Mount {
    target: PathBuf,
}

impl Mount {
    /// Runs `mount ARGS TARGET`.
    pub fn new(args: &[&str], target: &Path) -> Mount {
        run_root_command("mount", args, target);
        Mount {
            target: target.to_path_buf(),
        }
    }

    /// A fresh ext4 file system of `size_mib` on a loop device: the image is
    /// `dir/fs.img`, mounted on `dir/mnt`.
    pub fn loop_ext4(dir: &Path, size_mib: u64) -> Mount {
        let image = dir.join("fs.img");
        std::fs::File::create(&image)
            .and_then(|f| f.set_len(size_mib << 20))
            .unwrap_or_else(|e| panic!("creating {}: {e}", image.display()));
        run_root_command("mkfs.ext4", &["-q", "-F"], &image);
        let mnt = dir.join("mnt");
        std::fs::create_dir(&mnt).unwrap_or_else(|e| panic!("creating {}: {e}", mnt.display()));
        Mount::new(&["-o", "loop", &image.display().to_string()], &mnt)
    }

    pub fn target(&self) -> &Path {
        &self.target
    }

    /// Remounts with `options` (for example `remount,ro`).
    pub fn remount(&self, options: &str) {
        run_root_command("mount", &["-o", options], &self.target);
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let unmounted = Command::new("umount")
            .arg(&self.target)
            .status()
            .is_ok_and(|s| s.success());
        if !unmounted {
            let _ = Command::new("umount").arg("-l").arg(&self.target).status();
        }
    }
}

/// Runs `PROGRAM ARGS TARGET`, failing the test loudly if it cannot.
fn run_root_command(program: &str, args: &[&str], target: &Path) {
    let output = Command::new(program)
        .args(args)
        .arg(target)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(
        output.status.success(),
        "`{program} {} {}` failed ({}): {}; these tests need root and loop/tmpfs mounts",
        args.join(" "),
        target.display(),
        output.status,
        String::from_utf8_lossy(&output.stderr).trim()
    );
}

//! Mounting and unmounting filesystems (tracefs when it is not mounted).

use std::path::Path;

use super::SysError;

/// Mounts a filesystem of type `fstype` (e.g. `tracefs`) at `target`.
pub fn mount_fs(fstype: &str, target: &Path) -> Result<(), SysError> {
    nix::mount::mount(
        Some(fstype),
        target,
        Some(fstype),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|errno| SysError::Mount {
        fstype: fstype.to_string(),
        target: target.to_path_buf(),
        errno,
    })
}

/// Unmounts `target`.
pub fn umount(target: &Path) -> Result<(), SysError> {
    nix::mount::umount(target).map_err(|errno| SysError::Umount {
        target: target.to_path_buf(),
        errno,
    })
}

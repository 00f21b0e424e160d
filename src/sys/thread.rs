//! The calling thread: pinning it to a CPU and its thread id.

use nix::errno::Errno;

use super::SysError;

/// Pins the calling thread to `cpu`.
pub fn pin_current_thread(cpu: u32) -> Result<(), SysError> {
    let err = |errno| SysError::SetAffinity { cpu, errno };
    let idx = usize::try_from(cpu).map_err(|_| err(Errno::EINVAL))?;
    if idx >= libc::CPU_SETSIZE as usize {
        return Err(err(Errno::EINVAL));
    }
    // SAFETY: cpu_set_t is a plain bitmask for which all-zero is valid.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `idx` was checked against CPU_SETSIZE above.
    unsafe { libc::CPU_SET(idx, &mut set) };
    // SAFETY: `set` is a valid cpu_set_t of the size passed; pid 0 is the
    // calling thread.
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if rc < 0 {
        return Err(err(Errno::last()));
    }
    Ok(())
}

/// Thread id of the calling thread.
pub fn current_tid() -> u32 {
    nix::unistd::gettid().as_raw() as u32
}

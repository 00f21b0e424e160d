//! System call boundary: every syscall, ioctl and mmap of the daemon.

//! Process limits: raising the open-file soft limit to the hard limit so
//! the connections scenario can hold many sockets.

/// Raises RLIMIT_NOFILE's soft limit to its hard limit and returns the soft
/// limit now in force.
pub fn raise_nofile_limit() -> std::io::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes into the rlimit struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if lim.rlim_cur < lim.rlim_max {
        let wanted = libc::rlimit {
            // An unlimited hard limit cannot be used as the soft limit for
            // file descriptors; 1 Mi is far beyond what a run needs.
            rlim_cur: if lim.rlim_max == libc::RLIM_INFINITY {
                1 << 20
            } else {
                lim.rlim_max
            },
            rlim_max: lim.rlim_max,
        };
        // SAFETY: setrlimit only reads the rlimit struct we pass.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &wanted) } == 0 {
            lim.rlim_cur = wanted.rlim_cur;
        }
    }
    #[allow(clippy::unnecessary_cast)] // rlim_t is not u64 on every target
    Ok(lim.rlim_cur as u64)
}

#[cfg(test)]
mod tests {
    #[test]
    fn limit_is_positive() {
        assert!(super::raise_nofile_limit().unwrap() > 0);
    }
}

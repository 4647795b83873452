//! Installing what a test drives (npm and PyPI packages) once, safely from parallel tests and
//! test binaries: an exclusive lock on a file in the install directory, and a marker written
//! only once the install has finished, so nobody finds a half-made `node_modules` or venv.

use std::path::Path;
use std::process::Command;

/// Runs `install` in `dir` unless a finished install is already there.
pub fn once(dir: &Path, install: impl FnOnce(&Path)) {
    let done = dir.join(".installed");
    if done.exists() {
        return;
    }
    let lock = std::fs::File::create(dir.join(".install.lock")).expect("the lock file opens");
    lock.lock().expect("the install lock is taken");
    if !done.exists() {
        install(dir);
        std::fs::write(&done, b"").expect("the install marker is written");
    }
}

/// Runs a command to completion; panics with its output if it fails.
pub fn run(cmd: &mut Command) {
    let out = cmd.output().expect("the command starts");
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `npm ci` from the directory's `package-lock.json`.
pub fn npm(dir: &Path) {
    once(dir, |dir| {
        run(Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund"])
            .current_dir(dir))
    });
}

/// A virtualenv in `dir/.venv` with `dir/requirements.txt`; returns its python.
pub fn venv(dir: &Path) -> std::path::PathBuf {
    once(dir, |dir| {
        run(Command::new("python3")
            .args(["-m", "venv", "--clear", ".venv"])
            .current_dir(dir));
        run(Command::new(dir.join(".venv/bin/python"))
            .args(["-m", "pip", "install", "-q", "-r", "requirements.txt"])
            .current_dir(dir));
    });
    dir.join(".venv/bin/python")
}

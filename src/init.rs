//! haconfd as PID 1 (a container's entrypoint without `docker run --init`): the process splits in
//! two before anything else runs. The daemon goes on in a child, as on any host; PID 1 stays
//! behind as a minimal init that forwards every signal it is sent to the daemon, reaps the
//! processes orphaned in the container (a hook's `sleep 1 &`, an ssh `ControlPersist` master),
//! and exits with the daemon's status when the daemon exits.
//!
//! Reaping in the daemon itself would race it: its commands, checks and hooks are awaited through
//! tokio's child handles, and a `waitpid(-1)` there could take the exit status one of them waits
//! for. Here the init waits for every process but has only one child of its own, the daemon;
//! everything else that reaches it is an orphan nobody else waits for.

use nix::sys::signal::{kill, sigprocmask, SigSet, SigmaskHow, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{fork, ForkResult, Pid};

/// Signals a process raises at itself on a fault: they stay unblocked in the init, and are not
/// forwarded.
const FAULTS: [Signal; 7] = [
    Signal::SIGSEGV,
    Signal::SIGBUS,
    Signal::SIGFPE,
    Signal::SIGILL,
    Signal::SIGTRAP,
    Signal::SIGABRT,
    Signal::SIGSYS,
];

/// When this process is PID 1, forks: returns in the child, which runs the daemon with the
/// signal mask it had; the parent never returns (see the module's docs). Elsewhere returns at
/// once. Must run before any thread is started: a fork keeps only the calling thread.
pub fn split_if_pid1() {
    if std::process::id() != 1 {
        return;
    }
    let mut forwarded = SigSet::all();
    for s in FAULTS.into_iter().chain([Signal::SIGKILL, Signal::SIGSTOP]) {
        forwarded.remove(s);
    }
    // Blocked before the fork, so that no signal sent in between is lost: it waits, pending, for
    // the init's sigwait (PID 1 would otherwise drop a signal it has no handler for).
    let mut old = SigSet::empty();
    if let Err(e) = sigprocmask(SigmaskHow::SIG_BLOCK, Some(&forwarded), Some(&mut old)) {
        eprintln!("haconfd: PID 1 cannot block signals ({e}): orphans will not be reaped");
        return;
    }
    // SAFETY: no thread has been started yet (main calls this first), so the child is a whole
    // copy of a single-threaded process.
    match unsafe { fork() } {
        Ok(ForkResult::Child) => {
            let _ = sigprocmask(SigmaskHow::SIG_SETMASK, Some(&old), None);
        }
        Ok(ForkResult::Parent { child }) => std::process::exit(init(child, &forwarded)),
        Err(e) => {
            let _ = sigprocmask(SigmaskHow::SIG_SETMASK, Some(&old), None);
            eprintln!(
                "haconfd: PID 1 cannot fork its init ({e}): orphans will not be reaped; run the \
                 container with an init (`docker run --init`)"
            );
        }
    }
}

/// The init's loop: waits for a signal, forwards it to the daemon (SIGCHLD excepted), then reaps
/// every process that has exited. Returns the daemon's exit code, or 128 + the signal that
/// killed it.
fn init(daemon: Pid, signals: &SigSet) -> i32 {
    loop {
        match signals.wait() {
            Ok(Signal::SIGCHLD) | Err(_) => {}
            Ok(sig) => {
                let _ = kill(daemon, sig);
            }
        }
        // A SIGCHLD stands for one exit or several; the next exit after this loop is pending
        // again when the next wait starts, so none is missed.
        loop {
            match waitpid(None::<Pid>, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) if pid == daemon => return code,
                Ok(WaitStatus::Signaled(pid, sig, _)) if pid == daemon => return 128 + sig as i32,
                Ok(WaitStatus::StillAlive) | Err(_) => break,
                Ok(_) => {}
            }
        }
    }
}

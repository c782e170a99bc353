//! How long an idle vCPU of a KVM guest polls before it halts (`cpuidle-haltpoll`'s
//! `guest_halt_poll_ns`), and setting it for the run (`--guest-halt-poll`).
//!
//! Why the bench cares: over loopback, the server's answer is delivered into the load
//! generator's socket by the server's own thread, which also wakes the generator. When the
//! generator's vCPU has halted, that wake-up is an interrupt to a halted vCPU — a VM exit
//! billed to the server as system time (seen as `_raw_spin_unlock_irqrestore` under
//! `sock_def_readable` in `perf`). With polling off (`guest_halt_poll_ns = 0`, as on the
//! machines this bench first ran on) every answer to an idle generator costs the server
//! about 10 µs more; it hits the scenarios where the generator waits on a busy server
//! (ValidateToken cold: the generator is ~55 % busy) and not Health/Check (the generator is
//! saturated, never idle), so the cold ratio measured the VM, not the server. A remote
//! client costs the server no such wake-up; polling for a couple of hundred microseconds
//! (the kernel's own default is 200 µs) takes it out of the figures.

use std::{fs, sync::Mutex, time::Duration};

use anyhow::Context;

const PARAMETER: &str = "/sys/module/haltpoll/parameters/guest_halt_poll_ns";
const DRIVER: &str = "/sys/devices/system/cpu/cpuidle/current_driver";

/// What the run saw of vCPU halt polling.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct HaltPolling {
    /// `guest_halt_poll_ns` during the run.
    pub poll_ns: u64,
    /// The value before the run, when `--guest-halt-poll` changed it (restored after).
    pub original_ns: Option<u64>,
}

impl HaltPolling {
    /// Idle vCPUs halt at once: answers to an idle load generator cost the server VM exits.
    pub fn halts_at_once(&self) -> bool {
        self.poll_ns == 0
    }
}

/// The setting in force, when this is a KVM guest idling through `cpuidle-haltpoll`.
pub fn current() -> Option<u64> {
    let driver = fs::read_to_string(DRIVER).ok()?;
    if driver.trim() != "haltpoll" {
        return None;
    }
    fs::read_to_string(PARAMETER).ok()?.trim().parse().ok()
}

/// The value to put back at exit (also on SIGINT/SIGTERM: [`restore`]).
static ORIGINAL: Mutex<Option<u64>> = Mutex::new(None);

/// Sets the poll time for the run (root only). `None` when the machine has no haltpoll
/// idle driver (nothing to set: its idle vCPUs are not halted this way).
pub fn set(poll: Duration) -> anyhow::Result<Option<HaltPolling>> {
    let Some(current) = current() else { return Ok(None) };
    // The kernel's parameter is an unsigned int of nanoseconds.
    let ns = u32::try_from(poll.as_nanos())
        .map_err(|_| anyhow::anyhow!("--guest-halt-poll: at most {}", u32::MAX))?;
    // Recorded before the write, so a signal in between still puts it back; the value of
    // an earlier call wins (it is the machine's own).
    let original = *ORIGINAL.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(current);
    if let Err(error) = fs::write(PARAMETER, ns.to_string()) {
        // Nothing changed: nothing to put back.
        ORIGINAL.lock().unwrap_or_else(|p| p.into_inner()).take();
        return Err(error)
            .with_context(|| format!("--guest-halt-poll: cannot write {PARAMETER} (it needs root)"));
    }
    Ok(Some(HaltPolling { poll_ns: u64::from(ns), original_ns: Some(original) }))
}

/// Puts back the value [`set`] replaced, if any.
pub fn restore() {
    if let Some(original) = ORIGINAL.lock().unwrap_or_else(|p| p.into_inner()).take()
        && let Err(error) = fs::write(PARAMETER, original.to_string())
    {
        eprintln!("portcullis-bench: cannot restore {PARAMETER} to {original}: {error}");
    }
}

/// Restores the setting when dropped (the normal end of a run).
pub struct RestoreOnDrop;

impl Drop for RestoreOnDrop {
    fn drop(&mut self) {
        restore();
    }
}

/// The warning printed when idle vCPUs halt at once and the run did not change it.
pub fn warning() -> String {
    format!(
        "idle vCPUs of this VM halt at once (cpuidle-haltpoll, {PARAMETER} = 0): every answer the \
         server sends to an idle load generator costs the server a VM exit to wake it, billed as \
         its CPU time — scenarios where the generator waits on a busy server (ValidateToken cold) \
         pay ~10 us/request more than Health/Check does; rerun as root with --guest-halt-poll 200us \
         (set for the run, restored after) to measure the server alone"
    )
}

//! The systemd notification protocol, for units with `Type=notify`.
//!
//! - [`ready`]: READY=1 with a STATUS= line. Send it only once the daemon
//!   really serves (its listeners are bound and what answers them runs):
//!   `systemctl start` returns then, and units ordered after this one start.
//! - [`stopping`]: STOPPING=1 at the start of a clean shutdown.
//! - [`status`]: a free-form STATUS= line, shown by `systemctl status`.
//! - [`spawn_watchdog`]: when the unit has `WatchdogSec=`, systemd passes
//!   `WATCHDOG_USEC` (and `WATCHDOG_PID`), and a task sends WATCHDOG=1 every
//!   half interval, but only while the daemon's own liveness check passes. A
//!   daemon whose check fails, or whose runtime is wedged so the task never
//!   runs, stops pinging, and systemd kills and (with `Restart=on-failure`)
//!   restarts it one interval after the last ping.
//!
//! Everything here is a no-op without `NOTIFY_SOCKET` (not started by
//! systemd, or not `Type=notify`). Send failures are logged at debug level
//! and otherwise ignored: the daemon serves whether or not systemd listens.
//! The environment is never modified (that is unsound once threads run).

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use sd_notify::NotifyState;
use tracing::{debug, error, info};

/// Set by [`stopping`]: the watchdog task ends, since what it checks is
/// being shut down (systemd does not enforce the watchdog while stopping;
/// `TimeoutStopSec=` bounds that).
static STOPPING: AtomicBool = AtomicBool::new(false);
/// The last STATUS= sent by [`ready`] or [`status`], restored when a failing
/// liveness check passes again.
static LAST_STATUS: Mutex<String> = Mutex::new(String::new());

fn send(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        debug!("sd_notify to $NOTIFY_SOCKET failed: {e}");
    }
}

fn remember(text: &str) {
    if let Ok(mut last) = LAST_STATUS.lock() {
        last.clear();
        last.push_str(text);
    }
}

/// Tells systemd the daemon is up and serving (READY=1), with `status` as
/// the unit's status line.
pub fn ready(status: &str) {
    remember(status);
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// Tells systemd a clean shutdown has begun (STOPPING=1), and ends the
/// watchdog task.
pub fn stopping() {
    STOPPING.store(true, Ordering::SeqCst);
    send(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
}

/// Sets the unit's status line (STATUS=), e.g. what a starting daemon waits
/// for.
pub fn status(text: &str) {
    remember(text);
    send(&[NotifyState::Status(text)]);
}

/// The watchdog interval systemd asks for (`WatchdogSec=` of the unit), if
/// any: `WATCHDOG_USEC` is set and `WATCHDOG_PID`, when set, is this
/// process.
pub fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled().filter(|d| !d.is_zero())
}

/// Starts the watchdog on the current tokio runtime if systemd asked for one
/// ([`watchdog_interval`]); returns its task, or None.
///
/// Every half interval the task runs `check` (given half an interval to
/// answer) and sends WATCHDOG=1 only if it returned `Ok`. On a failure it
/// logs the reason once, puts it in the unit's status line and sends
/// nothing, so systemd kills the daemon one interval after the last ping
/// unless the check passes again before that. `check` says what liveness
/// means for the daemon; it should be cheap and must not depend on other
/// machines (a member cut off from its peers is alive, and restarting it
/// would not help).
///
/// systemd enforces the watchdog from READY=1 on, so start it right after
/// [`ready`]. Must be called from within a tokio runtime.
pub fn spawn_watchdog<F, Fut>(check: F) -> Option<tokio::task::JoinHandle<()>>
where
    F: FnMut() -> Fut + Send + 'static,
    Fut: Future<Output = Result<(), String>> + Send + 'static,
{
    let interval = watchdog_interval()?;
    info!(
        "systemd watchdog: {interval:?}; pinging every {:?} while healthy",
        interval / 2
    );
    Some(tokio::spawn(run_watchdog(interval / 2, check)))
}

async fn run_watchdog<F, Fut>(period: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), String>>,
{
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        ticker.tick().await;
        if STOPPING.load(Ordering::SeqCst) {
            return;
        }
        let outcome = match tokio::time::timeout(period, check()).await {
            Ok(outcome) => outcome,
            Err(_) => Err(format!(
                "the liveness check did not answer within {period:?}"
            )),
        };
        if STOPPING.load(Ordering::SeqCst) {
            return;
        }
        match outcome {
            Ok(()) => {
                if failing {
                    info!("watchdog: the liveness check passes again; pinging systemd");
                    let last = LAST_STATUS.lock().map(|s| s.clone()).unwrap_or_default();
                    send(&[NotifyState::Status(&last)]);
                    failing = false;
                }
                send(&[NotifyState::Watchdog]);
            }
            Err(reason) => {
                if !failing {
                    error!(
                        "watchdog: {reason}; not pinging systemd, which restarts this daemon unless this clears"
                    );
                    send(&[NotifyState::Status(&format!("unhealthy: {reason}"))]);
                    failing = true;
                }
            }
        }
    }
}

//! What the client does about each answer that is not a success (pure).

use std::time::Duration;

use cairn_group::msg::Refusal;
use cairn_proto::chunk::Status;

/// Disk errors at the primary retried before the operation fails.
pub const IO_RETRIES: u32 = 3;

/// What to do after a refusal or an error status.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Action {
    /// The map is behind: wait until the cached map's epoch is at least
    /// this, then retry.
    WaitForEpoch(u64),
    /// Back off (10 ms doubling to 200 ms) and retry.
    Backoff,
    /// Back off and retry until the I/O timeout, then fail as degraded.
    Degraded { acting: u32, min: u32 },
    /// A disk error: retry up to [`IO_RETRIES`] times, then fail with it.
    Io(String),
    /// The node is going away or unreachable: refresh the map and retry.
    Transport(String),
    /// No retry can help.
    Fail,
}

/// The action for a group refusal.
pub(crate) fn on_refusal(r: Refusal) -> Action {
    match r {
        Refusal::StaleEpoch { current } | Refusal::NotPrimary { current } => {
            Action::WaitForEpoch(current)
        }
        Refusal::NodeBehind | Refusal::Busy => Action::Backoff,
        Refusal::Degraded { acting, min } => Action::Degraded { acting, min },
        Refusal::Io(message) => Action::Io(message),
    }
}

/// The action for a reply status other than `Ok` and `Refused`.
pub(crate) fn on_status(status: Status, message: &str) -> Action {
    match status {
        Status::ShuttingDown => Action::Transport(format!("shutting down: {message}")),
        Status::IoError | Status::ChecksumMismatch | Status::NoSpace => {
            Action::Io(format!("{status:?}: {message}"))
        }
        // A Refused reply always carries a refusal; one without reads as
        // Busy, like an unknown refusal kind.
        Status::Refused => Action::Backoff,
        Status::Ok
        | Status::InvalidArgument
        | Status::UnknownOp
        | Status::NotFound
        | Status::ExtentSizeMismatch => Action::Fail,
    }
}

/// Doubling back-off.
#[derive(Clone, Debug)]
pub(crate) struct Backoff {
    first: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    pub(crate) fn new(first: Duration, max: Duration) -> Backoff {
        Backoff {
            first,
            max,
            next: first,
        }
    }

    /// For refusals: 10 ms doubling to 200 ms.
    pub(crate) fn refusals() -> Backoff {
        Backoff::new(Duration::from_millis(10), Duration::from_millis(200))
    }

    /// For unreachable nodes: 100 ms doubling to 500 ms.
    pub(crate) fn unreachable() -> Backoff {
        Backoff::new(Duration::from_millis(100), Duration::from_millis(500))
    }

    pub(crate) fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        d
    }

    pub(crate) fn reset(&mut self) {
        self.next = self.first;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_map_to_actions() {
        assert_eq!(
            on_refusal(Refusal::StaleEpoch { current: 7 }),
            Action::WaitForEpoch(7)
        );
        assert_eq!(
            on_refusal(Refusal::NotPrimary { current: 9 }),
            Action::WaitForEpoch(9)
        );
        assert_eq!(on_refusal(Refusal::NodeBehind), Action::Backoff);
        assert_eq!(on_refusal(Refusal::Busy), Action::Backoff);
        assert_eq!(
            on_refusal(Refusal::Degraded { acting: 1, min: 2 }),
            Action::Degraded { acting: 1, min: 2 }
        );
        assert_eq!(
            on_refusal(Refusal::Io("disk".into())),
            Action::Io("disk".into())
        );
    }

    #[test]
    fn statuses_map_to_actions() {
        assert!(matches!(
            on_status(Status::ShuttingDown, ""),
            Action::Transport(_)
        ));
        assert!(matches!(on_status(Status::IoError, "x"), Action::Io(m) if m.contains('x')));
        assert!(matches!(
            on_status(Status::ChecksumMismatch, ""),
            Action::Io(_)
        ));
        assert_eq!(on_status(Status::UnknownOp, ""), Action::Fail);
        assert_eq!(on_status(Status::InvalidArgument, ""), Action::Fail);
        assert_eq!(on_status(Status::Refused, ""), Action::Backoff);
    }

    #[test]
    fn backoff_doubles_to_its_cap_and_resets() {
        let mut b = Backoff::refusals();
        let got: Vec<u64> = (0..7).map(|_| b.next_delay().as_millis() as u64).collect();
        assert_eq!(got, [10, 20, 40, 80, 160, 200, 200]);
        b.reset();
        assert_eq!(b.next_delay(), Duration::from_millis(10));
        let mut u = Backoff::unreachable();
        let got: Vec<u64> = (0..4).map(|_| u.next_delay().as_millis() as u64).collect();
        assert_eq!(got, [100, 200, 400, 500]);
    }
}

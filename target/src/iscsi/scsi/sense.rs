//! Sense data (SPC-4 4.5): the sense keys and additional sense codes this
//! target reports, in fixed format (response code 70h). Descriptor format
//! is never used: the Control mode page says D_SENSE = 0.

use crate::backend::IoError;
use crate::nbd::wire::{EINVAL, EIO, ENOSPC, ENOTSUP, EOVERFLOW, EPERM, ESHUTDOWN};

/// A sense key with its additional sense code and qualifier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Sense {
    pub key: u8,
    pub asc: u8,
    pub ascq: u8,
}

/// Sense keys (SPC-4 table 27).
pub const KEY_NO_SENSE: u8 = 0x00;
pub const KEY_NOT_READY: u8 = 0x02;
pub const KEY_MEDIUM_ERROR: u8 = 0x03;
pub const KEY_HARDWARE_ERROR: u8 = 0x04;
pub const KEY_ILLEGAL_REQUEST: u8 = 0x05;
pub const KEY_UNIT_ATTENTION: u8 = 0x06;
pub const KEY_DATA_PROTECT: u8 = 0x07;
pub const KEY_COPY_ABORTED: u8 = 0x0a;
pub const KEY_ABORTED_COMMAND: u8 = 0x0b;
pub const KEY_MISCOMPARE: u8 = 0x0e;

const fn s(key: u8, asc: u8, ascq: u8) -> Sense {
    Sense { key, asc, ascq }
}

pub const NO_SENSE: Sense = s(KEY_NO_SENSE, 0x00, 0x00);
pub const PARAMETER_LIST_LENGTH_ERROR: Sense = s(KEY_ILLEGAL_REQUEST, 0x1a, 0x00);
pub const INVALID_COMMAND_OPERATION_CODE: Sense = s(KEY_ILLEGAL_REQUEST, 0x20, 0x00);
pub const LBA_OUT_OF_RANGE: Sense = s(KEY_ILLEGAL_REQUEST, 0x21, 0x00);
pub const INVALID_FIELD_IN_CDB: Sense = s(KEY_ILLEGAL_REQUEST, 0x24, 0x00);
pub const LOGICAL_UNIT_NOT_SUPPORTED: Sense = s(KEY_ILLEGAL_REQUEST, 0x25, 0x00);
pub const INVALID_FIELD_IN_PARAMETER_LIST: Sense = s(KEY_ILLEGAL_REQUEST, 0x26, 0x00);
/// PERSISTENT RESERVE OUT RELEASE with a type that is not the reservation's.
pub const INVALID_RELEASE_OF_PERSISTENT_RESERVATION: Sense = s(KEY_ILLEGAL_REQUEST, 0x26, 0x04);
/// The command asked for less (or more) Data-Out than its CDB transfers
/// (iSCSI, FCP: "INVALID FIELD IN COMMAND INFORMATION UNIT").
pub const INVALID_FIELD_IN_INFORMATION_UNIT: Sense = s(KEY_ILLEGAL_REQUEST, 0x0e, 0x03);
pub const SAVING_PARAMETERS_NOT_SUPPORTED: Sense = s(KEY_ILLEGAL_REQUEST, 0x39, 0x00);
pub const INSUFFICIENT_REGISTRATION_RESOURCES: Sense = s(KEY_ILLEGAL_REQUEST, 0x55, 0x04);
pub const MISCOMPARE_DURING_VERIFY: Sense = s(KEY_MISCOMPARE, 0x1d, 0x00);
pub const WRITE_PROTECTED: Sense = s(KEY_DATA_PROTECT, 0x27, 0x00);
/// The Control mode page's SWP bit is set (MODE SELECT by an initiator).
pub const SOFTWARE_WRITE_PROTECTED: Sense = s(KEY_DATA_PROTECT, 0x27, 0x02);
/// ENOSPC: the thin volume's cluster could not allocate.
pub const SPACE_ALLOCATION_FAILED_WRITE_PROTECT: Sense = s(KEY_DATA_PROTECT, 0x27, 0x07);
pub const UNRECOVERED_READ_ERROR: Sense = s(KEY_MEDIUM_ERROR, 0x11, 0x00);
pub const WRITE_ERROR: Sense = s(KEY_MEDIUM_ERROR, 0x0c, 0x00);
pub const INTERNAL_TARGET_FAILURE: Sense = s(KEY_HARDWARE_ERROR, 0x44, 0x00);
/// The export is going away (ESHUTDOWN): initiators retry, then fail over.
pub const LOGICAL_UNIT_NOT_READY: Sense = s(KEY_NOT_READY, 0x04, 0x00);
/// LOGICAL UNIT NOT ACCESSIBLE, TARGET PORT IN UNAVAILABLE STATE: a
/// multipath initiator tries another path (another target).
pub const TARGET_PORT_UNAVAILABLE: Sense = s(KEY_NOT_READY, 0x04, 0x0c);
/// A command's Data-Out did not follow the rules (DataSN, offsets, burst
/// lengths): the command is aborted (RFC 7143 11.4.7.2 lists these).
pub const DATA_PHASE_ERROR: Sense = s(KEY_ABORTED_COMMAND, 0x4b, 0x00);
pub const UNEXPECTED_UNSOLICITED_DATA: Sense = s(KEY_ABORTED_COMMAND, 0x0c, 0x0c);
pub const NOT_ENOUGH_UNSOLICITED_DATA: Sense = s(KEY_ABORTED_COMMAND, 0x0c, 0x0d);
pub const POWER_ON_RESET: Sense = s(KEY_UNIT_ATTENTION, 0x29, 0x00);
pub const MODE_PARAMETERS_CHANGED: Sense = s(KEY_UNIT_ATTENTION, 0x2a, 0x01);
pub const RESERVATIONS_PREEMPTED: Sense = s(KEY_UNIT_ATTENTION, 0x2a, 0x03);
pub const RESERVATIONS_RELEASED: Sense = s(KEY_UNIT_ATTENTION, 0x2a, 0x04);
pub const REGISTRATIONS_PREEMPTED: Sense = s(KEY_UNIT_ATTENTION, 0x2a, 0x05);
pub const CAPACITY_DATA_HAS_CHANGED: Sense = s(KEY_UNIT_ATTENTION, 0x2a, 0x09);
/// Commands while a SANITIZE runs (with its progress).
pub const SANITIZE_IN_PROGRESS: Sense = s(KEY_NOT_READY, 0x04, 0x1b);
/// Media access after a SANITIZE failed, until a new one succeeds.
pub const SANITIZE_COMMAND_FAILED: Sense = s(KEY_MEDIUM_ERROR, 0x31, 0x03);
/// EXTENDED COPY parameter list checks (SPC-4 6.4).
pub const TOO_MANY_TARGET_DESCRIPTORS: Sense = s(KEY_ILLEGAL_REQUEST, 0x26, 0x06);
pub const UNSUPPORTED_TARGET_DESCRIPTOR_TYPE_CODE: Sense = s(KEY_ILLEGAL_REQUEST, 0x26, 0x07);
pub const TOO_MANY_SEGMENT_DESCRIPTORS: Sense = s(KEY_ILLEGAL_REQUEST, 0x26, 0x08);
pub const UNSUPPORTED_SEGMENT_DESCRIPTOR_TYPE_CODE: Sense = s(KEY_ILLEGAL_REQUEST, 0x26, 0x09);
pub const INLINE_DATA_LENGTH_EXCEEDED: Sense = s(KEY_ILLEGAL_REQUEST, 0x26, 0x0b);
/// An EXTENDED COPY with a held list identifier already running.
pub const OPERATION_IN_PROGRESS: Sense = s(KEY_ILLEGAL_REQUEST, 0x00, 0x16);
/// EXTENDED COPY failures while processing segments.
pub const COPY_ABORTED: Sense = s(KEY_COPY_ABORTED, 0x00, 0x00);
pub const UNREACHABLE_COPY_TARGET: Sense = s(KEY_COPY_ABORTED, 0x08, 0x04);
pub const COPY_TARGET_DEVICE_NOT_REACHABLE: Sense = s(KEY_COPY_ABORTED, 0x0d, 0x02);

/// Length of the fixed-format sense data this target builds.
pub const FIXED_LEN: usize = 18;

impl Sense {
    /// Fixed-format sense data (SPC-4 4.5.3), 18 bytes, current error.
    /// `information` fills the INFORMATION field (and sets VALID); values
    /// that do not fit its four bytes are left out rather than truncated.
    pub fn fixed(self, information: Option<u64>) -> Vec<u8> {
        self.fixed_sks(information, None)
    }

    /// Fixed-format sense data with a SENSE KEY SPECIFIC field (its SKSV
    /// bit set by [`field_pointer`] or [`progress`]).
    pub fn fixed_sks(self, information: Option<u64>, sks: Option<[u8; 3]>) -> Vec<u8> {
        let mut b = vec![0u8; FIXED_LEN];
        b[0] = 0x70;
        b[2] = self.key & 0x0f;
        if let Some(info) = information.and_then(|i| u32::try_from(i).ok()) {
            b[0] |= 0x80;
            b[3..7].copy_from_slice(&info.to_be_bytes());
        }
        b[7] = (FIXED_LEN - 8) as u8;
        b[12] = self.asc;
        b[13] = self.ascq;
        if let Some(sks) = sks {
            b[15..18].copy_from_slice(&sks);
        }
        b
    }

    /// The sense for a backend failure while reading.
    pub fn for_read(e: &IoError) -> Sense {
        match e.errno {
            EIO => UNRECOVERED_READ_ERROR,
            _ => Self::common(e),
        }
    }

    /// The sense for a backend failure while writing (also unmapping).
    pub fn for_write(e: &IoError) -> Sense {
        match e.errno {
            EIO => WRITE_ERROR,
            _ => Self::common(e),
        }
    }

    fn common(e: &IoError) -> Sense {
        match e.errno {
            EPERM => WRITE_PROTECTED,
            ENOSPC => SPACE_ALLOCATION_FAILED_WRITE_PROTECT,
            ESHUTDOWN => LOGICAL_UNIT_NOT_READY,
            EOVERFLOW => LBA_OUT_OF_RANGE,
            EINVAL | ENOTSUP => INVALID_FIELD_IN_CDB,
            _ => INTERNAL_TARGET_FAILURE,
        }
    }
}

/// A field pointer (SPC-4 4.5.2.4.2): the byte (and bit) of the CDB
/// (`in_cdb`) or of the parameter list that is wrong.
pub fn field_pointer(in_cdb: bool, byte: u16, bit: Option<u8>) -> [u8; 3] {
    let mut b0 = 0x80 | if in_cdb { 0x40 } else { 0 };
    if let Some(bit) = bit {
        b0 |= 0x08 | (bit & 0x07);
    }
    let [hi, lo] = byte.to_be_bytes();
    [b0, hi, lo]
}

/// A progress indication (SPC-4 4.5.2.4.4): `done` of 65536.
pub fn progress(done: u16) -> [u8; 3] {
    let [hi, lo] = done.to_be_bytes();
    [0x80, hi, lo]
}

//! CDB decoding: operation codes, bounds-checked field readers, the
//! commands this target supports with their CDB usage masks (REPORT
//! SUPPORTED OPERATION CODES), and how much Data-Out each CDB calls for.

use super::sense::{self, Sense};
use super::BLOCK;

pub const TEST_UNIT_READY: u8 = 0x00;
pub const REQUEST_SENSE: u8 = 0x03;
pub const READ_6: u8 = 0x08;
pub const WRITE_6: u8 = 0x0a;
pub const INQUIRY: u8 = 0x12;
pub const MODE_SELECT_6: u8 = 0x15;
pub const RESERVE_6: u8 = 0x16;
pub const RELEASE_6: u8 = 0x17;
pub const MODE_SENSE_6: u8 = 0x1a;
pub const START_STOP_UNIT: u8 = 0x1b;
pub const PREVENT_ALLOW: u8 = 0x1e;
pub const READ_CAPACITY_10: u8 = 0x25;
pub const READ_10: u8 = 0x28;
pub const WRITE_10: u8 = 0x2a;
pub const WRITE_AND_VERIFY_10: u8 = 0x2e;
pub const VERIFY_10: u8 = 0x2f;
pub const PRE_FETCH_10: u8 = 0x34;
pub const SYNCHRONIZE_CACHE_10: u8 = 0x35;
pub const READ_DEFECT_DATA_10: u8 = 0x37;
pub const WRITE_SAME_10: u8 = 0x41;
pub const UNMAP: u8 = 0x42;
pub const SANITIZE: u8 = 0x48;
pub const MODE_SELECT_10: u8 = 0x55;
pub const MODE_SENSE_10: u8 = 0x5a;
pub const PERSISTENT_RESERVE_IN: u8 = 0x5e;
pub const PERSISTENT_RESERVE_OUT: u8 = 0x5f;
pub const EXTENDED_COPY: u8 = 0x83;
pub const RECEIVE_COPY_RESULTS: u8 = 0x84;
pub const READ_16: u8 = 0x88;
pub const COMPARE_AND_WRITE: u8 = 0x89;
pub const WRITE_16: u8 = 0x8a;
pub const ORWRITE_16: u8 = 0x8b;
pub const WRITE_AND_VERIFY_16: u8 = 0x8e;
pub const VERIFY_16: u8 = 0x8f;
pub const PRE_FETCH_16: u8 = 0x90;
pub const SYNCHRONIZE_CACHE_16: u8 = 0x91;
pub const WRITE_SAME_16: u8 = 0x93;
pub const SERVICE_ACTION_IN_16: u8 = 0x9e;
pub const REPORT_LUNS: u8 = 0xa0;
pub const MAINTENANCE_IN: u8 = 0xa3;
pub const READ_12: u8 = 0xa8;
pub const WRITE_12: u8 = 0xaa;
pub const WRITE_AND_VERIFY_12: u8 = 0xae;
pub const VERIFY_12: u8 = 0xaf;
pub const READ_DEFECT_DATA_12: u8 = 0xb7;

/// SERVICE ACTION IN (16) service actions.
pub const SA_READ_CAPACITY_16: u16 = 0x10;
pub const SA_GET_LBA_STATUS: u16 = 0x12;
/// MAINTENANCE IN service actions.
pub const SA_REPORT_TARGET_PORT_GROUPS: u16 = 0x0a;
pub const SA_REPORT_SUPPORTED_OPCODES: u16 = 0x0c;
/// SANITIZE service actions.
pub const SA_OVERWRITE: u16 = 0x01;
pub const SA_BLOCK_ERASE: u16 = 0x02;
pub const SA_CRYPTOGRAPHIC_ERASE: u16 = 0x03;
pub const SA_EXIT_FAILURE_MODE: u16 = 0x1f;
/// EXTENDED COPY (LID1) and RECEIVE COPY RESULTS service actions.
pub const SA_EXTENDED_COPY_LID1: u16 = 0x00;
pub const SA_COPY_STATUS: u16 = 0x00;
pub const SA_OPERATING_PARAMETERS: u16 = 0x03;

/// One supported command: its operation code, service action (for the
/// opcodes that have them) and CDB usage data (SPC-4 6.35.3: byte 0 is
/// the opcode, then a mask of the bits the device server looks at; its
/// length is the CDB's).
pub struct Command {
    pub opcode: u8,
    pub service_action: Option<u16>,
    pub usage: &'static [u8],
}

const fn c(opcode: u8, service_action: Option<u16>, usage: &'static [u8]) -> Command {
    Command {
        opcode,
        service_action,
        usage,
    }
}

/// Every command `Lun::execute` implements, in opcode order. DPO and FUA
/// (0x18 in byte 1) are marked because MODE SENSE reports DPOFUA = 1.
pub static COMMANDS: &[Command] = &[
    c(TEST_UNIT_READY, None, &[0x00, 0, 0, 0, 0, 0x04]),
    c(REQUEST_SENSE, None, &[0x03, 0x01, 0, 0, 0xff, 0x04]),
    c(READ_6, None, &[0x08, 0x1f, 0xff, 0xff, 0xff, 0x04]),
    c(WRITE_6, None, &[0x0a, 0x1f, 0xff, 0xff, 0xff, 0x04]),
    c(INQUIRY, None, &[0x12, 0x01, 0xff, 0xff, 0xff, 0x04]),
    c(MODE_SELECT_6, None, &[0x15, 0x11, 0, 0, 0xff, 0x04]),
    c(RESERVE_6, None, &[0x16, 0, 0, 0, 0, 0x04]),
    c(RELEASE_6, None, &[0x17, 0, 0, 0, 0, 0x04]),
    c(MODE_SENSE_6, None, &[0x1a, 0x08, 0xff, 0xff, 0xff, 0x04]),
    c(START_STOP_UNIT, None, &[0x1b, 0x01, 0, 0x0f, 0xf7, 0x04]),
    c(PREVENT_ALLOW, None, &[0x1e, 0, 0, 0, 0x03, 0x04]),
    c(
        READ_CAPACITY_10,
        None,
        &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0x04],
    ),
    c(
        READ_10,
        None,
        &[0x28, 0x18, 0xff, 0xff, 0xff, 0xff, 0, 0xff, 0xff, 0x04],
    ),
    c(
        WRITE_10,
        None,
        &[0x2a, 0x18, 0xff, 0xff, 0xff, 0xff, 0, 0xff, 0xff, 0x04],
    ),
    c(
        WRITE_AND_VERIFY_10,
        None,
        &[0x2e, 0x12, 0xff, 0xff, 0xff, 0xff, 0, 0xff, 0xff, 0x04],
    ),
    c(
        VERIFY_10,
        None,
        &[0x2f, 0x16, 0xff, 0xff, 0xff, 0xff, 0, 0xff, 0xff, 0x04],
    ),
    c(
        PRE_FETCH_10,
        None,
        &[0x34, 0x02, 0xff, 0xff, 0xff, 0xff, 0, 0xff, 0xff, 0x04],
    ),
    c(
        SYNCHRONIZE_CACHE_10,
        None,
        &[0x35, 0x02, 0xff, 0xff, 0xff, 0xff, 0, 0xff, 0xff, 0x04],
    ),
    c(
        READ_DEFECT_DATA_10,
        None,
        &[0x37, 0, 0x1f, 0, 0, 0, 0, 0xff, 0xff, 0x04],
    ),
    c(
        WRITE_SAME_10,
        None,
        &[0x41, 0x18, 0xff, 0xff, 0xff, 0xff, 0, 0xff, 0xff, 0x04],
    ),
    c(UNMAP, None, &[0x42, 0x01, 0, 0, 0, 0, 0, 0xff, 0xff, 0x04]),
    c(SANITIZE, Some(SA_OVERWRITE), SANITIZE_USAGE),
    c(SANITIZE, Some(SA_BLOCK_ERASE), SANITIZE_USAGE),
    c(SANITIZE, Some(SA_CRYPTOGRAPHIC_ERASE), SANITIZE_USAGE),
    c(SANITIZE, Some(SA_EXIT_FAILURE_MODE), SANITIZE_USAGE),
    c(
        MODE_SELECT_10,
        None,
        &[0x55, 0x11, 0, 0, 0, 0, 0, 0xff, 0xff, 0x04],
    ),
    c(
        MODE_SENSE_10,
        None,
        &[0x5a, 0x18, 0xff, 0xff, 0, 0, 0, 0xff, 0xff, 0x04],
    ),
    c(PERSISTENT_RESERVE_IN, Some(0), PR_IN_USAGE),
    c(PERSISTENT_RESERVE_IN, Some(1), PR_IN_USAGE),
    c(PERSISTENT_RESERVE_IN, Some(2), PR_IN_USAGE),
    c(PERSISTENT_RESERVE_IN, Some(3), PR_IN_USAGE),
    c(PERSISTENT_RESERVE_OUT, Some(0), PR_OUT_USAGE),
    c(PERSISTENT_RESERVE_OUT, Some(1), PR_OUT_USAGE),
    c(PERSISTENT_RESERVE_OUT, Some(2), PR_OUT_USAGE),
    c(PERSISTENT_RESERVE_OUT, Some(3), PR_OUT_USAGE),
    c(PERSISTENT_RESERVE_OUT, Some(4), PR_OUT_USAGE),
    c(PERSISTENT_RESERVE_OUT, Some(5), PR_OUT_USAGE),
    c(PERSISTENT_RESERVE_OUT, Some(6), PR_OUT_USAGE),
    c(
        EXTENDED_COPY,
        Some(SA_EXTENDED_COPY_LID1),
        &[
            0x83, 0x1f, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0, 0x04,
        ],
    ),
    c(
        RECEIVE_COPY_RESULTS,
        Some(SA_COPY_STATUS),
        RECEIVE_COPY_RESULTS_USAGE,
    ),
    c(
        RECEIVE_COPY_RESULTS,
        Some(SA_OPERATING_PARAMETERS),
        RECEIVE_COPY_RESULTS_USAGE,
    ),
    c(READ_16, None, RW16_USAGE_READ),
    c(
        COMPARE_AND_WRITE,
        None,
        &[
            0x89, 0x18, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0xff, 0, 0x04,
        ],
    ),
    c(WRITE_16, None, RW16_USAGE_WRITE),
    c(
        ORWRITE_16,
        None,
        &[
            0x8b, 0x18, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0,
            0x04,
        ],
    ),
    c(
        WRITE_AND_VERIFY_16,
        None,
        &[
            0x8e, 0x12, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0,
            0x04,
        ],
    ),
    c(
        VERIFY_16,
        None,
        &[
            0x8f, 0x16, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0,
            0x04,
        ],
    ),
    c(
        PRE_FETCH_16,
        None,
        &[
            0x90, 0x02, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0,
            0x04,
        ],
    ),
    c(
        SYNCHRONIZE_CACHE_16,
        None,
        &[
            0x91, 0x02, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0,
            0x04,
        ],
    ),
    c(
        WRITE_SAME_16,
        None,
        &[
            0x93, 0x09, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0,
            0x04,
        ],
    ),
    c(
        SERVICE_ACTION_IN_16,
        Some(SA_READ_CAPACITY_16),
        &[
            0x9e, 0x1f, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0, 0x04,
        ],
    ),
    c(
        SERVICE_ACTION_IN_16,
        Some(SA_GET_LBA_STATUS),
        &[
            0x9e, 0x1f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0,
            0x04,
        ],
    ),
    c(
        REPORT_LUNS,
        None,
        &[0xa0, 0, 0xff, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0, 0x04],
    ),
    c(
        MAINTENANCE_IN,
        Some(SA_REPORT_TARGET_PORT_GROUPS),
        &[0xa3, 0xff, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0, 0x04],
    ),
    c(
        MAINTENANCE_IN,
        Some(SA_REPORT_SUPPORTED_OPCODES),
        &[
            0xa3, 0x1f, 0x87, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0, 0x04,
        ],
    ),
    c(
        READ_12,
        None,
        &[
            0xa8, 0x18, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0, 0x04,
        ],
    ),
    c(
        WRITE_12,
        None,
        &[
            0xaa, 0x18, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0, 0x04,
        ],
    ),
    c(
        WRITE_AND_VERIFY_12,
        None,
        &[
            0xae, 0x12, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0, 0x04,
        ],
    ),
    c(
        VERIFY_12,
        None,
        &[
            0xaf, 0x16, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0, 0x04,
        ],
    ),
    c(
        READ_DEFECT_DATA_12,
        None,
        &[0xb7, 0x1f, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0, 0x04],
    ),
];

const SANITIZE_USAGE: &[u8] = &[0x48, 0xbf, 0, 0, 0, 0, 0, 0xff, 0xff, 0x04];
const RECEIVE_COPY_RESULTS_USAGE: &[u8] = &[
    0x84, 0x1f, 0xff, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0, 0x04,
];
const PR_IN_USAGE: &[u8] = &[0x5e, 0x1f, 0, 0, 0, 0, 0, 0xff, 0xff, 0x04];
const PR_OUT_USAGE: &[u8] = &[0x5f, 0x1f, 0xff, 0, 0, 0xff, 0xff, 0xff, 0xff, 0x04];
const RW16_USAGE_READ: &[u8] = &[
    0x88, 0x18, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0, 0x04,
];
const RW16_USAGE_WRITE: &[u8] = &[
    0x8a, 0x18, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0, 0x04,
];

/// Whether `opcode` is one with service actions in byte 1.
pub fn has_service_actions(opcode: u8) -> bool {
    COMMANDS
        .iter()
        .any(|c| c.opcode == opcode && c.service_action.is_some())
}

/// The supported command `opcode` (with service action `sa` when it has
/// them).
pub fn lookup(opcode: u8, sa: u16) -> Option<&'static Command> {
    COMMANDS
        .iter()
        .find(|c| c.opcode == opcode && c.service_action.is_none_or(|s| s == sa))
}

/// A CDB whose length was checked against its operation code's group, so
/// the field readers below stay in bounds (they return 0 past the end
/// anyway: nothing here can panic).
#[derive(Clone, Copy)]
pub struct Cdb<'a>(pub &'a [u8]);

/// The CDB length of `opcode`'s group (SPC-4 4.2.5.1), None for the
/// groups with no fixed length (variable length, vendor specific).
pub fn group_len(opcode: u8) -> Option<usize> {
    match opcode >> 5 {
        0 => Some(6),
        1 | 2 => Some(10),
        4 => Some(16),
        5 => Some(12),
        _ => None,
    }
}

impl<'a> Cdb<'a> {
    /// Checks that `cdb` holds the whole CDB its opcode calls for, and
    /// that the control byte asks nothing this target lacks (NACA).
    pub fn parse(cdb: &'a [u8]) -> Result<Cdb<'a>, Sense> {
        let op = *cdb.first().ok_or(sense::INVALID_COMMAND_OPERATION_CODE)?;
        let len = group_len(op).ok_or(sense::INVALID_COMMAND_OPERATION_CODE)?;
        if cdb.len() < len {
            return Err(sense::INVALID_FIELD_IN_CDB);
        }
        // NACA (control byte bit 2): normal ACA is not supported.
        if cdb[len - 1] & 0x04 != 0 {
            return Err(sense::INVALID_FIELD_IN_CDB);
        }
        Ok(Cdb(&cdb[..len]))
    }

    pub fn opcode(&self) -> u8 {
        self.u8(0)
    }

    /// The service action in byte 1 (for the opcodes that have one).
    pub fn service_action(&self) -> u16 {
        (self.u8(1) & 0x1f) as u16
    }

    pub fn u8(&self, at: usize) -> u8 {
        self.0.get(at).copied().unwrap_or(0)
    }

    fn be(&self, at: usize, n: usize) -> u64 {
        (at..at + n).fold(0u64, |v, i| (v << 8) | self.u8(i) as u64)
    }

    pub fn u16(&self, at: usize) -> u16 {
        self.be(at, 2) as u16
    }

    pub fn u24(&self, at: usize) -> u32 {
        self.be(at, 3) as u32
    }

    pub fn u32(&self, at: usize) -> u32 {
        self.be(at, 4) as u32
    }

    pub fn u64(&self, at: usize) -> u64 {
        self.be(at, 8)
    }
}

/// The LBA and block count of a READ, WRITE, VERIFY, WRITE AND VERIFY,
/// PRE-FETCH, SYNCHRONIZE CACHE or WRITE SAME CDB, by its size.
pub fn lba_and_len(c: &Cdb) -> (u64, u64) {
    match c.opcode() {
        READ_6 | WRITE_6 => {
            let lba = (c.u24(1) & 0x1f_ffff) as u64;
            // A transfer length of 0 means 256 blocks (SBC-3 5.8).
            let len = match c.u8(4) {
                0 => 256,
                n => n as u64,
            };
            (lba, len)
        }
        op if op >> 5 == 1 || op >> 5 == 2 => (c.u32(2) as u64, c.u16(7) as u64),
        op if op >> 5 == 5 => (c.u32(2) as u64, c.u32(6) as u64),
        _ => (c.u64(2), c.u32(10) as u64),
    }
}

fn blocks_bytes(blocks: u64) -> u32 {
    u32::try_from(blocks.saturating_mul(BLOCK)).unwrap_or(u32::MAX)
}

/// The bytes of Data-Out `cdb` calls for (0 for commands without any),
/// or None when it is not a CDB this target understands.
pub fn data_out_len(cdb: &[u8]) -> Option<u32> {
    let c = Cdb::parse(cdb).ok()?;
    let op = c.opcode();
    let n = match op {
        WRITE_6 | WRITE_10 | WRITE_12 | WRITE_16 | WRITE_AND_VERIFY_10 | WRITE_AND_VERIFY_12
        | WRITE_AND_VERIFY_16 | ORWRITE_16 => blocks_bytes(lba_and_len(&c).1),
        VERIFY_10 | VERIFY_12 | VERIFY_16 => match (c.u8(1) >> 1) & 0x03 {
            0b01 => blocks_bytes(lba_and_len(&c).1),
            0b11 => BLOCK as u32,
            _ => 0,
        },
        // NDOB (WRITE SAME (16) only): no Data-Out, the block is zeros.
        WRITE_SAME_16 if c.u8(1) & 0x01 != 0 => 0,
        WRITE_SAME_10 | WRITE_SAME_16 => BLOCK as u32,
        COMPARE_AND_WRITE => blocks_bytes(2 * c.u8(13) as u64),
        UNMAP | MODE_SELECT_10 | SANITIZE => c.u16(7) as u32,
        EXTENDED_COPY => c.u32(10),
        MODE_SELECT_6 => c.u8(4) as u32,
        PERSISTENT_RESERVE_OUT => c.u32(5),
        _ if lookup(op, c.service_action()).is_some() => 0,
        _ => return None,
    };
    Some(n)
}

//! What a logical unit says about itself: INQUIRY and its VPD pages, MODE
//! SENSE and MODE SELECT, READ CAPACITY, REPORT SUPPORTED OPERATION
//! CODES, REPORT TARGET PORT GROUPS, READ DEFECT DATA.

use super::cdb::{self, Cdb, COMMANDS};
use super::pr::PrStore;
use super::sense::{self, Sense};
use super::{Fail, Lun, Nexus, Reply, Res, BLOCK, LBPPBE, MAX_TRANSFER_BLOCKS, PRODUCT, VENDOR};
use crate::backend::Backend;

/// OPTIMAL TRANSFER LENGTH GRANULARITY and UNMAP GRANULARITY: one
/// physical (4 KiB) block.
pub const GRANULARITY_BLOCKS: u32 = 1 << LBPPBE;
/// MAXIMUM UNMAP LBA COUNT (512 MiB per command).
pub const MAX_UNMAP_BLOCKS: u64 = 1 << 20;
/// MAXIMUM UNMAP BLOCK DESCRIPTOR COUNT.
pub const MAX_UNMAP_DESCRIPTORS: usize = 256;
/// MAXIMUM WRITE SAME LENGTH (512 MiB per command).
pub const MAX_WRITE_SAME_BLOCKS: u64 = 1 << 20;
/// MAXIMUM COMPARE AND WRITE LENGTH (its field is one byte).
pub const MAX_COMPARE_AND_WRITE_BLOCKS: u8 = 255;

/// The VPD pages served, ascending (SPC-4 7.8.13 wants them sorted).
const VPD_PAGES: [u8; 6] = [0x00, 0x80, 0x83, 0xb0, 0xb1, 0xb2];

/// The revision: the crate's major.minor, four ASCII bytes.
fn revision() -> [u8; 4] {
    let mut r = [b' '; 4];
    let v = env!("CARGO_PKG_VERSION");
    let short = v.splitn(3, '.').take(2).collect::<Vec<_>>().join(".");
    for (d, s) in r.iter_mut().zip(short.bytes()) {
        *d = s;
    }
    r
}

/// Standard INQUIRY data (SPC-4 6.4.2), 96 bytes: direct access block
/// device, SPC-4, HiSup, implicit ALUA (TPGS 01b), third-party copy
/// (EXTENDED COPY), command queuing, and
/// version descriptors SAM-5, iSCSI, SPC-4, SBC-3.
pub fn standard_inquiry() -> Vec<u8> {
    let mut d = vec![0u8; 96];
    d[0] = 0x00;
    d[2] = 0x06;
    d[3] = 0x12; // HISUP, response data format 2
    d[4] = (d.len() - 5) as u8;
    d[5] = 0x10 | 0x08; // TPGS: implicit asymmetric access; 3PC
    d[7] = 0x02; // CMDQUE
    d[8..16].copy_from_slice(VENDOR);
    d[16..32].copy_from_slice(PRODUCT);
    d[32..36].copy_from_slice(&revision());
    for (i, v) in [0x00a0u16, 0x0960, 0x0460, 0x04c0].iter().enumerate() {
        d[58 + 2 * i..60 + 2 * i].copy_from_slice(&v.to_be_bytes());
    }
    d
}

fn vpd(page: u8, body: &[u8]) -> Vec<u8> {
    let mut d = vec![0x00, page];
    d.extend_from_slice(&(body.len() as u16).to_be_bytes());
    d.extend_from_slice(body);
    d
}

/// A designation descriptor (SPC-4 7.8.6.1).
fn designator(out: &mut Vec<u8>, code_set_proto: u8, piv_assoc_type: u8, id: &[u8]) {
    out.extend_from_slice(&[code_set_proto, piv_assoc_type, 0, id.len() as u8]);
    out.extend_from_slice(id);
}

/// A SCSI name string: NUL terminated, padded to a multiple of 4.
fn name_string(s: &str) -> Vec<u8> {
    let mut v: Vec<u8> = s.bytes().take(250).collect();
    v.push(0);
    while !v.len().is_multiple_of(4) {
        v.push(0);
    }
    v
}

fn be_u32(v: u64) -> [u8; 4] {
    u32::try_from(v).unwrap_or(u32::MAX).to_be_bytes()
}

impl<B: Backend, S: PrStore> Lun<B, S> {
    pub(super) fn inquiry(&self, c: &Cdb<'_>, n: &Nexus) -> Res {
        let alloc = c.u16(3) as usize;
        // CMDDT is obsolete; without EVPD only the standard page exists.
        if c.u8(1) & 0x02 != 0 || (c.u8(1) & 0x01 == 0 && c.u8(2) != 0) {
            return Err(sense::INVALID_FIELD_IN_CDB.into());
        }
        if c.u8(1) & 0x01 == 0 {
            return Ok(Reply::allocated(standard_inquiry(), alloc));
        }
        let page = c.u8(2);
        let data = match page {
            0x00 => vpd(page, &VPD_PAGES),
            0x80 => vpd(page, self.ids.serial.as_bytes()),
            0x83 => vpd(page, &self.identification(n)),
            0xb0 => vpd(page, &self.block_limits()),
            0xb1 => {
                let mut b = [0u8; 60];
                b[1] = 0x01; // MEDIUM ROTATION RATE: non-rotating
                             // WABEREQ, WACEREQ 01b: after a BLOCK or CRYPTOGRAPHIC
                             // ERASE SANITIZE, reads succeed (zeros: deallocated).
                b[3] = 0x50;
                vpd(page, &b)
            }
            0xb2 => {
                // LBPU, LBPWS, LBPWS10, LBPRZ; provisioning type thin.
                vpd(page, &[0, 0x80 | 0x40 | 0x20 | 0x04, 0x02, 0])
            }
            _ => return Err(sense::INVALID_FIELD_IN_CDB.into()),
        };
        Ok(Reply::allocated(data, alloc))
    }

    /// Device identification (VPD 83h): NAA 3 and T10 vendor ids of the
    /// logical unit, the target port's name, relative port and group, the
    /// target device's name.
    fn identification(&self, n: &Nexus) -> Vec<u8> {
        let mut d = Vec::new();
        designator(&mut d, 0x01, 0x03, &self.ids.naa);
        let mut t10 = VENDOR.to_vec();
        t10.extend_from_slice(self.ids.serial.as_bytes());
        designator(&mut d, 0x02, 0x01, &t10);
        // iSCSI (5) with PIV: target port (assoc 01b), device (10b).
        designator(&mut d, 0x53, 0x98, &name_string(&n.target_port));
        designator(
            &mut d,
            0x51,
            0x94,
            &[0, 0, (n.relative_port >> 8) as u8, n.relative_port as u8],
        );
        designator(&mut d, 0x51, 0x95, &[0, 0, 0, 1]);
        let device = n.target_port.split(",t,").next().unwrap_or_default();
        designator(&mut d, 0x53, 0xa8, &name_string(device));
        d
    }

    /// Block limits (VPD B0h), the 60 bytes after the header.
    fn block_limits(&self) -> Vec<u8> {
        let mut b = vec![0u8; 60];
        b[1] = MAX_COMPARE_AND_WRITE_BLOCKS;
        b[2..4].copy_from_slice(&(GRANULARITY_BLOCKS as u16).to_be_bytes());
        b[4..8].copy_from_slice(&be_u32(MAX_TRANSFER_BLOCKS));
        b[16..20].copy_from_slice(&be_u32(MAX_UNMAP_BLOCKS));
        b[20..24].copy_from_slice(&be_u32(MAX_UNMAP_DESCRIPTORS as u64));
        b[24..28].copy_from_slice(&GRANULARITY_BLOCKS.to_be_bytes());
        b[28] = 0x80; // UGAVALID, alignment 0
        b[32..40].copy_from_slice(&MAX_WRITE_SAME_BLOCKS.to_be_bytes());
        b
    }

    pub(super) fn read_capacity_10(&self) -> Reply {
        let last = self.blocks().saturating_sub(1);
        let mut d = be_u32(last).to_vec();
        d.extend_from_slice(&(BLOCK as u32).to_be_bytes());
        Reply::data(d)
    }

    pub(super) fn read_capacity_16(&self, c: &Cdb<'_>) -> Reply {
        let mut d = vec![0u8; 32];
        d[0..8].copy_from_slice(&self.blocks().saturating_sub(1).to_be_bytes());
        d[8..12].copy_from_slice(&(BLOCK as u32).to_be_bytes());
        d[13] = LBPPBE;
        d[14] = 0x80 | 0x40; // LBPME, LBPRZ
        Reply::allocated(d, c.u32(10) as usize)
    }

    /// The mode pages `page` (3Fh: all) as page control `pc` shows them.
    fn mode_pages(&self, page: u8, subpage: u8, pc: u8) -> Result<Vec<u8>, Sense> {
        let changeable = pc == 1;
        let caching = {
            let mut p = vec![0u8; 20];
            p[0] = 0x08;
            p[1] = 0x12;
            // WCE: writes are acknowledged once every replica holds them,
            // durable after SYNCHRONIZE CACHE or FUA.
            p[2] = if changeable { 0 } else { 0x04 };
            p
        };
        let control = if changeable {
            // Only SWP (software write protect) can be changed.
            let mut p = vec![0u8; 12];
            p[0] = 0x0a;
            p[1] = 0x0a;
            p[4] = SWP;
            p
        } else {
            // GLTSD; unrestricted reordering; no busy timeout limit.
            let swp = if self.local().swp { SWP } else { 0 };
            vec![0x0a, 0x0a, 0x02, 0x10, swp, 0, 0, 0, 0xff, 0xff, 0, 0]
        };
        let exceptions = {
            let mut p = vec![0u8; 12];
            p[0] = 0x1c;
            p[1] = 0x0a;
            p[2] = if changeable { 0 } else { 0x08 }; // DEXCPT
            p
        };
        let subpage_ok = subpage == 0 || subpage == 0xff;
        let pages = match page {
            0x08 if subpage_ok => caching,
            0x0a if subpage_ok => control,
            0x1c if subpage_ok => exceptions,
            0x3f if subpage_ok => [caching, control, exceptions].concat(),
            _ => return Err(sense::INVALID_FIELD_IN_CDB),
        };
        Ok(pages)
    }

    /// MODE SENSE (6) and (10).
    pub(super) fn mode_sense(&self, c: &Cdb<'_>) -> Res {
        let ten = c.opcode() == cdb::MODE_SENSE_10;
        let dbd = c.u8(1) & 0x08 != 0;
        let llbaa = ten && c.u8(1) & 0x10 != 0;
        let pc = c.u8(2) >> 6;
        let pages = self.mode_pages(c.u8(2) & 0x3f, c.u8(3), pc)?;
        let blocks = self.blocks();
        let descriptor = match (dbd, llbaa) {
            (true, _) => Vec::new(),
            (false, false) => {
                let mut b = be_u32(blocks).to_vec();
                b.extend_from_slice(&(BLOCK as u32).to_be_bytes());
                b
            }
            (false, true) => {
                let mut b = blocks.to_be_bytes().to_vec();
                b.extend_from_slice(&[0; 4]);
                b.extend_from_slice(&(BLOCK as u32).to_be_bytes());
                b
            }
        };
        // WP for read-only exports; DPOFUA: DPO and FUA are taken.
        let dsp = if self.read_only() { 0x80 } else { 0 } | 0x10;
        let mut d = Vec::with_capacity(8 + descriptor.len() + pages.len());
        if ten {
            let len = 6 + descriptor.len() + pages.len();
            d.extend_from_slice(&(len as u16).to_be_bytes());
            d.extend_from_slice(&[0, dsp, u8::from(llbaa), 0]);
            d.extend_from_slice(&(descriptor.len() as u16).to_be_bytes());
        } else {
            let len = 3 + descriptor.len() + pages.len();
            d.extend_from_slice(&[len.min(255) as u8, 0, dsp, descriptor.len() as u8]);
        }
        d.extend_from_slice(&descriptor);
        d.extend_from_slice(&pages);
        let alloc = if ten {
            c.u16(7) as usize
        } else {
            c.u8(4) as usize
        };
        Ok(Reply::allocated(d, alloc))
    }

    /// MODE SELECT (6) and (10): only the Control page's SWP bit is
    /// changeable, so a parameter list is taken only if it repeats the
    /// current values but for that bit. Changing it gives every other
    /// nexus MODE PARAMETERS CHANGED.
    pub(super) fn mode_select(&self, c: &Cdb<'_>, data: &[u8], by: &Nexus) -> Res {
        let ten = c.opcode() == cdb::MODE_SELECT_10;
        let len = if ten {
            c.u16(7) as usize
        } else {
            c.u8(4) as usize
        };
        if len == 0 {
            return Ok(Reply::good());
        }
        let list = data.get(..len).ok_or(sense::PARAMETER_LIST_LENGTH_ERROR)?;
        let header = if ten { 8 } else { 4 };
        if list.len() < header {
            return Err(sense::PARAMETER_LIST_LENGTH_ERROR.into());
        }
        let (bdl, long) = if ten {
            (
                u16::from_be_bytes([list[6], list[7]]) as usize,
                list[4] & 0x01 != 0,
            )
        } else {
            (list[3] as usize, false)
        };
        let descriptors = list
            .get(header..header + bdl)
            .ok_or(sense::PARAMETER_LIST_LENGTH_ERROR)?;
        let size = if long { 16 } else { 8 };
        if bdl % size != 0 {
            return Err(sense::PARAMETER_LIST_LENGTH_ERROR.into());
        }
        for d in descriptors.chunks_exact(size) {
            let block_len = &d[size - 3..];
            if block_len != [0, 0x02, 0x00] {
                return Err(sense::INVALID_FIELD_IN_PARAMETER_LIST.into());
            }
        }
        let mut rest = &list[header + bdl..];
        let current = self.mode_pages(0x3f, 0, 0).map_err(Fail::from)?;
        let mut swp = None;
        while !rest.is_empty() {
            if rest.len() < 2 || rest[0] & 0x40 != 0 {
                return Err(sense::INVALID_FIELD_IN_PARAMETER_LIST.into());
            }
            let page = rest
                .get(..2 + rest[1] as usize)
                .ok_or(sense::PARAMETER_LIST_LENGTH_ERROR)?;
            let code = page[0] & 0x3f;
            let masked = |p: &[u8]| -> Vec<u8> {
                let mut v = p.get(1..).unwrap_or_default().to_vec();
                if code == 0x0a && v.len() > 3 {
                    v[3] &= !SWP;
                }
                v
            };
            let same = find_page(&current, code).is_some_and(|p| masked(p) == masked(page));
            if !same {
                return Err(sense::INVALID_FIELD_IN_PARAMETER_LIST.into());
            }
            if code == 0x0a {
                swp = page.get(4).map(|b| b & SWP != 0);
            }
            rest = &rest[page.len()..];
        }
        if let Some(on) = swp {
            let changed = {
                let mut l = self.local();
                std::mem::replace(&mut l.swp, on) != on
            };
            if changed {
                tracing::info!(
                    lun = self.lun_id,
                    export = %self.backend.info().name,
                    initiator = %by.initiator,
                    "software write protect {}",
                    if on { "set" } else { "cleared" }
                );
                self.raise_others(by, sense::MODE_PARAMETERS_CHANGED);
            }
        }
        Ok(Reply::good())
    }
}

/// The Control mode page's software write protect bit (byte 4).
const SWP: u8 = 0x08;

/// The page `code` among concatenated mode pages.
fn find_page(pages: &[u8], code: u8) -> Option<&[u8]> {
    let mut at = 0;
    while at + 2 <= pages.len() {
        let end = (at + 2 + pages[at + 1] as usize).min(pages.len());
        if pages[at] & 0x3f == code {
            return Some(&pages[at..end]);
        }
        at = end;
    }
    None
}

/// A command timeouts descriptor (SPC-4 6.35.4): no nominal time, a
/// recommended 30 s.
fn timeouts() -> [u8; 12] {
    let mut t = [0u8; 12];
    t[1] = 0x0a;
    t[8..12].copy_from_slice(&30u32.to_be_bytes());
    t
}

/// REPORT SUPPORTED OPERATION CODES (SPC-4 6.35).
pub fn report_supported_opcodes(c: &Cdb<'_>) -> Res {
    let rctd = c.u8(2) & 0x80 != 0;
    let options = c.u8(2) & 0x07;
    let op = c.u8(3);
    let sa = c.u16(4);
    let alloc = c.u32(6) as usize;
    if options == 0 {
        let mut body = Vec::new();
        for cmd in COMMANDS {
            body.push(cmd.opcode);
            body.push(0);
            body.extend_from_slice(&cmd.service_action.unwrap_or(0).to_be_bytes());
            body.push(0);
            body.push(if rctd { 0x02 } else { 0 } | u8::from(cmd.service_action.is_some()));
            body.extend_from_slice(&(cmd.usage.len() as u16).to_be_bytes());
            if rctd {
                body.extend_from_slice(&timeouts());
            }
        }
        let mut d = (body.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(&body);
        return Ok(Reply::allocated(d, alloc));
    }
    let with_sa = cdb::has_service_actions(op);
    // Refusals point at REPORTING OPTIONS (byte 2): initiators, libiscsi
    // among them, take an INVALID FIELD IN CDB without a field pointer
    // (or pointing at the service action) for "not implemented".
    let found = match options {
        1 if !with_sa => cdb::lookup(op, 0),
        2 if with_sa => cdb::lookup(op, sa),
        3 => cdb::lookup(op, if with_sa { sa } else { 0 }),
        _ => return Err(Fail::cdb_field(2, Some(2))),
    };
    let ctdp = if rctd { 0x80 } else { 0 };
    let d = match found {
        Some(cmd) => {
            let mut d = vec![0, ctdp | 0x03];
            d.extend_from_slice(&(cmd.usage.len() as u16).to_be_bytes());
            d.extend_from_slice(cmd.usage);
            if rctd {
                d.extend_from_slice(&timeouts());
            }
            d
        }
        // SUPPORT 001b: not supported.
        None => vec![0, 0x01, 0, 0],
    };
    Ok(Reply::allocated(d, alloc))
}

/// REPORT TARGET PORT GROUPS (SPC-4 6.36): one group, active/optimized,
/// holding this nexus's target port. Every Cairn target serving a volume
/// answers the same, so multipath spreads I/O over all of them.
pub fn report_target_port_groups(c: &Cdb<'_>, n: &Nexus) -> Res {
    let extended = match c.u8(1) >> 5 {
        0 => false,
        1 => true,
        _ => return Err(sense::INVALID_FIELD_IN_CDB.into()),
    };
    let mut body = vec![0x80, 0x01, 0, 1, 0, 0, 0, 1];
    body.extend_from_slice(&[0, 0]);
    body.extend_from_slice(&n.relative_port.to_be_bytes());
    let mut d = (body.len() as u32).to_be_bytes().to_vec();
    if extended {
        d.extend_from_slice(&[0x10, 0, 0, 0]);
    }
    d.extend_from_slice(&body);
    Ok(Reply::allocated(d, c.u32(6) as usize))
}

/// READ DEFECT DATA (10) and (12): a virtual volume has no defects; the
/// header echoes the lists and format asked for, with an empty list.
pub fn read_defect_data(c: &Cdb<'_>) -> Reply {
    if c.opcode() == cdb::READ_DEFECT_DATA_10 {
        let d = vec![0, c.u8(2) & 0x1f, 0, 0];
        Reply::allocated(d, c.u16(7) as usize)
    } else {
        let d = vec![0, c.u8(1) & 0x1f, 0, 0, 0, 0, 0, 0];
        Reply::allocated(d, c.u32(6) as usize)
    }
}

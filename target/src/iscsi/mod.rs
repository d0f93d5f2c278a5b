//! The iSCSI target (RFC 7143): [`scsi`] executes SCSI commands (SBC-3,
//! SPC-4) on a [`crate::backend::Backend`], with no iSCSI in it.

pub mod scsi;

//! SCSI commands on a LUN (placeholder; being written).

//! `cairn export list`: which volumes targets export now, by which target,
//! and (if the config lists the targets) at which NBD URIs.

use clap::Subcommand;
use serde_json::json;

use crate::config::{block_on, ClusterArgs};
use crate::table::{Align, Table};
use crate::volume::{list_with_exports, targets_human};

#[derive(Subcommand)]
pub enum ExportCommand {
    /// List exported volumes: the targets exporting each, and NBD URIs.
    #[command(after_help = "Examples:\n  \
        cairn export list\n  \
        cairn export list --json\n\n\
        A volume counts as exported while a target holds an export lease for it \
        at the volume manager (while an NBD client has it open). URIs are \
        <base>/<volume> for each `targets` base URI in the config file; with \
        --volmgr and no config file there are none.")]
    List {
        #[command(flatten)]
        cluster: ClusterArgs,
    },
}

pub fn run(cmd: ExportCommand) -> anyhow::Result<()> {
    match cmd {
        ExportCommand::List { cluster } => {
            let (client, found) = cluster.connect()?;
            let vols = block_on(list_with_exports(&client))?;
            let exported: Vec<_> = vols.iter().filter(|(_, e)| !e.is_empty()).collect();
            if cluster.json {
                let rows: Vec<_> = exported
                    .iter()
                    .map(|(v, e)| {
                        json!({
                            "volume": v.name,
                            "volume_id": v.id,
                            "exported_by": e,
                            "uris": found.config.export_uris(&v.name),
                        })
                    })
                    .collect();
                println!("{}", serde_json::Value::Array(rows));
            } else {
                let mut t = Table::new(&[
                    ("VOLUME", Align::Left),
                    ("TARGETS", Align::Left),
                    ("URI", Align::Left),
                ]);
                for (v, e) in exported {
                    let uris = found.config.export_uris(&v.name);
                    t.row(vec![
                        v.name.clone(),
                        targets_human(e),
                        if uris.is_empty() {
                            "-".into()
                        } else {
                            uris.join(" ")
                        },
                    ]);
                }
                t.print()?;
            }
        }
    }
    Ok(())
}

//! `cairn bench election`: how long the volume manager is without a leader
//! when its leader dies.
//!
//! Starts three `cairn-volmgr` members on 127.0.0.2-4 (fresh data in a
//! temporary folder), then, each round: kill -9 the leader, time until a
//! surviving member acknowledges a volume creation (a new leader elected
//! *and* serving writes), start the killed member again and let it catch up.
//! Prints each round and the min / median / max; `--json` for machines.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use cairn_volmgr::client::VolmgrClient;
use clap::Args;

use super::chunkserver::free_loopback_addr;

#[derive(Args)]
pub struct ElectionBenchArgs {
    /// Leader kills to time, 1 to 100.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub rounds: u32,
    /// The cairn-volmgr binary [default: next to this cairn binary].
    #[arg(long)]
    pub volmgr_bin: Option<PathBuf>,
    /// Print the result as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

struct Member {
    id: u64,
    addr: SocketAddr,
    args: Vec<String>,
    bin: PathBuf,
    child: Option<Child>,
}

impl Member {
    fn start(&mut self) -> anyhow::Result<()> {
        let child = Command::new(&self.bin)
            .args(&self.args)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", self.bin.display()))?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect_timeout(&self.addr, Duration::from_millis(100)).is_err()
        {
            if Instant::now() > deadline {
                bail!(
                    "member {} did not listen on {} within 20 s",
                    self.id,
                    self.addr
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        self.kill();
    }
}

pub fn run(args: ElectionBenchArgs) -> anyhow::Result<()> {
    let bin = match args.volmgr_bin {
        Some(b) => b,
        None => std::env::current_exe()?
            .parent()
            .context("the running cairn binary has no folder")?
            .join("cairn-volmgr"),
    };
    if !bin.is_file() {
        bail!(
            "{} not found; build it with `cargo build --release -p cairn-volmgr`",
            bin.display()
        );
    }
    let dir = tempfile::Builder::new()
        .prefix("cairn-bench-election-")
        .tempdir()
        .context("creating a temporary folder")?;
    let mut addrs = Vec::new();
    for id in 1..=3u64 {
        addrs.push((
            id,
            free_loopback_addr(Ipv4Addr::new(127, 0, 0, 1 + id as u8))?,
        ));
    }
    let initial: Vec<String> = addrs.iter().map(|(id, a)| format!("{id}={a}")).collect();
    let mut members: Vec<Member> = addrs
        .iter()
        .map(|&(id, addr)| Member {
            id,
            addr,
            bin: bin.clone(),
            child: None,
            args: vec![
                "--data-dir".into(),
                dir.path().join(format!("m{id}")).display().to_string(),
                "--cluster-id".into(),
                "bench".into(),
                "--member-id".into(),
                id.to_string(),
                "--listen".into(),
                addr.to_string(),
                "--initial-members".into(),
                initial.join(","),
            ],
        })
        .collect();
    for m in &mut members {
        m.start()?;
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let member_addrs: Vec<String> = addrs.iter().map(|(_, a)| a.to_string()).collect();
    let mut times = Vec::new();
    rt.block_on(async {
        let client = VolmgrClient::new(member_addrs.clone(), "bench");
        // A 1-replica volume needs one chunk server registered.
        client
            .register_node(1, "127.0.0.2:7410", "h1", "", "", 1, 1 << 40)
            .await?;
        for round in 1..=args.rounds {
            client.heartbeat(1, 0).await?;
            let leader = client.cluster_status().await?.leader_id;
            let m = members
                .iter_mut()
                .find(|m| m.id == leader)
                .context("the leader is not one of the members")?;
            m.kill();
            let t0 = Instant::now();
            // A fresh client: no cached connection to the dead leader.
            let c = VolmgrClient::new(member_addrs.clone(), "bench");
            c.create_volume(&format!("round-{round}"), 1 << 30, 0, 1, 1)
                .await?;
            let took = t0.elapsed();
            eprintln!(
                "[bench] round {round}: leader {leader} killed, a new one served after {took:?}"
            );
            times.push(took);
            m.start()?;
            // Let it catch up before the next kill.
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
        anyhow::Ok(())
    })?;
    let mut sorted = times.clone();
    sorted.sort();
    let ms = |d: &Duration| d.as_secs_f64() * 1000.0;
    let (min, med, max) = (
        ms(&sorted[0]),
        ms(&sorted[sorted.len() / 2]),
        ms(sorted.last().expect("at least one round")),
    );
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "rounds": times.iter().map(ms).collect::<Vec<_>>(),
                "min_ms": min, "median_ms": med, "max_ms": max,
                "goal_ms": 3000.0,
            })
        );
    } else {
        println!(
            "volume manager election (3 members, kill -9 of the leader until a creation is acknowledged):"
        );
        for (i, t) in times.iter().enumerate() {
            println!("  round {:>2}  {:>8.0} ms", i + 1, ms(t));
        }
        println!(
            "  min {min:.0} ms, median {med:.0} ms, max {max:.0} ms; goal: under 3000 ms: {}",
            if max < 3000.0 { "PASS" } else { "FAIL" }
        );
    }
    Ok(())
}

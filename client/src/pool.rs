//! Connections to chunk servers: per node address a fixed number of
//! [`ChunkClient`]s, used round-robin, connected on first use and replaced
//! once closed. Each connection pipelines many requests.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::chunk::ChunkClient;

pub(crate) struct Pool {
    per_node: usize,
    connect_timeout: Duration,
    nodes: Mutex<HashMap<String, Arc<NodeConns>>>,
}

struct NodeConns {
    next: AtomicUsize,
    /// Held across a connect, so that callers sharing a slot wait for one
    /// connection instead of each opening their own.
    slots: Vec<tokio::sync::Mutex<Option<ChunkClient>>>,
}

impl Pool {
    pub(crate) fn new(per_node: usize, connect_timeout: Duration) -> Pool {
        Pool {
            per_node: per_node.max(1),
            connect_timeout,
            nodes: Mutex::new(HashMap::new()),
        }
    }

    /// A live connection to `addr`, connecting if the slot's turn has none.
    pub(crate) async fn get(&self, addr: &str) -> Result<ChunkClient, String> {
        let node = {
            let mut nodes = self.nodes.lock().unwrap_or_else(|p| p.into_inner());
            nodes
                .entry(addr.to_string())
                .or_insert_with(|| {
                    Arc::new(NodeConns {
                        next: AtomicUsize::new(0),
                        slots: (0..self.per_node)
                            .map(|_| tokio::sync::Mutex::new(None))
                            .collect(),
                    })
                })
                .clone()
        };
        let i = node.next.fetch_add(1, Ordering::Relaxed) % node.slots.len();
        let mut slot = node.slots[i].lock().await;
        if let Some(c) = slot.as_ref() {
            if c.closed_reason().is_none() {
                return Ok(c.clone());
            }
            *slot = None;
        }
        let c = tokio::time::timeout(self.connect_timeout, ChunkClient::connect(addr))
            .await
            .map_err(|_| {
                format!(
                    "connecting to chunk server {addr} timed out after {:?}",
                    self.connect_timeout
                )
            })?
            .map_err(|e| format!("{e:#}"))?;
        *slot = Some(c.clone());
        Ok(c)
    }

    /// Closes the connections to nodes not in `keep` (they left the map).
    pub(crate) fn retain(&self, keep: impl Fn(&str) -> bool) {
        let mut nodes = self.nodes.lock().unwrap_or_else(|p| p.into_inner());
        nodes.retain(|addr, _| keep(addr));
    }
}

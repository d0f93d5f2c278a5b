//! A chunk RPC server inside the test process, for testing the commands'
//! client side without the daemon binary.

use std::net::SocketAddr;

use cairn_chunkserver::rpc::{serve, ServerConfig};
use cairn_chunkserver::store::{IoMode, Store, StoreOptions};
use tokio::sync::watch;

pub struct TestServer {
    pub addr: SocketAddr,
    store: Store,
    shutdown: watch::Sender<bool>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
    _dir: tempfile::TempDir,
}

impl TestServer {
    /// Must be called inside a tokio runtime.
    pub async fn start() -> TestServer {
        let dir = tempfile::tempdir().unwrap();
        // Buffered, so tests also run where the temp dir is tmpfs (no O_DIRECT).
        let options = StoreOptions {
            io_mode: IoMode::Buffered,
            ..Default::default()
        };
        let store = Store::open(&dir.path().join("extents"), options).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let config = ServerConfig {
            cluster_id: "test-cluster".to_string(),
            node_id: 7,
            data_dir: dir.path().to_path_buf(),
            ..Default::default()
        };
        let (shutdown, rx) = watch::channel(false);
        let task = tokio::spawn(serve(listener, store.clone(), config, None, rx));
        TestServer {
            addr,
            store,
            shutdown,
            task,
            _dir: dir,
        }
    }

    pub async fn stop(self) {
        self.shutdown.send(true).unwrap();
        self.task.await.unwrap().unwrap();
        self.store.shutdown().await.unwrap();
    }
}

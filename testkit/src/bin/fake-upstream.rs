//! `fake-upstream [ADDR]` — the scripted OpenAI-compatible upstream as a process of its own
//! (default 127.0.0.1:4010, where config/litellm.yaml routes `fake/*`). Test equipment.

use std::net::SocketAddr;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let addr: SocketAddr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:4010".into())
        .parse()?;
    tracing::info!(%addr, "fake upstream listening");
    testkit::fake_upstream::serve(addr).await?;
    Ok(())
}

//! Runs against a `latticed dev` cluster:
//!
//! ```sh
//! cargo run --release -p lattice-server -- dev        # in one terminal
//! cargo run -p lattice-client --example quickstart     # in another
//! ```

use lattice_client::{Client, Error};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
struct Profile {
    name: String,
    visits: u32,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Error> {
    let dir = std::path::Path::new(".lattice-dev");
    let ca = std::fs::read_to_string(dir.join("certs/ca.pem"))
        .map_err(|e| Error::Config(format!("run `latticed dev` first: {e}")))?;
    let token = std::fs::read_to_string(dir.join("token")).map_err(|e| Error::Config(e.to_string()))?;
    // Home region first; the others are failover targets. Each endpoint
    // names its node: that node's certificate must carry the name.
    let client = Client::builder()
        .endpoints(["n1@127.0.0.1:7401", "n2@127.0.0.1:7402", "n3@127.0.0.1:7403"])
        .token(token.trim())
        .ca_cert(&ca)
        .connect()
        .await?;

    client.counter("example:visits").incr(1).await?;
    println!("visits = {}", client.counter("example:visits").get().await?);

    let me = Profile {
        name: "ada".into(),
        visits: 1,
    };
    client.register::<Profile>("example:profile").set(&me).await?;
    println!(
        "profile = {:?}",
        client.register::<Profile>("example:profile").get().await?
    );

    client.set::<String>("example:tags").add(&"rust".into()).await?;
    client.set::<String>("example:tags").add(&"crdt".into()).await?;
    println!("tags = {:?}", client.set::<String>("example:tags").get().await?);

    client.map("example:cart").incr("items", 2).await?;
    client.map("example:cart").add_to("skus", &"sku-42").await?;
    println!("cart = {:?}", client.map("example:cart").get().await?);

    // Several keys, one atomic delta-group.
    client
        .batch()
        .incr("example:a", 1)
        .set("example:b", &"two")
        .commit()
        .await?;

    // A wrong type is a typed error, never a silent reset.
    match client.set::<u32>("example:visits").add(&1).await {
        Err(Error::TypeMismatch(msg)) => println!("refused as expected: {msg}"),
        other => println!("unexpected: {other:?}"),
    }
    Ok(())
}

//! `rig-frame-bridge`: receive microscope frames over TCP and write them into
//! the shared-memory frame ring that rigd reads (`docs/frame-bridge.md`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Parser;
use frame_bridge::receiver::{geometry, Receiver, ReceiverConfig};

/// Receive frames from a network sender (Python, ScanImage) and write them
/// into the frame ring with the sender's frame numbers and stamps.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Address to listen on. Loopback by default; a LAN address only on a
    /// private acquisition network.
    #[arg(long, default_value = "127.0.0.1:7690")]
    listen: SocketAddr,
    /// File holding the shared token (at least 16 bytes; one trailing
    /// newline is ignored). Or set RIG_BRIDGE_TOKEN.
    #[arg(long, value_name = "PATH")]
    token_file: Option<PathBuf>,
    /// The frame ring's shared-memory name (imaging.shm_name in rig.toml).
    #[arg(long, default_value = "/rigd-frames")]
    shm_name: String,
    /// Frame width, pixels (imaging.width).
    #[arg(long)]
    width: u32,
    /// Frame height, pixels (imaging.height).
    #[arg(long)]
    height: u32,
    /// Channels, 1 or 2 (imaging.channels).
    #[arg(long, default_value_t = 1)]
    channels: u32,
    /// Ring slots.
    #[arg(long, default_value_t = 64)]
    slots: u32,
    /// Close a sender that sends nothing for this long, ms.
    #[arg(long, default_value_t = 5000)]
    idle_timeout_ms: u64,
    /// A connection must complete its hello within this, ms.
    #[arg(long, default_value_t = 5000)]
    hello_timeout_ms: u64,
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: nix::libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

fn read_token(args: &Args) -> anyhow::Result<Vec<u8>> {
    let mut token = match (&args.token_file, std::env::var_os("RIG_BRIDGE_TOKEN")) {
        (Some(path), _) => std::fs::read(path)
            .with_context(|| format!("reading the token file {}", path.display()))?,
        (None, Some(t)) => t.into_encoded_bytes(),
        (None, None) => bail!("no token: pass --token-file PATH or set RIG_BRIDGE_TOKEN"),
    };
    if token.last() == Some(&b'\n') {
        token.pop();
    }
    Ok(token)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let token = read_token(&args)?;
    let geometry = geometry(args.width, args.height, args.channels, args.slots)
        .context("--width/--height/--channels/--slots")?;
    let mut config = ReceiverConfig::new(args.listen, token, &args.shm_name, geometry);
    config.idle_timeout = Duration::from_millis(args.idle_timeout_ms);
    config.hello_timeout = Duration::from_millis(args.hello_timeout_ms);
    let receiver = Receiver::bind(config)?;
    let addr = receiver.local_addr().context("the bound address")?;
    let action = nix::sys::signal::SigAction::new(
        nix::sys::signal::SigHandler::Handler(on_signal),
        nix::sys::signal::SaFlags::empty(),
        nix::sys::signal::SigSet::empty(),
    );
    for sig in [nix::sys::signal::SIGINT, nix::sys::signal::SIGTERM] {
        // SAFETY: the handler only stores to an atomic (async-signal-safe).
        unsafe { nix::sys::signal::sigaction(sig, &action) }
            .context("installing a signal handler")?;
    }
    // The line tests and scripts wait for (the port when --listen ends in :0).
    println!("listening on {addr}, ring {}", args.shm_name);
    let stats = receiver.run(&STOP)?;
    eprintln!(
        "rig-frame-bridge: stopped: {} senders accepted, {} refused, {} frames written, {} \
         discarded, {} dropped at the sender, {} ring generation(s)",
        stats.accepted,
        stats.refused,
        stats.frames_written,
        stats.frames_discarded,
        stats.sender_dropped,
        stats.generations
    );
    Ok(())
}

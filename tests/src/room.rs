//! Several rigs on one machine, laid out as `rigd@.service` expects: a
//! config folder `<root>/etc/rigd/rigs/NAME.toml`, each rig with its own
//! simulated device, socket (`<root>/run/rigd/NAME/rigd.sock`), data root
//! (`<root>/var/lib/rigd/NAME`) and preview port; each rigd started with the
//! unit's own `ExecStart` line (its paths moved under `<root>`).

use std::path::{Path, PathBuf};

use crate::{bin, workspace_root, Rigd, Sim};

/// One rig of the room.
#[derive(Debug)]
pub struct RoomRig {
    pub name: String,
    pub config: PathBuf,
    pub socket: PathBuf,
    pub data: PathBuf,
    pub truth: PathBuf,
    /// The preview server's port on 127.0.0.1 (`/metrics`), if enabled.
    pub preview_port: Option<u16>,
    pub rigd: Option<Rigd>,
    pub sim: Sim,
}

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

/// The config folder under `root`.
pub fn rigs_dir(root: &Path) -> PathBuf {
    root.join("etc/rigd/rigs")
}

/// The unit's `ExecStart` for instance `name`, with `/usr/local/bin/rigd`
/// the built binary and `/etc/rigd` moved under `root`: the argv.
pub fn exec_start(root: &Path, name: &str) -> Vec<String> {
    let unit = std::fs::read_to_string(workspace_root().join("packaging/systemd/rigd@.service"))
        .expect("read rigd@.service");
    let line = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .expect("ExecStart= in rigd@.service");
    line.split_whitespace()
        .map(|w| {
            w.replace("/usr/local/bin/rigd", &bin("rigd").display().to_string())
                .replace("/etc/rigd", &root.join("etc/rigd").display().to_string())
                .replace("%i", name)
        })
        .collect()
}

/// Write the configuration of rig `name` under `root` and start its sim
/// (with `sim_args`); rigd is not started yet.
pub fn add_rig(
    root: &Path,
    name: &str,
    preview: bool,
    extra_toml: &str,
    sim_args: &[&str],
) -> RoomRig {
    let sim_dir = root.join("sim").join(name);
    std::fs::create_dir_all(&sim_dir).expect("sim dir");
    let truth = sim_dir.join("truth.tsv");
    let mut args = vec!["--truth", truth.to_str().expect("utf-8")];
    args.extend_from_slice(sim_args);
    let sim = Sim::start(&sim_dir, &args);
    let socket_dir = root.join("run/rigd").join(name);
    std::fs::create_dir_all(&socket_dir).expect("runtime dir");
    let socket = socket_dir.join("rigd.sock");
    let data = root.join("var/lib/rigd").join(name);
    std::fs::create_dir_all(&data).expect("data root");
    let rigs = rigs_dir(root);
    std::fs::create_dir_all(&rigs).expect("rigs dir");
    let preview_port = preview.then(free_port);
    let preview_toml = match preview_port {
        Some(p) => format!("[preview]\nenabled = true\nbind = \"127.0.0.1\"\nport = {p}\n"),
        None => "[preview]\nenabled = false\n".to_owned(),
    };
    let config = rigs.join(format!("{name}.toml"));
    std::fs::write(
        &config,
        format!(
            "[rig]\nname = {name:?}\nserial_port = {:?}\n\n[storage]\ndata_root = {:?}\n\
             fsync_interval_ms = 100\n\n[control]\nsocket = {:?}\n\n{preview_toml}\n\
             [imaging]\nenabled = false\nshm_name = \"/rigd-frames-{name}\"\n\n{extra_toml}\n",
            sim.link.display().to_string(),
            data.display().to_string(),
            socket.display().to_string(),
        ),
    )
    .expect("write the rig's config");
    RoomRig {
        name: name.to_owned(),
        config,
        socket,
        data,
        truth,
        preview_port,
        rigd: None,
        sim,
    }
}

impl RoomRig {
    /// Start rigd as `rigd@NAME` would (the unit's ExecStart).
    pub fn start_rigd(&mut self, root: &Path) {
        let argv = exec_start(root, &self.name);
        assert_eq!(argv.len(), 3, "ExecStart is `rigd --config FILE`: {argv:?}");
        assert_eq!(argv[1], "--config");
        assert_eq!(Path::new(&argv[2]), self.config, "the unit's config path");
        self.rigd = Some(Rigd::start(Path::new(&argv[2]), &self.socket));
    }
}

fn main() {
    eprintln!("rig-sim: not built yet (the firmware-bridge issue adds it)");
    std::process::exit(2);
}

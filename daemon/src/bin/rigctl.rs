fn main() {
    eprintln!("rigctl: not built yet (the daemon issue adds it)");
    std::process::exit(2);
}

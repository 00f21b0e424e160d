fn main() {
    std::process::exit(sockscope::cli::main());
}

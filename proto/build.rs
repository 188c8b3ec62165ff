//! Compiles every `.proto` under `proto/` with protox (pure Rust, no system protoc).
use std::path::{Path, PathBuf};

fn collect(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read proto dir") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            collect(&path, out);
        } else if path.extension().is_some_and(|e| e == "proto") {
            out.push(path);
        }
    }
}

fn main() {
    let root = Path::new("proto");
    let mut files = Vec::new();
    collect(root, &mut files);
    files.sort();
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(&files, [root]).expect("protobuf sources compile");
    tonic_prost_build::configure().compile_fds(fds).expect("generate Rust from protobuf");
}

//! `xcluster load`: the load generator built on the SDK.

use crate::args::LoadArgs;

pub fn run(args: LoadArgs) -> i32 {
    eprintln!(
        "xcluster load: not available yet (via {:?}, targets {})",
        args.via, args.targets
    );
    69
}

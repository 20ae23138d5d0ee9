//! `xcluster ctl`: the monitor's control client. The monitor issue gives it its verbs' behaviour.

use crate::args::CtlArgs;

pub fn run(args: CtlArgs) -> i32 {
    eprintln!(
        "xcluster ctl: the monitor's control API is not available yet (monitor at {})",
        args.url
    );
    69
}
